//! A misbehaving release, for canary tests: the ONNX passthrough (the bundle's graph `model`),
//! made to fail `FAIL_PERCENT` percent of requests at random and to sleep `DELAY_MS` before each
//! answer. The manifest grants both variables under `[capabilities.env]`; unset, it behaves.
use std::hash::{BuildHasher, Hasher};

use sophon_guest::nn::Graph;
use sophon_guest::{Model, ModelMetadata, PredictError, Tensor};

struct Flaky;

fn var(name: &str) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// 0–99, from WASI random (each request runs in a fresh instance, seeded afresh).
fn percentile() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish() % 100
}

impl Model for Flaky {
    fn metadata() -> ModelMetadata {
        ModelMetadata {
            name: "flaky".to_string(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    fn predict(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PredictError> {
        let delay = var("DELAY_MS");
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay));
        }
        if percentile() < var("FAIL_PERCENT") {
            return Err(PredictError::Internal(
                "injected failure (FAIL_PERCENT)".into(),
            ));
        }
        Graph::by_name("model")?.context()?.compute(inputs)
    }
}

sophon_guest::export_model!(Flaky);
