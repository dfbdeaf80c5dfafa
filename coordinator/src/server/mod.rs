//! The coordinator process: the IO shell around the pure state machine and Raft core.
//!
//! # What it owns
//! - [`driver`]: the thread that runs the ready loop on the wall clock and the redb log.
//! - [`transport`]: coordinator ↔ coordinator QUIC (mutual TLS, from `sophon-mesh`).
//! - [`api`]: the admin HTTP API; [`openapi`]: its document; [`console`]: the web console at `/ui/`.
//! - [`artifacts`]: bundles by digest on disk, replicated to a quorum before they are shelved.
//! - `bootstrap`: [`init`] (bootstrapping a cluster) and the data directory's files
//!   (`coordinator.json`, the CA key); [`admission`]: join tokens, [`join`], `JOIN`, and who
//!   signs a joiner's certificate.
//! - `blobs`: pushing a bundle (stored on a quorum, then shelved), fetching one, copying one
//!   between coordinators, collecting unreferenced ones.
//! - `peer`: the mesh's accept loop and the dispatch of coordinator ↔ coordinator requests.
//! - This module: [`CoordinatorConfig`], [`Core`], [`start`] (serving), and writes
//!   ([`Core::write`]: proposed here on the leader, forwarded to it elsewhere).
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
mod blobs;
mod bootstrap;
mod canary;
#[cfg(test)]
mod cluster_tests;
pub mod console;
pub mod driver;
pub mod metrics;
pub mod node_api;
pub mod nodes;
pub mod openapi;
mod peer;
pub mod perf;
#[cfg(test)]
mod tests;
pub mod tls;
pub mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sophon_mesh::{Ca, Identity, Principal};

use crate::raft::{RedbLogStore, ReplicaNode, tracing_logger};
use crate::{Actor, Command, Entry, Error, Outcome, Result, Role};
use artifacts::BlobStore;
use blobs::{gc_loop, send_file};
use bootstrap::{
    load_ca_key, parse_join_string, read_member_file, replica_config, write_member_file,
};
use driver::{Driver, DriverConfig};
use metrics::Metrics;
use peer::{accept_loop, answer};
use transport::{MeshMembers, MeshOutbox, Peers, kind};

pub use admission::{JoinAnswer, JoinRequest, JoinToken, join};
pub use bootstrap::{MemberFile, init, join_string, new_token, record_mesh_listen, write_private};

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
}
