//! Helpers to build and read [`Tensor`]s without touching the byte layout by hand.

use crate::{Datatype, PredictError, Tensor, TensorSpec, invalid_input};
use alloc::format;
use alloc::string::ToString;
use alloc::vec::Vec;

impl Datatype {
    /// Size of one element in bytes; `None` for `bytes`.
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            Datatype::Bool | Datatype::Uint8 | Datatype::Int8 => 1,
            Datatype::Uint16 | Datatype::Int16 | Datatype::Fp16 | Datatype::Bf16 => 2,
            Datatype::Uint32 | Datatype::Int32 | Datatype::Fp32 => 4,
            Datatype::Uint64 | Datatype::Int64 | Datatype::Fp64 => 8,
            Datatype::Bytes => return None,
        })
    }
}

impl TensorSpec {
    /// A declared tensor; use -1 for a variable dimension.
    pub fn new(name: &str, datatype: Datatype, shape: &[i64]) -> Self {
        TensorSpec {
            name: name.to_string(),
            datatype,
            shape: shape.to_vec(),
        }
    }
}

impl Tensor {
    /// Number of elements the shape describes.
    pub fn element_count(&self) -> usize {
        self.shape.iter().map(|d| *d as usize).product()
    }

    /// An `FP32` tensor.
    pub fn from_f32(name: &str, shape: &[u64], values: &[f32]) -> Self {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Tensor {
            name: name.to_string(),
            datatype: Datatype::Fp32,
            shape: shape.to_vec(),
            data,
        }
    }

    /// A `BYTES` tensor, one element per item.
    pub fn from_bytes_elements<I, B>(name: &str, shape: &[u64], items: I) -> Self
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        let mut data = Vec::new();
        for item in items {
            let item = item.as_ref();
            data.extend_from_slice(&(item.len() as u32).to_le_bytes());
            data.extend_from_slice(item);
        }
        Tensor {
            name: name.to_string(),
            datatype: Datatype::Bytes,
            shape: shape.to_vec(),
            data,
        }
    }

    /// The elements of an `FP32` tensor.
    pub fn to_f32(&self) -> Result<Vec<f32>, PredictError> {
        self.expect_datatype(Datatype::Fp32)?;
        Ok(self
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// The elements of a `UINT8` tensor.
    pub fn as_u8(&self) -> Result<&[u8], PredictError> {
        self.expect_datatype(Datatype::Uint8)?;
        Ok(&self.data)
    }

    /// Fail with a clear message unless the tensor has this datatype.
    pub fn expect_datatype(&self, datatype: Datatype) -> Result<(), PredictError> {
        if self.datatype == datatype {
            Ok(())
        } else {
            Err(invalid_input(format!(
                "input `{}` must be {datatype:?}, got {:?}",
                self.name, self.datatype
            )))
        }
    }
}
