//! The OpenVINO backend: ONNX models and OpenVINO IR run by `libopenvino`, loaded at run time,
//! on the Intel devices it finds (CPU, and GPU and NPU where their drivers are present).
//!
//! The library is found once per process: `OPENVINO_DYLIB_PATH` (the `libopenvino_c.so` file),
//! else the `openvino` Python wheel (`site-packages/openvino/libs`), else a system installation
//! that `openvino-finder` knows (`INTEL_OPENVINO_DIR`, `/opt/intel/openvino`). Without it the
//! backend is absent, with the reason, and the node runs on its other backends.
//!
//! Requests: a graph is compiled once per device; each request runs on an infer request taken
//! from the graph's pool (made on demand, kept up to [`POOL_CAPACITY`]). On the CPU the compiled
//! model has one stream per core of one thread each, so requests run in parallel as on ONNX
//! Runtime, and it computes in f32 (OpenVINO would otherwise pick bf16 on CPUs that have it,
//! which changes results in the third decimal).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use openvino::{
    CompiledModel, Core, DeviceType, Dimension, ElementType, InferRequest, PartialShape,
    RwPropertyKey, Shape, Tensor,
};
use parking_lot::Mutex;
use wasmtime_wasi_nn::backend::{BackendError, BackendGraph};
use wasmtime_wasi_nn::wit::TensorType;

use super::native::{
    NativeContext, NativeGraph, NativeInput, Pool, invalid, invalid_input, output_tensor,
};

/// Most idle infer requests kept per graph.
const POOL_CAPACITY: usize = 64;

struct Runtime {
    core: Mutex<Core>,
    path: PathBuf,
    version: String,
    devices: Vec<String>,
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

fn runtime() -> Result<&'static Runtime, String> {
    RUNTIME
        .get_or_init(|| {
            let path = find_library()?;
            super::catch_panic("openvino", || open(path))?
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn open(path: PathBuf) -> Result<Runtime, String> {
    openvino_sys::library::load_from(path.clone())
        .map_err(|e| format!("{} did not load: {e}", path.display()))?;
    let core = Core::new().map_err(|e| format!("{}: {e}", path.display()))?;
    let version = openvino::version().build_number;
    let devices = core
        .available_devices()
        .map_err(|e| format!("{}: listing devices: {e}", path.display()))?
        .iter()
        .map(|d| d.to_string())
        .collect();
    tracing::debug!(library = %path.display(), ?devices, "OpenVINO loaded");
    Ok(Runtime {
        core: Mutex::new(core),
        path,
        version,
        devices,
    })
}

/// `libopenvino_c`: `OPENVINO_DYLIB_PATH`, else the openvino wheel, else a system install.
fn find_library() -> Result<PathBuf, String> {
    let wheel = super::native::Wheel {
        env: "OPENVINO_DYLIB_PATH",
        dir: &["openvino", "libs"],
        prefix: "libopenvino_c.so",
        install: "pip install openvino",
    };
    match wheel.find() {
        Ok(path) => Ok(path),
        Err(why) if std::env::var_os(wheel.env).is_some() => Err(why),
        Err(why) => openvino_sys::library::find()
            .filter(|p| p.is_file())
            .ok_or(why),
    }
}

/// Whether this node can run graphs on OpenVINO: the library, its version and its devices
/// (`CPU`, `GPU`, `GPU.1`, `NPU`), or why not.
pub fn available() -> Result<(PathBuf, String, Vec<String>), String> {
    runtime().map(|r| (r.path.clone(), r.version.clone(), r.devices.clone()))
}

/// The OpenVINO device that serves a kind of device, if this node has one.
pub fn device_for(kind: sophon_sdk::Device) -> Option<String> {
    let prefix = match kind {
        sophon_sdk::Device::Cpu => "CPU",
        sophon_sdk::Device::Gpu => "GPU",
        sophon_sdk::Device::Npu => "NPU",
    };
    let runtime = runtime().ok()?;
    runtime
        .devices
        .iter()
        .find(|d| d.as_str() == prefix || d.starts_with(&format!("{prefix}.")))
        .cloned()
}

struct Inner {
    compiled: Mutex<CompiledModel>,
    requests: Pool<InferRequest>,
    inputs: Vec<NativeInput>,
    types: Vec<ElementType>,
    outputs: Vec<String>,
    device: String,
}

/// A graph compiled by OpenVINO for one device, and its pool of infer requests.
#[derive(Clone)]
pub struct OvGraph(Arc<Inner>);

/// The wasi-nn carrier of an OpenVINO element type (same width), and the width.
fn carrier_of(ty: ElementType) -> Option<(TensorType, usize)> {
    use ElementType as E;
    Some(match ty {
        E::F16 | E::Bf16 | E::I16 | E::U16 => (TensorType::Fp16, 2),
        E::F32 => (TensorType::Fp32, 4),
        E::F64 => (TensorType::Fp64, 8),
        E::U8 | E::I8 | E::Boolean => (TensorType::U8, 1),
        E::I32 | E::U32 => (TensorType::I32, 4),
        E::I64 | E::U64 => (TensorType::I64, 8),
        _ => return None,
    })
}

impl OvGraph {
    /// Read a model (ONNX bytes, or OpenVINO IR: the XML with its weights), fix the input
    /// shapes the manifest pins, and compile it for `device` (`CPU`, `GPU`, `NPU`). A graph
    /// OpenVINO cannot compile is refused here, not at the first request.
    pub fn load(
        model: &[u8],
        weights: Option<&[u8]>,
        shapes: &BTreeMap<String, Vec<i64>>,
        device: &str,
        threads: u32,
    ) -> Result<OvGraph, String> {
        let runtime = runtime()?;
        super::catch_panic("openvino", || {
            compile(runtime, model, weights, shapes, device, threads)
        })?
        .map_err(|e| format!("openvino: {e}"))
    }

    /// The OpenVINO device it runs on.
    pub fn device(&self) -> &str {
        &self.0.device
    }

    fn request(&self) -> Result<InferRequest, BackendError> {
        self.0
            .requests
            .take(|| self.0.compiled.lock().create_infer_request())
            .map_err(|e| invalid(format!("openvino: {e}")))
    }
}

/// A tensor of bytes (IR weights, as OpenVINO reads them from memory).
fn bytes_tensor(bytes: &[u8]) -> Result<Tensor, String> {
    let shape = Shape::new(&[bytes.len() as i64]).map_err(|e| e.to_string())?;
    let mut tensor = Tensor::new(ElementType::U8, &shape).map_err(|e| e.to_string())?;
    if !bytes.is_empty() {
        tensor
            .get_raw_data_mut()
            .map_err(|e| e.to_string())?
            .copy_from_slice(bytes);
    }
    Ok(tensor)
}

fn compile(
    runtime: &Runtime,
    model: &[u8],
    weights: Option<&[u8]>,
    shapes: &BTreeMap<String, Vec<i64>>,
    device: &str,
    threads: u32,
) -> Result<OvGraph, String> {
    let weights = weights.map(bytes_tensor).transpose()?;
    let mut core = runtime.core.lock();
    let mut read = core
        .read_model_from_buffer(model, weights.as_ref())
        .map_err(|e| format!("reading the model: {e}"))?;
    let mut pinned = Vec::new();
    for (name, dims) in shapes {
        let dims: Vec<Dimension> = dims
            .iter()
            .map(|d| match *d {
                d if d >= 0 => Dimension::new(d, d),
                _ => Dimension::new(-1, -1),
            })
            .collect();
        let shape = PartialShape::new(dims.len() as i64, &dims).map_err(|e| e.to_string())?;
        pinned.push((name.as_str(), shape));
    }
    if !pinned.is_empty() {
        let by_name: Vec<(&str, &PartialShape)> = pinned.iter().map(|(n, s)| (*n, s)).collect();
        read.reshape(&by_name)
            .map_err(|e| format!("setting the input shapes {shapes:?}: {e}"))?;
    }
    let kind = DeviceType::from(device).to_owned();
    if device == "CPU" {
        // `threads` per request: as many streams of that many threads as the cores hold.
        let threads = threads.max(1) as usize;
        let streams = (num_cpus::get().max(1) / threads).max(1);
        let (streams, total) = (streams.to_string(), (streams * threads).to_string());
        for (key, value) in [
            (RwPropertyKey::HintInferencePrecision, "f32"),
            (RwPropertyKey::NumStreams, streams.as_str()),
            (RwPropertyKey::InferenceNumThreads, total.as_str()),
        ] {
            core.set_property(&kind, &key, value)
                .map_err(|e| format!("setting {key:?}={value}: {e}"))?;
        }
    }
    let mut compiled = core
        .compile_model(&read, kind)
        .map_err(|e| format!("compiling for {device}: {e}"))?;
    drop(core);
    let mut inputs = Vec::new();
    let mut types = Vec::new();
    for ix in 0..compiled.get_input_size().map_err(|e| e.to_string())? {
        let node = compiled.get_input_by_index(ix).map_err(|e| e.to_string())?;
        let name = node.get_name().map_err(|e| e.to_string())?;
        let ty = node.get_element_type().map_err(|e| e.to_string())?;
        let (carrier, width) = carrier_of(ty)
            .ok_or_else(|| format!("input `{name}` is {ty:?}, which wasi-nn cannot carry"))?;
        inputs.push(NativeInput {
            name,
            carrier,
            width,
            boolean: ty == ElementType::Boolean,
            ty: format!("{ty}"),
        });
        types.push(ty);
    }
    let mut outputs = Vec::new();
    for ix in 0..compiled.get_output_size().map_err(|e| e.to_string())? {
        let node = compiled
            .get_output_by_index(ix)
            .map_err(|e| e.to_string())?;
        outputs.push(node.get_name().map_err(|e| e.to_string())?);
    }
    let first = compiled
        .create_infer_request()
        .map_err(|e| format!("making an infer request: {e}"))?;
    Ok(OvGraph(Arc::new(Inner {
        compiled: Mutex::new(compiled),
        requests: Pool::new(first, POOL_CAPACITY),
        inputs,
        types,
        outputs,
        device: device.to_string(),
    })))
}

impl BackendGraph for OvGraph {
    fn init_execution_context(&self) -> Result<wasmtime_wasi_nn::ExecutionContext, BackendError> {
        NativeContext::boxed(self.clone())
    }
}

impl NativeGraph for OvGraph {
    type Staged = Tensor;
    const LIBRARY: &'static str = "openvino";

    fn inputs(&self) -> &[NativeInput] {
        &self.0.inputs
    }

    fn stage(&self, ix: usize, shape: &[u32], data: &[u8]) -> Result<Tensor, String> {
        let dims: Vec<i64> = shape.iter().map(|d| i64::from(*d)).collect();
        let shape = Shape::new(&dims).map_err(|e| e.to_string())?;
        let mut tensor = Tensor::new(self.0.types[ix], &shape).map_err(|e| e.to_string())?;
        if !data.is_empty() {
            tensor
                .get_raw_data_mut()
                .map_err(|e| e.to_string())?
                .copy_from_slice(data);
        }
        Ok(tensor)
    }

    fn run(
        &self,
        inputs: Vec<Tensor>,
    ) -> Result<Vec<(String, wasmtime_wasi_nn::Tensor)>, BackendError> {
        // A request that panics mid-run unwinds out of here and is not reused.
        let mut request = self.request()?;
        let ran = (|| {
            for (ix, tensor) in inputs.iter().enumerate() {
                request
                    .set_input_tensor_by_index(ix, tensor)
                    .map_err(|e| invalid_input(format!("openvino: input #{ix}: {e}")))?;
            }
            // Every input passed the manifest's checks; what OpenVINO still refuses (shapes its
            // graph cannot take) is the request's.
            request
                .infer()
                .map_err(|e| invalid_input(format!("openvino: {e}")))?;
            let mut copied = Vec::with_capacity(self.0.outputs.len());
            for (ix, name) in self.0.outputs.iter().enumerate() {
                let tensor = request
                    .get_output_tensor_by_index(ix)
                    .map_err(|e| invalid(format!("openvino: output `{name}`: {e}")))?;
                let ty = tensor
                    .get_element_type()
                    .map_err(|e| invalid(format!("openvino: output `{name}`: {e}")))?;
                let (carrier, _) = carrier_of(ty).ok_or_else(|| {
                    BackendError::UnsupportedTensorType(format!(
                        "output `{name}` is {ty}, which wasi-nn cannot carry"
                    ))
                })?;
                let shape = tensor
                    .get_shape()
                    .map_err(|e| invalid(format!("openvino: output `{name}`: {e}")))?;
                let bytes = tensor
                    .get_byte_size()
                    .map_err(|e| invalid(format!("openvino: output `{name}`: {e}")))?;
                let data: &[u8] = if bytes == 0 {
                    &[]
                } else {
                    tensor
                        .get_raw_data()
                        .map_err(|e| invalid(format!("openvino: output `{name}`: {e}")))?
                };
                copied.push((
                    name.clone(),
                    output_tensor(name, shape.get_dimensions(), carrier, data)?,
                ));
            }
            Ok(copied)
        })();
        self.0.requests.give_back(request);
        ran
    }
}

/// The V2 datatype of an OpenVINO element type.
fn datatype(ty: ElementType) -> Option<sophon_sdk::Datatype> {
    use ElementType as E;
    use sophon_sdk::Datatype as D;
    Some(match ty {
        E::Boolean => D::Bool,
        E::U8 => D::Uint8,
        E::U16 => D::Uint16,
        E::U32 => D::Uint32,
        E::U64 => D::Uint64,
        E::I8 => D::Int8,
        E::I16 => D::Int16,
        E::I32 => D::Int32,
        E::I64 => D::Int64,
        E::F16 => D::Fp16,
        E::F32 => D::Fp32,
        E::F64 => D::Fp64,
        E::Bf16 => D::Bf16,
        _ => return None,
    })
}

/// The inputs and outputs of an OpenVINO IR model (the XML and its weights), as OpenVINO reads
/// them: names, V2 datatypes, and shapes (-1 for a variable dimension).
pub fn model_io(
    xml: &[u8],
    weights: &[u8],
) -> Result<(Vec<sophon_sdk::TensorSpec>, Vec<sophon_sdk::TensorSpec>), String> {
    let runtime = runtime()?;
    super::catch_panic("openvino", || read_io(runtime, xml, weights))?
        .map_err(|e| format!("openvino: {e}"))
}

fn read_io(
    runtime: &Runtime,
    xml: &[u8],
    weights: &[u8],
) -> Result<(Vec<sophon_sdk::TensorSpec>, Vec<sophon_sdk::TensorSpec>), String> {
    let tensor = bytes_tensor(weights)?;
    let model = runtime
        .core
        .lock()
        .read_model_from_buffer(xml, Some(&tensor))
        .map_err(|e| format!("reading the model: {e}"))?;
    let spec = |node: openvino::Node| -> Result<sophon_sdk::TensorSpec, String> {
        let name = node.get_name().map_err(|e| e.to_string())?;
        let ty = node.get_element_type().map_err(|e| e.to_string())?;
        let datatype =
            datatype(ty).ok_or_else(|| format!("`{name}` is {ty}, which V2 cannot carry"))?;
        let shape = node.get_partial_shape().map_err(|e| e.to_string())?;
        if shape.get_rank().is_dynamic() {
            return Err(format!("`{name}` has no fixed rank"));
        }
        let shape = shape
            .get_dimensions()
            .iter()
            .map(|d| if d.is_dynamic() { -1 } else { d.get_min() })
            .collect();
        Ok(sophon_sdk::TensorSpec {
            name,
            datatype,
            shape,
        })
    };
    let mut inputs = Vec::new();
    for ix in 0..model.get_inputs_len().map_err(|e| e.to_string())? {
        inputs.push(spec(
            model.get_input_by_index(ix).map_err(|e| e.to_string())?,
        )?);
    }
    let mut outputs = Vec::new();
    for ix in 0..model.get_outputs_len().map_err(|e| e.to_string())? {
        outputs.push(spec(
            model.get_output_by_index(ix).map_err(|e| e.to_string())?,
        )?);
    }
    Ok((inputs, outputs))
}
