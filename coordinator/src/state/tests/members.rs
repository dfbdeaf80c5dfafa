//! Nodes coming and going, and the placements following them.

use super::*;
use crate::command::ReplicaKey;
use crate::scheduler::ReplicaPhase;
use crate::state::deployments::RolloutState;
use crate::state::members::{NodeHealth, NodeLoad};

fn operator() -> Actor {
    actor("olga", Role::Operator)
}
fn leader() -> Actor {
    actor("coordinator-1", Role::Operator)
}

fn join(w: &mut World, id: &str, zone: &str) {
    w.ok(
        operator(),
        Command::JoinNode {
            node: node_spec(id, zone, 8000, 0),
        },
    );
}

fn heartbeat(node: &str, ready: Vec<ReplicaKey>) -> Command {
    Command::Heartbeat {
        node: node.into(),
        load: NodeLoad {
            cpu_percent: 12,
            memory_used_mb: 900,
            inflight: 3,
        },
        ready,
    }
}

fn nodes_of(w: &World, deployment: u64) -> Vec<String> {
    w.state
        .placements()
        .iter()
        .filter(|p| p.deployment == deployment)
        .map(|p| p.node.clone())
        .collect()
}

/// Three nodes in three zones, `fraud@1` on two replicas in staging (deployment 1).
fn deployed() -> World {
    let mut w = World::with_shelf();
    for (id, zone) in [("n1", "a"), ("n2", "b"), ("n3", "c")] {
        join(&mut w, id, zone);
    }
    let out = w.ok(operator(), deploy("fraud", "1", "staging", 2));
    assert!(out.placements_changed);
    w
}

#[test]
fn deployments_are_placed_and_become_available() {
    let mut w = deployed();
    let hosts = nodes_of(&w, 1);
    assert_eq!(hosts, ["n1", "n2"]);
    assert_eq!(
        w.state.nodes()["n1"].assigned,
        [ReplicaKey {
            revision: 1,
            deployment: 1,
            replica: 0
        }]
    );
    assert_eq!(
        w.state.deployments()[&1].rollout.state,
        RolloutState::Progressing
    );
    // Readiness comes with heartbeats; a quiet heartbeat is not audited.
    let audited = w.state.audit().len();
    let out = w.ok(leader(), heartbeat("n3", vec![]));
    assert_eq!(out.audit_seq, None);
    assert_eq!(w.state.audit().len(), audited);
    assert_eq!(w.state.nodes()["n3"].load.inflight, 3);
    // A replica listed by the wrong node is ignored.
    w.ok(
        leader(),
        heartbeat(
            "n3",
            vec![ReplicaKey {
                revision: 1,
                deployment: 1,
                replica: 0,
            }],
        ),
    );
    assert_eq!(w.state.deployments()[&1].rollout.ready, 0);
    let out = w.ok(
        leader(),
        heartbeat(
            "n1",
            vec![ReplicaKey {
                revision: 1,
                deployment: 1,
                replica: 0,
            }],
        ),
    );
    assert!(out.audit_seq.is_some());
    w.ok(
        leader(),
        heartbeat(
            "n2",
            vec![ReplicaKey {
                revision: 1,
                deployment: 1,
                replica: 1,
            }],
        ),
    );
    assert_eq!(
        w.state.deployments()[&1].rollout.state,
        RolloutState::Available
    );
    // Scaling beyond the nodes leaves the rest unplaced and says so.
    w.ok(
        operator(),
        Command::ScaleDeployment {
            deployment: 1,
            replicas: 4,
        },
    );
    let d = &w.state.deployments()[&1];
    assert_eq!(
        (d.rollout.state, d.rollout.placed, d.rollout.unplaced),
        (RolloutState::Degraded, 3, 1)
    );
    assert!(
        w.state
            .audit()
            .last()
            .is_some_and(|a| a.detail.contains("1 added") && a.detail.contains("1 unplaced"))
    );
    w.ok(operator(), Command::DeleteDeployment { deployment: 1 });
    assert!(w.state.placements().is_empty() && w.state.unplaced().is_empty());
    assert!(w.state.nodes().values().all(|n| n.assigned.is_empty()));
}

#[test]
fn a_silent_node_is_marked_down_after_the_grace_period_and_its_replicas_move() {
    let mut w = deployed();
    // Within the grace period the leader's mark is refused.
    let e = w.refused(leader(), Command::MarkNodeDown { node: "n1".into() });
    assert!(matches!(e, Error::NodeNotOverdue { .. }), "{e}");
    assert!(w.state.overdue_nodes(w.now).is_empty());
    w.now += crate::state::DEFAULT_HEARTBEAT_GRACE_MS;
    w.ok(leader(), heartbeat("n2", vec![]));
    w.ok(leader(), heartbeat("n3", vec![]));
    assert_eq!(w.state.overdue_nodes(w.now), ["n1"]);
    let out = w.ok(leader(), Command::MarkNodeDown { node: "n1".into() });
    assert!(out.placements_changed);
    assert_eq!(w.state.nodes()["n1"].health, NodeHealth::Down);
    assert_eq!(
        nodes_of(&w, 1),
        ["n3", "n2"],
        "replica 0 moved, replica 1 stayed"
    );
    let e = w.refused(leader(), Command::MarkNodeDown { node: "n1".into() });
    assert!(matches!(e, Error::NodeAlreadyInState { .. }), "{e}");
    // It comes back: recorded, but nothing moves back (stability).
    let out = w.ok(leader(), heartbeat("n1", vec![]));
    assert!(out.audit_seq.is_some());
    assert_eq!(w.state.nodes()["n1"].health, NodeHealth::Up);
    assert_eq!(nodes_of(&w, 1), ["n3", "n2"]);
}

#[test]
fn draining_and_leaving_move_replicas() {
    let mut w = deployed();
    w.ok(operator(), Command::DrainNode { node: "n2".into() });
    assert_eq!(nodes_of(&w, 1), ["n1", "n3"]);
    let e = w.refused(operator(), Command::DrainNode { node: "n2".into() });
    assert!(matches!(e, Error::NodeAlreadyInState { .. }), "{e}");
    // Draining survives a restart (the node joins again).
    join(&mut w, "n2", "b");
    assert!(w.state.nodes()["n2"].draining);
    w.ok(operator(), Command::ResumeNode { node: "n2".into() });
    let e = w.refused(operator(), Command::ResumeNode { node: "n2".into() });
    assert!(matches!(e, Error::NodeAlreadyInState { .. }), "{e}");
    w.ok(operator(), Command::LeaveNode { node: "n3".into() });
    assert_eq!(nodes_of(&w, 1), ["n1", "n2"]);
    assert!(!w.state.nodes().contains_key("n3"));
    for command in [
        Command::LeaveNode { node: "n3".into() },
        Command::DrainNode { node: "zz".into() },
        heartbeat("zz", vec![]),
    ] {
        let e = w.refused(operator(), command);
        assert!(matches!(e, Error::UnknownNode { .. }), "{e}");
    }
}

#[test]
fn joins_are_validated() {
    let mut w = World::new();
    let mut bad = vec![];
    let mut spec = node_spec("n 1", "a", 1000, 0);
    bad.push(spec.clone());
    spec.id = "n1".into();
    spec.address = "nowhere".into();
    bad.push(spec.clone());
    spec.address = "n1:1".into();
    spec.inventory.cpu_cores = 0;
    bad.push(spec.clone());
    spec.inventory.cpu_cores = 1;
    spec.labels.insert("bad key".into(), "v".into());
    bad.push(spec.clone());
    for spec in bad {
        let e = w.refused(operator(), Command::JoinNode { node: spec });
        assert!(matches!(e, Error::Invalid { .. }), "{e}");
    }
    spec.labels.clear();
    w.ok(operator(), Command::JoinNode { node: spec });
    let e = w.refused(
        actor("pat", Role::Publisher),
        Command::JoinNode {
            node: node_spec("n2", "a", 1, 0),
        },
    );
    assert!(matches!(e, Error::Forbidden { .. }), "{e}");
}

#[test]
fn coordinators_and_grace() {
    let mut w = World::new();
    let add = |id| Command::AddCoordinator {
        id,
        address: format!("c{id}:7000"),
        api_address: String::new(),
        cert_serial: None,
    };
    w.ok(admin(), add(1));
    w.ok(admin(), add(2));
    let e = w.refused(admin(), add(2));
    assert!(matches!(e, Error::CoordinatorExists { id: 2 }), "{e}");
    let e = w.refused(operator(), add(3));
    assert!(
        matches!(
            e,
            Error::Forbidden {
                needed: Role::Admin,
                ..
            }
        ),
        "{e}"
    );
    w.ok(admin(), Command::RemoveCoordinator { id: 1 });
    let e = w.refused(admin(), Command::RemoveCoordinator { id: 2 });
    assert!(matches!(e, Error::LastCoordinator { id: 2 }), "{e}");
    let e = w.refused(admin(), Command::RemoveCoordinator { id: 9 });
    assert!(matches!(e, Error::UnknownCoordinator { id: 9 }), "{e}");
    let e = w.refused(admin(), Command::SetHeartbeatGrace { grace_ms: 5 });
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    w.ok(admin(), Command::SetHeartbeatGrace { grace_ms: 30_000 });
    assert_eq!(w.state.heartbeat_grace_ms(), 30_000);
}

#[test]
fn the_clock_never_goes_back() {
    let mut w = World::new();
    w.ok(admin(), policy("staging", 0, Role::Approver));
    let late = w.state.clock_ms();
    // A new leader whose clock is behind.
    let entry = Entry {
        actor: admin(),
        now_ms: late - 500_000,
        command: policy("production", 2, Role::Approver),
        write_id: None,
    };
    w.state.apply(&entry).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(w.state.clock_ms(), late);
    assert_eq!(w.state.audit()[1].at_ms, late);
}

fn report(node: &str, deployment: u64, replica: u32, phase: ReplicaPhase) -> Command {
    Command::ReportReplicas {
        node: node.into(),
        replicas: vec![crate::command::ReplicaUpdate {
            revision: 1,
            deployment,
            replica,
            phase,
            reason: (phase == ReplicaPhase::Failed).then(|| "unsupported operator Foo".into()),
        }],
    }
}

#[test]
fn replica_reports_move_phases_and_a_failed_replica_goes_elsewhere() {
    let mut w = deployed();
    assert_eq!(nodes_of(&w, 1), ["n1", "n2"]);
    w.ok(leader(), report("n1", 1, 0, ReplicaPhase::Fetching));
    assert_eq!(w.state.placements()[0].phase, ReplicaPhase::Fetching);
    w.ok(leader(), report("n1", 1, 0, ReplicaPhase::Ready));
    assert!(w.state.placements()[0].ready);
    // A report for a replica placed elsewhere changes nothing.
    w.ok(leader(), report("n3", 1, 0, ReplicaPhase::Failed));
    assert!(w.state.placements()[0].ready);
    // n2 cannot load it: the replica moves to n3, and n2 is remembered with the reason.
    let out = w.ok(leader(), report("n2", 1, 1, ReplicaPhase::Failed));
    assert!(out.placements_changed);
    assert_eq!(nodes_of(&w, 1), ["n1", "n3"]);
    let d = &w.state.deployments()[&1];
    assert_eq!(d.failed_on["n2"], "unsupported operator Foo");
    // Scaling starts afresh: n2 may be tried again.
    w.ok(
        operator(),
        Command::ScaleDeployment {
            deployment: 1,
            replicas: 3,
        },
    );
    assert!(w.state.deployments()[&1].failed_on.is_empty());
    assert_eq!(nodes_of(&w, 1).len(), 3);
}

#[test]
fn a_node_serving_one_environment_gets_only_its_deployments() {
    let mut w = World::with_shelf();
    let mut spec = node_spec("prod-1", "a", 8000, 0);
    spec.environments = vec!["production".into()];
    w.ok(operator(), Command::JoinNode { node: spec });
    w.ok(operator(), deploy("fraud", "1", "staging", 1));
    assert!(nodes_of(&w, 1).is_empty(), "no node serves staging");
    join(&mut w, "any", "b");
    assert_eq!(nodes_of(&w, 1), ["any"]);
}

#[test]
fn a_down_node_that_reports_is_back_up() {
    let mut w = deployed();
    w.now += crate::state::DEFAULT_HEARTBEAT_GRACE_MS;
    w.ok(leader(), Command::MarkNodeDown { node: "n1".into() });
    assert_eq!(w.state.nodes()["n1"].health, NodeHealth::Down);
    w.ok(
        leader(),
        Command::ReportReplicas {
            node: "n1".into(),
            replicas: Vec::new(),
        },
    );
    assert_eq!(w.state.nodes()["n1"].health, NodeHealth::Up);
}

#[test]
fn node_join_tokens_admit_nodes_only_and_need_limits() {
    let mut w = World::new();
    let limited = |role, expires, uses| Command::CreateLimitedToken {
        id: "nj".into(),
        name: "node-join".into(),
        role,
        secret_hash: hex64(5),
        expires_in_ms: expires,
        uses,
    };
    // An operator may mint one, with an expiry and a use count.
    w.refused(operator(), limited(Role::NodeJoin, None, Some(3)));
    w.refused(operator(), limited(Role::Join, Some(60_000), Some(1)));
    w.ok(operator(), limited(Role::NodeJoin, Some(60_000), Some(2)));
    let token = Actor {
        name: "node-join".into(),
        role: Role::NodeJoin,
        token_id: Some("nj".into()),
    };
    // It joins nodes, twice, and does nothing else.
    w.refused(token.clone(), deploy("fraud", "1", "staging", 1));
    w.ok(
        token.clone(),
        Command::JoinNode {
            node: node_spec("n1", "a", 8000, 0),
        },
    );
    w.ok(
        token.clone(),
        Command::JoinNode {
            node: node_spec("n2", "a", 8000, 0),
        },
    );
    w.refused(
        token,
        Command::JoinNode {
            node: node_spec("n3", "a", 8000, 0),
        },
    );
}

#[test]
fn a_model_that_loads_only_on_onnx_runtime_goes_only_to_nodes_that_have_it() {
    let mut w = World::with_shelf();
    let mut manifest = manifest(1000, &[Device::Cpu]);
    manifest.loads_on = vec!["ort".into()];
    w.ok(
        actor("pat", Role::Publisher),
        Command::RegisterModelVersion {
            model: "det".into(),
            version: "1".into(),
            digest: hex64(7),
            manifest,
            publisher_key: hex64(PUBLISHER_KEY),
        },
    );
    join(&mut w, "tract-only", "a");
    let mut with_ort = node_spec("with-ort", "b", 8000, 0);
    with_ort.inventory.backends = vec!["tract".into(), "ort".into()];
    w.ok(operator(), Command::JoinNode { node: with_ort });
    w.ok(operator(), deploy("det", "1", "staging", 2));
    // One replica on the one node with ONNX Runtime; the other waits for a second such node
    // (replicas of a deployment take distinct nodes) rather than going to the tract-only one.
    assert_eq!(nodes_of(&w, 1), vec!["with-ort".to_string()]);
    // A model not checked at pack time may go anywhere.
    w.ok(operator(), deploy("fraud", "1", "staging", 2));
    let mut hosts = nodes_of(&w, 2);
    hosts.sort();
    assert_eq!(
        hosts,
        vec!["tract-only".to_string(), "with-ort".to_string()]
    );
}
