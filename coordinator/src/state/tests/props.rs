//! Random command sequences, from random actors at random (sometimes backwards) times.
//!
//! After every command: the invariants hold ([`State::check_invariants`]: placements on
//! existing schedulable nodes, memory within capacity, approvals counted right, ...); a refused
//! command left the state byte-identical; the audit log grew by exactly the audited successes,
//! and every success but a quiet heartbeat was audited. At the end: the same entries applied to
//! a fresh state, or to a state restored from a snapshot taken halfway, give the same bytes.

use proptest::prelude::*;

use super::*;
use crate::command::ReplicaKey;
use crate::hash_secret;
use crate::state::members::NodeLoad;

const MODELS: [&str; 2] = ["m0", "m1"];
const VERSIONS: [&str; 3] = ["v0", "v1", "v2"];
const ENVS: [&str; 3] = ["staging", "production", "dev"];

fn actors() -> Vec<Actor> {
    let token = |name: &str, role, id: &str| Actor {
        name: name.into(),
        role,
        token_id: Some(id.into()),
    };
    vec![
        admin(),
        actor("pat", Role::Publisher),
        actor("sam", Role::Publisher),
        actor("ann", Role::Approver),
        actor("bob", Role::Approver),
        actor("cid", Role::Approver),
        actor("olga", Role::Operator),
        actor("vic", Role::Viewer),
        token("tok", Role::Approver, "t1"),
        token("tim", Role::Operator, "t2"),
    ]
}

fn setup() -> Vec<Entry> {
    let create = |id: &str, name: &str, role| Command::CreateToken {
        id: id.into(),
        name: name.into(),
        role,
        secret_hash: hash_secret(id),
    };
    [
        create("t1", "tok", Role::Approver),
        create("t2", "tim", Role::Operator),
        policy("staging", 0, Role::Approver),
        policy("production", 2, Role::Approver),
        Command::AddCoordinator {
            id: 1,
            address: "c1:7000".into(),
            api_address: String::new(),
            cert_serial: None,
        },
        Command::TrustKey {
            key: hex64(99),
            name: "publisher".into(),
        },
    ]
    .into_iter()
    .map(|command| Entry {
        actor: admin(),
        now_ms: 1_000,
        command,
        write_id: None,
    })
    .collect()
}

fn pick<T: Clone + std::fmt::Debug + 'static>(items: &'static [T]) -> impl Strategy<Value = T> {
    prop::sample::select(items)
}

fn node_id() -> impl Strategy<Value = String> {
    (0..5u8).prop_map(|i| format!("n{i}"))
}

fn model_version() -> impl Strategy<Value = (String, String)> {
    (pick(&MODELS), pick(&VERSIONS)).prop_map(|(m, v)| (m.to_string(), v.to_string()))
}

/// The digest a (model, version) has unless the generator picks a clashing one.
fn own_digest(model: &str, version: &str) -> u64 {
    let index = |all: &[&str], x: &str| all.iter().position(|a| *a == x).unwrap_or(0) as u64;
    100 + 10 * index(&MODELS, model) + index(&VERSIONS, version)
}

fn env() -> impl Strategy<Value = String> {
    prop_oneof![3 => Just(ENVS[1]), 2 => Just(ENVS[0]), 1 => Just(ENVS[2])].prop_map(str::to_string)
}

fn hardware() -> impl Strategy<Value = Vec<Device>> {
    prop_oneof![
        Just(vec![Device::Cpu]),
        Just(vec![Device::Gpu, Device::Cpu]),
        Just(vec![Device::Gpu]),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    let member = prop_oneof![
        4 => (node_id(), 0..3u8, pick(&[2000u64, 4000, 8000]), pick(&[0u64, 0, 6000])).prop_map(
            |(id, zone, mem, gpu)| Command::JoinNode {
                node: node_spec(&id, &format!("z{zone}"), mem, gpu)
            }
        ),
        4 => (node_id(), prop::collection::vec((1..5u64, 1..4u32, 0..4u32), 0..4)).prop_map(|(node, r)| {
            Command::Heartbeat {
                node,
                load: NodeLoad::default(),
                ready: r.into_iter().map(|(deployment, revision, replica)| ReplicaKey { deployment, revision, replica }).collect(),
            }
        }),
        1 => node_id().prop_map(|node| Command::DrainNode { node }),
        1 => node_id().prop_map(|node| Command::ResumeNode { node }),
        1 => node_id().prop_map(|node| Command::LeaveNode { node }),
        2 => node_id().prop_map(|node| Command::MarkNodeDown { node }),
        1 => (1..4u64).prop_map(|id| Command::AddCoordinator { id, address: format!("c{id}:7000"), api_address: format!("c{id}:7400"), cert_serial: Some(format!("0{id}")) }),
        1 => (1..4u64).prop_map(|id| Command::RemoveCoordinator { id }),
    ];
    let shelf = prop_oneof![
        4 => (model_version(), prop::option::weighted(0.2, 0..8u64), pick(&[500u64, 1500, 3000]), hardware()).prop_map(
            |((model, version), n, mem, preferred)| Command::RegisterModelVersion {
                // Mostly one digest per (model, version); sometimes a clash.
                digest: hex64(n.unwrap_or_else(|| own_digest(&model, &version))),
                model,
                version,
                manifest: manifest(mem, &preferred),
                publisher_key: hex64(99),
            }
        ),
        1 => model_version().prop_map(|(model, version)| Command::PutOnShelf { model, version }),
        1 => model_version().prop_map(|(model, version)| Command::TakeOffShelf { model, version }),
        1 => model_version().prop_map(|(model, version)| Command::Deprecate { model, version }),
        1 => model_version().prop_map(|(model, version)| Command::Tag { model, version, tag: "stable".into() }),
        1 => pick(&MODELS).prop_map(|m| Command::Untag { model: m.into(), tag: "stable".into() }),
    ];
    let approvals = prop_oneof![
        1 => (env(), 0..4u32, pick(&[Role::Approver, Role::Operator, Role::Admin]))
            .prop_map(|(e, n, r)| policy(&e, n, r)),
        4 => (model_version(), env()).prop_map(|((m, v), e)| request(&m, &v, &e)),
        6 => (1..4u64, prop::bool::weighted(0.8), pick(&["", "ok", "no"]))
            .prop_map(|(r, a, c)| decide(r, a, c)),
        1 => (1..4u64).prop_map(|request| Command::Withdraw { request }),
    ];
    let deployments = prop_oneof![
        9 => (model_version(), env(), 0..5u32, prop::option::of(hardware()), prop::bool::weighted(0.2)).prop_map(
            |((model, version), environment, replicas, hardware, hot)| Command::CreateDeployment {
                model, version, environment, replicas, hardware, hot, autoscale: None,
            }
        ),
        1 => (1..4u64, prop::bool::ANY).prop_map(|(deployment, hot)| Command::SetDeploymentHot { deployment, hot }),
        1 => (model_version(), node_id(), pick(&[1u64, 40, 900, 5_000])).prop_map(
            |((model, version), node, memory_mb)| Command::RecordModelMemory { model, version, node, memory_mb }
        ),
        2 => (1..4u64, 0..6u32).prop_map(|(deployment, replicas)| Command::ScaleDeployment { deployment, replicas }),
        1 => (1..4u64).prop_map(|deployment| Command::DeleteDeployment { deployment }),
        2 => (1..4u64, model_version(), prop::option::of(1..3u32)).prop_map(
            |(deployment, (_, version), max_surge)| Command::UpdateDeployment { deployment, version, max_surge }
        ),
        1 => (1..4u64, prop::option::of(1..4u32)).prop_map(|(deployment, to)| Command::RollbackDeployment { deployment, to }),
        1 => (1..4u64, model_version(), prop::bool::ANY).prop_map(|(deployment, (_, version), mirror)| {
            Command::CanaryDeployment {
                deployment,
                version,
                spec: crate::state::canary::CanarySpec {
                    steps: vec![10, 50, 100],
                    interval_ms: 10_000,
                    slo: crate::state::canary::Slo { errors_bp: Some(100), ..Default::default() },
                    mirror,
                    min_requests: 20,
                    max_slowdown_pct: 200,
                },
            }
        }),
        1 => (1..4u64, 2..6u32, 0..3u32, pick(&[
            crate::state::canary::Verdict::Advance,
            crate::state::canary::Verdict::Promote,
            crate::state::canary::Verdict::Rollback,
            crate::state::canary::Verdict::Hold,
        ])).prop_map(|(deployment, revision, step, verdict)| Command::JudgeCanary {
            deployment, revision, step, verdict,
            canary: Default::default(), stable: Default::default(), reason: "judged".into(),
        }),
        1 => (1..4u64).prop_map(|deployment| Command::PromoteCanary { deployment }),
        1 => pick(&[100u32, 150, 400]).prop_map(|percent| Command::SetMemoryOvercommit { percent }),
        1 => (1..4u64, 0..3u32, 1..4u32).prop_map(|(deployment, min, max)| Command::SetAutoscale {
            deployment,
            autoscale: Some(crate::state::autoscale::Autoscale {
                min_replicas: min,
                max_replicas: max,
                target_concurrency_milli: 1000,
                stable_window_ms: 60_000,
                panic_window_ms: 6_000,
                panic_threshold_pct: 200,
                scale_to_zero_after_ms: None,
            }),
        }),
        1 => (1..4u64, 0..4u32).prop_map(|(deployment, replicas)| Command::Autoscale {
            deployment, replicas, reason: "load".into(),
        }),
    ];
    let tokens = pick(&["t1", "t2"]).prop_map(|id| Command::RevokeToken { id: id.into() });
    prop_oneof![30 => member, 20 => shelf, 30 => approvals, 20 => deployments, 1 => tokens]
}

/// One step: a command, a time step (sometimes backwards), and who issues it: when `fit`, an
/// actor whose role allows the command (so most steps get past authorisation), else anyone.
#[derive(Clone, Debug)]
struct Step {
    command: Command,
    dt: i64,
    fit: bool,
    who: usize,
}

fn step() -> impl Strategy<Value = Step> {
    (
        command(),
        prop_oneof![8 => 0..3_000i64, 1 => 10_000..40_000i64, 1 => -5_000..0i64],
        prop::bool::weighted(0.8),
        0..100usize,
    )
        .prop_map(|(command, dt, fit, who)| Step {
            command,
            dt,
            fit,
            who,
        })
}

fn entries(steps: &[Step]) -> Vec<Entry> {
    let all = actors();
    let mut now: i64 = 2_000;
    steps
        .iter()
        .map(|s| {
            now = (now + s.dt).max(0);
            let pool: Vec<&Actor> = if s.fit {
                all.iter()
                    .filter(|a| a.role.allows(s.command.required_role()))
                    .collect()
            } else {
                all.iter().collect()
            };
            Entry {
                actor: pool[s.who % pool.len()].clone(),
                now_ms: now as u64,
                command: s.command.clone(),
                write_id: None,
            }
        })
        .collect()
}

fn json(state: &State) -> String {
    serde_json::to_string(state).unwrap_or_else(|e| panic!("the state serializes: {e}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_the_invariants(steps in prop::collection::vec(step(), 1..80)) {
        let mut state = State::new();
        for entry in setup() {
            prop_assert!(state.apply(&entry).is_ok());
        }
        let entries = entries(&steps);
        let mut audited = state.audit().len();
        let half = entries.len() / 2;
        let mut snapshot = None;
        for (i, entry) in entries.iter().enumerate() {
            if i == half {
                snapshot = Some(state.snapshot().map_err(|e| TestCaseError::fail(e.to_string()))?);
            }
            let before = json(&state);
            match state.apply(entry) {
                Ok(outcome) => {
                    if outcome.audit_seq.is_some() {
                        audited += 1;
                    } else {
                        prop_assert!(matches!(entry.command, Command::Heartbeat { .. }),
                            "only heartbeats go unrecorded: {:?}", entry.command);
                    }
                }
                Err(_) => prop_assert_eq!(&before, &json(&state), "a refused command changed the state"),
            }
            prop_assert_eq!(state.audit().len(), audited);
            if let Err(e) = state.check_invariants() {
                return Err(TestCaseError::fail(format!("after {:?}: {e}", entry.command)));
            }
        }

        // Determinism: a fresh state given the same entries ends byte-identical.
        let mut replay = State::new();
        for entry in setup().iter().chain(&entries) {
            let _ = replay.apply(entry);
        }
        prop_assert_eq!(json(&replay), json(&state));
        // So does a state restored from the snapshot taken halfway.
        if let Some(bytes) = snapshot {
            let mut restored = State::restore(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            for entry in &entries[half..] {
                let _ = restored.apply(entry);
            }
            prop_assert_eq!(json(&restored), json(&state));
        }
    }
}

/// The proptest's generator reaches the interesting places (a guard against a generator that
/// only produces refusals).
#[test]
fn the_generator_reaches_approvals_and_placements() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut approved, mut placed, mut moved) = (0, 0, 0);
    for _ in 0..100 {
        let Ok(tree) = prop::collection::vec(step(), 80).new_tree(&mut runner) else {
            continue;
        };
        let mut state = State::new();
        for entry in setup().iter().chain(&entries(&tree.current())) {
            if let Ok(out) = state.apply(entry) {
                moved += usize::from(
                    out.placements_changed && matches!(entry.command, Command::MarkNodeDown { .. }),
                );
            }
        }
        approved += state
            .requests()
            .values()
            .filter(|r| r.status == crate::state::approvals::RequestStatus::Approved)
            .count();
        placed += state.placements().len();
    }
    assert!(
        approved > 10 && placed > 50 && moved > 0,
        "approved {approved}, placed {placed}, moved {moved}"
    );
}
