//! Routing V2 requests across the mesh.
//!
//! Every node's V2 endpoint serves every deployment of the environments it serves: a request
//! for a model with a ready replica here runs here; otherwise it is forwarded over QUIC
//! (mutual TLS, node to node) to a node with a ready replica, which serves it through its own
//! HTTP routes and never forwards it again. The body travels as the client sent it (V2 JSON or
//! binary tensors), never re-encoded.
//!
//! - Choice: least outstanding forwarded requests of two nodes drawn at random.
//! - Deadline: the time left goes with the request; the serving node stops at it.
//! - Retry: once, on another node, and only when the request provably reached no guest: the
//!   connection or the stream could not be opened, or the serving node answered that it has no
//!   replica (`ran: false`). Never after a guest ran.
//! - `/v2/models/{m}/infer` goes to the newest revision of the newest deployment of `m` with a
//!   ready replica, here or elsewhere ([`Router::version_for`]; during a rolling update the new
//!   revision takes the traffic once one of its replicas is ready);
//!   `/v2/models/{m}/versions/{v}/infer` to the deployment of that version.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use parking_lot::{Mutex, RwLock};
use rand::Rng;
use sophon_mesh::Principal;
use sophon_mesh::wire::{self, kind};
use tower::ServiceExt;

use crate::Repository;

/// The header a forwarded request carries: the serving node never forwards it again.
pub const FORWARDED: &str = "x-sophon-forwarded";

/// V2's header for the JSON part's length in a binary tensor request or response.
const HEADER_LENGTH: &str = "inference-header-content-length";

/// Bytes per `DATA` frame.
const CHUNK: usize = 1 << 20;

#[derive(Default)]
struct Table {
    routes: Vec<wire::Route>,
    members: BTreeMap<String, Option<String>>,
}

/// The route table and the connections to other nodes.
pub struct Router {
    me: String,
    peers: super::peers::Peers,
    repo: Arc<Repository>,
    table: RwLock<Table>,
    outstanding: Mutex<HashMap<String, Arc<AtomicU32>>>,
    /// The largest body forwarded either way.
    pub max_body_bytes: usize,
    /// How long a forwarded request may take.
    pub timeout: Duration,
    /// Forwards attempted (each try counts), and retries on another node.
    pub attempts: std::sync::atomic::AtomicU64,
    pub retries: std::sync::atomic::AtomicU64,
    /// A view has been taken: the node knows the mesh and can route.
    view: std::sync::atomic::AtomicBool,
    /// Asks the leader to activate a deployment at zero (set once the control plane runs).
    pub activator: std::sync::OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
    /// Requests held here while their deployment is activated.
    held: std::sync::atomic::AtomicUsize,
    /// Loads a version evicted here again (set once the replicas run).
    pub reloader: std::sync::OnceLock<Reloader>,
}

/// Loads `model` (at a version, or any) again if it was evicted here; true once loaded.
pub type Reloader = Box<
    dyn Fn(
            String,
            Option<String>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
        + Send
        + Sync,
>;

/// The most requests a node holds at once while deployments activate; more get a 503.
pub const MAX_HELD: usize = 1024;

/// How long a request is held for its deployment to activate.
pub const ACTIVATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub node: String,
    pub mesh_address: String,
}

/// The model and version a `/v2/models/...` path names (`None`: not a model path).
pub fn model_of(path: &str) -> Option<(String, Option<String>)> {
    let rest = path.strip_prefix("/v2/models/")?;
    let rest = rest.split('?').next().unwrap_or(rest);
    let mut parts = rest.split('/');
    let model = parts.next().filter(|m| !m.is_empty())?;
    let next = parts.next();
    if model == "stats" && next.is_none() {
        return None;
    }
    match next {
        Some("versions") => Some((model.to_string(), parts.next().map(str::to_string))),
        _ => Some((model.to_string(), None)),
    }
}

impl Router {
    pub fn new(me: String, endpoint: quinn::Endpoint, repo: Arc<Repository>) -> Router {
        Router {
            me,
            peers: super::peers::Peers::new(endpoint),
            repo,
            table: RwLock::new(Table::default()),
            outstanding: Mutex::new(HashMap::new()),
            max_body_bytes: 64 << 20,
            timeout: Duration::from_secs(30),
            attempts: Default::default(),
            retries: Default::default(),
            view: Default::default(),
            activator: std::sync::OnceLock::new(),
            held: Default::default(),
            reloader: std::sync::OnceLock::new(),
        }
    }

    /// Load `model` (at `version`, or any) again if it was evicted from this node to keep
    /// within its model memory; true once it is loaded here.
    pub async fn reload_evicted(&self, model: &str, version: Option<&str>) -> bool {
        match self.reloader.get() {
            Some(reload) => reload(model.to_string(), version.map(str::to_string)).await,
            None => false,
        }
    }

    /// An autoscaled deployment of `model` (at `version`, if given) with no ready replica
    /// anywhere, which a request must wait for: (deployment, the version it runs, whether it is
    /// at zero replicas). `None` when a replica is ready or the model is not autoscaled.
    pub fn dormant(&self, model: &str, version: Option<&str>) -> Option<(u64, String, bool)> {
        let table = self.table.read();
        let mine = || {
            table
                .routes
                .iter()
                .filter(move |r| r.model == model && version.is_none_or(|v| r.version == v))
        };
        if mine().any(|r| ready(r) > 0) {
            return None;
        }
        let route = mine()
            .filter(|r| r.autoscaled && !r.mirror)
            .max_by_key(|r| (r.deployment, std::cmp::Reverse(r.revision)))?;
        Some((route.deployment, route.version.clone(), route.replicas == 0))
    }

    /// Hold a request for `model@version` of `deployment` until a replica of it is ready
    /// (here, or anywhere in the view), asking the leader to activate it if it is at zero.
    /// Bounded: at most [`MAX_HELD`] requests wait, each at most [`ACTIVATION_TIMEOUT`].
    pub async fn activate(
        &self,
        (deployment, version, at_zero): (u64, String, bool),
        model: &str,
    ) -> Result<(), Response> {
        struct Held<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Held<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let _held = Held(&self.held);
        if self.held.fetch_add(1, Ordering::Relaxed) >= MAX_HELD {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{MAX_HELD} requests already wait here for deployments to activate; retry later"
                ),
            ));
        }
        let started = Instant::now();
        let mut asked = None::<Instant>;
        loop {
            let ready_here = self.repo.lookup(model, Some(&version)).is_ok();
            if ready_here || self.dormant(model, Some(&version)).is_none() {
                return Ok(());
            }
            // Ask (again every second while it is still at zero: a leader may have changed).
            let zero = self
                .table
                .read()
                .routes
                .iter()
                .any(|r| r.deployment == deployment && r.replicas == 0);
            if (at_zero || zero)
                && asked.is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
                && let Some(activate) = self.activator.get()
            {
                activate(deployment);
                asked = Some(Instant::now());
            }
            if started.elapsed() >= ACTIVATION_TIMEOUT {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "deployment {deployment} ({model}@{version}) did not become ready within {} s of this request; retry later",
                        ACTIVATION_TIMEOUT.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Take the routes and members of a view.
    pub fn update(&self, view: &wire::View) {
        let mut table = self.table.write();
        table.routes = view.routes.clone();
        table.members = view.members.clone();
        self.view.store(!view.removed, Ordering::Release);
    }

    /// Whether the node holds a view of the mesh (from a coordinator, or saved), so it can route.
    pub fn has_view(&self) -> bool {
        self.view.load(Ordering::Acquire)
    }

    /// Whether node `id` (with the certificate of `serial`) is a member now.
    pub fn admits(&self, id: &str, serial: Option<&str>) -> bool {
        match self.table.read().members.get(id) {
            None => false,
            Some(Some(want)) => serial == Some(want.as_str()),
            Some(None) => true,
        }
    }

    /// The nodes with a ready replica of `model` (at `version`, or the newest deployment's),
    /// other than this one.
    pub fn targets(&self, model: &str, version: Option<&str>) -> Vec<Target> {
        let table = self.table.read();
        let route = table
            .routes
            .iter()
            .filter(|r| r.model == model && version.is_none_or(|v| r.version == v))
            .filter(|r| r.endpoints.iter().any(|e| e.node != self.me))
            .max_by_key(|r| (r.deployment, r.revision));
        route
            .map(|r| {
                r.endpoints
                    .iter()
                    .filter(|e| e.node != self.me && e.ready > 0)
                    .map(|e| Target {
                        node: e.node.clone(),
                        mesh_address: e.mesh_address.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The version a request for `model` that names none goes to: of the newest deployment
    /// with a ready replica anywhere, one of its revisions. During a canary they share by the
    /// routes' weights; otherwise (a rolling update) in proportion to their ready replicas, so
    /// that traffic moves as new replicas become ready. A mirrored canary never answers. `None`:
    /// none is ready.
    pub fn version_for(&self, model: &str) -> Option<String> {
        let table = self.table.read();
        let revisions = Self::answering(&table.routes, model);
        if let [only] = revisions.as_slice() {
            return Some(only.version.clone());
        }
        let weighted = revisions.iter().any(|r| r.weight.is_some());
        let share = |r: &wire::Route| {
            if weighted {
                r.weight.unwrap_or(0)
            } else {
                ready(r)
            }
        };
        let total: u32 = revisions.iter().map(|r| share(r)).sum();
        if total == 0 {
            return revisions.last().map(|r| r.version.clone());
        }
        let mut draw = rand::thread_rng().gen_range(0..total);
        for r in &revisions {
            let n = share(r);
            if draw < n {
                return Some(r.version.clone());
            }
            draw -= n;
        }
        revisions.last().map(|r| r.version.clone())
    }

    /// The revisions of `model`'s newest deployment with a ready replica that answer requests
    /// (not a mirror), each with a ready replica.
    fn answering<'a>(routes: &'a [wire::Route], model: &str) -> Vec<&'a wire::Route> {
        let live = || {
            routes
                .iter()
                .filter(move |r| r.model == model && !r.mirror && ready(r) > 0)
        };
        let Some(deployment) = live().map(|r| r.deployment).max() else {
            return Vec::new();
        };
        live().filter(|r| r.deployment == deployment).collect()
    }

    /// The version a copy of a request for `model` (that names no version) should also go to:
    /// a mirrored canary of the deployment that answers, drawn at its weight.
    pub fn mirror_for(&self, model: &str) -> Option<String> {
        let table = self.table.read();
        let deployment = Self::answering(&table.routes, model).first()?.deployment;
        let mirror = table
            .routes
            .iter()
            .find(|r| r.deployment == deployment && r.mirror && ready(r) > 0)?;
        let weight = mirror.weight.unwrap_or(0);
        (rand::thread_rng().gen_range(0..100) < weight).then(|| mirror.version.clone())
    }

    /// Whether `model@version` is under a canary's analysis (its performance is reported with
    /// every heartbeat).
    pub fn analysed(&self, model: &str, version: &str) -> bool {
        self.table.read().routes.iter().any(|r| {
            r.model == model && r.version == version && (r.weight.is_some() || r.autoscaled)
        })
    }

    /// Whether the mesh has `model` (at `version`, if given) deployed in an environment this
    /// node serves. Anything else is answered here (an unknown model or version is a 404).
    pub fn knows(&self, model: &str, version: Option<&str>) -> bool {
        self.table
            .read()
            .routes
            .iter()
            .any(|r| r.model == model && version.is_none_or(|v| r.version == v))
    }

    fn counter(&self, node: &str) -> Arc<AtomicU32> {
        self.outstanding
            .lock()
            .entry(node.to_string())
            .or_default()
            .clone()
    }

    /// Least outstanding of two drawn at random, leaving out `skip`.
    pub fn choose(&self, targets: &[Target], skip: Option<&str>) -> Option<Target> {
        let pool: Vec<&Target> = targets
            .iter()
            .filter(|t| Some(t.node.as_str()) != skip)
            .collect();
        match pool.len() {
            0 => None,
            1 => Some(pool[0].clone()),
            n => {
                let mut rng = rand::thread_rng();
                let a = rng.gen_range(0..n);
                let mut b = rng.gen_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let load = |t: &Target| self.counter(&t.node).load(Ordering::Relaxed);
                let pick = if load(pool[b]) < load(pool[a]) { b } else { a };
                Some(pool[pick].clone())
            }
        }
    }

    async fn connection(&self, target: &Target) -> anyhow::Result<quinn::Connection> {
        let expected = |p: Option<&Principal>| match p {
            Some(Principal::Node(id)) if *id == target.node => Ok(()),
            _ => Err(format!("node {}'s certificate", target.node)),
        };
        self.peers
            .get(
                &target.node,
                &target.mesh_address,
                Duration::from_secs(2),
                expected,
            )
            .await
    }

    /// Forward a request for `model` to a node with a ready replica; at most one retry, and
    /// only when no guest ran.
    pub async fn forward(
        &self,
        model: &str,
        version: Option<&str>,
        method: &str,
        path: &str,
        headers: &HeaderMap,
        body: bytes::Bytes,
    ) -> Response {
        let targets = self.targets(model, version);
        if targets.is_empty() {
            let detail = match version {
                Some(v) => format!("version {v} of model `{model}`"),
                None => format!("model `{model}`"),
            };
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no replica of {detail} is ready anywhere in the mesh; retry later"),
            );
        }
        let started = Instant::now();
        let request = wire::ForwardRequest {
            method: method.to_string(),
            path: path.to_string(),
            deadline_ms: self.timeout.as_millis() as u64,
            content_type: headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            header_length: headers
                .get(HEADER_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            body_length: body.len(),
        };
        let mut skip = None;
        let mut first_error = None;
        for attempt in 0..2 {
            let Some(target) = self.choose(&targets, skip.as_deref()) else {
                break;
            };
            self.attempts.fetch_add(1, Ordering::Relaxed);
            if attempt > 0 {
                self.retries.fetch_add(1, Ordering::Relaxed);
            }
            let counter = self.counter(&target.node);
            counter.fetch_add(1, Ordering::Relaxed);
            let mut request = request.clone();
            request.deadline_ms = self.timeout.saturating_sub(started.elapsed()).as_millis() as u64;
            let result = self.send(&target, &request, body.clone()).await;
            counter.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(Sent::Answered(response)) => return response,
                Ok(Sent::NotThere(response)) | Ok(Sent::Unreached(response)) => {
                    tracing::debug!(node = %target.node, "forward not taken; trying another node");
                    first_error.get_or_insert(response);
                    skip = Some(target.node.clone());
                }
                Err(e) => {
                    return error(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "node {} failed while serving the request (not retried: a guest may \
                             have run it): {e:#}",
                            target.node
                        ),
                    );
                }
            }
        }
        first_error.unwrap_or_else(|| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no node with a ready replica could be reached; retry later",
            )
        })
    }

    async fn send(
        &self,
        target: &Target,
        request: &wire::ForwardRequest,
        body: bytes::Bytes,
    ) -> anyhow::Result<Sent> {
        let unreached = |e: &dyn std::fmt::Display| {
            Sent::Unreached(error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("node {} could not be reached: {e}", target.node),
            ))
        };
        let conn = match self.connection(target).await {
            Ok(c) => c,
            Err(e) => return Ok(unreached(&format!("{e:#}"))),
        };
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                self.peers.forget(&target.node).await;
                return Ok(unreached(&e));
            }
        };
        let deadline = Duration::from_millis(request.deadline_ms);
        let exchange = async {
            write_message(&mut send, request, body).await?;
            let (answer, body): (wire::ForwardAnswer, _) =
                read_message(&mut recv, 1 << 20, self.max_body_bytes)
                    .await?
                    .context("the serving node closed the stream without an answer")?;
            if answer.body_length != body.len() {
                bail!("the answer's body does not match its announced length");
            }
            anyhow::Ok((answer, body))
        };
        let (answer, body) = tokio::time::timeout(deadline, exchange)
            .await
            .context("the forwarded request ran past its deadline")??;
        let response = response_of(&answer, body);
        Ok(if answer.ran {
            Sent::Answered(response)
        } else {
            Sent::NotThere(response)
        })
    }
}

enum Sent {
    /// The serving node answered (whatever the status).
    Answered(Response),
    /// The serving node had no replica: nothing ran.
    NotThere(Response),
    /// The node could not be reached: nothing ran.
    Unreached(Response),
}

/// A route's ready replicas.
fn ready(r: &wire::Route) -> u32 {
    r.endpoints.iter().map(|e| e.ready).sum()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": message.into()})),
    )
        .into_response()
}

/// A forwarded request or answer: its JSON head in an `INFER` frame, then its body in `DATA`
/// frames, then the end of the stream. All of it is handed to QUIC in one write (the body is
/// not copied), so a small message leaves in one packet rather than one per frame part.
async fn write_message(
    send: &mut quinn::SendStream,
    head: &impl serde::Serialize,
    body: bytes::Bytes,
) -> anyhow::Result<()> {
    let json = serde_json::to_vec(head)?;
    let mut first = Vec::with_capacity(2 * sophon_mesh::codec::HEADER_LEN + json.len());
    first.extend_from_slice(&sophon_mesh::codec::encode_header(kind::INFER, json.len())?);
    first.extend_from_slice(&json);
    let mut parts = Vec::with_capacity(2 + 2 * body.len().div_ceil(CHUNK));
    let mut offset = 0;
    while offset < body.len() {
        let end = (offset + CHUNK).min(body.len());
        let header = sophon_mesh::codec::encode_header(kind::DATA, end - offset)?;
        if parts.is_empty() {
            first.extend_from_slice(&header);
            parts.push(bytes::Bytes::from(std::mem::take(&mut first)));
        } else {
            parts.push(bytes::Bytes::copy_from_slice(&header));
        }
        parts.push(body.slice(offset..end));
        offset = end;
    }
    if parts.is_empty() {
        parts.push(bytes::Bytes::from(first));
    }
    send.write_all_chunks(&mut parts).await?;
    send.finish()?;
    Ok(())
}

/// A whole forwarded request or answer, read to the end of its stream: the JSON head (`None`:
/// the stream ended with nothing on it) and the body. The head may take `max_head` bytes and
/// the body `max_body`; a body of one frame is not copied.
async fn read_message<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max_head: usize,
    max_body: usize,
) -> anyhow::Result<Option<(T, bytes::Bytes)>> {
    use sophon_mesh::codec::HEADER_LEN;
    let frames_of_body = max_body.div_ceil(CHUNK).max(1);
    let limit = HEADER_LEN + max_head + frames_of_body * HEADER_LEN + max_body;
    let all = bytes::Bytes::from(recv.read_to_end(limit).await?);
    if all.is_empty() {
        return Ok(None);
    }
    let frames = sophon_mesh::codec::decode_frames(&all, max_head.max(CHUNK) + 1)?;
    let mut frames = frames.into_iter();
    let head: T = match frames.next() {
        Some((kind::INFER, head)) if head.len() <= max_head => serde_json::from_slice(head)?,
        Some((kind::INFER, _)) => bail!("a head over {max_head} bytes"),
        Some((k, _)) => bail!("unexpected frame of kind {k}"),
        None => unreachable!("a non-empty buffer holds a frame or fails to decode"),
    };
    let parts: Vec<&[u8]> = frames
        .map(|(k, part)| match k {
            kind::DATA => Ok(part),
            k => Err(anyhow::anyhow!("unexpected frame of kind {k} in a body")),
        })
        .collect::<anyhow::Result<_>>()?;
    let body = match parts.as_slice() {
        [] => bytes::Bytes::new(),
        [one] => all.slice_ref(one),
        many => bytes::Bytes::from(many.concat()),
    };
    if body.len() > max_body {
        bail!("a body over {max_body} bytes");
    }
    Ok(Some((head, body)))
}

fn response_of(answer: &wire::ForwardAnswer, body: bytes::Bytes) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    if let Some(ct) = answer
        .content_type
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        headers.insert(header::CONTENT_TYPE, ct);
    }
    if let Some(n) = answer.header_length {
        headers.insert(HEADER_LENGTH, HeaderValue::from(n));
    }
    response
}

/// Serve requests forwarded by other nodes, through `app` (this node's HTTP routes).
pub async fn serve(endpoint: quinn::Endpoint, router: Arc<Router>, app: axum::Router) {
    while let Some(incoming) = endpoint.accept().await {
        let router = router.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else {
                return;
            };
            let Some(Principal::Node(peer)) = sophon_mesh::peer_principal(&conn) else {
                conn.close(403u32.into(), b"only mesh nodes forward requests here");
                return;
            };
            let serial = sophon_mesh::peer_serial(&conn);
            if !router.admits(&peer, serial.as_deref()) {
                tracing::warn!(%peer, "refused a node that is not a current member");
                conn.close(403u32.into(), b"not a current member");
                return;
            }
            while let Ok((send, recv)) = conn.accept_bi().await {
                let router = router.clone();
                let app = app.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_stream(&router, app, send, recv).await {
                        tracing::debug!(error = %e, "a forwarded request failed");
                    }
                });
            }
        });
    }
}

async fn serve_stream(
    router: &Router,
    app: axum::Router,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let (request, body): (wire::ForwardRequest, _) =
        read_message(&mut recv, 64 << 10, router.max_body_bytes)
            .await?
            .context("an empty stream")?;
    if request.body_length != body.len() {
        bail!("a forwarded body that does not match its announced length");
    }
    let here = match model_of(&request.path) {
        Some((m, v)) => {
            router.repo.lookup(&m, v.as_deref()).is_ok()
                || router.reload_evicted(&m, v.as_deref()).await
        }
        None => false,
    };
    let (answer, body) = if !here {
        let body = serde_json::to_vec(&serde_json::json!({
            "error": format!("node {} has no ready replica for {}", router.me, request.path)
        }))?;
        (
            wire::ForwardAnswer {
                status: 503,
                content_type: Some("application/json".into()),
                header_length: None,
                body_length: body.len(),
                ran: false,
            },
            bytes::Bytes::from(body),
        )
    } else {
        let mut http = Request::builder()
            .method(request.method.as_str())
            .uri(request.path.as_str())
            .header(FORWARDED, "1");
        if let Some(ct) = &request.content_type {
            http = http.header(header::CONTENT_TYPE, ct);
        }
        if let Some(n) = request.header_length {
            http = http.header(HEADER_LENGTH, n);
        }
        let http = http.body(Body::from(body))?;
        let deadline = Duration::from_millis(request.deadline_ms.max(1));
        let response = match tokio::time::timeout(deadline, app.oneshot(http)).await {
            Ok(Ok(r)) => r,
            Ok(Err(never)) => match never {},
            Err(_) => error(
                StatusCode::GATEWAY_TIMEOUT,
                "the request ran past the deadline it was forwarded with",
            ),
        };
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let header_length = response
            .headers()
            .get(HEADER_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = axum::body::to_bytes(response.into_body(), router.max_body_bytes).await?;
        (
            wire::ForwardAnswer {
                status,
                content_type,
                header_length,
                body_length: body.len(),
                ran: true,
            },
            body,
        )
    };
    write_message(&mut send, &answer, body).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Repository, Runtime, RuntimeConfig, ServingLimits};
    use sophon_mesh::{Ca, EndpointConfig};

    fn repo() -> Arc<Repository> {
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: None,
            ..RuntimeConfig::default()
        })
        .expect("runtime");
        Arc::new(Repository::new(
            runtime,
            Vec::new(),
            ServingLimits::default(),
            Arc::new(crate::stats::Metrics::new().expect("metrics")),
        ))
    }

    fn endpoint(ca: &Ca, id: &str) -> quinn::Endpoint {
        let identity = ca
            .issue_identity(&Principal::Node(id.into()))
            .expect("identity");
        sophon_mesh::endpoint(
            ([127, 0, 0, 1], 0).into(),
            &identity,
            &EndpointConfig::default(),
        )
        .expect("endpoint")
    }

    fn route(deployment: u64, version: &str, nodes: &[(&str, String)]) -> wire::Route {
        wire::Route {
            deployment,
            revision: 1,
            model: "mlp".into(),
            version: version.into(),
            environment: "staging".into(),
            digest: "d".into(),
            replicas: nodes.len() as u32,
            endpoints: nodes
                .iter()
                .map(|(node, address)| wire::Endpoint {
                    node: node.to_string(),
                    mesh_address: address.clone(),
                    ready: 1,
                })
                .collect(),
            weight: None,
            mirror: false,
            autoscaled: false,
        }
    }

    fn view(routes: Vec<wire::Route>) -> wire::View {
        wire::View {
            routes,
            ..wire::View::default()
        }
    }

    /// A UDP port with nothing behind it.
    fn dead_address() -> String {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = s.local_addr().expect("addr");
        drop(s);
        addr.to_string()
    }

    #[tokio::test]
    async fn a_canary_takes_its_weight_and_a_mirror_gets_copies_but_never_answers() {
        let ca = Ca::generate("t").expect("ca");
        let router = Router::new("me".into(), endpoint(&ca, "me"), repo());
        let weighted = |version: &str, revision, weight, mirror| wire::Route {
            revision,
            weight: Some(weight),
            mirror,
            ..route(1, version, &[("n1", dead_address())])
        };
        let draws = |router: &Router, f: &dyn Fn(&Router) -> Option<String>| {
            let mut counts: BTreeMap<Option<String>, u32> = BTreeMap::new();
            for _ in 0..4000 {
                *counts.entry(f(router)).or_default() += 1;
            }
            counts
        };
        router.update(&view(vec![
            weighted("1", 1, 75, false),
            weighted("2", 2, 25, false),
        ]));
        assert!(router.analysed("mlp", "2") && router.analysed("mlp", "1"));
        let got = draws(&router, &|r| r.version_for("mlp"));
        let canary = got.get(&Some("2".to_string())).copied().unwrap_or(0);
        assert!((800..1200).contains(&canary), "{got:?}");
        assert_eq!(router.mirror_for("mlp"), None);
        // Mirrored at 30 %: every answer from version 1, a copy of about 30 % to version 2.
        router.update(&view(vec![
            weighted("1", 1, 100, false),
            weighted("2", 2, 30, true),
        ]));
        let got = draws(&router, &|r| r.version_for("mlp"));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got.get(&Some("1".to_string())), Some(&4000));
        let copies = draws(&router, &|r| r.mirror_for("mlp"));
        let copied = copies.get(&Some("2".to_string())).copied().unwrap_or(0);
        assert!((1000..1400).contains(&copied), "{copies:?}");
        // Without a canary nothing is analysed or mirrored.
        router.update(&view(vec![route(1, "1", &[("n1", dead_address())])]));
        assert!(!router.analysed("mlp", "1"));
        assert_eq!(router.mirror_for("mlp"), None);
    }

    #[tokio::test]
    async fn targets_are_the_newest_deployment_or_the_version_asked_never_this_node() {
        let ca = Ca::generate("t").expect("ca");
        let router = Router::new("me".into(), endpoint(&ca, "me"), repo());
        assert!(
            !router.has_view(),
            "no view yet: /v2/health/ready says not ready"
        );
        router.update(&view(vec![
            route(1, "1", &[("me", "x".into()), ("a", "a:1".into())]),
            route(2, "2", &[("b", "b:1".into())]),
        ]));
        let names = |t: Vec<Target>| t.into_iter().map(|t| t.node).collect::<Vec<_>>();
        assert_eq!(names(router.targets("mlp", None)), ["b"]);
        assert_eq!(names(router.targets("mlp", Some("1"))), ["a"]);
        assert!(router.targets("mlp", Some("3")).is_empty());
        assert!(router.knows("mlp", Some("1")) && !router.knows("mlp", Some("3")));
        assert!(!router.knows("other", None));
        assert!(router.has_view());
    }

    #[tokio::test]
    async fn two_choices_keep_requests_off_the_busier_node() {
        let ca = Ca::generate("t").expect("ca");
        let router = Router::new("me".into(), endpoint(&ca, "me"), repo());
        let targets: Vec<Target> = ["a", "b"]
            .iter()
            .map(|n| Target {
                node: n.to_string(),
                mesh_address: format!("{n}:1"),
            })
            .collect();
        router.counter("a").store(5, Ordering::Relaxed);
        for _ in 0..50 {
            assert_eq!(router.choose(&targets, None).expect("one").node, "b");
        }
        // Skipping the one tried leaves the other, busy or not.
        assert_eq!(router.choose(&targets, Some("b")).expect("one").node, "a");
        assert!(router.choose(&targets[..1], Some("a")).is_none());
        // Among many, both draws are distinct and the idle ones win.
        let many: Vec<Target> = (0..8)
            .map(|i| Target {
                node: format!("n{i}"),
                mesh_address: "x:1".into(),
            })
            .collect();
        for i in 0..7 {
            router.counter(&format!("n{i}")).store(9, Ordering::Relaxed);
        }
        let picked = (0..400)
            .filter(|_| router.choose(&many, None).expect("one").node == "n7")
            .count();
        // n7 wins whenever it is drawn (2 of 8 draws each time): about a quarter of the time.
        assert!(picked > 50, "{picked}");
    }

    #[tokio::test]
    async fn an_unreachable_node_is_retried_once_on_another_and_no_more() {
        let ca = Ca::generate("t").expect("ca");
        let mut router = Router::new("me".into(), endpoint(&ca, "me"), repo());
        router.timeout = Duration::from_secs(5);
        router.update(&view(vec![route(
            1,
            "1",
            &[
                ("a", dead_address()),
                ("b", dead_address()),
                ("c", dead_address()),
            ],
        )]));
        let response = router
            .forward(
                "mlp",
                None,
                "POST",
                "/v2/models/mlp/infer",
                &HeaderMap::new(),
                bytes::Bytes::from_static(b"{}"),
            )
            .await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(router.attempts.load(Ordering::Relaxed), 2);
        assert_eq!(router.retries.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_node_that_never_answers_fails_at_the_deadline_and_is_not_retried() {
        let ca = Ca::generate("t").expect("ca");
        let mut router = Router::new("me".into(), endpoint(&ca, "me"), repo());
        router.timeout = Duration::from_millis(400);
        // Two nodes that take the request and never answer (a guest may be running it).
        let mut routes = Vec::new();
        let mut servers = Vec::new();
        for id in ["slow1", "slow2"] {
            let server = endpoint(&ca, id);
            let address = server.local_addr().expect("addr").to_string();
            servers.push(tokio::spawn(async move {
                let mut held = Vec::new();
                while let Some(incoming) = server.accept().await {
                    let Ok(conn) = incoming.await else { continue };
                    while let Ok(streams) = conn.accept_bi().await {
                        held.push(streams);
                    }
                }
            }));
            routes.push((id, address));
        }
        router.update(&view(vec![route(1, "1", &routes)]));
        let started = Instant::now();
        let response = router
            .forward(
                "mlp",
                None,
                "POST",
                "/v2/models/mlp/infer",
                &HeaderMap::new(),
                bytes::Bytes::from_static(b"{}"),
            )
            .await;
        let took = started.elapsed();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        // Tokio's timer counts whole milliseconds from its own clock, so the deadline may fire
        // a hair before 400 ms read from `Instant` (399.97 ms was seen in CI).
        assert!(
            took >= Duration::from_millis(395) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(router.attempts.load(Ordering::Relaxed), 1);
        assert_eq!(router.retries.load(Ordering::Relaxed), 0);
        for s in servers {
            s.abort();
        }
    }

    #[test]
    fn model_paths_name_their_model_and_version() {
        assert_eq!(model_of("/v2/models/mlp/infer"), Some(("mlp".into(), None)));
        assert_eq!(model_of("/v2/models/mlp"), Some(("mlp".into(), None)));
        assert_eq!(
            model_of("/v2/models/mlp/versions/2/infer"),
            Some(("mlp".into(), Some("2".into())))
        );
        assert_eq!(model_of("/v2/models/stats"), None);
        assert_eq!(model_of("/v2/health/ready"), None);
        assert_eq!(model_of("/v2/models/"), None);
    }
}
