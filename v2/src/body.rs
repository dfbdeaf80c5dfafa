//! What requests and responses share: the split of a body into its JSON header and Triton's
//! binary tensor data, the reading of tensors (JSON `data` or `binary_data_size` bytes) and their
//! writing, and the assembly of an encoded body.
//!
//! Decoding borrows each tensor's JSON `data` as raw text and streams it into bytes once the
//! tensor's datatype and shape are known (see [`super::json`]); binary tensors are sliced out of
//! the body in order, checked against their shape, then copied once into their [`Tensor`].

use super::json::{JsonData, check_representable, decode_data};
use super::tensor::check_data;
use super::{EncodedBody, HEADER_CONTENT_LENGTH, Result, Role, Tensor, V2Error};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sophon_sdk::Datatype;
use std::collections::HashSet;

/// The parameter that marks a tensor as binary tensor data of that many bytes.
const BINARY_DATA_SIZE: &str = "binary_data_size";
/// The protocol's datatypes, for error messages.
const DATATYPES: &str = "BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BF16, BYTES";

#[derive(Deserialize)]
pub(super) struct WireTensor<'a> {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    shape: Option<Vec<Value>>,
    #[serde(default)]
    datatype: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

pub(super) fn split_body(body: &[u8], header_len: Option<usize>) -> Result<(&[u8], &[u8])> {
    match header_len {
        None => Ok((body, &[])),
        Some(n) => body.split_at_checked(n).ok_or_else(|| {
            V2Error::BinaryData(format!(
                "{HEADER_CONTENT_LENGTH} is {n} but the body has only {} bytes: \
                 send the length of the JSON part",
                body.len()
            ))
        }),
    }
}

pub(super) fn parse<'a, T: Deserialize<'a>>(
    json: &'a [u8],
    header_len: Option<usize>,
    what: &str,
) -> Result<T> {
    serde_json::from_slice(json).map_err(|e| {
        let hint = if header_len.is_none() && e.is_syntax() {
            format!("; a body with binary tensor data needs the {HEADER_CONTENT_LENGTH} header")
        } else {
            String::new()
        };
        V2Error::Malformed(format!("the {what} is not valid V2 JSON: {e}{hint}"))
    })
}

/// The binary tensor data after the JSON header, consumed in tensor order.
pub(super) struct BinarySection<'a> {
    source: Source<'a>,
    /// The section's length (an owned buffer is taken whole by a tensor that is all of it).
    len: usize,
    /// How far the tensors have consumed it.
    used: usize,
    has_header: bool,
}

enum Source<'a> {
    Borrowed(&'a [u8]),
    /// A buffer of the caller's: a tensor that is all of it takes it without a copy (an image
    /// request's one input, often hundreds of kilobytes).
    Owned(Vec<u8>),
}

impl<'a> BinarySection<'a> {
    pub(super) fn new(rest: &'a [u8], has_header: bool) -> Self {
        BinarySection {
            len: rest.len(),
            source: Source::Borrowed(rest),
            used: 0,
            has_header,
        }
    }

    pub(super) fn owned(binary: Vec<u8>) -> BinarySection<'static> {
        BinarySection {
            len: binary.len(),
            source: Source::Owned(binary),
            used: 0,
            has_header: true,
        }
    }

    /// The next `size` bytes, once `check` accepts them.
    pub(super) fn take(
        &mut self,
        size: u64,
        role: Role,
        name: &str,
        check: impl FnOnce(&[u8]) -> Result<()>,
    ) -> Result<Vec<u8>> {
        if !self.has_header {
            return Err(V2Error::tensor(
                role,
                name,
                format!(
                    "parameters.{BINARY_DATA_SIZE} is set but the body has no \
                     {HEADER_CONTENT_LENGTH} header: send it with the length of the JSON part"
                ),
            ));
        }
        let left = self.len - self.used;
        let Some(n) = usize::try_from(size).ok().filter(|n| *n <= left) else {
            return Err(V2Error::BinaryData(format!(
                "{role} '{name}' needs {size} bytes but only {left} remain after the first {} bytes \
                 of binary data: check each {BINARY_DATA_SIZE} and {HEADER_CONTENT_LENGTH}",
                self.used
            )));
        };
        let start = self.used;
        check(bytes_at(&self.source, start, n))?;
        self.used += n;
        if let Source::Owned(all) = &mut self.source
            && n > 0
            && n == all.len()
        {
            return Ok(std::mem::take(all));
        }
        Ok(bytes_at(&self.source, start, n).to_vec())
    }

    pub(super) fn finish(self) -> Result<()> {
        let left = self.len - self.used;
        if left == 0 {
            return Ok(());
        }
        Err(V2Error::BinaryData(format!(
            "{left} bytes are left over after the {} bytes the tensors' {BINARY_DATA_SIZE} account for: \
             check each {BINARY_DATA_SIZE} and {HEADER_CONTENT_LENGTH}",
            self.used
        )))
    }
}

/// `n` bytes from `start` (none, once an owned buffer has been taken whole).
fn bytes_at<'s>(source: &'s Source<'_>, start: usize, n: usize) -> &'s [u8] {
    if n == 0 {
        return &[];
    }
    match source {
        Source::Borrowed(all) => &all[start..start + n],
        Source::Owned(all) => &all[start..start + n],
    }
}

pub(super) fn read_tensors(
    wire: Vec<WireTensor<'_>>,
    role: Role,
    section: &mut BinarySection<'_>,
) -> Result<Vec<Tensor>> {
    let mut seen = HashSet::with_capacity(wire.len());
    let mut tensors = Vec::with_capacity(wire.len());
    for (index, w) in wire.into_iter().enumerate() {
        let tensor = read_tensor(w, index, role, section)?;
        if !seen.insert(tensor.name.clone()) {
            return Err(V2Error::Duplicate {
                role,
                name: tensor.name,
            });
        }
        tensors.push(tensor);
    }
    Ok(tensors)
}

fn read_tensor(
    wire: WireTensor<'_>,
    index: usize,
    role: Role,
    section: &mut BinarySection<'_>,
) -> Result<Tensor> {
    let name = wire
        .name
        .ok_or_else(|| V2Error::Malformed(format!("{role} {index} has no `name`")))?;
    let err = |reason: String| V2Error::tensor(role, &name, reason);
    let datatype: Datatype = wire
        .datatype
        .ok_or_else(|| err(format!("no `datatype`: send one of {DATATYPES}")))?
        .parse()
        .map_err(|e: sophon_sdk::types::UnknownDatatype| err(e.to_string()))?;
    let shape = read_shape(
        wire.shape
            .ok_or_else(|| err("no `shape`: send a list of dimensions".into()))?,
    )
    .map_err(&err)?;
    if super::element_count(&shape).is_none() {
        return Err(err(format!(
            "shape {shape:?} has more elements than fit in 64 bits"
        )));
    }
    let parameters = wire.parameters.unwrap_or_default();
    if parameters.contains_key("shared_memory_region") {
        return Err(err(
            "shared memory is not supported: send the data in the body".into(),
        ));
    }
    let binary_size = match parameters.get(BINARY_DATA_SIZE) {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            err(format!(
                "parameters.{BINARY_DATA_SIZE} is {v}: it must be a whole number of bytes"
            ))
        })?),
    };
    let data = match (wire.data, binary_size) {
        (Some(_), Some(_)) => {
            return Err(err(format!(
                "has both `data` and parameters.{BINARY_DATA_SIZE}: send one of them"
            )));
        }
        (None, None) => {
            return Err(err(format!(
                "no data: send `data` or parameters.{BINARY_DATA_SIZE} with binary tensor data"
            )));
        }
        (Some(raw), None) => decode_data(raw.get(), datatype, &shape, role, &name)?,
        (None, Some(size)) => section.take(size, role, &name, |bytes| {
            check_data(datatype, &shape, bytes, role, &name)?;
            if datatype == Datatype::Bool
                && let Some((index, byte)) = bytes.iter().enumerate().find(|(_, b)| **b > 1)
            {
                return Err(err(format!(
                    "BOOL element {index} is the byte {byte}: BOOL bytes must be 0 or 1"
                )));
            }
            Ok(())
        })?,
    };
    Ok(Tensor::new(name, datatype, shape, data))
}

fn read_shape(dims: Vec<Value>) -> Result<Vec<u64>, String> {
    dims.iter()
        .enumerate()
        .map(|(i, d)| {
            d.as_u64().ok_or_else(|| match d.as_i64() {
                Some(v) => format!("shape dimension {i} is {v}: dimensions must be 0 or more"),
                None => format!("shape dimension {i} is {d}: dimensions must be whole numbers"),
            })
        })
        .collect()
}

#[derive(Serialize)]
pub(super) struct WriteTensor<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [u64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

/// The JSON view of each tensor, after checking it can be sent the way `binary` says.
pub(super) fn write_tensors<'a>(
    tensors: &'a [Tensor],
    binary: &[bool],
    role: Role,
) -> Result<Vec<WriteTensor<'a>>> {
    tensors
        .iter()
        .zip(binary)
        .map(|(t, &binary)| {
            check_sendable(t, binary, role)?;
            Ok(WriteTensor {
                name: &t.name,
                datatype: t.datatype.as_str(),
                shape: &t.shape,
                parameters: binary.then_some(BinarySize {
                    binary_data_size: t.data.len(),
                }),
                data: (!binary).then_some(JsonData(t)),
            })
        })
        .collect()
}

/// A tensor about to be encoded must match its shape ([`V2Error::Inconsistent`] otherwise) and,
/// unless it goes binary, hold nothing JSON cannot carry.
fn check_sendable(t: &Tensor, binary: bool, role: Role) -> Result<()> {
    let inconsistent = |reason: String| V2Error::Inconsistent {
        role,
        name: t.name.clone(),
        reason,
    };
    t.check_data(role).map_err(|e| match e {
        V2Error::DataSize { reason, .. } => inconsistent(reason),
        other => inconsistent(other.to_string()),
    })?;
    if binary {
        return Ok(());
    }
    check_representable(t).map_err(|e| match (role, e) {
        // A client encoding a request can only blame itself; the message says what to do.
        (Role::Input, V2Error::NotJsonRepresentable { reason, .. }) => inconsistent(format!(
            "it cannot be sent as JSON ({reason}): send it as binary tensor data"
        )),
        (_, e) => e,
    })
}

/// Serialises the JSON header, then appends the binary tensors in order.
pub(super) fn assemble(
    header: &impl Serialize,
    tensors: &[Tensor],
    binary: &[bool],
) -> Result<EncodedBody> {
    let binary_len: usize = tensors
        .iter()
        .zip(binary)
        .filter(|(_, b)| **b)
        .map(|(t, _)| t.data.len())
        .sum();
    // JSON numbers average around a dozen characters; this is only a capacity hint.
    let json_hint: usize = tensors
        .iter()
        .zip(binary)
        .filter(|(_, b)| !**b)
        .map(|(t, _)| t.data.len().saturating_mul(3))
        .sum();
    let mut body = Vec::with_capacity(256 + json_hint + binary_len);
    serde_json::to_writer(&mut body, header)
        .map_err(|e| V2Error::Malformed(format!("cannot write the JSON header: {e}")))?;
    if !binary.contains(&true) {
        return Ok(EncodedBody {
            body,
            header_len: None,
        });
    }
    let header_len = body.len();
    for (t, _) in tensors.iter().zip(binary).filter(|(_, b)| **b) {
        body.extend_from_slice(&t.data);
    }
    Ok(EncodedBody {
        body,
        header_len: Some(header_len),
    })
}
