//! The Sophon SDK, host side: the bundle format (manifest, per-part SHA-256, bundle digest, ed25519
//! signature), the packer, and the ready-made components built from `sdk/guest`.
//!
//! Data flows one way: a manifest directory or a plain ONNX file goes into the packer, which writes
//! one signed bundle file; the node reads it back with [`bundle::Bundle::read`], which refuses
//! anything unsigned, tampered with, truncated or of an unknown format version. Nothing here does
//! network IO, and nothing here runs guest code.

pub mod bundle;
pub mod components;
pub mod error;
#[cfg(feature = "onnx")]
pub mod examples;
pub mod keys;
pub mod manifest;
#[cfg(feature = "onnx")]
pub mod onnx;
#[cfg(feature = "onnx")]
pub mod ready;
pub mod types;

pub use bundle::{Bundle, pack_parts};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
pub use error::{Error, Result};
pub use manifest::{
    Backend, Batching, Capabilities, ComponentSpec, Device, GraphEncoding, GraphSpec, Hardware,
    Manifest, ModelInfo, Resources,
};
#[cfg(feature = "onnx")]
pub use onnx::{OnnxOptions, onnx_io, pack_dir, pack_onnx, pack_onnx_with};
pub use types::{Datatype, TensorSpec};
