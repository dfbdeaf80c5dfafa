//! The model repository of one node: which bundles it knows, which model versions are loaded and
//! serving, and everything a request needs about one of them ([`LoadedModel`]).
//!
//! Loading a bundle verifies it (digests, signature, a trusted publisher), preloads its model
//! files as wasi-nn graphs, compiles or fetches the component from the AOT cache, and checks the
//! component's own metadata against the manifest. The bundle stays known after an unload, so
//! Triton's repository `load` brings it back.

use crate::backend;
use crate::runtime::{GuestMetadata, Model, ModelLimits, Runtime};
use crate::stats::{Metrics, ModelMetrics, ModelStats};
use parking_lot::RwLock;
use sophon_sdk::VerifyingKey;
use sophon_sdk::bundle::Bundle;
use sophon_sdk::manifest::Manifest;
use sophon_sdk::{Datatype, TensorSpec};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, SemaphorePermit};

/// Errors of the repository.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// No model of that name.
    #[error("unknown model `{name}`: see POST /v2/repository/index for the models this node has")]
    UnknownModel { name: String },
    /// The model exists but not that version.
    #[error("model `{name}` has no version `{version}`; it has {available:?}")]
    UnknownVersion {
        name: String,
        version: String,
        available: Vec<String>,
    },
    /// The model is known but not loaded.
    #[error("model `{name}` is not loaded; load it with POST /v2/repository/models/{name}/load")]
    NotReady { name: String },
    /// The bundle could not be read or verified.
    #[error("bundle refused: {0}")]
    Bundle(#[from] sophon_sdk::Error),
    /// The bundle is valid but cannot be served here.
    #[error("model `{name}` version `{version}` cannot be loaded: {reason}")]
    Load {
        name: String,
        version: String,
        reason: String,
    },
}

/// Instance slots of a model that batches on a GPU, where its manifest does not say.
pub const GPU_BATCHING_SLOTS: usize = 2;

/// Node-wide limits applied to every model.
#[derive(Clone, Debug)]
pub struct ServingLimits {
    /// Requests of one model running at once when its manifest does not say.
    pub default_concurrency: usize,
    /// Requests of one model allowed to wait for a slot before new ones get 429.
    pub max_queue: usize,
    /// Most output bytes one request may return.
    pub max_output_bytes: usize,
    /// The node's dynamic batching by model name (`*`: every model that batches), over the
    /// manifests': `None` turns it off.
    pub batching: BTreeMap<String, Option<sophon_sdk::Batching>>,
}

impl Default for ServingLimits {
    fn default() -> Self {
        ServingLimits {
            default_concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_queue: 256,
            max_output_bytes: 64 << 20,
            batching: BTreeMap::new(),
        }
    }
}

/// A bounded queue in front of a model's concurrency limit.
pub struct Admission {
    concurrency: usize,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_queue: usize,
}

/// The queue was full.
#[derive(Debug)]
pub struct Overloaded {
    pub queued: usize,
}

impl Admission {
    fn new(concurrency: usize, max_queue: usize) -> Admission {
        Admission {
            concurrency: concurrency.max(1),
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
            waiting: AtomicUsize::new(0),
            max_queue,
        }
    }

    /// Wait for a slot, or fail at once when too many are already waiting.
    ///
    /// Cancel-safe: a request dropped while it waits (the client went away) leaves the queue.
    pub async fn enter(&self) -> Result<SemaphorePermit<'_>, Overloaded> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(permit);
        }
        let queued = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        if queued >= self.max_queue {
            return Err(Overloaded { queued });
        }
        self.slots
            .acquire()
            .await
            .map_err(|_| Overloaded { queued })
    }

    /// A slot, when one is free right now.
    pub fn try_enter(&self) -> Option<SemaphorePermit<'_>> {
        self.slots.try_acquire().ok()
    }

    /// Requests that may wait before new ones get 429.
    pub fn max_queue(&self) -> usize {
        self.max_queue
    }

    /// The slots themselves (the batcher takes one per batch).
    pub fn slots(&self) -> Arc<Semaphore> {
        self.slots.clone()
    }

    /// Slots free right now.
    pub fn free(&self) -> usize {
        self.slots.available_permits()
    }

    /// Requests holding a slot right now.
    pub fn running(&self) -> usize {
        self.concurrency
            .saturating_sub(self.slots.available_permits())
    }

    /// Requests waiting for a slot right now.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

/// One request counted in the queue, for as long as it exists.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A model version loaded and serving.
pub struct LoadedModel {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub manifest: Manifest,
    pub model: Arc<Model>,
    /// Dynamic batching, where the manifest or the node turns it on.
    pub batcher: Option<crate::batcher::Batcher>,
    pub stats: ModelStats,
    pub metrics: ModelMetrics,
    pub admission: Admission,
    /// This version's performance since the last mesh report.
    pub perf: crate::perf::PerfWindow,
    /// Whether its calls have been quick enough to run on a Tokio worker.
    pub pace: Arc<crate::handoff::Pace>,
    /// Requests of this model that may run at once.
    pub concurrency: usize,
    /// Where and how each graph runs.
    pub graphs: Vec<GraphRun>,
    /// GPU memory its graphs hold (given back when the model is dropped).
    pub gpu_memory: Vec<crate::hardware::GpuReservation>,
    /// Manifest outputs by name, to relabel carrier datatypes coming back from wasi-nn.
    outputs_by_name: HashMap<String, Datatype>,
    /// Class names by output, from the bundle's `[labels]` files (classification extension).
    labels: HashMap<String, Vec<String>>,
    /// When it was last looked up, in ms of the process's clock (for LRU eviction).
    pub last_used: std::sync::atomic::AtomicU64,
}

/// Milliseconds since this process first asked: a cheap monotonic clock for `last_used`.
pub fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

fn device_of(graphs: &[GraphRun]) -> sophon_sdk::Device {
    graphs
        .iter()
        .map(|g| g.device)
        .max()
        .unwrap_or(sophon_sdk::Device::Cpu)
}

/// Where and how one of a model's graphs runs.
#[derive(Clone, Debug)]
pub struct GraphRun {
    pub name: String,
    pub backend: sophon_sdk::Backend,
    pub device: sophon_sdk::Device,
    /// How it runs, and why there, in words.
    pub how: String,
}

impl LoadedModel {
    /// Requests waiting for a slot or a batch right now.
    pub fn queued(&self) -> usize {
        self.admission.queued() + self.batcher.as_ref().map_or(0, |b| b.queued())
    }

    /// The device its graphs run on: the NPU or GPU when one of them does, else the CPU.
    pub fn device(&self) -> sophon_sdk::Device {
        device_of(&self.graphs)
    }

    /// Inputs as the manifest declares them.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.manifest.inputs
    }

    /// Outputs as the manifest declares them.
    pub fn outputs(&self) -> &[TensorSpec] {
        &self.manifest.outputs
    }

    /// The datatype the manifest declares for an output, when the guest's has the same width.
    ///
    /// wasi-nn lacks some V2 types, so a passthrough guest returns e.g. BOOL as UINT8; the manifest
    /// (read from the ONNX graph at pack time) says what it really is.
    /// The class names of output `name`, where the bundle gives them (`[labels]`).
    pub fn labels(&self, name: &str) -> Option<&[String]> {
        self.labels.get(name).map(Vec::as_slice)
    }

    pub fn declared_output_type(&self, name: &str, returned: Datatype) -> Result<Datatype, String> {
        match self.outputs_by_name.get(name) {
            None => Ok(returned),
            Some(&declared) if declared == returned => Ok(declared),
            Some(&declared)
                if declared.element_size().is_some()
                    && declared.element_size() == returned.element_size() =>
            {
                Ok(declared)
            }
            Some(&declared) => Err(format!(
                "the component returned output `{name}` as {returned}, but the manifest declares {declared}"
            )),
        }
    }
}

struct Slot {
    bundles: BTreeMap<String, Arc<Bundle>>,
    loaded: BTreeMap<String, Arc<LoadedModel>>,
    reason: Option<String>,
}

/// An entry of Triton's repository index.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: &'static str,
    pub reason: String,
}

/// The models of this node.
pub struct Repository {
    runtime: Runtime,
    /// Publishers whose bundles load; a mesh node takes the cluster's list from its view.
    trusted: RwLock<Vec<VerifyingKey>>,
    limits: ServingLimits,
    metrics: Arc<Metrics>,
    models: RwLock<BTreeMap<String, Slot>>,
    /// Instance slots the loaded models may use at once: the sum of their concurrency, which
    /// must fit the runtime's pool, so a request never finds every slot taken.
    reserved: parking_lot::Mutex<usize>,
    /// Woken when a model is unloaded or loaded again through the repository API, so a mesh
    /// node reports the change at once.
    pub changed: tokio::sync::Notify,
}

impl Repository {
    /// An empty repository that accepts bundles signed by one of `trusted`.
    pub fn new(
        runtime: Runtime,
        trusted: Vec<VerifyingKey>,
        limits: ServingLimits,
        metrics: Arc<Metrics>,
    ) -> Repository {
        Repository {
            runtime,
            trusted: RwLock::new(trusted),
            limits,
            metrics,
            models: RwLock::new(BTreeMap::new()),
            reserved: parking_lot::Mutex::new(0),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Reserve `n` instance slots for a model about to load, or say why they do not fit.
    fn reserve(&self, n: usize) -> Result<(), String> {
        let mut reserved = self.reserved.lock();
        // One slot stays free for loading (a model's metadata call at load).
        let pool = (self.runtime.config.max_instances as usize).saturating_sub(1);
        if *reserved + n > pool {
            return Err(format!(
                "its concurrency of {n} does not fit this node's instance pool: {pool} slots, \
                 {} already used by loaded models; lower the model's max_concurrency or raise \
                 the node's instance limit",
                *reserved
            ));
        }
        *reserved += n;
        Ok(())
    }

    fn release(&self, n: usize) {
        let mut reserved = self.reserved.lock();
        *reserved = reserved.saturating_sub(n);
    }

    /// Instance slots a model needs at most when its manifest does not say (the node's default
    /// concurrency), and the slots free now.
    pub fn free_slots(&self) -> (usize, usize) {
        let pool = (self.runtime.config.max_instances as usize).saturating_sub(1);
        (
            self.limits.default_concurrency,
            pool.saturating_sub(*self.reserved.lock()),
        )
    }

    /// Whether a load failed only because the instance pool is full (evicting another model,
    /// or waiting for one being dropped, makes room).
    pub fn pool_full(e: &RepoError) -> bool {
        matches!(e, RepoError::Load { reason, .. } if reason.contains("does not fit this node's instance pool"))
    }

    /// Instance slots reserved by loaded models.
    pub fn reserved_slots(&self) -> usize {
        *self.reserved.lock()
    }

    /// The metrics registry the repository reports to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Verify and load a bundle; on success the model version serves at once.
    pub fn add_bundle(&self, bytes: &[u8]) -> Result<Arc<LoadedModel>, RepoError> {
        self.add_bundle_expecting(bytes, None)
    }

    /// Like [`add_bundle`](Self::add_bundle), and refused unless the bundle's digest is
    /// `digest` (a mesh node loads what the cluster placed, nothing else).
    pub fn add_bundle_expecting(
        &self,
        bytes: &[u8],
        digest: Option<&str>,
    ) -> Result<Arc<LoadedModel>, RepoError> {
        let bundle = Arc::new(self.checked(bytes, digest)?);
        let loaded = Arc::new(self.instantiate(&bundle)?);
        let mut models = self.models.write();
        let slot = models.entry(loaded.name.clone()).or_insert_with(|| Slot {
            bundles: BTreeMap::new(),
            loaded: BTreeMap::new(),
            reason: None,
        });
        slot.bundles.insert(loaded.version.clone(), bundle);
        match slot.loaded.insert(loaded.version.clone(), loaded.clone()) {
            None => self.metrics.models_loaded.inc(),
            Some(old) => self.release(old.concurrency),
        }
        slot.reason = None;
        Ok(loaded)
    }

    /// Checks a bundle placed here cold, without loading it: its digest (must be `digest`),
    /// its signature and files, and its component, compiled into the AOT cache and linked.
    /// Answers its model and version. Its first request loads it
    /// ([`add_bundle_expecting`](Self::add_bundle_expecting)).
    pub fn prepare(&self, bytes: &[u8], digest: &str) -> Result<(String, String), RepoError> {
        let bundle = self.checked(bytes, Some(digest))?;
        let model = &bundle.manifest.model;
        let (name, version) = (model.name.clone(), model.version.clone());
        match Model::prepare(&self.runtime, &bundle.component) {
            Ok(_) => Ok((name, version)),
            Err(e) => Err(RepoError::Load {
                name,
                version,
                reason: format!("{e:#}"),
            }),
        }
    }

    /// A bundle read and verified (files, signature by a trusted publisher), refused unless
    /// its digest is `digest` where one is given.
    fn checked(&self, bytes: &[u8], digest: Option<&str>) -> Result<Bundle, RepoError> {
        let bundle = Bundle::read(bytes)?;
        if let Some(want) = digest
            && bundle.digest_hex() != want
        {
            let manifest = &bundle.manifest;
            return Err(RepoError::Load {
                name: manifest.model.name.clone(),
                version: manifest.model.version.clone(),
                reason: format!(
                    "the bundle's digest is {}, not {want} as placed",
                    bundle.digest_hex()
                ),
            });
        }
        bundle.verify_publisher(&self.trusted.read())?;
        Ok(bundle)
    }

    fn instantiate(&self, bundle: &Bundle) -> Result<LoadedModel, RepoError> {
        let manifest = &bundle.manifest;
        let (name, version) = (manifest.model.name.clone(), manifest.model.version.clone());
        let fail = |reason: String| RepoError::Load {
            name: name.clone(),
            version: version.clone(),
            reason,
        };
        let mut graphs = HashMap::new();
        let mut how = Vec::new();
        let mut reservations = Vec::new();
        for graph in &manifest.graphs {
            let file = backend::GraphFile {
                encoding: graph.encoding,
                bytes: bundle.graph_bytes(graph)?,
                weights: bundle.weights_bytes(graph)?,
                shapes: &graph.shapes,
                threads: manifest.resources.threads,
            };
            // Candidates are timed on zeros shaped by the manifest, where the graph's inputs
            // are the model's (as `sophon pack --onnx` makes them).
            let same_inputs = !graph.shapes.is_empty()
                && graph.shapes.len() == manifest.inputs.len()
                && manifest
                    .inputs
                    .iter()
                    .all(|i| graph.shapes.contains_key(&i.name));
            let probe = same_inputs.then_some(&manifest.inputs[..]);
            let choice = backend::Choice {
                backends: &manifest.hardware.backends,
                preferred: &manifest.hardware.preferred,
                probe,
                cache_dir: self.runtime.config.cache_dir.as_deref(),
                gpu_memory_mb: manifest.hardware.min_gpu_memory_mb,
            };
            let loaded = backend::load_graph(&file, &choice)
                .map_err(|e| fail(format!("graph `{}`: {e}", graph.name)))?;
            tracing::info!(model = %name, graph = %graph.name, "{}", loaded.how);
            graphs.insert(graph.name.clone(), loaded.graph);
            reservations.extend(loaded.gpu_memory);
            how.push(GraphRun {
                name: graph.name.clone(),
                backend: loaded.backend,
                device: loaded.device,
                how: loaded.how,
            });
        }
        let mut labels = HashMap::new();
        for (output, file) in &manifest.labels {
            let text = bundle
                .files
                .get(file)
                .ok_or_else(|| fail(format!("the labels file {file} is not in the bundle")))?;
            let names = sophon_sdk::manifest::parse_labels(text)
                .map_err(|e| fail(format!("labels of output `{output}` ({file}): {e}")))?;
            labels.insert(output.clone(), names);
        }
        let resources = &manifest.resources;
        let limits = ModelLimits {
            memory_bytes: (resources.memory_mb as usize) << 20,
            timeout: Duration::from_millis(resources.timeout_ms),
            max_output_bytes: self.limits.max_output_bytes,
        };
        let env = manifest
            .capabilities
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let model = Model::new(&self.runtime, &name, &bundle.component, graphs, env, limits)
            .map_err(|e| fail(format!("{e:#}")))?;
        let metadata = model.metadata().map_err(|e| fail(e.to_string()))?;
        check_metadata(manifest, &metadata).map_err(fail)?;
        let device = device_of(&how);
        let batching = self.batching_of(&name, manifest);
        let concurrency = match resources.max_concurrency {
            // A GPU runs one call at a time: more slots would only hide the queue from the
            // batcher (Triton makes one instance per GPU). Two let one call's host work
            // (instance, copies) overlap the other's compute.
            0 if batching.is_some() && device == sophon_sdk::Device::Gpu => {
                GPU_BATCHING_SLOTS.min(self.limits.default_concurrency)
            }
            0 => self.limits.default_concurrency,
            n => n as usize,
        };
        self.reserve(concurrency).map_err(fail)?;
        tracing::info!(
            model = %name, version = %version, digest = %bundle.digest_hex(),
            aot = ?model.origin(), "model loaded"
        );
        let model = Arc::new(model);
        let admission = Admission::new(concurrency, self.limits.max_queue);
        let batcher = batching.map(|settings| {
            tracing::info!(model = %name, ?settings, "dynamic batching");
            crate::batcher::Batcher::new(settings, model.clone(), admission.slots())
        });
        Ok(LoadedModel {
            metrics: self
                .metrics
                .for_model(&name, &version, backend::choose::name(device)),
            gpu_memory: reservations,
            outputs_by_name: manifest
                .outputs
                .iter()
                .map(|o| (o.name.clone(), o.datatype))
                .collect(),
            labels,
            name,
            version,
            digest: bundle.digest_hex(),
            manifest: manifest.clone(),
            model,
            batcher,
            stats: ModelStats::default(),
            admission,
            perf: crate::perf::PerfWindow::default(),
            pace: Arc::default(),
            last_used: std::sync::atomic::AtomicU64::new(clock_ms()),
            concurrency,
            graphs: how,
        })
    }

    /// A model's dynamic batching: the node's override for it (or for `*`), else its
    /// manifest's. A model that does not batch (`max_batch_size` 0) never does.
    fn batching_of(
        &self,
        name: &str,
        manifest: &Manifest,
    ) -> Option<crate::batcher::BatchSettings> {
        let model_max = manifest.resources.max_batch_size;
        let batching = match self.limits.batching.get(name) {
            Some(b) => b.as_ref(),
            None => match self.limits.batching.get("*") {
                // Every model that batches; the others are not meant.
                Some(b) if model_max > 0 => b.as_ref(),
                _ => manifest.batching.as_ref(),
            },
        }?;
        if let Err(e) = sophon_sdk::manifest::check_batching(batching, model_max)
            .and_then(|()| manifest.check_batch_dims())
        {
            tracing::warn!(model = %name, "dynamic batching stays off: {e}");
            return None;
        }
        Some(crate::batcher::BatchSettings::new(batching, model_max))
    }

    /// The version to serve: the one asked for, or the newest loaded.
    pub fn lookup(&self, name: &str, version: Option<&str>) -> Result<Arc<LoadedModel>, RepoError> {
        let models = self.models.read();
        let slot = models.get(name).ok_or_else(|| RepoError::UnknownModel {
            name: name.to_string(),
        })?;
        let touch = |m: &Arc<LoadedModel>| {
            let now = clock_ms();
            if m.last_used.load(Ordering::Relaxed) != now {
                m.last_used.store(now, Ordering::Relaxed);
            }
            m.clone()
        };
        match version {
            Some(v) => {
                if let Some(m) = slot.loaded.get(v) {
                    return Ok(touch(m));
                }
                if slot.bundles.contains_key(v) {
                    return Err(RepoError::NotReady {
                        name: name.to_string(),
                    });
                }
                Err(RepoError::UnknownVersion {
                    name: name.to_string(),
                    version: v.to_string(),
                    available: slot.bundles.keys().cloned().collect(),
                })
            }
            None => newest(&slot.loaded)
                .map(touch)
                .ok_or_else(|| RepoError::NotReady {
                    name: name.to_string(),
                }),
        }
    }

    /// Every version of a model that is loaded, oldest first.
    pub fn versions(&self, name: &str) -> Vec<String> {
        self.models
            .read()
            .get(name)
            .map(|s| s.loaded.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every loaded model version.
    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        self.models
            .read()
            .values()
            .flat_map(|s| s.loaded.values().cloned())
            .collect()
    }

    /// Triton's repository index.
    pub fn index(&self) -> Vec<IndexEntry> {
        let models = self.models.read();
        let mut out = Vec::new();
        for (name, slot) in models.iter() {
            for version in slot.bundles.keys() {
                let ready = slot.loaded.contains_key(version);
                out.push(IndexEntry {
                    name: name.clone(),
                    version: version.clone(),
                    state: if ready { "READY" } else { "UNAVAILABLE" },
                    reason: if ready {
                        String::new()
                    } else {
                        slot.reason.clone().unwrap_or_else(|| "unloaded".into())
                    },
                });
            }
        }
        out
    }

    /// Replace the trusted publisher keys (bundles already loaded keep serving).
    pub fn set_trusted(&self, keys: Vec<VerifyingKey>) {
        *self.trusted.write() = keys;
    }

    /// Forget one version of a model: it stops serving (requests in flight finish) and its
    /// bundle is dropped. Returns whether it was there.
    pub fn remove_version(&self, name: &str, version: &str) -> bool {
        let mut models = self.models.write();
        let Some(slot) = models.get_mut(name) else {
            return false;
        };
        let had = slot.bundles.remove(version).is_some();
        if let Some(model) = slot.loaded.remove(version) {
            self.release(model.concurrency);
            self.metrics.models_loaded.dec();
        }
        if slot.bundles.is_empty() && slot.loaded.is_empty() {
            models.remove(name);
        }
        had
    }

    /// Stop serving every version of a model (requests in flight finish).
    pub fn unload(&self, name: &str) -> Result<(), RepoError> {
        let mut models = self.models.write();
        let slot = models
            .get_mut(name)
            .ok_or_else(|| RepoError::UnknownModel {
                name: name.to_string(),
            })?;
        let dropped = slot.loaded.len();
        for model in std::mem::take(&mut slot.loaded).into_values() {
            self.release(model.concurrency);
        }
        slot.reason = Some("unloaded".into());
        self.metrics.models_loaded.sub(dropped as i64);
        self.changed.notify_one();
        Ok(())
    }

    /// Load every known version of a model again.
    pub fn load(&self, name: &str) -> Result<(), RepoError> {
        let bundles: Vec<Arc<Bundle>> = {
            let models = self.models.read();
            let slot = models.get(name).ok_or_else(|| RepoError::UnknownModel {
                name: name.to_string(),
            })?;
            slot.bundles
                .iter()
                .filter(|(v, _)| !slot.loaded.contains_key(*v))
                .map(|(_, b)| b.clone())
                .collect()
        };
        for bundle in bundles {
            let loaded = Arc::new(self.instantiate(&bundle)?);
            let mut models = self.models.write();
            match models.get_mut(name) {
                Some(slot) => {
                    if let Some(old) = slot.loaded.insert(loaded.version.clone(), loaded) {
                        self.release(old.concurrency);
                    } else {
                        self.metrics.models_loaded.inc();
                    }
                    slot.reason = None;
                }
                None => self.release(loaded.concurrency),
            }
        }
        self.changed.notify_one();
        Ok(())
    }
}

/// Versions compare as numbers when both are numbers, else as text.
fn newest(loaded: &BTreeMap<String, Arc<LoadedModel>>) -> Option<&Arc<LoadedModel>> {
    loaded
        .iter()
        .max_by(
            |(a, _), (b, _)| match (a.parse::<u64>(), b.parse::<u64>()) {
                (Ok(x), Ok(y)) => x.cmp(&y),
                _ => a.cmp(b),
            },
        )
        .map(|(_, m)| m)
}

fn check_metadata(manifest: &Manifest, metadata: &GuestMetadata) -> Result<(), String> {
    let pairs = [
        ("input", &manifest.inputs, &metadata.inputs),
        ("output", &manifest.outputs, &metadata.outputs),
    ];
    for (role, declared, guest) in pairs {
        if guest.is_empty() {
            continue;
        }
        for spec in guest {
            let datatype = crate::convert::from_guest_datatype(spec.datatype);
            match declared.iter().find(|d| d.name == spec.name) {
                None => {
                    return Err(format!(
                        "the component declares {role} `{}` but the manifest does not",
                        spec.name
                    ));
                }
                Some(d) if d.datatype != datatype => {
                    return Err(format!(
                        "the component declares {role} `{}` as {datatype} but the manifest says {}",
                        spec.name, d.datatype
                    ));
                }
                Some(_) => {}
            }
        }
        if let Some(missing) = declared
            .iter()
            .find(|d| !guest.iter().any(|g| g.name == d.name))
        {
            return Err(format!(
                "the manifest declares {role} `{}` but the component does not",
                missing.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_abandoned_in_the_queue_leaves_it() {
        let admission = Admission::new(1, 1);
        let held = admission.enter().await.expect("first slot");
        {
            let waiting = admission.enter();
            tokio::pin!(waiting);
            // Poll once so it queues, then drop it as a disconnecting client would.
            let polled = futures_poll_once(waiting.as_mut()).await;
            assert!(polled.is_none());
            assert_eq!(admission.queued(), 1);
        }
        assert_eq!(
            admission.queued(),
            0,
            "the abandoned request left the queue"
        );
        // The queue still admits a waiter, and a second one is refused.
        let admission = &admission;
        let waiter = async move { admission.enter().await.map(|_| ()) };
        tokio::pin!(waiter);
        assert!(futures_poll_once(waiter.as_mut()).await.is_none());
        assert!(admission.enter().await.is_err(), "queue of 1 is full");
        drop(held);
        assert!(waiter.await.is_ok());
    }

    /// Poll a future once; `Some` if it finished.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
