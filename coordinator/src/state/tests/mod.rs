//! State machine tests: fixtures here, one file per area, proptests in `props`.

mod approvals;
mod autoscaling;
mod credentials;
mod members;
mod props;
mod rollouts;
mod scale;
mod shelf_tokens;
mod writes;

use std::collections::BTreeMap;

use crate::command::{Actor, Command, Entry, NodeSpec, Outcome, Role};
use crate::error::{Error, Result};
use crate::scheduler::Device;
use crate::state::State;
use crate::state::members::{Accelerator, Inventory};
use crate::state::shelf::{ManifestSummary, TensorSummary};

/// A 64-hex-digit digest or key that differs for each `n`.
pub fn hex64(n: u64) -> String {
    format!("{n:064x}")
}

pub fn actor(name: &str, role: Role) -> Actor {
    Actor::system(name, role)
}

pub fn admin() -> Actor {
    actor("root", Role::Admin)
}

pub fn manifest(memory_mb: u64, preferred: &[Device]) -> ManifestSummary {
    ManifestSummary {
        inputs: vec![TensorSummary {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![-1, 4],
        }],
        outputs: vec![TensorSummary {
            name: "output".into(),
            datatype: "FP32".into(),
            shape: vec![-1, 3],
        }],
        memory_mb,
        preferred: preferred.to_vec(),
        loads_on: Vec::new(),
    }
}

pub fn node_spec(id: &str, zone: &str, memory_mb: u64, gpu_mb: u64) -> NodeSpec {
    NodeSpec {
        id: id.into(),
        address: format!("{id}.mesh:7443"),
        inventory: Inventory {
            cpu_cores: 8,
            memory_mb,
            gpus: if gpu_mb > 0 {
                vec![Accelerator {
                    model: "test gpu".into(),
                    memory_mb: gpu_mb,
                }]
            } else {
                vec![]
            },
            npus: vec![],
            backends: vec!["tract".into()],
        },
        labels: BTreeMap::new(),
        zone: zone.into(),
        http_address: String::new(),
        environments: Vec::new(),
        version: String::new(),
        cert_serial: None,
    }
}

/// The publisher key every test bundle is signed with; [`World::new`] trusts it.
pub const PUBLISHER_KEY: u64 = 99;

pub fn trust_publisher() -> Command {
    Command::TrustKey {
        key: hex64(PUBLISHER_KEY),
        name: "publisher".into(),
    }
}

pub fn register(model: &str, version: &str, n: u64) -> Command {
    Command::RegisterModelVersion {
        model: model.into(),
        version: version.into(),
        digest: hex64(n),
        manifest: manifest(1000, &[Device::Cpu]),
        publisher_key: hex64(PUBLISHER_KEY),
    }
}

/// A state with a clock that moves 1 s per command.
pub struct World {
    pub state: State,
    pub now: u64,
}

impl World {
    pub fn new() -> World {
        World {
            state: State::new(),
            now: 1_000_000,
        }
    }

    /// `staging` needs nothing, `production` two approvers; `fraud@1` registered by `pat`.
    pub fn with_shelf() -> World {
        let mut w = World::new();
        w.ok(admin(), trust_publisher());
        w.ok(admin(), policy("staging", 0, Role::Approver));
        w.ok(admin(), policy("production", 2, Role::Approver));
        w.ok(actor("pat", Role::Publisher), register("fraud", "1", 1));
        w
    }

    pub fn run(&mut self, actor: Actor, command: Command) -> Result<Outcome> {
        self.now += 1000;
        self.state.apply(&Entry {
            actor,
            now_ms: self.now,
            command,
            write_id: None,
        })
    }

    #[track_caller]
    pub fn ok(&mut self, actor: Actor, command: Command) -> Outcome {
        let what = format!("{command:?}");
        match self.run(actor, command) {
            Ok(outcome) => {
                if let Err(e) = self.state.check_invariants() {
                    panic!("invariant broken after {what}: {e}");
                }
                outcome
            }
            Err(e) => panic!("{what} was refused: {e}"),
        }
    }

    /// Runs a command that must fail, and checks it changed nothing at all.
    #[track_caller]
    pub fn refused(&mut self, actor: Actor, command: Command) -> Error {
        let before = serde_json::to_string(&self.state).expect("the state serializes");
        let what = format!("{command:?}");
        match self.run(actor, command) {
            Ok(_) => panic!("{what} was accepted"),
            Err(e) => {
                let after = serde_json::to_string(&self.state).expect("the state serializes");
                assert_eq!(before, after, "the refused {what} changed the state");
                e
            }
        }
    }
}

pub fn policy(environment: &str, required: u32, role: Role) -> Command {
    Command::SetPolicy {
        environment: environment.into(),
        required_approvals: required,
        approver_role: role,
    }
}

pub fn request(model: &str, version: &str, environment: &str) -> Command {
    Command::RequestApproval {
        model: model.into(),
        version: version.into(),
        environment: environment.into(),
    }
}

pub fn decide(request: u64, approve: bool, comment: &str) -> Command {
    Command::Decide {
        request,
        approve,
        comment: comment.into(),
    }
}

pub fn deploy(model: &str, version: &str, environment: &str, replicas: u32) -> Command {
    Command::CreateDeployment {
        model: model.into(),
        version: version.into(),
        environment: environment.into(),
        replicas,
        hardware: None,
        hot: false,
        autoscale: None,
    }
}
