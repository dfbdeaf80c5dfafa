//! Checks of a decoded request against a model's declared tensors, before anything reaches the
//! guest: names, datatypes, shapes (-1 is any size) and data sizes of the inputs, and the names
//! of the requested outputs.

use super::{RequestedOutput, Result, Role, Tensor, V2Error};
use sophon_sdk::TensorSpec;
use std::collections::HashSet;

/// Checks that the inputs are exactly the declared ones, each once, with the declared datatype, a
/// shape the declared one accepts, and data that holds exactly that shape's elements.
pub fn validate_inputs(inputs: &[Tensor], specs: &[TensorSpec]) -> Result<()> {
    let mut seen = HashSet::with_capacity(inputs.len());
    for input in inputs {
        if !seen.insert(input.name.as_str()) {
            return Err(V2Error::Duplicate {
                role: Role::Input,
                name: input.name.clone(),
            });
        }
        let Some(spec) = specs.iter().find(|s| s.name == input.name) else {
            return Err(V2Error::UnknownInput {
                name: input.name.clone(),
                expected: names(specs),
            });
        };
        if input.datatype != spec.datatype {
            return Err(V2Error::DatatypeMismatch {
                name: input.name.clone(),
                expected: spec.datatype,
                got: input.datatype,
            });
        }
        if !spec.accepts_shape(&input.shape) {
            return Err(V2Error::ShapeMismatch {
                name: input.name.clone(),
                expected: spec.shape.clone(),
                got: input.shape.clone(),
            });
        }
        input.check_data(Role::Input)?;
    }
    if let Some(missing) = specs.iter().find(|s| !seen.contains(s.name.as_str())) {
        return Err(V2Error::MissingInput {
            name: missing.name.clone(),
            expected: names(specs),
        });
    }
    Ok(())
}

/// Checks that a batching model's inputs hold at most `max_batch_size` rows (dim 0). A
/// `max_batch_size` of 0 means the model does not batch, and dim 0 is checked by the shape alone.
pub fn validate_batch(inputs: &[Tensor], max_batch_size: u32) -> Result<()> {
    if max_batch_size == 0 {
        return Ok(());
    }
    for input in inputs {
        let rows = input.shape.first().copied().unwrap_or(1);
        if rows > u64::from(max_batch_size) {
            return Err(V2Error::Tensor {
                role: Role::Input,
                name: input.name.clone(),
                reason: format!(
                    "batch of {rows} is over the model's max_batch_size of {max_batch_size}: \
                     split the request"
                ),
            });
        }
    }
    Ok(())
}

/// Checks that every requested output is declared, and requested once.
pub fn select_outputs(requested: &[RequestedOutput], specs: &[TensorSpec]) -> Result<()> {
    let mut seen = HashSet::with_capacity(requested.len());
    for output in requested {
        let Some(spec) = specs.iter().find(|s| s.name == output.name) else {
            return Err(V2Error::UnknownOutput {
                name: output.name.clone(),
                expected: names(specs),
            });
        };
        if output.classification.is_some() && !crate::classify::classifiable(spec.datatype) {
            return Err(crate::classify::unclassifiable(&output.name, spec.datatype));
        }
        if !seen.insert(output.name.as_str()) {
            return Err(V2Error::Duplicate {
                role: Role::Output,
                name: output.name.clone(),
            });
        }
    }
    Ok(())
}

/// The declared names, quoted, for error messages: `'a', 'b'` (or `none`).
fn names(specs: &[TensorSpec]) -> String {
    if specs.is_empty() {
        return "none".into();
    }
    specs
        .iter()
        .map(|s| format!("'{}'", s.name))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use sophon_sdk::Datatype;

    fn spec(name: &str, datatype: Datatype, shape: &[i64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype,
            shape: shape.to_vec(),
        }
    }

    fn specs() -> Vec<TensorSpec> {
        vec![
            spec("image", Datatype::Fp32, &[-1, 3]),
            spec("labels", Datatype::Bytes, &[-1]),
        ]
    }

    fn image(rows: u64) -> Tensor {
        Tensor::from_f32("image", vec![rows, 3], &vec![0.5; rows as usize * 3])
    }

    fn labels(n: usize) -> Tensor {
        let elements = vec!["cat"; n];
        Tensor::from_bytes_elements("labels", vec![n as u64], &elements).expect("small elements")
    }

    fn message(inputs: &[Tensor]) -> String {
        validate_inputs(inputs, &specs())
            .expect_err("should be refused")
            .to_string()
    }

    #[test]
    fn variable_dimensions_accept_any_size() {
        for rows in [0, 1, 7] {
            validate_inputs(&[image(rows), labels(2)], &specs()).expect("valid");
        }
        // Order does not matter.
        validate_inputs(&[labels(1), image(1)], &specs()).expect("valid");
    }

    #[test]
    fn names_must_match_exactly_once() {
        assert_eq!(
            message(&[image(1)]),
            "missing input 'labels': the model's inputs are 'image', 'labels'"
        );
        let mut stray = labels(1);
        stray.name = "label".into();
        assert_eq!(
            message(&[image(1), stray]),
            "unknown input 'label': the model's inputs are 'image', 'labels'"
        );
        assert_eq!(
            message(&[image(1), labels(1), image(2)]),
            "input 'image' appears more than once: send each input once"
        );
        let err = validate_inputs(&[image(1)], &[]).expect_err("no inputs declared");
        assert_eq!(
            err.to_string(),
            "unknown input 'image': the model's inputs are none"
        );
    }

    #[test]
    fn datatype_must_match() {
        let mut wrong = image(1);
        wrong.datatype = Datatype::Fp64;
        wrong.data.extend_from_slice(&[0; 12]);
        assert_eq!(
            message(&[wrong, labels(1)]),
            "input 'image' has datatype FP64 but the model expects FP32"
        );
    }

    #[test]
    fn rank_and_fixed_dimensions_must_match() {
        let wrong = Tensor::from_f32("image", vec![1, 4], &[0.0; 4]);
        assert_eq!(
            message(&[wrong, labels(1)]),
            "input 'image' has shape [1, 4] but the model expects [-1, 3] (-1 is any size)"
        );
        let wrong = Tensor::from_f32("image", vec![3], &[0.0; 3]);
        assert!(message(&[wrong, labels(1)]).contains("has shape [3]"));
    }

    #[test]
    fn data_size_must_match_shape() {
        let mut short = image(2);
        short.data.truncate(20);
        assert_eq!(
            message(&[short, labels(1)]),
            "input 'image': shape [2, 3] of FP32 needs 24 bytes of data but there are 20"
        );
        let mut extra = labels(2);
        extra.shape = vec![3];
        assert_eq!(
            message(&[image(1), extra]),
            "input 'labels': shape [3] needs 3 BYTES elements but there are 2"
        );
        let mut trailing = labels(2);
        trailing.data.push(0);
        assert!(message(&[image(1), trailing]).contains("element 2 is truncated"));
        let status = validate_inputs(&[image(1)], &specs())
            .expect_err("missing")
            .status();
        assert_eq!(status, 400);
    }

    #[test]
    fn batches_over_max_batch_size_are_refused() {
        validate_batch(&[image(8)], 8).expect("at the limit");
        validate_batch(&[image(9)], 0).expect("no batching: not checked here");
        let err = validate_batch(&[image(9)], 8).expect_err("over");
        assert_eq!(err.status(), 400);
        assert_eq!(
            err.to_string(),
            "input 'image': batch of 9 is over the model's max_batch_size of 8: split the request"
        );
    }

    #[test]
    fn requested_outputs_must_be_declared_once() {
        let outputs = vec![
            spec("scores", Datatype::Fp32, &[-1, 10]),
            spec("ids", Datatype::Int64, &[-1]),
        ];
        let want = |names: &[&str]| -> Vec<RequestedOutput> {
            names
                .iter()
                .map(|n| RequestedOutput {
                    name: n.to_string(),
                    binary: false,
                    classification: None,
                })
                .collect()
        };
        select_outputs(&want(&[]), &outputs).expect("all outputs");
        select_outputs(&want(&["ids"]), &outputs).expect("one output");
        let err = select_outputs(&want(&["ids", "score"]), &outputs).expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "unknown output 'score': the model's outputs are 'scores', 'ids'"
        );
        let err = select_outputs(&want(&["ids", "ids"]), &outputs).expect_err("twice");
        assert_eq!(
            err.to_string(),
            "output 'ids' appears more than once: send each output once"
        );
    }
}
