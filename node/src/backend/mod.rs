//! wasi-nn backends: what turns a bundle's model file into a graph the guest can run.
//!
//! Each backend implements wasmtime-wasi-nn's `BackendInner` (load a graph), `BackendGraph`
//! (make an execution context) and `BackendExecutionContext` (run it), one file per backend. The
//! default is [`tract`], pure Rust, so a node needs no native library. ONNX Runtime and OpenVINO
//! plug in beside it behind the same traits (a later issue) and are picked by
//! the manifest's [`GraphEncoding`] and by what the machine has.
//!
//! Tensor types: wasi-nn has fewer types than the V2 protocol, so the guest SDK sends the missing
//! ones in a carrier of the same element width (see `sophon_guest::nn`); backends reinterpret a
//! carrier as the model's declared type. Anything else is a clear error, never a panic.

pub mod memory;
#[cfg(feature = "ort")]
pub mod ort;
pub mod tract;

use std::cell::RefCell;

use sophon_sdk::{Backend, GraphEncoding};
use wasmtime_wasi_nn::Graph;

/// Errors from loading a model file into a backend.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No backend on this node handles this encoding.
    #[error(
        "no backend on this node loads `{0}` graphs (available: onnx via tract or onnxruntime)"
    )]
    UnsupportedEncoding(String),
    /// Every backend tried refused the model file; each one's reason.
    #[error("{}", .0.join("; "))]
    Backend(Vec<String>),
}

/// The backends a node tries when the manifest names none, best first. A model whose
/// manifest prefers the GPU tries tract on CUDA first.
pub const DEFAULT_BACKENDS: [Backend; 2] = [Backend::Tract, Backend::Ort];

/// Every backend a node may have.
pub const ALL_BACKENDS: [Backend; 3] = [Backend::Tract, Backend::Ort, Backend::TractCuda];

/// What a node's backends are: each one, and whether it is here (`Err`: why not).
pub fn inventory() -> Vec<(Backend, Result<String, String>)> {
    ALL_BACKENDS
        .iter()
        .map(|b| {
            let state = match b {
                Backend::Tract => Ok(format!("tract {} (CPU)", TRACT_VERSION)),
                Backend::Ort => ort_available(),
                Backend::TractCuda => {
                    tract::cuda().map(|_| format!("tract {} (CUDA)", TRACT_VERSION))
                }
            };
            (*b, state)
        })
        .collect()
}

/// The tract release the node is built with.
const TRACT_VERSION: &str = "0.23";

#[cfg(feature = "ort")]
fn ort_available() -> Result<String, String> {
    ort::available().map(|path| format!("onnxruntime ({}) (CPU)", path.display()))
}

#[cfg(not(feature = "ort"))]
fn ort_available() -> Result<String, String> {
    Err("this sophon was built without the `ort` feature".to_string())
}

/// Load one model file as a graph on the first of `backends` (the manifest's order, or
/// [`DEFAULT_BACKENDS`]) that takes it, its inputs shaped by `shapes` (the manifest's
/// `[[graphs]] shapes`). Also says how it runs. When none does, the error has each backend's
/// reason.
pub fn load_graph(
    encoding: GraphEncoding,
    bytes: &[u8],
    shapes: &std::collections::BTreeMap<String, Vec<i64>>,
    backends: &[Backend],
) -> Result<(Graph, String), LoadError> {
    load_graph_preferring(encoding, bytes, shapes, backends, false)
}

/// [`load_graph`]; with `gpu_first` (the manifest prefers the GPU) and no backends named,
/// tract on CUDA is tried first.
pub fn load_graph_preferring(
    encoding: GraphEncoding,
    bytes: &[u8],
    shapes: &std::collections::BTreeMap<String, Vec<i64>>,
    backends: &[Backend],
    gpu_first: bool,
) -> Result<(Graph, String), LoadError> {
    if encoding == GraphEncoding::Openvino {
        return Err(LoadError::UnsupportedEncoding("openvino".to_string()));
    }
    let gpu_order = [Backend::TractCuda, Backend::Tract, Backend::Ort];
    let order = match (backends.is_empty(), gpu_first) {
        (false, _) => backends,
        (true, true) => &gpu_order[..],
        (true, false) => &DEFAULT_BACKENDS[..],
    };
    let mut refused = Vec::new();
    for backend in order {
        match load_on(*backend, bytes, shapes) {
            Ok((graph, how)) => {
                let how = if refused.is_empty() {
                    how
                } else {
                    format!("{how} (not {})", refused.join("; "))
                };
                return Ok((graph, how));
            }
            Err(e) => refused.push(format!("{}: {e}", backend.as_str())),
        }
    }
    Err(LoadError::Backend(refused))
}

fn load_on(
    backend: Backend,
    bytes: &[u8],
    shapes: &std::collections::BTreeMap<String, Vec<i64>>,
) -> Result<(Graph, String), String> {
    use wasmtime_wasi_nn::backend::BackendGraph;
    match backend {
        Backend::Tract | Backend::TractCuda => {
            let (device, on) = match backend {
                Backend::TractCuda => (tract::Device::Cuda, "tract on CUDA"),
                _ => (tract::Device::Cpu, "tract on CPU"),
            };
            let graph = tract::TractGraph::from_onnx_on(bytes, shapes, device)
                .map_err(|e| format!("{e:#}"))?;
            let how = match graph.per_shape() {
                None => format!("{on}, one plan for every input shape"),
                Some(why) => format!(
                    "{on}, a plan per set of input shapes (made on first use; pin shapes with \
                     `sophon pack --shape` to avoid it), because: {why}"
                ),
            };
            Ok((Graph::from(Box::new(graph) as Box<dyn BackendGraph>), how))
        }
        #[cfg(feature = "ort")]
        Backend::Ort => {
            let graph = ort::OrtGraph::from_onnx(bytes)?;
            Ok((
                Graph::from(Box::new(graph) as Box<dyn BackendGraph>),
                "onnxruntime on CPU".to_string(),
            ))
        }
        #[cfg(not(feature = "ort"))]
        Backend::Ort => Err(ort_available().unwrap_err()),
    }
}

/// The detail of a backend failure, kept for the call in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastError {
    /// What went wrong.
    pub message: String,
    /// The request's data caused it (a 400), rather than the model or the node (a 500).
    pub input: bool,
}

thread_local! {
    static LAST_ERROR: RefCell<Option<LastError>> = const { RefCell::new(None) };
}

/// Note the detail of a backend failure on this thread.
///
/// wasmtime-wasi-nn hands the guest only the top-level message of a `BackendError`
/// ("Failed while accessing backend"); the node adds this detail to the error the client sees.
/// Guest calls run synchronously on one thread, so the detail belongs to the call in progress.
pub(crate) fn remember_error(message: &str, input: bool) {
    LAST_ERROR.with(|e| {
        *e.borrow_mut() = Some(LastError {
            message: message.to_string(),
            input,
        })
    });
}

/// Take the detail of the last backend failure on this thread, if any.
pub fn take_last_error() -> Option<LastError> {
    LAST_ERROR.with(|e| e.borrow_mut().take())
}

/// Run one backend call, turning a panic into an error for this call only.
///
/// A backend (tract, a native library's bindings) may panic on data it did not expect. The
/// caller drops whatever state the call was using, so nothing half-updated is reused.
pub fn catch_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let detail = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_string());
        format!("{what} panicked: {detail}")
    })
}
