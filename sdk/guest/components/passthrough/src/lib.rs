//! The generic ONNX passthrough: hands every named input to the bundle's graph `model` and returns
//! every output. Its inputs and outputs are whatever the bundle manifest declares (the packer reads
//! them from the ONNX graph), so one component serves any plain ONNX file.

use sophon_guest::nn::Graph;
use sophon_guest::{Model, ModelMetadata, PredictError, Tensor};

struct Passthrough;

impl Model for Passthrough {
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

sophon_guest::export_model!(Passthrough);
