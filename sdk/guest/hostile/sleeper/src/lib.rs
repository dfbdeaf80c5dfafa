//! Hostile guest: sleeps for an hour in WASI (`monotonic-clock.subscribe-duration` and
//! `pollable.block`). The epoch deadline cannot interrupt a host call, so the node must bound
//! the wait itself: the request fails at its deadline and the node keeps its thread and slot.
use sophon_guest::{Model, ModelMetadata, PredictError, Tensor};

struct Sleeper;

impl Model for Sleeper {
    fn metadata() -> ModelMetadata {
        ModelMetadata {
            name: "sleeper".into(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }
    fn predict(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PredictError> {
        std::thread::sleep(std::time::Duration::from_secs(3600));
        Ok(inputs)
    }
}

sophon_guest::export_model!(Sleeper);
