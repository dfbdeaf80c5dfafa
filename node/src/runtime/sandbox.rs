//! One model's pre-linked component, and the sandbox every request runs in.

use super::cache::{self, Origin};
use super::{Runtime, WasmtimeExt};
use crate::backend::memory::CallMemory;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{ComponentExportIndex, Instance, Linker, Resource, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_nn::wit::{WasiNnCtx, WasiNnView};
use wasmtime_wasi_nn::{Graph, GraphRegistry};

pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/wit",
        world: "sophon:model/serving",
    });
}

pub use bindings::sophon::model::types::{
    Datatype as GuestDatatype, ModelMetadata as GuestMetadata, PredictError, Tensor as GuestTensor,
    TensorSpec as GuestTensorSpec,
};

/// Most bytes of guest stdout and of stderr kept per request for the log.
const LOG_CAPACITY: usize = 64 << 10;

/// Most wasi-nn execution contexts one call may create (each holds a backend state).
const MAX_CONTEXTS: usize = 16;

/// What a request's store holds.
pub(crate) struct Sandbox {
    /// WASI, built on the guest's first WASI call: a guest that never reads its environment,
    /// the clocks or random, and never writes a log, does not pay for building it.
    wasi: Option<Wasi>,
    /// The environment the manifest grants, for building `wasi`.
    env: Arc<[(String, String)]>,
    table: ResourceTable,
    nn: WasiNnCtx,
    /// When the call must end: blocking host calls (sleep, poll) give up here.
    deadline: Instant,
    /// A blocking host call reached the deadline.
    blocked_past_deadline: bool,
    /// wasi-nn execution contexts created by this call.
    contexts: usize,
    /// Most bytes the guest may hand the host when it returns (outputs plus their metadata).
    output_fuel: usize,
    /// The guest has returned and its results are being lifted.
    lifting_outputs: bool,
    /// Declared last, so that it is dropped last: the contexts in `table` give their bytes back
    /// to the call's account before the account closes.
    limiter: Limiter,
}

impl WasiView for Sandbox {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let wasi = self.wasi.get_or_insert_with(|| Wasi::new(&self.env));
        WasiCtxView {
            ctx: &mut wasi.ctx,
            table: &mut self.table,
        }
    }
}

impl Sandbox {
    /// The guest's stdout and stderr, if it made a WASI call (else it wrote nothing).
    fn logs(&self) -> Option<&[MemoryOutputPipe; 2]> {
        self.wasi.as_ref().map(|w| &w.logs)
    }
}

/// A request's WASI context and the pipes its stdout and stderr write to.
struct Wasi {
    ctx: WasiCtx,
    logs: [MemoryOutputPipe; 2],
}

impl Wasi {
    /// No file system, no network, no inherited environment: only the granted variables,
    /// clocks, random, and stdout and stderr kept in memory for the node's log.
    fn new(env: &[(String, String)]) -> Wasi {
        let logs = [
            MemoryOutputPipe::new(LOG_CAPACITY),
            MemoryOutputPipe::new(LOG_CAPACITY),
        ];
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(logs[0].clone())
            .stderr(logs[1].clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for (k, v) in env {
            wasi.env(k, v);
        }
        Wasi {
            ctx: wasi.build(),
            logs,
        }
    }
}

/// Caps linear memory and tables through the call's memory account, which also counts the host
/// memory the guest makes the node hold for it (wasi-nn tensors and execution contexts).
struct Limiter {
    memory: CallMemory,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.memory
            .grow_linear(desired)
            .map_err(|e| wasmtime::format_err!("{e}"))?;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// Room the host grants for strings and small lists (names, shapes) beyond a call's data.
const METADATA_FUEL: usize = 64 << 10;

/// Bound every copy from guest to host *before* it is made.
///
/// wasmtime charges "hostcall fuel" for each string and list it lifts out of a guest, before
/// copying it, and fails the lift when the fuel runs out. The fuel is read when a lift starts,
/// so the hook sets it at the two moments a guest hands data over:
/// - entering a host function (its arguments are lifted): the room left under the memory limit;
/// - the guest returning from the export (its results are lifted): `max_output_bytes`.
fn bound_copies(store: &mut Store<Sandbox>) {
    store.call_hook(|mut cx, hook| {
        match hook {
            wasmtime::CallHook::CallingHost => {
                let fuel = cx
                    .data()
                    .limiter
                    .memory
                    .room()
                    .saturating_add(METADATA_FUEL);
                cx.data_mut().lifting_outputs = false;
                cx.set_hostcall_fuel(fuel);
            }
            wasmtime::CallHook::ReturningFromWasm => {
                let fuel = cx.data().output_fuel;
                cx.data_mut().lifting_outputs = true;
                cx.set_hostcall_fuel(fuel);
            }
            wasmtime::CallHook::CallingWasm | wasmtime::CallHook::ReturningFromHost => {
                cx.data_mut().lifting_outputs = false;
            }
        }
        Ok(())
    });
}

/// Whether `error` is wasmtime refusing a lift for lack of hostcall fuel.
fn out_of_copy_fuel(error: &wasmtime::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .to_string()
            .contains("fuel allocated for hostcalls has been exhausted")
    })
}

/// The model's graphs, shared by every instance (wasi-nn `load-by-name`).
struct SharedGraphs(Arc<HashMap<String, Graph>>);

impl GraphRegistry for SharedGraphs {
    fn get(&self, name: &str) -> Option<&Graph> {
        self.0.get(name)
    }
    fn get_mut(&mut self, _name: &str) -> Option<&mut Graph> {
        None
    }
}

/// The linker every model shares: WASI p2 (no preopens, no network) and wasi-nn, with the
/// functions that could outlive a request or hold host memory replaced by bounded ones.
pub(crate) fn linker(engine: &Engine) -> anyhow::Result<Linker<Sandbox>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).wt()?;
    wasmtime_wasi_nn::wit::add_to_linker(&mut linker, |s: &mut Sandbox| {
        WasiNnView::new(&mut s.table, &mut s.nn)
    })
    .wt()?;
    linker.allow_shadowing(true);
    bounded::add_to_linker(&mut linker)?;
    linker.allow_shadowing(false);
    Ok(linker)
}

/// Host functions that replace WASI's and wasi-nn's own where those are unbounded.
///
/// - `wasi:io/poll`'s `poll` and `pollable.block` (how a guest sleeps or waits) wait at most
///   until the request's deadline, then fail the call as a timeout. The epoch deadline cannot
///   interrupt a host call, so without this a guest could hold its thread, slot and permit for
///   as long as it liked.
/// - `wasi:nn/tensor`'s constructor counts the tensor's bytes against the model's memory limit:
///   tensors live in host memory, outside the guest's linear memory.
/// - `graph.init-execution-context` is capped at [`MAX_CONTEXTS`] per call.
mod bounded {
    use super::{MAX_CONTEXTS, Sandbox};
    use crate::backend::memory;
    use crate::runtime::WasmtimeExt;
    use std::time::Instant;
    use wasmtime::StoreContextMut;
    use wasmtime::component::{Linker, Resource};
    use wasmtime_wasi::p2::DynPollable;
    use wasmtime_wasi_io::bindings::wasi::io::poll as async_poll;
    use wasmtime_wasi_nn::wit::TensorType;

    /// The interface versions that wasmtime-wasi 48 and wasmtime-wasi-nn 48 define.
    const POLL: &str = "wasi:io/poll@0.2.12";
    const NN_TENSOR: &str = "wasi:nn/tensor@0.2.0-rc-2024-10-28";
    const NN_GRAPH: &str = "wasi:nn/graph@0.2.0-rc-2024-10-28";

    pub(super) fn add_to_linker(linker: &mut Linker<Sandbox>) -> anyhow::Result<()> {
        let mut poll = linker.instance(POLL).wt()?;
        poll.func_wrap(
            "poll",
            |mut store: StoreContextMut<'_, Sandbox>,
             (pollables,): (Vec<Resource<DynPollable>>,)| {
                let ready = until_deadline(&mut store, |table| {
                    Box::pin(async_poll::Host::poll(table, pollables))
                })?;
                Ok((ready,))
            },
        )
        .wt()?;
        poll.func_wrap(
            "[method]pollable.block",
            |mut store: StoreContextMut<'_, Sandbox>, (pollable,): (Resource<DynPollable>,)| {
                until_deadline(&mut store, |table| {
                    Box::pin(async_poll::HostPollable::block(table, pollable))
                })
            },
        )
        .wt()?;
        let mut tensor = linker.instance(NN_TENSOR).wt()?;
        tensor
            .func_wrap(
                "[constructor]tensor",
                |mut store: StoreContextMut<'_, Sandbox>,
                 (dimensions, ty, data): (Vec<u32>, TensorType, Vec<u8>)| {
                    let sandbox = store.data_mut();
                    memory::charge_call(data.len(), "wasi-nn tensors")
                        .map_err(|e| wasmtime::format_err!("{e}"))?;
                    let tensor = wasmtime_wasi_nn::Tensor {
                        dimensions,
                        ty,
                        data,
                    };
                    Ok((sandbox.table.push(tensor)?,))
                },
            )
            .wt()?;
        let mut graph = linker.instance(NN_GRAPH).wt()?;
        graph
            .func_wrap(
                "[method]graph.init-execution-context",
                |mut store: StoreContextMut<'_, Sandbox>,
                 (graph,): (Resource<wasmtime_wasi_nn::Graph>,)| {
                    let sandbox = store.data_mut();
                    if sandbox.contexts >= MAX_CONTEXTS {
                        wasmtime::bail!(
                            "the model created more than {MAX_CONTEXTS} wasi-nn execution contexts \
                             in one call"
                        );
                    }
                    sandbox.contexts += 1;
                    let graph = sandbox.table.get(&graph)?;
                    let context = graph
                        .init_execution_context()
                        .map_err(|e| wasmtime::format_err!("wasi-nn: {e}"))?;
                    let context = sandbox.table.push(context)?;
                    Ok((Ok::<_, Resource<wasmtime_wasi_nn::wit::types::Error>>(
                        context,
                    ),))
                },
            )
            .wt()?;
        Ok(())
    }

    type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + 'a>>;

    /// Run a blocking WASI call, giving up at the request's deadline.
    fn until_deadline<T>(
        store: &mut StoreContextMut<'_, Sandbox>,
        call: impl for<'a> FnOnce(
            &'a mut wasmtime::component::ResourceTable,
        ) -> BoxFuture<'a, wasmtime::Result<T>>,
    ) -> wasmtime::Result<T> {
        let sandbox = store.data_mut();
        let remaining = sandbox.deadline.saturating_duration_since(Instant::now());
        let table = &mut sandbox.table;
        let waited = wasmtime_wasi::runtime::in_tokio(async move {
            tokio::time::timeout(remaining, call(table)).await
        });
        match waited {
            Ok(result) => result,
            Err(_) => {
                sandbox.blocked_past_deadline = true;
                wasmtime::bail!("the guest waited (sleep or poll) past its deadline")
            }
        }
    }
}

/// Per-model sandbox limits.
#[derive(Clone, Debug)]
pub struct ModelLimits {
    /// Most linear memory an instance may grow to.
    pub memory_bytes: usize,
    /// Deadline of one call.
    pub timeout: Duration,
    /// Most bytes of output data one call may return.
    pub max_output_bytes: usize,
}

/// Why a call into a model failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum InvokeError {
    /// The call ran past its deadline.
    #[error("model `{model}` ran past its deadline of {limit_ms} ms and was stopped")]
    Timeout { model: String, limit_ms: u128 },
    /// The instance tried to grow its memory past the limit.
    #[error("model `{model}` exceeded its memory limit of {limit_mib} MiB and was stopped")]
    MemoryExceeded { model: String, limit_mib: usize },
    /// The guest trapped (a panic, `unreachable`, an out-of-bounds access...).
    #[error("model `{model}` crashed: {message}")]
    Trap { model: String, message: String },
    /// The guest returned more output than allowed. `bytes` is `None` when the output was
    /// refused while it was being copied out of the guest, before all of it was seen.
    #[error(
        "model `{model}` returned {} of output, over the limit of {limit} bytes",
        match bytes { Some(b) => format!("{b} bytes"), None => "more bytes".to_string() }
    )]
    OutputTooLarge {
        model: String,
        bytes: Option<usize>,
        limit: usize,
    },
    /// The guest refused the inputs.
    #[error("model `{model}` rejected the input: {message}")]
    InvalidInput { model: String, message: String },
    /// The guest reported a failure of its own or of the backend.
    #[error("model `{model}` failed: {message}")]
    Failed { model: String, message: String },
    /// Every instance slot of the node is in use.
    #[error(
        "model `{model}` could not start: every instance slot of this node is in use; retry later"
    )]
    Busy { model: String },
}

/// Time spent in each phase of one call.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallTimes {
    /// Creating the store and instantiating the component.
    pub instantiate: Duration,
    /// The `predict` call itself (inputs lowered, guest code, wasi-nn, outputs lifted).
    pub call: Duration,
    /// Dropping the store: the instance's slot goes back to the pool, its dirty pages reset.
    pub teardown: Duration,
}

/// A request's store after its call: dropping it tears the instance down (its slot goes back
/// to the pool, its dirty pages are reset). It holds nothing of the call's account.
pub struct Spent {
    _store: Store<Sandbox>,
    made: Duration,
}

impl Spent {
    /// How long the call spent getting its instance: taking the one made ahead, or making one
    /// (the component's start function included). Host upkeep, not the request's own work.
    pub fn made(&self) -> Duration {
        self.made
    }

    /// Tear the instance down now; how long that took.
    pub fn tear_down(self) -> Duration {
        let started = Instant::now();
        drop(self);
        started.elapsed()
    }
}

/// Drop a spent instance now, and count the time it took as the call's teardown.
fn finish(
    result: Result<(Vec<GuestTensor>, CallTimes), InvokeError>,
    spent: Spent,
) -> Result<(Vec<GuestTensor>, CallTimes), InvokeError> {
    let teardown = spent.tear_down();
    result.map(|(outputs, mut times)| {
        times.teardown = teardown;
        (outputs, times)
    })
}

/// A fresh instance made before its request came, and its place in the node's budget.
struct Ready {
    store: Store<Sandbox>,
    instance: Instance,
    _permit: SparePermit,
}

/// How many instances the node's models may hold ready ahead of their requests, across all of
/// them: a slice of the instance pool, so that spares never crowd out requests.
pub(crate) struct Spares {
    left: std::sync::atomic::AtomicUsize,
}

impl Spares {
    /// A budget of one instance in eight of the pool's `instances`.
    pub(crate) fn new(instances: u32) -> Arc<Spares> {
        Arc::new(Spares {
            left: (instances as usize / 8).into(),
        })
    }

    fn take(self: &Arc<Spares>) -> Option<SparePermit> {
        use std::sync::atomic::Ordering;
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .ok()
            .map(|_| SparePermit(self.clone()))
    }
}

/// One spare instance's place in the budget, given back when the spare is used or dropped.
struct SparePermit(Arc<Spares>);

impl Drop for SparePermit {
    fn drop(&mut self) {
        self.0
            .left
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A model ready to serve: its component pre-linked, its graphs loaded.
pub struct Model {
    name: String,
    engine: Engine,
    /// Keeps the epoch ticker running while the model lives.
    _ticker: Arc<super::Ticker>,
    pre: bindings::ServingPre<Sandbox>,
    /// `sophon:model/direct#predict`, when the component exports it.
    direct: Option<ComponentExportIndex>,
    /// The exports `predictor.predict` needs, found once.
    indices: bindings::ServingIndices,
    /// The component imports wasi-nn alone: no WASI call of its can block on the Tokio runtime.
    wasi_free: bool,
    /// The next request's instance, made after the last request was answered.
    spare: parking_lot::Mutex<Option<Ready>>,
    spares: Arc<Spares>,
    graphs: Arc<HashMap<String, Graph>>,
    env: Arc<[(String, String)]>,
    limits: ModelLimits,
    deadline_ticks: u64,
    origin: Origin,
}

impl Model {
    /// Compile (or load from cache) and pre-link a component with its graphs and granted
    /// environment.
    pub fn new(
        runtime: &Runtime,
        name: &str,
        component: &[u8],
        graphs: HashMap<String, Graph>,
        env: Vec<(String, String)>,
        limits: ModelLimits,
    ) -> anyhow::Result<Model> {
        let (pre, origin) = Model::link(runtime, component)?;
        let direct = direct_predict(&pre);
        let component = pre.instance_pre().component();
        let wasi_free = component
            .component_type()
            .imports(&runtime.engine)
            .all(|(name, item)| {
                name.starts_with("wasi:nn/") || !has_functions(&runtime.engine, &item.ty)
            });
        let indices = bindings::ServingIndices::new(pre.instance_pre())
            .map_err(|e| anyhow::anyhow!("the component does not export the predictor: {e:#}"))?;
        let tick = runtime.config.epoch_tick.as_nanos().max(1);
        let deadline_ticks = (limits.timeout.as_nanos().div_ceil(tick) as u64).saturating_add(1);
        Ok(Model {
            name: name.to_string(),
            engine: runtime.engine.clone(),
            _ticker: runtime.ticker.clone(),
            pre,
            direct,
            indices,
            wasi_free,
            spare: parking_lot::Mutex::new(None),
            spares: runtime.spares.clone(),
            graphs: Arc::new(graphs),
            env: env.into(),
            limits,
            deadline_ticks,
            origin,
        })
    }

    /// Compile (or load from the AOT cache) a component and check that it links on this node
    /// and exports the predictor, without loading any graph: what a node does for a model
    /// placed on it cold, so that its first request pays a load, not a compile.
    pub fn prepare(runtime: &Runtime, component: &[u8]) -> anyhow::Result<Origin> {
        Model::link(runtime, component).map(|(_, origin)| origin)
    }

    fn link(
        runtime: &Runtime,
        component: &[u8],
    ) -> anyhow::Result<(bindings::ServingPre<Sandbox>, Origin)> {
        let (component, origin) = cache::load_component(
            &runtime.engine,
            &runtime.components,
            runtime.config.cache_dir.as_deref(),
            &runtime.cache_key,
            component,
        )?;
        let instance_pre = runtime.linker.instantiate_pre(&component).map_err(|e| {
            anyhow::anyhow!("the component's imports cannot be satisfied by this node: {e:#}")
        })?;
        let pre = bindings::ServingPre::new(instance_pre).map_err(|e| {
            anyhow::anyhow!("the component does not export sophon:model/predictor: {e:#}")
        })?;
        Ok((pre, origin))
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the component came from the AOT cache.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The component's own metadata.
    pub fn metadata(&self) -> Result<GuestMetadata, InvokeError> {
        let mut store = self.store();
        let serving = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.classify(e, &store))?;
        let result = serving.sophon_model_predictor().call_metadata(&mut store);
        self.flush_logs(&store);
        result.map_err(|e| self.classify(e, &store))
    }

    /// Run one request in an instance made for it, and drop it before returning.
    ///
    /// A component that exports `sophon:model/direct` gets the request's tensors as wasi-nn
    /// handles that stay in host memory (unless an input is `BYTES`, which wasi-nn cannot
    /// carry); any other gets them copied into its memory through `predictor.predict`.
    pub fn predict(
        &self,
        inputs: Vec<GuestTensor>,
    ) -> Result<(Vec<GuestTensor>, CallTimes), InvokeError> {
        let (result, spent) = self.call(inputs, true, false);
        finish(result, spent)
    }

    /// Run one request in an instance made for it through `predictor.predict`, the tensors copied
    /// into the guest's memory and out again, even when the component takes them by handle:
    /// the baseline `sophon bench sandbox` measures against, and what tests compare with.
    pub fn predict_by_value(
        &self,
        inputs: Vec<GuestTensor>,
    ) -> Result<(Vec<GuestTensor>, CallTimes), InvokeError> {
        let (result, spent) = self.call(inputs, false, false);
        finish(result, spent)
    }

    /// Run one request as [`Model::predict`] does, in an instance made ahead of it when
    /// [`Model::tidy`] left one, and leave the instance's teardown to the caller: the answer goes
    /// out first, then [`Model::tidy`] drops the instance and makes the next request's. Each
    /// instance still serves exactly one request; what moves is when it is made and dropped.
    pub fn answer(
        &self,
        inputs: Vec<GuestTensor>,
    ) -> (Result<(Vec<GuestTensor>, CallTimes), InvokeError>, Spent) {
        self.call(inputs, true, true)
    }

    /// Drop a request's spent instance and, when the model has none ready and the node's
    /// budget of spare instances allows, instantiate the next request's now.
    pub fn tidy(&self, spent: Spent) {
        drop(spent);
        if self.spare.lock().is_some() {
            return;
        }
        let Some(permit) = self.spares.take() else {
            return;
        };
        let (mut store, instance) = self.fresh();
        let Ok(instance) = instance else {
            // Whatever stopped it (every slot in use, a trap in the component's start) will
            // meet the next request too, which reports it.
            return;
        };
        store.data_mut().limiter.memory.detach();
        let mut spare = self.spare.lock();
        if spare.is_none() {
            *spare = Some(Ready {
                store,
                instance,
                _permit: permit,
            });
        }
    }

    /// Whether the component exports `sophon:model/direct` (takes requests by handle).
    pub fn takes_handles(&self) -> bool {
        self.direct.is_some()
    }

    /// Whether the component imports nothing but wasi-nn, so that it may run on a thread that
    /// drives a Tokio runtime: WASI's blocking calls (sleep, poll, streams) block on the runtime,
    /// which is only allowed once the worker has been handed off.
    pub fn wasi_free(&self) -> bool {
        self.wasi_free
    }

    /// Whether an instance is ready for the next request.
    pub fn has_spare(&self) -> bool {
        self.spare.lock().is_some()
    }

    /// A store with a fresh instance for one request: the spare (if `spare` allows), armed for
    /// this call on this thread, or one made now.
    fn instance(&self, spare: bool) -> (Store<Sandbox>, wasmtime::Result<Instance>) {
        if let Some(Ready {
            mut store,
            instance,
            _permit,
        }) = spare.then(|| self.spare.lock().take()).flatten()
        {
            store.data_mut().limiter.memory.attach();
            self.arm(&mut store);
            return (store, Ok(instance));
        }
        self.fresh()
    }

    fn call(
        &self,
        inputs: Vec<GuestTensor>,
        by_handle: bool,
        spare: bool,
    ) -> (Result<(Vec<GuestTensor>, CallTimes), InvokeError>, Spent) {
        let started = Instant::now();
        crate::backend::take_last_error();
        let (mut store, instance) = self.instance(spare);
        let made = started.elapsed();
        let result = match instance {
            Ok(instance) => self.run(&mut store, &instance, inputs, by_handle, started),
            Err(e) => Err(self.classify(e, &store)),
        };
        // The call is over: whatever the store still holds is dropped outside its account.
        store.data_mut().limiter.memory.detach();
        (
            result,
            Spent {
                _store: store,
                made,
            },
        )
    }

    fn run(
        &self,
        store: &mut Store<Sandbox>,
        instance: &Instance,
        inputs: Vec<GuestTensor>,
        by_handle: bool,
        started: Instant,
    ) -> Result<(Vec<GuestTensor>, CallTimes), InvokeError> {
        let instantiated = Instant::now();
        let direct = self
            .direct
            .as_ref()
            .filter(|_| by_handle && inputs.iter().all(|t| carrier(t.datatype).is_some()));
        let result = match direct {
            Some(predict) => call_direct(store, instance, predict, inputs),
            None => self
                .indices
                .load(&mut *store, instance)
                .and_then(|serving| {
                    serving
                        .sophon_model_predictor()
                        .call_predict(&mut *store, &inputs)
                }),
        };
        let called = Instant::now();
        let times = CallTimes {
            instantiate: instantiated - started,
            call: called - instantiated,
            teardown: Duration::ZERO,
        };
        self.flush_logs(store);
        let outputs = match result {
            Err(e) => return Err(self.classify(e, store)),
            // A backend refused memory to the guest: whatever the guest made of that, the call
            // ran into its limit.
            Ok(_) if store.data().limiter.memory.exceeded() => {
                return Err(InvokeError::MemoryExceeded {
                    model: self.name.clone(),
                    limit_mib: self.limits.memory_bytes >> 20,
                });
            }
            Ok(Err(PredictError::InvalidInput(message))) => {
                return Err(InvokeError::InvalidInput {
                    model: self.name.clone(),
                    message,
                });
            }
            Ok(Err(PredictError::Inference(message) | PredictError::Internal(message))) => {
                let model = self.name.clone();
                return Err(match crate::backend::take_last_error() {
                    // The backend refused the request's data: the client can fix that.
                    Some(detail) if detail.input => InvokeError::InvalidInput {
                        model,
                        message: detail.message,
                    },
                    Some(detail) => InvokeError::Failed {
                        model,
                        message: format!("{message} ({})", detail.message),
                    },
                    None => InvokeError::Failed { model, message },
                });
            }
            Ok(Ok(outputs)) => outputs,
        };
        // The copy out of the guest was bounded before it was made (`bound_copies`): by
        // `max_output_bytes` plus room for names and shapes. Count the data bytes exactly.
        let bytes: usize = outputs.iter().map(|t| t.data.len()).sum();
        if bytes > self.limits.max_output_bytes {
            return Err(InvokeError::OutputTooLarge {
                model: self.name.clone(),
                bytes: Some(bytes),
                limit: self.limits.max_output_bytes,
            });
        }
        Ok((outputs, times))
    }

    fn store(&self) -> Store<Sandbox> {
        let sandbox = Sandbox {
            wasi: None,
            env: self.env.clone(),
            table: ResourceTable::new(),
            nn: WasiNnCtx::new([], SharedGraphs(self.graphs.clone()).into()),
            deadline: Instant::now(),
            blocked_past_deadline: false,
            contexts: 0,
            output_fuel: 0,
            lifting_outputs: false,
            limiter: Limiter {
                memory: CallMemory::open(self.limits.memory_bytes),
            },
        };
        let mut store = Store::new(&self.engine, sandbox);
        store.limiter(|s| &mut s.limiter);
        bound_copies(&mut store);
        store.epoch_deadline_trap();
        self.arm(&mut store);
        store
    }

    /// Start a store's clock and output allowance for a call (again, for an instance made
    /// ahead of its request).
    fn arm(&self, store: &mut Store<Sandbox>) {
        let sandbox = store.data_mut();
        sandbox.deadline = Instant::now() + self.limits.timeout;
        sandbox.output_fuel = self.limits.max_output_bytes.saturating_add(METADATA_FUEL);
        store.set_epoch_deadline(self.deadline_ticks);
    }

    /// A new store with an instance made in it now.
    fn fresh(&self) -> (Store<Sandbox>, wasmtime::Result<Instance>) {
        let mut store = self.store();
        let instance = self.pre.instance_pre().instantiate(&mut store);
        (store, instance)
    }

    fn flush_logs(&self, store: &Store<Sandbox>) {
        let Some(logs) = store.data().logs() else {
            return;
        };
        for (stream, pipe) in ["stdout", "stderr"].into_iter().zip(logs) {
            let bytes = pipe.contents();
            if bytes.is_empty() {
                continue;
            }
            for line in String::from_utf8_lossy(&bytes).lines() {
                tracing::info!(target: "sophon::guest", model = %self.name, stream, "{line}");
            }
        }
    }

    fn classify(&self, error: wasmtime::Error, store: &Store<Sandbox>) -> InvokeError {
        let model = self.name.clone();
        if error
            .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
            .is_some()
        {
            return InvokeError::Busy { model };
        }
        // A copy refused on the way out (the export's results, lifted after the guest returned)
        // carries no Wasm backtrace; one refused on the way in (a host call's arguments) does,
        // and ends the guest with a trap, after which `lifting_outputs` is set too.
        let inside_guest = error.downcast_ref::<wasmtime::WasmBacktrace>().is_some();
        if out_of_copy_fuel(&error) && store.data().lifting_outputs && !inside_guest {
            return InvokeError::OutputTooLarge {
                model,
                bytes: None,
                limit: self.limits.max_output_bytes,
            };
        }
        if out_of_copy_fuel(&error) {
            return InvokeError::MemoryExceeded {
                model,
                limit_mib: self.limits.memory_bytes >> 20,
            };
        }
        if store.data().blocked_past_deadline
            || matches!(
                error.downcast_ref::<wasmtime::Trap>(),
                Some(wasmtime::Trap::Interrupt)
            )
        {
            return InvokeError::Timeout {
                model,
                limit_ms: self.limits.timeout.as_millis(),
            };
        }
        if store.data().limiter.memory.exceeded() {
            return InvokeError::MemoryExceeded {
                model,
                limit_mib: self.limits.memory_bytes >> 20,
            };
        }
        let mut message = match error.downcast_ref::<wasmtime::Trap>() {
            Some(trap) => trap.to_string(),
            None => format!("{error:#}"),
        };
        // A Rust guest prints its panic (location, then message) to stderr just before it traps.
        let stderr = store
            .data()
            .logs()
            .map(|logs| logs[1].contents())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&stderr);
        let said: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect();
        if !said.is_empty() {
            let tail = &said[said.len().saturating_sub(2)..];
            message.push_str(&format!(" (guest stderr: {})", tail.join(" ")));
        }
        InvokeError::Trap { model, message }
    }
}

/// Whether an import brings functions (an interface of types alone, such as
/// `sophon:model/types`, brings none).
fn has_functions(engine: &Engine, item: &wasmtime::component::types::ComponentItem) -> bool {
    use wasmtime::component::types::ComponentItem;
    match item {
        ComponentItem::ComponentInstance(instance) => instance
            .exports(engine)
            .any(|(_, item)| has_functions(engine, &item.ty)),
        ComponentItem::Type(_) | ComponentItem::Resource(_) => false,
        _ => true,
    }
}

/// `sophon:model/direct#predict` in a component, if it exports it.
fn direct_predict(pre: &bindings::ServingPre<Sandbox>) -> Option<ComponentExportIndex> {
    let component = pre.instance_pre().component();
    let direct = component.get_export_index(None, "sophon:model/direct@0.1.0")?;
    component.get_export_index(Some(&direct), "predict")
}

/// A wasi-nn tensor the host holds, and one handed to a guest by handle.
type NnTensor = wasmtime_wasi_nn::Tensor;
type Handles = Vec<(String, Resource<NnTensor>)>;

/// The wasi-nn carrier of a V2 datatype, as the guest SDK picks it (`sophon_guest::nn`), so a
/// request by handle reaches the backend exactly as one copied through the guest would.
fn carrier(datatype: GuestDatatype) -> Option<wasmtime_wasi_nn::wit::TensorType> {
    use wasmtime_wasi_nn::wit::TensorType as T;
    Some(match datatype {
        GuestDatatype::Fp16 | GuestDatatype::Int16 | GuestDatatype::Uint16 => T::Fp16,
        GuestDatatype::Fp32 => T::Fp32,
        GuestDatatype::Fp64 => T::Fp64,
        GuestDatatype::Bf16 => T::Bf16,
        GuestDatatype::Uint8 | GuestDatatype::Int8 | GuestDatatype::Bool => T::U8,
        GuestDatatype::Int32 | GuestDatatype::Uint32 => T::I32,
        GuestDatatype::Int64 | GuestDatatype::Uint64 => T::I64,
        GuestDatatype::Bytes => return None,
    })
}

/// The V2 datatype of a wasi-nn output (the node relabels it by the manifest afterwards).
fn from_carrier(ty: wasmtime_wasi_nn::wit::TensorType) -> GuestDatatype {
    use wasmtime_wasi_nn::wit::TensorType as T;
    match ty {
        T::Fp16 => GuestDatatype::Fp16,
        T::Fp32 => GuestDatatype::Fp32,
        T::Fp64 => GuestDatatype::Fp64,
        T::Bf16 => GuestDatatype::Bf16,
        T::U8 => GuestDatatype::Uint8,
        T::I32 => GuestDatatype::Int32,
        T::I64 => GuestDatatype::Int64,
    }
}

/// One request through `sophon:model/direct`: each input moves into the store's table as a
/// wasi-nn tensor (its bytes counted against the call's memory, as a guest-made tensor's are),
/// the guest gets the handles, and the outputs come back out of the table without a copy.
fn call_direct(
    store: &mut Store<Sandbox>,
    instance: &Instance,
    predict: &ComponentExportIndex,
    inputs: Vec<GuestTensor>,
) -> wasmtime::Result<Result<Vec<GuestTensor>, PredictError>> {
    let mut handles: Handles = Vec::with_capacity(inputs.len());
    for t in inputs {
        let ty = carrier(t.datatype).expect("checked before the call");
        let Ok(dimensions) = t
            .shape
            .iter()
            .map(|&d| u32::try_from(d))
            .collect::<Result<Vec<u32>, _>>()
        else {
            return Ok(Err(PredictError::InvalidInput(format!(
                "input `{}` is too large",
                t.name
            ))));
        };
        crate::backend::memory::charge_call(t.data.len(), "wasi-nn tensors")
            .map_err(|e| wasmtime::format_err!("{e}"))?;
        let tensor = NnTensor {
            dimensions,
            ty,
            data: t.data,
        };
        handles.push((t.name, store.data_mut().table.push(tensor)?));
    }
    let func = instance
        .get_typed_func::<(Handles,), (Result<Handles, PredictError>,)>(&mut *store, predict)?;
    let (result,) = func.call(&mut *store, (handles,))?;
    let outputs = match result {
        Ok(outputs) => outputs,
        Err(e) => return Ok(Err(e)),
    };
    let table = &mut store.data_mut().table;
    let mut tensors = Vec::with_capacity(outputs.len());
    for (name, handle) in outputs {
        let t = table.delete(handle)?;
        tensors.push(GuestTensor {
            name,
            datatype: from_carrier(t.ty),
            shape: t.dimensions.into_iter().map(u64::from).collect(),
            data: t.data,
        });
    }
    Ok(Ok(tensors))
}
