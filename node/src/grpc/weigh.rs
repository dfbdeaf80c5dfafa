//! What a `ModelInferRequest` takes in memory once prost has decoded it, weighed from its wire
//! bytes before it is decoded.
//!
//! A message's size on the wire says little about what decoding it allocates. An empty
//! `InferInputTensor` is two bytes on the wire (a tag and a zero length) and a struct of a few
//! hundred bytes in memory; a packed INT64 element of one byte is eight; an empty BYTES element
//! is two bytes and a `Vec` header. A message of the body limit (64 MiB by default) of empty
//! inputs would have made prost allocate over 10 GB, uncounted, before any handler could look at
//! it. [`weigh`] walks the message's fields with the schema of `grpc_service.proto` (without
//! allocating) and answers an upper bound of what decoding it allocates; the request's body
//! (`inflate`) counts that in the node's bytes in flight, beside the message's own bytes, until
//! tonic has decoded it, and refuses the message when there is no room.

use std::mem::size_of;

use super::pb;
use super::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};

/// Protobuf wire types.
const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const I32: u8 = 5;

/// How deep groups may nest in fields this walk passes over (prost's own recursion limit).
const DEPTH: usize = 100;

/// A map entry of `parameters`: prost's `HashMap<String, InferParameter>` holds the key's header
/// and the value inline, with a control byte, at most 7/8 full, and grows by doubling, the old
/// table alive while the new one fills (three tables' worth at that moment, so four entries'
/// room per entry); the key's and a string value's bytes are counted by the entry's length on
/// the wire.
const ENTRY: usize = 4 * (size_of::<(String, pb::InferParameter)>() + 8);
/// An element of a repeated bytes field: a `Vec<u8>` header (its bytes are counted apart).
const BUFFER: usize = size_of::<Vec<u8>>();

/// Repeated fields grow by doubling as prost pushes each element: up to twice their elements,
/// and while a vector moves to a larger buffer the old one is alive too, three times.
const GROWTH: usize = 3;

/// What the repeated fields and maps of one struct may take beyond their elements: a vector's
/// first buffer holds four elements (eight of one byte) and each buffer costs a malloc header;
/// a map's first table has four buckets. An input has ten such fields (shape, parameters and
/// the eight typed contents), an output one, the request four.
const INPUT_SLACK: usize = 1024;
const OUTPUT_SLACK: usize = 256;
const REQUEST_SLACK: usize = 1024;

/// The bytes decoding a `ModelInferRequest` of these wire bytes allocates
/// at most; `None` if they are not a well-formed message. prost would refuse such a message too,
/// but only once it has decoded what comes before the fault, so it is refused before that.
pub fn weigh(message: &[u8]) -> Option<usize> {
    let mut c = Cursor {
        bytes: message,
        pos: 0,
    };
    request(&mut c, message.len()).map(|weight| weight + REQUEST_SLACK)
}

/// Reads a message.
struct Cursor<'a> {
    bytes: &'a [u8],
    /// Bytes read since the start of the message.
    pos: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        let to = self.pos.checked_add(n)?;
        (to <= self.bytes.len()).then(|| self.pos = to)
    }

    /// The values of a packed varint field of `len` bytes: one per byte that ends a varint.
    fn count_varints(&mut self, len: usize) -> Option<usize> {
        let mut n = 0;
        for _ in 0..len {
            n += usize::from(self.byte()? & 0x80 == 0);
        }
        Some(n)
    }

    /// The next field's number and wire type, and for a length-delimited one its length
    /// (within `end`); `None` at `end` or on a malformed key.
    fn field(&mut self, end: usize) -> Option<(u64, u8, usize)> {
        if self.pos >= end {
            return None;
        }
        let key = self.varint()?;
        let (number, wire) = (key >> 3, (key & 7) as u8);
        // Field number 0 does not exist; prost refuses it.
        if number == 0 {
            return None;
        }
        let len = if wire == LEN {
            let len = usize::try_from(self.varint()?).ok()?;
            (self.pos.checked_add(len)? <= end).then_some(len)?
        } else {
            0
        };
        Some((number, wire, len))
    }

    /// Pass over a field this walk does not weigh, as prost passes over an unknown one: a group
    /// up to its end, however deep (prost keeps nothing of it).
    fn skip_value(&mut self, wire: u8, len: usize) -> Option<()> {
        self.skip_nested(wire, len, 0)
    }

    fn skip_nested(&mut self, wire: u8, len: usize, depth: usize) -> Option<()> {
        match wire {
            VARINT => self.varint().map(drop),
            I64 => self.skip(8),
            LEN => self.skip(len),
            I32 => self.skip(4),
            START_GROUP if depth < DEPTH => loop {
                let key = self.varint()?;
                let wire = (key & 7) as u8;
                if key >> 3 == 0 {
                    return None;
                }
                if wire == END_GROUP {
                    return Some(());
                }
                let len = if wire == LEN {
                    usize::try_from(self.varint()?).ok()?
                } else {
                    0
                };
                self.skip_nested(wire, len, depth + 1)?;
            },
            _ => None,
        }
    }
}

/// Walk the fields of one message up to `end`, weighing each with `each`; the total, or `None`
/// if the message is malformed.
fn fields(
    c: &mut Cursor<'_>,
    end: usize,
    mut each: impl FnMut(&mut Cursor<'_>, u64, u8, usize) -> Option<usize>,
) -> Option<usize> {
    let mut total = 0usize;
    while c.pos < end {
        let (number, wire, len) = c.field(end)?;
        total = total.saturating_add(each(c, number, wire, len)?);
    }
    (c.pos == end).then_some(total)
}

/// A string, bytes or map entry weighs its own bytes as the allocator hands them out (plus
/// `header`), passed over.
fn bytes_of(c: &mut Cursor<'_>, len: usize, header: usize) -> Option<usize> {
    c.skip(len)?;
    Some(allocation(len) + header)
}

/// What an allocation of `len` bytes takes from the allocator: nothing for an empty buffer,
/// else at least a 32-byte chunk, in steps of 16.
fn allocation(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len + 8).next_multiple_of(16).max(32)
    }
}

fn request(c: &mut Cursor<'_>, end: usize) -> Option<usize> {
    fields(c, end, |c, number, wire, len| match (number, wire) {
        // model_name, model_version, id
        (1..=3, LEN) => bytes_of(c, len, 0),
        // parameters
        (4, LEN) => bytes_of(c, len, ENTRY),
        (5, LEN) => {
            let end = c.pos + len;
            Some(GROWTH * size_of::<InferInputTensor>() + INPUT_SLACK + input(c, end)?)
        }
        (6, LEN) => {
            let end = c.pos + len;
            Some(GROWTH * size_of::<InferRequestedOutputTensor>() + OUTPUT_SLACK + output(c, end)?)
        }
        // raw_input_contents
        (7, LEN) => bytes_of(c, len, GROWTH * BUFFER),
        _ => c.skip_value(wire, len).map(|()| 0),
    })
}

fn input(c: &mut Cursor<'_>, end: usize) -> Option<usize> {
    fields(c, end, |c, number, wire, len| match (number, wire) {
        // name, datatype
        (1 | 2, LEN) => bytes_of(c, len, 0),
        // shape, packed or not
        (3, LEN) => Some(GROWTH * size_of::<i64>() * c.count_varints(len)?),
        (3, VARINT) => c.varint().map(|_| GROWTH * size_of::<i64>()),
        (4, LEN) => bytes_of(c, len, ENTRY),
        (5, LEN) => {
            let end = c.pos + len;
            contents(c, end)
        }
        _ => c.skip_value(wire, len).map(|()| 0),
    })
}

fn output(c: &mut Cursor<'_>, end: usize) -> Option<usize> {
    fields(c, end, |c, number, wire, len| match (number, wire) {
        (1, LEN) => bytes_of(c, len, 0),
        (2, LEN) => bytes_of(c, len, ENTRY),
        _ => c.skip_value(wire, len).map(|()| 0),
    })
}

fn contents(c: &mut Cursor<'_>, end: usize) -> Option<usize> {
    fields(c, end, |c, number, wire, len| {
        // The element each repeated scalar field decodes to, and whether it is a varint.
        let (size, varint) = match number {
            1 => (size_of::<bool>(), true),
            2 => (size_of::<i32>(), true),
            3 => (size_of::<i64>(), true),
            4 => (size_of::<u32>(), true),
            5 => (size_of::<u64>(), true),
            6 => (size_of::<f32>(), false),
            7 => (size_of::<f64>(), false),
            // bytes_contents
            8 if wire == LEN => return bytes_of(c, len, GROWTH * BUFFER),
            _ => return c.skip_value(wire, len).map(|()| 0),
        };
        let count = match wire {
            LEN if varint => c.count_varints(len)?,
            LEN => {
                c.skip(len)?;
                len / size
            }
            _ => {
                c.skip_value(wire, len)?;
                1
            }
        };
        Some(GROWTH * size * count)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::InferTensorContents as C;
    use prost::Message as _;

    fn weighed(request: &pb::ModelInferRequest) -> usize {
        weigh(&request.encode_to_vec()).expect("well formed")
    }

    fn input(contents: Option<C>, shape: Vec<i64>) -> InferInputTensor {
        InferInputTensor {
            name: "x".into(),
            datatype: "INT64".into(),
            shape,
            contents,
            ..Default::default()
        }
    }

    #[test]
    fn packed_varints_weigh_what_they_decode_to() {
        let n = 10_000;
        let request = pb::ModelInferRequest {
            inputs: vec![input(
                Some(C {
                    int64_contents: vec![0; n],
                    ..Default::default()
                }),
                vec![n as i64],
            )],
            ..Default::default()
        };
        let wire = request.encoded_len();
        assert!(wire < 2 * n, "one byte per element on the wire: {wire}");
        let w = weighed(&request);
        assert!(w >= 8 * n, "{w} bytes for {n} INT64 elements");
        assert!(w <= GROWTH * 8 * n + 4096, "{w}");
    }

    #[test]
    fn empty_inputs_weigh_their_structs() {
        let n = 1000;
        let request = pb::ModelInferRequest {
            inputs: vec![InferInputTensor::default(); n],
            raw_input_contents: vec![Vec::new(); n],
            ..Default::default()
        };
        assert_eq!(request.encoded_len(), 4 * n);
        let w = weighed(&request);
        assert!(
            w >= n * (size_of::<InferInputTensor>() + size_of::<Vec<u8>>()),
            "{w} bytes for {n} empty inputs and buffers"
        );
    }

    #[test]
    fn raw_contents_weigh_about_their_bytes() {
        let request = pb::ModelInferRequest {
            model_name: "mlp".into(),
            inputs: vec![input(None, vec![1, 784])],
            raw_input_contents: vec![vec![7; 3136]],
            ..Default::default()
        };
        let w = weighed(&request);
        // The bytes, and a few KiB for one input's and the request's structs.
        assert!((3136..3136 + 4096).contains(&w), "{w}");
    }

    #[test]
    fn every_field_of_the_schema_is_walked() {
        let p = || {
            HashMap::from([(
                "k".to_string(),
                pb::InferParameter {
                    parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(
                        "v".into(),
                    )),
                },
            )])
        };
        use std::collections::HashMap;
        let request = pb::ModelInferRequest {
            model_name: "m".into(),
            model_version: "1".into(),
            id: "i".into(),
            parameters: p(),
            inputs: vec![InferInputTensor {
                parameters: p(),
                ..input(
                    Some(C {
                        bool_contents: vec![true; 3],
                        int_contents: vec![-1; 3],
                        int64_contents: vec![-1; 3],
                        uint_contents: vec![1; 3],
                        uint64_contents: vec![1; 3],
                        fp32_contents: vec![1.0; 3],
                        fp64_contents: vec![1.0; 3],
                        bytes_contents: vec![b"ab".to_vec(); 3],
                    }),
                    vec![3],
                )
            }],
            outputs: vec![InferRequestedOutputTensor {
                name: "y".into(),
                parameters: p(),
            }],
            raw_input_contents: vec![],
        };
        let w = weighed(&request);
        let elements = 3 * (1 + 4 + 8 + 4 + 8 + 4 + 8) + 3 * (size_of::<Vec<u8>>() + 2);
        assert!(w >= elements + 3 * ENTRY, "{w}");
    }

    #[test]
    fn malformed_messages_are_not_weighed() {
        // Field number 0, a length past the end, a truncated varint, a group never ended, a stray
        // end of group, a wire type that does not exist.
        for bytes in [
            &[0x00, 0x00][..],
            &[0x2a, 0x05, 0x00],
            &[0x08, 0x80],
            &[0x0b],
            &[0x0c],
            &[0x2a, 0x00, 0x07],
        ] {
            assert_eq!(weigh(bytes), None, "{bytes:?}");
        }
        assert_eq!(weigh(&[]), Some(REQUEST_SLACK));
    }

    #[test]
    fn unknown_groups_are_passed_over_as_prost_does() {
        // Empty inputs, then unknown field 100 as a group holding a varint and a nested group.
        let mut bytes = [0x2a, 0x00].repeat(1000);
        bytes.extend_from_slice(&[0xa3, 0x06, 0x08, 0x01, 0x13, 0x14, 0xa4, 0x06]);
        let decoded = pb::ModelInferRequest::decode(&bytes[..]).expect("prost takes it");
        assert_eq!(decoded.inputs.len(), 1000);
        let w = weigh(&bytes).expect("well formed");
        assert!(w >= 1000 * size_of::<InferInputTensor>(), "{w}");
    }
}
