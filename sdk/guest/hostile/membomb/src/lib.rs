//! Hostile guest: allocates until memory runs out. The node's memory limit must stop it.
use sophon_guest::{Model, ModelMetadata, PredictError, Tensor};

struct MemBomb;

impl Model for MemBomb {
    fn metadata() -> ModelMetadata {
        ModelMetadata {
            name: "membomb".into(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }
    fn predict(_inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PredictError> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![0xA5; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

sophon_guest::export_model!(MemBomb);
