//! The placement scheduler: a pure function from nodes, deployments and the current placements to
//! the next placements ([`place`]).
//!
//! # Rules
//! - **Stability.** A current placement is kept while its node exists, is schedulable (up and
//!   not draining), its device is still in the deployment's hardware wish, the replica still
//!   exists (scale-down drops the highest replica numbers) and the node's memory still holds it.
//!   Kept placements keep their `ready` flag; moved ones start not ready.
//! - **Hardware.** A deployment wishes for devices, best first (`[gpu, cpu]`: GPU where possible,
//!   else CPU). Each node has a memory pool per device: host memory for `cpu`, the sum of its
//!   GPUs' or NPUs' memory for `gpu` and `npu`. A replica on a device takes the model's
//!   `memory_mb` from that pool and may only go where the pool has it free.
//! - **Spread.** Two replicas of one deployment never share a node: the node's runtime already
//!   runs many instances of one model over one copy of its weights, so a second replica there adds
//!   nothing but memory and removes no failure. Replicas beyond the nodes that can host them are
//!   reported as [`Unplaced`] (reason [`UnplacedReason::TooFewNodes`]). Among zones, a new replica
//!   goes to the zone holding the fewest replicas of its deployment. The hardware wish comes
//!   first: a deployment that prefers GPUs fills the zones that still have GPU memory before it
//!   falls back to CPUs in the others.
//! - **Load.** Within the chosen zone, the node with the most free memory on that device wins;
//!   ties go to the node with fewer replicas, then to the earlier node in input order.
//! - **Nothing is dropped silently.** Every replica is either in [`Plan::placements`] or in
//!   [`Plan::unplaced`], with a reason.
//!
//! # Algorithm and cost
//! Let N be nodes, Z zones, D deployments, R replicas wanted and P current placements.
//! 1. Keep what is still valid, in (deployment, replica) order, charging each node's pools:
//!    O(P log P) for the sort, O(P log N) for the node lookups.
//! 2. Index the schedulable nodes per (device, zone) in ordered sets keyed by
//!    (most free memory, fewest replicas, input order): O(N log N).
//! 3. For each deployment, in id order, that misses replicas: take the nodes already hosting it
//!    out of the indexes (so every index top is a node it may use); per wished device, build an
//!    ordered set of the zones whose top node fits one replica, keyed by (replicas of this
//!    deployment in the zone, top's free memory, zone name); then repeatedly take the first zone,
//!    take its top node, place, and put the zone back if its new top still fits. A zone whose top
//!    does not fit has no node that fits (the top has the most free memory), so nothing is
//!    scanned twice. Finally put the touched nodes back with their new keys.
//!    O(Z log Z) per deployment plus O(log N + log Z) per replica placed.
//!
//! In all O((N + P + R) log N + D·Z log Z): 100,000 replicas over 10,000 nodes take about a
//! tenth of a second in release mode (see the module tests).
//!
//! Node ids must be unique (a repeated id is ignored after its first occurrence), as must
//! deployment ids.

mod check;
pub mod synthetic;
#[cfg(test)]
mod tests;

pub use check::check_plan;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A kind of device a replica can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Gpu,
    Npu,
}

impl Device {
    /// All devices.
    pub const ALL: [Device; 3] = [Device::Cpu, Device::Gpu, Device::Npu];

    fn index(self) -> usize {
        match self {
            Device::Cpu => 0,
            Device::Gpu => 1,
            Device::Npu => 2,
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Gpu => "gpu",
            Device::Npu => "npu",
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Memory per device pool, in MiB. A pool of 0 means the node has no such device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMemory {
    pub cpu_mb: u64,
    pub gpu_mb: u64,
    pub npu_mb: u64,
}

impl DeviceMemory {
    /// The pool of one device.
    pub fn get(&self, device: Device) -> u64 {
        match device {
            Device::Cpu => self.cpu_mb,
            Device::Gpu => self.gpu_mb,
            Device::Npu => self.npu_mb,
        }
    }

    fn as_array(&self) -> [u64; 3] {
        [self.cpu_mb, self.gpu_mb, self.npu_mb]
    }
}

/// What the scheduler needs to know about a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub id: String,
    pub zone: String,
    /// Up and not draining. Unschedulable nodes keep nothing and receive nothing.
    pub schedulable: bool,
    pub capacity: DeviceMemory,
}

/// What the scheduler needs to know about a deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentView {
    pub id: u64,
    pub replicas: u32,
    /// Memory one replica takes from its device's pool.
    pub memory_mb: u64,
    /// Devices, best first.
    pub hardware: Vec<Device>,
    /// Nodes that must not run it (they serve other environments, or failed to load it),
    /// sorted.
    pub excluded: Vec<String>,
}

/// Replica `replica` of deployment `deployment` runs on `node`, on `device`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Placement {
    pub deployment: u64,
    /// The deployment's revision this replica runs (its version): during a rolling update a
    /// deployment has replicas of two revisions. The scheduler itself never reads it.
    #[serde(default = "first_revision")]
    pub revision: u32,
    pub replica: u32,
    pub node: String,
    pub device: Device,
    /// The node reported the replica serving (kept while the placement is kept).
    #[serde(default)]
    pub ready: bool,
    /// Where the replica stands on its node, as last reported (`ready` is `phase == Ready`).
    #[serde(default, skip_serializing_if = "ReplicaPhase::is_pending")]
    pub phase: ReplicaPhase,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The revision a deployment starts at, and the one old records without one mean.
pub fn first_revision() -> u32 {
    1
}

/// Where a placed replica stands on its node.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaPhase {
    /// Placed; its node has not reported on it yet.
    #[default]
    Pending,
    Fetching,
    Loading,
    Ready,
    /// The node cannot serve it: the scheduler moves it to another node.
    Failed,
    /// Taken out of service on its node (the repository API's `unload`): not routed to and
    /// not moved; it serves again once loaded there.
    Unloaded,
}

impl ReplicaPhase {
    pub fn is_pending(&self) -> bool {
        *self == ReplicaPhase::Pending
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaPhase::Pending => "pending",
            ReplicaPhase::Fetching => "fetching",
            ReplicaPhase::Loading => "loading",
            ReplicaPhase::Ready => "ready",
            ReplicaPhase::Failed => "failed",
            ReplicaPhase::Unloaded => "unloaded",
        }
    }
}

/// Why replicas could not be placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnplacedReason {
    /// No schedulable node has any of the wished devices.
    NoMatchingHardware,
    /// Every schedulable node with a wished device already hosts a replica of the deployment.
    TooFewNodes,
    /// Nodes with a wished device are left, but none has the memory free.
    InsufficientMemory,
}

impl UnplacedReason {
    /// What an operator can do about it.
    pub fn hint(self) -> &'static str {
        match self {
            UnplacedReason::NoMatchingHardware => {
                "add nodes with a wished device or widen the hardware wish"
            }
            UnplacedReason::TooFewNodes => "add nodes or lower the replica count",
            UnplacedReason::InsufficientMemory => {
                "add nodes or memory, or scale other deployments down"
            }
        }
    }
}

/// Replicas of one deployment that have no node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    pub deployment: u64,
    /// As [`Placement::revision`].
    #[serde(default = "first_revision")]
    pub revision: u32,
    /// Replica numbers, ascending.
    pub replicas: Vec<u32>,
    pub reason: UnplacedReason,
}

/// The scheduler's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Sorted by (deployment, replica).
    pub placements: Vec<Placement>,
    /// Sorted by deployment.
    pub unplaced: Vec<Unplaced>,
}

/// An index entry: most free memory first, then fewest replicas, then input order.
type NodeKey = (Reverse<u64>, u32, u32);
/// A zone entry: fewest replicas of the deployment, then most free memory at its top, then name.
type ZoneKey = (u32, Reverse<u64>, u32);

struct NodeSlot {
    zone: u32,
    capacity: [u64; 3],
    free: [u64; 3],
    replicas: u32,
    /// The deployment generation that last placed here: equal to the current one means
    /// "hosts the deployment being placed".
    stamp: u32,
    /// Taken out of the indexes.
    out: bool,
}

impl NodeSlot {
    fn key(&self, device: usize, idx: u32) -> NodeKey {
        (Reverse(self.free[device]), self.replicas, idx)
    }
}

struct Scheduler {
    slots: Vec<NodeSlot>,
    zones: usize,
    /// `index[device * zones + zone]`: schedulable nodes with that device, not taken out.
    index: Vec<BTreeSet<NodeKey>>,
}

impl Scheduler {
    fn set(&mut self, device: usize, zone: u32) -> &mut BTreeSet<NodeKey> {
        &mut self.index[device * self.zones + zone as usize]
    }

    fn take_out(&mut self, node: u32) {
        let slot = &self.slots[node as usize];
        if slot.out {
            return;
        }
        let (zone, keys) = (slot.zone, Device::ALL.map(|d| slot.key(d.index(), node)));
        let has = slot.capacity.map(|c| c > 0);
        for d in 0..3 {
            if has[d] {
                self.set(d, zone).remove(&keys[d]);
            }
        }
        self.slots[node as usize].out = true;
    }

    fn put_back(&mut self, node: u32) {
        let slot = &self.slots[node as usize];
        if !slot.out {
            return;
        }
        let (zone, keys) = (slot.zone, Device::ALL.map(|d| slot.key(d.index(), node)));
        let has = slot.capacity.map(|c| c > 0);
        for d in 0..3 {
            if has[d] {
                self.set(d, zone).insert(keys[d]);
            }
        }
        self.slots[node as usize].out = false;
    }

    /// The top of a (device, zone) index if one replica of `memory_mb` fits there.
    fn fitting_top(&self, device: usize, zone: u32, memory_mb: u64) -> Option<NodeKey> {
        let top = self.index[device * self.zones + zone as usize].first()?;
        (top.0.0 >= memory_mb).then_some(*top)
    }
}

/// Computes the next placements. Deterministic: the same inputs give the same plan; see the
/// module page for the rules and the cost.
pub fn place(nodes: &[NodeView], deployments: &[DeploymentView], current: &[Placement]) -> Plan {
    // Zones in name order, nodes in input order (the first of a repeated id wins).
    let zone_names: BTreeMap<&str, u32> = {
        let names: BTreeSet<&str> = nodes.iter().map(|n| n.zone.as_str()).collect();
        names.into_iter().zip(0..).collect()
    };
    let zones = zone_names.len().max(1);
    let mut node_ids: BTreeMap<&str, u32> = BTreeMap::new();
    let mut slots = Vec::with_capacity(nodes.len());
    let mut used: Vec<&NodeView> = Vec::with_capacity(nodes.len());
    for n in nodes {
        if node_ids.contains_key(n.id.as_str()) {
            continue;
        }
        node_ids.insert(&n.id, slots.len() as u32);
        let capacity = if n.schedulable {
            n.capacity.as_array()
        } else {
            [0; 3]
        };
        slots.push(NodeSlot {
            zone: zone_names.get(n.zone.as_str()).copied().unwrap_or(0),
            capacity,
            free: capacity,
            replicas: 0,
            stamp: 0,
            out: false,
        });
        used.push(n);
    }

    // Deployments in id order (the first of a repeated id wins).
    let mut order: Vec<&DeploymentView> = deployments.iter().collect();
    order.sort_by_key(|d| d.id);
    order.dedup_by_key(|d| d.id);
    let position: BTreeMap<u64, usize> = order.iter().enumerate().map(|(i, d)| (d.id, i)).collect();

    // 1. Keep what is still valid.
    let mut sorted: Vec<&Placement> = current.iter().collect();
    sorted.sort_by_key(|p| (p.deployment, p.replica));
    let mut kept: Vec<Vec<Placement>> = vec![Vec::new(); order.len()];
    let mut generation = 0u32;
    let mut last_deployment = None;
    for p in sorted {
        let Some(&di) = position.get(&p.deployment) else {
            continue;
        };
        let d = order[di];
        if last_deployment != Some(p.deployment) {
            last_deployment = Some(p.deployment);
            generation += 1;
        }
        let Some(&ni) = node_ids.get(p.node.as_str()) else {
            continue;
        };
        let slot = &mut slots[ni as usize];
        let dev = p.device.index();
        let valid = p.replica < d.replicas
            && kept[di].last().is_none_or(|k| k.replica != p.replica)
            && d.hardware.contains(&p.device)
            && slot.capacity[dev] > 0
            && slot.free[dev] >= d.memory_mb
            && slot.stamp != generation
            && p.phase != ReplicaPhase::Failed
            && d.excluded.binary_search(&p.node).is_err();
        if valid {
            slot.free[dev] -= d.memory_mb;
            slot.replicas += 1;
            slot.stamp = generation;
            kept[di].push(p.clone());
        }
    }

    // 2. Index the schedulable nodes.
    let mut s = Scheduler {
        slots,
        zones,
        index: vec![BTreeSet::new(); 3 * zones],
    };
    let mut eligible_by_mask = [0u32; 8];
    for (i, slot) in s.slots.iter().enumerate() {
        let mut mask = 0;
        for d in 0..3 {
            if slot.capacity[d] > 0 {
                mask |= 1 << d;
                let key = slot.key(d, i as u32);
                s.index[d * zones + slot.zone as usize].insert(key);
            }
        }
        eligible_by_mask[mask] += 1;
    }

    // 3. Place what is missing, deployment by deployment.
    let mut placements = Vec::with_capacity(current.len());
    let mut unplaced = Vec::new();
    let mut in_zone = vec![0u32; zones];
    for (di, d) in order.iter().enumerate() {
        let kept_here = std::mem::take(&mut kept[di]);
        let missing: Vec<u32> = {
            let mut have = kept_here.iter().map(|p| p.replica).peekable();
            (0..d.replicas)
                .filter(|r| {
                    if have.peek() == Some(r) {
                        have.next();
                        false
                    } else {
                        true
                    }
                })
                .collect()
        };
        if missing.is_empty() {
            placements.extend(kept_here);
            continue;
        }
        generation += 1;
        let mut touched: Vec<u32> = Vec::new();
        // Nodes this deployment may not use leave the index while it is placed.
        for id in &d.excluded {
            if let Some(&ni) = node_ids.get(id.as_str()) {
                s.take_out(ni);
                touched.push(ni);
            }
        }
        for p in &kept_here {
            if let Some(&ni) = node_ids.get(p.node.as_str()) {
                s.slots[ni as usize].stamp = generation;
                in_zone[s.slots[ni as usize].zone as usize] += 1;
                s.take_out(ni);
                touched.push(ni);
            }
        }
        let mut next = 0;
        let mut wished: Vec<Device> = Vec::with_capacity(d.hardware.len());
        for device in &d.hardware {
            if !wished.contains(device) {
                wished.push(*device);
            }
        }
        for device in wished.iter().map(|d| d.index()) {
            if next == missing.len() {
                break;
            }
            let mut zone_set: BTreeSet<ZoneKey> = BTreeSet::new();
            for z in 0..zones as u32 {
                if let Some(top) = s.fitting_top(device, z, d.memory_mb) {
                    zone_set.insert((in_zone[z as usize], top.0, z));
                }
            }
            while next < missing.len() {
                let Some((_, _, z)) = zone_set.pop_first() else {
                    break;
                };
                let Some(top) = s.set(device, z).first().copied() else {
                    continue;
                };
                let ni = top.2;
                s.take_out(ni);
                let slot = &mut s.slots[ni as usize];
                slot.free[device] -= d.memory_mb;
                slot.replicas += 1;
                slot.stamp = generation;
                touched.push(ni);
                in_zone[z as usize] += 1;
                placements.push(Placement {
                    deployment: d.id,
                    revision: first_revision(),
                    replica: missing[next],
                    node: used[ni as usize].id.clone(),
                    device: Device::ALL[device],
                    ready: false,
                    phase: ReplicaPhase::Pending,
                    reason: None,
                });
                next += 1;
                if let Some(top) = s.fitting_top(device, z, d.memory_mb) {
                    zone_set.insert((in_zone[z as usize], top.0, z));
                }
            }
        }
        if next < missing.len() {
            let mask = wished.iter().fold(0usize, |m, d| m | 1 << d.index());
            let eligible: u32 = (0..8)
                .filter(|m| m & mask != 0)
                .map(|m| eligible_by_mask[m])
                .sum();
            let hosting = (kept_here.len() + next) as u32;
            let reason = if eligible == 0 {
                UnplacedReason::NoMatchingHardware
            } else if hosting >= eligible {
                UnplacedReason::TooFewNodes
            } else {
                UnplacedReason::InsufficientMemory
            };
            unplaced.push(Unplaced {
                revision: first_revision(),
                deployment: d.id,
                replicas: missing[next..].to_vec(),
                reason,
            });
        }
        placements.extend(kept_here);
        for ni in touched {
            in_zone[s.slots[ni as usize].zone as usize] = 0;
            s.put_back(ni);
        }
    }
    placements.sort_by_key(|p| (p.deployment, p.replica));
    Plan {
        placements,
        unplaced,
    }
}
