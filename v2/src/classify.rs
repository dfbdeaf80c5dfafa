//! Triton's classification extension: a requested output with `parameters.classification = k`
//! comes back as its `k` largest values, each a `BYTES` element `"<value>:<index>"` (or
//! `"<value>:<index>:<label>"` where the model names its classes), largest first.
//!
//! Values print as Triton prints them: floats with six decimals (C's `%f`, what
//! `std::to_string` writes), integers as integers. For a model with a batch dimension the
//! classes are taken per batch entry and the answer's shape is `[batch, k]`; otherwise over the
//! whole tensor, `[k]`. `k` larger than the classes there are gives them all. Equal values keep
//! index order, and NaN ranks below every number, so an answer is the same on every run.

use crate::{Result, Tensor, V2Error};
use sophon_sdk::Datatype;
use std::cmp::Ordering;

/// Whether `datatype` can be classified: the numeric types (not `BOOL` or `BYTES`).
pub fn classifiable(datatype: Datatype) -> bool {
    !matches!(datatype, Datatype::Bool | Datatype::Bytes)
}

/// The error for asking to classify output `name` of a type that holds no numbers.
pub fn unclassifiable(name: &str, datatype: Datatype) -> V2Error {
    V2Error::tensor(
        crate::Role::Output,
        name,
        format!("a {datatype} output cannot be classified: classification needs numbers"),
    )
}

/// `tensor`'s top `k` classes (see the module's docs), a `BYTES` tensor of the same name.
/// `batched`: the model's first dimension is its batch; `labels`: the class names, by index.
pub fn classify(
    tensor: &Tensor,
    k: usize,
    batched: bool,
    labels: Option<&[String]>,
) -> Result<Tensor> {
    let values = values(tensor)?;
    let (batch, per) = match tensor.shape.first() {
        Some(&b) if batched => {
            let b = usize::try_from(b).unwrap_or(usize::MAX);
            (b, values.len().checked_div(b).unwrap_or(0))
        }
        _ => (1, values.len()),
    };
    let take = k.min(per);
    let mut data = Vec::with_capacity(batch * take * 24);
    let mut order: Vec<usize> = Vec::with_capacity(per);
    for row in values.chunks(per.max(1)).take(batch) {
        order.clear();
        order.extend(0..row.len());
        let rank = |a: &usize, b: &usize| rank(&row[*a], &row[*b]).then(a.cmp(b));
        if take < order.len() && take > 0 {
            order.select_nth_unstable_by(take - 1, rank);
            order.truncate(take);
        }
        order.sort_unstable_by(rank);
        for &i in order.iter().take(take) {
            let mut text = row[i].text();
            text.push(':');
            text.push_str(&i.to_string());
            if let Some(label) = labels.and_then(|l| l.get(i)) {
                text.push(':');
                text.push_str(label);
            }
            data.extend_from_slice(&(text.len() as u32).to_le_bytes());
            data.extend_from_slice(text.as_bytes());
        }
    }
    let shape = if batched && !tensor.shape.is_empty() {
        vec![batch as u64, take as u64]
    } else {
        vec![take as u64]
    };
    Ok(Tensor::new(
        tensor.name.clone(),
        Datatype::Bytes,
        shape,
        data,
    ))
}

/// One element's value: ranked as a float, printed as its type prints.
#[derive(Clone, Copy)]
enum Value {
    Int(i128),
    Float(f64),
}

impl Value {
    fn key(&self) -> f64 {
        match *self {
            Value::Int(i) => i as f64,
            Value::Float(f) => f,
        }
    }

    fn text(&self) -> String {
        match *self {
            Value::Int(i) => i.to_string(),
            // As C's `%f` writes them.
            Value::Float(f) if f.is_nan() => "nan".into(),
            Value::Float(f) if f.is_infinite() => if f > 0.0 { "inf" } else { "-inf" }.into(),
            Value::Float(f) => format!("{f:.6}"),
        }
    }
}

/// Larger first; NaN after every number.
fn rank(a: &Value, b: &Value) -> Ordering {
    if let (Value::Int(x), Value::Int(y)) = (a, b) {
        return y.cmp(x);
    }
    let (x, y) = (a.key(), b.key());
    match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => y.partial_cmp(&x).unwrap_or(Ordering::Equal),
    }
}

/// The tensor's elements, from its little-endian layout.
fn values(t: &Tensor) -> Result<Vec<Value>> {
    fn each<const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> Value) -> Vec<Value> {
        data.chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunks of N bytes")))
            .collect()
    }
    let d = &t.data;
    Ok(match t.datatype {
        Datatype::Uint8 => each(d, |b: [u8; 1]| Value::Int(b[0].into())),
        Datatype::Uint16 => each(d, |b| Value::Int(u16::from_le_bytes(b).into())),
        Datatype::Uint32 => each(d, |b| Value::Int(u32::from_le_bytes(b).into())),
        Datatype::Uint64 => each(d, |b| Value::Int(u64::from_le_bytes(b).into())),
        Datatype::Int8 => each(d, |b| Value::Int(i8::from_le_bytes(b).into())),
        Datatype::Int16 => each(d, |b| Value::Int(i16::from_le_bytes(b).into())),
        Datatype::Int32 => each(d, |b| Value::Int(i32::from_le_bytes(b).into())),
        Datatype::Int64 => each(d, |b| Value::Int(i64::from_le_bytes(b).into())),
        Datatype::Fp16 => each(d, |b| Value::Float(half::f16::from_le_bytes(b).to_f64())),
        Datatype::Bf16 => each(d, |b| Value::Float(half::bf16::from_le_bytes(b).to_f64())),
        // Printed from the float itself, as C promotes a float to print it.
        Datatype::Fp32 => each(d, |b| Value::Float(f32::from_le_bytes(b).into())),
        Datatype::Fp64 => each(d, |b| Value::Float(f64::from_le_bytes(b))),
        Datatype::Bool | Datatype::Bytes => return Err(unclassifiable(&t.name, t.datatype)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(t: &Tensor) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = &t.data[..];
        while !rest.is_empty() {
            let n = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            out.push(String::from_utf8(rest[4..4 + n].to_vec()).expect("utf-8"));
            rest = &rest[4 + n..];
        }
        out
    }

    fn fp32(shape: &[u64], v: &[f32]) -> Tensor {
        Tensor::new(
            "y",
            Datatype::Fp32,
            shape.to_vec(),
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    #[test]
    fn top_classes_per_batch_entry_as_triton_prints_them() {
        let t = fp32(&[2, 4], &[0.1, 0.7, 0.2, 0.0, 5.0, -1.0, 5.0, 2.5]);
        let c = classify(&t, 2, true, None).expect("classified");
        assert_eq!(c.datatype, Datatype::Bytes);
        assert_eq!(c.shape, vec![2, 2]);
        // Ties keep index order.
        assert_eq!(
            strings(&c),
            ["0.700000:1", "0.200000:2", "5.000000:0", "5.000000:2"]
        );
    }

    #[test]
    fn unbatched_models_rank_the_whole_tensor_and_k_is_capped() {
        let t = fp32(&[2, 2], &[1.0, 4.0, f32::NAN, 3.0]);
        let c = classify(&t, 10, false, None).expect("classified");
        assert_eq!(c.shape, vec![4]);
        assert_eq!(
            strings(&c),
            ["4.000000:1", "3.000000:3", "1.000000:0", "nan:2"]
        );
    }

    #[test]
    fn labels_and_integers() {
        let t = Tensor::new(
            "y",
            Datatype::Int64,
            vec![1, 3],
            [7i64, -2, 9].iter().flat_map(|x| x.to_le_bytes()).collect(),
        );
        let labels: Vec<String> = ["cat", "dog", "mug"].map(String::from).into();
        let c = classify(&t, 2, true, Some(&labels)).expect("classified");
        assert_eq!(c.shape, vec![1, 2]);
        assert_eq!(strings(&c), ["9:2:mug", "7:0:cat"]);
    }

    #[test]
    fn only_numbers_are_classified() {
        let t = Tensor::new("b", Datatype::Bool, vec![2], vec![0, 1]);
        let e = classify(&t, 1, false, None)
            .expect_err("refused")
            .to_string();
        assert!(e.contains("cannot be classified"), "{e}");
        assert!(!classifiable(Datatype::Bytes) && classifiable(Datatype::Fp16));
    }

    #[test]
    fn an_empty_batch_has_no_classes() {
        let t = fp32(&[0, 4], &[]);
        let c = classify(&t, 3, true, None).expect("classified");
        assert_eq!(c.shape, vec![0, 0]);
        assert!(c.data.is_empty());
    }
}
