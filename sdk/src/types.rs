//! Tensor datatypes and declared tensor specs, shared by the manifest, the packer and the node.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A KServe V2 / Open Inference Protocol datatype (plus Triton's `BF16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Datatype {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bf16,
    Bytes,
}

impl Datatype {
    /// Every datatype, in protocol order.
    pub const ALL: [Datatype; 14] = [
        Datatype::Bool,
        Datatype::Uint8,
        Datatype::Uint16,
        Datatype::Uint32,
        Datatype::Uint64,
        Datatype::Int8,
        Datatype::Int16,
        Datatype::Int32,
        Datatype::Int64,
        Datatype::Fp16,
        Datatype::Fp32,
        Datatype::Fp64,
        Datatype::Bf16,
        Datatype::Bytes,
    ];

    /// Size of one element in bytes; `None` for `BYTES`, whose elements vary.
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            Datatype::Bool | Datatype::Uint8 | Datatype::Int8 => 1,
            Datatype::Uint16 | Datatype::Int16 | Datatype::Fp16 | Datatype::Bf16 => 2,
            Datatype::Uint32 | Datatype::Int32 | Datatype::Fp32 => 4,
            Datatype::Uint64 | Datatype::Int64 | Datatype::Fp64 => 8,
            Datatype::Bytes => return None,
        })
    }

    /// The protocol name, e.g. `FP32`.
    pub fn as_str(self) -> &'static str {
        match self {
            Datatype::Bool => "BOOL",
            Datatype::Uint8 => "UINT8",
            Datatype::Uint16 => "UINT16",
            Datatype::Uint32 => "UINT32",
            Datatype::Uint64 => "UINT64",
            Datatype::Int8 => "INT8",
            Datatype::Int16 => "INT16",
            Datatype::Int32 => "INT32",
            Datatype::Int64 => "INT64",
            Datatype::Fp16 => "FP16",
            Datatype::Fp32 => "FP32",
            Datatype::Fp64 => "FP64",
            Datatype::Bf16 => "BF16",
            Datatype::Bytes => "BYTES",
        }
    }

    /// Triton's model-configuration name, e.g. `TYPE_FP32` (`TYPE_STRING` for `BYTES`).
    pub fn triton_config_name(self) -> &'static str {
        match self {
            Datatype::Bool => "TYPE_BOOL",
            Datatype::Uint8 => "TYPE_UINT8",
            Datatype::Uint16 => "TYPE_UINT16",
            Datatype::Uint32 => "TYPE_UINT32",
            Datatype::Uint64 => "TYPE_UINT64",
            Datatype::Int8 => "TYPE_INT8",
            Datatype::Int16 => "TYPE_INT16",
            Datatype::Int32 => "TYPE_INT32",
            Datatype::Int64 => "TYPE_INT64",
            Datatype::Fp16 => "TYPE_FP16",
            Datatype::Fp32 => "TYPE_FP32",
            Datatype::Fp64 => "TYPE_FP64",
            Datatype::Bf16 => "TYPE_BF16",
            Datatype::Bytes => "TYPE_STRING",
        }
    }
}

impl fmt::Display for Datatype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a datatype name that is not one of the protocol's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown datatype `{0}`: expected one of BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BF16, BYTES"
)]
pub struct UnknownDatatype(pub String);

impl FromStr for Datatype {
    type Err = UnknownDatatype;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Datatype::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| UnknownDatatype(s.to_string()))
    }
}

/// A declared model input or output: name, datatype and shape, where -1 is a variable dimension.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: Datatype,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    /// Whether a concrete shape matches this spec (same rank; each fixed dimension equal).
    pub fn accepts_shape(&self, shape: &[u64]) -> bool {
        self.shape.len() == shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(want, got)| *want < 0 || *want as u64 == *got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for d in Datatype::ALL {
            assert_eq!(d.as_str().parse::<Datatype>(), Ok(d));
            let json = serde_json::to_string(&d).expect("serialise");
            assert_eq!(json, format!("\"{}\"", d.as_str()));
        }
        assert!("FLOAT".parse::<Datatype>().is_err());
    }

    #[test]
    fn shapes_with_variable_dimensions() {
        let spec = TensorSpec {
            name: "x".into(),
            datatype: Datatype::Fp32,
            shape: vec![-1, 4],
        };
        assert!(spec.accepts_shape(&[7, 4]));
        assert!(!spec.accepts_shape(&[7, 5]));
        assert!(!spec.accepts_shape(&[4]));
    }
}
