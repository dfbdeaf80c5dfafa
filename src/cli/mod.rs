//! The subcommands of the `sophon` binary.

pub mod admin;
pub mod bench;
pub mod bench_backends;
pub mod bench_floor;
pub mod bench_heartbeats;
pub mod bench_mesh;
pub mod bench_raft;
pub mod bundle;
pub mod client;
pub mod coordinator;
pub mod dev;
pub mod node;
pub mod top;

use std::path::PathBuf;

/// `$SOPHON_HOME`, or `~/.sophon`: keys and the component cache live here.
pub fn sophon_home() -> PathBuf {
    if let Some(home) = std::env::var_os("SOPHON_HOME") {
        return PathBuf::from(home);
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".sophon"))
        .unwrap_or_else(|| PathBuf::from(".sophon"))
}

/// Where `keygen` writes, and `pack` reads, the default publisher key.
pub fn default_key_path() -> PathBuf {
    sophon_home().join("publisher.key")
}
