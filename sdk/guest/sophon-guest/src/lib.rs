//! The Sophon guest SDK: what a model author uses to write a model component.
//!
//! A model is a type implementing [`Model`] plus one [`export_model!`] line; the crate is built
//! for `wasm32-wasip2` as a `cdylib`, which yields a component exporting `sophon:model/predictor`.
//! Inference runs on the host through wasi-nn: [`nn::Graph::by_name`] reaches a model file the
//! bundle preloaded, and [`nn::Context::compute`] runs it. Pre- and post-processing (scaling,
//! softmax, top-k) are plain Rust in the guest, with the tensor helpers on [`Tensor`].
//!
//! Tensor data is little-endian and row-major, exactly as the V2 protocol's binary extension lays it
//! out; `BYTES` elements are each a 4-byte little-endian length followed by the bytes.
//!
//! ```ignore
//! struct Doubler;
//! impl sophon_guest::Model for Doubler {
//!     fn metadata() -> ModelMetadata { ... }
//!     fn predict(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PredictError> { ... }
//! }
//! sophon_guest::export_model!(Doubler);
//! ```

#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "model",
        path: "../../../wit/wit",
        generate_all,
        pub_export_macro: true,
        export_macro_name: "__export_model_world",
        default_bindings_module: "sophon_guest::bindings",
    });
}

pub mod nn;
mod tensor;

pub use bindings::sophon::model::types::{
    Datatype, ModelMetadata, PredictError, Tensor, TensorSpec,
};

/// A model: what it declares, and how it answers one request.
pub trait Model {
    /// Name, inputs and outputs. Empty inputs and outputs mean "as the bundle manifest declares".
    fn metadata() -> ModelMetadata;
    /// Named tensors in, named tensors out. The node has already checked the inputs against the
    /// declared names, datatypes and shapes.
    fn predict(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PredictError>;
}

/// Export a [`Model`] implementation as this component's `sophon:model/predictor`.
#[macro_export]
#[rustfmt::skip]
macro_rules! export_model {
    ($model:ty) => {
        const _: () = {
            struct SophonExport;
            type Outputs = ::std::vec::Vec<$crate::Tensor>;
            impl $crate::bindings::exports::sophon::model::predictor::Guest for SophonExport {
                fn metadata() -> $crate::ModelMetadata {
                    <$model as $crate::Model>::metadata()
                }
                fn predict(inputs: Outputs) -> ::std::result::Result<Outputs, $crate::PredictError> {
                    <$model as $crate::Model>::predict(inputs)
                }
            }
            $crate::bindings::__export_model_world!(SophonExport with_types_in $crate::bindings);
        };
    };
}

/// Shorthand for an `invalid-input` error.
pub fn invalid_input(message: impl Into<String>) -> PredictError {
    PredictError::InvalidInput(message.into())
}

/// Find an input by name, or say which one is missing.
pub fn take_input(inputs: &mut Vec<Tensor>, name: &str) -> Result<Tensor, PredictError> {
    let at = inputs
        .iter()
        .position(|t| t.name == name)
        .ok_or_else(|| invalid_input(format!("missing input `{name}`")))?;
    Ok(inputs.swap_remove(at))
}
