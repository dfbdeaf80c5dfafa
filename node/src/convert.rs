//! Conversions between the protocol's tensors ([`crate::v2::Tensor`]) and the guest's
//! (`sophon:model/types.tensor`). Both use the same byte layout, so only the datatype enum maps;
//! names, shapes and data move without a copy.

use crate::runtime::{GuestDatatype, GuestTensor};
use crate::v2::Tensor;
use sophon_sdk::Datatype;

/// Protocol datatype → guest datatype.
pub fn to_guest_datatype(d: Datatype) -> GuestDatatype {
    match d {
        Datatype::Bool => GuestDatatype::Bool,
        Datatype::Uint8 => GuestDatatype::Uint8,
        Datatype::Uint16 => GuestDatatype::Uint16,
        Datatype::Uint32 => GuestDatatype::Uint32,
        Datatype::Uint64 => GuestDatatype::Uint64,
        Datatype::Int8 => GuestDatatype::Int8,
        Datatype::Int16 => GuestDatatype::Int16,
        Datatype::Int32 => GuestDatatype::Int32,
        Datatype::Int64 => GuestDatatype::Int64,
        Datatype::Fp16 => GuestDatatype::Fp16,
        Datatype::Fp32 => GuestDatatype::Fp32,
        Datatype::Fp64 => GuestDatatype::Fp64,
        Datatype::Bf16 => GuestDatatype::Bf16,
        Datatype::Bytes => GuestDatatype::Bytes,
    }
}

/// Guest datatype → protocol datatype.
pub fn from_guest_datatype(d: GuestDatatype) -> Datatype {
    match d {
        GuestDatatype::Bool => Datatype::Bool,
        GuestDatatype::Uint8 => Datatype::Uint8,
        GuestDatatype::Uint16 => Datatype::Uint16,
        GuestDatatype::Uint32 => Datatype::Uint32,
        GuestDatatype::Uint64 => Datatype::Uint64,
        GuestDatatype::Int8 => Datatype::Int8,
        GuestDatatype::Int16 => Datatype::Int16,
        GuestDatatype::Int32 => Datatype::Int32,
        GuestDatatype::Int64 => Datatype::Int64,
        GuestDatatype::Fp16 => Datatype::Fp16,
        GuestDatatype::Fp32 => Datatype::Fp32,
        GuestDatatype::Fp64 => Datatype::Fp64,
        GuestDatatype::Bf16 => Datatype::Bf16,
        GuestDatatype::Bytes => Datatype::Bytes,
    }
}

/// A request tensor as a guest tensor.
pub fn to_guest(t: Tensor) -> GuestTensor {
    GuestTensor {
        name: t.name,
        datatype: to_guest_datatype(t.datatype),
        shape: t.shape,
        data: t.data,
    }
}

/// A guest tensor as a response tensor.
pub fn from_guest(t: GuestTensor) -> Tensor {
    Tensor {
        name: t.name,
        datatype: from_guest_datatype(t.datatype),
        shape: t.shape,
        data: t.data,
    }
}
