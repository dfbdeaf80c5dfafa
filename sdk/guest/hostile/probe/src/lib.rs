//! Probing guest: reports what the sandbox lets it see, and whether state survives between calls.
//!
//! Output `y`, FP32 `[5]`: calls seen by this instance (1 with a fresh instance per request), the
//! number of environment variables, whether listing `/` worked, whether a TCP connection to
//! 127.0.0.1 could be made (1) or not (0), and the value of the `PROBE` variable if granted.
use sophon_guest::{Model, ModelMetadata, PredictError, Tensor};
use std::sync::atomic::{AtomicU32, Ordering};

static CALLS: AtomicU32 = AtomicU32::new(0);

struct Probe;

impl Model for Probe {
    fn metadata() -> ModelMetadata {
        ModelMetadata {
            name: "probe".into(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }
    fn predict(_inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PredictError> {
        println!("probe guest called");
        let calls = CALLS.fetch_add(1, Ordering::SeqCst) + 1;
        let env = std::env::vars().count();
        let fs = std::fs::read_dir("/").is_ok();
        let net = std::net::TcpStream::connect("127.0.0.1:9").is_ok();
        let granted = std::env::var("PROBE")
            .ok()
            .and_then(|v| v.parse::<f32>().ok())
            .unwrap_or(-1.0);
        let values = [
            calls as f32,
            env as f32,
            fs as u8 as f32,
            net as u8 as f32,
            granted,
        ];
        Ok(vec![Tensor::from_f32("y", &[5], &values)])
    }
}

sophon_guest::export_model!(Probe);
