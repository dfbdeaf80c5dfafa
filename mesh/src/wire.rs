//! What mesh nodes and coordinators say to each other: the frame kinds and the JSON bodies of
//! node traffic. The node crate and the coordinator crate never depend on each other; they meet
//! here, on the wire.
//!
//! # Streams a node opens to a coordinator
//! - [`kind::NODE_JOIN`] (no certificate yet): a [`NodeJoinRequest`] with a node join token and
//!   a CSR; the answer is a [`NodeJoinAnswer`] with the certificate for `node/<id>`.
//! - [`kind::HEARTBEAT`] (node certificate): a [`Heartbeat`] every second (with a
//!   [`PerfReport`] per model version every few seconds); the answer is a [`HeartbeatAnswer`],
//!   which names the leader when this coordinator is not it.
//! - [`kind::WATCH`] (node certificate): a [`WatchRequest`], then the coordinator pushes a
//!   [`View`] frame whenever what the node should know changed (and at least every
//!   [`WATCH_KEEPALIVE_MS`]), until either side closes.
//! - [`kind::BLOB_GET`] (node certificate): a bundle digest; the answer is the bundle's bytes in
//!   frames of that kind, then the stream's end (or one error frame).
//!
//! # Streams a node opens to another node
//! - [`kind::INFER`]: a [`ForwardRequest`] frame, then the request body in [`kind::DATA`]
//!   frames; the answer is a [`ForwardAnswer`] frame, then the response body in `DATA` frames.
//!   Bodies travel as the client sent them (V2 JSON or binary tensors), never re-encoded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Frame kinds of node traffic (the coordinators' own kinds are below 20).
pub mod kind {
    /// The coordinators' kind for fetching a bundle by digest; nodes use it too.
    pub const BLOB_GET: u8 = 5;
    pub const NODE_JOIN: u8 = 20;
    pub const HEARTBEAT: u8 = 21;
    pub const WATCH: u8 = 22;
    /// A pushed [`View`](super::View).
    pub const VIEW: u8 = 23;
    /// A node asks the leader to activate a deployment at zero replicas ([`Activate`](super::Activate)).
    pub const ACTIVATE: u8 = 24;
    pub const INFER: u8 = 30;
    pub const DATA: u8 = 31;
    /// An answer that carries a JSON body.
    pub const OK: u8 = 100;
    /// An answer that carries a JSON [`WireError`](super::WireError).
    pub const ERR: u8 = 101;
}

/// A coordinator pushes a view at least this often, so a node notices a dead watch.
pub const WATCH_KEEPALIVE_MS: u64 = 5_000;

/// The largest JSON frame of node traffic (a view of a large cluster is the largest).
pub const MAX_CONTROL_FRAME: usize = 16 << 20;

/// An error as the coordinators' API and mesh answer it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// HTTP-like status: 400 bad request, 401/403 refused, 404 unknown, 503 retry.
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// One accelerator a node has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accelerator {
    /// Like `NVIDIA H100 80GB HBM3` or `Intel NPU`.
    pub model: String,
    pub memory_mb: u64,
}

/// What a node has and can run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub cpu_cores: u32,
    /// Host memory available to replicas.
    pub memory_mb: u64,
    #[serde(default)]
    pub gpus: Vec<Accelerator>,
    #[serde(default)]
    pub npus: Vec<Accelerator>,
    /// The wasi-nn backends this node can run (`tract`, ...).
    #[serde(default)]
    pub backends: Vec<String>,
}

/// What a node says about itself when it joins, and again whenever it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    /// Where other members reach its QUIC endpoint (`host:port`).
    pub mesh_address: String,
    /// Where clients reach its V2 HTTP endpoint (`host:port`).
    pub http_address: String,
    pub inventory: Inventory,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub zone: String,
    /// The environments it serves; empty: every environment.
    #[serde(default)]
    pub environments: Vec<String>,
    /// The sophon version it runs.
    pub version: String,
}

/// A node's first request: a node join token, its key's CSR, and what it is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeJoinRequest {
    pub secret: String,
    pub csr_pem: String,
    pub node: NodeInfo,
}

/// The answer to a node join: its certificate and the cluster's CA and coordinators.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeJoinAnswer {
    pub cert_pem: String,
    pub ca_pem: String,
    /// The coordinators' mesh addresses.
    pub coordinators: Vec<String>,
}

/// Where a replica stands on its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Placed; the node has not started on it.
    Pending,
    /// The bundle is being fetched.
    Fetching,
    /// The bundle is being verified and loaded.
    Loading,
    /// Serving.
    Ready,
    /// The node cannot serve it; the reason says why.
    Failed,
    /// Taken out of service on its node through the repository API (`unload`): routed
    /// around, not moved, until it is loaded there again.
    Unloaded,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Pending => "pending",
            ReplicaState::Fetching => "fetching",
            ReplicaState::Loading => "loading",
            ReplicaState::Ready => "ready",
            ReplicaState::Failed => "failed",
            ReplicaState::Unloaded => "unloaded",
        }
    }
}

/// Which replica of which deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplicaId {
    pub deployment: u64,
    /// The deployment's revision (its version at the time): a rolling update runs two.
    #[serde(default = "first_revision")]
    pub revision: u32,
    pub replica: u32,
}

/// How one replica on a node is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub deployment: u64,
    /// The deployment's revision (its version at the time): a rolling update runs two.
    #[serde(default = "first_revision")]
    pub revision: u32,
    pub replica: u32,
    pub state: ReplicaState,
    /// Why it failed (the backend's error, a verification failure...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One model version's performance on a node over the last report period: counts, and the
/// latency histograms (HDR, microseconds) as `[value, count]` pairs of their recorded buckets,
/// so that the coordinators merge them exactly rather than averaging percentiles.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerfReport {
    pub model: String,
    pub version: String,
    /// Requests finished in the period, and how many of them failed.
    pub count: u64,
    pub errors: u64,
    /// The period's length, to turn counts into rates.
    pub period_ms: u64,
    /// Time waiting for an instance slot.
    pub queue_us: Vec<[u64; 2]>,
    /// Time in the guest (instantiate excluded).
    pub compute_us: Vec<[u64; 2]>,
    /// Time from the request's arrival to its answer.
    pub total_us: Vec<[u64; 2]>,
    /// The requests' total time summed: over `period_ms`, the average number in flight
    /// (Little's law), which the autoscaler sizes deployments by.
    #[serde(default)]
    pub busy_us: u64,
}

/// Latencies in reports are kept from 1 µs to 10 minutes, with 2 significant digits.
pub const MAX_LATENCY_US: u64 = 600_000_000;

/// An empty latency histogram of the shape reports use.
pub fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, MAX_LATENCY_US, 2)
        .expect("1 µs to 10 minutes at 2 significant digits is a valid histogram")
}

/// A histogram's recorded buckets as `[value, count]` pairs (what a report carries).
pub fn histogram_pairs(h: &hdrhistogram::Histogram<u64>) -> Vec<[u64; 2]> {
    h.iter_recorded()
        .map(|v| {
            [
                h.highest_equivalent(v.value_iterated_to()),
                v.count_at_value(),
            ]
        })
        .collect()
}

/// Add a report's `[value, count]` pairs to `into` (merging is exact at bucket resolution).
pub fn merge_pairs(into: &mut hdrhistogram::Histogram<u64>, pairs: &[[u64; 2]]) {
    for [value, count] in pairs {
        let _ = into.record_n((*value).clamp(1, MAX_LATENCY_US), *count);
    }
}

/// A node's load now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Requests being served (local and forwarded to this node).
    pub inflight: u32,
    /// Requests waiting for an instance.
    pub queued: u32,
    /// Across all cores, 0 to 100.
    pub cpu_percent: u32,
    pub memory_used_mb: u64,
}

/// A node is alive: its load, its replicas' states, and its performance since the last report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub load: NodeLoad,
    pub replicas: Vec<ReplicaReport>,
    /// Sent every few heartbeats, empty otherwise.
    #[serde(default)]
    pub perf: Vec<PerfReport>,
    /// The memory each model version placed here took when it loaded, as measured: new
    /// figures for a few heartbeats, all of them now and then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory: Vec<ModelMemory>,
}

/// What one model version holds in memory once loaded on a node, measured there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelMemory {
    pub model: String,
    pub version: String,
    pub bytes: u64,
}

/// A coordinator's answer to a heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    /// This coordinator leads and took the heartbeat.
    pub accepted: bool,
    /// When it does not: the leader's mesh address, if known.
    #[serde(default)]
    pub leader: Option<String>,
    /// How long the node may stay silent before it is marked down.
    pub grace_ms: u64,
}

/// A request arrived for a deployment with no ready replica: give it one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activate {
    pub deployment: u64,
}

/// Start (or resume) watching: views already seen up to `after_index` need not be sent again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRequest {
    pub after_index: u64,
}

/// A replica this node must run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub deployment: u64,
    /// The deployment's revision (its version at the time): a rolling update runs two.
    #[serde(default = "first_revision")]
    pub revision: u32,
    pub replica: u32,
    pub model: String,
    pub version: String,
    /// The bundle's digest (sha256 of the bundle file, hex).
    pub digest: String,
    /// Load the model at once and evict it last; otherwise it loads on its first request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hot: bool,
}

/// A node that serves a deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub node: String,
    pub mesh_address: String,
    /// Its replicas of the deployment that are ready.
    pub ready: u32,
}

fn first_revision() -> u32 {
    1
}

/// A deployment as the routers see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub deployment: u64,
    /// One route per revision: during a rolling update the old and the new both serve, and a
    /// request that names no version goes to the newest revision with a ready replica.
    #[serde(default = "first_revision")]
    pub revision: u32,
    pub model: String,
    pub version: String,
    pub environment: String,
    /// The bundle's digest, so a router can answer metadata it has not loaded.
    pub digest: String,
    pub replicas: u32,
    /// The nodes with ready replicas.
    pub endpoints: Vec<Endpoint>,
    /// During a canary, this revision's share of the requests that name no version, in percent
    /// (`None`: no canary; revisions share in proportion to their ready replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// A mirrored canary: `weight` is the share of requests copied here, whose answers are
    /// dropped; clients are answered by the other revision.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mirror: bool,
    /// The deployment is autoscaled: nodes report its performance every heartbeat, and a
    /// request for it while no replica is ready is held while it is activated.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub autoscaled: bool,
}

/// What a node should know, as of the coordinators' applied index `index`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    pub index: u64,
    /// The replicas placed on this node.
    pub assignments: Vec<Assignment>,
    /// Every deployment in the environments this node serves.
    pub routes: Vec<Route>,
    /// The coordinators' mesh addresses.
    pub coordinators: Vec<String>,
    /// The node is draining: it receives no new replicas.
    #[serde(default)]
    pub draining: bool,
    /// The node was removed from the cluster: it must stop.
    #[serde(default)]
    pub removed: bool,
    /// The cluster's trusted publisher keys (hex ed25519), to verify bundles with.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// The nodes of the cluster and their certificates' serials (`None`: not recorded): who
    /// may forward requests to this node.
    #[serde(default)]
    pub members: BTreeMap<String, Option<String>>,
}

/// A V2 request (`/v2/models/...`: infer, metadata, ready, config, stats) forwarded from the
/// node that received it to a node with a ready replica, which serves it as if it had arrived
/// over HTTP, and never forwards it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// The path and query, like `/v2/models/mlp/infer`.
    pub path: String,
    /// Time left for the request when it was forwarded.
    pub deadline_ms: u64,
    /// The client's `Content-Type`, if any.
    #[serde(default)]
    pub content_type: Option<String>,
    /// The client's `Inference-Header-Content-Length` (binary tensor data), if any.
    #[serde(default)]
    pub header_length: Option<usize>,
    /// The body's length; the body follows in `DATA` frames.
    pub body_length: usize,
}

/// The answer to a forwarded prediction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardAnswer {
    pub status: u16,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub header_length: Option<usize>,
    pub body_length: usize,
    /// The request reached a guest (a retry elsewhere could run it twice).
    pub ran: bool,
}

/// Split a join token, `sophon-join:<CA fingerprint>:<secret>@<host:port>`, into its parts.
pub fn parse_join_token(s: &str) -> Result<(String, String, String), String> {
    let bad = || {
        "expected sophon-join:<fingerprint>:<secret>@<host:port>, as `sophon node join-token` \
         prints it"
            .to_string()
    };
    let rest = s.trim().strip_prefix("sophon-join:").ok_or_else(bad)?;
    let (creds, address) = rest.rsplit_once('@').ok_or_else(bad)?;
    let (fingerprint, secret) = creds.split_once(':').ok_or_else(bad)?;
    if fingerprint.len() != 64 || secret.is_empty() || address.is_empty() {
        return Err(bad());
    }
    Ok((fingerprint.into(), secret.into(), address.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_round_trips_and_old_fields_default() {
        let view = View {
            index: 7,
            assignments: vec![Assignment {
                revision: 1,
                deployment: 1,
                replica: 0,
                model: "mlp".into(),
                version: "1".into(),
                digest: "ab".into(),
                hot: false,
            }],
            routes: Vec::new(),
            coordinators: vec!["127.0.0.1:7000".into()],
            draining: false,
            removed: false,
            trusted_keys: Vec::new(),
            members: BTreeMap::new(),
        };
        let text = serde_json::to_string(&view).expect("encode");
        let back: View = serde_json::from_str(&text).expect("decode");
        assert_eq!(back, view);
        let minimal: View =
            serde_json::from_str(r#"{"index":1,"assignments":[],"routes":[],"coordinators":[]}"#)
                .expect("decode without the optional fields");
        assert!(!minimal.draining);
    }
}
