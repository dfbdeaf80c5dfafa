//! Tensor `data` as JSON, both ways.
//!
//! In: [`decode_data`] streams a JSON value (flat or nested arrays, or a bare scalar) straight
//! into the raw byte layout, checking each element against the datatype, with no intermediate
//! `serde_json::Value` tree. Out: [`JsonData`] serialises a tensor's raw bytes as one flat JSON
//! array, after [`check_representable`] has refused what JSON cannot carry.

use super::tensor::{BytesElements, push_bytes_element};
use super::{Result, Role, Tensor, V2Error};
use half::{bf16, f16};
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::ser::{self, SerializeSeq, Serializer};
use serde::{Serialize, ser::Error as _};
use sophon_sdk::Datatype;
use std::fmt;

/// Decodes the JSON text `raw` of a tensor's `data` into the raw layout, requiring exactly
/// `shape`'s element count. Allocation is bounded by the length of `raw`, never by the shape.
pub(crate) fn decode_data(
    raw: &str,
    datatype: Datatype,
    shape: &[u64],
    role: Role,
    name: &str,
) -> Result<Vec<u8>> {
    let expected = super::element_count(shape).ok_or_else(|| {
        V2Error::tensor(
            role,
            name,
            format!("shape {shape:?} has more elements than fit in 64 bits"),
        )
    })?;
    // Each JSON element takes at least two characters ("0,"), so this bounds the real count.
    let plausible = (raw.len() as u64 / 2 + 1).min(expected);
    let capacity = match datatype.element_size() {
        Some(size) => usize::try_from(plausible)
            .unwrap_or(usize::MAX)
            .saturating_mul(size),
        None => raw.len(),
    };
    let mut sink = Sink {
        datatype,
        out: Vec::with_capacity(capacity),
        count: 0,
        expected,
        failure: None,
    };
    // Numbers and booleans in nested arrays, the common case, by hand; anything else (strings,
    // null, malformed text) through serde_json from the start, which words the errors.
    let fast =
        fast_path() && datatype != Datatype::Bytes && Scan::new(raw).all(&mut sink).is_some();
    let parsed = if fast {
        Ok(())
    } else {
        sink.out.clear();
        sink.count = 0;
        sink.failure = None;
        let mut de = serde_json::Deserializer::from_str(raw);
        Elements { sink: &mut sink }
            .deserialize(&mut de)
            .and_then(|()| de.end())
    };
    if let Some(reason) = sink.failure {
        return Err(V2Error::tensor(role, name, reason));
    }
    parsed.map_err(|e| V2Error::tensor(role, name, format!("cannot read data: {e}")))?;
    if sink.count != expected {
        return Err(V2Error::tensor(
            role,
            name,
            format!(
                "shape {shape:?} needs {expected} elements but data has {}",
                sink.count
            ),
        ));
    }
    Ok(sink.out)
}

/// One JSON scalar as the parser saw it.
#[derive(Clone, Copy)]
enum Scalar<'a> {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(&'a str),
}

impl fmt::Display for Scalar<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Null => f.write_str("null"),
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::U64(v) => write!(f, "{v}"),
            Scalar::I64(v) => write!(f, "{v}"),
            Scalar::F64(v) => write!(f, "{v:?}"),
            Scalar::Str(_) => f.write_str("a string"),
        }
    }
}

struct Sink {
    datatype: Datatype,
    out: Vec<u8>,
    count: u64,
    expected: u64,
    failure: Option<String>,
}

impl Sink {
    /// Appends one element, or records why it is wrong and returns a placeholder parser error.
    fn push<E: de::Error>(&mut self, value: Scalar<'_>) -> Result<(), E> {
        if self.accept(value) {
            Ok(())
        } else {
            Err(E::custom("invalid tensor element"))
        }
    }

    /// Appends one element; `false` (with the reason recorded) when it is wrong.
    fn accept(&mut self, value: Scalar<'_>) -> bool {
        let index = self.count;
        self.count += 1;
        // Past the expected count the elements are only counted, for the error message.
        if index >= self.expected {
            return true;
        }
        match push_scalar(self.datatype, value, &mut self.out) {
            Ok(()) => true,
            Err(reason) => {
                self.failure = Some(format!("element {index}: {reason}"));
                false
            }
        }
    }

    fn fail<E: de::Error>(&mut self, reason: String) -> E {
        self.failure = Some(reason);
        E::custom("invalid tensor element")
    }
}

/// Whether [`decode_data`] tries [`Scan`] first: always, but for tests that check the two
/// paths agree.
fn fast_path() -> bool {
    #[cfg(test)]
    return tests::FAST_PATH.with(std::cell::Cell::get);
    #[cfg(not(test))]
    true
}

/// serde_json's nesting limit, which the fast path leaves to serde_json to report.
const MAX_DEPTH: usize = 128;

/// The fast path: nested arrays of JSON numbers and booleans, scanned by hand, each number
/// parsed by `fast-float2` (correctly rounded, as serde_json with `float_roundtrip` is) or as an
/// integer exactly as serde_json classifies it. serde_json spends most of a large JSON request
/// here. `None` means "not this path's case": anything but numbers, booleans, arrays and
/// whitespace, text that is not valid JSON, or a number serde_json would refuse.
struct Scan<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn new(raw: &'a str) -> Scan<'a> {
        Scan {
            text: raw.as_bytes(),
            at: 0,
        }
    }

    /// The whole text as one value; `Some(())` also when the sink refused an element (its
    /// `failure` says why, as serde_json's path would have).
    fn all(mut self, sink: &mut Sink) -> Option<()> {
        if self.value(sink, 0)? {
            self.blank();
            (self.at == self.text.len()).then_some(())
        } else {
            Some(())
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn blank(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        self.at - start
    }

    /// One value; `Some(false)` when the sink refused an element.
    fn value(&mut self, sink: &mut Sink, depth: usize) -> Option<bool> {
        self.blank();
        match self.peek()? {
            b'[' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.at += 1;
                self.blank();
                if self.peek() == Some(b']') {
                    self.at += 1;
                    return Some(true);
                }
                loop {
                    if !self.value(sink, depth + 1)? {
                        return Some(false);
                    }
                    self.blank();
                    match self.peek()? {
                        b',' => self.at += 1,
                        b']' => {
                            self.at += 1;
                            return Some(true);
                        }
                        _ => return None,
                    }
                }
            }
            b't' if self.text[self.at..].starts_with(b"true") => {
                self.at += 4;
                Some(sink.accept(Scalar::Bool(true)))
            }
            b'f' if self.text[self.at..].starts_with(b"false") => {
                self.at += 5;
                Some(sink.accept(Scalar::Bool(false)))
            }
            b'-' | b'0'..=b'9' => {
                let number = self.number()?;
                Some(sink.accept(number))
            }
            _ => None,
        }
    }

    /// A JSON number, as serde_json reports it: `U64` for a non-negative integer that fits,
    /// `I64` for a negative one (`-0` and anything below `i64::MIN` are `F64`), `F64` for the
    /// rest; `None` for what serde_json refuses (bad grammar, out of the f64 range).
    fn number(&mut self) -> Option<Scalar<'static>> {
        let start = self.at;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.at += 1;
        }
        let int_start = self.at;
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        let int_end = self.at;
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return None;
            }
            float = true;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if self.digits() == 0 {
                return None;
            }
            float = true;
        }
        let text = &self.text[start..self.at];
        if !float && let Some(magnitude) = parse_u64(&self.text[int_start..int_end]) {
            return Some(if !negative {
                Scalar::U64(magnitude)
            } else {
                let value = (magnitude as i64).wrapping_neg();
                if value >= 0 {
                    Scalar::F64(-(magnitude as f64))
                } else {
                    Scalar::I64(value)
                }
            });
        }
        let value: f64 = fast_float2::parse(text).ok()?;
        value.is_finite().then_some(Scalar::F64(value))
    }
}

/// Decimal digits as a `u64`, `None` on overflow.
fn parse_u64(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Parses nested arrays of scalars into a [`Sink`], row-major.
struct Elements<'s> {
    sink: &'s mut Sink,
}

impl<'de> DeserializeSeed<'de> for Elements<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Elements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of tensor elements")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.sink.push(Scalar::Bool(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.sink.push(Scalar::U64(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.sink.push(Scalar::I64(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.sink.push(Scalar::F64(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.sink.push(Scalar::Str(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.sink.push(Scalar::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Elements {
                sink: &mut *self.sink,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: de::MapAccess<'de>>(self, _map: A) -> Result<(), A::Error> {
        let index = self.sink.count;
        Err(self.sink.fail(format!(
            "element {index}: a JSON object is not a tensor element"
        )))
    }
}

/// Integer types that JSON numbers convert into, checked.
trait Integer: Sized + TryFrom<u64> + TryFrom<i64> {
    fn extend_le(self, out: &mut Vec<u8>);
}

macro_rules! integer {
    ($($t:ty),*) => {$(
        impl Integer for $t {
            fn extend_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
integer!(u8, u16, u32, u64, i8, i16, i32, i64);

const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;

fn push_integer<T: Integer>(
    datatype: Datatype,
    value: Scalar<'_>,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let converted = match value {
        Scalar::U64(v) => T::try_from(v).ok(),
        Scalar::I64(v) => T::try_from(v).ok(),
        Scalar::F64(v) if v.fract() != 0.0 || !v.is_finite() => {
            return Err(format!("{v} is not an integer, which {datatype} needs"));
        }
        // Integral floats: exact conversion when inside the 64-bit range, then the narrower check.
        Scalar::F64(v) if (0.0..2.0 * TWO_POW_63).contains(&v) => T::try_from(v as u64).ok(),
        Scalar::F64(v) if (-TWO_POW_63..0.0).contains(&v) => T::try_from(v as i64).ok(),
        Scalar::F64(_) => None,
        other => return Err(format!("{other} is not a number, which {datatype} needs")),
    };
    converted
        .map(|v| v.extend_le(out))
        .ok_or_else(|| format!("{value} is out of range for {datatype}"))
}

fn number(datatype: Datatype, value: Scalar<'_>) -> Result<f64, String> {
    match value {
        Scalar::U64(v) => Ok(v as f64),
        Scalar::I64(v) => Ok(v as f64),
        Scalar::F64(v) => Ok(v),
        other => Err(format!("{other} is not a number, which {datatype} needs")),
    }
}

fn push_scalar(datatype: Datatype, value: Scalar<'_>, out: &mut Vec<u8>) -> Result<(), String> {
    let overflow = |v: f64| format!("{v:?} is out of range for {datatype}");
    match datatype {
        Datatype::Bool => {
            let b = match value {
                Scalar::Bool(b) => b,
                Scalar::U64(0) | Scalar::I64(0) => false,
                Scalar::U64(1) | Scalar::I64(1) => true,
                other => return Err(format!("{other} is not a BOOL: use true, false, 0 or 1")),
            };
            out.push(u8::from(b));
        }
        Datatype::Uint8 => push_integer::<u8>(datatype, value, out)?,
        Datatype::Uint16 => push_integer::<u16>(datatype, value, out)?,
        Datatype::Uint32 => push_integer::<u32>(datatype, value, out)?,
        Datatype::Uint64 => push_integer::<u64>(datatype, value, out)?,
        Datatype::Int8 => push_integer::<i8>(datatype, value, out)?,
        Datatype::Int16 => push_integer::<i16>(datatype, value, out)?,
        Datatype::Int32 => push_integer::<i32>(datatype, value, out)?,
        Datatype::Int64 => push_integer::<i64>(datatype, value, out)?,
        Datatype::Fp64 => out.extend_from_slice(&number(datatype, value)?.to_le_bytes()),
        Datatype::Fp32 => {
            let v = number(datatype, value)?;
            let narrow = v as f32;
            if !narrow.is_finite() {
                return Err(overflow(v));
            }
            out.extend_from_slice(&narrow.to_le_bytes());
        }
        Datatype::Fp16 => {
            let v = number(datatype, value)?;
            let narrow = f16::from_f64(v);
            if !narrow.is_finite() {
                return Err(overflow(v));
            }
            out.extend_from_slice(&narrow.to_le_bytes());
        }
        Datatype::Bf16 => {
            let v = number(datatype, value)?;
            let narrow = bf16::from_f64(v);
            if !narrow.is_finite() {
                return Err(overflow(v));
            }
            out.extend_from_slice(&narrow.to_le_bytes());
        }
        Datatype::Bytes => match value {
            Scalar::Str(s) => push_bytes_element(out, s.as_bytes())?,
            other => return Err(format!("{other} is not a string, which BYTES needs")),
        },
    }
    Ok(())
}

/// Refuses an output whose data JSON cannot carry: a NaN or infinite float, or a `BYTES`
/// element that is not UTF-8. Assumes [`Tensor::check_data`] has passed.
pub(crate) fn check_representable(tensor: &Tensor) -> Result<()> {
    let refuse = |reason: String| V2Error::NotJsonRepresentable {
        name: tensor.name.clone(),
        reason,
    };
    let non_finite = |index: usize, v: f64| {
        refuse(format!(
            "element {index} is {v}, which JSON has no number for"
        ))
    };
    let data = &tensor.data;
    match tensor.datatype {
        Datatype::Fp16 => first_non_finite(le::<2>(data).map(|b| f16::from_le_bytes(b).to_f64())),
        Datatype::Bf16 => first_non_finite(le::<2>(data).map(|b| bf16::from_le_bytes(b).to_f64())),
        Datatype::Fp32 => first_non_finite(le::<4>(data).map(|b| f64::from(f32::from_le_bytes(b)))),
        Datatype::Fp64 => first_non_finite(le::<8>(data).map(f64::from_le_bytes)),
        Datatype::Bytes => {
            for (index, element) in BytesElements::new(data).enumerate() {
                let element = element.map_err(|reason| V2Error::Inconsistent {
                    role: Role::Output,
                    name: tensor.name.clone(),
                    reason,
                })?;
                if std::str::from_utf8(element).is_err() {
                    return Err(refuse(format!("BYTES element {index} is not valid UTF-8")));
                }
            }
            None
        }
        _ => None,
    }
    .map_or(Ok(()), |(index, v)| Err(non_finite(index, v)))
}

fn first_non_finite(values: impl Iterator<Item = f64>) -> Option<(usize, f64)> {
    values.enumerate().find(|(_, v)| !v.is_finite())
}

/// The little-endian `N`-byte chunks of `data` (a ragged tail is ignored; callers check lengths).
fn le<const N: usize>(data: &[u8]) -> impl ExactSizeIterator<Item = [u8; N]> + '_ {
    data.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    })
}

/// A tensor's data as one flat JSON array. Serialising fails (rather than writing `null`) on
/// data that [`check_representable`] would refuse.
pub(crate) struct JsonData<'a>(pub &'a Tensor);

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let data = &self.0.data;
        match self.0.datatype {
            Datatype::Bool => seq(s, data.iter().map(|&b| b != 0)),
            Datatype::Uint8 => seq(s, data.iter().copied()),
            Datatype::Uint16 => seq(s, le::<2>(data).map(u16::from_le_bytes)),
            Datatype::Uint32 => seq(s, le::<4>(data).map(u32::from_le_bytes)),
            Datatype::Uint64 => seq(s, le::<8>(data).map(u64::from_le_bytes)),
            Datatype::Int8 => seq(s, data.iter().map(|&b| i8::from_le_bytes([b]))),
            Datatype::Int16 => seq(s, le::<2>(data).map(i16::from_le_bytes)),
            Datatype::Int32 => seq(s, le::<4>(data).map(i32::from_le_bytes)),
            Datatype::Int64 => seq(s, le::<8>(data).map(i64::from_le_bytes)),
            Datatype::Fp16 => floats(s, le::<2>(data).map(|b| f16::from_le_bytes(b).to_f32())),
            Datatype::Bf16 => floats(s, le::<2>(data).map(|b| bf16::from_le_bytes(b).to_f32())),
            Datatype::Fp32 => floats(s, le::<4>(data).map(f32::from_le_bytes)),
            Datatype::Fp64 => {
                let mut out = s.serialize_seq(Some(data.len() / 8))?;
                for v in le::<8>(data).map(f64::from_le_bytes) {
                    if !v.is_finite() {
                        return Err(S::Error::custom(format!("{v} has no JSON number")));
                    }
                    out.serialize_element(&v)?;
                }
                out.end()
            }
            Datatype::Bytes => {
                let mut out = s.serialize_seq(None)?;
                for element in BytesElements::new(data) {
                    let element = element.map_err(S::Error::custom)?;
                    out.serialize_element(std::str::from_utf8(element).map_err(S::Error::custom)?)?;
                }
                out.end()
            }
        }
    }
}

fn seq<S: Serializer, T: Serialize>(
    s: S,
    values: impl ExactSizeIterator<Item = T>,
) -> Result<S::Ok, S::Error> {
    let mut out = s.serialize_seq(Some(values.len()))?;
    for v in values {
        out.serialize_element(&v)?;
    }
    out.end()
}

fn floats<S: Serializer>(
    s: S,
    values: impl ExactSizeIterator<Item = f32>,
) -> Result<S::Ok, S::Error> {
    let mut out = s.serialize_seq(Some(values.len()))?;
    for v in values {
        if !v.is_finite() {
            return Err(<S::Error as ser::Error>::custom(format!(
                "{v} has no JSON number"
            )));
        }
        out.serialize_element(&v)?;
    }
    out.end()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    thread_local! {
        pub(super) static FAST_PATH: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
    }

    /// `decode_data` through serde_json alone.
    fn by_serde(raw: &str, datatype: Datatype, shape: &[u64]) -> Result<Vec<u8>> {
        FAST_PATH.with(|f| f.set(false));
        let got = decode(raw, datatype, shape);
        FAST_PATH.with(|f| f.set(true));
        got
    }

    fn agree(raw: &str, datatype: Datatype, shape: &[u64]) {
        let fast = decode(raw, datatype, shape).map_err(|e| e.to_string());
        let slow = by_serde(raw, datatype, shape).map_err(|e| e.to_string());
        assert_eq!(fast, slow, "{raw} as {datatype:?} {shape:?}");
    }

    #[test]
    fn the_fast_path_reads_numbers_exactly_as_serde_json() {
        let cases = [
            "-0",
            "0",
            "-0.0",
            "1",
            "-1",
            "01",
            "1.",
            ".5",
            "+1",
            "1e",
            "1e+",
            "1E-2",
            "1e400",
            "-1e400",
            "1e-400",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "-18446744073709551616",
            "123456789012345678901234567890",
            "0.1",
            "0.30000000000000004",
            "2.5e-308",
            "4.9e-324",
            "1.7976931348623157e308",
            "255",
            "256",
            "-128",
            "-129",
            "65504",
            "65520",
            "3.4028235e38",
            "3.5e38",
            "true",
            "false",
            "null",
            "\"1\"",
            "tru",
            "1x",
            "[1,]",
            "[1 2]",
            "[,1]",
            "[]",
            "[[]]",
            " [ 1 , [ 2 ] ] ",
            "[1]]",
            "[[1]",
            "[1]\n",
            "[1] 2",
            "{}",
            "[true, 0, 1]",
            "[0.5, 1.5]",
            "\t[\r1\n]",
        ];
        for raw in cases {
            for datatype in Datatype::ALL {
                for shape in [&[][..], &[1], &[2], &[3]] {
                    agree(raw, datatype, shape);
                }
            }
        }
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        agree(&deep, Datatype::Fp32, &[]);
        let edge = format!("{}1{}", "[".repeat(127), "]".repeat(127));
        agree(&edge, Datatype::Fp32, &[]);
    }

    fn number_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<f64>().prop_map(|v| format!("{v:?}")),
            any::<f32>().prop_map(|v| format!("{v}")),
            any::<i64>().prop_map(|v| v.to_string()),
            any::<u64>().prop_map(|v| v.to_string()),
            (-400i32..400, 0u64..1_000_000, any::<bool>())
                .prop_map(|(e, m, upper)| format!("{m}{}{e}", if upper { "E" } else { "e" })),
            (0u64..100_000, 0u64..100_000).prop_map(|(a, b)| format!("-{a}.{b:05}")),
            Just("true".to_string()),
            Just("false".to_string()),
        ]
    }

    proptest! {
        #[test]
        fn the_fast_path_agrees_with_serde_json(
            numbers in prop::collection::vec(number_text(), 0..12),
            rows in 1usize..4,
            pick in 0usize..Datatype::ALL.len(),
            spaces in any::<bool>(),
        ) {
            let sep = if spaces { " , " } else { "," };
            let per = numbers.len().div_ceil(rows).max(1);
            let nested: Vec<String> = numbers
                .chunks(per)
                .map(|c| format!("[{}]", c.join(sep)))
                .collect();
            let flat = format!("[{}]", numbers.join(sep));
            let nested = format!("[{}]", nested.join(sep));
            let datatype = Datatype::ALL[pick];
            let count = numbers.len() as u64;
            for raw in [&flat, &nested] {
                for shape in [vec![count], vec![count + 1]] {
                    let fast = decode(raw, datatype, &shape).map_err(|e| e.to_string());
                    let slow = by_serde(raw, datatype, &shape).map_err(|e| e.to_string());
                    prop_assert_eq!(fast, slow, "{} as {:?}", raw, datatype);
                }
            }
        }
    }

    fn decode(raw: &str, datatype: Datatype, shape: &[u64]) -> Result<Vec<u8>> {
        decode_data(raw, datatype, shape, Role::Input, "x")
    }

    fn reason(raw: &str, datatype: Datatype, shape: &[u64]) -> String {
        decode(raw, datatype, shape)
            .expect_err("should be refused")
            .to_string()
    }

    #[test]
    fn fp32_flat_nested_and_scalar() {
        let flat = decode("[1, 2.5, -3, 4e2]", Datatype::Fp32, &[2, 2]).expect("flat");
        let nested = decode("[[1, 2.5], [-3, 4e2]]", Datatype::Fp32, &[2, 2]).expect("nested");
        assert_eq!(flat, nested);
        let t = Tensor::new("x", Datatype::Fp32, vec![4], flat);
        assert_eq!(t.to_f32(), Some(vec![1.0, 2.5, -3.0, 400.0]));
        assert_eq!(
            decode("7", Datatype::Fp32, &[]).expect("scalar"),
            7f32.to_le_bytes()
        );
        assert_eq!(
            decode("[[[7]]]", Datatype::Fp32, &[]).expect("deep scalar"),
            7f32.to_le_bytes()
        );
        assert_eq!(
            decode("[]", Datatype::Fp32, &[0, 3]).expect("empty"),
            Vec::<u8>::new()
        );
    }

    #[test]
    fn integer_range_and_integrality() {
        assert_eq!(
            decode("[0, 255]", Datatype::Uint8, &[2]).expect("in range"),
            vec![0, 255]
        );
        assert_eq!(
            reason("[0, 300]", Datatype::Uint8, &[2]),
            "input 'x': element 1: 300 is out of range for UINT8"
        );
        assert_eq!(
            reason("[-1]", Datatype::Uint32, &[1]),
            "input 'x': element 0: -1 is out of range for UINT32"
        );
        assert_eq!(
            reason("[1.5]", Datatype::Int32, &[1]),
            "input 'x': element 0: 1.5 is not an integer, which INT32 needs"
        );
        assert_eq!(
            decode("[2.0, -3.0]", Datatype::Int16, &[2]).expect("integral floats"),
            [2, 0, 0xfd, 0xff]
        );
        assert_eq!(
            decode("[18446744073709551615]", Datatype::Uint64, &[1]).expect("u64 max"),
            u64::MAX.to_le_bytes()
        );
        assert_eq!(
            decode("[-9223372036854775808]", Datatype::Int64, &[1]).expect("i64 min"),
            i64::MIN.to_le_bytes()
        );
        assert!(decode("[9223372036854775808]", Datatype::Int64, &[1]).is_err());
        assert!(decode("[1e30]", Datatype::Uint64, &[1]).is_err());
        assert!(decode("[128]", Datatype::Int8, &[1]).is_err());
        assert_eq!(
            reason("[\"7\"]", Datatype::Int64, &[1]),
            "input 'x': element 0: a string is not a number, which INT64 needs"
        );
        assert!(decode("[true]", Datatype::Int64, &[1]).is_err());
    }

    #[test]
    fn bools() {
        assert_eq!(
            decode("[true, false, 1, 0]", Datatype::Bool, &[4]).expect("bools"),
            vec![1, 0, 1, 0]
        );
        assert_eq!(
            reason("[2]", Datatype::Bool, &[1]),
            "input 'x': element 0: 2 is not a BOOL: use true, false, 0 or 1"
        );
        assert!(decode("[\"true\"]", Datatype::Bool, &[1]).is_err());
    }

    #[test]
    fn floats_overflowing_their_type() {
        assert_eq!(
            reason("[1e40]", Datatype::Fp32, &[1]),
            "input 'x': element 0: 1e40 is out of range for FP32"
        );
        assert!(decode("[70000]", Datatype::Fp16, &[1]).is_err());
        assert!(decode("[1e39]", Datatype::Bf16, &[1]).is_err());
        assert_eq!(
            decode("[1.5]", Datatype::Fp16, &[1]).expect("fp16"),
            f16::from_f32(1.5).to_le_bytes()
        );
        assert_eq!(
            decode("[1.5]", Datatype::Bf16, &[1]).expect("bf16"),
            bf16::from_f32(1.5).to_le_bytes()
        );
        assert_eq!(
            decode("[1e300]", Datatype::Fp64, &[1]).expect("fp64"),
            1e300f64.to_le_bytes()
        );
        assert!(decode("[null]", Datatype::Fp64, &[1]).is_err());
    }

    #[test]
    fn bytes_from_strings() {
        let data = decode(r#"["ab", "", "é\n"]"#, Datatype::Bytes, &[3]).expect("strings");
        let t = Tensor::new("x", Datatype::Bytes, vec![3], data);
        assert_eq!(
            t.bytes_elements().expect("framed"),
            vec!["ab".as_bytes(), b"", "é\n".as_bytes()]
        );
        assert_eq!(
            reason("[1]", Datatype::Bytes, &[1]),
            "input 'x': element 0: 1 is not a string, which BYTES needs"
        );
    }

    #[test]
    fn element_count_must_match_shape() {
        assert_eq!(
            reason("[1, 2, 3]", Datatype::Fp32, &[2, 2]),
            "input 'x': shape [2, 2] needs 4 elements but data has 3"
        );
        assert_eq!(
            reason("[1, 2, 3, 4, 5, 6]", Datatype::Fp32, &[2, 2]),
            "input 'x': shape [2, 2] needs 4 elements but data has 6"
        );
        // A huge declared shape with tiny data fails without a huge allocation.
        assert_eq!(
            reason("[1]", Datatype::Fp64, &[1_000_000, 1_000_000]),
            "input 'x': shape [1000000, 1000000] needs 1000000000000 elements but data has 1"
        );
        assert!(
            reason("[1]", Datatype::Fp64, &[u64::MAX, 2])
                .contains("more elements than fit in 64 bits")
        );
    }

    #[test]
    fn objects_and_deep_nesting_are_refused() {
        assert_eq!(
            reason(r#"[1, {"a": 1}]"#, Datatype::Fp32, &[2]),
            "input 'x': element 1: a JSON object is not a tensor element"
        );
        let deep = format!("{}1{}", "[".repeat(1000), "]".repeat(1000));
        assert!(reason(&deep, Datatype::Fp32, &[1]).contains("cannot read data"));
    }

    #[test]
    fn json_output_and_what_it_refuses() {
        let t = Tensor::new("y", Datatype::Bool, vec![3], vec![1, 0, 1]);
        assert_eq!(
            serde_json::to_string(&JsonData(&t)).expect("bools"),
            "[true,false,true]"
        );
        let t = Tensor::from_f32("y", vec![2], &[1.5, f32::NAN]);
        let err = check_representable(&t).expect_err("NaN");
        assert_eq!(
            err.to_string(),
            "output 'y' cannot be sent as JSON: element 1 is NaN, which JSON has no number for; \
             request it as binary tensor data (\"parameters\": {\"binary_data\": true} on the output)"
        );
        assert!(serde_json::to_string(&JsonData(&t)).is_err());
        let t = Tensor::new(
            "y",
            Datatype::Fp64,
            vec![1],
            f64::NEG_INFINITY.to_le_bytes().to_vec(),
        );
        assert!(check_representable(&t).is_err());
        let t =
            Tensor::from_bytes_elements("y", vec![2], &[&b"ok"[..], &[0xff, 0xfe]]).expect("small");
        let err = check_representable(&t).expect_err("not utf-8");
        assert!(
            err.to_string()
                .contains("BYTES element 1 is not valid UTF-8"),
            "{err}"
        );
        assert!(serde_json::to_string(&JsonData(&t)).is_err());
    }
}
