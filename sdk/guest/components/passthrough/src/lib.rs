//! The generic ONNX passthrough: hands every named input to the bundle's graph `model` and returns
//! every output. Its inputs and outputs are whatever the bundle manifest declares (the packer reads
//! them from the ONNX graph), so one component serves any plain ONNX file.
//!
//! It targets the `direct-model` world: the node calls `direct.predict` with the request's tensors
//! as wasi-nn handles it holds, and this component passes them to the graph untouched, so no tensor
//! is copied through its linear memory. `predictor.predict` (tensors by value) serves the requests
//! wasi-nn cannot carry, and nodes that predate `direct`.
//!
//! The same recipe serves any model that only forwards its tensors: generate the `direct-model`
//! world with the SDK's types (`with` below) and export both interfaces.

use sophon_guest::nn::Graph;
use sophon_guest::{ModelMetadata, PredictError, Tensor};

mod bindings {
    wit_bindgen::generate!({
        world: "direct-model",
        path: "../../../../wit/wit",
        with: {
            "sophon:model/types@0.1.0": sophon_guest::bindings::sophon::model::types,
            "wasi:nn/tensor@0.2.0-rc-2024-10-28": sophon_guest::bindings::wasi::nn::tensor,
            "wasi:nn/graph@0.2.0-rc-2024-10-28": sophon_guest::bindings::wasi::nn::graph,
            "wasi:nn/inference@0.2.0-rc-2024-10-28": sophon_guest::bindings::wasi::nn::inference,
            "wasi:nn/errors@0.2.0-rc-2024-10-28": sophon_guest::bindings::wasi::nn::errors,
        },
    });
}

use bindings::exports::sophon::model::{direct, predictor};

struct Passthrough;

impl predictor::Guest for Passthrough {
    fn metadata() -> ModelMetadata {
        ModelMetadata {
            name: "onnx-passthrough".to_string(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    fn predict(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PredictError> {
        Graph::by_name("model")?.context()?.compute(inputs)
    }
}

impl direct::Guest for Passthrough {
    fn predict(inputs: Vec<direct::NamedTensor>) -> Result<Vec<direct::NamedTensor>, PredictError> {
        Graph::by_name("model")?.context()?.compute_handles(inputs)
    }
}

bindings::export!(Passthrough with_types_in bindings);
