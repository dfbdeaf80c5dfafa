//! Hostile guest: never returns. The node's epoch deadline must stop it.
use sophon_guest::{Model, ModelMetadata, PredictError, Tensor};

struct Spin;

impl Model for Spin {
    fn metadata() -> ModelMetadata {
        ModelMetadata {
            name: "spin".into(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }
    fn predict(_inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PredictError> {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

sophon_guest::export_model!(Spin);
