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

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use ort::environment::Environment;
use ort::memory::Allocator;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynTensor, DynTensorValueType, TensorElementType, ValueType};
use wasmtime_wasi_nn::backend::{BackendError, BackendGraph};
use wasmtime_wasi_nn::wit::TensorType;

use super::native::{
    NativeContext, NativeGraph, NativeInput, Pool, invalid, invalid_input, output_tensor,
};

/// Most idle sessions kept per graph.
const POOL_CAPACITY: usize = 64;

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
            tracing::debug!(library = %path.display(), "ONNX Runtime loaded");
            Ok((env, path))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// NVIDIA's Python wheels (`pip install onnxruntime-gpu[cuda,cudnn]`) put the CUDA libraries the
/// CUDA provider links (cudart, cuBLAS, cuRAND, cuFFT, NVRTC, cuDNN) in
/// `site-packages/nvidia/*/lib`, where the dynamic loader does not look; Python's onnxruntime
/// loads them first (`preload_dlls`), and so does the node, from beside the library it found,
/// before the first CUDA session. Where they are absent (a system CUDA, as on most GPU
/// machines), nothing is loaded and the loader's own search applies.
#[allow(unsafe_code)]
fn preload_cuda_wheels() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let Ok((_, library)) = runtime() else {
            return;
        };
        // site-packages/onnxruntime/capi/libonnxruntime.so.N → site-packages/nvidia; only in
        // that layout (a library the operator put elsewhere brings no wheels beside it).
        let named = |p: &std::path::Path, name: &str| p.file_name().is_some_and(|n| n == name);
        let Some(nvidia) = library
            .parent()
            .filter(|capi| named(capi, "capi"))
            .and_then(|capi| capi.parent())
            .filter(|package| named(package, "onnxruntime"))
            .and_then(|package| package.parent())
            .map(|site| site.join("nvidia"))
        else {
            return;
        };
        // CUDA 13's wheels share `nvidia/cu13/lib`; CUDA 12's and cuDNN's have a folder each.
        let Ok(packages) = std::fs::read_dir(&nvidia) else {
            return;
        };
        let mut files: Vec<PathBuf> = packages
            .filter_map(|p| std::fs::read_dir(p.ok()?.path().join("lib")).ok())
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.contains(".so."))
            })
            .collect();
        // In the order they link one another; libcudnn.so.9 before the parts it opens by name.
        let order = [
            "libcudart.so",
            "libnvrtc",
            "libcublasLt.so",
            "libcublas.so",
            "libcurand.so",
            "libcufft.so",
            "libcudnn.so",
            "libcudnn_",
        ];
        let rank = |p: &PathBuf| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            order.iter().position(|prefix| name.starts_with(prefix))
        };
        files.retain(|p| rank(p).is_some());
        files.sort_by_key(|p| (rank(p), p.clone()));
        for file in files {
            // SAFETY: loading a shared library runs its initialisers; these are NVIDIA's
            // runtime libraries from the same installation as the ONNX Runtime the node
            // already loaded, opened as the CUDA provider would open them.
            let opened = unsafe {
                libloading::os::unix::Library::open(
                    Some(&file),
                    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                )
            };
            match opened {
                // Kept loaded for the life of the process, as the provider needs them.
                Ok(lib) => {
                    tracing::debug!(library = %file.display(), "CUDA library preloaded");
                    std::mem::forget(lib);
                }
                Err(e) => tracing::debug!(library = %file.display(), "not preloaded: {e}"),
            }
        }
    });
}

/// Whether this node can run graphs on ONNX Runtime: the library's path, or why not.
pub fn available() -> Result<PathBuf, String> {
    runtime().map(|(_, path)| path.clone())
}

/// `libonnxruntime`: `ORT_DYLIB_PATH`, else the onnxruntime wheel where Python keeps it.
fn find_library() -> Result<PathBuf, String> {
    super::native::Wheel {
        env: "ORT_DYLIB_PATH",
        dir: &["onnxruntime", "capi"],
        prefix: "libonnxruntime.so",
        install: "pip install onnxruntime",
    }
    .find()
}

struct Inner {
    bytes: Vec<u8>,
    /// Sessions run on CUDA (else on the CPU).
    gpu: bool,
    /// Intra-op threads of each session.
    threads: u32,
    sessions: Pool<Session>,
    inputs: Vec<NativeInput>,
    types: Vec<TensorElementType>,
    outputs: Vec<String>,
}

/// A loaded ONNX graph on ONNX Runtime: its pool of sessions.
#[derive(Clone)]
pub struct OrtGraph(Arc<Inner>);

fn new_session(bytes: &[u8], gpu: bool, threads: u32) -> ort::Result<Session> {
    let (env, _) = runtime().map_err(ort::Error::new)?;
    // All graph optimisations are on by default (and `Level3` means another level on older
    // libraries, which refuse it).
    let mut builder = Session::builder(env)?
        .with_intra_threads(threads.max(1) as usize)?
        .with_inter_threads(1)?;
    if gpu {
        preload_cuda_wheels();
        // TensorRT first where the library has it, then CUDA; failing to register either is
        // an error here, not a quiet fall back to the CPU.
        use ort::ep::ExecutionProvider as _;
        let mut providers = Vec::new();
        if ort::ep::TensorRT::is_available().unwrap_or(false) {
            providers.push(ort::ep::TensorRT::default().build());
        }
        // cuDNN picks each convolution's algorithm by its heuristics, not by timing every one
        // (ONNX Runtime's default): the timing runs again for each new input shape, in the
        // request that brings it, and a batching model sees a new batch size in almost every
        // call at first (measured on an H200: SqueezeNet batched at concurrency 8 served 11
        // requests/s, each call ~1 s, until every size had been seen by every session).
        providers.push(
            ort::ep::CUDA::default()
                .with_conv_algorithm_search(ort::ep::cuda::ConvAlgorithmSearch::Heuristic)
                .build()
                .error_on_failure(),
        );
        builder = builder.with_execution_providers(providers)?;
    }
    builder.commit_from_memory(bytes)
}

/// The execution providers this ONNX Runtime library can run.
pub fn providers() -> Vec<String> {
    use ort::ep::ExecutionProvider as _;
    let mut found = vec!["CPUExecutionProvider".to_string()];
    if ort::ep::CUDA::is_available().unwrap_or(false) {
        found.push("CUDAExecutionProvider".to_string());
    }
    if ort::ep::TensorRT::is_available().unwrap_or(false) {
        found.push("TensorrtExecutionProvider".to_string());
    }
    found
}

impl OrtGraph {
    /// Load an ONNX model, on CUDA where `gpu` (the first session is made now, so a graph ONNX
    /// Runtime cannot run is refused here, not at the first request).
    pub fn from_onnx_on(bytes: &[u8], gpu: bool, threads: u32) -> Result<OrtGraph, String> {
        runtime()?;
        let session = new_session(bytes, gpu, threads).map_err(|e| format!("onnxruntime: {e}"))?;
        let mut inputs = Vec::new();
        let mut types = Vec::new();
        for input in session.inputs() {
            match input.dtype() {
                ValueType::Tensor { ty, .. } => {
                    let (carrier, width) = carrier_of(*ty).ok_or_else(|| {
                        format!(
                            "onnxruntime: input `{}` is {ty:?}, which wasi-nn cannot carry",
                            input.name()
                        )
                    })?;
                    inputs.push(NativeInput {
                        name: input.name().to_string(),
                        carrier,
                        width,
                        boolean: *ty == TensorElementType::Bool,
                        ty: format!("{ty:?}"),
                    });
                    types.push(*ty);
                }
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
            gpu,
            threads,
            sessions: Pool::new(session, POOL_CAPACITY),
            inputs,
            types,
            outputs,
        })))
    }

    fn session(&self) -> Result<Session, BackendError> {
        self.0
            .sessions
            .take(|| new_session(&self.0.bytes, self.0.gpu, self.0.threads))
            .map_err(|e| invalid(format!("onnxruntime: {e}")))
    }
}

impl BackendGraph for OrtGraph {
    fn init_execution_context(&self) -> Result<wasmtime_wasi_nn::ExecutionContext, BackendError> {
        NativeContext::boxed(self.clone())
    }
}

/// The wasi-nn carrier of an ONNX Runtime element type (same width), and the width.
/// A tensor on ONNX Runtime's CPU allocator (which recycles its memory, so a large input does
/// not fault in fresh pages for every request), left as allocated: `DynTensor::new` zeroes it
/// first, a pass over every input that staging overwrites at once (7 % of a node's time serving
/// 600 KB images, in a profile).
#[allow(unsafe_code)]
fn unfilled(ty: TensorElementType, shape: &[i64]) -> Result<DynTensor, String> {
    use ort::AsPointer as _;
    let allocator = Allocator::default();
    let mut value: *mut ort::sys::OrtValue = std::ptr::null_mut();
    // SAFETY: the allocator and the shape outlive the call, and `value` receives an owned
    // OrtValue (or stays null on an error status), which `from_ptr` takes over with the
    // allocator that made it.
    unsafe {
        let status = (ort::api().CreateTensorAsOrtValue)(
            allocator.ptr().cast_mut(),
            shape.as_ptr(),
            shape.len(),
            ty.into(),
            &mut value,
        );
        ort::Error::result_from_status(status).map_err(|e| e.to_string())?;
        let value = std::ptr::NonNull::new(value).ok_or("onnxruntime made no tensor")?;
        Ok(DynTensor::from_ptr(value, Some(&allocator)))
    }
}

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

impl NativeGraph for OrtGraph {
    type Staged = DynTensor;
    const LIBRARY: &'static str = "onnxruntime";

    fn inputs(&self) -> &[NativeInput] {
        &self.0.inputs
    }

    #[allow(unsafe_code)]
    fn stage(&self, ix: usize, shape: &[u32], data: &[u8]) -> Result<DynTensor, String> {
        let shape: Vec<i64> = shape.iter().map(|d| i64::from(*d)).collect();
        let mut value = if data.is_empty() {
            DynTensor::new(&Allocator::default(), self.0.types[ix], shape)
                .map_err(|e| e.to_string())?
        } else {
            unfilled(self.0.types[ix], &shape)?
        };
        if !data.is_empty() {
            // SAFETY: the tensor was made on the CPU allocator for the checked element count
            // and width, exactly `data.len()` bytes; every byte pattern is a valid value of the
            // plain numeric types, and BOOL bytes were checked to be 0 or 1.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    value.data_ptr_mut().cast::<u8>(),
                    data.len(),
                );
            }
        }
        Ok(value)
    }

    #[allow(unsafe_code)]
    fn run(
        &self,
        inputs: Vec<DynTensor>,
    ) -> Result<Vec<(String, wasmtime_wasi_nn::Tensor)>, BackendError> {
        let values: Vec<(String, SessionInputValue<'_>)> = self
            .0
            .inputs
            .iter()
            .zip(inputs)
            .map(|(input, tensor)| (input.name.clone(), tensor.into()))
            .collect();
        // A session that panics mid-run unwinds out of here and is not reused.
        let mut session = self.session()?;
        let ran = (|| {
            let outputs = session.run(values).map_err(|e| {
                // Every input passed the manifest's checks; what ONNX Runtime still refuses
                // (shapes its graph cannot take) is the request's.
                invalid_input(format!("onnxruntime: {e}"))
            })?;
            let mut copied = Vec::with_capacity(self.0.outputs.len());
            for name in &self.0.outputs {
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
                let count = tensor
                    .shape()
                    .iter()
                    .map(|d| *d as usize)
                    .product::<usize>();
                let len = count * width;
                let data: &[u8] = if len == 0 {
                    &[]
                } else {
                    // SAFETY: ONNX Runtime holds `count` elements of `width` bytes at this
                    // CPU address for as long as `outputs` lives, which outlives this copy.
                    unsafe { std::slice::from_raw_parts(tensor.data_ptr().cast::<u8>(), len) }
                };
                copied.push((
                    name.clone(),
                    output_tensor(name, tensor.shape(), carrier, data)?,
                ));
            }
            Ok(copied)
        })();
        self.0.sessions.give_back(session);
        ran
    }
}
