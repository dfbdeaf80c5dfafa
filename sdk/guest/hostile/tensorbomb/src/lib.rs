//! Hostile guest: creates wasi-nn tensors from one small buffer until the host runs out of
//! memory. Tensors live in host memory, outside the guest's linear memory, so the node must
//! count them against the model's memory limit.
use sophon_guest::bindings::wasi::nn::tensor;
use sophon_guest::{Model, ModelMetadata, PredictError, Tensor};

struct TensorBomb;

impl Model for TensorBomb {
    fn metadata() -> ModelMetadata {
        ModelMetadata {
            name: "tensorbomb".into(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }
    fn predict(_inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PredictError> {
        let chunk = vec![0xA5u8; 4 << 20];
        let mut hoard = Vec::new();
        loop {
            hoard.push(tensor::Tensor::new(
                &[chunk.len() as u32],
                tensor::TensorType::U8,
                &chunk,
            ));
            std::hint::black_box(&hoard);
        }
    }
}

sophon_guest::export_model!(TensorBomb);
