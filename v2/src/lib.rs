//! The KServe V2 / Open Inference Protocol codec: request and response bodies in and out, plus the
//! checks of a request against a model's declared tensors. Pure code: no IO, no async, no clocks.
//!
//! # Data flow
//! An HTTP body (and the value of its `Inference-Header-Content-Length` header, if any) goes into
//! [`decode_request`], which yields an [`InferRequest`] whose inputs are [`Tensor`]s in one raw
//! layout: little-endian, row-major, and for `BYTES` a 4-byte little-endian length before each
//! element (Triton's binary layout). That layout crosses into the Wasm guest unchanged.
//! [`validate_inputs`] and [`select_outputs`] check the request against the model's
//! [`TensorSpec`](sophon_sdk::TensorSpec)s. The guest's output tensors go back out through
//! [`encode_response`], as JSON `data` or, where the client asked, as Triton binary tensor data
//! after the JSON header. [`encode_request`] and [`decode_response`] are the client side of the
//! same wire format (for tests and for forwarding a request to another node).
//!
//! # What this module must never do
//! - Allocate from a size a client declared before checking it against the bytes actually
//!   received: a shape claiming 10^12 elements with four bytes of data fails fast.
//! - Panic on anything in a body. Every defect is a [`V2Error`] whose message says what to fix.
//!
//! # Choices the protocol leaves open
//! - JSON `data` may be flat or nested (up to serde_json's depth limit of 128); it is read
//!   row-major and only the total element count is checked against the shape. A bare scalar is
//!   taken as one element. Responses always carry flat `data`.
//! - Integers must be integral and in range for their datatype (`300` is not a `UINT8`, `1.5` is
//!   not an `INT32`; `2.0` is accepted as `2`). `BOOL` takes `true`/`false` or `0`/`1`. Floats that
//!   overflow their datatype (`1e40` as `FP32`, `70000` as `FP16`) are refused, not made infinite.
//! - Binary `BOOL` bytes must be 0 or 1.
//! - JSON cannot carry NaN or infinities, and JSON strings cannot carry bytes that are not UTF-8.
//!   An output holding either is refused with [`V2Error::NotJsonRepresentable`], whose message
//!   tells the client to ask for that output in binary; nothing is silently replaced by `null`.
//! - A request `id` of any JSON type is echoed back as given.
//! - Triton's shared-memory parameters are refused with a clear message. Its classification
//!   parameter is read into [`RequestedOutput::classification`] and served by [`classify`].
//!
//! # Dependencies
//! serde_json needs its `raw_value` feature (tensor `data` is borrowed as raw text, then parsed
//! once its datatype is known) and `float_roundtrip` (without it, `FP64` values can come back one
//! unit in the last place off; the round-trip tests catch that).

mod body;
pub mod classify;
mod json;
mod request;
mod response;
#[cfg(test)]
mod roundtrip_tests;
mod tensor;
mod validate;

pub use request::{decode_request, decode_request_split, encode_request};
pub use response::{decode_response, encode_response};
pub use tensor::{Tensor, element_count};
pub use validate::{select_outputs, validate_batch, validate_inputs};

use serde_json::{Map, Value};
use sophon_sdk::Datatype;
use std::fmt;

/// The HTTP header that carries the length of the JSON part of a body with binary tensor data.
pub const HEADER_CONTENT_LENGTH: &str = "Inference-Header-Content-Length";

/// Result type of this module.
pub type Result<T, E = V2Error> = std::result::Result<T, E>;

/// Which side of a model a tensor is on; used to word error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Input,
    Output,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Input => "input",
            Role::Output => "output",
        })
    }
}

/// Everything that can be wrong with a V2 body or with tensors checked against a model.
///
/// [`V2Error::status`] gives the HTTP status; the HTTP layer answers `{"error": "<message>"}`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum V2Error {
    /// The body is not the JSON the protocol describes (syntax, a field of the wrong type, ...).
    #[error("malformed body: {0}")]
    Malformed(String),

    /// The binary tensor data after the JSON header does not add up.
    #[error("binary tensor data: {0}")]
    BinaryData(String),

    /// One tensor of a decoded body is wrong: its datatype, shape, data or parameters.
    #[error("{role} '{name}': {reason}")]
    Tensor {
        role: Role,
        name: String,
        reason: String,
    },

    /// Two tensors of one body share a name.
    #[error("{role} '{name}' appears more than once: send each {role} once")]
    Duplicate { role: Role, name: String },

    /// A request input that the model does not declare.
    #[error("unknown input '{name}': the model's inputs are {expected}")]
    UnknownInput { name: String, expected: String },

    /// A declared input missing from the request.
    #[error("missing input '{name}': the model's inputs are {expected}")]
    MissingInput { name: String, expected: String },

    /// A requested output that the model does not declare.
    #[error("unknown output '{name}': the model's outputs are {expected}")]
    UnknownOutput { name: String, expected: String },

    /// An input whose datatype differs from the declared one.
    #[error("input '{name}' has datatype {got} but the model expects {expected}")]
    DatatypeMismatch {
        name: String,
        expected: Datatype,
        got: Datatype,
    },

    /// An input whose shape does not fit the declared one (-1 is any size).
    #[error("input '{name}' has shape {got:?} but the model expects {expected:?} (-1 is any size)")]
    ShapeMismatch {
        name: String,
        expected: Vec<i64>,
        got: Vec<u64>,
    },

    /// A tensor whose data does not hold as many elements as its shape says.
    #[error("{role} '{name}': {reason}")]
    DataSize {
        role: Role,
        name: String,
        reason: String,
    },

    /// An output that JSON cannot carry (NaN, infinities, bytes that are not UTF-8).
    #[error(
        "output '{name}' cannot be sent as JSON: {reason}; request it as binary tensor data \
         (\"parameters\": {{\"binary_data\": true}} on the output)"
    )]
    NotJsonRepresentable { name: String, reason: String },

    /// A tensor handed to an encoder is inconsistent (data length vs shape, BYTES framing).
    /// When it is a model's output, the model is at fault, not the client.
    #[error("{role} '{name}' is inconsistent: {reason}")]
    Inconsistent {
        role: Role,
        name: String,
        reason: String,
    },
}

impl V2Error {
    /// The HTTP status this error is answered with: 500 where the tensors being encoded are
    /// themselves broken (a model bug), 400 for everything a client can fix.
    pub fn status(&self) -> u16 {
        match self {
            V2Error::Inconsistent { .. } => 500,
            _ => 400,
        }
    }

    pub(crate) fn tensor(role: Role, name: &str, reason: impl Into<String>) -> Self {
        V2Error::Tensor {
            role,
            name: name.to_string(),
            reason: reason.into(),
        }
    }
}

/// A requested output and whether it is to be returned as binary tensor data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestedOutput {
    pub name: String,
    /// Resolved: the output's own `binary_data` parameter, else the request's
    /// `binary_data_output`.
    pub binary: bool,
    /// Triton's classification extension: answer with the output's top this-many classes
    /// (see [`classify`]).
    pub classification: Option<u32>,
}

/// A decoded inference request.
#[derive(Clone, Debug, PartialEq)]
pub struct InferRequest {
    /// The request id, echoed in the response as given (the spec says string; any JSON value is
    /// accepted).
    pub id: Option<Value>,
    /// Request parameters other than `binary_data_output`, which is lifted into its own field.
    pub parameters: Map<String, Value>,
    pub inputs: Vec<Tensor>,
    /// The outputs named by the request; empty means "all of the model's outputs".
    pub outputs: Vec<RequestedOutput>,
    /// The request-level `parameters.binary_data_output`.
    pub binary_data_output: bool,
}

impl InferRequest {
    /// Whether the output `name` is to be returned at all.
    pub fn wants_output(&self, name: &str) -> bool {
        self.outputs.is_empty() || self.outputs.iter().any(|o| o.name == name)
    }

    /// Whether the output `name` is to be returned as binary tensor data.
    pub fn wants_binary(&self, name: &str) -> bool {
        self.outputs
            .iter()
            .find(|o| o.name == name)
            .map_or(self.binary_data_output, |o| o.binary)
    }
}

/// A decoded inference response. Response `parameters` are not kept.
#[derive(Clone, Debug, PartialEq)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: Option<String>,
    pub id: Option<Value>,
    pub outputs: Vec<Tensor>,
}

/// An encoded body. When `header_len` is `Some`, the body is the JSON header of that many bytes
/// followed by binary tensor data, and the HTTP layer must send the header
/// [`HEADER_CONTENT_LENGTH`] with this value (and should use `application/octet-stream`);
/// otherwise the whole body is JSON (`application/json`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedBody {
    pub body: Vec<u8>,
    pub header_len: Option<usize>,
}

/// The encoded form of a response.
pub type EncodedResponse = EncodedBody;
/// The encoded form of a request.
pub type EncodedRequest = EncodedBody;
