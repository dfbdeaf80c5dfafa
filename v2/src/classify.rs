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

/// The class count a request gives output `name`, read by the protocol's decoder: a whole
/// number above zero that fits 32 bits, else an error that says so.
pub fn count(k: Option<u64>, name: &str) -> Result<u32> {
    k.filter(|k| *k > 0)
        .and_then(|k| u32::try_from(k).ok())
        .ok_or_else(|| {
            V2Error::tensor(
                crate::Role::Output,
                name,
                "parameters.classification must be a count of classes above zero",
            )
        })
}

/// The error for asking to classify output `name` of a type that holds no numbers.
pub fn unclassifiable(name: &str, datatype: Datatype) -> V2Error {
    V2Error::tensor(
        crate::Role::Output,
        name,
        format!("a {datatype} output cannot be classified: classification needs numbers"),
    )
}

/// The most classes one request may ask of an output (per row): enough for any label set, and a
/// bound on the answer a request can make the node write.
pub const MAX_CLASSES: u32 = 65_536;

/// `tensor`'s top `k` classes (see the module's docs), a `BYTES` tensor of the same name.
/// `batched`: the model's first dimension is its batch; `labels`: the class names, by index.
/// Memory beyond the answer is O(k): each row is scanned once, keeping the best k so far.
pub fn classify(
    tensor: &Tensor,
    k: usize,
    batched: bool,
    labels: Option<&[String]>,
) -> Result<Tensor> {
    let read = reader(tensor)?;
    let size = tensor.datatype.element_size().unwrap_or(1);
    let count = tensor.data.len() / size;
    let (batch, per) = match tensor.shape.first() {
        Some(&b) if batched => {
            let b = usize::try_from(b).unwrap_or(usize::MAX);
            (b, count.checked_div(b).unwrap_or(0))
        }
        _ => (1, count),
    };
    let take = k.min(per).min(MAX_CLASSES as usize);
    let mut data = Vec::with_capacity(batch.min(count.max(1)) * take * 16);
    let mut best: std::collections::BinaryHeap<Entry> = std::collections::BinaryHeap::new();
    for row in tensor.data.chunks(per.max(1) * size).take(batch) {
        best.clear();
        if take > 0 {
            for (i, bytes) in row.chunks_exact(size).enumerate() {
                let entry = Entry(read(bytes), i);
                if best.len() < take {
                    best.push(entry);
                } else if best.peek().is_some_and(|worst| entry < *worst) {
                    best.pop();
                    best.push(entry);
                }
            }
        }
        for Entry(value, i) in std::mem::take(&mut best).into_sorted_vec() {
            let mut text = value.text();
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

/// A class in the running: its value and index. Orders best first (larger value, then lower
/// index), so that the heap's top is the worst of those kept.
struct Entry(Value, usize);

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        rank(&self.0, &other.0).then(self.1.cmp(&other.1))
    }
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

/// How to read one element of the tensor's datatype from its little-endian bytes.
fn reader(t: &Tensor) -> Result<fn(&[u8]) -> Value> {
    fn le<const N: usize>(b: &[u8]) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&b[..N]);
        a
    }
    Ok(match t.datatype {
        Datatype::Uint8 => |b| Value::Int(b[0].into()),
        Datatype::Uint16 => |b| Value::Int(u16::from_le_bytes(le(b)).into()),
        Datatype::Uint32 => |b| Value::Int(u32::from_le_bytes(le(b)).into()),
        Datatype::Uint64 => |b| Value::Int(u64::from_le_bytes(le(b)).into()),
        Datatype::Int8 => |b| Value::Int(i8::from_le_bytes(le(b)).into()),
        Datatype::Int16 => |b| Value::Int(i16::from_le_bytes(le(b)).into()),
        Datatype::Int32 => |b| Value::Int(i32::from_le_bytes(le(b)).into()),
        Datatype::Int64 => |b| Value::Int(i64::from_le_bytes(le(b)).into()),
        Datatype::Fp16 => |b| Value::Float(half::f16::from_le_bytes(le(b)).to_f64()),
        Datatype::Bf16 => |b| Value::Float(half::bf16::from_le_bytes(le(b)).to_f64()),
        // Printed from the float itself, as C promotes a float to print it.
        Datatype::Fp32 => |b| Value::Float(f32::from_le_bytes(le(b)).into()),
        Datatype::Fp64 => |b| Value::Float(f64::from_le_bytes(le(b))),
        Datatype::Bool | Datatype::Bytes => return Err(unclassifiable(&t.name, t.datatype)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(t: &Tensor) -> Vec<String> {
        t.bytes_elements()
            .expect("BYTES framing")
            .into_iter()
            .map(|e| String::from_utf8(e.to_vec()).expect("utf-8"))
            .collect()
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
    fn a_count_past_the_cap_gives_the_cap() {
        let values: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
        let t = fp32(&[100_000], &values);
        let c = classify(&t, usize::MAX, false, None).expect("classified");
        assert_eq!(c.shape, vec![u64::from(MAX_CLASSES)]);
        let got = strings(&c);
        assert_eq!(got[0], "99999.000000:99999");
        assert_eq!(got.last().expect("some"), "34464.000000:34464");
    }

    #[test]
    fn an_empty_batch_has_no_classes() {
        let t = fp32(&[0, 4], &[]);
        let c = classify(&t, 3, true, None).expect("classified");
        assert_eq!(c.shape, vec![0, 0]);
        assert!(c.data.is_empty());
    }
}
