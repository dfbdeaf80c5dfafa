//! Performance of deployments and nodes, aggregated on the leader from the reports nodes send
//! with their heartbeats (every 5 s): counts, and latency histograms merged exactly (HDR, as
//! `[value, count]` pairs), never percentiles averaged. Reports older than three periods are
//! left out. Served at `/v1/deployments/{id}/stats` and `/v1/nodes/{id}/stats` (a follower asks
//! the leader), and as the leader's Prometheus gauges.
//!
//! The leader also keeps the last hour of each deployment's figures, sampled every 5 s
//! ([`Series`]), for the console's charts: `/v1/deployments/{id}/series` and
//! `/v1/cluster/series`. Like the reports, it is soft state: a new leader starts an empty hour.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use sophon_mesh::wire;

use super::Core;
use super::nodes::{Directory, Liveness};
use super::transport::kind;
use crate::{Error, Result};

/// What a stats request asks for.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatsQuery {
    Deployment(u64),
    Node(String),
    /// The last hour of a deployment's figures (`None`: the whole cluster's).
    Series(Option<u64>),
}

/// The node loop's ticks (100 ms) between two samples of the series: 5 s.
pub(super) const SAMPLE_TICKS: u64 = 50;
/// Samples kept: an hour.
pub(super) const SAMPLES: usize = 720;

/// The last hour of figures, per deployment and for the cluster, sampled on the leader.
#[derive(Debug, Default)]
pub struct Series {
    deployments: std::collections::HashMap<u64, std::collections::VecDeque<Value>>,
    cluster: std::collections::VecDeque<Value>,
}

fn push(points: &mut std::collections::VecDeque<Value>, point: Value) {
    if points.len() == SAMPLES {
        points.pop_front();
    }
    points.push_back(point);
}

impl Series {
    /// One sample of every deployment (its rate, errors, p50 and p99, replicas, and each node's
    /// rate) and of the cluster's totals, at wall-clock time `at_ms`.
    pub fn sample(&mut self, dir: &Directory, liveness: &Liveness, now: Instant, at_ms: u64) {
        let ids: std::collections::BTreeSet<u64> =
            dir.routes.iter().map(|r| r.deployment).collect();
        self.deployments.retain(|id, _| ids.contains(id));
        let (mut rate, mut errors) = (0.0, 0.0);
        for id in &ids {
            let Some(v) = deployment(dir, liveness, *id, now) else {
                continue;
            };
            let nodes: serde_json::Map<String, Value> = v["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| Some((n["node"].as_str()?.to_string(), n["rate_per_s"].clone())))
                .collect();
            rate += v["rate_per_s"].as_f64().unwrap_or(0.0);
            errors += v["error_rate_per_s"].as_f64().unwrap_or(0.0);
            let point = json!({
                "t_ms": at_ms,
                "rate": v["rate_per_s"],
                "errors": v["error_rate_per_s"],
                "p50_us": v["total_us"]["p50"],
                "p99_us": v["total_us"]["p99"],
                "ready": v["ready"],
                "wanted": v["replicas"],
                "nodes": nodes,
            });
            push(self.deployments.entry(*id).or_default(), point);
        }
        let point =
            json!({"t_ms": at_ms, "rate": rate, "errors": errors, "deployments": ids.len()});
        push(&mut self.cluster, point);
    }

    fn json(&self, deployment: Option<u64>) -> Option<Value> {
        let points = match deployment {
            Some(id) => self.deployments.get(&id)?,
            None => &self.cluster,
        };
        Some(json!({
            "interval_ms": SAMPLE_TICKS * 100,
            "points": points,
        }))
    }
}

impl Core {
    /// Stats from this coordinator's soft state; only the leader has it.
    pub(super) fn local_stats(&self, query: &StatsQuery) -> Result<Value> {
        let dir = self.nodes.directory();
        let liveness = self.nodes.liveness.lock();
        if !liveness.leads() {
            return Err(Error::NotLeader {
                id: self.id,
                leader: self.driver.status().leader,
            });
        }
        let now = Instant::now();
        let found = match query {
            StatsQuery::Deployment(id) => deployment(&dir, &liveness, *id, now),
            StatsQuery::Node(id) => node(&dir, &liveness, id, now),
            // A deployment not sampled yet (new, or a new leader) has an empty hour.
            StatsQuery::Series(Some(id)) if dir.routes.iter().any(|r| r.deployment == *id) => {
                liveness
                    .series
                    .json(Some(*id))
                    .or_else(|| Some(json!({"interval_ms": SAMPLE_TICKS * 100, "points": []})))
            }
            StatsQuery::Series(None) => liveness.series.json(None),
            StatsQuery::Series(Some(_)) => None,
        };
        let mut v = found.ok_or_else(|| match query {
            StatsQuery::Deployment(id) | StatsQuery::Series(Some(id)) => {
                Error::UnknownDeployment { id: *id }
            }
            StatsQuery::Node(id) => Error::UnknownNode { id: id.clone() },
            StatsQuery::Series(None) => Error::UnknownDeployment { id: 0 },
        })?;
        v["reported_by"] = json!(format!("coordinator {} (leader)", self.id));
        Ok(v)
    }

    /// Stats from the leader: here if this coordinator leads, else asked over the mesh.
    pub async fn stats(&self, query: StatsQuery) -> Result<Value> {
        match self.leader_elsewhere()? {
            None => self.local_stats(&query),
            Some(leader) => self.peers.call::<Value>(leader, kind::STATS, &query).await,
        }
    }
}

/// A report older than this is stale.
pub(super) const FRESH: Duration = Duration::from_secs(15);

use sophon_mesh::wire::latency_histogram as histogram;

/// Merged reports of one model version.
pub(super) struct Merged {
    count: u64,
    errors: u64,
    /// Sum over reports of count / period: requests per second.
    rate: f64,
    error_rate: f64,
    queue: Histogram<u64>,
    compute: Histogram<u64>,
    total: Histogram<u64>,
}

impl Merged {
    pub(super) fn new() -> Merged {
        Merged {
            count: 0,
            errors: 0,
            rate: 0.0,
            error_rate: 0.0,
            queue: histogram(),
            compute: histogram(),
            total: histogram(),
        }
    }

    /// The figures a canary is judged on: counts, and the total latency's p50 and p99.
    pub(super) fn figures(&self) -> crate::state::canary::Figures {
        let q = |p| (!self.total.is_empty()).then(|| self.total.value_at_quantile(p));
        crate::state::canary::Figures {
            requests: self.count,
            errors: self.errors,
            p50_us: q(0.5),
            p99_us: q(0.99),
        }
    }

    pub(super) fn add(&mut self, r: &wire::PerfReport) {
        self.count += r.count;
        self.errors += r.errors;
        let secs = (r.period_ms.max(1) as f64) / 1000.0;
        self.rate += r.count as f64 / secs;
        self.error_rate += r.errors as f64 / secs;
        wire::merge_pairs(&mut self.queue, &r.queue_us);
        wire::merge_pairs(&mut self.compute, &r.compute_us);
        wire::merge_pairs(&mut self.total, &r.total_us);
    }

    fn quantiles(h: &Histogram<u64>) -> Value {
        if h.is_empty() {
            return json!({"p50": null, "p99": null});
        }
        json!({"p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99)})
    }

    fn json(&self) -> Value {
        json!({
            "count": self.count,
            "errors": self.errors,
            "rate_per_s": (self.rate * 100.0).round() / 100.0,
            "error_rate_per_s": (self.error_rate * 100.0).round() / 100.0,
            "queue_us": Self::quantiles(&self.queue),
            "compute_us": Self::quantiles(&self.compute),
            "total_us": Self::quantiles(&self.total),
        })
    }
}

/// The fresh reports of `node` for `model@version`.
fn reports<'a>(
    liveness: &'a Liveness,
    node: &str,
    model: &'a str,
    version: &'a str,
    now: Instant,
) -> impl Iterator<Item = &'a wire::PerfReport> + 'a {
    liveness
        .seen(node)
        .into_iter()
        .flat_map(|s| s.perf.iter())
        .filter(move |(at, r)| {
            now.saturating_duration_since(*at) < FRESH && r.model == model && r.version == version
        })
        .map(|(_, r)| r)
}

/// A deployment's performance across the nodes that run it (`None`: no such deployment).
pub fn deployment(dir: &Directory, liveness: &Liveness, id: u64, now: Instant) -> Option<Value> {
    let route = dir.routes.iter().find(|r| r.deployment == id)?;
    let mut all = Merged::new();
    let mut nodes = Vec::new();
    let mut hosts: Vec<&String> = dir
        .assignments
        .iter()
        .filter(|(_, a)| a.iter().any(|a| a.deployment == id))
        .map(|(node, _)| node)
        .collect();
    hosts.sort();
    for node in hosts {
        let mut here = Merged::new();
        for r in reports(liveness, node, &route.model, &route.version, now) {
            here.add(r);
            all.add(r);
        }
        let mut v = here.json();
        v["node"] = json!(node);
        nodes.push(v);
    }
    let ready: u32 = route.endpoints.iter().map(|e| e.ready).sum();
    // Every revision it runs, each with its own figures and share (a canary's weight).
    let revisions: Vec<Value> = dir
        .routes
        .iter()
        .filter(|r| r.deployment == id)
        .map(|r| {
            let mut m = Merged::new();
            for node in dir.assignments.keys() {
                for rep in reports(liveness, node, &r.model, &r.version, now) {
                    m.add(rep);
                }
            }
            let mut v = m.json();
            v["revision"] = json!(r.revision);
            v["version"] = json!(r.version);
            v["weight"] = json!(r.weight);
            v["mirror"] = json!(r.mirror);
            v["ready"] = json!(r.endpoints.iter().map(|e| e.ready).sum::<u32>());
            v
        })
        .collect();
    let mut v = all.json();
    v["revisions"] = json!(revisions);
    v["deployment"] = json!(id);
    v["model"] = json!(route.model);
    v["version"] = json!(route.version);
    v["environment"] = json!(route.environment);
    v["replicas"] = json!(route.replicas);
    v["ready"] = json!(ready);
    v["nodes"] = json!(nodes);
    Some(v)
}

/// A node's performance, per model version it serves (`None`: no such node).
pub fn node(dir: &Directory, liveness: &Liveness, id: &str, now: Instant) -> Option<Value> {
    dir.nodes.get(id)?;
    let seen = liveness.seen(id);
    let models: Vec<Value> = seen
        .map(|s| {
            s.perf
                .iter()
                .filter(|(at, _)| now.saturating_duration_since(*at) < FRESH)
                .map(|(_, r)| {
                    let mut m = Merged::new();
                    m.add(r);
                    let mut v = m.json();
                    v["model"] = json!(r.model);
                    v["version"] = json!(r.version);
                    v
                })
                .collect()
        })
        .unwrap_or_default();
    Some(json!({
        "node": id,
        "load": seen.map(|s| json!(s.load)),
        "last_heard_ms_ago": seen.map(|s| now.saturating_duration_since(s.at).as_millis() as u64),
        "models": models,
    }))
}

/// Set the per-deployment gauges from the reports (on the leader; elsewhere they are cleared).
pub fn export(
    metrics: &super::metrics::Metrics,
    dir: &Directory,
    liveness: &Liveness,
    now: Instant,
) {
    metrics.deployment_rate.reset();
    metrics.deployment_latency.reset();
    metrics.deployment_replicas.reset();
    metrics.node_up.reset();
    metrics.node_draining.reset();
    if !liveness.leads() {
        return;
    }
    for (id, n) in &dir.nodes {
        let up = n.health == crate::state::members::NodeHealth::Up;
        metrics.node_up.with_label_values(&[id]).set(i64::from(up));
        metrics
            .node_draining
            .with_label_values(&[id])
            .set(i64::from(n.draining));
    }
    for route in &dir.routes {
        let Some(v) = deployment(dir, liveness, route.deployment, now) else {
            continue;
        };
        let id = route.deployment.to_string();
        let model = format!("{}@{}", route.model, route.version);
        let rate = v["rate_per_s"].as_f64().unwrap_or(0.0);
        let errors = v["error_rate_per_s"].as_f64().unwrap_or(0.0);
        metrics
            .deployment_rate
            .with_label_values(&[&id, &model, "success"])
            .set((rate - errors).max(0.0));
        metrics
            .deployment_rate
            .with_label_values(&[&id, &model, "error"])
            .set(errors);
        for phase in ["queue", "compute", "total"] {
            for q in ["p50", "p99"] {
                if let Some(us) = v[format!("{phase}_us")][q].as_u64() {
                    metrics
                        .deployment_latency
                        .with_label_values(&[&id, &model, phase, q])
                        .set(us as f64 / 1e6);
                }
            }
        }
        for (state, n) in [
            ("wanted", route.replicas),
            ("ready", v["ready"].as_u64().unwrap_or(0) as u32),
        ] {
            metrics
                .deployment_replicas
                .with_label_values(&[&id, &model, state])
                .set(f64::from(n));
        }
    }
}
