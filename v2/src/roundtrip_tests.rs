//! Property tests of the codec as a whole: every datatype through request and response bodies,
//! as JSON, as binary tensor data and mixed, and nested JSON `data` against flat. Kept apart from
//! `codec.rs` so that file stays about one idea.

use super::json::JsonData;
use super::*;
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::sample::select;
use std::collections::HashSet;

/// Raw data for `count` elements of `datatype`. With `json_safe`, floats are finite and `BYTES`
/// elements are UTF-8, which is what JSON can carry; otherwise any bits (but BOOL is 0 or 1).
fn data(datatype: Datatype, count: usize, json_safe: bool) -> BoxedStrategy<Vec<u8>> {
    use proptest::collection::vec;
    match (datatype, datatype.element_size()) {
        (Datatype::Bool, _) => vec(0u8..2, count).boxed(),
        (Datatype::Bytes, _) if json_safe => vec(".{0,6}", count).prop_map(frame).boxed(),
        (Datatype::Bytes, _) => vec(vec(any::<u8>(), 0..6), count).prop_map(frame).boxed(),
        (_, Some(size)) => vec(any::<u8>(), count * size)
            .prop_map(move |mut bytes| {
                if json_safe {
                    zero_non_finite(datatype, &mut bytes);
                }
                bytes
            })
            .boxed(),
        (_, None) => Just(Vec::new()).boxed(),
    }
}

fn frame<B: AsRef<[u8]>>(elements: Vec<B>) -> Vec<u8> {
    Tensor::from_bytes_elements("t", vec![], &elements)
        .expect("small elements")
        .data
}

/// Replaces NaN and infinite floats with zero.
fn zero_non_finite(datatype: Datatype, bytes: &mut [u8]) {
    let Some(size) = datatype.element_size() else {
        return;
    };
    for chunk in bytes.chunks_exact_mut(size) {
        let finite = match datatype {
            Datatype::Fp16 => f16::from_le_bytes([chunk[0], chunk[1]]).is_finite(),
            Datatype::Bf16 => bf16::from_le_bytes([chunk[0], chunk[1]]).is_finite(),
            Datatype::Fp32 => {
                f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]).is_finite()
            }
            Datatype::Fp64 => f64::from_le_bytes(chunk.try_into().expect("8 bytes")).is_finite(),
            _ => true,
        };
        if !finite {
            chunk.fill(0);
        }
    }
}

/// A tensor of any datatype and a shape of rank 0..=3 with up to 4 per dimension.
fn tensor(json_safe: bool) -> impl Strategy<Value = Tensor> {
    (
        select(Datatype::ALL.to_vec()),
        proptest::collection::vec(0u64..5, 0..4),
    )
        .prop_flat_map(move |(datatype, shape)| {
            let count = element_count(&shape).expect("small shape") as usize;
            data(datatype, count, json_safe)
                .prop_map(move |data| Tensor::new("t", datatype, shape.clone(), data))
        })
}

/// Tensors named `{prefix}{i}`, each with a flag saying whether it goes binary.
fn tensors(prefix: &'static str, json_safe: bool) -> impl Strategy<Value = Vec<(Tensor, bool)>> {
    proptest::collection::vec((tensor(json_safe), any::<bool>()), 0..5).prop_map(move |mut ts| {
        for (i, (t, _)) in ts.iter_mut().enumerate() {
            t.name = format!("{prefix}{i}");
        }
        ts
    })
}

fn id() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        "[a-z0-9-]{0,12}".prop_map(|s| Some(Value::from(s))),
        any::<u64>().prop_map(|n| Some(Value::from(n))),
    ]
}

fn request(json_safe: bool) -> impl Strategy<Value = (InferRequest, Vec<bool>)> {
    let parameters = proptest::collection::btree_map("[a-z_]{1,8}", any::<i64>(), 0..3);
    let outputs =
        proptest::collection::vec((any::<bool>(), proptest::option::of(1u32..2000)), 0..3);
    (
        tensors("input", json_safe),
        id(),
        parameters,
        outputs,
        any::<bool>(),
    )
        .prop_map(|(inputs, id, parameters, outputs, binary_data_output)| {
            let parameters = parameters
                .into_iter()
                .filter(|(k, _)| k != "binary_data_output")
                .map(|(k, v)| (k, Value::from(v)))
                .collect();
            let outputs = outputs
                .into_iter()
                .enumerate()
                .map(|(i, (binary, classification))| RequestedOutput {
                    name: format!("output{i}"),
                    binary,
                    classification,
                })
                .collect();
            let (inputs, flags) = inputs.into_iter().unzip();
            let request = InferRequest {
                id,
                parameters,
                inputs,
                outputs,
                binary_data_output,
            };
            (request, flags)
        })
}

/// Which tensor names the flags mark as binary.
fn binary_names(tensors: &[Tensor], flags: &[bool]) -> HashSet<String> {
    tensors
        .iter()
        .zip(flags)
        .filter(|(_, b)| **b)
        .map(|(t, _)| t.name.clone())
        .collect()
}

/// Reshapes a flat JSON array into nested arrays following `shape` (row-major).
fn nest(flat: &[Value], shape: &[u64]) -> Value {
    match shape.split_first() {
        None => flat.first().cloned().unwrap_or(Value::Null),
        Some((_, [])) => Value::Array(flat.to_vec()),
        Some((&outer, inner)) => {
            let stride = element_count(inner).expect("small shape") as usize;
            let rows =
                (0..outer as usize).map(|i| nest(&flat[i * stride..(i + 1) * stride], inner));
            Value::Array(rows.collect())
        }
    }
}

/// Decodes the JSON of `t`'s own data back into `t`'s datatype and shape.
fn json_round_trip(t: &Tensor) -> Vec<u8> {
    let json = serde_json::to_string(&JsonData(t)).expect("serialises");
    json::decode_data(&json, t.datatype, &t.shape, Role::Output, "t").expect("decodes")
}

#[test]
fn every_finite_half_float_survives_json() {
    for datatype in [Datatype::Fp16, Datatype::Bf16] {
        let mut data: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
        zero_non_finite(datatype, &mut data);
        let t = Tensor::new("t", datatype, vec![1 << 16], data);
        assert!(
            json_round_trip(&t) == t.data,
            "{datatype} changed through JSON"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]
    #[test]
    fn every_finite_f32_and_f64_survives_json(bits32 in any::<u32>(), bits64 in any::<u64>()) {
        let mut t = Tensor::new("t", Datatype::Fp32, vec![], bits32.to_le_bytes().to_vec());
        zero_non_finite(Datatype::Fp32, &mut t.data);
        prop_assert_eq!(json_round_trip(&t), t.data);
        let mut t = Tensor::new("t", Datatype::Fp64, vec![], bits64.to_le_bytes().to_vec());
        zero_non_finite(Datatype::Fp64, &mut t.data);
        prop_assert_eq!(json_round_trip(&t), t.data);
    }
}

proptest! {
    #[test]
    fn request_json_round_trip((request, _) in request(true)) {
        let encoded = encode_request(&request, |_| false).expect("encodes");
        prop_assert_eq!(encoded.header_len, None);
        prop_assert_eq!(decode_request(&encoded.body, None).expect("decodes"), request);
    }

    #[test]
    fn request_binary_round_trip((request, _) in request(false)) {
        let encoded = encode_request(&request, |_| true).expect("encodes");
        let decoded = decode_request(&encoded.body, encoded.header_len).expect("decodes");
        prop_assert_eq!(decoded, request);
    }

    #[test]
    fn request_mixed_round_trip((request, flags) in request(true)) {
        let binary = binary_names(&request.inputs, &flags);
        let encoded = encode_request(&request, |name| binary.contains(name)).expect("encodes");
        prop_assert_eq!(encoded.header_len.is_some(), !binary.is_empty());
        let decoded = decode_request(&encoded.body, encoded.header_len).expect("decodes");
        prop_assert_eq!(decoded, request);
    }

    #[test]
    fn response_round_trip(
        outputs in tensors("output", true),
        all_binary in any::<bool>(),
        name in "[a-z]{1,8}",
        version in proptest::option::of("[0-9]{1,3}"),
        id in id(),
    ) {
        let (outputs, flags): (Vec<Tensor>, Vec<bool>) = outputs.into_iter().unzip();
        let binary = binary_names(&outputs, &flags);
        let is_binary = |n: &str| all_binary || binary.contains(n);
        let encoded = encode_response(&name, version.as_deref(), id.as_ref(), &outputs, is_binary)
            .expect("encodes");
        let decoded = decode_response(&encoded.body, encoded.header_len).expect("decodes");
        let expected = InferResponse { model_name: name, model_version: version, id, outputs };
        prop_assert_eq!(decoded, expected);
    }

    #[test]
    fn response_binary_round_trip_of_any_bits(outputs in tensors("output", false)) {
        let outputs: Vec<Tensor> = outputs.into_iter().map(|(t, _)| t).collect();
        let encoded = encode_response("m", None, None, &outputs, |_| true).expect("encodes");
        prop_assert_eq!(encoded.header_len.is_some(), !outputs.is_empty());
        let decoded = decode_response(&encoded.body, encoded.header_len).expect("decodes");
        prop_assert_eq!(decoded.outputs, outputs);
    }

    #[test]
    fn nested_and_flat_json_data_agree(t in tensor(true)) {
        let flat = serde_json::to_value(JsonData(&t)).expect("serialises");
        let Value::Array(elements) = &flat else { panic!("data is an array") };
        let nested = nest(elements, &t.shape);
        let body = |data: &Value| {
            let input = serde_json::json!({
                "name": "t", "datatype": t.datatype.as_str(), "shape": t.shape, "data": data
            });
            serde_json::json!({ "inputs": [input] }).to_string()
        };
        let from_flat = decode_request(body(&flat).as_bytes(), None).expect("flat decodes");
        let from_nested = decode_request(body(&nested).as_bytes(), None).expect("nested decodes");
        prop_assert_eq!(&from_flat.inputs, &from_nested.inputs);
        prop_assert_eq!(&from_flat.inputs[0], &t);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        body in proptest::collection::vec(any::<u8>(), 0..200),
        header_len in proptest::option::of(0usize..220),
    ) {
        let _ = decode_request(&body, header_len);
        let _ = decode_response(&body, header_len);
    }
}
