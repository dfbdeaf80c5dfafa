//! The tract backend: ONNX models run by tract, in pure Rust.
//!
//! Loading sets each input's shape from the manifest (`[[graphs]] shapes`: a size fixes a
//! dimension, -1 leaves it variable) or, where the manifest is silent, from the file; a
//! dimension the file leaves unnamed (`?`) becomes a symbol of its own. tract then analyses and
//! optimises the model once into a runnable plan shared by every instance.
//!
//! Some graphs cannot be analysed with variable dimensions (height and width that go through
//! stride arithmetic into a Concat or a Resize, say). For those, the node makes a plan per set
//! of input shapes, the first time a request has them, and keeps the most recent
//! [`SHAPE_PLANS`] of them.
//!
//! Execution states (tract's `SimpleState`, which holds scratch buffers and costs ~100 µs to
//! create) are pooled per plan: a run takes one and gives it back, so a fresh Wasm instance per
//! request does not pay for a fresh execution state. Many runs of one graph go in parallel;
//! nothing here holds a graph-wide lock while computing.

use super::memory::{self, Held};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, GenericFactoid, InferenceFact};
use wasmtime_wasi_nn::backend::{
    BackendError, BackendExecutionContext, BackendFromDir, BackendGraph, BackendInner, Id,
    NamedTensor,
};
use wasmtime_wasi_nn::wit::{ExecutionTarget, GraphEncoding, TensorType};
use wasmtime_wasi_nn::{ExecutionContext, Graph};

/// Most idle execution states kept per plan.
const POOL_CAPACITY: usize = 64;

/// Most plans kept per graph that needs a plan per set of input shapes.
pub const SHAPE_PLANS: usize = 8;

/// What an execution context is charged for its execution state (tract's per-node value and
/// state tables), on top of the inputs it stages and the outputs it keeps.
const STATE_BYTES: usize = 256 << 10;

/// The tract backend, for `wasi:nn/graph.load` with the `onnx` encoding.
#[derive(Default)]
pub struct TractBackend;

impl BackendInner for TractBackend {
    fn encoding(&self) -> GraphEncoding {
        GraphEncoding::Onnx
    }

    fn load(
        &mut self,
        builders: &[&[u8]],
        _target: ExecutionTarget,
    ) -> Result<Graph, BackendError> {
        let [bytes] = builders else {
            return Err(BackendError::InvalidNumberOfBuilders(1, builders.len()));
        };
        let graph = TractGraph::from_onnx(bytes).map_err(backend_error)?;
        Ok(Graph::from(Box::new(graph) as Box<dyn BackendGraph>))
    }

    fn as_dir_loadable(&mut self) -> Option<&mut dyn BackendFromDir> {
        None
    }
}

/// Where tract runs a graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// An NVIDIA GPU, through `tract-cuda` (CUDA loaded at run time, kernels compiled by NVRTC).
    Cuda,
}

/// tract's CUDA runtime, or why this node has none (no driver, a CUDA library missing, or a
/// build without the `cuda` feature).
pub fn cuda() -> Result<&'static dyn Runtime, String> {
    #[cfg(feature = "cuda")]
    {
        // Linked for its runtime registration.
        use tract_cuda as _;
        let rt = tract_onnx::tract_core::runtime::runtime_for_name("cuda")
            .map_err(|e| format!("no CUDA: {e:#}"))?
            .ok_or_else(|| "no CUDA: tract has no cuda runtime".to_string())?;
        rt.check().map_err(|e| format!("no CUDA: {e:#}"))?;
        Ok(rt)
    }
    #[cfg(not(feature = "cuda"))]
    Err("this sophon was built without the `cuda` feature".to_string())
}

/// One runnable plan and its pool of execution states.
struct Plan {
    plan: Box<dyn Runnable>,
    pool: Mutex<Vec<Box<dyn State>>>,
}

impl Plan {
    /// Analyse, optimise and prepare `model` for `device`.
    fn prepare(model: InferenceModel, device: Device) -> TractResult<Arc<Plan>> {
        let plan: Box<dyn Runnable> = match device {
            Device::Cpu => Box::new(model.into_optimized()?.into_runnable()?),
            // The CUDA runtime translates decluttered (not CPU-optimised) operators.
            Device::Cuda => {
                let runtime = cuda().map_err(|e| anyhow::anyhow!(e))?;
                let mut typed = model.into_typed()?.into_decluttered()?;
                single_axis_softmax(&mut typed)?;
                runtime.prepare(typed)?
            }
        };
        Ok(Arc::new(Plan {
            plan,
            pool: Mutex::new(Vec::new()),
        }))
    }

    fn state(&self) -> TractResult<Box<dyn State>> {
        let pooled = self.pool.lock().pop();
        match pooled {
            Some(state) => Ok(state),
            None => self.plan.spawn(),
        }
    }

    fn give_back(&self, state: Box<dyn State>) {
        let mut pool = self.pool.lock();
        if pool.len() < POOL_CAPACITY {
            pool.push(state);
        }
    }
}

/// tract's CUDA runtime takes a softmax over one axis only. An ONNX Softmax before opset 13
/// normalises over every axis from its `axis` on, so a classifier's `[N, 1000, 1, 1]` output
/// (SqueezeNet's, say) becomes a softmax over axes 1, 2 and 3. Axes of size 1 change nothing,
/// so they are dropped where that leaves one.
fn single_axis_softmax(model: &mut TypedModel) -> TractResult<()> {
    use tract_onnx::tract_core::ops::nn::Softmax;
    for id in 0..model.nodes.len() {
        let Some(softmax) = model.nodes[id].op_as::<Softmax>() else {
            continue;
        };
        if softmax.axes.len() < 2 {
            continue;
        }
        let shape = model.outlet_fact(model.nodes[id].inputs[0])?.shape.clone();
        let wide: TVec<usize> = softmax
            .axes
            .iter()
            .copied()
            .filter(|a| shape[*a] != 1.to_dim())
            .collect();
        let axes = match wide.len() {
            0 => tvec![softmax.axes[0]],
            1 => wide,
            _ => continue,
        };
        let single = Softmax {
            axes,
            ..softmax.clone()
        };
        model.nodes[id].op = Box::new(single);
    }
    Ok(())
}

/// The shapes of a request's inputs, in input order: what a per-shape plan is made for.
type Shapes = Vec<Vec<usize>>;

/// The plans of a graph.
enum Plans {
    /// One plan for every input shape the graph takes.
    One(Arc<Plan>),
    /// A plan per set of input shapes, made on first use; the most recent [`SHAPE_PLANS`] kept,
    /// newest last.
    PerShape {
        model: Box<InferenceModel>,
        /// Why one plan would not do (tract's analysis error).
        why: String,
        plans: Mutex<Vec<(Shapes, Arc<Plan>)>>,
    },
}

struct Shared {
    plans: Plans,
    device: Device,
    input_names: Vec<String>,
    /// Inputs whose values index a constant table, checked before every run (tract's Gather
    /// does not bounds-check).
    index_checks: Vec<IndexCheck>,
    input_types: Vec<DatumType>,
    output_names: Vec<String>,
}

impl Shared {
    /// The plan that runs inputs of these shapes.
    fn plan_for(&self, inputs: &[TValue]) -> TractResult<Arc<Plan>> {
        let (model, plans) = match &self.plans {
            Plans::One(plan) => return Ok(plan.clone()),
            Plans::PerShape { model, plans, .. } => (model, plans),
        };
        let key: Shapes = inputs.iter().map(|v| v.shape().to_vec()).collect();
        {
            let mut plans = plans.lock();
            if let Some(at) = plans.iter().position(|(k, _)| *k == key) {
                let hit = plans.remove(at);
                let plan = hit.1.clone();
                plans.push(hit);
                return Ok(plan);
            }
        }
        // Made outside the lock: other shapes keep running meanwhile.
        let mut concrete = model.as_ref().clone();
        for (ix, shape) in key.iter().enumerate() {
            let fact = InferenceFact::dt_shape(self.input_types[ix], shape.iter().copied());
            concrete.set_input_fact(ix, fact)?;
        }
        let started = std::time::Instant::now();
        let plan = Plan::prepare(concrete, self.device)?;
        tracing::info!(shapes = ?key, took_ms = started.elapsed().as_millis() as u64,
            "tract: made a plan for new input shapes");
        let mut plans = plans.lock();
        if let Some((_, made)) = plans.iter().find(|(k, _)| *k == key) {
            return Ok(made.clone());
        }
        if plans.len() >= SHAPE_PLANS {
            plans.remove(0);
        }
        plans.push((key, plan.clone()));
        Ok(plan)
    }
}

/// A loaded ONNX graph: its plan (or plans, one per set of input shapes) and their pools of
/// execution states.
#[derive(Clone)]
pub struct TractGraph(Arc<Shared>);

impl TractGraph {
    /// Parse and optimise an ONNX model with the input shapes its file declares.
    pub fn from_onnx(bytes: &[u8]) -> TractResult<TractGraph> {
        TractGraph::from_onnx_shaped(bytes, &BTreeMap::new())
    }

    /// Parse and optimise an ONNX model, its inputs shaped by `shapes` (input name → dims, -1
    /// for a variable one) where it names them, else as the file declares them.
    pub fn from_onnx_shaped(
        bytes: &[u8],
        shapes: &BTreeMap<String, Vec<i64>>,
    ) -> TractResult<TractGraph> {
        TractGraph::from_onnx_on(bytes, shapes, Device::Cpu)
    }

    /// [`TractGraph::from_onnx_shaped`], run on `device`.
    pub fn from_onnx_on(
        bytes: &[u8],
        shapes: &BTreeMap<String, Vec<i64>>,
        device: Device,
    ) -> TractResult<TractGraph> {
        if device == Device::Cuda {
            cuda().map_err(|e| anyhow::anyhow!(e))?;
        }
        let index_inputs =
            sophon_sdk::onnx::gather_index_inputs(bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut model = tract_onnx::onnx().model_for_read(&mut &bytes[..])?;
        let unsupported: Vec<String> = model
            .nodes()
            .iter()
            .filter(|n| n.op_is::<tract_onnx::tract_hir::ops::unimpl::UnimplementedOp>())
            .map(|n| format!("{} ({})", n.name, n.op().name()))
            .collect();
        if !unsupported.is_empty() {
            anyhow::bail!("tract has no implementation of {}", unsupported.join(", "));
        }
        let mut input_names = Vec::new();
        let mut input_types = Vec::new();
        for (ix, outlet) in model.input_outlets()?.to_vec().into_iter().enumerate() {
            let name = model.node(outlet.node).name.clone();
            let fact = shape_input(&mut model, ix, &name, shapes.get(&name))?;
            input_types.push(fact.datum_type.concretize().ok_or_else(|| {
                anyhow::anyhow!("input `{name}` has no element type in the file")
            })?);
            input_names.push(name);
        }
        let output_names = model
            .output_outlets()?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();
        let index_checks = index_inputs
            .into_iter()
            .filter_map(|ix| {
                let input = input_names.iter().position(|n| *n == ix.input)?;
                Some(IndexCheck {
                    input,
                    bound: i64::try_from(ix.bound).unwrap_or(i64::MAX),
                    node: ix.node,
                })
            })
            .collect();
        let plans = match Plan::prepare(model.clone(), device) {
            Ok(plan) => Plans::One(plan),
            Err(e) => {
                let why = format!("{e:#}");
                tracing::info!(reason = %why, "tract cannot plan this graph for every input \
                    shape: it makes a plan per set of input shapes");
                Plans::PerShape {
                    model: Box::new(model),
                    why,
                    plans: Mutex::new(Vec::new()),
                }
            }
        };
        Ok(TractGraph(Arc::new(Shared {
            plans,
            device,
            input_names,
            index_checks,
            input_types,
            output_names,
        })))
    }

    /// Why the graph needs a plan per set of input shapes (`None`: one plan serves them all).
    pub fn per_shape(&self) -> Option<&str> {
        match &self.0.plans {
            Plans::One(_) => None,
            Plans::PerShape { why, .. } => Some(why),
        }
    }

    /// A new execution context.
    pub fn context(&self) -> TractResult<TractContext> {
        let mut held = Held::new();
        held.charge(STATE_BYTES, "a wasi-nn execution context")?;
        Ok(TractContext {
            shared: self.0.clone(),
            staged: vec![None; self.0.input_names.len()],
            outputs: Vec::new(),
            held,
        })
    }

    /// Run once natively (no Wasm): the baseline the benchmarks compare against.
    pub fn run_native(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let plan = self.0.plan_for(&inputs)?;
        let mut state = plan.state()?;
        let outputs = state.run(inputs)?;
        plan.give_back(state);
        Ok(outputs)
    }
}

/// Set input `ix`'s fact: its type as the file declares it, its dimensions from `wanted` where
/// that gives a size, else as the file declares them; a dimension neither fixes nor names
/// becomes a symbol of its own.
fn shape_input(
    model: &mut InferenceModel,
    ix: usize,
    name: &str,
    wanted: Option<&Vec<i64>>,
) -> TractResult<InferenceFact> {
    let declared = model.input_fact(ix)?.clone();
    let rank = match (wanted, declared.shape.rank()) {
        (Some(w), _) => w.len(),
        (None, GenericFactoid::Only(r)) => r as usize,
        (None, GenericFactoid::Any) => return Ok(declared),
    };
    if let (Some(w), GenericFactoid::Only(r)) = (wanted, declared.shape.rank())
        && w.len() != r as usize
    {
        anyhow::bail!(
            "the manifest gives input `{name}` {} dimensions, but the file declares {r}",
            w.len()
        );
    }
    let mut dims: Vec<TDim> = Vec::with_capacity(rank);
    for axis in 0..rank {
        let fixed = wanted
            .and_then(|w| w.get(axis))
            .copied()
            .filter(|d| *d >= 0);
        let dim = match (fixed, declared.shape.dim(axis)) {
            (Some(size), _) => TDim::Val(size),
            (None, Some(GenericFactoid::Only(d))) if !matches!(d, TDim::Val(v) if v < 0) => d,
            _ => TDim::Sym(model.symbols.sym(&format!("in{ix}_d{axis}"))),
        };
        dims.push(dim);
    }
    let fact = InferenceFact {
        shape: dims.into_iter().collect(),
        ..declared
    };
    model.set_input_fact(ix, fact.clone())?;
    Ok(fact)
}

impl BackendGraph for TractGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        let ctx = self.context().map_err(backend_error)?;
        Ok(ExecutionContext::from(
            Box::new(ctx) as Box<dyn BackendExecutionContext>
        ))
    }
}

/// An input whose values must lie in `-bound..bound`.
struct IndexCheck {
    input: usize,
    bound: i64,
    node: String,
}

impl IndexCheck {
    fn check(&self, name: &str, value: &Tensor) -> Result<(), BackendError> {
        let ids = value
            .cast_to::<i64>()
            .map_err(|e| invalid_input(format!("input `{name}`: {e:#}")))?;
        let ids = ids
            .to_plain_array_view::<i64>()
            .map_err(|e| invalid_input(format!("input `{name}`: {e:#}")))?;
        if let Some((at, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id >= self.bound || **id < -self.bound)
        {
            return Err(invalid_input(format!(
                "input `{name}` holds {id} at element {at}, but `{}` indexes a table of {} rows: \
                 each value must be in {}..{}",
                self.node, self.bound, -self.bound, self.bound
            )));
        }
        Ok(())
    }
}

/// One execution context: the inputs it stages and the outputs it keeps. A run takes an
/// execution state from its plan's pool and gives it back, unless the run failed (a failed or
/// panicked run may leave symbols bound, so that state is dropped).
pub struct TractContext {
    shared: Arc<Shared>,
    staged: Vec<Option<TValue>>,
    outputs: Vec<(String, TValue)>,
    /// The call's memory this context holds: its state, staged inputs and kept outputs.
    held: Held,
}

/// Bytes of a tract tensor's data.
fn bytes_of(value: &Tensor) -> usize {
    value.len().saturating_mul(value.datum_type().size_of())
}

/// A wasi-nn error for a charge the call's memory limit refused.
fn over_limit(e: memory::Exceeded) -> BackendError {
    invalid(e.to_string())
}

impl TractContext {
    fn input_index(&self, id: &Id) -> Result<usize, BackendError> {
        match id {
            Id::Index(i) if (*i as usize) < self.shared.input_names.len() => Ok(*i as usize),
            Id::Name(n) => self
                .shared
                .input_names
                .iter()
                .position(|x| x == n)
                .ok_or_else(|| {
                    invalid(format!(
                        "the graph has no input `{n}`; its inputs are {:?}",
                        self.shared.input_names
                    ))
                }),
            Id::Index(i) => Err(invalid(format!("the graph has no input #{i}"))),
        }
    }

    fn run(&mut self) -> Result<(), BackendError> {
        let mut inputs = TVec::new();
        for (ix, slot) in self.staged.iter_mut().enumerate() {
            let value = slot.take().ok_or_else(|| {
                invalid(format!(
                    "input `{}` was not given",
                    self.shared.input_names[ix]
                ))
            })?;
            inputs.push(value);
        }
        // The inputs are consumed by the run.
        let staged: usize = inputs.iter().map(|v| bytes_of(v)).sum();
        self.held.release(staged);
        for check in &self.shared.index_checks {
            check.check(&self.shared.input_names[check.input], &inputs[check.input])?;
        }
        let plan = match super::catch_panic("tract", || self.shared.plan_for(&inputs)) {
            Ok(Ok(plan)) => plan,
            Ok(Err(e)) => {
                return Err(invalid_input(format!(
                    "tract cannot make a plan for these input shapes: {e:#}"
                )));
            }
            Err(panicked) => return Err(invalid(panicked)),
        };
        let mut state = plan.state().map_err(backend_error)?;
        let ran = super::catch_panic("tract", || state.run(inputs));
        let outputs = match ran {
            Ok(Ok(outputs)) => outputs,
            Ok(Err(e)) => {
                // Every input passed the manifest's checks, so a graph that cannot run them
                // (symbolic dims that clash, say) was given data it cannot take: a 400.
                return Err(invalid_input(format!("tract: {e:#}")));
            }
            Err(panicked) => return Err(invalid(panicked)),
        };
        plan.give_back(state);
        let kept: usize = outputs.iter().map(|v| bytes_of(v)).sum();
        self.held
            .charge(kept, "wasi-nn outputs")
            .map_err(over_limit)?;
        self.outputs = self
            .shared
            .output_names
            .iter()
            .cloned()
            .zip(outputs)
            .collect();
        Ok(())
    }
}

impl BackendExecutionContext for TractContext {
    fn set_input(&mut self, id: Id, tensor: &wasmtime_wasi_nn::Tensor) -> Result<(), BackendError> {
        let ix = self.input_index(&id)?;
        let value = to_tract(
            &self.shared.input_names[ix],
            self.shared.input_types[ix],
            tensor,
        )?;
        self.held
            .charge(bytes_of(&value), "wasi-nn inputs")
            .map_err(over_limit)?;
        if let Some(old) = self.staged[ix].replace(value) {
            self.held.release(bytes_of(&old));
        }
        Ok(())
    }

    fn get_output(&mut self, id: Id) -> Result<wasmtime_wasi_nn::Tensor, BackendError> {
        let found = match &id {
            Id::Index(i) => self.outputs.get(*i as usize),
            Id::Name(n) => self.outputs.iter().find(|(name, _)| name == n),
        };
        let (name, value) = found.ok_or_else(|| invalid(format!("no output {id:?}")))?;
        // The copy is a tensor the guest holds for the rest of the call.
        memory::charge_call(bytes_of(value), "wasi-nn outputs").map_err(over_limit)?;
        from_tract(name, value)
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
        // The outputs move from this context to tensors the guest holds for the rest of the call.
        let moved: usize = outputs.iter().map(|(_, v)| bytes_of(v)).sum();
        self.held.release(moved);
        memory::charge_call(moved, "wasi-nn outputs").map_err(over_limit)?;
        outputs
            .iter()
            .map(|(name, value)| {
                Ok(NamedTensor {
                    name: name.clone(),
                    tensor: from_tract(name, value)?,
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

fn backend_error(e: impl std::fmt::Display) -> BackendError {
    invalid(format!("tract: {e:#}"))
}

fn invalid(message: String) -> BackendError {
    super::remember_error(&message, false);
    BackendError::BackendAccess(wasmtime::format_err!("{message}"))
}

/// An error caused by the request's data.
fn invalid_input(message: String) -> BackendError {
    super::remember_error(&message, true);
    BackendError::BackendAccess(wasmtime::format_err!("{message}"))
}

/// The wasi-nn type that carries a tract type of the same element width.
fn carrier_of(dt: DatumType) -> Option<TensorType> {
    Some(match dt {
        DatumType::F16 | DatumType::I16 | DatumType::U16 => TensorType::Fp16,
        DatumType::F32 => TensorType::Fp32,
        DatumType::F64 => TensorType::Fp64,
        DatumType::U8 | DatumType::I8 | DatumType::Bool => TensorType::U8,
        DatumType::I32 | DatumType::U32 => TensorType::I32,
        DatumType::I64 | DatumType::U64 => TensorType::I64,
        _ => return None,
    })
}

/// A wasi-nn tensor as a tract value of the model's input type `dt`.
pub fn to_tract(
    name: &str,
    dt: DatumType,
    tensor: &wasmtime_wasi_nn::Tensor,
) -> Result<TValue, BackendError> {
    let Some(carrier) = carrier_of(dt) else {
        return Err(BackendError::UnsupportedTensorType(format!(
            "input `{name}` of the graph is {dt:?}, which wasi-nn cannot carry"
        )));
    };
    if tensor.ty != carrier {
        return Err(invalid(format!(
            "input `{name}` is {:?} but the graph expects {dt:?}",
            tensor.ty
        )));
    }
    let shape: Vec<usize> = tensor.dimensions.iter().map(|d| *d as usize).collect();
    let count = shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| invalid(format!("input `{name}` has too many elements")))?;
    if count.checked_mul(dt.size_of()) != Some(tensor.data.len()) {
        return Err(invalid(format!(
            "input `{name}` has {} bytes; shape {shape:?} of {dt:?} needs {}",
            tensor.data.len(),
            count.saturating_mul(dt.size_of())
        )));
    }
    if dt == DatumType::Bool && tensor.data.iter().any(|b| *b > 1) {
        return Err(invalid(format!(
            "input `{name}` is BOOL but holds a byte other than 0 or 1"
        )));
    }
    Ok(tensor_from_bytes(dt, &shape, &tensor.data)?.into_tvalue())
}

/// One copy of the bytes into an aligned tract tensor, without zeroing it first.
#[allow(unsafe_code)]
fn tensor_from_bytes(dt: DatumType, shape: &[usize], data: &[u8]) -> Result<Tensor, BackendError> {
    debug_assert!(carrier_of(dt).is_some());
    // SAFETY: `from_raw_dt` needs `data` to hold valid values of `dt` for `shape`. The caller
    // checked the length is exactly count × size_of(dt); `dt` is a plain numeric type (every bit
    // pattern valid) or BOOL, whose bytes the caller checked are 0 or 1. No String/TDim/Blob.
    unsafe { Tensor::from_raw_dt(dt, shape, data) }.map_err(backend_error)
}

/// A tract output as a wasi-nn tensor (in the carrier of its element width).
pub fn from_tract(name: &str, value: &Tensor) -> Result<wasmtime_wasi_nn::Tensor, BackendError> {
    let value = if value.datum_type() == DatumType::TDim {
        value.cast_to_dt(DatumType::I64).map_err(backend_error)?
    } else {
        std::borrow::Cow::Borrowed(value)
    };
    let dt = value.datum_type();
    let ty = carrier_of(dt).ok_or_else(|| {
        BackendError::UnsupportedTensorType(format!(
            "output `{name}` is {dt:?}, which wasi-nn cannot carry"
        ))
    })?;
    let dimensions = value
        .shape()
        .iter()
        .map(|d| u32::try_from(*d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| invalid(format!("output `{name}` has a dimension over u32")))?;
    Ok(wasmtime_wasi_nn::Tensor::new(
        dimensions,
        ty,
        value.as_bytes().to_vec(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime_wasi_nn::Tensor as NnTensor;

    fn nn(ty: TensorType, dims: &[u32], data: Vec<u8>) -> NnTensor {
        NnTensor::new(dims.to_vec(), ty, data)
    }

    #[test]
    fn a_softmax_over_axes_of_size_one_becomes_a_softmax_over_one_axis() {
        use tract_onnx::tract_core::ops::nn::Softmax;
        let x: Tensor = tract_ndarray::Array4::from_shape_fn((2, 5, 1, 1), |(n, c, _, _)| {
            (n * 5 + c) as f32 * 0.37 - 1.0
        })
        .into();
        // ONNX's Softmax before opset 13 on [N, C, 1, 1]: over axes 1, 2 and 3.
        let make = |axes: TVec<usize>| -> TractResult<TypedModel> {
            let mut model = TypedModel::default();
            let source = model.add_source("x", f32::fact([2, 5, 1, 1]))?;
            let op = Softmax {
                axes,
                ..Softmax::default()
            };
            let out = model.wire_node("softmax", op, &[source])?;
            model.select_output_outlets(&out)?;
            Ok(model)
        };
        let run = |model: TypedModel| -> TractResult<Tensor> {
            let mut outputs = model.into_runnable()?.run(tvec![x.clone().into()])?;
            Ok(outputs.remove(0).into_tensor())
        };
        let mut model = make(tvec![1, 2, 3]).expect("model");
        let before = run(model.clone()).expect("run");
        single_axis_softmax(&mut model).expect("rewrite");
        let softmax = model.nodes[1].op_as::<Softmax>().expect("still a softmax");
        assert_eq!(softmax.axes.as_slice(), &[1]);
        let after = run(model).expect("run");
        before.close_enough(&after, true).expect("same values");

        // Over two axes longer than one, nothing changes (the CUDA runtime then says so).
        let mut model = make(tvec![0, 1]).expect("model");
        single_axis_softmax(&mut model).expect("rewrite");
        let softmax = model.nodes[1].op_as::<Softmax>().expect("still a softmax");
        assert_eq!(softmax.axes.as_slice(), &[0, 1]);
    }

    #[test]
    fn contexts_count_what_they_hold_against_the_calls_memory_limit() {
        use super::memory::CallMemory;
        let mlp = sophon_sdk::examples::Mlp::new(4, 3, 2, 1);
        let graph = TractGraph::from_onnx(&mlp.to_onnx()).expect("load");
        let batch = 1024u32;
        let input = || {
            let data: Vec<u8> = (0..batch * 4)
                .flat_map(|i| (i as f32).to_le_bytes())
                .collect();
            nn(TensorType::Fp32, &[batch, 4], data)
        };
        let call = CallMemory::open(64 << 20);
        let mut ctx = graph.context().expect("context");
        assert_eq!(
            call.host(),
            STATE_BYTES,
            "a context is charged for its state"
        );
        ctx.set_input(Id::Index(0), &input()).expect("set");
        assert_eq!(call.host(), STATE_BYTES + 16 * 1024, "staged input counted");
        ctx.set_input(Id::Index(0), &input()).expect("set again");
        assert_eq!(
            call.host(),
            STATE_BYTES + 16 * 1024,
            "a replaced input is released"
        );
        ctx.compute(None).expect("compute");
        // The input is consumed; the [1024, 2] f32 output is kept by the context.
        assert_eq!(call.host(), STATE_BYTES + 8 * 1024);
        drop(ctx);
        assert_eq!(call.host(), 0, "a dropped context gives everything back");
        drop(call);

        // Under a limit too small for the staged input, the charge is refused and remembered.
        let call = CallMemory::open(STATE_BYTES + 1024);
        let mut ctx = graph.context().expect("context");
        let refused = ctx
            .set_input(Id::Index(0), &input())
            .expect_err("over the limit");
        assert!(
            format!("{refused:?}").contains("memory limit"),
            "{refused:?}"
        );
        assert!(call.exceeded());
        assert_eq!(call.host(), STATE_BYTES, "a refused input holds nothing");
        drop(ctx);
        drop(call);

        // Sixteen contexts on a small limit: the state charges alone run it out.
        let call = CallMemory::open(4 * STATE_BYTES);
        let held: Vec<_> = (0..4).map(|_| graph.context().expect("context")).collect();
        assert!(
            graph.context().is_err(),
            "a fifth context is over the limit"
        );
        drop(held);
        assert_eq!(call.host(), 0);
    }

    #[test]
    fn a_graph_with_an_operator_tract_lacks_is_refused_at_load_naming_it() {
        let refused = TractGraph::from_onnx(&sophon_sdk::examples::unsupported_onnx(4))
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(
            refused.contains("no implementation") && refused.contains("Frobnicate"),
            "{refused}"
        );
    }

    #[test]
    fn unnamed_dims_become_symbols_and_pinned_dims_make_one_fixed_plan() {
        let mlp = sophon_sdk::examples::Mlp::new(4, 3, 2, 1);
        // The file names the batch dimension: one plan for every batch size.
        let graph = TractGraph::from_onnx(&mlp.to_onnx()).expect("load");
        assert!(graph.per_shape().is_none());
        // Pinned to a batch of 2: one plan, and a batch of 3 is the caller's error.
        let pinned = BTreeMap::from([("input".to_string(), vec![2, 4])]);
        let graph = TractGraph::from_onnx_shaped(&mlp.to_onnx(), &pinned).expect("load pinned");
        assert!(graph.per_shape().is_none());
        let x = |n: usize| tvec![Tensor::zero::<f32>(&[n, 4]).expect("zeros").into_tvalue()];
        assert_eq!(
            graph.run_native(x(2)).expect("batch of 2")[0].shape(),
            &[2, 2]
        );
        assert!(graph.run_native(x(3)).is_err());
        // A manifest shape of the wrong rank is refused at load.
        let wrong = BTreeMap::from([("input".to_string(), vec![2, 4, 1])]);
        let refused = TractGraph::from_onnx_shaped(&mlp.to_onnx(), &wrong)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(refused.contains("3 dimensions"), "{refused}");
    }

    #[test]
    fn every_tract_type_round_trips_through_its_carrier() {
        let types = [
            (DatumType::Bool, TensorType::U8),
            (DatumType::U8, TensorType::U8),
            (DatumType::I8, TensorType::U8),
            (DatumType::U16, TensorType::Fp16),
            (DatumType::I16, TensorType::Fp16),
            (DatumType::F16, TensorType::Fp16),
            (DatumType::U32, TensorType::I32),
            (DatumType::I32, TensorType::I32),
            (DatumType::F32, TensorType::Fp32),
            (DatumType::U64, TensorType::I64),
            (DatumType::I64, TensorType::I64),
            (DatumType::F64, TensorType::Fp64),
        ];
        for (dt, carrier) in types {
            let width = dt.size_of();
            let data: Vec<u8> = (0..6 * width)
                .map(|i| {
                    if dt == DatumType::Bool {
                        (i % 2) as u8
                    } else {
                        (i * 7 % 251) as u8
                    }
                })
                .collect();
            let value = to_tract("x", dt, &nn(carrier, &[2, 3], data.clone()))
                .unwrap_or_else(|e| panic!("{dt:?}: {e}"));
            assert_eq!(value.datum_type(), dt);
            assert_eq!(value.shape(), &[2, 3]);
            let back = from_tract("y", &value).unwrap_or_else(|e| panic!("{dt:?}: {e}"));
            assert_eq!(back.ty, carrier, "{dt:?}");
            assert_eq!(back.dimensions, vec![2, 3]);
            assert_eq!(back.data, data, "{dt:?}");
        }
    }

    #[test]
    fn wrong_carriers_sizes_and_values_are_clear_errors() {
        let err = to_tract("x", DatumType::I32, &nn(TensorType::Fp32, &[1], vec![0; 4]))
            .err()
            .map(|e| format!("{e:?}"))
            .unwrap_or_default();
        assert!(err.contains("expects"), "{err}");
        let err = to_tract("x", DatumType::F32, &nn(TensorType::Fp32, &[2], vec![0; 4]))
            .err()
            .map(|e| format!("{e:?}"))
            .unwrap_or_default();
        assert!(err.contains("bytes"), "{err}");
        let err = to_tract("x", DatumType::Bool, &nn(TensorType::U8, &[1], vec![7]))
            .err()
            .map(|e| format!("{e:?}"))
            .unwrap_or_default();
        assert!(err.contains("BOOL"), "{err}");
        let err = to_tract("x", DatumType::String, &nn(TensorType::U8, &[1], vec![0]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("cannot carry"), "{err}");
        let strings = tract_ndarray::arr1(&["a".to_string()]).into_tensor();
        let err = from_tract("s", &strings)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("cannot carry"), "{err}");
        let huge = nn(TensorType::U8, &[u32::MAX, u32::MAX, u32::MAX], vec![]);
        assert!(to_tract("x", DatumType::U8, &huge).is_err());
    }

    #[test]
    fn contexts_compute_named_tensors_and_reuse_pooled_states() {
        let mlp = sophon_sdk::examples::Mlp::new(4, 3, 2, 1);
        let graph = TractGraph::from_onnx(&mlp.to_onnx()).expect("load");
        let input: Vec<f32> = vec![0.5, -1.0, 2.0, 0.25, 1.0, 1.0, 1.0, 1.0];
        let bytes: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
        for batch in [2u32, 1, 2] {
            let mut ctx = graph.context().expect("context");
            let n = batch as usize * 4 * 4;
            let outputs = ctx
                .compute(Some(vec![NamedTensor {
                    name: "input".into(),
                    tensor: nn(TensorType::Fp32, &[batch, 4], bytes[..n].to_vec()),
                }]))
                .expect("compute")
                .expect("outputs");
            assert_eq!(outputs[0].name, "output");
            let got: Vec<f32> = outputs[0]
                .tensor
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let want = mlp.forward(&input[..batch as usize * 4]);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5);
            }
        }
        let Plans::One(plan) = &graph.0.plans else {
            panic!("the MLP has one plan for every batch size");
        };
        assert_eq!(plan.pool.lock().len(), 1, "one state, reused");
        let mut ctx = graph.context().expect("context");
        let err = ctx
            .compute(Some(vec![NamedTensor {
                name: "nope".into(),
                tensor: nn(TensorType::Fp32, &[1, 4], vec![0; 16]),
            }]))
            .err()
            .map(|e| format!("{e:?}"))
            .unwrap_or_default();
        assert!(err.contains("no input `nope`"), "{err}");
    }
}
