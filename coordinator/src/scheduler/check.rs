//! The invariants every [`Plan`] must satisfy, checked from scratch (for tests, the proptests and
//! a driver's debug assertions). Independent of how [`place`](super::place) works.

use std::collections::{BTreeMap, BTreeSet};

use super::{DeploymentView, Device, NodeView, Plan};

/// Checks a plan against its inputs:
/// - every placement names an existing deployment, a replica below its count, an existing
///   schedulable node and a device the deployment wishes for and the node has;
/// - each replica appears once, placed or unplaced, and every replica appears;
/// - no two replicas of one deployment share a node;
/// - no node's device pool is over its capacity;
/// - nothing was left unplaced that fits: for an unplaced replica, no schedulable node that does
///   not host its deployment has a wished device with the memory free.
///
/// Returns a description of the first violation.
pub fn check_plan(
    nodes: &[NodeView],
    deployments: &[DeploymentView],
    plan: &Plan,
) -> Result<(), String> {
    let mut by_id: BTreeMap<&str, &NodeView> = BTreeMap::new();
    for n in nodes {
        by_id.entry(&n.id).or_insert(n);
    }
    let mut deps: BTreeMap<u64, &DeploymentView> = BTreeMap::new();
    for d in deployments {
        deps.entry(d.id).or_insert(d);
    }
    let mut used: BTreeMap<(&str, Device), u64> = BTreeMap::new();
    let mut seen: BTreeSet<(u64, u32)> = BTreeSet::new();
    let mut hosts: BTreeSet<(u64, &str)> = BTreeSet::new();
    for p in &plan.placements {
        let d = deps
            .get(&p.deployment)
            .ok_or_else(|| format!("placement of unknown deployment {}", p.deployment))?;
        let n = by_id
            .get(p.node.as_str())
            .ok_or_else(|| format!("placement on unknown node {}", p.node))?;
        if !n.schedulable {
            return Err(format!("placement on unschedulable node {}", p.node));
        }
        if d.excluded.contains(&p.node) {
            return Err(format!(
                "replica {}/{} on node {}, which the deployment excludes",
                d.id, p.replica, p.node
            ));
        }
        if p.replica >= d.replicas {
            return Err(format!(
                "replica {} of {} beyond its count",
                p.replica, d.id
            ));
        }
        if !d.hardware.contains(&p.device) || n.capacity.get(p.device) == 0 {
            return Err(format!(
                "replica {}/{} on {} of node {} does not match the hardware",
                d.id, p.replica, p.device, n.id
            ));
        }
        if !seen.insert((d.id, p.replica)) {
            return Err(format!("replica {}/{} placed twice", d.id, p.replica));
        }
        if !hosts.insert((d.id, n.id.as_str())) {
            return Err(format!("two replicas of {} on node {}", d.id, n.id));
        }
        *used.entry((n.id.as_str(), p.device)).or_default() += d.memory_mb;
    }
    for ((node, device), mb) in &used {
        let cap = by_id.get(node).map_or(0, |n| n.capacity.get(*device));
        if *mb > cap {
            return Err(format!("node {node} uses {mb} of {cap} MiB on {device}"));
        }
    }
    for u in &plan.unplaced {
        let d = deps
            .get(&u.deployment)
            .ok_or_else(|| format!("unplaced replicas of unknown deployment {}", u.deployment))?;
        for r in &u.replicas {
            if *r >= d.replicas || !seen.insert((d.id, *r)) {
                return Err(format!(
                    "unplaced replica {}/{r} is wrong or repeated",
                    d.id
                ));
            }
        }
        if u.replicas.is_empty() {
            continue;
        }
        for n in by_id.values().filter(|n| n.schedulable) {
            if hosts.contains(&(d.id, n.id.as_str())) || d.excluded.contains(&n.id) {
                continue;
            }
            for device in &d.hardware {
                let cap = n.capacity.get(*device);
                let free =
                    cap.saturating_sub(used.get(&(n.id.as_str(), *device)).copied().unwrap_or(0));
                if cap > 0 && free >= d.memory_mb {
                    return Err(format!(
                        "replica {}/{} left unplaced although node {} has {free} MiB free on {device}",
                        d.id, u.replicas[0], n.id
                    ));
                }
            }
        }
    }
    for d in deps.values() {
        for r in 0..d.replicas {
            if !seen.contains(&(d.id, r)) {
                return Err(format!("replica {}/{r} neither placed nor unplaced", d.id));
            }
        }
    }
    Ok(())
}
