//! Hostile guest: panics (a trap, since guests build with panic = "abort").
use sophon_guest::{Model, ModelMetadata, PredictError, Tensor};

struct Trap;

impl Model for Trap {
    fn metadata() -> ModelMetadata {
        ModelMetadata {
            name: "trap".into(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }
    fn predict(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PredictError> {
        panic!("hostile guest panics on purpose ({} inputs)", inputs.len());
    }
}

sophon_guest::export_model!(Trap);
