//! The Wasm runtime: one wasmtime engine per node, one pre-linked component per model, and a
//! fresh sandboxed instance for every request.
//!
//! - The engine uses the pooling allocator (instances are carved from pre-reserved slots with
//!   copy-on-write memory images, so instantiation costs microseconds) and epoch interruption
//!   (a ticker thread advances the epoch; every call gets a deadline in ticks).
//! - Components are AOT-compiled once and cached on disk by digest ([`cache`]).
//! - [`Model`] holds the `InstancePre` and the model's preloaded wasi-nn graphs (weights live once
//!   in the host, shared by all instances); [`Model::predict`] instantiates, calls, and drops.
//! - A sandbox has no file system, network or inherited environment: only the environment
//!   variables the manifest grants, clocks and random. Guest stdout/stderr go to the node's log,
//!   tagged with the model.

pub mod cache;
mod sandbox;

pub use sandbox::{
    CallTimes, GuestDatatype, GuestMetadata, GuestTensor, GuestTensorSpec, InvokeError, Model,
    ModelLimits, PredictError, Spent,
};

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Turns wasmtime's own error type into `anyhow`, keeping the whole chain in the message.
pub(crate) trait WasmtimeExt<T> {
    fn wt(self) -> anyhow::Result<T>;
}

impl<T> WasmtimeExt<T> for wasmtime::Result<T> {
    fn wt(self) -> anyhow::Result<T> {
        self.map_err(|e| anyhow::anyhow!("{e:#}"))
    }
}

/// Settings of the Wasm runtime.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Where compiled components are cached; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// How often the epoch advances; deadlines are counted in these ticks.
    pub epoch_tick: Duration,
    /// Instances that may be alive at once across all models (pool slots).
    pub max_instances: u32,
    /// The largest linear memory any instance may have (a manifest may ask for less).
    pub max_memory_bytes: u64,
    /// Bytes of each memory slot kept resident (reset in place) between instances.
    pub keep_resident_bytes: usize,
    /// The file holding this node's key for authenticating AOT cache entries (made on first
    /// use, owner-only). `None` keeps a key in memory for this process only.
    pub cache_key_file: Option<PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cache_dir: default_cache_dir(),
            epoch_tick: Duration::from_millis(5),
            max_instances: 1000,
            max_memory_bytes: 4 << 30,
            keep_resident_bytes: 16 << 20,
            cache_key_file: default_cache_key_file(),
        }
    }
}

impl RuntimeConfig {
    /// Check the settings make sense.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.epoch_tick.is_zero(),
            "the epoch tick must be positive"
        );
        anyhow::ensure!(self.max_instances > 0, "max_instances must be at least 1");
        anyhow::ensure!(
            self.max_memory_bytes >= 1 << 20,
            "max_memory_bytes must be at least 1 MiB"
        );
        Ok(())
    }
}

/// `$SOPHON_HOME/cache/components`, or `~/.cache/sophon/components`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("SOPHON_HOME") {
        return Some(PathBuf::from(home).join("cache").join("components"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sophon/components"))
}

/// `$SOPHON_HOME/cache.key`, or `~/.sophon/cache.key`: kept apart from the cache itself, so that
/// whoever can write the cache directory cannot forge its entries.
pub fn default_cache_key_file() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("SOPHON_HOME") {
        return Some(PathBuf::from(home).join("cache.key"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".sophon/cache.key"))
}

/// The thread that advances the engine's epoch; it stops when the last holder drops it.
pub(crate) struct Ticker {
    stop: Arc<AtomicBool>,
    thread: parking_lot::Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

/// The node's engine and its epoch ticker.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) config: RuntimeConfig,
    pub(crate) linker: Arc<wasmtime::component::Linker<sandbox::Sandbox>>,
    /// Compiled components by SHA-256, so models sharing a component share its code in memory.
    pub(crate) components: Arc<cache::Loaded>,
    /// Authenticates AOT cache entries before they are deserialised.
    pub(crate) cache_key: Arc<cache::CacheKey>,
    /// Held by the runtime and by every model, so deadlines advance while any of them lives.
    pub(crate) ticker: Arc<Ticker>,
    /// The instances models may make ahead of their requests.
    pub(crate) spares: Arc<sandbox::Spares>,
}

impl Runtime {
    /// Build the engine, the shared linker (WASI p2 + wasi-nn) and start the epoch ticker.
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Runtime> {
        config.validate()?;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(config.max_instances)
            .total_core_instances(config.max_instances.saturating_mul(4))
            .total_memories(config.max_instances)
            .total_tables(config.max_instances.saturating_mul(2))
            .max_memory_size(config.max_memory_bytes as usize)
            // A fresh instance per request makes slot reuse the hot path: with PAGEMAP_SCAN
            // (Linux 6.7+) only the pages a request dirtied are reset, by memset, and stay
            // resident, instead of madvise plus page faults on the next request.
            .pagemap_scan(Enabled::Auto)
            .linear_memory_keep_resident(config.keep_resident_bytes)
            .table_keep_resident(config.keep_resident_bytes.min(1 << 20));
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            // Errors raised inside a guest call carry its Wasm backtrace; the sandbox tells a
            // copy refused on the way in (a host call's arguments) from one on the way out
            // (the export's results) by it.
            .wasm_backtrace_max_frames(std::num::NonZeroUsize::new(20))
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&wasm).wt()?;
        let linker = sandbox::linker(&engine)?;

        let cache_key = Arc::new(cache::CacheKey::load(config.cache_key_file.as_deref())?);
        let stop = Arc::new(AtomicBool::new(false));
        let (tick_engine, thread_stop, tick) = (engine.clone(), stop.clone(), config.epoch_tick);
        let thread = std::thread::Builder::new()
            .name("sophon-epoch".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    tick_engine.increment_epoch();
                }
            })?;
        let spares = sandbox::Spares::new(config.max_instances);
        Ok(Runtime {
            engine,
            config,
            linker: Arc::new(linker),
            components: Arc::default(),
            cache_key,
            spares,
            ticker: Arc::new(Ticker {
                stop,
                thread: parking_lot::Mutex::new(Some(thread)),
            }),
        })
    }

    /// The engine (for compiling and benchmarks).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}
