//! The setup the real-process mesh tests share (`tests/canary.rs`, `tests/autoscale.rs`,
//! `tests/density.rs`): three coordinators behind fault-injecting relays, the admin API, a
//! fresh publisher key the cluster trusts, and the CLI against the first coordinator. Each test
//! joins its own nodes (`nodes::NodeProc`) with `node_join_token`.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::harness::{Api, Member, three_coordinators, trusted_key};
use super::udp_proxy::Faults;

pub struct Cluster {
    pub coordinators: Vec<Member>,
    pub token: String,
    pub api: Api,
    /// The first coordinator's admin API.
    pub c1: String,
    /// A publisher key the cluster trusts.
    pub key: sophon_sdk::SigningKey,
    pub faults: Faults,
}

impl Cluster {
    /// Three coordinators under `root`; admin API calls time out after `api_timeout`.
    pub fn start(root: &Path, api_timeout: Duration) -> Cluster {
        let faults = Faults::new();
        let (coordinators, token) = three_coordinators(root, &faults, |_| {});
        let api = Api::new(&token, api_timeout);
        let c1 = coordinators[0].url();
        let key = trusted_key(&api, &c1);
        Cluster {
            coordinators,
            token,
            api,
            c1,
            key,
            faults,
        }
    }

    /// `sophon ARGS` against the first coordinator with the admin token: (success, stdout,
    /// stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_sophon"))
            .args(args)
            .env("SOPHON_SERVER", &self.c1)
            .env("SOPHON_TOKEN", &self.token)
            .output()
            .expect("run sophon");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A node join token that admits `uses` nodes.
    pub fn node_join_token(&self, uses: u32) -> String {
        let uses = uses.to_string();
        let (made, join, said) = self.cli(&["node", "join-token", "--uses", &uses, "--raw"]);
        assert!(made, "{said}");
        join.trim().to_string()
    }
}
