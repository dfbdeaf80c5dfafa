//! A coordinator's Prometheus metrics: Raft progress, proposals, and admin API latency.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use super::driver::RaftStatus;

/// The metrics, registered in their own registry (cheap to clone: every field is an `Arc`).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub term: IntGauge,
    pub commit_index: IntGauge,
    pub applied_index: IntGauge,
    pub is_leader: IntGauge,
    pub leader: IntGauge,
    pub voters: IntGauge,
    pub proposals: IntCounter,
    pub proposals_failed: IntCounter,
    pub applied: IntCounter,
    pub commit_latency: Histogram,
    pub api_latency: HistogramVec,
    pub blobs: IntGauge,
    pub blob_bytes: IntGauge,
    pub blobs_collected: IntCounter,
    /// Per deployment, from the nodes' reports (the leader sets them; one series per
    /// deployment and label value, so the count stays bounded by the deployments).
    pub deployment_rate: GaugeVec,
    pub deployment_latency: GaugeVec,
    pub deployment_replicas: GaugeVec,
    /// Per mesh node, as the leader sees it: 1 up, 0 down (and whether it is draining).
    pub node_up: IntGaugeVec,
    pub node_draining: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

/// Registers a metric built from constant names (a failure is a programming error).
fn registered<T: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<T>,
) -> T {
    let metric = metric.unwrap_or_else(|e| panic!("metric: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric: {e}"));
    metric
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| registered(&registry, IntGauge::new(name, help));
        let counter = |name: &str, help: &str| registered(&registry, IntCounter::new(name, help));
        let term = gauge("sophon_raft_term", "The current Raft term.");
        let commit_index = gauge(
            "sophon_raft_commit_index",
            "The highest committed log index.",
        );
        let applied_index = gauge(
            "sophon_raft_applied_index",
            "The highest applied log index.",
        );
        let is_leader = gauge("sophon_raft_is_leader", "1 if this coordinator leads.");
        let leader = gauge(
            "sophon_raft_leader_id",
            "The leader this coordinator knows of (0: none).",
        );
        let voters = gauge("sophon_raft_voters", "Voters in the current configuration.");
        let proposals = counter(
            "sophon_raft_proposals_total",
            "Entries proposed on this coordinator.",
        );
        let proposals_failed = counter(
            "sophon_raft_proposals_failed_total",
            "Proposals refused (not leader) or not confirmed in time.",
        );
        let applied = counter(
            "sophon_raft_applied_entries_total",
            "Normal entries applied.",
        );
        let commit_latency = registered(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "sophon_raft_proposal_seconds",
                    "From proposal to applied, for proposals made here.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            ),
        );
        let api_latency = registered(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "sophon_api_request_seconds",
                    "Admin API requests, by route, method and status.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["route", "method", "status"],
            ),
        );
        let blobs = gauge(
            "sophon_artifact_blobs",
            "Bundles stored on this coordinator.",
        );
        let blob_bytes = gauge("sophon_artifact_bytes", "Bytes of bundles stored here.");
        let blobs_collected = counter(
            "sophon_artifact_collected_total",
            "Unreferenced bundles garbage-collected here.",
        );
        let deployment_rate = registered(
            &registry,
            GaugeVec::new(
                Opts::new(
                    "sophon_deployment_requests_per_second",
                    "Predictions per second over the last report period, by outcome.",
                ),
                &["deployment", "model", "outcome"],
            ),
        );
        let deployment_latency = registered(
            &registry,
            GaugeVec::new(
                Opts::new(
                    "sophon_deployment_latency_seconds",
                    "Latency quantiles over the last report period, by phase (queue, compute, total).",
                ),
                &["deployment", "model", "phase", "quantile"],
            ),
        );
        let deployment_replicas = registered(
            &registry,
            GaugeVec::new(
                Opts::new("sophon_deployment_replicas", "Replicas wanted and ready."),
                &["deployment", "model", "state"],
            ),
        );
        let node_up = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "sophon_cluster_node_up",
                    "Mesh nodes as the leader sees them: 1 up, 0 down (set on the leader only).",
                ),
                &["node"],
            ),
        );
        let node_draining = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "sophon_cluster_node_draining",
                    "Mesh nodes being drained: 1 draining (set on the leader only).",
                ),
                &["node"],
            ),
        );
        Metrics {
            registry,
            node_up,
            node_draining,
            deployment_rate,
            deployment_latency,
            deployment_replicas,
            term,
            commit_index,
            applied_index,
            is_leader,
            leader,
            voters,
            proposals,
            proposals_failed,
            applied,
            commit_latency,
            api_latency,
            blobs,
            blob_bytes,
            blobs_collected,
        }
    }

    /// Records a replica's status.
    pub fn observe(&self, status: &RaftStatus) {
        self.term.set(status.term as i64);
        self.commit_index.set(status.commit_index as i64);
        self.applied_index.set(status.applied_index as i64);
        self.is_leader.set(i64::from(status.is_leader));
        self.leader.set(status.leader as i64);
        self.voters.set(status.voters.len() as i64);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
