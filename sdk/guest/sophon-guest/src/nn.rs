//! Inference through wasi-nn: reach a graph the node preloaded, run it on named tensors.
//!
//! wasi-nn knows fewer tensor types than the V2 protocol, so the types it lacks travel in a
//! carrier of the same element width (`BOOL` and `INT8` as `u8`, `UINT32` as `i32`, `UINT64` as
//! `i64`, `INT16` and `UINT16` as `fp16`); the node's backend reinterprets them as the model's
//! declared input type, and relabels outputs by the bundle manifest. `BYTES` cannot cross wasi-nn.

use crate::bindings::wasi::nn::{errors, graph, inference, tensor};
use crate::{Datatype, PredictError, Tensor};
use alloc::format;
use alloc::vec::Vec;

/// A graph the node preloaded from the bundle (`[[graphs]]` in the manifest).
pub struct Graph(graph::Graph);

/// An execution context of a [`Graph`]; each `compute` is one inference.
pub struct Context(inference::GraphExecutionContext);

fn nn_error(what: &str, e: errors::Error) -> PredictError {
    PredictError::Inference(format!("{what}: {:?}: {}", e.code(), e.data()))
}

impl Graph {
    /// The graph the manifest names `name`.
    pub fn by_name(name: &str) -> Result<Graph, PredictError> {
        graph::load_by_name(name)
            .map(Graph)
            .map_err(|e| nn_error(&format!("loading graph `{name}`"), e))
    }

    /// A fresh execution context.
    pub fn context(&self) -> Result<Context, PredictError> {
        self.0
            .init_execution_context()
            .map(Context)
            .map_err(|e| nn_error("creating an execution context", e))
    }
}

fn carrier(datatype: Datatype) -> Option<tensor::TensorType> {
    use tensor::TensorType as T;
    Some(match datatype {
        Datatype::Fp16 | Datatype::Int16 | Datatype::Uint16 => T::Fp16,
        Datatype::Fp32 => T::Fp32,
        Datatype::Fp64 => T::Fp64,
        Datatype::Bf16 => T::Bf16,
        Datatype::Uint8 | Datatype::Int8 | Datatype::Bool => T::U8,
        Datatype::Int32 | Datatype::Uint32 => T::I32,
        Datatype::Int64 | Datatype::Uint64 => T::I64,
        Datatype::Bytes => return None,
    })
}

fn from_carrier(ty: tensor::TensorType) -> Datatype {
    use tensor::TensorType as T;
    match ty {
        T::Fp16 => Datatype::Fp16,
        T::Fp32 => Datatype::Fp32,
        T::Fp64 => Datatype::Fp64,
        T::Bf16 => Datatype::Bf16,
        T::U8 => Datatype::Uint8,
        T::I32 => Datatype::Int32,
        T::I64 => Datatype::Int64,
    }
}

impl Context {
    /// Run the graph: named tensors in, every graph output out.
    pub fn compute(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PredictError> {
        let mut named = Vec::with_capacity(inputs.len());
        for t in inputs {
            let ty = carrier(t.datatype).ok_or_else(|| {
                crate::invalid_input(format!(
                    "input `{}` is BYTES, which wasi-nn cannot carry; decode it in the guest",
                    t.name
                ))
            })?;
            let dims: Vec<u32> = t
                .shape
                .iter()
                .map(|d| u32::try_from(*d))
                .collect::<Result<_, _>>()
                .map_err(|_| crate::invalid_input(format!("input `{}` is too large", t.name)))?;
            named.push((t.name, tensor::Tensor::new(&dims, ty, &t.data)));
        }
        Ok(self
            .compute_handles(named)?
            .into_iter()
            .map(|(name, t)| Tensor {
                name,
                datatype: from_carrier(t.ty()),
                shape: t.dimensions().into_iter().map(u64::from).collect(),
                data: t.data(),
            })
            .collect())
    }

    /// Run the graph on wasi-nn tensors the host holds: handles in, handles out, no tensor data
    /// copied through this component's memory. What a `direct-model` component's
    /// `direct.predict` calls.
    pub fn compute_handles(
        &self,
        inputs: Vec<inference::NamedTensor>,
    ) -> Result<Vec<inference::NamedTensor>, PredictError> {
        self.0
            .compute(inputs)
            .map_err(|e| nn_error("running inference", e))
    }
}
