//! The ONNX Runtime backend: ONNX models run by `libonnxruntime`, loaded at run time.
//!
//! The library is found once per process: `ORT_DYLIB_PATH`, else the `onnxruntime` Python
//! wheel in a virtual environment (`$VIRTUAL_ENV`, or a `.venv` in the working directory or
//! one above it) or in a system site-packages. Without it the backend is absent, with the
//! reason, and the node runs on tract alone.
//!
//! Sessions: ONNX Runtime documents `Run` as safe to call from several threads on one session,
//! but the `ort` crate's authors have seen crashes and corruption doing so and make `run` take
//! `&mut`. So a graph keeps a pool of sessions, made on demand up to the requests that run at
//! once, each run on one session alone; the pool's lock is held only to take or give one back.
//! Each session runs on one intra-op thread: requests run in parallel across sessions.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ort::environment::Environment;
use ort::memory::Allocator;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynTensor, DynTensorValueType, TensorElementType, ValueType};
use parking_lot::Mutex;
use wasmtime_wasi_nn::backend::{
    BackendError, BackendExecutionContext, BackendGraph, Id, NamedTensor,
};
use wasmtime_wasi_nn::wit::TensorType;

use super::memory::{self, Held};

/// Most idle sessions kept per graph.
const POOL_CAPACITY: usize = 64;

/// What a context is charged for the session it runs on, besides its tensors.
const SESSION_BYTES: usize = 256 << 10;

static RUNTIME: OnceLock<Result<(Environment, PathBuf), String>> = OnceLock::new();

/// ONNX Runtime's environment and the library it came from, or why there is none.
fn runtime() -> Result<&'static (Environment, PathBuf), String> {
    RUNTIME
        .get_or_init(|| {
            let path = find_library()?;
            let builder = ort::init_from(&path)
                .map_err(|e| format!("{} did not load: {e}", path.display()))?;
            let env = builder
                .with_name("sophon")
                .build()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            tracing::info!(library = %path.display(), "ONNX Runtime loaded");
            Ok((env, path))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Whether this node can run graphs on ONNX Runtime: the library's path, or why not.
pub fn available() -> Result<PathBuf, String> {
    runtime().map(|(_, path)| path.clone())
}

/// `libonnxruntime`: `ORT_DYLIB_PATH`, else the onnxruntime wheel where Python keeps it.
fn find_library() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "ORT_DYLIB_PATH={} is not a file: point it at libonnxruntime.so",
                path.display()
            ))
        };
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        roots.push(PathBuf::from(venv).join("lib"));
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(|d| d.join(".venv").join("lib")));
    }
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(home).join(".local").join("lib"));
    }
    roots.push(PathBuf::from("/usr/local/lib"));
    roots.push(PathBuf::from("/usr/lib"));
    for root in &roots {
        if let Some(found) = in_site_packages(root) {
            return Ok(found);
        }
    }
    Err(
        "no libonnxruntime found: set ORT_DYLIB_PATH, or pip install onnxruntime (in a virtual \
         environment: activate it, or run from the directory that holds its .venv)"
            .to_string(),
    )
}

/// `<root>/python3*/{site,dist}-packages/onnxruntime/capi/libonnxruntime.so*`.
fn in_site_packages(root: &Path) -> Option<PathBuf> {
    let pythons = std::fs::read_dir(root).ok()?;
    for python in pythons.flatten() {
        if !python.file_name().to_string_lossy().starts_with("python3") {
            continue;
        }
        for packages in ["site-packages", "dist-packages"] {
            let capi = python
                .path()
                .join(packages)
                .join("onnxruntime")
                .join("capi");
            let Ok(files) = std::fs::read_dir(&capi) else {
                continue;
            };
            let mut libs: Vec<PathBuf> = files
                .flatten()
                .map(|f| f.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so"))
                })
                .collect();
            libs.sort();
            if let Some(lib) = libs.pop() {
                return Some(lib);
            }
        }
    }
    None
}

struct Inner {
    bytes: Vec<u8>,
    sessions: Mutex<Vec<Session>>,
    inputs: Vec<(String, TensorElementType)>,
    outputs: Vec<String>,
}

/// A loaded ONNX graph on ONNX Runtime: its pool of sessions.
#[derive(Clone)]
pub struct OrtGraph(Arc<Inner>);

fn new_session(bytes: &[u8]) -> ort::Result<Session> {
    let (env, _) = runtime().map_err(ort::Error::new)?;
    // All graph optimisations are on by default (and `Level3` means another level on older
    // libraries, which refuse it).
    Session::builder(env)?
        .with_intra_threads(1)?
        .with_inter_threads(1)?
        .commit_from_memory(bytes)
}

impl OrtGraph {
    /// Load an ONNX model (the first session is made now, so a graph ONNX Runtime cannot run
    /// is refused here, not at the first request).
    pub fn from_onnx(bytes: &[u8]) -> Result<OrtGraph, String> {
        runtime()?;
        let session = new_session(bytes).map_err(|e| format!("onnxruntime: {e}"))?;
        let mut inputs = Vec::new();
        for input in session.inputs() {
            match input.dtype() {
                ValueType::Tensor { ty, .. } => inputs.push((input.name().to_string(), *ty)),
                other => {
                    return Err(format!(
                        "onnxruntime: input `{}` is {other}, not a tensor",
                        input.name()
                    ));
                }
            }
        }
        let outputs = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        Ok(OrtGraph(Arc::new(Inner {
            bytes: bytes.to_vec(),
            sessions: Mutex::new(vec![session]),
            inputs,
            outputs,
        })))
    }

    fn session(&self) -> Result<Session, BackendError> {
        let pooled = self.0.sessions.lock().pop();
        match pooled {
            Some(session) => Ok(session),
            None => new_session(&self.0.bytes).map_err(|e| invalid(format!("onnxruntime: {e}"))),
        }
    }

    fn give_back(&self, session: Session) {
        let mut pool = self.0.sessions.lock();
        if pool.len() < POOL_CAPACITY {
            pool.push(session);
        }
    }

    /// A new execution context.
    pub fn context(&self) -> Result<OrtContext, memory::Exceeded> {
        let mut held = Held::new();
        held.charge(SESSION_BYTES, "a wasi-nn execution context")?;
        Ok(OrtContext {
            graph: self.clone(),
            staged: (0..self.0.inputs.len()).map(|_| None).collect(),
            outputs: Vec::new(),
            held,
        })
    }
}

impl BackendGraph for OrtGraph {
    fn init_execution_context(&self) -> Result<wasmtime_wasi_nn::ExecutionContext, BackendError> {
        let ctx = self.context().map_err(|e| invalid(e.to_string()))?;
        Ok(wasmtime_wasi_nn::ExecutionContext::from(
            Box::new(ctx) as Box<dyn BackendExecutionContext>
        ))
    }
}

/// One execution context: staged inputs (as ONNX Runtime tensors) and the outputs it keeps.
pub struct OrtContext {
    graph: OrtGraph,
    staged: Vec<Option<(DynTensor, usize)>>,
    outputs: Vec<(String, wasmtime_wasi_nn::Tensor)>,
    held: Held,
}

/// The wasi-nn carrier of an ONNX Runtime element type (same width), and the width.
fn carrier_of(ty: TensorElementType) -> Option<(TensorType, usize)> {
    use TensorElementType as T;
    Some(match ty {
        T::Float16 | T::Bfloat16 | T::Int16 | T::Uint16 => (TensorType::Fp16, 2),
        T::Float32 => (TensorType::Fp32, 4),
        T::Float64 => (TensorType::Fp64, 8),
        T::Uint8 | T::Int8 | T::Bool => (TensorType::U8, 1),
        T::Int32 | T::Uint32 => (TensorType::I32, 4),
        T::Int64 | T::Uint64 => (TensorType::I64, 8),
        _ => return None,
    })
}

impl OrtContext {
    fn input_index(&self, id: &Id) -> Result<usize, BackendError> {
        let inputs = &self.graph.0.inputs;
        match id {
            Id::Index(i) if (*i as usize) < inputs.len() => Ok(*i as usize),
            Id::Name(n) => inputs.iter().position(|(x, _)| x == n).ok_or_else(|| {
                let names: Vec<&str> = inputs.iter().map(|(n, _)| n.as_str()).collect();
                invalid(format!(
                    "the graph has no input `{n}`; its inputs are {names:?}"
                ))
            }),
            Id::Index(i) => Err(invalid(format!("the graph has no input #{i}"))),
        }
    }

    #[allow(unsafe_code)]
    fn run(&mut self) -> Result<(), BackendError> {
        let graph = self.graph.clone();
        let mut values: Vec<(String, SessionInputValue<'_>)> = Vec::new();
        let mut staged_bytes = 0;
        for (ix, slot) in self.staged.iter_mut().enumerate() {
            let name = &graph.0.inputs[ix].0;
            let (tensor, bytes) = slot
                .take()
                .ok_or_else(|| invalid(format!("input `{name}` was not given")))?;
            staged_bytes += bytes;
            values.push((name.clone(), tensor.into()));
        }
        self.held.release(staged_bytes);
        let mut session = graph.session()?;
        let ran = super::catch_panic("onnxruntime", || -> Result<_, BackendError> {
            let outputs = session.run(values).map_err(|e| {
                // Every input passed the manifest's checks; what ONNX Runtime still refuses
                // (shapes its graph cannot take) is the request's.
                invalid_input(format!("onnxruntime: {e}"))
            })?;
            let mut copied = Vec::with_capacity(graph.0.outputs.len());
            for name in &graph.0.outputs {
                let value = outputs
                    .get(name.as_str())
                    .ok_or_else(|| invalid(format!("onnxruntime gave no output `{name}`")))?;
                let tensor = value
                    .view()
                    .downcast::<DynTensorValueType>()
                    .map_err(|e| invalid(format!("output `{name}`: {e}")))?;
                let ty = *tensor.data_type();
                let (carrier, width) = carrier_of(ty).ok_or_else(|| {
                    BackendError::UnsupportedTensorType(format!(
                        "output `{name}` is {ty:?}, which wasi-nn cannot carry"
                    ))
                })?;
                let shape: Vec<u32> = tensor
                    .shape()
                    .iter()
                    .map(|d| u32::try_from(*d))
                    .collect::<Result<_, _>>()
                    .map_err(|_| invalid(format!("output `{name}` has a dimension over u32")))?;
                let count = shape.iter().map(|d| *d as usize).product::<usize>();
                let len = count * width;
                let data = if len == 0 {
                    Vec::new()
                } else {
                    // SAFETY: ONNX Runtime holds `count` elements of `width` bytes at this
                    // CPU address for as long as `outputs` lives, which outlives this copy.
                    unsafe {
                        std::slice::from_raw_parts(tensor.data_ptr().cast::<u8>(), len).to_vec()
                    }
                };
                copied.push((
                    name.clone(),
                    wasmtime_wasi_nn::Tensor::new(shape, carrier, data),
                ));
            }
            Ok(copied)
        });
        let outputs = match ran {
            Ok(Ok(outputs)) => {
                graph.give_back(session);
                outputs
            }
            Ok(Err(e)) => {
                graph.give_back(session);
                return Err(e);
            }
            // A session that panicked mid-run is not reused.
            Err(panicked) => return Err(invalid(panicked)),
        };
        let kept: usize = outputs.iter().map(|(_, t)| t.data.len()).sum();
        self.held
            .charge(kept, "wasi-nn outputs")
            .map_err(over_limit)?;
        self.outputs = outputs;
        Ok(())
    }
}

impl BackendExecutionContext for OrtContext {
    #[allow(unsafe_code)]
    fn set_input(&mut self, id: Id, tensor: &wasmtime_wasi_nn::Tensor) -> Result<(), BackendError> {
        let ix = self.input_index(&id)?;
        let (name, ty) = self.graph.0.inputs[ix].clone();
        let (carrier, width) = carrier_of(ty).ok_or_else(|| {
            BackendError::UnsupportedTensorType(format!(
                "input `{name}` of the graph is {ty:?}, which wasi-nn cannot carry"
            ))
        })?;
        if tensor.ty != carrier {
            return Err(invalid(format!(
                "input `{name}` is {:?} but the graph expects {ty:?}",
                tensor.ty
            )));
        }
        let shape: Vec<i64> = tensor.dimensions.iter().map(|d| i64::from(*d)).collect();
        let count = tensor
            .dimensions
            .iter()
            .try_fold(1usize, |acc, d| acc.checked_mul(*d as usize))
            .ok_or_else(|| invalid(format!("input `{name}` has too many elements")))?;
        if count.checked_mul(width) != Some(tensor.data.len()) {
            return Err(invalid(format!(
                "input `{name}` has {} bytes; shape {shape:?} of {ty:?} needs {}",
                tensor.data.len(),
                count.saturating_mul(width)
            )));
        }
        if ty == TensorElementType::Bool && tensor.data.iter().any(|b| *b > 1) {
            return Err(invalid(format!(
                "input `{name}` is BOOL but holds a byte other than 0 or 1"
            )));
        }
        self.held
            .charge(tensor.data.len(), "wasi-nn inputs")
            .map_err(over_limit)?;
        let made = DynTensor::new(&Allocator::default(), ty, shape)
            .map_err(|e| invalid(format!("input `{name}`: onnxruntime: {e}")));
        let mut value = match made {
            Ok(value) => value,
            Err(e) => {
                self.held.release(tensor.data.len());
                return Err(e);
            }
        };
        if !tensor.data.is_empty() {
            // SAFETY: the tensor was made on the CPU allocator for `count` elements of `width`
            // bytes, exactly `tensor.data.len()`; every byte pattern is a valid value of the
            // plain numeric types, and BOOL bytes were checked to be 0 or 1 above.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    tensor.data.as_ptr(),
                    value.data_ptr_mut().cast::<u8>(),
                    tensor.data.len(),
                );
            }
        }
        if let Some((_, old)) = self.staged[ix].replace((value, tensor.data.len())) {
            self.held.release(old);
        }
        Ok(())
    }

    fn compute(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
    ) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        let named = inputs.is_some();
        for input in inputs.into_iter().flatten() {
            self.set_input(Id::Name(input.name), &input.tensor)?;
        }
        self.run()?;
        if !named {
            return Ok(None);
        }
        let outputs = std::mem::take(&mut self.outputs);
        let moved: usize = outputs.iter().map(|(_, t)| t.data.len()).sum();
        self.held.release(moved);
        memory::charge_call(moved, "wasi-nn outputs").map_err(over_limit)?;
        Ok(Some(
            outputs
                .into_iter()
                .map(|(name, tensor)| NamedTensor { name, tensor })
                .collect(),
        ))
    }

    fn get_output(&mut self, id: Id) -> Result<wasmtime_wasi_nn::Tensor, BackendError> {
        let found = match &id {
            Id::Index(i) => self.outputs.get(*i as usize),
            Id::Name(n) => self.outputs.iter().find(|(name, _)| name == n),
        };
        let (_, tensor) = found.ok_or_else(|| invalid(format!("no output {id:?}")))?;
        memory::charge_call(tensor.data.len(), "wasi-nn outputs").map_err(over_limit)?;
        Ok(tensor.clone())
    }
}

fn over_limit(e: memory::Exceeded) -> BackendError {
    invalid(e.to_string())
}

fn invalid(message: String) -> BackendError {
    super::remember_error(&message, false);
    BackendError::BackendAccess(wasmtime::format_err!("{message}"))
}

fn invalid_input(message: String) -> BackendError {
    super::remember_error(&message, true);
    BackendError::BackendAccess(wasmtime::format_err!("{message}"))
}
