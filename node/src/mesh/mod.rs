//! The node in the mesh: it joins the coordinators, serves the replicas placed on it, routes
//! V2 requests to any replica in the mesh, and reports back. The wire is `sophon_mesh::wire`;
//! this crate never depends on the coordinator crate.
//!
//! - [`join`]: enroll with a node join token: a key and CSR made here, the certificate for
//!   `node/<id>` signed by the cluster, saved under the data directory with `node.json`.
//! - [`MeshNode::start`]: the node's QUIC endpoint (mutual TLS with the cluster CA), then
//!   [`control`] (heartbeats to the leader, a watch on any coordinator that pushes the node's
//!   [`View`](wire::View)), [`replicas`] (fetch, verify and load what is assigned; unload what
//!   is not), and [`router`] (local replica first, else forward over QUIC to a node with a
//!   ready replica, chosen by least outstanding requests of two).
//! - Static stability: the last view is saved (`view.json`) and bundles are kept by digest
//!   (`bundles/`), so a node keeps serving and routing when every coordinator is down, and
//!   after a restart while they are.

pub mod control;
mod peers;
pub mod replicas;
pub mod router;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sophon_mesh::wire::{self, kind};
use sophon_mesh::{Identity, Principal};

use crate::Repository;

/// What a node needs to know to run, saved as `node.json` in its data directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeFile {
    pub id: String,
    /// Where the QUIC endpoint listens, and where others reach it.
    pub mesh_listen: SocketAddr,
    pub mesh_address: String,
    /// Where the V2 HTTP endpoint listens, and where clients reach it.
    pub http_listen: SocketAddr,
    pub http_address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub zone: String,
    #[serde(default)]
    pub environments: Vec<String>,
    /// Memory offered to replicas, MiB.
    pub memory_mb: u64,
    /// The coordinators' mesh addresses, as last known.
    pub coordinators: Vec<String>,
}

impl NodeFile {
    pub fn read(dir: &Path) -> anyhow::Result<NodeFile> {
        let path = dir.join("node.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "read {} (has this node joined? run `sophon node join` first)",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        write_atomic(
            &dir.join("node.json"),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }
}

/// Write a file whole or not at all (a temporary file renamed over it).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

/// How a node joins.
#[derive(Clone, Debug)]
pub struct JoinOptions {
    pub join_token: String,
    pub data_dir: PathBuf,
    /// The node's id (`node/<id>` in its certificate); default: the host name.
    pub id: String,
    pub mesh_listen: SocketAddr,
    pub mesh_address: Option<String>,
    pub http_listen: SocketAddr,
    pub http_address: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub zone: String,
    pub environments: Vec<String>,
    /// Memory to offer replicas (MiB); default: the machine's memory.
    pub memory_mb: Option<u64>,
}

/// What this machine has: cores, memory, backends.
pub fn inventory(memory_mb: Option<u64>) -> wire::Inventory {
    let hw = crate::hardware::hardware();
    let npus = hw
        .openvino_devices
        .iter()
        .flatten()
        .filter(|d| d.starts_with("NPU"))
        .map(|d| wire::Accelerator {
            model: format!("Intel {d} (OpenVINO)"),
            memory_mb: 0,
        })
        .collect();
    wire::Inventory {
        cpu_cores: hw.cpu_cores as u32,
        memory_mb: memory_mb.unwrap_or_else(machine_memory_mb).max(1),
        gpus: hw
            .gpus
            .iter()
            .map(|g| wire::Accelerator {
                model: g.name.clone(),
                memory_mb: g.memory_mb,
            })
            .collect(),
        npus,
        backends: hw
            .backends
            .iter()
            .filter(|(_, here)| here.is_ok())
            .map(|(backend, _)| backend.as_str().to_string())
            .collect(),
    }
}

fn machine_memory_mb() -> u64 {
    crate::hardware::proc_field("/proc/meminfo", "MemTotal")
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(1024)
}

/// What a node says about itself to the coordinators.
pub fn node_info(file: &NodeFile) -> wire::NodeInfo {
    wire::NodeInfo {
        id: file.id.clone(),
        mesh_address: file.mesh_address.clone(),
        http_address: file.http_address.clone(),
        inventory: inventory(Some(file.memory_mb)),
        labels: file.labels.clone(),
        zone: file.zone.clone(),
        environments: file.environments.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Resolve `host:port` to one address.
pub(crate) fn resolve(address: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    address
        .to_socket_addrs()
        .with_context(|| format!("resolve {address}"))?
        .next()
        .with_context(|| format!("{address} resolves to no address"))
}

/// Decode a JSON answer frame (`OK`), or turn an `ERR` frame into an error.
pub(crate) fn decode_answer<T: serde::de::DeserializeOwned>(
    k: u8,
    bytes: &[u8],
) -> anyhow::Result<T> {
    match k {
        kind::OK => serde_json::from_slice(bytes).context("decode the answer"),
        kind::ERR => match serde_json::from_slice::<wire::WireError>(bytes) {
            Ok(e) => bail!("{} ({}, {})", e.message, e.status, e.code),
            Err(_) => bail!("the coordinator answered an error it could not say"),
        },
        other => bail!("unexpected answer of kind {other}"),
    }
}

/// Send a join request on `conn` (a connection with the join client config) and return the
/// answer frame. A coordinator that answers `unavailable` (no leader yet, or the leader moved
/// while it signed) is asked again, up to 5 times over about 6 s: nothing was committed.
pub async fn join_call(conn: &quinn::Connection, payload: &[u8]) -> anyhow::Result<(u8, Vec<u8>)> {
    let mut wait = std::time::Duration::from_millis(200);
    for attempt in 0.. {
        let (k, bytes) = sophon_mesh::call(conn, kind::NODE_JOIN, payload, wire::MAX_CONTROL_FRAME)
            .await
            .context("send the join request")?;
        let unavailable = k == kind::ERR
            && serde_json::from_slice::<wire::WireError>(&bytes)
                .is_ok_and(|e| e.code == "unavailable");
        if !unavailable || attempt == 5 {
            return Ok((k, bytes));
        }
        tracing::info!(
            attempt,
            "the cluster cannot sign now (no leader); asking again"
        );
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
    unreachable!("the loop returns")
}

/// Enroll this node: a key and CSR made here, the certificate signed by the cluster. Writes
/// `identity/` and `node.json` under the data directory.
pub async fn join(options: &JoinOptions) -> anyhow::Result<NodeFile> {
    let dir = &options.data_dir;
    if dir.join("node.json").exists() {
        bail!(
            "{} already holds a node; run it with `sophon node run --data {}`",
            dir.display(),
            dir.display()
        );
    }
    let (fingerprint, secret, address) = wire::parse_join_token(&options.join_token)
        .map_err(|e| anyhow::anyhow!("join token: {e}"))?;
    let mesh_address = options
        .mesh_address
        .clone()
        .unwrap_or_else(|| options.mesh_listen.to_string());
    let http_address = options
        .http_address
        .clone()
        .unwrap_or_else(|| options.http_listen.to_string());
    let file = NodeFile {
        id: options.id.clone(),
        mesh_listen: options.mesh_listen,
        mesh_address,
        http_listen: options.http_listen,
        http_address,
        labels: options.labels.clone(),
        zone: options.zone.clone(),
        environments: options.environments.clone(),
        memory_mb: options.memory_mb.unwrap_or_else(machine_memory_mb),
        coordinators: vec![address.clone()],
    };
    let (key_pem, csr_pem) = sophon_mesh::new_csr()?;
    let cfg = sophon_mesh::EndpointConfig::default();
    let endpoint = sophon_mesh::client_endpoint(&cfg)?;
    let client = sophon_mesh::join_client_config(&fingerprint, &cfg)?;
    let conn = sophon_mesh::connect(&endpoint, resolve(&address)?, Some(client))
        .await
        .with_context(|| format!("connect to the coordinator at {address}"))?;
    let request = wire::NodeJoinRequest {
        secret,
        csr_pem,
        node: node_info(&file),
    };
    let payload = serde_json::to_vec(&request)?;
    let (k, bytes) = join_call(&conn, &payload).await?;
    conn.close(0u32.into(), b"joined");
    let answer: wire::NodeJoinAnswer = decode_answer(k, &bytes).context("join refused")?;
    let answered_ca = sophon_mesh::fingerprint_of_pem(&answer.ca_pem)?;
    if !answered_ca.eq_ignore_ascii_case(&fingerprint) {
        bail!("the answer names another CA than the join token pins");
    }
    let identity = Identity {
        principal: Principal::Node(options.id.clone()),
        cert_pem: answer.cert_pem,
        key_pem,
        ca_pem: answer.ca_pem,
    };
    identity.check()?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    identity.save(&dir.join("identity"))?;
    let mut file = file;
    if !answer.coordinators.is_empty() {
        file.coordinators = answer.coordinators;
    }
    file.write(dir)?;
    Ok(file)
}

/// A running mesh node's parts.
pub struct MeshNode {
    pub file: NodeFile,
    pub endpoint: quinn::Endpoint,
    pub router: Arc<router::Router>,
    pub replicas: Arc<replicas::Replicas>,
    pub control: Arc<control::Control>,
}

impl MeshNode {
    /// Start the endpoint and the control, replica and router loops. `app` serves forwarded
    /// requests (the node's own HTTP routes).
    pub async fn start(
        dir: &Path,
        repo: Arc<Repository>,
        app: axum::Router,
        model_memory: Option<u64>,
    ) -> anyhow::Result<MeshNode> {
        let file = NodeFile::read(dir)?;
        let identity = Identity::load(&dir.join("identity"))?;
        if identity.principal != Principal::Node(file.id.clone()) {
            bail!(
                "the certificate names {}, not node {}",
                identity.principal,
                file.id
            );
        }
        let endpoint = sophon_mesh::endpoint(
            file.mesh_listen,
            &identity,
            &sophon_mesh::EndpointConfig::default(),
        )?;
        let router = Arc::new(router::Router::new(
            file.id.clone(),
            endpoint.clone(),
            repo.clone(),
        ));
        let replicas =
            Arc::new(replicas::Replicas::new(dir, repo.clone())?.with_budget(model_memory));
        let control = Arc::new(control::Control::new(
            dir,
            file.clone(),
            endpoint.clone(),
            replicas.clone(),
            router.clone(),
        ));
        let evicting = Arc::downgrade(&replicas);
        let _ = router.reloader.set(Box::new(move |model, version| {
            let replicas = evicting.upgrade();
            Box::pin(async move {
                let Some(replicas) = replicas else {
                    return false;
                };
                match replicas.evicted(&model, version.as_deref()) {
                    Some((m, v)) => replicas.reload(&m, &v).await,
                    None => false,
                }
            })
        }));
        let weak = Arc::downgrade(&control);
        let _ = router.activator.set(Box::new(move |deployment| {
            if let Some(control) = weak.upgrade() {
                control.activate(deployment);
            }
        }));
        // The last known view, so the node serves and routes before (or without) coordinators.
        if let Some(view) = control::load_view(dir) {
            control.apply(view).await;
        }
        tokio::spawn(router::serve(endpoint.clone(), router.clone(), app));
        tokio::spawn(control.clone().run());
        Ok(MeshNode {
            file,
            endpoint,
            router,
            replicas,
            control,
        })
    }
}
