//! The node's side of the control plane: heartbeats to the leader, and a watch on any
//! coordinator that pushes this node's [`View`](wire::View).
//!
//! Heartbeats go every second to the coordinator the node believes leads; one that does not
//! answers with the leader's address and the node moves there. The watch is one long-lived
//! stream; when it breaks (or falls silent past three keep-alives) the node resumes it on the
//! next coordinator, from the index of the last view it applied, and keeps serving from that
//! view meanwhile.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use parking_lot::Mutex;
use sophon_mesh::Principal;
use sophon_mesh::wire::{self, kind};

use super::replicas::Replicas;
use super::router::Router;
use super::{NodeFile, decode_answer};

/// How often a node heartbeats.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// Performance reports ride on every this-many heartbeats (a report period of 5 s); those of the
/// versions under a canary's analysis ride on every heartbeat, so that the leader judges a
/// canary within a second or two. A report whose heartbeat is lost is lost with it: the next one
/// covers its own period only.
const PERF_EVERY: u64 = 5;

/// Every this many heartbeats, the memory measured for every version placed here goes too (a
/// new leader learns them); a new measurement rides on the next few in any case.
pub const MEMORY_EVERY: u64 = 30;

/// Connections to the coordinators, by mesh address.
pub struct Coordinators {
    addresses: Mutex<Vec<String>>,
    peers: super::peers::Peers,
}

impl Coordinators {
    pub fn new(endpoint: quinn::Endpoint, addresses: Vec<String>) -> Coordinators {
        Coordinators {
            addresses: Mutex::new(addresses),
            peers: super::peers::Peers::new(endpoint),
        }
    }

    pub fn addresses(&self) -> Vec<String> {
        self.addresses.lock().clone()
    }

    pub fn set_addresses(&self, addresses: Vec<String>) {
        if !addresses.is_empty() {
            *self.addresses.lock() = addresses;
        }
    }

    /// A connection to the coordinator at `address` (reused while it lives). The peer must
    /// present a coordinator's certificate from the cluster CA.
    pub async fn connection(&self, address: &str) -> anyhow::Result<quinn::Connection> {
        let expected = |p: Option<&Principal>| match p {
            Some(Principal::Coordinator(_)) => Ok(()),
            _ => Err("a coordinator's certificate".to_string()),
        };
        self.peers
            .get(address, address, Duration::from_secs(3), expected)
            .await
            .with_context(|| format!("the coordinator at {address}"))
    }

    /// Fetch a bundle by digest from any coordinator.
    pub async fn fetch(&self, digest: &str, max_bytes: usize) -> anyhow::Result<Vec<u8>> {
        let mut errors = Vec::new();
        for address in self.addresses() {
            match self.fetch_from(&address, digest, max_bytes).await {
                Ok(bytes) => return Ok(bytes),
                Err(e) => errors.push(format!("{address}: {e:#}")),
            }
        }
        bail!("no coordinator gave bundle {digest}: {}", errors.join("; "))
    }

    async fn fetch_from(
        &self,
        address: &str,
        digest: &str,
        max_bytes: usize,
    ) -> anyhow::Result<Vec<u8>> {
        let conn = self.connection(address).await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        sophon_mesh::write_frame(&mut send, kind::BLOB_GET, digest.as_bytes()).await?;
        send.finish()?;
        let mut out = Vec::new();
        loop {
            match sophon_mesh::read_frame(&mut recv, 4 << 20).await? {
                Some((kind::BLOB_GET, chunk)) => {
                    if out.len() + chunk.len() > max_bytes {
                        bail!("bundle {digest} is over {max_bytes} bytes");
                    }
                    out.extend_from_slice(&chunk);
                }
                Some((k, body)) => {
                    let e: anyhow::Result<serde_json::Value> = decode_answer(k, &body);
                    bail!("{}", e.err().map(|e| e.to_string()).unwrap_or_default());
                }
                None => return Ok(out),
            }
        }
    }
}

/// The last view, saved so a restarted node serves before it reaches a coordinator.
pub fn load_view(dir: &Path) -> Option<wire::View> {
    let text = std::fs::read_to_string(dir.join("view.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Heartbeats, the watch, and applying views.
pub struct Control {
    dir: PathBuf,
    file: Mutex<NodeFile>,
    pub coordinators: Arc<Coordinators>,
    replicas: Arc<Replicas>,
    router: Arc<Router>,
    view: tokio::sync::Mutex<Option<wire::View>>,
    applied_index: AtomicU64,
    /// The coordinator believed to lead (heartbeats go there).
    leader: Mutex<Option<String>>,
    /// The cluster removed this node.
    pub removed: AtomicBool,
    /// A view has been applied (from a coordinator or from disk).
    pub has_view: AtomicBool,
    beats: AtomicU64,
    /// When each deployment's activation was last asked for.
    activations: Mutex<std::collections::HashMap<u64, std::time::Instant>>,
}

impl Control {
    pub fn new(
        dir: &Path,
        file: NodeFile,
        endpoint: quinn::Endpoint,
        replicas: Arc<Replicas>,
        router: Arc<Router>,
    ) -> Control {
        let coordinators = Arc::new(Coordinators::new(endpoint, file.coordinators.clone()));
        replicas.set_coordinators(coordinators.clone());
        Control {
            dir: dir.to_path_buf(),
            file: Mutex::new(file),
            coordinators,
            replicas,
            router,
            view: tokio::sync::Mutex::new(None),
            applied_index: AtomicU64::new(0),
            leader: Mutex::new(None),
            removed: AtomicBool::new(false),
            has_view: AtomicBool::new(false),
            beats: AtomicU64::new(0),
            activations: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Ask the leader to activate `deployment` (a request waits for it here); at most once a
    /// second per deployment.
    pub fn activate(self: &Arc<Self>, deployment: u64) {
        {
            let mut asked = self.activations.lock();
            let now = std::time::Instant::now();
            if asked
                .get(&deployment)
                .is_some_and(|at| now.duration_since(*at) < Duration::from_millis(900))
            {
                return;
            }
            asked.insert(deployment, now);
        }
        let control = self.clone();
        tokio::spawn(async move {
            let payload = match serde_json::to_vec(&wire::Activate { deployment }) {
                Ok(p) => p,
                Err(_) => return,
            };
            // The believed leader first, then every coordinator.
            let mut targets: Vec<String> = control.leader.lock().iter().cloned().collect();
            targets.extend(control.coordinators.addresses());
            for target in targets {
                let call = async {
                    let conn = control.coordinators.connection(&target).await?;
                    let (k, bytes) = tokio::time::timeout(
                        Duration::from_secs(5),
                        sophon_mesh::call(&conn, kind::ACTIVATE, &payload, 1 << 20),
                    )
                    .await
                    .context("the activation timed out")??;
                    decode_answer::<serde_json::Value>(k, &bytes)
                };
                match call.await {
                    Ok(_) => {
                        tracing::info!(deployment, coordinator = %target, "activation asked");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(deployment, coordinator = %target, error = %e, "activation refused")
                    }
                }
            }
        });
    }

    /// The index of the last view applied.
    pub fn applied_index(&self) -> u64 {
        self.applied_index.load(Ordering::Acquire)
    }

    /// Apply a view: trust list, assignments, routes. Older views than the last are ignored.
    pub async fn apply(&self, view: wire::View) {
        let mut current = self.view.lock().await;
        if view.removed {
            tracing::error!("this node was removed from the cluster; it serves nothing more");
            self.removed.store(true, Ordering::Release);
            self.replicas.reconcile(Vec::new());
            self.router.update(&wire::View {
                removed: true,
                ..wire::View::default()
            });
            let _ = std::fs::remove_file(self.dir.join("view.json"));
            *current = None;
            return;
        }
        if let Some(cur) = current.as_ref()
            && view.index < cur.index
        {
            return;
        }
        self.replicas.set_trusted(&view.trusted_keys);
        self.replicas.reconcile(view.assignments.clone());
        self.router.update(&view);
        self.coordinators.set_addresses(view.coordinators.clone());
        let changed = current.as_ref() != Some(&view);
        if changed {
            if let Ok(bytes) = serde_json::to_vec(&view)
                && let Err(e) = super::write_atomic(&self.dir.join("view.json"), &bytes)
            {
                tracing::warn!(error = %e, "cannot save the view");
            }
            let mut file = self.file.lock();
            if !view.coordinators.is_empty() && file.coordinators != view.coordinators {
                file.coordinators = view.coordinators.clone();
                if let Err(e) = file.write(&self.dir) {
                    tracing::warn!(error = %e, "cannot save the coordinators' addresses");
                }
            }
        }
        self.applied_index.store(view.index, Ordering::Release);
        self.has_view.store(true, Ordering::Release);
        *current = Some(view);
    }

    /// Heartbeat and watch until the node is removed.
    pub async fn run(self: Arc<Self>) {
        tokio::spawn(self.clone().heartbeat_loop());
        self.watch_loop().await;
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut next = 0usize;
        let mut interval = tokio::time::interval(HEARTBEAT_EVERY);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = self.replicas.changed.notified() => {}
                _ = self.replicas.repository().changed.notified() => {}
            }
            if self.removed.load(Ordering::Acquire) {
                return;
            }
            let beat = self.beats.fetch_add(1, Ordering::Relaxed);
            let heartbeat = wire::Heartbeat {
                load: self.replicas.load(),
                replicas: self.replicas.reports(),
                memory: self
                    .replicas
                    .measurements(beat % MEMORY_EVERY == MEMORY_EVERY - 1),
                perf: if beat % PERF_EVERY == PERF_EVERY - 1 {
                    self.replicas.perf(|_, _| true)
                } else {
                    self.replicas
                        .perf(|model, version| self.router.analysed(model, version))
                },
            };
            // The believed leader first, then each coordinator in turn; one redirect followed.
            let target = self.leader.lock().clone().unwrap_or_else(|| {
                let all = self.coordinators.addresses();
                next = next.wrapping_add(1);
                all.get(next % all.len().max(1))
                    .cloned()
                    .unwrap_or_default()
            });
            match self.beat(&target, &heartbeat).await {
                Ok(answer) if answer.accepted => *self.leader.lock() = Some(target),
                Ok(answer) => {
                    *self.leader.lock() = answer.leader.clone();
                    if let Some(leader) = answer.leader
                        && let Ok(a) = self.beat(&leader, &heartbeat).await
                        && a.accepted
                    {
                        *self.leader.lock() = Some(leader);
                    }
                }
                Err(e) => {
                    tracing::debug!(coordinator = %target, error = %e, "heartbeat failed");
                    *self.leader.lock() = None;
                }
            }
        }
    }

    async fn beat(
        &self,
        address: &str,
        heartbeat: &wire::Heartbeat,
    ) -> anyhow::Result<wire::HeartbeatAnswer> {
        let conn = self.coordinators.connection(address).await?;
        let payload = serde_json::to_vec(heartbeat)?;
        let (k, bytes) = tokio::time::timeout(
            Duration::from_secs(2),
            sophon_mesh::call(&conn, kind::HEARTBEAT, &payload, 1 << 20),
        )
        .await
        .context("the heartbeat timed out")??;
        decode_answer(k, &bytes)
    }

    async fn watch_loop(self: Arc<Self>) {
        let mut next = 0usize;
        loop {
            if self.removed.load(Ordering::Acquire) {
                return;
            }
            let all = self.coordinators.addresses();
            let address = all
                .get(next % all.len().max(1))
                .cloned()
                .unwrap_or_default();
            next = next.wrapping_add(1);
            match self.watch(&address).await {
                Ok(()) => {}
                Err(e) => tracing::debug!(coordinator = %address, error = %e, "watch ended"),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn watch(&self, address: &str) -> anyhow::Result<()> {
        let conn = self.coordinators.connection(address).await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let request = wire::WatchRequest {
            after_index: self.applied_index(),
        };
        sophon_mesh::write_frame(&mut send, kind::WATCH, &serde_json::to_vec(&request)?).await?;
        send.finish()?;
        let silence = Duration::from_millis(wire::WATCH_KEEPALIVE_MS * 3);
        loop {
            let frame = tokio::time::timeout(
                silence,
                sophon_mesh::read_frame(&mut recv, wire::MAX_CONTROL_FRAME),
            )
            .await
            .context("the watch fell silent")??;
            match frame {
                Some((kind::VIEW, body)) => {
                    let view: wire::View =
                        serde_json::from_slice(&body).context("decode a view")?;
                    let removed = view.removed;
                    self.apply(view).await;
                    if removed {
                        return Ok(());
                    }
                }
                Some((k, body)) => {
                    let e: anyhow::Result<serde_json::Value> = decode_answer(k, &body);
                    bail!("{}", e.err().map(|e| e.to_string()).unwrap_or_default());
                }
                None => return Ok(()),
            }
        }
    }
}
