//! Per-model statistics: Triton's statistics extension (`{count, ns}` per phase) and the
//! Prometheus metrics, both fed by the same measurements of each request.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A Triton `{count, ns}` pair.
#[derive(Default, Debug)]
pub struct Phase {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Phase {
    /// Add one occurrence that took `d`.
    pub fn record(&self, d: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// How many occurrences so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn json(&self) -> Value {
        json!({"count": self.count.load(Ordering::Relaxed), "ns": self.ns.load(Ordering::Relaxed)})
    }
}

/// Triton's statistics for one model version.
#[derive(Default, Debug)]
pub struct ModelStats {
    pub success: Phase,
    pub fail: Phase,
    pub queue: Phase,
    pub compute_input: Phase,
    pub compute_infer: Phase,
    pub compute_output: Phase,
    pub inference_count: AtomicU64,
    pub execution_count: AtomicU64,
    pub last_inference_ms: AtomicU64,
    /// Per batch size: executions of the model and their compute phases (Triton's
    /// `batch_stats`).
    batches: parking_lot::Mutex<std::collections::BTreeMap<u64, [Phase; 3]>>,
    /// Held while a request's compute phases are recorded and while the statistics are read,
    /// so a reader never sees one phase counted and the next not yet.
    consistent: parking_lot::Mutex<()>,
}

impl ModelStats {
    /// Record one answered request: its compute phases (input: instantiating the guest; infer:
    /// the guest's call; output: encoding the response), the `rows` it inferred, and, for the
    /// request that carries its batch's execution, the batch size that call computed.
    pub fn answered(
        &self,
        input: Duration,
        infer: Duration,
        output: Duration,
        rows: u64,
        execution: Option<u64>,
    ) {
        let _one_at_a_time = self.consistent.lock();
        self.compute_input.record(input);
        self.compute_infer.record(infer);
        self.compute_output.record(output);
        self.inference_count.fetch_add(rows, Ordering::Relaxed);
        if let Some(batch) = execution {
            self.executed(batch, input, infer, output);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last_inference_ms.store(now, Ordering::Relaxed);
    }

    /// Record one call of the model that computed `batch` rows, with its phases.
    fn executed(&self, batch: u64, input: Duration, infer: Duration, output: Duration) {
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        let mut batches = self.batches.lock();
        let phases = batches.entry(batch).or_default();
        phases[0].record(input);
        phases[1].record(infer);
        phases[2].record(output);
    }

    /// Record the call that a request carried when the request itself failed after it (its
    /// outputs could not be answered): the call ran, and its batch-mates were answered from it,
    /// so the execution counts though the request does not.
    pub fn executed_for_failed(
        &self,
        batch: u64,
        input: Duration,
        infer: Duration,
        output: Duration,
    ) {
        let _one_at_a_time = self.consistent.lock();
        self.executed(batch, input, infer, output);
    }

    /// The `model_stats` entry for this version, in Triton's shape.
    pub fn json(&self, name: &str, version: &str) -> Value {
        let _consistent = self.consistent.lock();
        json!({
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms.load(Ordering::Relaxed),
            "inference_count": self.inference_count.load(Ordering::Relaxed),
            "execution_count": self.execution_count.load(Ordering::Relaxed),
            "inference_stats": {
                "success": self.success.json(),
                "fail": self.fail.json(),
                "queue": self.queue.json(),
                "compute_input": self.compute_input.json(),
                "compute_infer": self.compute_infer.json(),
                "compute_output": self.compute_output.json(),
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": self.batches.lock().iter().map(|(size, [input, infer, output])| json!({
                "batch_size": size,
                "compute_input": input.json(),
                "compute_infer": infer.json(),
                "compute_output": output.json(),
            })).collect::<Vec<_>>(),
            "memory_usage": [],
        })
    }
}

/// Latency buckets from 10 µs to 10 s.
const BUCKETS: [f64; 19] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The node's Prometheus registry and metric families.
pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    queue: HistogramVec,
    compute: HistogramVec,
    total: HistogramVec,
    inflight_model: IntGaugeVec,
    /// Requests being served right now, all models.
    pub inflight: IntGauge,
    /// Models loaded and serving.
    pub models_loaded: IntGauge,
    /// HTTP and gRPC connections open now.
    pub connections_open: IntGauge,
    /// Connections refused because their client held its cap (`--max-connections-per-client`).
    pub connections_refused: IntCounter,
}

impl Metrics {
    /// Create and register every family (and the process collector).
    pub fn new() -> anyhow::Result<Metrics> {
        let registry = Registry::new();
        // `device`: where the model's graphs run (`cpu`, `gpu`, `npu`).
        let labels = &["model", "version", "device"];
        let requests = IntCounterVec::new(
            Opts::new(
                "sophon_inference_requests_total",
                "Inference requests by model, version and outcome",
            ),
            &["model", "version", "device", "outcome"],
        )?;
        let hist = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
                labels,
            )
        };
        let queue = hist(
            "sophon_inference_queue_seconds",
            "Time a request waited for a free slot of its model",
        )?;
        let compute = hist(
            "sophon_inference_compute_seconds",
            "Time in the sandbox: instantiation plus the predict call",
        )?;
        let total = hist(
            "sophon_inference_request_seconds",
            "Whole request time, from the first byte read to the response built",
        )?;
        let inflight_model = IntGaugeVec::new(
            Opts::new("sophon_inference_inflight", "Requests in flight per model"),
            &["model"],
        )?;
        let inflight = IntGauge::new("sophon_inflight_requests", "Requests in flight, all models")?;
        let models_loaded = IntGauge::new("sophon_models_loaded", "Model versions serving")?;
        let connections_open = IntGauge::new(
            "sophon_connections_open",
            "HTTP and gRPC connections open now",
        )?;
        let connections_refused = IntCounter::new(
            "sophon_connections_refused_total",
            "Connections refused because their client held its limit of connections",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(queue.clone()))?;
        registry.register(Box::new(compute.clone()))?;
        registry.register(Box::new(total.clone()))?;
        registry.register(Box::new(inflight_model.clone()))?;
        registry.register(Box::new(inflight.clone()))?;
        registry.register(Box::new(models_loaded.clone()))?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        register_hardware(&registry)?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Metrics {
            registry,
            requests,
            queue,
            compute,
            total,
            inflight_model,
            inflight,
            models_loaded,
            connections_open,
            connections_refused,
        })
    }

    /// Pre-resolved handles for one model version running on `device`, so the hot path does
    /// no label lookups.
    pub fn for_model(&self, model: &str, version: &str, device: &str) -> ModelMetrics {
        ModelMetrics {
            model: model.to_string(),
            version: version.to_string(),
            device: device.to_string(),
            requests: self.requests.clone(),
            success: self
                .requests
                .with_label_values(&[model, version, device, "success"]),
            queue: self.queue.with_label_values(&[model, version, device]),
            compute: self.compute.with_label_values(&[model, version, device]),
            total: self.total.with_label_values(&[model, version, device]),
            inflight: self.inflight_model.with_label_values(&[model]),
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }
}

/// What the node has, as gauges: each backend (1 here, 0 absent), CPU cores, and each NVIDIA
/// GPU's memory. Filled at the first scrape, so that probing the hardware (loading native
/// libraries) stays off the start-up path.
struct HardwareGauges {
    backends: IntGaugeVec,
    cores: IntGauge,
    gpus: IntGaugeVec,
    filled: std::sync::Once,
}

impl HardwareGauges {
    fn new() -> prometheus::Result<HardwareGauges> {
        Ok(HardwareGauges {
            backends: IntGaugeVec::new(
                Opts::new(
                    "sophon_node_backend_present",
                    "wasi-nn backends of this node: 1 present, 0 absent",
                ),
                &["backend"],
            )?,
            cores: IntGauge::new("sophon_node_cpu_cores", "CPU cores of this node")?,
            gpus: IntGaugeVec::new(
                Opts::new(
                    "sophon_node_gpu_memory_bytes",
                    "Memory of each NVIDIA GPU of this node",
                ),
                &["gpu", "name"],
            )?,
            filled: std::sync::Once::new(),
        })
    }

    fn fill(&self) {
        let hw = crate::hardware::hardware();
        for (backend, state) in &hw.backends {
            self.backends
                .with_label_values(&[backend.as_str()])
                .set(i64::from(state.is_ok()));
        }
        self.cores.set(hw.cpu_cores as i64);
        for g in &hw.gpus {
            self.gpus
                .with_label_values(&[&g.index.to_string(), &g.name])
                .set((g.memory_mb << 20) as i64);
        }
    }
}

impl prometheus::core::Collector for HardwareGauges {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d = self.backends.desc();
        d.extend(self.cores.desc());
        d.extend(self.gpus.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.filled.call_once(|| self.fill());
        let mut m = self.backends.collect();
        m.extend(self.cores.collect());
        m.extend(self.gpus.collect());
        m
    }
}

fn register_hardware(registry: &Registry) -> prometheus::Result<()> {
    registry.register(Box::new(HardwareGauges::new()?))
}

/// One model version's metric handles.
pub struct ModelMetrics {
    model: String,
    version: String,
    device: String,
    requests: IntCounterVec,
    success: IntCounter,
    /// Queue wait.
    pub queue: Histogram,
    /// Sandbox time.
    pub compute: Histogram,
    /// Whole request.
    pub total: Histogram,
    /// In flight for this model.
    pub inflight: IntGauge,
}

impl ModelMetrics {
    /// Count a request by its outcome (`success`, `bad_request`, `overloaded`, `timeout`, ...).
    pub fn outcome(&self, outcome: &str) {
        if outcome == "success" {
            self.success.inc();
        } else {
            self.requests
                .with_label_values(&[&self.model, &self.version, &self.device, outcome])
                .inc();
        }
    }
}
