//! The state machine on the synthetic 10,000-node, 100,000-replica cluster: what one
//! placement-affecting command costs when the whole cluster is replanned. Run with `--release
//! -- --nocapture` to see the times.

use std::time::{Duration, Instant};

use super::*;
use crate::scheduler::synthetic::synthetic_cluster;
use crate::state::deployments::{Deployment, RolloutStatus};
use crate::state::members::{Node, NodeHealth, NodeLoad};
use crate::state::shelf::{Model, ModelVersion};

/// A state holding the synthetic cluster, built directly (applying 15,000 commands one by one
/// would replan the growing cluster each time).
fn big_state(nodes: usize, replicas: usize) -> State {
    let cluster = synthetic_cluster(nodes, replicas, 7);
    let mut state = State::new();
    let accelerators = |memory_mb: u64, model: &str| {
        (memory_mb > 0)
            .then(|| Accelerator {
                model: model.into(),
                memory_mb,
            })
            .into_iter()
            .collect::<Vec<_>>()
    };
    for n in &cluster.nodes {
        let node = Node {
            id: n.id.clone(),
            address: format!("{}:7443", n.id),
            inventory: Inventory {
                cpu_cores: 16,
                memory_mb: n.capacity.cpu_mb,
                gpus: accelerators(n.capacity.gpu_mb, "gpu"),
                npus: accelerators(n.capacity.npu_mb, "npu"),
                backends: vec!["tract".into()],
            },
            labels: BTreeMap::new(),
            zone: n.zone.clone(),
            health: NodeHealth::Up,
            draining: false,
            joined_at_ms: 0,
            last_heartbeat_ms: 0,
            load: NodeLoad::default(),
            assigned: Vec::new(),
            http_address: String::new(),
            environments: Vec::new(),
            version: String::new(),
            cert_serial: None,
        };
        state.nodes.insert(n.id.clone(), node);
    }
    for d in &cluster.deployments {
        let id = d.id + 1;
        let name = format!("m{id}");
        let version = ModelVersion {
            version: "1".into(),
            digest: hex64(id),
            manifest: manifest(d.memory_mb, &d.hardware),
            publisher_key: hex64(0),
            created_by: "pat".into(),
            created_at_ms: 0,
            on_shelf: true,
            deprecated: false,
            tags: Default::default(),
            stages: BTreeMap::new(),
            measured: None,
        };
        let model = Model {
            name: name.clone(),
            created_by: "pat".into(),
            created_at_ms: 0,
            versions: [("1".to_string(), version)].into(),
        };
        state.models.insert(name.clone(), model);
        let deployment = Deployment {
            id,
            model: name,
            version: "1".into(),
            environment: "staging".into(),
            replicas: d.replicas,
            hardware: d.hardware.clone(),
            memory_mb: d.memory_mb,
            created_by: "olga".into(),
            created_at_ms: 0,
            updated_at_ms: 0,
            rollout: RolloutStatus::new(d.replicas, 0, 0, 0),
            failed_on: BTreeMap::new(),
            revision: 1,
            history: Vec::new(),
            update: None,
            autoscale: None,
            hot: false,
        };
        state.deployments.insert(id, deployment);
        state.next_deployment = id + 1;
    }
    state.replan(&mut String::new());
    state.refresh_rollouts();
    state
}

fn timed(state: &mut State, now_ms: u64, command: Command) -> (Outcome, Duration) {
    let entry = Entry {
        actor: actor("olga", Role::Operator),
        now_ms,
        command,
        write_id: None,
    };
    let started = Instant::now();
    let outcome = state.apply(&entry).unwrap_or_else(|e| panic!("{e}"));
    (outcome, started.elapsed())
}

#[test]
fn commands_on_a_big_cluster() {
    let mut state = big_state(10_000, 100_000);
    assert_eq!(state.placements().len(), 100_000);
    assert!(state.unplaced().is_empty());
    state.check_invariants().unwrap_or_else(|e| panic!("{e}"));
    let now = 1_000_000;

    let (out, down) = timed(
        &mut state,
        now,
        Command::MarkNodeDown {
            node: "node-00042".into(),
        },
    );
    assert!(out.placements_changed);
    assert!(state.nodes()["node-00042"].assigned.is_empty());
    let (out, join) = timed(
        &mut state,
        now,
        Command::JoinNode {
            node: node_spec("node-new", "zone-00", 64_000, 0),
        },
    );
    assert!(
        !out.placements_changed,
        "nothing waits for a node: the scheduler is not run"
    );
    let (out, beat) = timed(
        &mut state,
        now,
        Command::Heartbeat {
            node: "node-00001".into(),
            load: NodeLoad::default(),
            ready: vec![],
        },
    );
    assert_eq!(out.audit_seq, None);
    let (out, scale) = timed(
        &mut state,
        now,
        Command::ScaleDeployment {
            deployment: 1,
            replicas: 41,
        },
    );
    assert!(out.placements_changed);
    state.check_invariants().unwrap_or_else(|e| panic!("{e}"));
    println!(
        "10,000 nodes, 100,000 replicas: mark-node-down {down:?}, join {join:?}, \
         heartbeat {beat:?}, scale {scale:?}"
    );
}
