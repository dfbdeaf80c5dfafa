//! Hostile guest: answers with a 96 MiB output, more than the node lets a response carry.
use sophon_guest::{Model, ModelMetadata, PredictError, Tensor};

struct HugeOut;

impl Model for HugeOut {
    fn metadata() -> ModelMetadata {
        ModelMetadata {
            name: "hugeout".into(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }
    fn predict(_inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PredictError> {
        let n = 24 << 20;
        Ok(vec![Tensor::from_f32("y", &[n as u64], &vec![1.0; n])])
    }
}

sophon_guest::export_model!(HugeOut);
