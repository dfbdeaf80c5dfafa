//! Bootstrapping a cluster and its data directory: [`init`] (the CA, the first coordinator and
//! its first state), `coordinator.json` ([`MemberFile`]), the CA key, join token strings, and
//! new token secrets.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sophon_mesh::{Ca, Principal};

use super::driver::DriverConfig;
use super::{io, mesh};
use crate::raft::{RedbLogStore, ReplicaConfig, ReplicaNode, tracing_logger};
use crate::{Actor, Command, Entry, Error, Result, Role};

/// What `coordinator.json` records.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberFile {
    pub id: u64,
    pub mesh_address: String,
    pub api_address: String,
    /// The coordinators' mesh addresses when this one joined: it must answer them before its
    /// state (which records them) arrives.
    #[serde(default)]
    pub peers: std::collections::BTreeMap<u64, String>,
    /// Where the mesh endpoint listens, when that is not `mesh_address` (behind a proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_listen: Option<String>,
}

/// Records where this coordinator's mesh endpoint listens when others reach it elsewhere.
pub fn record_mesh_listen(dir: &Path, listen: &str) -> Result<()> {
    let mut member = read_member_file(dir)?;
    member.mesh_listen = (listen != member.mesh_address).then(|| listen.to_string());
    write_member_file(dir, &member)
}

/// A new token: (id, secret). The secret is shown once; the log keeps its hash.
pub fn new_token() -> (String, String) {
    let id = format!("t-{}", hex::encode(rand::random::<[u8; 6]>()));
    let secret = format!("sph_{}", hex::encode(rand::random::<[u8; 24]>()));
    (id, secret)
}

/// A join token string: `sophon-join:<CA fingerprint>:<secret>@<mesh address>`.
pub fn join_string(fingerprint: &str, secret: &str, mesh_address: &str) -> String {
    format!("sophon-join:{fingerprint}:{secret}@{mesh_address}")
}

pub(super) fn parse_join_string(s: &str) -> Result<(String, String, String)> {
    let bad = || {
        Error::Invalid {
        what: "join token",
        value: "(hidden)".into(),
        hint: "expected sophon-join:<fingerprint>:<secret>@<host:port>, from `sophon coordinator join-token`".into(),
    }
    };
    let rest = s.trim().strip_prefix("sophon-join:").ok_or_else(bad)?;
    let (creds, address) = rest.rsplit_once('@').ok_or_else(bad)?;
    let (fingerprint, secret) = creds.split_once(':').ok_or_else(bad)?;
    if fingerprint.len() != 64 || secret.is_empty() || address.is_empty() {
        return Err(bad());
    }
    Ok((fingerprint.into(), secret.into(), address.into()))
}

pub(super) fn read_member_file(dir: &Path) -> Result<MemberFile> {
    let path = dir.join("coordinator.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        io(
            format!(
                "read {} (run `sophon coordinator init` or `join` first)",
                path.display()
            ),
            e,
        )
    })?;
    serde_json::from_str(&text).map_err(|e| io(format!("parse {}", path.display()), e))
}

pub(super) fn write_member_file(dir: &Path, member: &MemberFile) -> Result<()> {
    let path = dir.join("coordinator.json");
    let text = serde_json::to_string_pretty(member).map_err(|e| io("encode", e))?;
    std::fs::write(&path, text).map_err(|e| io(format!("write {}", path.display()), e))
}

fn save_ca(dir: &Path, ca: &Ca) -> Result<()> {
    let ca_dir = dir.join("ca");
    std::fs::create_dir_all(&ca_dir).map_err(|e| io(format!("create {}", ca_dir.display()), e))?;
    std::fs::write(ca_dir.join("ca.pem"), ca.cert_pem()).map_err(|e| io("write the CA", e))?;
    write_private(&ca_dir.join("ca.key"), ca.key_pem())
}

/// Writes `text` to `path`, readable by the owner only (keys, tokens).
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| io(format!("write {}", path.display()), e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| io(format!("write {}", path.display()), e))
}

/// The CA with its key, if this data directory holds the key (`ca/ca.key`): only the one
/// `coordinator init` made, or one an operator copied the key to. It must be the CA that
/// `ca_pem` (the identity's) names.
pub(super) fn load_ca_key(dir: &Path, ca_pem: &str) -> Result<Option<Ca>> {
    let ca_dir = dir.join("ca");
    let key_path = ca_dir.join("ca.key");
    if !key_path.exists() {
        return Ok(None);
    }
    let key = std::fs::read_to_string(&key_path).map_err(|e| io("read the CA key", e))?;
    let ca = Ca::from_pem(ca_pem, &key).map_err(|e| {
        io(
            format!("load {}", key_path.display()),
            format!("it is not the key of this cluster's CA: {e}"),
        )
    })?;
    Ok(Some(ca))
}

pub(super) fn replica_config(id: u64, driver: &DriverConfig) -> ReplicaConfig {
    ReplicaConfig {
        id,
        ..driver.replica.clone()
    }
}

pub(super) fn system_time_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Bootstraps a new cluster in `dir`: the CA, the first coordinator (id 1), its state (the
/// coordinator itself, an admin token, default `staging`/`production` policies). Returns the
/// admin token's secret, which is stored nowhere else.
pub fn init(dir: &Path, mesh_address: &str, api_address: &str) -> Result<String> {
    if dir.join("raft.redb").exists() {
        return Err(io(
            format!("initialise {}", dir.display()),
            "it already holds a coordinator",
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| io(format!("create {}", dir.display()), e))?;
    let ca = Ca::generate("sophon").map_err(mesh)?;
    let identity = ca
        .issue_identity(&Principal::Coordinator(1))
        .map_err(mesh)?;
    identity.save(&dir.join("identity")).map_err(mesh)?;
    // The CA key stays here (and is backed up from here): joined coordinators never get it.
    save_ca(dir, &ca)?;
    let serial = sophon_mesh::serial_of_pem(&identity.cert_pem).map_err(mesh)?;

    let store = RedbLogStore::bootstrap(dir.join("raft.redb"), &[1])?;
    let config = replica_config(1, &DriverConfig::default());
    let mut node = ReplicaNode::new(&config, store, &tracing_logger(1))?;
    node.campaign()?;
    drain_ready(&mut node)?;
    let (token_id, secret) = new_token();
    let bootstrap = Actor::system("bootstrap", Role::Admin);
    let commands = [
        Command::AddCoordinator {
            id: 1,
            address: mesh_address.to_string(),
            api_address: api_address.to_string(),
            cert_serial: Some(serial),
        },
        Command::CreateToken {
            id: token_id,
            name: "admin".into(),
            role: Role::Admin,
            secret_hash: crate::hash_secret(&secret),
        },
        Command::SetPolicy {
            environment: "staging".into(),
            required_approvals: 0,
            approver_role: Role::Approver,
        },
        Command::SetPolicy {
            environment: "production".into(),
            required_approvals: 2,
            approver_role: Role::Approver,
        },
    ];
    for command in commands {
        let entry = Entry {
            actor: bootstrap.clone(),
            now_ms: system_time_ms(),
            command,
            write_id: None,
        };
        node.propose(Vec::new(), &entry)?;
        for applied in drain_ready(&mut node)? {
            applied.result?;
        }
    }
    // Joining members start from this snapshot, which carries the membership.
    node.snapshot_now()?;
    write_member_file(
        dir,
        &MemberFile {
            id: 1,
            mesh_address: mesh_address.into(),
            api_address: api_address.into(),
            peers: Default::default(),
            mesh_listen: None,
        },
    )?;
    Ok(secret)
}

fn drain_ready(node: &mut ReplicaNode<RedbLogStore>) -> Result<Vec<crate::raft::Applied>> {
    let mut applied = Vec::new();
    while node.has_ready() {
        applied.extend(node.handle_ready()?.applied);
    }
    Ok(applied)
}
