//! The coordinator process: the IO shell around the pure state machine and Raft core.
//!
//! # What it owns
//! - [`driver`]: the thread that runs the ready loop on the wall clock and the redb log.
//! - [`transport`]: coordinator ↔ coordinator QUIC (mutual TLS, from `sophon-mesh`).
//! - [`api`]: the admin HTTP API; [`openapi`]: its document.
//! - [`artifacts`]: bundles by digest on disk, replicated to a quorum before they are shelved.
//! - [`init`] / [`join`] / [`run`]: bootstrapping a cluster, joining it, serving;
//!   [`admission`]: join tokens, `JOIN`, and who signs a joiner's certificate.
//!
//! # Data directory
//! `identity/` (this member's certificate and key, and the cluster CA's certificate), `ca/`
//! (the CA's certificate and key: only in the directory `coordinator init` made, or where an
//! operator copied it; a joined coordinator has none), `raft.redb` (log, hard state,
//! snapshots), `blobs/` (bundles by digest), `coordinator.json` (id and addresses).

pub mod admission;
pub mod api;
pub mod artifacts;
mod autoscale;
mod canary;
#[cfg(test)]
mod cluster_tests;
pub mod driver;
pub mod metrics;
pub mod node_api;
pub mod nodes;
pub mod openapi;
pub mod perf;
#[cfg(test)]
mod tests;
pub mod tls;
pub mod transport;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sophon_mesh::{Ca, Identity, Principal};

use crate::raft::{RedbLogStore, ReplicaConfig, ReplicaNode, tracing_logger};
use crate::state::shelf::{ManifestSummary, TensorSummary};
use crate::{Actor, Command, Entry, Error, Outcome, Result, Role};
use artifacts::{BlobStore, BlobWriter};
use driver::{Driver, DriverConfig, Event};
use metrics::Metrics;
use transport::{MeshCaller, MeshMembers, MeshOutbox, Peers, kind};

pub use admission::{JoinAnswer, JoinRequest, JoinToken, join};

/// How a coordinator runs.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub data_dir: PathBuf,
    /// Where the admin API listens.
    pub api_listen: SocketAddr,
    /// Where the mesh (QUIC) endpoint listens.
    pub mesh_listen: SocketAddr,
    /// The largest bundle accepted.
    pub max_bundle_bytes: u64,
    pub driver: DriverConfig,
    /// How often unreferenced bundles are collected, and how old they must be.
    pub gc_interval: Duration,
    pub gc_grace: Duration,
    /// Where others reach this coordinator's API (from `coordinator.json`).
    pub api_advertise: String,
    /// Where others reach its mesh endpoint (from `coordinator.json`).
    pub mesh_advertise: String,
    /// Serve the admin API over TLS with this certificate and key.
    pub api_tls: Option<tls::ApiTls>,
    /// Allow a plain-HTTP admin API on a non-loopback address.
    pub insecure_http: bool,
}

impl CoordinatorConfig {
    /// Defaults for a data directory and listen addresses.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        api_listen: SocketAddr,
        mesh_listen: SocketAddr,
    ) -> Self {
        CoordinatorConfig {
            data_dir: data_dir.into(),
            api_listen,
            mesh_listen,
            max_bundle_bytes: 1 << 30,
            driver: DriverConfig::default(),
            gc_interval: Duration::from_secs(60),
            gc_grace: Duration::from_secs(600),
            api_advertise: api_listen.to_string(),
            mesh_advertise: mesh_listen.to_string(),
            api_tls: None,
            insecure_http: false,
        }
    }
}

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

pub(super) fn io(what: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::Io {
        what: what.into(),
        reason: e.to_string(),
    }
}

pub(super) fn mesh(e: sophon_mesh::Error) -> Error {
    Error::Unavailable {
        reason: e.to_string(),
    }
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

fn parse_join_string(s: &str) -> Result<(String, String, String)> {
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

fn read_member_file(dir: &Path) -> Result<MemberFile> {
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

fn write_member_file(dir: &Path, member: &MemberFile) -> Result<()> {
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
fn load_ca_key(dir: &Path, ca_pem: &str) -> Result<Option<Ca>> {
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

fn replica_config(id: u64, driver: &DriverConfig) -> ReplicaConfig {
    ReplicaConfig {
        id,
        ..driver.replica.clone()
    }
}

fn system_time_ms() -> u64 {
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

/// A running coordinator's shared parts.
pub struct Core {
    pub config: CoordinatorConfig,
    pub id: u64,
    pub driver: Driver,
    pub peers: Arc<Peers>,
    pub blobs: BlobStore,
    pub metrics: Metrics,
    /// The CA with its key, if this coordinator holds it (see [`admission`]).
    ca: Option<Ca>,
    /// The CA's certificate (every coordinator has it) and its fingerprint.
    ca_pem: String,
    ca_fingerprint: String,
    /// This process's incarnation (the transport's): the middle of every write id made here.
    incarnation: u64,
    /// The last write id's sequence number.
    write_seq: std::sync::atomic::AtomicU64,
    /// Mesh nodes: the directory they are served from, and the leader's liveness view.
    pub nodes: nodes::NodeDesk,
}

/// A running coordinator.
pub struct Running {
    pub core: Arc<Core>,
    pub api_address: SocketAddr,
    pub mesh_address: SocketAddr,
    server: tokio::task::JoinHandle<()>,
    raft_thread: std::thread::JoinHandle<()>,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl Running {
    /// Graceful stop: hand leadership away, finish in-flight requests, stop the ready loop.
    pub async fn shutdown(self) {
        let moved = self.core.driver.transfer_leadership().await;
        tracing::info!(moved, "leadership handed over (or not leading)");
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
        self.core.driver.stop();
        self.core.peers.endpoint().close(0u32.into(), b"shutdown");
        let _ = tokio::task::spawn_blocking(move || self.raft_thread.join()).await;
    }
}

/// Starts the coordinator in `config.data_dir` (made by [`init`] or [`join`]).
pub async fn start(mut config: CoordinatorConfig) -> Result<Running> {
    let dir = config.data_dir.clone();
    let member = read_member_file(&dir)?;
    config.api_advertise = member.api_address.clone();
    config.mesh_advertise = member.mesh_address.clone();
    let identity = Identity::load(&dir.join("identity")).map_err(mesh)?;
    if identity.principal != Principal::Coordinator(member.id) {
        return Err(io(
            "check the identity",
            format!(
                "the certificate names {}, not coordinator {}",
                identity.principal, member.id
            ),
        ));
    }
    let ca = load_ca_key(&dir, &identity.ca_pem)?;
    let ca_fingerprint = sophon_mesh::fingerprint_of_pem(&identity.ca_pem).map_err(mesh)?;
    let store = RedbLogStore::open(dir.join("raft.redb"))?;
    let node = ReplicaNode::restart(
        &replica_config(member.id, &config.driver),
        store,
        &tracing_logger(member.id),
    )?;
    let members = MeshMembers::new(node.state(), &node.voters(), &node.learners());
    let endpoint = sophon_mesh::endpoint(
        config.mesh_listen,
        &identity,
        &sophon_mesh::EndpointConfig::default(),
    )
    .map_err(mesh)?;
    let mesh_address = endpoint.local_addr().map_err(|e| io("mesh address", e))?;
    let peers = Peers::new(endpoint.clone(), member.peers.clone(), members);
    let metrics = Metrics::new();
    let (events, rx) = driver::channel();
    let outbox = MeshOutbox::new(
        peers.clone(),
        tokio::runtime::Handle::current(),
        events.clone(),
    );
    let (driver, raft_thread) = Driver::start(
        node,
        config.driver.clone(),
        Box::new(outbox),
        metrics.clone(),
        peers.incarnation(),
        (events.clone(), rx),
    )?;
    let blobs = BlobStore::open(dir.join("blobs"))?;
    tls::check_plain_http(
        config.api_listen,
        config.api_tls.is_some(),
        config.insecure_http,
    )?;
    let api_tls = config
        .api_tls
        .as_ref()
        .map(tls::server_config)
        .transpose()?;
    let listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .map_err(|e| io(format!("listen on {}", config.api_listen), e))?;
    let api_address = listener.local_addr().map_err(|e| io("api address", e))?;
    let incarnation = peers.incarnation();
    let core = Arc::new(Core {
        config,
        id: member.id,
        driver,
        peers,
        blobs,
        metrics,
        ca,
        ca_pem: identity.ca_pem.clone(),
        ca_fingerprint,
        incarnation,
        write_seq: std::sync::atomic::AtomicU64::new(0),
        nodes: nodes::NodeDesk::new(),
    });
    tokio::spawn(accept_loop(endpoint, core.clone(), events));
    tokio::spawn(nodes::node_loop(core.clone()));
    tokio::spawn(gc_loop(core.clone()));
    let (shutdown, mut stop) = tokio::sync::watch::channel(false);
    let app = api::router(core.clone());
    let server = tokio::spawn(async move {
        if let Some(tls) = api_tls {
            return tls::serve(listener, app, tls, stop).await;
        }
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "the admin API stopped");
        }
    });
    tracing::info!(id = member.id, %api_address, %mesh_address, "coordinator running");
    Ok(Running {
        core,
        api_address,
        mesh_address,
        server,
        raft_thread,
        shutdown,
    })
}

impl Core {
    /// The cluster CA's fingerprint (what a join token pins).
    pub fn ca_fingerprint(&self) -> String {
        self.ca_fingerprint.clone()
    }

    /// Commits `command` as `actor`: proposed here if this coordinator leads, forwarded to the
    /// leader otherwise; waits for an election when there is no leader.
    ///
    /// The write gets a new [`WriteId`](crate::WriteId), the same on every attempt to commit
    /// it, so the state machine applies it at most once whatever happens to the attempts.
    pub async fn write(&self, actor: Actor, command: Command) -> Result<Outcome> {
        let entry = Entry {
            actor,
            now_ms: 0,
            command,
            write_id: Some(self.new_write_id()),
        };
        self.propose_or_forward(entry).await
    }

    /// A write id no other write of this cluster has: (this coordinator, this process, n).
    fn new_write_id(&self) -> crate::WriteId {
        let seq = self
            .write_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        crate::WriteId {
            origin: self.id,
            incarnation: self.incarnation,
            seq,
        }
    }

    async fn propose_or_forward(&self, mut entry: Entry) -> Result<Outcome> {
        // A write forwarded by a coordinator that predates write ids gets one here.
        if entry.write_id.is_none() {
            entry.write_id = Some(self.new_write_id());
        }
        // Only failures that guarantee the entry was never proposed are retried: a retried
        // ambiguous write could take effect twice. (The write id makes a retry harmless even
        // then, but an ambiguous answer is still passed on, not retried.)
        let deadline = tokio::time::Instant::now() + self.config.driver.wait;
        loop {
            let status = self.driver.status();
            let retry = if status.is_leader {
                match self.driver.propose(entry.clone()).await {
                    Err(e @ Error::NotLeader { .. }) => e,
                    other => return other,
                }
            } else if status.leader != 0 {
                match self.peers.connection(status.leader).await {
                    // The request was never sent.
                    Err(e) => e,
                    Ok(_) => {
                        let forwarded =
                            self.peers
                                .call::<Outcome>(status.leader, kind::FORWARD, &entry);
                        // A leader that dies with the request keeps its connection open until
                        // the idle timeout: give up as soon as another leader is known.
                        let leader_changed = async {
                            loop {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                if self.driver.status().leader != status.leader {
                                    break;
                                }
                            }
                        };
                        let answer = tokio::select! {
                            answer = forwarded => answer,
                            () = leader_changed => Err(Error::Unavailable {
                                reason: format!(
                                    "leader {} changed while it had the write: it may or may \
                                     not have committed; read before retrying",
                                    status.leader
                                ),
                            }),
                            () = tokio::time::sleep_until(deadline + self.config.driver.wait) => {
                                Err(Error::Unavailable {
                                    reason: "the leader did not answer in time: the write may \
                                             or may not have committed"
                                        .into(),
                                })
                            }
                        };
                        match answer {
                            Err(Error::Remote { code, .. }) if code == "not_leader" => {
                                Error::NotLeader {
                                    id: status.leader,
                                    leader: 0,
                                }
                            }
                            other => return other,
                        }
                    }
                }
            } else {
                Error::NotLeader {
                    id: self.id,
                    leader: 0,
                }
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(match retry {
                    Error::NotLeader { .. } => Error::Unavailable {
                        reason: "no leader was elected in time: retry".into(),
                    },
                    e => e,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Verifies an uploaded bundle, stores it on a quorum of coordinators, then registers its
    /// version on the shelf.
    pub async fn push_bundle(&self, actor: Actor, writer: BlobWriter) -> Result<serde_json::Value> {
        let finished = writer.finish()?;
        let tmp = finished.tmp;
        let bundle = match finished.bundle {
            Ok(b) => b,
            Err(e) => {
                self.blobs.discard(&tmp);
                return Err(Error::BadBundle {
                    reason: e.to_string(),
                });
            }
        };
        let digest = bundle.digest_hex();
        let key = bundle.publisher_hex();
        let trusted = {
            let key = key.clone();
            self.driver
                .read(true, move |s| s.trusted_keys().contains_key(&key))
                .await?
        };
        if !trusted {
            self.blobs.discard(&tmp);
            return Err(Error::UntrustedKey { key });
        }
        // Pushing the very bundle that is already on the shelf is a success that changes
        // nothing (a retried push, `sophon dev --bundle` then `model push`), for a publisher.
        let (name, version) = (
            bundle.manifest.model.name.clone(),
            bundle.manifest.model.version.clone(),
        );
        let already = {
            let (name, version, digest) = (name.clone(), version.clone(), digest.clone());
            self.driver
                .read(true, move |s| {
                    s.models()
                        .get(&name)
                        .and_then(|m| m.versions.get(&version))
                        .is_some_and(|v| v.digest == digest)
                })
                .await?
        };
        if already && actor.role.allows(Role::Publisher) && self.blobs.path(&digest).is_some() {
            self.blobs.discard(&tmp);
            return Ok(serde_json::json!({
                "model": name,
                "version": version,
                "digest": digest,
                "publisher_key": key,
                "size": bundle.len,
                "audit_seq": null,
                "already_on_shelf": true,
            }));
        }
        let path = self.blobs.commit(&tmp, &digest)?;
        self.replicate_blob(&digest, &path).await?;
        let m = &bundle.manifest;
        let weights: u64 = bundle.files.values().sum();
        let summary = ManifestSummary {
            inputs: m.inputs.iter().map(tensor_summary).collect(),
            outputs: m.outputs.iter().map(tensor_summary).collect(),
            memory_mb: u64::from(m.resources.memory_mb) + weights.div_ceil(1 << 20),
            preferred: m
                .hardware
                .preferred
                .iter()
                .map(|d| match d {
                    sophon_sdk::manifest::Device::Cpu => crate::Device::Cpu,
                    sophon_sdk::manifest::Device::Gpu => crate::Device::Gpu,
                    sophon_sdk::manifest::Device::Npu => crate::Device::Npu,
                })
                .collect(),
            loads_on: m
                .hardware
                .loads_on
                .iter()
                .map(|b| b.as_str().to_string())
                .collect(),
        };
        let outcome = self
            .write(
                actor,
                Command::RegisterModelVersion {
                    model: m.model.name.clone(),
                    version: m.model.version.clone(),
                    digest: digest.clone(),
                    manifest: summary,
                    publisher_key: key.clone(),
                },
            )
            .await?;
        Ok(serde_json::json!({
            "model": m.model.name,
            "version": m.model.version,
            "digest": digest,
            "publisher_key": key,
            "size": bundle.len,
            "audit_seq": outcome.audit_seq,
        }))
    }

    /// Copies a stored blob to the other coordinators until a quorum (this one included)
    /// holds it.
    async fn replicate_blob(&self, digest: &str, path: &Path) -> Result<()> {
        let voters = self.driver.status().voters;
        let others: Vec<u64> = voters.iter().copied().filter(|v| *v != self.id).collect();
        let quorum = voters.len() / 2 + 1;
        let mut have = 1usize;
        if have >= quorum {
            return Ok(());
        }
        let mut tasks = tokio::task::JoinSet::new();
        for peer in others {
            let peers = self.peers.clone();
            let path = path.to_path_buf();
            let digest = digest.to_string();
            tasks.spawn(async move { put_blob(&peers, peer, &digest, &path).await });
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut errors = Vec::new();
        while let Ok(Some(done)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
            match done {
                Ok(Ok(())) => {
                    have += 1;
                    if have >= quorum {
                        // The rest finish in the background.
                        tasks.detach_all();
                        return Ok(());
                    }
                }
                Ok(Err(e)) => errors.push(e.to_string()),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(Error::Unavailable {
            reason: format!(
                "the bundle reached {have} of the {quorum} coordinators a quorum needs: {}",
                errors.join("; ")
            ),
        })
    }

    /// A bundle by digest: from this coordinator's disk, else from another coordinator.
    pub async fn fetch_bundle(&self, digest: &str) -> Result<Vec<u8>> {
        if !artifacts::is_digest(digest) {
            return Err(Error::Invalid {
                what: "digest",
                value: digest.chars().take(80).collect(),
                hint: "64 lowercase hex digits".into(),
            });
        }
        if let Some(path) = self.blobs.path(digest) {
            return tokio::fs::read(&path)
                .await
                .map_err(|e| io(format!("read {}", path.display()), e));
        }
        let voters = self.driver.status().voters;
        for peer in voters.into_iter().filter(|v| *v != self.id) {
            if let Ok(bytes) = get_blob(&self.peers, peer, digest).await {
                return Ok(bytes);
            }
        }
        Err(Error::Remote {
            status: 404,
            code: "unknown_bundle".into(),
            message: format!("no coordinator holds bundle {digest}"),
        })
    }

    /// The digests the shelf references, read linearizably: a follower that is cut off or
    /// behind must not take a bundle that the shelf references now for an unreferenced one.
    async fn referenced(&self) -> Result<BTreeSet<String>> {
        self.driver
            .read(true, |s| {
                s.models()
                    .values()
                    .flat_map(|m| m.versions.values().map(|v| v.digest.clone()))
                    .collect()
            })
            .await
    }
}

fn tensor_summary(t: &sophon_sdk::types::TensorSpec) -> TensorSummary {
    TensorSummary {
        name: t.name.clone(),
        datatype: t.datatype.as_str().to_string(),
        shape: t.shape.clone(),
    }
}

const BLOB_CHUNK: usize = 1 << 20;

/// Sends a file as `kind` frames of at most [`BLOB_CHUNK`] bytes, reading it a chunk at a time.
pub(super) async fn send_file(send: &mut quinn::SendStream, kind: u8, path: &Path) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| io(format!("open {}", path.display()), e))?;
    let mut chunk = vec![0u8; BLOB_CHUNK];
    loop {
        let n = file
            .read(&mut chunk)
            .await
            .map_err(|e| io(format!("read {}", path.display()), e))?;
        if n == 0 {
            return Ok(());
        }
        sophon_mesh::write_frame(send, kind, &chunk[..n])
            .await
            .map_err(|e| Error::Unavailable {
                reason: format!("send a blob: {e}"),
            })?;
    }
}

async fn put_blob(peers: &Peers, peer: u64, digest: &str, path: &Path) -> Result<()> {
    let conn = peers.connection(peer).await?;
    let fail = |e: &dyn std::fmt::Display| Error::Unavailable {
        reason: format!("copy bundle to coordinator {peer}: {e}"),
    };
    let size = tokio::fs::metadata(path)
        .await
        .map_err(|e| io(format!("stat {}", path.display()), e))?
        .len();
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| fail(&e))?;
    let header = serde_json::json!({"digest": digest, "size": size}).to_string();
    sophon_mesh::write_frame(&mut send, kind::BLOB_PUT, header.as_bytes())
        .await
        .map_err(|e| fail(&e))?;
    send_file(&mut send, kind::BLOB_PUT, path)
        .await
        .map_err(|e| fail(&e))?;
    send.finish().map_err(|e| fail(&e))?;
    match sophon_mesh::read_frame(&mut recv, 1 << 20).await {
        Ok(Some((k, body))) => transport::decode_answer::<serde_json::Value>(k, &body).map(|_| ()),
        Ok(None) => Err(fail(&"no answer")),
        Err(e) => Err(fail(&e)),
    }
}

async fn get_blob(peers: &Peers, peer: u64, digest: &str) -> Result<Vec<u8>> {
    let conn = peers.connection(peer).await?;
    let fail = |e: &dyn std::fmt::Display| Error::Unavailable {
        reason: format!("fetch bundle from coordinator {peer}: {e}"),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| fail(&e))?;
    sophon_mesh::write_frame(&mut send, kind::BLOB_GET, digest.as_bytes())
        .await
        .map_err(|e| fail(&e))?;
    send.finish().map_err(|e| fail(&e))?;
    let mut out = Vec::new();
    loop {
        match sophon_mesh::read_frame(&mut recv, transport::MAX_FRAME).await {
            Ok(Some((kind::BLOB_GET, chunk))) => out.extend_from_slice(&chunk),
            Ok(Some((k, body))) => {
                return transport::decode_answer::<serde_json::Value>(k, &body)
                    .and(Err(fail(&"unexpected answer")));
            }
            Ok(None) => return Ok(out),
            Err(e) => return Err(fail(&e)),
        }
    }
}

/// Accepts mesh connections and serves their streams.
async fn accept_loop(
    endpoint: quinn::Endpoint,
    core: Arc<Core>,
    events: std::sync::mpsc::Sender<Event>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let core = core.clone();
        let events = events.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "a mesh handshake failed");
                    return;
                }
            };
            let caller = MeshCaller::of(&conn);
            if let MeshCaller::Coordinator { id: peer, serial } = &caller {
                // Only a current member's certificate: a removed coordinator is refused at
                // once, and dropped later if it is removed while connected.
                if let Err(reason) = core.peers.admits(*peer, serial.as_deref()) {
                    tracing::warn!(peer, %reason, "refused a mesh connection");
                    conn.close(transport::REFUSED.into(), b"not a current member");
                    return;
                }
                tokio::spawn(core.peers.clone().close_when_refused(
                    conn.clone(),
                    *peer,
                    serial.clone(),
                ));
                let (peer, serial) = (*peer, serial.clone());
                let uni = conn.clone();
                let events = events.clone();
                let peers = core.peers.clone();
                tokio::spawn(async move {
                    while let Ok(recv) = uni.accept_uni().await {
                        tokio::spawn(transport::read_raft_stream(
                            recv,
                            events.clone(),
                            peers.clone(),
                            peer,
                            serial.clone(),
                        ));
                    }
                });
            }
            // Anyone else's raft streams are never read.
            while let Ok((send, recv)) = conn.accept_bi().await {
                let core = core.clone();
                tokio::spawn(serve_request(core, caller.clone(), send, recv));
            }
        });
    }
}

pub(super) async fn answer(send: &mut quinn::SendStream, result: Result<serde_json::Value>) {
    let (k, body) = match result {
        Ok(v) => (kind::OK, serde_json::to_vec(&v).unwrap_or_default()),
        Err(e) => (
            kind::ERR,
            serde_json::to_vec(&api::WireError::from_error(&e)).unwrap_or_default(),
        ),
    };
    let _ = sophon_mesh::write_frame(send, k, &body).await;
    let _ = send.finish();
}

async fn serve_request(
    core: Arc<Core>,
    caller: MeshCaller,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let first = match sophon_mesh::read_frame(&mut recv, 1 << 20).await {
        Ok(Some(f)) => f,
        _ => return,
    };
    // A node's certificate is good for node requests only.
    if let MeshCaller::Node { id, serial } = &caller {
        nodes::serve_node_stream(core, id.clone(), serial.clone(), first, send).await;
        return;
    }
    // Checked on every stream: a coordinator removed since it connected is refused.
    let admitted = match &caller {
        MeshCaller::Coordinator { id, serial } => core.peers.admits(*id, serial.as_deref()),
        MeshCaller::Joiner => Err("this request needs a coordinator certificate".into()),
        MeshCaller::Node { id, .. } => Err(format!("node/{id} may not make coordinator requests")),
        MeshCaller::Other(p) => Err(format!("{p} may not make coordinator requests")),
    };
    let is_coordinator = admitted.is_ok();
    let forbidden = || Error::Unauthenticated {
        reason: admitted.clone().err().unwrap_or_default(),
    };
    let result = match first {
        (kind::JOIN, body) if is_coordinator || caller == MeshCaller::Joiner => {
            core.serve_join(&caller, &body).await
        }
        (sophon_mesh::wire::kind::NODE_JOIN, body)
            if is_coordinator || caller == MeshCaller::Joiner =>
        {
            core.serve_node_join(is_coordinator, &body).await
        }
        (_, _) if !is_coordinator => Err(forbidden()),
        (kind::SIGN, body) => match &caller {
            MeshCaller::Coordinator { id, .. } => core.serve_sign(*id, &body).await,
            _ => Err(forbidden()),
        },
        (kind::FORWARD, body) => match serde_json::from_slice::<Entry>(&body) {
            Ok(entry) => core
                .propose_or_forward(entry)
                .await
                .and_then(|o| serde_json::to_value(o).map_err(|e| io("encode", e))),
            Err(e) => Err(io("decode a forwarded entry", e)),
        },
        (kind::BLOB_PUT, header) => core.receive_blob(&header, &mut recv).await,
        (kind::STATS, body) => match serde_json::from_slice::<perf::StatsQuery>(&body) {
            Ok(query) => core.local_stats(&query),
            Err(e) => Err(io("decode a stats query", e)),
        },
        (kind::REMOVE, body) => match serde_json::from_slice::<(Actor, u64)>(&body) {
            Ok((actor, id)) => core
                .remove_coordinator(actor, id)
                .await
                .map(|()| serde_json::json!({"removed": id})),
            Err(e) => Err(io("decode a removal", e)),
        },
        (kind::BLOB_GET, digest) => {
            let digest = String::from_utf8_lossy(&digest).to_string();
            match core.blobs.path(&digest) {
                Some(path) => {
                    if send_file(&mut send, kind::BLOB_GET, &path).await.is_ok() {
                        let _ = send.finish();
                    }
                    return;
                }
                None => Err(Error::Remote {
                    status: 404,
                    code: "unknown_bundle".into(),
                    message: format!("bundle {digest} is not stored here"),
                }),
            }
        }
        (other, _) => Err(io("serve a mesh request", format!("unknown kind {other}"))),
    };
    answer(&mut send, result).await;
}

impl Core {
    /// `None` when this coordinator leads, the leader's id when another does, `NotLeader`
    /// when none is known (for requests that must run on the leader).
    fn leader_elsewhere(&self) -> Result<Option<u64>> {
        let status = self.driver.status();
        match (status.is_leader, status.leader) {
            (true, _) => Ok(None),
            (false, 0) => Err(Error::NotLeader {
                id: self.id,
                leader: 0,
            }),
            (false, leader) => Ok(Some(leader)),
        }
    }

    /// Removes coordinator `id` from the cluster: the Raft membership first (on the leader;
    /// a follower forwards), then its record. Removing the last voter is refused.
    pub async fn remove_coordinator(&self, actor: Actor, id: u64) -> Result<()> {
        if !actor.role.allows(Role::Admin) {
            return Err(Error::Forbidden {
                action: "remove-coordinator",
                role: actor.role,
                needed: Role::Admin,
            });
        }
        let status = self.driver.status();
        if !status.voters.contains(&id) && !status.learners.contains(&id) {
            return Err(Error::UnknownCoordinator { id });
        }
        if status.voters == [id] {
            return Err(Error::LastCoordinator { id });
        }
        if let Some(leader) = self.leader_elsewhere()? {
            return self
                .peers
                .call::<serde_json::Value>(leader, kind::REMOVE, &(actor, id))
                .await
                .map(|_| ());
        }
        self.driver.change_voter(id, false).await?;
        self.write(actor, Command::RemoveCoordinator { id }).await?;
        tracing::info!(id, "coordinator removed");
        Ok(())
    }

    /// Stores a bundle another coordinator copies here, after verifying it.
    async fn receive_blob(
        &self,
        header: &[u8],
        recv: &mut quinn::RecvStream,
    ) -> Result<serde_json::Value> {
        #[derive(Deserialize)]
        struct Header {
            digest: String,
            size: u64,
        }
        let h: Header =
            serde_json::from_slice(header).map_err(|e| io("decode a blob header", e))?;
        if h.size > self.config.max_bundle_bytes {
            return Err(Error::TooLarge {
                limit: self.config.max_bundle_bytes,
            });
        }
        let mut writer = self.blobs.writer(self.config.max_bundle_bytes)?;
        loop {
            match sophon_mesh::read_frame(recv, BLOB_CHUNK + 16).await {
                Ok(Some((kind::BLOB_PUT, chunk))) => writer.write(&chunk)?,
                Ok(Some((k, _))) => {
                    return Err(io("receive a blob", format!("unexpected kind {k}")));
                }
                Ok(None) => break,
                Err(e) => return Err(io("receive a blob", e)),
            }
        }
        let finished = writer.finish()?;
        let tmp = finished.tmp;
        let verified = finished.bundle.map_err(|e| e.to_string()).and_then(|b| {
            if b.digest_hex() == h.digest {
                Ok(())
            } else {
                Err(format!(
                    "its digest is {}, not {}",
                    b.digest_hex(),
                    h.digest
                ))
            }
        });
        if let Err(reason) = verified {
            self.blobs.discard(&tmp);
            return Err(Error::BadBundle { reason });
        }
        self.blobs.commit(&tmp, &h.digest)?;
        Ok(serde_json::json!({"stored": h.digest}))
    }
}

/// Collects unreferenced bundles now and then.
async fn gc_loop(core: Arc<Core>) {
    let mut interval = tokio::time::interval(core.config.gc_interval);
    interval.tick().await;
    loop {
        interval.tick().await;
        match core.collect_garbage().await {
            Ok(deleted) => {
                for digest in &deleted {
                    tracing::info!(%digest, "collected an unreferenced bundle");
                }
            }
            Err(e) => tracing::debug!(error = %e, "no garbage collection this round"),
        }
    }
}

impl Core {
    /// Deletes the stored bundles that the shelf does not reference and that are older than
    /// the grace period. Nothing is deleted unless the shelf could be read linearizably.
    pub async fn collect_garbage(&self) -> Result<Vec<String>> {
        let referenced = self.referenced().await?;
        let blobs = self.blobs.clone();
        let grace = self.config.gc_grace;
        let deleted = tokio::task::spawn_blocking(move || blobs.collect(&referenced, grace))
            .await
            .unwrap_or_default();
        self.metrics.blobs_collected.inc_by(deleted.len() as u64);
        Ok(deleted)
    }
}
