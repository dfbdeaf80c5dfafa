//! Members: the nodes (hardware, labels, zone, liveness, what runs on them) and the coordinators.
//!
//! A node is `up` or `down`, and separately may be `draining` (an operator's intent that
//! survives the node going down and coming back). Only up, non-draining nodes receive replicas.
//! The leader marks a node down once it has been silent for the grace period
//! ([`State::overdue_nodes`] lists the candidates); the check is repeated when the entry is
//! applied, so a heartbeat that was committed first wins.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::validate::{self, MAX_TEXT_LEN};
use super::{Change, Ctx, Replan, State};
use crate::command::{NodeSpec, ReplicaKey};
use crate::error::{Error, Result, invalid};
use crate::scheduler::{DeviceMemory, NodeView};

/// At most this many GPUs or NPUs per node, labels per node.
pub const MAX_DEVICES: usize = 64;
pub const MAX_LABELS: usize = 64;

/// Liveness as the coordinators see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeHealth {
    Up,
    Down,
}

/// One accelerator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accelerator {
    /// Like `NVIDIA H100 80GB HBM3` or `Intel NPU`.
    pub model: String,
    pub memory_mb: u64,
}

/// What a node has.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub cpu_cores: u32,
    /// Host memory available to replicas.
    pub memory_mb: u64,
    pub gpus: Vec<Accelerator>,
    pub npus: Vec<Accelerator>,
    /// The wasi-nn backends the node can run (`tract`, ...).
    #[serde(default)]
    pub backends: Vec<String>,
}

impl Inventory {
    /// The memory pools the scheduler fills: host memory, all GPUs' memory, all NPUs' memory.
    pub fn pools(&self) -> DeviceMemory {
        let sum = |devices: &[Accelerator]| {
            devices
                .iter()
                .fold(0u64, |acc, d| acc.saturating_add(d.memory_mb))
        };
        DeviceMemory {
            cpu_mb: self.memory_mb,
            gpu_mb: sum(&self.gpus),
            npu_mb: sum(&self.npus),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.cpu_cores == 0 {
            return Err(invalid("cpu cores", "0", "a node has at least one core"));
        }
        for (what, devices) in [("gpus", &self.gpus), ("npus", &self.npus)] {
            if devices.len() > MAX_DEVICES {
                return Err(invalid(
                    what,
                    devices.len().to_string(),
                    format!("report at most {MAX_DEVICES}"),
                ));
            }
            for d in devices {
                validate::text("accelerator model", &d.model, MAX_TEXT_LEN, true)?;
            }
        }
        Ok(())
    }
}

/// What a node reports in its heartbeat (shown to operators; the scheduler balances by the
/// memory it has placed, not by these, so that placements do not flap with the traffic).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Across all cores, 0 to 100.
    pub cpu_percent: u32,
    pub memory_used_mb: u64,
    /// Requests being served.
    pub inflight: u32,
}

/// A mesh node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub address: String,
    pub inventory: Inventory,
    pub labels: BTreeMap<String, String>,
    pub zone: String,
    pub health: NodeHealth,
    pub draining: bool,
    pub joined_at_ms: u64,
    pub last_heartbeat_ms: u64,
    pub load: NodeLoad,
    /// The replicas placed here, sorted: what the driver pushes to the node.
    pub assigned: Vec<ReplicaKey>,
    /// Where clients reach its V2 HTTP endpoint.
    #[serde(default)]
    pub http_address: String,
    /// The environments it serves; empty: every environment.
    #[serde(default)]
    pub environments: Vec<String>,
    /// The sophon version it runs.
    #[serde(default)]
    pub version: String,
    /// The serial of its certificate: the only one the mesh accepts for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
}

impl Node {
    /// Whether it serves deployments of `environment`.
    pub fn serves(&self, environment: &str) -> bool {
        self.environments.is_empty() || self.environments.iter().any(|e| e == environment)
    }
}

impl Node {
    /// Up and not draining.
    pub fn schedulable(&self) -> bool {
        self.health == NodeHealth::Up && !self.draining
    }

    pub(crate) fn view(&self) -> NodeView {
        NodeView {
            id: self.id.clone(),
            zone: self.zone.clone(),
            schedulable: self.schedulable(),
            capacity: self.inventory.pools(),
        }
    }
}

/// A coordinator as recorded in the state (its Raft id and address).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coordinator {
    pub id: u64,
    pub address: String,
    #[serde(default)]
    pub api_address: String,
    pub added_at_ms: u64,
    /// The serial (lowercase hex) of its certificate: the only one the mesh accepts for it.
    /// `None`: recorded before serials were; any certificate of the CA naming it is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
}

/// A revoked certificate: the mesh refuses its principal on every connection and stream.
/// A removed coordinator's id is never given again, so its principal stays refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// Like `coordinator/3`.
    pub principal: String,
    /// The serial of the certificate it held, when recorded (lowercase hex).
    pub serial: Option<String>,
    pub revoked_at_ms: u64,
}

/// The principal a coordinator's certificate names (as `sophon_mesh::Principal` prints it).
pub fn coordinator_principal(id: u64) -> String {
    format!("coordinator/{id}")
}

/// Whether a node's scheduling view only gained: same zone, no pool smaller, and schedulable
/// if it was before. Then every current placement stays valid.
fn grows(before: &NodeView, after: &NodeView) -> bool {
    let pools_grow = crate::scheduler::Device::ALL
        .iter()
        .all(|d| after.capacity.get(*d) >= before.capacity.get(*d));
    before.zone == after.zone && pools_grow && (after.schedulable || !before.schedulable)
}

fn validate_spec(spec: &NodeSpec) -> Result<()> {
    validate::id("node id", &spec.id)?;
    validate::address("node address", &spec.address)?;
    validate::id("zone", &spec.zone)?;
    spec.inventory.validate()?;
    if !spec.http_address.is_empty() {
        validate::address("node http address", &spec.http_address)?;
    }
    if spec.environments.len() > MAX_LABELS {
        return Err(invalid(
            "environments",
            spec.environments.len().to_string(),
            format!("give at most {MAX_LABELS}"),
        ));
    }
    for e in &spec.environments {
        validate::id("environment", e)?;
    }
    validate::text("node version", &spec.version, MAX_TEXT_LEN, false)?;
    for b in &spec.inventory.backends {
        validate::id("backend", b)?;
    }
    if spec.labels.len() > MAX_LABELS {
        return Err(invalid(
            "labels",
            spec.labels.len().to_string(),
            format!("give at most {MAX_LABELS}"),
        ));
    }
    for (k, v) in &spec.labels {
        validate::id("label key", k)?;
        validate::text("label value", v, MAX_TEXT_LEN, false)?;
    }
    Ok(())
}

impl State {
    /// Nodes that are up but have been silent for at least the grace period at `now_ms`: the
    /// leader proposes [`MarkNodeDown`](crate::Command::MarkNodeDown) for each.
    pub fn overdue_nodes(&self, now_ms: u64) -> Vec<String> {
        self.nodes
            .values()
            .filter(|n| {
                n.health == NodeHealth::Up
                    && now_ms.saturating_sub(n.last_heartbeat_ms) >= self.heartbeat_grace_ms
            })
            .map(|n| n.id.clone())
            .collect()
    }

    fn node_mut(&mut self, id: &str) -> Result<&mut Node> {
        self.nodes
            .get_mut(id)
            .ok_or_else(|| Error::UnknownNode { id: id.to_string() })
    }

    pub(crate) fn join_node(&mut self, ctx: Ctx<'_>, spec: &NodeSpec) -> Result<Change> {
        validate_spec(spec)?;
        let target = format!("node {}", spec.id);
        let detail = format!(
            "zone {}, {} cores, {} MiB, {} gpus, {} npus, at {}",
            spec.zone,
            spec.inventory.cpu_cores,
            spec.inventory.memory_mb,
            spec.inventory.gpus.len(),
            spec.inventory.npus.len(),
            spec.address
        );
        let before = self.nodes.get(&spec.id).map(Node::view);
        let node = self.nodes.entry(spec.id.clone()).or_insert_with(|| Node {
            id: spec.id.clone(),
            address: String::new(),
            inventory: Inventory::default(),
            labels: BTreeMap::new(),
            zone: String::new(),
            health: NodeHealth::Up,
            draining: false,
            joined_at_ms: ctx.now,
            last_heartbeat_ms: ctx.now,
            load: NodeLoad::default(),
            assigned: Vec::new(),
            http_address: String::new(),
            environments: Vec::new(),
            version: String::new(),
            cert_serial: None,
        });
        let environments_changed = node.environments != spec.environments;
        node.http_address = spec.http_address.clone();
        node.environments = spec.environments.clone();
        node.version = spec.version.clone();
        if spec.cert_serial.is_some() {
            node.cert_serial = spec.cert_serial.clone();
        }
        node.address = spec.address.clone();
        node.inventory = spec.inventory.clone();
        node.labels = spec.labels.clone();
        node.zone = spec.zone.clone();
        node.health = NodeHealth::Up;
        node.last_heartbeat_ms = ctx.now;
        let after = node.view();
        let mut change = Change::new(target, String::new());
        change.replan = match &before {
            Some(_) if environments_changed => Replan::Always,
            Some(before) if *before == after => Replan::No,
            Some(before) if !grows(before, &after) => Replan::Always,
            _ => Replan::IfUnplaced,
        };
        let verb = if before.is_some() {
            "rejoined"
        } else {
            "joined"
        };
        change.detail = format!("{verb}: {detail}");
        Ok(change)
    }

    pub(crate) fn heartbeat(
        &mut self,
        ctx: Ctx<'_>,
        id: &str,
        load: &NodeLoad,
        ready: &[ReplicaKey],
    ) -> Result<Change> {
        let node = self
            .nodes
            .get(id)
            .ok_or_else(|| Error::UnknownNode { id: id.to_string() })?;
        // Readiness of the replicas placed here; a replica the node lists that is no longer
        // placed here (a replan it has not seen yet) is ignored.
        let ready: std::collections::BTreeSet<&ReplicaKey> = ready.iter().collect();
        let mut flips = Vec::new();
        for key in &node.assigned {
            let Ok(i) = self.placements.binary_search_by_key(key, |p| ReplicaKey {
                deployment: p.deployment,
                revision: p.revision,
                replica: p.replica,
            }) else {
                continue;
            };
            let now_ready = ready.contains(key);
            if self.placements[i].ready != now_ready {
                flips.push((i, now_ready));
            }
        }
        let came_back = node.health == NodeHealth::Down;
        // Validated; now change.
        let node = self.node_mut(id)?;
        node.health = NodeHealth::Up;
        node.last_heartbeat_ms = ctx.now;
        node.load = load.clone();
        let ready_now = flips.iter().filter(|(_, r)| *r).count();
        let unready_now = flips.len() - ready_now;
        for (i, r) in &flips {
            self.placements[*i].ready = *r;
        }
        let mut change = Change::new(format!("node {id}"), String::new());
        if came_back {
            change.detail = "back up".into();
            change.replan = Replan::IfUnplaced;
        }
        if !flips.is_empty() {
            if !change.detail.is_empty() {
                change.detail.push_str("; ");
            }
            change.detail.push_str(&format!(
                "{ready_now} replicas ready, {unready_now} not ready"
            ));
            change.rollout = true;
        }
        change.quiet = !came_back && flips.is_empty();
        Ok(change)
    }

    /// Replica states reported by a node (a transition: the leader proposes this only when one
    /// changed), and the node heard from again if it was marked down. A failed replica is
    /// recorded on its deployment, whose next plan avoids the node.
    pub(crate) fn report_replicas(
        &mut self,
        ctx: Ctx<'_>,
        id: &str,
        updates: &[crate::command::ReplicaUpdate],
    ) -> Result<Change> {
        use crate::scheduler::ReplicaPhase;
        let node = self
            .nodes
            .get(id)
            .ok_or_else(|| Error::UnknownNode { id: id.to_string() })?;
        for u in updates {
            if let Some(reason) = &u.reason {
                validate::text("failure reason", reason, 4096, false)?;
            }
        }
        let came_back = node.health == NodeHealth::Down;
        let mut changed = Vec::new();
        let mut failed = Vec::new();
        for u in updates {
            // A replica no longer placed on this node (a plan it has not seen yet) is ignored.
            let Ok(i) = self
                .placements
                .binary_search_by_key(&(u.deployment, u.revision, u.replica), |p| {
                    (p.deployment, p.revision, p.replica)
                })
            else {
                continue;
            };
            let p = &mut self.placements[i];
            if p.node != id || (p.phase == u.phase && p.reason == u.reason) {
                continue;
            }
            p.phase = u.phase;
            p.ready = u.phase == ReplicaPhase::Ready;
            p.reason = u.reason.clone();
            changed.push(format!(
                "{}/{} {}",
                u.deployment,
                u.replica,
                u.phase.as_str()
            ));
            if u.phase == ReplicaPhase::Failed {
                failed.push((
                    u.deployment,
                    u.revision,
                    u.reason.clone().unwrap_or_default(),
                ));
            }
        }
        let any_failed = !failed.is_empty();
        for (deployment, revision, reason) in failed {
            if let Some(d) = self.deployments.get_mut(&deployment) {
                // A rolling update's new revision failing rolls the update back (see
                // `advance_updates`); the serving revision's failures move it elsewhere.
                match &mut d.update {
                    Some(u) if u.revision == revision => {
                        u.failed_on.insert(id.to_string(), reason);
                    }
                    _ => {
                        d.failed_on.insert(id.to_string(), reason);
                    }
                }
            }
        }
        let node = self.node_mut(id)?;
        node.health = NodeHealth::Up;
        node.last_heartbeat_ms = ctx.now;
        let mut change = Change::new(format!("node {id}"), String::new());
        let mut parts = Vec::new();
        if came_back {
            parts.push("back up".to_string());
            change.replan = Replan::IfUnplaced;
        }
        if !changed.is_empty() {
            parts.push(format!("replicas: {}", changed.join(", ")));
            change.rollout = true;
        }
        if any_failed {
            change.replan = Replan::Always;
        }
        change.detail = parts.join("; ");
        change.quiet = !came_back && changed.is_empty();
        Ok(change)
    }

    pub(crate) fn drain_node(&mut self, id: &str) -> Result<Change> {
        let node = self.node_mut(id)?;
        if node.draining {
            return Err(Error::NodeAlreadyInState {
                id: id.to_string(),
                state: "draining",
            });
        }
        node.draining = true;
        Ok(Change::new(format!("node {id}"), "draining").replan())
    }

    pub(crate) fn resume_node(&mut self, id: &str) -> Result<Change> {
        let node = self.node_mut(id)?;
        if !node.draining {
            return Err(Error::NodeAlreadyInState {
                id: id.to_string(),
                state: "not draining",
            });
        }
        node.draining = false;
        let mut change = Change::new(format!("node {id}"), "resumed");
        change.replan = Replan::IfUnplaced;
        Ok(change)
    }

    pub(crate) fn leave_node(&mut self, id: &str) -> Result<Change> {
        self.nodes
            .remove(id)
            .ok_or_else(|| Error::UnknownNode { id: id.to_string() })?;
        Ok(Change::new(format!("node {id}"), "left").replan())
    }

    pub(crate) fn mark_node_down(&mut self, ctx: Ctx<'_>, id: &str) -> Result<Change> {
        let grace_ms = self.heartbeat_grace_ms;
        let node = self.node_mut(id)?;
        if node.health == NodeHealth::Down {
            return Err(Error::NodeAlreadyInState {
                id: id.to_string(),
                state: "down",
            });
        }
        let silent_ms = ctx.now.saturating_sub(node.last_heartbeat_ms);
        if silent_ms < grace_ms {
            return Err(Error::NodeNotOverdue {
                id: id.to_string(),
                silent_ms,
                grace_ms,
            });
        }
        node.health = NodeHealth::Down;
        Ok(Change::new(
            format!("node {id}"),
            format!("down after {silent_ms} ms of silence"),
        )
        .replan())
    }

    pub(crate) fn set_heartbeat_grace(&mut self, grace_ms: u64) -> Result<Change> {
        const DAY_MS: u64 = 24 * 3600 * 1000;
        if !(1000..=DAY_MS).contains(&grace_ms) {
            return Err(invalid(
                "heartbeat grace",
                format!("{grace_ms} ms"),
                "choose between 1 second and 1 day",
            ));
        }
        let old = std::mem::replace(&mut self.heartbeat_grace_ms, grace_ms);
        Ok(Change::new(
            "heartbeat grace",
            format!("{old} ms -> {grace_ms} ms"),
        ))
    }

    pub(crate) fn add_coordinator(
        &mut self,
        ctx: Ctx<'_>,
        id: u64,
        address: &str,
        api_address: &str,
        cert_serial: Option<&str>,
    ) -> Result<Change> {
        validate::address("coordinator address", address)?;
        if !api_address.is_empty() {
            validate::address("coordinator api address", api_address)?;
        }
        if let Some(serial) = cert_serial {
            validate::serial(serial)?;
        }
        if id == 0 {
            return Err(invalid("coordinator id", "0", "coordinator ids start at 1"));
        }
        if self.coordinators.contains_key(&id) {
            return Err(Error::CoordinatorExists { id });
        }
        if self.revoked.contains_key(&coordinator_principal(id)) {
            return Err(Error::CoordinatorRetired { id });
        }
        self.coordinators.insert(
            id,
            Coordinator {
                id,
                address: address.to_string(),
                api_address: api_address.to_string(),
                added_at_ms: ctx.now,
                cert_serial: cert_serial.map(str::to_string),
            },
        );
        let mut detail = format!("added at {address}");
        if let Some(serial) = cert_serial {
            detail.push_str(&format!(" with certificate {serial}"));
        }
        Ok(Change::new(format!("coordinator {id}"), detail))
    }

    /// Removes a coordinator and revokes its certificate: every coordinator's mesh refuses it
    /// from then on, and its id is never given again.
    pub(crate) fn remove_coordinator(&mut self, ctx: Ctx<'_>, id: u64) -> Result<Change> {
        let Some(removed) = self.coordinators.get(&id) else {
            return Err(Error::UnknownCoordinator { id });
        };
        if self.coordinators.len() == 1 {
            return Err(Error::LastCoordinator { id });
        }
        let principal = coordinator_principal(id);
        let serial = removed.cert_serial.clone();
        self.revoked.insert(
            principal.clone(),
            Revoked {
                principal: principal.clone(),
                serial: serial.clone(),
                revoked_at_ms: ctx.now,
            },
        );
        self.coordinators.remove(&id);
        Ok(Change::new(
            format!("coordinator {id}"),
            format!(
                "removed; certificate of {principal} revoked{}",
                serial.map(|s| format!(" (serial {s})")).unwrap_or_default()
            ),
        ))
    }

    /// The id the next coordinator gets: above every coordinator's, present or removed (a
    /// removed coordinator's id is never given again).
    pub fn next_coordinator_id(&self) -> u64 {
        let removed = self.revoked.keys().filter_map(|p| {
            p.strip_prefix("coordinator/")
                .and_then(|id| id.parse::<u64>().ok())
        });
        self.coordinators
            .keys()
            .copied()
            .chain(removed)
            .max()
            .unwrap_or(0)
            + 1
    }
}
