//! Mesh nodes as the coordinators serve them (the wire is `sophon_mesh::wire`).
//!
//! - **Join** (`NODE_JOIN`, on a connection without a certificate): a node join token and a
//!   CSR. The leader checks the token, has the CSR signed for `node/<id>` (by the CA key here,
//!   or by a coordinator that holds it), commits `JoinNode` with the certificate's serial (which
//!   uses the token once), and answers with the certificate.
//! - **Liveness** is the leader's soft state ([`Liveness`]): heartbeats are not written through
//!   Raft. The leader commits only transitions: a node silent for the grace period is marked
//!   down; a replica that changed phase, or a down node heard from again, is reported
//!   (`ReportReplicas`). A new leader gives every node a fresh grace period.
//! - **Directory**: what nodes need from the replicated state (assignments, routes, the trust
//!   list, who may connect), rebuilt once whenever the applied index moves and shared by every
//!   heartbeat and watch, so neither touches the Raft thread per node.
//! - **Watch** (`WATCH`): a long-lived stream on which this coordinator pushes the node's
//!   [`View`](wire::View) whenever it changes (and at least every few seconds).
//! - **Bundles** (`BLOB_GET`): a node may fetch the bundles of the replicas assigned to it.
//!
//! A node's certificate is accepted only for these, only as itself, and only while the
//! replicated state lists the node with that certificate's serial.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sophon_mesh::Principal;
use sophon_mesh::wire::{self, kind as wkind};
use tokio::sync::watch;

use super::transport::kind;
use super::{Core, io, mesh};
use crate::command::{Actor, Command, NodeSpec, ReplicaUpdate, Role};
use crate::scheduler::ReplicaPhase;
use crate::state::members::{Accelerator, Inventory, NodeHealth, NodeLoad};
use crate::{Error, Result, State};

/// How often the node loop refreshes the directory and checks liveness.
const TICK: Duration = Duration::from_millis(100);

/// The committed phase (and failure reason) of each replica on one node.
pub type Phases = BTreeMap<(u64, u32, u32), (ReplicaPhase, Option<String>)>;

/// A node in the directory: what admission and routing need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirNode {
    pub serial: Option<String>,
    pub health: NodeHealth,
    pub draining: bool,
    pub environments: Vec<String>,
    pub mesh_address: String,
}

/// What nodes need from the replicated state, as of applied index `index`.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    pub index: u64,
    pub grace_ms: u64,
    pub nodes: HashMap<String, DirNode>,
    /// Every deployment, with the nodes that have ready replicas of it.
    pub routes: Vec<wire::Route>,
    /// The replicas placed on each node.
    pub assignments: HashMap<String, Vec<wire::Assignment>>,
    /// The committed phase (and failure reason) of each replica, by node.
    pub phases: HashMap<String, Phases>,
    pub coordinators: BTreeMap<u64, String>,
    pub trusted_keys: Vec<String>,
    /// The canaries running, for the leader's analysis.
    pub canaries: Vec<CanaryPlan>,
    /// The autoscaled deployments, for the leader's autoscaler.
    pub autoscaled: Vec<ScalePlan>,
    /// The memory recorded as measured for each placed version (0: none yet), so that the
    /// leader commits a node's measurement only when it is new or larger.
    pub measured: HashMap<(String, String), u64>,
}

/// An autoscaled deployment as the leader's autoscaler needs it.
#[derive(Clone, Debug)]
pub struct ScalePlan {
    pub deployment: u64,
    pub model: String,
    /// The versions it runs (the serving revision's, and an update's).
    pub versions: Vec<String>,
    pub replicas: u32,
    pub autoscale: crate::state::autoscale::Autoscale,
}

/// A canary as the leader's analysis needs it.
#[derive(Clone, Debug)]
pub struct CanaryPlan {
    pub deployment: u64,
    pub model: String,
    /// The serving revision's version, and the canary's.
    pub stable: String,
    pub version: String,
    pub revision: u32,
    pub canary: crate::state::canary::Canary,
}

impl Directory {
    /// Build it from the state (on the Raft thread: keep it a plain walk).
    pub fn build(s: &State, index: u64) -> Directory {
        let digest_of = |model: &str, version: &str| {
            s.models()
                .get(model)
                .and_then(|m| m.versions.get(version))
                .map(|v| v.digest.clone())
                .unwrap_or_default()
        };
        let nodes: HashMap<String, DirNode> = s
            .nodes()
            .values()
            .map(|n| {
                (
                    n.id.clone(),
                    DirNode {
                        serial: n.cert_serial.clone(),
                        health: n.health,
                        draining: n.draining,
                        environments: n.environments.clone(),
                        mesh_address: n.address.clone(),
                    },
                )
            })
            .collect();
        let mut assignments: HashMap<String, Vec<wire::Assignment>> = HashMap::new();
        let mut phases: HashMap<String, Phases> = HashMap::new();
        let mut measured = HashMap::new();
        let mut ready: BTreeMap<(u64, u32), BTreeMap<&str, u32>> = BTreeMap::new();
        for p in s.placements() {
            let Some(d) = s.deployments().get(&p.deployment) else {
                continue;
            };
            let Some(version) = d.version_of(p.revision) else {
                continue;
            };
            assignments
                .entry(p.node.clone())
                .or_default()
                .push(wire::Assignment {
                    deployment: p.deployment,
                    revision: p.revision,
                    replica: p.replica,
                    model: d.model.clone(),
                    version: version.to_string(),
                    digest: digest_of(&d.model, version),
                    hot: d.hot,
                });
            measured
                .entry((d.model.clone(), version.to_string()))
                .or_insert_with(|| {
                    s.version(&d.model, version)
                        .ok()
                        .and_then(|v| v.measured.as_ref())
                        .map_or(0, |m| m.memory_mb)
                });
            phases.entry(p.node.clone()).or_default().insert(
                (p.deployment, p.revision, p.replica),
                (p.phase, p.reason.clone()),
            );
            let up = nodes
                .get(&p.node)
                .is_some_and(|n| n.health == NodeHealth::Up);
            if p.ready && up {
                *ready
                    .entry((p.deployment, p.revision))
                    .or_default()
                    .entry(p.node.as_str())
                    .or_default() += 1;
            }
        }
        // One route per revision a deployment runs: its serving one, and a rolling update's.
        // A canary's routes carry their weights.
        let mut routes = Vec::new();
        let mut canaries = Vec::new();
        let mut autoscaled = Vec::new();
        for d in s.deployments().values() {
            if let Some(a) = &d.autoscale {
                autoscaled.push(ScalePlan {
                    deployment: d.id,
                    model: d.model.clone(),
                    versions: std::iter::once(d.version.clone())
                        .chain(d.update.iter().map(|u| u.version.clone()))
                        .collect(),
                    replicas: d.replicas,
                    autoscale: a.clone(),
                });
            }
            let canary = d.update.as_ref().and_then(|u| {
                let c = u.canary.as_ref()?;
                canaries.push(CanaryPlan {
                    deployment: d.id,
                    model: d.model.clone(),
                    stable: d.version.clone(),
                    version: u.version.clone(),
                    revision: u.revision,
                    canary: c.clone(),
                });
                Some((c.weight(), c.spec.mirror))
            });
            let revisions = std::iter::once((d.revision, d.version.as_str(), false)).chain(
                d.update
                    .iter()
                    .map(|u| (u.revision, u.version.as_str(), true)),
            );
            for (revision, version, new) in revisions {
                let (weight, mirror) = match canary {
                    None => (None, false),
                    Some((w, true)) => (Some(if new { w } else { 100 }), new),
                    Some((w, false)) => (Some(if new { w } else { 100 - w }), false),
                };
                let endpoints = ready
                    .get(&(d.id, revision))
                    .map(|by_node| {
                        by_node
                            .iter()
                            .map(|(node, n)| wire::Endpoint {
                                node: node.to_string(),
                                mesh_address: nodes
                                    .get(*node)
                                    .map(|n| n.mesh_address.clone())
                                    .unwrap_or_default(),
                                ready: *n,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                routes.push(wire::Route {
                    deployment: d.id,
                    revision,
                    model: d.model.clone(),
                    version: version.to_string(),
                    environment: d.environment.clone(),
                    digest: digest_of(&d.model, version),
                    replicas: d.replicas,
                    endpoints,
                    weight,
                    mirror,
                    autoscaled: d.autoscale.is_some(),
                });
            }
        }
        Directory {
            index,
            grace_ms: s.heartbeat_grace_ms(),
            nodes,
            routes,
            assignments,
            phases,
            coordinators: s
                .coordinators()
                .values()
                .map(|c| (c.id, c.address.clone()))
                .collect(),
            trusted_keys: s.trusted_keys().keys().cloned().collect(),
            canaries,
            autoscaled,
            measured,
        }
    }

    /// What `node` should know now (`None`: the node is not a member).
    pub fn view_for(&self, node: &str) -> Option<wire::View> {
        let n = self.nodes.get(node)?;
        let serves =
            |env: &str| n.environments.is_empty() || n.environments.iter().any(|e| e == env);
        Some(wire::View {
            index: self.index,
            assignments: self.assignments.get(node).cloned().unwrap_or_default(),
            routes: self
                .routes
                .iter()
                .filter(|r| serves(&r.environment))
                .cloned()
                .collect(),
            coordinators: self.coordinators.values().cloned().collect(),
            draining: n.draining,
            removed: false,
            trusted_keys: self.trusted_keys.clone(),
            members: self
                .nodes
                .iter()
                .map(|(id, n)| (id.clone(), n.serial.clone()))
                .collect(),
        })
    }

    /// Whether `node` may speak with the certificate of `serial`.
    pub fn admits(&self, node: &str, serial: Option<&str>) -> std::result::Result<(), String> {
        match self.nodes.get(node) {
            None => Err(format!(
                "node {node} is not a member of the cluster (removed, or never joined)"
            )),
            Some(n) => match (&n.serial, serial) {
                (Some(want), Some(got)) if want != got => Err(format!(
                    "node {node} joined again with another certificate; this one is retired"
                )),
                _ => Ok(()),
            },
        }
    }
}

/// What the leader last heard from a node.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub load: wire::NodeLoad,
    /// The latest report of each model version, with when it came (a node reports the versions
    /// under a canary's analysis every heartbeat, the others every five).
    pub perf: Vec<(Instant, wire::PerfReport)>,
}

/// The leader's soft view of node liveness: never replicated, rebuilt by each new leader.
#[derive(Debug, Default)]
pub struct Liveness {
    /// The term this replica leads in (`None`: it does not lead).
    term: Option<u64>,
    /// When this replica started leading: the grace period of a node not heard from since
    /// counts from here.
    since: Option<Instant>,
    seen: HashMap<String, Seen>,
    /// Nodes with a transition proposal in flight (one at a time per node).
    in_flight: HashSet<String>,
    /// The running canaries' figures since their step began, by deployment.
    pub canaries: HashMap<u64, super::canary::Window>,
    /// The autoscaled deployments' samples, by deployment.
    pub scales: HashMap<u64, super::autoscale::ScaleWindow>,
    /// The last hour of each deployment's figures, for the console's charts.
    pub series: super::perf::Series,
}

impl Liveness {
    /// Note whether this replica leads (and in which term). On gaining leadership every node
    /// gets a fresh grace period; on losing it, everything heard is forgotten.
    pub fn lead(&mut self, term: Option<u64>, now: Instant) {
        if term == self.term {
            return;
        }
        self.term = term;
        self.seen.clear();
        self.in_flight.clear();
        self.canaries.clear();
        self.scales.clear();
        self.series = Default::default();
        self.since = term.map(|_| now);
    }

    pub fn leads(&self) -> bool {
        self.term.is_some()
    }

    /// Every node's latest report of each model version, with when it came.
    pub fn reports(&self) -> impl Iterator<Item = &(Instant, wire::PerfReport)> {
        self.seen.values().flat_map(|s| s.perf.iter())
    }

    /// A heartbeat from `node`.
    pub fn heard(&mut self, node: &str, now: Instant, hb: &wire::Heartbeat) {
        let seen = self.seen.entry(node.to_string()).or_insert_with(|| Seen {
            at: now,
            load: wire::NodeLoad::default(),
            perf: Vec::new(),
        });
        seen.at = now;
        seen.load = hb.load.clone();
        for r in &hb.perf {
            match seen
                .perf
                .iter_mut()
                .find(|(_, p)| p.model == r.model && p.version == r.version)
            {
                Some(slot) => *slot = (now, r.clone()),
                None => seen.perf.push((now, r.clone())),
            }
            for w in self.canaries.values_mut() {
                w.add(r);
            }
        }
        seen.perf
            .retain(|(at, _)| now.saturating_duration_since(*at) < super::perf::FRESH);
    }

    /// The nodes among `up` silent for at least `grace` at `now` (none unless leading).
    pub fn overdue<'a>(
        &self,
        now: Instant,
        grace: Duration,
        up: impl Iterator<Item = &'a str>,
    ) -> Vec<String> {
        let Some(since) = self.since else {
            return Vec::new();
        };
        up.filter(|node| {
            let last = self.seen.get(*node).map_or(since, |s| s.at.max(since));
            now.saturating_duration_since(last) >= grace && !self.in_flight.contains(*node)
        })
        .map(str::to_string)
        .collect()
    }

    /// Claim the right to propose a transition for `node` (false: one is in flight).
    pub fn begin(&mut self, node: &str) -> bool {
        self.in_flight.insert(node.to_string())
    }

    pub fn end(&mut self, node: &str) {
        self.in_flight.remove(node);
    }

    pub fn seen(&self, node: &str) -> Option<&Seen> {
        self.seen.get(node)
    }

    pub fn all_seen(&self) -> &HashMap<String, Seen> {
        &self.seen
    }
}

/// The coordinator's side of node traffic.
pub struct NodeDesk {
    directory: watch::Sender<Arc<Directory>>,
    pub liveness: Mutex<Liveness>,
}

impl NodeDesk {
    pub fn new() -> NodeDesk {
        NodeDesk {
            directory: watch::Sender::new(Arc::new(Directory::default())),
            liveness: Mutex::new(Liveness::default()),
        }
    }

    pub fn directory(&self) -> Arc<Directory> {
        self.directory.borrow().clone()
    }
}

impl Default for NodeDesk {
    fn default() -> Self {
        NodeDesk::new()
    }
}

fn phase_of(state: wire::ReplicaState) -> ReplicaPhase {
    match state {
        wire::ReplicaState::Pending => ReplicaPhase::Pending,
        wire::ReplicaState::Fetching => ReplicaPhase::Fetching,
        wire::ReplicaState::Loading => ReplicaPhase::Loading,
        wire::ReplicaState::Ready => ReplicaPhase::Ready,
        wire::ReplicaState::Failed => ReplicaPhase::Failed,
        wire::ReplicaState::Unloaded => ReplicaPhase::Unloaded,
    }
}

/// The replica states in `reports` that differ from what was committed for `node`.
pub fn transitions(
    committed: Option<&Phases>,
    reports: &[wire::ReplicaReport],
) -> Vec<ReplicaUpdate> {
    let Some(committed) = committed else {
        return Vec::new();
    };
    reports
        .iter()
        .filter_map(|r| {
            let (phase, reason) = committed.get(&(r.deployment, r.revision, r.replica))?;
            let new = phase_of(r.state);
            let new_reason = if matches!(new, ReplicaPhase::Failed | ReplicaPhase::Unloaded) {
                r.reason.clone().map(|s| truncate(&s, 2048))
            } else {
                None
            };
            let changed = new != *phase || new_reason != *reason;
            changed.then_some(ReplicaUpdate {
                deployment: r.deployment,
                revision: r.revision,
                replica: r.replica,
                phase: new,
                reason: new_reason,
            })
        })
        .collect()
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The leader's actor for the transitions it commits on a node's behalf.
fn node_actor(node: &str) -> Actor {
    Actor::system(format!("node/{node}"), Role::Operator)
}

/// Refreshes the directory when the applied index moves; on the leader, marks silent nodes down.
pub(super) async fn node_loop(core: Arc<Core>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    let applied = core.driver.applied.clone();
    loop {
        // Every tick, and at once when entries are applied (so a committed change reaches the
        // nodes' views without waiting for the tick).
        let ticked = tokio::select! {
            _ = interval.tick() => true,
            _ = applied.notified() => false,
        };
        ticks += u64::from(ticked);
        if ticked && ticks.is_multiple_of(10) {
            let dir = core.nodes.directory();
            let mut liveness = core.nodes.liveness.lock();
            let now = Instant::now();
            super::perf::export(&core.metrics, &dir, &liveness, now);
            if ticks.is_multiple_of(super::perf::SAMPLE_TICKS) && liveness.leads() {
                let mut series = std::mem::take(&mut liveness.series);
                series.sample(&dir, &liveness, now, super::bootstrap::system_time_ms());
                liveness.series = series;
            }
        }
        let status = core.driver.status();
        if status.applied_index != core.nodes.directory.borrow().index {
            let index = status.applied_index;
            match core
                .driver
                .read(false, move |s| Directory::build(s, index))
                .await
            {
                Ok(dir) => {
                    core.nodes.directory.send_replace(Arc::new(dir));
                }
                Err(e) => tracing::debug!(error = %e, "cannot refresh the node directory"),
            }
        }
        let now = Instant::now();
        let dir = core.nodes.directory();
        if ticked && ticks.is_multiple_of(5) && !dir.canaries.is_empty() {
            super::canary::analyse(&core, &dir);
        }
        if ticked && ticks.is_multiple_of(5) && !dir.autoscaled.is_empty() {
            super::autoscale::autoscale(&core, &dir);
        }
        let overdue = {
            let mut liveness = core.nodes.liveness.lock();
            liveness.lead(status.is_leader.then_some(status.term), now);
            let up = dir
                .nodes
                .iter()
                .filter(|(_, n)| n.health == NodeHealth::Up)
                .map(|(id, _)| id.as_str());
            let overdue = liveness.overdue(now, Duration::from_millis(dir.grace_ms), up);
            for node in &overdue {
                liveness.begin(node);
            }
            overdue
        };
        for node in overdue {
            let core = core.clone();
            tokio::spawn(async move {
                let actor = Actor::system(format!("coordinator-{}", core.id), Role::Operator);
                let result = core
                    .write(actor, Command::MarkNodeDown { node: node.clone() })
                    .await;
                match result {
                    Ok(_) => {
                        tracing::warn!(%node, "node marked down: no heartbeat within the grace")
                    }
                    Err(e) => tracing::debug!(%node, error = %e, "could not mark a node down"),
                }
                core.nodes.liveness.lock().end(&node);
            });
        }
    }
}

impl Core {
    /// A node joins: check its token, have its certificate signed, record it.
    pub(super) async fn serve_node_join(
        &self,
        from_coordinator: bool,
        body: &[u8],
    ) -> Result<serde_json::Value> {
        let request: wire::NodeJoinRequest =
            serde_json::from_slice(body).map_err(|e| io("decode a node join request", e))?;
        if let Some(leader) = self.leader_elsewhere()? {
            if from_coordinator {
                return Err(Error::NotLeader {
                    id: self.id,
                    leader,
                });
            }
            return self
                .peers
                .call::<serde_json::Value>(leader, wkind::NODE_JOIN, &request)
                .await;
        }
        crate::state::validate::id("node id", &request.node.id)?;
        let secret = request.secret.clone();
        let now = super::admission::wall_ms();
        let actor = self
            .driver
            .read(true, move |s| {
                super::admission::token_actor(s, &secret, now, Role::NodeJoin)
            })
            .await??;
        let principal = Principal::Node(request.node.id.clone());
        let cert_pem = self.sign_for(&request.csr_pem, &principal).await?;
        let serial = sophon_mesh::serial_of_pem(&cert_pem).map_err(mesh)?;
        let info = &request.node;
        let spec = NodeSpec {
            id: info.id.clone(),
            address: info.mesh_address.clone(),
            inventory: Inventory {
                cpu_cores: info.inventory.cpu_cores,
                memory_mb: info.inventory.memory_mb,
                gpus: accelerators(&info.inventory.gpus),
                npus: accelerators(&info.inventory.npus),
                backends: info.inventory.backends.clone(),
            },
            labels: info.labels.clone(),
            zone: info.zone.clone(),
            http_address: info.http_address.clone(),
            environments: info.environments.clone(),
            version: info.version.clone(),
            cert_serial: Some(serial.clone()),
        };
        self.write(actor, Command::JoinNode { node: spec }).await?;
        // The node's first heartbeat should find it in the directory.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let dir = self.nodes.directory();
            if dir.admits(&info.id, Some(&serial)).is_ok() && dir.nodes.contains_key(&info.id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(node = %info.id, address = %info.mesh_address, "node joined");
        let coordinators = self
            .nodes
            .directory()
            .coordinators
            .values()
            .cloned()
            .collect();
        serde_json::to_value(wire::NodeJoinAnswer {
            cert_pem,
            ca_pem: self.ca_pem.clone(),
            coordinators,
        })
        .map_err(|e| io("encode", e))
    }

    /// Whether `node` (with the certificate of `serial`) may speak now.
    pub(super) fn admits_node(&self, node: &str, serial: Option<&str>) -> Result<()> {
        self.nodes
            .directory()
            .admits(node, serial)
            .map_err(|reason| Error::Unauthenticated { reason })
    }

    /// A heartbeat: taken by the leader, which commits transitions only.
    pub(super) async fn serve_heartbeat(
        self: &Arc<Self>,
        node: &str,
        body: &[u8],
    ) -> Result<serde_json::Value> {
        let hb: wire::Heartbeat =
            serde_json::from_slice(body).map_err(|e| io("decode a heartbeat", e))?;
        let dir = self.nodes.directory();
        let status = self.driver.status();
        if !status.is_leader {
            return serde_json::to_value(wire::HeartbeatAnswer {
                accepted: false,
                leader: dir.coordinators.get(&status.leader).cloned(),
                grace_ms: dir.grace_ms,
            })
            .map_err(|e| io("encode", e));
        }
        let updates = transitions(dir.phases.get(node), &hb.replicas);
        let down = dir
            .nodes
            .get(node)
            .is_some_and(|n| n.health == NodeHealth::Down);
        let propose = {
            let mut liveness = self.nodes.liveness.lock();
            liveness.heard(node, Instant::now(), &hb);
            (down || !updates.is_empty()) && liveness.begin(node)
        };
        self.record_memory(node, &dir, &hb.memory);
        if propose {
            let core = self.clone();
            let node = node.to_string();
            tokio::spawn(async move {
                let command = Command::ReportReplicas {
                    node: node.clone(),
                    replicas: updates,
                };
                if let Err(e) = core.write(node_actor(&node), command).await {
                    tracing::debug!(%node, error = %e, "could not record a node's replicas");
                }
                core.nodes.liveness.lock().end(&node);
            });
        }
        serde_json::to_value(wire::HeartbeatAnswer {
            accepted: true,
            leader: None,
            grace_ms: dir.grace_ms,
        })
        .map_err(|e| io("encode", e))
    }

    /// Commits what `node` measured of the versions placed on it, where a figure is new or
    /// more than a tenth above the one recorded (the largest measured is what counts).
    fn record_memory(self: &Arc<Self>, node: &str, dir: &Directory, memory: &[wire::ModelMemory]) {
        for m in memory {
            let key = (m.model.clone(), m.version.clone());
            let Some(&recorded) = dir.measured.get(&key) else {
                // Not placed (any more): nothing to schedule by it.
                continue;
            };
            let mb = m.bytes.div_ceil(1 << 20).max(1);
            if recorded > 0 && mb * 10 <= recorded * 11 {
                continue;
            }
            let claim = format!("memory {}@{}", m.model, m.version);
            if !self.nodes.liveness.lock().begin(&claim) {
                continue;
            }
            let core = self.clone();
            let node = node.to_string();
            tokio::spawn(async move {
                let command = Command::RecordModelMemory {
                    model: key.0,
                    version: key.1,
                    node: node.clone(),
                    memory_mb: mb,
                };
                if let Err(e) = core.write(node_actor(&node), command).await {
                    tracing::debug!(%node, error = %e, "could not record a measured memory");
                }
                core.nodes.liveness.lock().end(&claim);
            });
        }
    }

    /// Push `node`'s view on `send` whenever it changes, until either side stops.
    pub(super) async fn serve_watch(
        &self,
        node: &str,
        serial: Option<&str>,
        body: &[u8],
        send: &mut quinn::SendStream,
    ) -> Result<()> {
        let request: wire::WatchRequest =
            serde_json::from_slice(body).map_err(|e| io("decode a watch request", e))?;
        let mut rx = self.nodes.directory.subscribe();
        let keepalive = Duration::from_millis(wire::WATCH_KEEPALIVE_MS);
        let mut last: Option<wire::View> = None;
        let mut sent_at = Instant::now();
        let mut after = request.after_index;
        loop {
            let dir = rx.borrow_and_update().clone();
            if let Err(reason) = dir.admits(node, serial) {
                let removed = wire::View {
                    index: dir.index,
                    removed: true,
                    ..wire::View::default()
                };
                let bytes = serde_json::to_vec(&removed).map_err(|e| io("encode", e))?;
                let _ = sophon_mesh::write_frame(send, wkind::VIEW, &bytes).await;
                let _ = send.finish();
                return Err(Error::Unauthenticated { reason });
            }
            if let Some(view) = dir.view_for(node) {
                let unchanged = last.as_ref().is_some_and(|l| same_view(l, &view));
                let due = sent_at.elapsed() >= keepalive;
                // A coordinator behind what the node has seen waits until it catches up.
                if (!unchanged && view.index > after) || due {
                    let bytes = serde_json::to_vec(&view).map_err(|e| io("encode", e))?;
                    sophon_mesh::write_frame(send, wkind::VIEW, &bytes)
                        .await
                        .map_err(mesh)?;
                    sent_at = Instant::now();
                    after = after.max(view.index);
                    last = Some(view);
                }
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return Ok(()) },
                _ = tokio::time::sleep(keepalive) => {}
                _ = send.stopped() => return Ok(()),
            }
        }
    }

    /// The bundle of `digest`, if one of `node`'s replicas needs it.
    pub(super) fn node_blob(&self, node: &str, digest: &str) -> Result<std::path::PathBuf> {
        let dir = self.nodes.directory();
        let needed = dir
            .assignments
            .get(node)
            .is_some_and(|a| a.iter().any(|a| a.digest == digest));
        if !needed {
            return Err(Error::Unauthenticated {
                reason: format!("node {node} has no replica that needs bundle {digest}"),
            });
        }
        self.blobs.path(digest).ok_or_else(|| Error::Remote {
            status: 404,
            code: "unknown_bundle".into(),
            message: format!("bundle {digest} is not stored on this coordinator"),
        })
    }
}

/// Two views say the same, whatever their index.
fn same_view(a: &wire::View, b: &wire::View) -> bool {
    a.assignments == b.assignments
        && a.routes == b.routes
        && a.coordinators == b.coordinators
        && a.draining == b.draining
        && a.trusted_keys == b.trusted_keys
        && a.members == b.members
}

fn accelerators(devices: &[wire::Accelerator]) -> Vec<Accelerator> {
    devices
        .iter()
        .map(|d| Accelerator {
            model: d.model.clone(),
            memory_mb: d.memory_mb,
        })
        .collect()
}

/// The load a node reported, as the committed state's type (for the API).
pub fn load_of(load: &wire::NodeLoad) -> NodeLoad {
    NodeLoad {
        cpu_percent: load.cpu_percent,
        memory_used_mb: load.memory_used_mb,
        inflight: load.inflight,
    }
}

/// Serve one node stream: the node is `node`, its certificate's serial `serial`.
pub(super) async fn serve_node_stream(
    core: Arc<Core>,
    node: String,
    serial: Option<String>,
    first: (u8, Vec<u8>),
    mut send: quinn::SendStream,
) {
    if let Err(e) = core.admits_node(&node, serial.as_deref()) {
        super::answer(&mut send, Err(e)).await;
        return;
    }
    let result = match first {
        (wkind::HEARTBEAT, body) => core.serve_heartbeat(&node, &body).await,
        (wkind::ACTIVATE, body) => core.serve_activate(&node, &body).await,
        (wkind::WATCH, body) => {
            if let Err(e) = core
                .serve_watch(&node, serial.as_deref(), &body, &mut send)
                .await
            {
                tracing::debug!(%node, error = %e, "a watch ended");
            }
            return;
        }
        (kind::BLOB_GET, digest) => {
            let digest = String::from_utf8_lossy(&digest).to_string();
            match core.node_blob(&node, &digest) {
                Ok(path) => {
                    if super::send_file(&mut send, kind::BLOB_GET, &path)
                        .await
                        .is_ok()
                    {
                        let _ = send.finish();
                    }
                    return;
                }
                Err(e) => Err(e),
            }
        }
        (other, _) => Err(Error::Unauthenticated {
            reason: format!(
                "node/{node} may make node requests only (heartbeat, watch, its bundles), not \
                 requests of kind {other}"
            ),
        }),
    };
    super::answer(&mut send, result).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb() -> wire::Heartbeat {
        wire::Heartbeat::default()
    }

    #[test]
    fn liveness_counts_grace_from_the_start_of_leadership() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(5);
        let mut l = Liveness::default();
        // Not leading: nobody is overdue.
        assert!(
            l.overdue(t0 + grace * 10, grace, ["a"].into_iter())
                .is_empty()
        );
        l.lead(Some(3), t0);
        assert!(
            l.overdue(t0 + grace / 2, grace, ["a"].into_iter())
                .is_empty()
        );
        l.heard("a", t0 + Duration::from_secs(4), &hb());
        // b was never heard from: its grace counts from t0.
        assert_eq!(l.overdue(t0 + grace, grace, ["a", "b"].into_iter()), ["b"]);
        assert_eq!(
            l.overdue(t0 + Duration::from_secs(9), grace, ["a", "b"].into_iter()),
            ["a", "b"]
        );
        // One proposal at a time per node.
        assert!(l.begin("b"));
        assert!(!l.begin("b"));
        assert_eq!(
            l.overdue(t0 + Duration::from_secs(9), grace, ["a", "b"].into_iter()),
            ["a"]
        );
        // A new term: a fresh grace for everyone, what was heard forgotten.
        l.lead(Some(4), t0 + Duration::from_secs(9));
        assert!(
            l.overdue(t0 + Duration::from_secs(13), grace, ["a", "b"].into_iter())
                .is_empty()
        );
        assert!(l.begin("b"), "in-flight claims are dropped with the term");
        l.lead(None, t0 + Duration::from_secs(20));
        assert!(!l.leads());
    }

    #[test]
    fn transitions_are_what_changed_for_replicas_placed_on_the_node() {
        let committed: Phases = [
            ((1, 1, 0), (ReplicaPhase::Pending, None)),
            ((2, 1, 1), (ReplicaPhase::Ready, None)),
        ]
        .into();
        let report = |deployment, replica, state, reason: Option<&str>| wire::ReplicaReport {
            deployment,
            revision: 1,
            replica,
            state,
            reason: reason.map(str::to_string),
        };
        let updates = transitions(
            Some(&committed),
            &[
                report(1, 0, wire::ReplicaState::Ready, None),
                report(2, 1, wire::ReplicaState::Ready, None),
                // Not placed here (any more): ignored.
                report(3, 0, wire::ReplicaState::Failed, Some("no")),
            ],
        );
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].phase, ReplicaPhase::Ready);
        let failed = transitions(
            Some(&committed),
            &[report(
                2,
                1,
                wire::ReplicaState::Failed,
                Some(&"x".repeat(5000)),
            )],
        );
        assert_eq!(failed[0].phase, ReplicaPhase::Failed);
        assert!(failed[0].reason.as_ref().is_some_and(|r| r.len() < 2100));
        assert!(transitions(None, &[report(1, 0, wire::ReplicaState::Ready, None)]).is_empty());
    }
}
