//! The ready-made components, compiled from `sdk/guest` by this crate's build script.

/// The generic ONNX passthrough: any named inputs and outputs, run on the bundle's graph `model`.
pub const PASSTHROUGH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/passthrough.wasm"));

/// The example classifier: UINT8 image in, softmax probabilities and top-k labels (BYTES) out.
pub const CLASSIFIER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/classifier.wasm"));

/// Hostile guests used by the node's tests; only their paths, so they are not in the binary.
pub mod hostile {
    /// Never returns.
    pub const SPIN: &str = concat!(env!("OUT_DIR"), "/spin.wasm");
    /// Allocates until memory runs out.
    pub const MEMBOMB: &str = concat!(env!("OUT_DIR"), "/membomb.wasm");
    /// Panics.
    pub const TRAP: &str = concat!(env!("OUT_DIR"), "/trap.wasm");
    /// Returns a 96 MiB output.
    pub const HUGEOUT: &str = concat!(env!("OUT_DIR"), "/hugeout.wasm");
    /// Reports what the sandbox lets it see, and whether state survives between calls.
    pub const PROBE: &str = concat!(env!("OUT_DIR"), "/probe.wasm");
    /// Sleeps for an hour in WASI.
    pub const SLEEPER: &str = concat!(env!("OUT_DIR"), "/sleeper.wasm");
    /// Creates wasi-nn tensors (host memory) without end.
    pub const TENSORBOMB: &str = concat!(env!("OUT_DIR"), "/tensorbomb.wasm");
    /// The passthrough, failing `FAIL_PERCENT` % of requests and sleeping `DELAY_MS` each.
    pub const FLAKY: &str = concat!(env!("OUT_DIR"), "/flaky.wasm");
}
