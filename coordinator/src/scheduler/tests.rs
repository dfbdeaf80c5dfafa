//! Table tests for the scheduler, and the 100,000 replicas × 10,000 nodes run.

use std::collections::{BTreeMap, BTreeSet};

use super::synthetic::synthetic_cluster;
use super::*;

fn node(id: &str, zone: &str, cpu_mb: u64, gpu_mb: u64, npu_mb: u64) -> NodeView {
    NodeView {
        id: id.into(),
        zone: zone.into(),
        schedulable: true,
        capacity: DeviceMemory {
            cpu_mb,
            gpu_mb,
            npu_mb,
        },
    }
}

fn deployment(id: u64, replicas: u32, memory_mb: u64, hardware: &[Device]) -> DeploymentView {
    DeploymentView {
        id,
        replicas,
        memory_mb,
        hardware: hardware.to_vec(),
        excluded: Vec::new(),
    }
}

fn checked(nodes: &[NodeView], deps: &[DeploymentView], current: &[Placement]) -> Plan {
    let plan = place(nodes, deps, current);
    if let Err(e) = check_plan(nodes, deps, &plan) {
        panic!("invariant broken: {e}\nplan: {plan:#?}");
    }
    assert_eq!(
        plan,
        place(nodes, deps, current),
        "the plan is deterministic"
    );
    plan
}

/// (node, device) of each replica of a deployment, in replica order.
fn where_is(plan: &Plan, deployment: u64) -> Vec<(String, Device)> {
    plan.placements
        .iter()
        .filter(|p| p.deployment == deployment)
        .map(|p| (p.node.clone(), p.device))
        .collect()
}

const CPU: &[Device] = &[Device::Cpu];
const GPU: &[Device] = &[Device::Gpu];

#[test]
fn hardware_must_match() {
    let nodes = [node("c1", "a", 8000, 0, 0), node("g1", "a", 8000, 16000, 0)];
    struct Case {
        wish: &'static [Device],
        replicas: u32,
        want: Vec<(&'static str, Device)>,
        unplaced: Option<UnplacedReason>,
    }
    let cases = [
        Case {
            wish: GPU,
            replicas: 1,
            want: vec![("g1", Device::Gpu)],
            unplaced: None,
        },
        Case {
            wish: GPU,
            replicas: 2,
            want: vec![("g1", Device::Gpu)],
            unplaced: Some(UnplacedReason::TooFewNodes),
        },
        Case {
            wish: &[Device::Npu],
            replicas: 1,
            want: vec![],
            unplaced: Some(UnplacedReason::NoMatchingHardware),
        },
        Case {
            // GPU first, CPU for the rest.
            wish: &[Device::Gpu, Device::Cpu],
            replicas: 2,
            want: vec![("g1", Device::Gpu), ("c1", Device::Cpu)],
            unplaced: None,
        },
        Case {
            // Equal free memory: the earlier node wins.
            wish: &[Device::Npu, Device::Cpu],
            replicas: 1,
            want: vec![("c1", Device::Cpu)],
            unplaced: None,
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let deps = [deployment(1, case.replicas, 1000, case.wish)];
        let plan = checked(&nodes, &deps, &[]);
        let want: Vec<(String, Device)> =
            case.want.iter().map(|(n, d)| (n.to_string(), *d)).collect();
        assert_eq!(where_is(&plan, 1), want, "case {i}");
        assert_eq!(
            plan.unplaced.first().map(|u| u.reason),
            case.unplaced,
            "case {i}"
        );
    }
}

#[test]
fn memory_must_fit() {
    let nodes = [node("small", "a", 1000, 0, 0), node("big", "a", 4000, 0, 0)];
    // Two deployments of 1500 MiB fit only on `big`; the second of 3000 does not fit at all.
    let deps = [
        deployment(1, 1, 1500, CPU),
        deployment(2, 1, 1500, CPU),
        deployment(3, 1, 3000, CPU),
    ];
    let plan = checked(&nodes, &deps, &[]);
    assert_eq!(where_is(&plan, 1), [("big".to_string(), Device::Cpu)]);
    assert_eq!(where_is(&plan, 2), [("big".to_string(), Device::Cpu)]);
    assert_eq!(
        plan.unplaced,
        [Unplaced {
            revision: 1,
            deployment: 3,
            replicas: vec![0],
            reason: UnplacedReason::InsufficientMemory,
        }]
    );
    // GPU memory is its own pool: host memory does not count for a GPU replica.
    let nodes = [node("g", "a", 64000, 2000, 0)];
    let plan = checked(&nodes, &[deployment(1, 1, 3000, GPU)], &[]);
    assert_eq!(plan.unplaced[0].reason, UnplacedReason::InsufficientMemory);
}

#[test]
fn spreads_over_nodes_then_reports_the_rest() {
    let nodes = [
        node("n1", "a", 100_000, 0, 0),
        node("n2", "a", 1000, 0, 0),
        node("n3", "a", 1000, 0, 0),
    ];
    // n1 has room for all four, but replicas of one deployment never share a node.
    let plan = checked(&nodes, &[deployment(1, 4, 500, CPU)], &[]);
    let hosts: BTreeSet<String> = where_is(&plan, 1).into_iter().map(|(n, _)| n).collect();
    assert_eq!(hosts.len(), 3);
    assert_eq!(
        plan.unplaced,
        [Unplaced {
            revision: 1,
            deployment: 1,
            replicas: vec![3],
            reason: UnplacedReason::TooFewNodes,
        }]
    );
}

#[test]
fn spreads_over_zones_before_load() {
    // Zone a has the two emptiest nodes, but the second replica goes to zone b.
    let nodes = [
        node("a1", "a", 10_000, 0, 0),
        node("a2", "a", 9_000, 0, 0),
        node("b1", "b", 2_000, 0, 0),
        node("c1", "c", 0, 0, 0), // no pool on any device: never used
    ];
    let plan = checked(&nodes, &[deployment(1, 3, 1000, CPU)], &[]);
    let got: Vec<String> = where_is(&plan, 1).into_iter().map(|(n, _)| n).collect();
    assert_eq!(got, ["a1", "b1", "a2"]);
}

#[test]
fn prefers_the_least_loaded_node() {
    let nodes = [
        node("n1", "a", 8000, 0, 0),
        node("n2", "a", 8000, 0, 0),
        node("n3", "a", 8000, 0, 0),
    ];
    // Three single-replica deployments land on three different nodes.
    let deps: Vec<_> = (1..=3).map(|i| deployment(i, 1, 1000, CPU)).collect();
    let plan = checked(&nodes, &deps, &[]);
    let hosts: BTreeSet<String> = plan.placements.iter().map(|p| p.node.clone()).collect();
    assert_eq!(hosts.len(), 3);
    // With one node half full, the next replica goes to an emptier one.
    let nodes = [node("busy", "a", 8000, 0, 0), node("idle", "a", 6000, 0, 0)];
    let deps = [deployment(1, 1, 4000, CPU), deployment(2, 1, 500, CPU)];
    let plan = checked(&nodes, &deps, &[]);
    assert_eq!(where_is(&plan, 1)[0].0, "busy");
    assert_eq!(where_is(&plan, 2)[0].0, "idle");
}

#[test]
fn keeps_valid_placements_and_their_readiness() {
    let mut nodes = vec![node("n1", "a", 8000, 0, 0), node("n2", "b", 8000, 0, 0)];
    let deps = [deployment(1, 2, 1000, CPU)];
    let mut first = checked(&nodes, &deps, &[]);
    for p in &mut first.placements {
        p.ready = true;
    }
    // A new, emptier node joins: nothing moves, readiness stays.
    nodes.push(node("n3", "c", 64_000, 0, 0));
    let second = checked(&nodes, &deps, &first.placements);
    assert_eq!(second.placements, first.placements);
}

#[test]
fn moves_replicas_off_down_or_draining_nodes() {
    for gone in ["down", "draining", "left"] {
        let mut nodes = vec![
            node("n1", "a", 8000, 0, 0),
            node("n2", "b", 8000, 0, 0),
            node("n3", "c", 8000, 0, 0),
        ];
        let deps = [deployment(1, 2, 1000, CPU), deployment(2, 1, 1000, CPU)];
        let mut before = checked(&nodes, &deps, &[]);
        for p in &mut before.placements {
            p.ready = true;
        }
        let victim = before.placements[0].node.clone();
        match gone {
            "left" => nodes.retain(|n| n.id != victim),
            _ => nodes
                .iter_mut()
                .filter(|n| n.id == victim)
                .for_each(|n| n.schedulable = false),
        }
        let after = checked(&nodes, &deps, &before.placements);
        assert!(after.unplaced.is_empty(), "{gone}");
        for (b, a) in before.placements.iter().zip(&after.placements) {
            if b.node == victim {
                assert_ne!(a.node, victim, "{gone}: moved off");
                assert!(!a.ready, "{gone}: a moved replica starts not ready");
            } else {
                assert_eq!(a, b, "{gone}: the others stay");
            }
        }
    }
}

#[test]
fn scale_down_drops_the_highest_replicas_and_invalid_ones() {
    let nodes = [node("n1", "a", 8000, 0, 0), node("n2", "b", 8000, 0, 0)];
    let plan = checked(&nodes, &[deployment(1, 2, 1000, CPU)], &[]);
    let smaller = checked(&nodes, &[deployment(1, 1, 1000, CPU)], &plan.placements);
    assert_eq!(smaller.placements, plan.placements[..1]);
    // Stale input (a deleted deployment, an unknown node, a wrong device, a duplicate, two
    // replicas on one node) is dropped or placed again.
    let stale = [
        Placement {
            revision: 1,
            deployment: 9,
            replica: 0,
            node: "n1".into(),
            device: Device::Cpu,
            ready: true,
            phase: ReplicaPhase::Ready,
            reason: None,
        },
        Placement {
            revision: 1,
            deployment: 1,
            replica: 0,
            node: "gone".into(),
            device: Device::Cpu,
            ready: true,
            phase: ReplicaPhase::Ready,
            reason: None,
        },
        Placement {
            revision: 1,
            deployment: 1,
            replica: 1,
            node: "n1".into(),
            device: Device::Gpu,
            ready: true,
            phase: ReplicaPhase::Ready,
            reason: None,
        },
    ];
    let plan = checked(&nodes, &[deployment(1, 2, 1000, CPU)], &stale);
    assert_eq!(plan.placements.len(), 2);
    assert!(plan.placements.iter().all(|p| !p.ready));
    let twice = [plan.placements[0].clone(), plan.placements[0].clone()];
    checked(&nodes, &[deployment(1, 2, 1000, CPU)], &twice);
    let same_node = [
        plan.placements[0].clone(),
        Placement {
            revision: 1,
            replica: 1,
            ..plan.placements[0].clone()
        },
    ];
    let fixed = checked(&nodes, &[deployment(1, 2, 1000, CPU)], &same_node);
    assert_eq!(fixed.placements[0], plan.placements[0]);
}

#[test]
fn no_nodes_or_no_deployments() {
    assert_eq!(place(&[], &[], &[]), Plan::default());
    let plan = checked(&[], &[deployment(1, 2, 10, CPU)], &[]);
    assert_eq!(plan.unplaced[0].reason, UnplacedReason::NoMatchingHardware);
    let plan = checked(
        &[node("n", "a", 10, 0, 0)],
        &[deployment(1, 0, 10, CPU)],
        &[],
    );
    assert_eq!(plan, Plan::default());
}

/// 100,000 replicas over 10,000 nodes: the invariants hold, everything fits, zones are balanced
/// per deployment; then 100 nodes go down and only their replicas move. Run with `--release
/// -- --nocapture` to see the times.
#[test]
fn hundred_thousand_replicas_on_ten_thousand_nodes() {
    let cluster = synthetic_cluster(10_000, 100_000, 7);
    let started = std::time::Instant::now();
    let plan = place(&cluster.nodes, &cluster.deployments, &[]);
    let first = started.elapsed();
    check_plan(&cluster.nodes, &cluster.deployments, &plan).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.placements.len(), 100_000);
    assert!(plan.unplaced.is_empty());
    let zone_of: BTreeMap<&str, &str> = cluster
        .nodes
        .iter()
        .map(|n| (n.id.as_str(), n.zone.as_str()))
        .collect();
    let zones: BTreeSet<&str> = zone_of.values().copied().collect();
    let mut per_zone: BTreeMap<u64, BTreeMap<&str, u32>> = BTreeMap::new();
    for p in &plan.placements {
        *per_zone
            .entry(p.deployment)
            .or_default()
            .entry(zone_of[p.node.as_str()])
            .or_default() += 1;
    }
    // Zones are balanced per deployment where one device serves it (a deployment that prefers
    // NPUs crowds into the zones that still have NPU memory before falling back to CPUs: the
    // hardware wish comes before the zone spread).
    let single_device: BTreeSet<u64> = cluster
        .deployments
        .iter()
        .filter(|d| d.hardware.len() == 1)
        .map(|d| d.id)
        .collect();
    for (d, counts) in per_zone.iter().filter(|(d, _)| single_device.contains(d)) {
        let max = counts.values().copied().max().unwrap_or(0);
        let min = if counts.len() < zones.len() {
            0
        } else {
            counts.values().copied().min().unwrap_or(0)
        };
        assert!(
            max - min <= 1,
            "deployment {d} is unbalanced over zones: {counts:?}"
        );
    }

    let mut nodes = cluster.nodes.clone();
    for n in nodes.iter_mut().step_by(100) {
        n.schedulable = false;
    }
    let down: BTreeSet<&str> = nodes
        .iter()
        .filter(|n| !n.schedulable)
        .map(|n| n.id.as_str())
        .collect();
    let started = std::time::Instant::now();
    let again = place(&nodes, &cluster.deployments, &plan.placements);
    let second = started.elapsed();
    check_plan(&nodes, &cluster.deployments, &again).unwrap_or_else(|e| panic!("{e}"));
    assert!(again.unplaced.is_empty());
    let mut moved = 0;
    for (b, a) in plan.placements.iter().zip(&again.placements) {
        if down.contains(b.node.as_str()) {
            moved += 1;
        } else {
            assert_eq!(a, b);
        }
    }
    println!(
        "placed {} replicas of {} deployments on {} nodes in {first:?}; \
         {} nodes down, {moved} replicas moved in {second:?}",
        plan.placements.len(),
        cluster.deployments.len(),
        cluster.nodes.len(),
        down.len()
    );
}

#[test]
fn excluded_nodes_get_no_replica_and_lose_the_ones_they_had() {
    let nodes = [
        node("n1", "a", 4000, 0, 0),
        node("n2", "a", 4000, 0, 0),
        node("n3", "b", 4000, 0, 0),
    ];
    let plan = checked(&nodes, &[deployment(1, 2, 1000, CPU)], &[]);
    let on_n1 = plan.placements.iter().any(|p| p.node == "n1");
    assert!(on_n1);
    let mut d = deployment(1, 2, 1000, CPU);
    d.excluded = vec!["n1".into()];
    let moved = checked(&nodes, &[d.clone()], &plan.placements);
    assert!(moved.placements.iter().all(|p| p.node != "n1"));
    assert_eq!(moved.placements.len(), 2);
    // Excluded everywhere but one node: one replica placed, one unplaced.
    d.excluded = vec!["n1".into(), "n2".into()];
    let squeezed = checked(&nodes, &[d], &moved.placements);
    assert_eq!(squeezed.placements.len(), 1);
    assert_eq!(squeezed.placements[0].node, "n3");
    assert_eq!(squeezed.unplaced[0].replicas.len(), 1);
}

#[test]
fn a_failed_placement_is_placed_again() {
    let nodes = [node("n1", "a", 4000, 0, 0), node("n2", "a", 4000, 0, 0)];
    let plan = checked(&nodes, &[deployment(1, 1, 1000, CPU)], &[]);
    let mut failed = plan.placements.clone();
    failed[0].phase = ReplicaPhase::Failed;
    let mut d = deployment(1, 1, 1000, CPU);
    d.excluded = vec![failed[0].node.clone()];
    let again = checked(&nodes, &[d], &failed);
    assert_ne!(again.placements[0].node, failed[0].node);
    assert_eq!(again.placements[0].phase, ReplicaPhase::Pending);
}
