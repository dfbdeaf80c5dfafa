//! Autoscaling bounds, resizes and activations.

use super::*;
use crate::error::Error;
use crate::state::autoscale::Autoscale;

fn operator() -> Actor {
    actor("olga", Role::Operator)
}

fn kpa(min: u32, max: u32) -> Autoscale {
    Autoscale {
        min_replicas: min,
        max_replicas: max,
        target_concurrency_milli: 1000,
        stable_window_ms: 60_000,
        panic_window_ms: 6_000,
        panic_threshold_pct: 200,
        scale_to_zero_after_ms: (min == 0).then_some(60_000),
    }
}

fn set(deployment: u64, a: Option<Autoscale>) -> Command {
    Command::SetAutoscale {
        deployment,
        autoscale: a,
    }
}

fn resize(replicas: u32) -> Command {
    Command::Autoscale {
        deployment: 1,
        replicas,
        reason: "3.2 in flight".into(),
    }
}

fn serving() -> World {
    let mut w = World::with_shelf();
    for (id, zone) in [("n1", "a"), ("n2", "b"), ("n3", "c")] {
        w.ok(
            operator(),
            Command::JoinNode {
                node: node_spec(id, zone, 8000, 0),
            },
        );
    }
    w.ok(operator(), deploy("fraud", "1", "staging", 3));
    w
}

#[test]
fn bounds_clamp_the_replicas_and_the_autoscaler_moves_within_them() {
    let mut w = serving();
    w.refused(operator(), set(1, Some(kpa(3, 2))));
    w.refused(actor("vic", Role::Viewer), set(1, Some(kpa(1, 2))));
    w.ok(operator(), set(1, Some(kpa(1, 2))));
    assert_eq!(w.state.deployments()[&1].replicas, 2);
    // A manual scale is refused while autoscaled.
    let e = w.refused(
        operator(),
        Command::ScaleDeployment {
            deployment: 1,
            replicas: 3,
        },
    );
    assert!(e.to_string().contains("autoscaled"), "{e}");
    // The autoscaler: within the bounds, and a change.
    w.refused(operator(), resize(3));
    w.refused(operator(), resize(2));
    w.refused(operator(), resize(0));
    w.ok(operator(), resize(1));
    assert_eq!(w.state.placements().len(), 1);
    let audit = w.state.audit().last().expect("audited");
    assert_eq!(audit.action, "autoscale");
    assert!(audit.detail.contains("3.2 in flight"), "{}", audit.detail);
    // Off: the count stays, and manual scaling works again.
    w.ok(operator(), set(1, None));
    assert_eq!(w.state.deployments()[&1].replicas, 1);
    w.ok(
        operator(),
        Command::ScaleDeployment {
            deployment: 1,
            replicas: 2,
        },
    );
    let e = w.refused(operator(), resize(1));
    assert!(e.to_string().contains("not autoscaled"), "{e}");
}

#[test]
fn min_zero_goes_to_zero_and_an_activation_brings_one_back() {
    let mut w = serving();
    w.ok(operator(), set(1, Some(kpa(0, 3))));
    assert_eq!(w.state.deployments()[&1].replicas, 3);
    w.ok(operator(), resize(0));
    let d = &w.state.deployments()[&1];
    assert_eq!(d.replicas, 0);
    assert!(w.state.placements().is_empty());
    // Setting bounds again at zero keeps it at zero; an activation brings one back.
    w.ok(operator(), set(1, Some(kpa(0, 2))));
    assert_eq!(w.state.deployments()[&1].replicas, 0);
    w.ok(operator(), resize(1));
    assert_eq!(w.state.placements().len(), 1);
    // Scale to zero needs min 0.
    let mut bad = kpa(1, 2);
    bad.scale_to_zero_after_ms = Some(1000);
    let e = w.refused(operator(), set(1, Some(bad)));
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
}

#[test]
fn an_overcommit_lets_nodes_take_more_than_their_memory() {
    let mut w = World::with_shelf();
    w.ok(
        operator(),
        Command::JoinNode {
            node: node_spec("n1", "a", 3000, 0),
        },
    );
    // fraud@1 asks 1000 MiB per replica: three fit in 3000 MiB, not four.
    for env in ["staging", "dev", "qa", "lab"] {
        w.ok(admin(), policy(env, 0, Role::Approver));
        w.ok(operator(), deploy("fraud", "1", env, 1));
    }
    assert_eq!(
        (w.state.placements().len(), w.state.unplaced().len()),
        (3, 1)
    );
    w.refused(admin(), Command::SetMemoryOvercommit { percent: 50 });
    w.refused(operator(), Command::SetMemoryOvercommit { percent: 200 });
    w.ok(admin(), Command::SetMemoryOvercommit { percent: 200 });
    assert_eq!(w.state.memory_overcommit_pct(), 200);
    assert_eq!(
        (w.state.placements().len(), w.state.unplaced().len()),
        (4, 0)
    );
}

#[test]
fn a_measured_memory_replaces_the_manifests_figure_in_the_scheduler() {
    let mut w = World::with_shelf();
    w.ok(
        operator(),
        Command::JoinNode {
            node: node_spec("n1", "a", 3000, 0),
        },
    );
    for env in ["dev", "qa", "lab", "demo"] {
        w.ok(admin(), policy(env, 0, Role::Approver));
        w.ok(operator(), deploy("fraud", "1", env, 1));
    }
    // The manifest asks 1000 MiB: three fit, the fourth waits.
    assert_eq!(w.state.unplaced().len(), 1);
    let record = |memory_mb, node: &str| Command::RecordModelMemory {
        model: "fraud".into(),
        version: "1".into(),
        node: node.into(),
        memory_mb,
    };
    // Only nodes' reports (the leader commits them as the node), of members, with a figure.
    w.refused(actor("vic", Role::Viewer), record(300, "n1"));
    w.refused(operator(), record(300, "n9"));
    w.refused(operator(), record(0, "n1"));
    let seq = w
        .ok(operator(), record(300, "n1"))
        .audit_seq
        .expect("audited");
    let v = &w.state.models()["fraud"].versions["1"];
    assert_eq!(v.memory_mb(), 300);
    assert_eq!(v.measured.as_ref().map(|m| m.node.as_str()), Some("n1"));
    // Every deployment of the version takes the figure, and the fourth replica now fits.
    assert!(w.state.deployments().values().all(|d| d.memory_mb == 300));
    assert_eq!(
        (w.state.placements().len(), w.state.unplaced().len()),
        (4, 0)
    );
    assert!(
        w.state.audit()[seq as usize]
            .detail
            .contains("measured 300 MiB once loaded (was 1000 MiB)")
    );
    // The largest figure counts: a smaller or barely larger one is refused.
    w.refused(operator(), record(200, "n1"));
    w.refused(operator(), record(320, "n1"));
    // A much larger one moves replicas off a node it no longer fits.
    w.ok(operator(), record(1500, "n1"));
    assert_eq!(
        (w.state.placements().len(), w.state.unplaced().len()),
        (2, 2)
    );
}

#[test]
fn a_deployment_may_start_hot_and_autoscaled() {
    let mut w = serving();
    w.refused(
        operator(),
        Command::CreateDeployment {
            model: "fraud".into(),
            version: "1".into(),
            environment: "dev".into(),
            replicas: 1,
            hardware: None,
            hot: true,
            autoscale: Some(kpa(3, 2)),
        },
    );
    w.ok(admin(), policy("dev", 0, Role::Approver));
    w.ok(
        operator(),
        Command::CreateDeployment {
            model: "fraud".into(),
            version: "1".into(),
            environment: "dev".into(),
            replicas: 1,
            hardware: None,
            hot: true,
            autoscale: Some(kpa(2, 3)),
        },
    );
    let d = &w.state.deployments()[&2];
    assert!(d.hot);
    // Within the bounds from the start.
    assert_eq!(
        (d.replicas, d.autoscale.as_ref().map(|a| a.max_replicas)),
        (2, Some(3))
    );
    let hot = |hot| Command::SetDeploymentHot { deployment: 2, hot };
    w.refused(operator(), hot(true));
    w.refused(actor("vic", Role::Viewer), hot(false));
    w.ok(operator(), hot(false));
    assert!(!w.state.deployments()[&2].hot);
}
