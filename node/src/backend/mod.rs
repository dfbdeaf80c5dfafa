//! wasi-nn backends: what turns a bundle's model file into a graph the guest can run.
//!
//! Each backend implements wasmtime-wasi-nn's `BackendInner` (load a graph), `BackendGraph`
//! (make an execution context) and `BackendExecutionContext` (run it), one file per backend. The
//! default is [`tract`], pure Rust, so a node needs no native library. ONNX Runtime ([`ort`]) and
//! OpenVINO ([`openvino`]) are loaded at run time where the machine has them; tract also runs on
//! NVIDIA GPUs through tract-cuda. [`choose`] picks the backend and device for each graph.
//!
//! Tensor types: wasi-nn has fewer types than the V2 protocol, so the guest SDK sends the missing
//! ones in a carrier of the same element width (see `sophon_guest::nn`); backends reinterpret a
//! carrier as the model's declared type. Anything else is a clear error, never a panic.

pub mod choose;
pub mod memory;
pub mod native;
#[cfg(feature = "openvino")]
pub mod openvino;
#[cfg(feature = "ort")]
pub mod ort;
pub mod tract;

use std::cell::RefCell;
use std::collections::BTreeMap;

use sophon_sdk::{Backend, Device, GraphEncoding};
use wasmtime_wasi_nn::Graph;

pub use choose::{Choice, Loaded, load_graph, load_graph_on};

/// Errors from loading a model file into a backend.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Every backend tried refused the model file; each one's reason.
    #[error("{}", .0.join("; "))]
    Backend(Vec<String>),
}

/// The backends a node tries on the CPU when the manifest names none, in the order used when
/// they cannot be measured.
pub const CPU_BACKENDS: [Backend; 3] = [Backend::Tract, Backend::Ort, Backend::Openvino];

/// Every backend a node may have.
pub const ALL_BACKENDS: [Backend; 4] = [
    Backend::Tract,
    Backend::Ort,
    Backend::Openvino,
    Backend::TractCuda,
];

/// A model file to load: what the manifest's `[[graphs]]` entry and the bundle give.
#[derive(Clone, Copy)]
pub struct GraphFile<'a> {
    pub encoding: GraphEncoding,
    pub bytes: &'a [u8],
    /// OpenVINO IR: the weights beside the XML.
    pub weights: Option<&'a [u8]>,
    /// The manifest's `[[graphs]] shapes`.
    pub shapes: &'a BTreeMap<String, Vec<i64>>,
    /// The manifest's `[resources] threads`: threads per request in the native backends (0: 1).
    pub threads: u32,
}

impl<'a> GraphFile<'a> {
    /// An ONNX file with its input shapes.
    pub fn onnx(bytes: &'a [u8], shapes: &'a BTreeMap<String, Vec<i64>>) -> GraphFile<'a> {
        GraphFile {
            encoding: GraphEncoding::Onnx,
            bytes,
            weights: None,
            shapes,
            threads: 0,
        }
    }
}

/// What a node's backends are: each one, and whether it is here (`Err`: why not).
pub fn inventory() -> Vec<(Backend, Result<String, String>)> {
    ALL_BACKENDS.iter().map(|b| (*b, describe(*b))).collect()
}

fn describe(backend: Backend) -> Result<String, String> {
    match backend {
        Backend::Tract => Ok(format!("tract {TRACT_VERSION} (CPU)")),
        // Not `devices_of`: it asks `hardware()`, whose probe calls this (a re-entrant
        // `OnceLock` initialisation hangs the process).
        Backend::Ort => ort_available().map(|path| {
            let cuda =
                ort_providers().is_ok_and(|p| p.iter().any(|p| p == "CUDAExecutionProvider"));
            let on = if cuda { "CPU; CUDA provider" } else { "CPU" };
            format!("onnxruntime ({path}) ({on})")
        }),
        Backend::Openvino => openvino_available().map(|(path, version, devices)| {
            format!("openvino {version} ({path}) ({})", devices.join(", "))
        }),
        Backend::TractCuda => tract::cuda().map(|_| format!("tract {TRACT_VERSION} (CUDA)")),
    }
}

/// The devices a backend can run graphs on here (none: the backend is absent).
pub fn devices_of(backend: Backend) -> Vec<Device> {
    match backend {
        Backend::Tract => vec![Device::Cpu],
        Backend::Ort if ort_available().is_ok() => {
            let cuda =
                ort_providers().is_ok_and(|p| p.iter().any(|p| p == "CUDAExecutionProvider"));
            if cuda && !crate::hardware::hardware().gpus.is_empty() {
                vec![Device::Cpu, Device::Gpu]
            } else {
                vec![Device::Cpu]
            }
        }
        Backend::Openvino => openvino_available()
            .map(|(_, _, devices)| {
                let mut kinds: Vec<Device> =
                    devices.iter().filter_map(|d| device_kind(d)).collect();
                kinds.dedup();
                kinds
            })
            .unwrap_or_default(),
        Backend::TractCuda if tract::cuda().is_ok() => vec![Device::Gpu],
        _ => Vec::new(),
    }
}

/// The device names a backend has (OpenVINO's `CPU`, `GPU.0`, `NPU`), where it is here.
pub fn devices_named(backend: Backend) -> Option<Vec<String>> {
    match backend {
        Backend::Openvino => openvino_available().ok().map(|(_, _, d)| d),
        _ => None,
    }
}

/// ONNX Runtime's execution providers that can run here (`CPUExecutionProvider`, and
/// `CUDAExecutionProvider` and `TensorrtExecutionProvider` where the library has them), or why
/// ONNX Runtime is absent.
pub fn ort_providers() -> Result<Vec<String>, String> {
    ort_available()?;
    #[cfg(feature = "ort")]
    return Ok(ort::providers());
    #[cfg(not(feature = "ort"))]
    Ok(Vec::new())
}

/// The kind of an OpenVINO device name (`CPU`, `GPU.0`, `NPU`).
fn device_kind(name: &str) -> Option<Device> {
    match name.split('.').next()? {
        "CPU" => Some(Device::Cpu),
        "GPU" => Some(Device::Gpu),
        "NPU" => Some(Device::Npu),
        _ => None,
    }
}

/// The tract release the node is built with.
const TRACT_VERSION: &str = "0.23";

#[cfg(feature = "ort")]
fn ort_available() -> Result<String, String> {
    ort::available().map(|path| path.display().to_string())
}

#[cfg(not(feature = "ort"))]
fn ort_available() -> Result<String, String> {
    Err("this sophon was built without the `ort` feature".to_string())
}

#[cfg(feature = "openvino")]
fn openvino_available() -> Result<(String, String, Vec<String>), String> {
    openvino::available()
        .map(|(path, version, devices)| (path.display().to_string(), version, devices))
}

#[cfg(not(feature = "openvino"))]
fn openvino_available() -> Result<(String, String, Vec<String>), String> {
    Err("this sophon was built without the `openvino` feature".to_string())
}

/// The inputs and outputs of an OpenVINO IR model, as OpenVINO reads them.
pub fn openvino_model_io(
    xml: &[u8],
    weights: &[u8],
) -> Result<(Vec<sophon_sdk::TensorSpec>, Vec<sophon_sdk::TensorSpec>), String> {
    #[cfg(feature = "openvino")]
    return openvino::model_io(xml, weights);
    #[cfg(not(feature = "openvino"))]
    {
        let _ = (xml, weights);
        Err(openvino_available().unwrap_err())
    }
}

/// Load a graph on one backend and device. Also says how it runs.
fn load_on(
    backend: Backend,
    device: Device,
    file: &GraphFile<'_>,
) -> Result<(Graph, String), String> {
    use wasmtime_wasi_nn::backend::BackendGraph;
    let boxed = |g: Box<dyn BackendGraph>| Graph::from(g);
    if file.encoding == GraphEncoding::Openvino && backend != Backend::Openvino {
        return Err("it reads ONNX, not OpenVINO IR".to_string());
    }
    match backend {
        Backend::Tract | Backend::TractCuda => {
            let (device, on) = match backend {
                Backend::TractCuda => (tract::Device::Cuda, "tract on CUDA"),
                _ => (tract::Device::Cpu, "tract on CPU"),
            };
            let graph = tract::TractGraph::from_onnx_on(file.bytes, file.shapes, device)
                .map_err(|e| format!("{e:#}"))?;
            let how = match graph.per_shape() {
                None => format!("{on}, one plan for every input shape"),
                Some(why) => format!(
                    "{on}, a plan per set of input shapes (made on first use; pin shapes with \
                     `sophon pack --shape` to avoid it), because: {why}"
                ),
            };
            Ok((boxed(Box::new(graph)), how))
        }
        #[cfg(feature = "ort")]
        Backend::Ort => {
            let (gpu, on) = match device {
                Device::Cpu => (false, "onnxruntime on CPU"),
                Device::Gpu => (true, "onnxruntime on CUDA"),
                Device::Npu => return Err("no NPU execution provider here".to_string()),
            };
            let threads = file.threads.max(1);
            let graph = ort::OrtGraph::from_onnx_on(file.bytes, gpu, threads)?;
            let how = format!("{on}, {threads} intra-op thread(s) per request");
            Ok((boxed(Box::new(graph)), how))
        }
        #[cfg(not(feature = "ort"))]
        Backend::Ort => Err(ort_available().unwrap_err()),
        #[cfg(feature = "openvino")]
        Backend::Openvino => {
            let name = openvino::device_for(device).ok_or_else(|| match openvino_available() {
                Err(why) => why,
                Ok((_, _, devices)) => {
                    format!("no {device:?} device (it has {})", devices.join(", "))
                }
            })?;
            let threads = file.threads.max(1);
            let graph =
                openvino::OvGraph::load(file.bytes, file.weights, file.shapes, &name, threads)?;
            let how = match name.as_str() {
                "CPU" => format!("openvino on CPU, {threads} thread(s) per request"),
                _ => format!("openvino on {name}"),
            };
            Ok((boxed(Box::new(graph)), how))
        }
        #[cfg(not(feature = "openvino"))]
        Backend::Openvino => Err(openvino_available().unwrap_err()),
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
