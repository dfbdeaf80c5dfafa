//! The KServe V2 / Open Inference Protocol HTTP API, with Triton's binary tensor data, model
//! configuration, statistics and model repository extensions, and Prometheus `/metrics`.
//!
//! Every error is `{"error": "..."}`: 400 for a bad request, 404 for an unknown model or version,
//! 413 for a body over the cap, 429 when a model's queue is full, 503 when not ready, 504 when a
//! model runs past its deadline, 500 only for a failure inside the model or the node.

use crate::coding;
use crate::convert;
use crate::repository::{LoadedModel, RepoError, Repository};
use crate::runtime::InvokeError;
use crate::v2::{self, V2Error};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Settings of the HTTP API.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Bytes of request bodies the whole node holds at once; past it, new requests get 503
    /// instead of the node running out of memory.
    pub max_inflight_bytes: usize,
    /// How long a request's whole body may take to arrive after its head (408 past it); also
    /// how long a response may wait on a client that takes none of it (the connection is
    /// closed past it).
    pub body_timeout: std::time::Duration,
    /// How long a connection may take to send a request's head, counted from when the server
    /// starts waiting for it: also how long a kept-alive connection may stay idle.
    pub header_timeout: std::time::Duration,
    /// Connections served at once; past it, new ones wait in the listen backlog until one
    /// closes, so that slow or idle clients cannot take all of the process's file descriptors.
    pub max_connections: usize,
    /// Connections one client (an IPv4 address, an IPv6 /64) may hold at once; past it, its new
    /// ones are refused with the reason (no cap of its own at or above `max_connections`).
    pub max_connections_per_client: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 64 << 20,
            max_inflight_bytes: 1 << 30,
            body_timeout: std::time::Duration::from_secs(60),
            header_timeout: std::time::Duration::from_secs(30),
            max_connections: crate::serve::default_max_connections(),
            max_connections_per_client: crate::serve::default_max_connections_per_client(
                crate::serve::default_max_connections(),
            ),
        }
    }
}

/// What every handler shares.
pub struct ApiState {
    pub repo: Arc<Repository>,
    pub config: HttpConfig,
    /// False before start-up finished and once shutdown began.
    pub ready: AtomicBool,
    /// Bytes of request bodies held now, counted against `config.max_inflight_bytes`.
    pub inflight_bytes: tokio::sync::Semaphore,
    /// A mesh node's router: requests for models without a ready replica here go elsewhere.
    pub mesh: std::sync::OnceLock<Arc<crate::mesh::router::Router>>,
    /// The connections HTTP and gRPC may hold at once, `config.max_connections` in all.
    pub connections: crate::serve::Slots,
}

impl ApiState {
    /// The state of a node's API, not ready until the server runs.
    pub fn new(repo: Arc<Repository>, config: HttpConfig) -> ApiState {
        let permits = config
            .max_inflight_bytes
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        let metrics = repo.metrics();
        let connections =
            crate::serve::Slots::new(config.max_connections, config.max_connections_per_client)
                .reporting(
                    metrics.connections_open.clone(),
                    metrics.connections_refused.clone(),
                )
                .opening(config.header_timeout);
        ApiState {
            repo,
            config,
            ready: AtomicBool::new(false),
            inflight_bytes: tokio::sync::Semaphore::new(permits),
            mesh: std::sync::OnceLock::new(),
            connections,
        }
    }
}

/// An API error: a status and a message, sent as `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.message}))).into_response()
    }
}

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> ApiError {
        let status = match &e {
            RepoError::UnknownModel { .. } | RepoError::UnknownVersion { .. } => {
                StatusCode::NOT_FOUND
            }
            RepoError::NotReady { .. } => StatusCode::SERVICE_UNAVAILABLE,
            RepoError::Bundle(_) | RepoError::Load { .. } => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<V2Error> for ApiError {
    fn from(e: V2Error) -> ApiError {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError::new(status, e.to_string())
    }
}

impl From<&InvokeError> for ApiError {
    fn from(e: &InvokeError) -> ApiError {
        let status = match e {
            InvokeError::InvalidInput { .. } => StatusCode::BAD_REQUEST,
            InvokeError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            InvokeError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;
type Shared = State<Arc<ApiState>>;

/// The node's HTTP routes.
pub fn router(state: Arc<ApiState>) -> Router {
    // Every model endpoint exists with and without `/versions/{version}`.
    let per_model: [(&str, MethodRouter<Arc<ApiState>>); 5] = [
        ("", get(model_metadata)),
        ("/ready", get(model_ready)),
        ("/config", get(model_config)),
        ("/stats", get(model_stats)),
        ("/infer", post(infer)),
    ];
    let mut routes = Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/stats", get(all_stats));
    for (suffix, handler) in per_model {
        routes = routes
            .route(&format!("/v2/models/{{model}}{suffix}"), handler.clone())
            .route(
                &format!("/v2/models/{{model}}/versions/{{version}}{suffix}"),
                handler,
            );
    }
    routes
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(repository_load))
        .route(
            "/v2/repository/models/{model}/unload",
            post(repository_unload),
        )
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(state.clone(), edge))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such endpoint; see GET /v2 and /v2/models/{model}",
            )
        })
        .with_state(state)
}

/// What every request passes through: routing through the mesh, and the response compressed
/// when the request's `Accept-Encoding` asks for it.
async fn edge(
    state: Shared,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::body::HttpBody as _;
    let accept = coding::response_coding(request.headers().get(header::ACCEPT_ENCODING));
    let mut response = route_through_mesh(state, request, next).await;
    let compressible = !response.headers().contains_key(header::CONTENT_ENCODING)
        && response
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n >= COMPRESS_FROM);
    if !compressible {
        return response;
    }
    // Whether this answer comes compressed depends on the request's Accept-Encoding, so a cache
    // must key on it, whichever way this one went.
    response
        .headers_mut()
        .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    match accept {
        Some(coding) => compressed(response, coding).await,
        None => response,
    }
}

/// Responses shorter than this go as they are: compressing them saves next to nothing.
const COMPRESS_FROM: u64 = 256;

/// `response` (whole in memory, at least [`COMPRESS_FROM`] bytes, not encoded yet), its body
/// compressed into `coding`.
async fn compressed(response: Response, coding: coding::Coding) -> Response {
    let (mut parts, body) = response.into_parts();
    // The body is in memory already (its size is exact): collecting it does not wait.
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the response could not be compressed",
        )
        .into_response();
    };
    let body = coding::deflate(coding, &body).await;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(coding.name()),
    );
    Response::from_parts(parts, Body::from(body))
}

/// On a mesh node, a request for a model with no ready replica here goes to a node that has
/// one (see [`crate::mesh::router`]); a request forwarded here is always served here.
async fn route_through_mesh(
    State(state): Shared,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use crate::mesh::router::{FORWARDED, model_of};
    let Some(router) = state.mesh.get() else {
        return next.run(request).await;
    };
    if request.headers().contains_key(FORWARDED) {
        return next.run(request).await;
    }
    let Some((model, mut version)) = model_of(request.uri().path()) else {
        return next.run(request).await;
    };
    // An inference request for an autoscaled deployment with no ready replica (at zero, or
    // activating) waits here until one is ready.
    if request.uri().path().ends_with("/infer")
        && state.repo.lookup(&model, version.as_deref()).is_err()
        && let Some(dormant) = router.dormant(&model, version.as_deref())
        && let Err(refused) = router.activate(dormant, &model).await
    {
        return refused;
    }
    // An inference request that names no version goes to a version the mesh chooses for the
    // model (`Router::version_for`: during a rolling update, either revision in proportion to
    // their ready replicas), pinned here so that a node it is forwarded to cannot choose again.
    let mut pinned = false;
    if version.is_none()
        && request.uri().path().ends_with("/infer")
        && let Some(v) = router.version_for(&model)
    {
        request.extensions_mut().insert(PinnedVersion(v.clone()));
        version = Some(v);
        pinned = true;
    }
    let local = state.repo.lookup(&model, version.as_deref()).is_ok()
        || router.reload_evicted(&model, version.as_deref()).await;
    let shadow = if pinned {
        router.mirror_for(&model)
    } else {
        None
    };
    if shadow.is_none() && (local || !router.knows(&model, version.as_deref())) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    // A forwarded or mirrored body counts against this node's bytes in flight too, until it is
    // answered. It is inflated here, once: what goes on carries no coding.
    let (bytes, _held) = match read_body(&state, &parts.headers, body).await {
        Ok(read) => read,
        Err((e, _)) => return e.into_response(),
    };
    if parts.headers.remove(header::CONTENT_ENCODING).is_some() {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let path_to = |v: &str| {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        path.replacen(
            &format!("/v2/models/{model}/"),
            &format!("/v2/models/{model}/versions/{v}/"),
            1,
        )
    };
    // A mirrored canary gets a copy of the request, and its answer is dropped.
    if let Some(shadow) = shadow {
        mirror(
            state.clone(),
            router.clone(),
            model.clone(),
            path_to(&shadow),
            shadow,
            parts.headers.clone(),
            bytes.clone(),
        );
    }
    if local || !router.knows(&model, version.as_deref()) {
        let request = axum::extract::Request::from_parts(parts, Body::from(bytes));
        return next.run(request).await;
    }
    let path = match (&version, pinned) {
        (Some(v), true) => path_to(v),
        _ => parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
    };
    router
        .forward(
            &model,
            version.as_deref(),
            parts.method.as_str(),
            &path,
            &parts.headers,
            bytes,
        )
        .await
}

/// Send a copy of a request to `version` of `model` (a mirrored canary), here if it is loaded
/// here, else through the mesh; the answer is dropped, and only the canary's performance
/// reports count it.
pub(crate) fn mirror(
    state: Arc<ApiState>,
    router: Arc<crate::mesh::router::Router>,
    model: String,
    path: String,
    version: String,
    headers: HeaderMap,
    bytes: bytes::Bytes,
) {
    tokio::spawn(async move {
        match state.repo.lookup(&model, Some(&version)) {
            Ok(m) => {
                let _ = observed(&m, run_infer(&state, &m, &headers, Body::from(bytes))).await;
            }
            Err(_) => {
                let _ = router
                    .forward(&model, Some(&version), "POST", &path, &headers, bytes)
                    .await;
            }
        }
    });
}

/// The version the mesh chose for a request that named none (see `route_through_mesh`).
#[derive(Clone)]
struct PinnedVersion(String);

pub(crate) fn lookup(state: &ApiState, p: &HashMap<String, String>) -> ApiResult<Arc<LoadedModel>> {
    let name = p.get("model").map(String::as_str).unwrap_or_default();
    Ok(state
        .repo
        .lookup(name, p.get("version").map(String::as_str))?)
}

/// The protocol extensions the node serves (`GET /v2`, gRPC `ServerMetadata`).
pub(crate) const EXTENSIONS: [&str; 5] = [
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "statistics",
    "model_repository",
];

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "sophon",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": EXTENSIONS,
    }))
}

async fn live() -> Json<Value> {
    Json(json!({"live": true}))
}

/// Ready: serving, and on a mesh node, holding a view of the mesh (so it can route).
/// Serving, and on a mesh node, holding a view of the mesh (so it can route).
pub(crate) fn is_ready(state: &ApiState) -> bool {
    let routes = state.mesh.get().is_none_or(|router| router.has_view());
    state.ready.load(Ordering::Acquire) && routes
}

async fn ready(State(state): Shared) -> Response {
    if is_ready(&state) {
        Json(json!({"ready": true})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false})),
        )
            .into_response()
    }
}

fn spec_json(specs: &[sophon_sdk::TensorSpec]) -> Vec<Value> {
    specs
        .iter()
        .map(|s| json!({"name": s.name, "datatype": s.datatype.as_str(), "shape": s.shape}))
        .collect()
}

async fn model_metadata(
    State(state): Shared,
    Path(p): Path<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let m = lookup(&state, &p)?;
    Ok(Json(json!({
        "name": m.name,
        "versions": state.repo.versions(&m.name),
        "platform": "sophon_wasm",
        "inputs": spec_json(m.inputs()),
        "outputs": spec_json(m.outputs()),
    })))
}

async fn model_ready(
    State(state): Shared,
    Path(p): Path<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let m = lookup(&state, &p)?;
    Ok(Json(json!({"name": m.name, "ready": true})))
}

async fn model_config(
    State(state): Shared,
    Path(p): Path<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let m = lookup(&state, &p)?;
    Ok(Json(config_json(&m)))
}

/// Triton's `platform` and `backend` names for what runs the model's (first) graph.
pub(crate) fn triton_platform(m: &LoadedModel) -> (&'static str, &'static str) {
    match m.graphs.first().map(|g| g.backend) {
        Some(sophon_sdk::Backend::Ort) => ("onnxruntime_onnx", "onnxruntime"),
        Some(sophon_sdk::Backend::Openvino) => ("openvino", "openvino"),
        Some(sophon_sdk::Backend::Tract | sophon_sdk::Backend::TractCuda) => {
            ("tract_onnx", "tract")
        }
        None => ("sophon_wasm", "wasm"),
    }
}

/// A model's configuration as Triton writes it (`/config`; gRPC's `ModelConfig` from it).
pub(crate) fn config_json(m: &LoadedModel) -> Value {
    let batch = m.manifest.resources.max_batch_size;
    let tensors = |specs: &[sophon_sdk::TensorSpec]| -> Vec<Value> {
        specs
            .iter()
            .map(|s| {
                let dims = if batch > 0 && !s.shape.is_empty() {
                    &s.shape[1..]
                } else {
                    &s.shape[..]
                };
                let mut t = json!({"name": s.name, "data_type": s.datatype.triton_config_name(), "dims": dims});
                if let Some(file) = m.manifest.labels.get(&s.name) {
                    t["label_filename"] = json!(file);
                }
                t
            })
            .collect()
    };
    let mut parameters = serde_json::Map::new();
    parameters.insert("sophon_digest".into(), json!({"string_value": m.digest}));
    for graph in &m.graphs {
        parameters.insert(
            format!("sophon_graph_{}", graph.name),
            json!({"string_value": graph.how}),
        );
    }
    let (platform, backend) = triton_platform(m);
    parameters.insert("sophon_component".into(), json!({"string_value": "wasm"}));
    let kind = match m.device() {
        sophon_sdk::Device::Cpu => "KIND_CPU",
        sophon_sdk::Device::Gpu => "KIND_GPU",
        // Triton has no kind for NPUs; KIND_MODEL means the model places itself.
        sophon_sdk::Device::Npu => "KIND_MODEL",
    };
    let mut config = json!({
        "name": m.name,
        "platform": platform,
        "backend": backend,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": batch,
        "input": tensors(m.inputs()),
        "output": tensors(m.outputs()),
        "instance_group": [{"name": m.name, "kind": kind, "count": m.concurrency}],
        "parameters": parameters,
    });
    if let Some(b) = &m.batcher {
        let s = b.settings();
        config["dynamic_batching"] = json!({
            "preferred_batch_size": s.preferred,
            "max_queue_delay_microseconds": s.delay.as_micros() as u64,
        });
        // Triton's max_batch_size is also the batcher's limit.
        config["parameters"]["sophon_batch_limit"] = json!({"string_value": s.limit.to_string()});
    }
    config
}

async fn model_stats(
    State(state): Shared,
    Path(p): Path<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let name = p.get("model").map(String::as_str).unwrap_or_default();
    let models: Vec<Arc<LoadedModel>> = match p.get("version") {
        Some(_) => vec![lookup(&state, &p)?],
        None => {
            let versions: Vec<_> = state
                .repo
                .loaded()
                .into_iter()
                .filter(|m| m.name == name)
                .collect();
            if versions.is_empty() {
                // Unknown (404) or not loaded (503).
                state.repo.lookup(name, None)?;
            }
            versions
        }
    };
    Ok(Json(
        json!({"model_stats": models.iter().map(|m| m.stats.json(&m.name, &m.version)).collect::<Vec<_>>()}),
    ))
}

async fn all_stats(State(state): Shared) -> Json<Value> {
    let stats: Vec<Value> = state
        .repo
        .loaded()
        .iter()
        .map(|m| m.stats.json(&m.name, &m.version))
        .collect();
    Json(json!({"model_stats": stats}))
}

async fn repository_index(
    State(state): Shared,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    // Through `read_body`, as every body: its deadline and the in-flight cap hold here too.
    let (body, _held) = read_body(&state, &headers, body)
        .await
        .map_err(|(e, _)| e)?;
    let ready_only = if body.is_empty() {
        false
    } else {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed body: {e}")))?;
        v.get("ready").and_then(Value::as_bool).unwrap_or(false)
    };
    let entries: Vec<_> = state
        .repo
        .index()
        .into_iter()
        .filter(|e| !ready_only || e.state == "READY")
        .collect();
    Ok(Json(json!(entries)))
}

async fn repository_load(State(state): Shared, Path(model): Path<String>) -> ApiResult<Response> {
    let repo = state.repo.clone();
    tokio::task::spawn_blocking(move || repo.load(&model))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("load task failed: {e}"),
            )
        })??;
    Ok(StatusCode::OK.into_response())
}

async fn repository_unload(State(state): Shared, Path(model): Path<String>) -> ApiResult<Response> {
    state.repo.unload(&model)?;
    Ok(StatusCode::OK.into_response())
}

async fn metrics(State(state): Shared) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.repo.metrics().render(),
    )
        .into_response()
}

/// Decrements the in-flight gauges when a request ends, however it ends.
struct InFlight<'a>(&'a LoadedModel, &'a prometheus::IntGauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.metrics.inflight.dec();
        self.1.dec();
    }
}

async fn infer(
    State(state): Shared,
    Path(mut p): Path<HashMap<String, String>>,
    pinned: Option<axum::Extension<PinnedVersion>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if let Some(axum::Extension(PinnedVersion(v))) = pinned {
        p.entry("version".into()).or_insert(v);
    }
    let model = lookup(&state, &p)?;
    observed(&model, run_infer(&state, &model, &headers, body)).await
}

/// Run one inference request of `model` (HTTP or gRPC), counting it in the model's metrics,
/// statistics and performance window by its outcome.
pub(crate) async fn observed<T>(
    model: &LoadedModel,
    request: impl std::future::Future<Output = Result<T, Outcome>>,
) -> Result<T, ApiError> {
    let started = Instant::now();
    let result = request.await;
    let outcome = match &result {
        Ok(_) => "success",
        Err((_, outcome)) => outcome,
    };
    model.metrics.outcome(outcome);
    let elapsed = started.elapsed();
    model.metrics.total.observe(elapsed.as_secs_f64());
    match result {
        Ok(response) => {
            model.stats.success.record(elapsed);
            model.perf.done(elapsed, true);
            Ok(response)
        }
        Err((e, _)) => {
            model.stats.fail.record(elapsed);
            model.perf.done(elapsed, false);
            Err(e)
        }
    }
}

/// A failed request: the error, and its outcome label for the metrics.
pub(crate) type Outcome = (ApiError, &'static str);

fn too_large(state: &ApiState) -> Outcome {
    (
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is over the limit of {} bytes",
                state.config.max_body_bytes
            ),
        ),
        "bad_request",
    )
}

fn shed(state: &ApiState, held: usize) -> Outcome {
    (
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the node is holding its limit of {} bytes of requests in flight \
                 (this one needs over {held}); retry later",
                state.config.max_inflight_bytes
            ),
        ),
        "overloaded",
    )
}

/// `n` more bytes of the node's bytes in flight, or the answer that sheds the request.
fn take_inflight(state: &ApiState, n: usize) -> Result<tokio::sync::SemaphorePermit<'_>, Outcome> {
    let n32 = u32::try_from(n).map_err(|_| too_large(state))?;
    state
        .inflight_bytes
        .try_acquire_many(n32)
        .map_err(|_| shed(state, n))
}

/// Reads a request body frame by frame into `put`, within the body limit, the node's bytes in
/// flight (held by the permit returned, with the body's size) and the body's deadline.
async fn read_frames<'a>(
    state: &'a ApiState,
    mut body: Body,
    mut put: impl FnMut(bytes::Bytes),
) -> Result<(usize, tokio::sync::SemaphorePermit<'a>), Outcome> {
    use axum::body::HttpBody as _;
    use http_body_util::BodyExt;
    let limit = state.config.max_body_bytes;
    if body.size_hint().exact().is_some_and(|n| n as usize > limit) {
        return Err(too_large(state));
    }
    // The cap is taken as the bytes arrive, not as announced: a client that announces a large
    // body and sends nothing holds nothing, and the whole body has a deadline.
    let mut held = take_inflight(state, 0)?;
    let deadline = tokio::time::Instant::now() + state.config.body_timeout;
    let mut size = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => {
                return Err((
                    ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "the request body did not arrive within {} s",
                            state.config.body_timeout.as_secs_f64()
                        ),
                    ),
                    "bad_request",
                ));
            }
        };
        let frame = frame.map_err(|e| {
            (
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("request body could not be read: {e}"),
                ),
                "bad_request",
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        size += data.len();
        if size > limit {
            return Err(too_large(state));
        }
        held.merge(take_inflight(state, data.len())?);
        put(data);
    }
    Ok((size, held))
}

/// Room in `buf` for `incoming` more bytes of `expected`: up to what was announced, but never
/// more than 1 MiB, or than has arrived, ahead of the bytes (an announcement holds nothing).
fn make_room(buf: &mut Vec<u8>, expected: usize, incoming: usize) {
    let need = buf.len() + incoming;
    if need > buf.capacity() {
        let target = expected.max(need).min(need + need.max(1 << 20));
        buf.reserve_exact(target - buf.len());
    }
}

/// A binary request's body (`Inference-Header-Content-Length: header_len`, no content coding)
/// read straight into its JSON part and its binary part, each a buffer of its own: one copy of
/// each byte, where joining the chunks and then copying each tensor out of the joined body made
/// two (a tensor that is all of the binary part takes that buffer; see
/// `v2::decode_request_split`).
async fn read_split<'a>(
    state: &'a ApiState,
    body: Body,
    header_len: usize,
) -> Result<(Vec<u8>, Vec<u8>, tokio::sync::SemaphorePermit<'a>), Outcome> {
    use axum::body::HttpBody as _;
    let announced = body.size_hint().exact().map_or(0, |n| n as usize);
    let mut json = Vec::new();
    let mut binary = Vec::new();
    let (size, held) = read_frames(state, body, |data| {
        let head = header_len.saturating_sub(json.len()).min(data.len());
        make_room(&mut json, header_len, head);
        json.extend_from_slice(&data[..head]);
        if head < data.len() {
            let rest = &data[head..];
            make_room(
                &mut binary,
                announced.saturating_sub(header_len),
                rest.len(),
            );
            binary.extend_from_slice(rest);
        }
    })
    .await?;
    if size < header_len {
        return Err(bad(v2::V2Error::BinaryData(format!(
            "{} is {header_len} but the body has only {size} bytes: send the length of the \
             JSON part",
            v2::HEADER_CONTENT_LENGTH
        ))));
    }
    Ok((json, binary, held))
}

/// Read a request body, holding its bytes against the node-wide in-flight cap while the
/// request lives: a node under a flood of large bodies sheds with 503 instead of running out of
/// memory. The cap is taken chunk by chunk, so a body costs what it has sent, whatever it
/// announced; a body that does not arrive within `body_timeout` gets 408.
///
/// A body sent with a `Content-Encoding` (gzip, deflate) is inflated here, and what it
/// inflates to counts against the same limit and cap (see [`crate::coding`]).
async fn read_body<'a>(
    state: &'a ApiState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(bytes::Bytes, tokio::sync::SemaphorePermit<'a>), Outcome> {
    use axum::body::HttpBody as _;
    let coding = coding::request_coding(headers.get(header::CONTENT_ENCODING)).map_err(|e| {
        (
            ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, e.to_string()),
            "bad_request",
        )
    })?;
    let limit = state.config.max_body_bytes;
    let announced = body.size_hint().exact().map(|n| n as usize);
    // A body that arrives in one chunk is kept as it came, without a copy.
    let mut whole: Option<bytes::Bytes> = None;
    let mut parts: Option<bytes::BytesMut> = None;
    let mut size = 0usize;
    let (_, mut held) = read_frames(state, body, |data| {
        size += data.len();
        if let Some(parts) = parts.as_mut() {
            parts.extend_from_slice(&data);
        } else if let Some(first) = whole.take() {
            // Room for what was announced, up to 1 MiB ahead; past that it grows as it arrives.
            let room = announced.map_or(size, |n| n.min(size.max(1 << 20)));
            let mut joined = bytes::BytesMut::with_capacity(room.max(size));
            joined.extend_from_slice(&first);
            joined.extend_from_slice(&data);
            parts = Some(joined);
        } else {
            whole = Some(data);
        }
    })
    .await?;
    let bytes = match (parts, whole) {
        (Some(parts), _) => parts.freeze(),
        (None, Some(whole)) => whole,
        (None, None) => bytes::Bytes::new(),
    };
    let Some(coding) = coding else {
        return Ok((bytes, held));
    };
    // The compressed bytes stay counted until the request ends, beside what they inflate to.
    let mut inflated_held = 0usize;
    let inflated = coding::inflate(coding, &bytes, limit, |n| match take_inflight(state, n) {
        Ok(more) => {
            held.merge(more);
            inflated_held += n;
            true
        }
        Err(_) => false,
    })
    .await
    .map_err(|e| match e {
        coding::InflateError::NoRoom => shed(state, size + inflated_held),
        coding::InflateError::TooLarge { .. } => (
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
            "bad_request",
        ),
        _ => (
            ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
            "bad_request",
        ),
    })?;
    Ok((inflated, held))
}

fn bad(e: impl Into<ApiError>) -> Outcome {
    (e.into(), "bad_request")
}

async fn run_infer(
    state: &ApiState,
    model: &LoadedModel,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Outcome> {
    let header_len = match headers.get(v2::HEADER_CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    bad(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("{} must be a byte count", v2::HEADER_CONTENT_LENGTH),
                    ))
                })?,
        ),
    };
    // The body's bytes stay counted in flight until the answer, held by `_held`.
    let (request, _held) = match header_len {
        // Binary tensor data, as it came: read into its parts, decoded without a second copy.
        Some(n) if !headers.contains_key(header::CONTENT_ENCODING) => {
            let (json, binary, held) = read_split(state, body, n).await?;
            (v2::decode_request_split(&json, binary).map_err(bad)?, held)
        }
        _ => {
            let (bytes, held) = read_body(state, headers, body).await?;
            (v2::decode_request(&bytes, header_len).map_err(bad)?, held)
        }
    };
    let answer = execute(state, model, request).await?;
    let binary = |name: &str| {
        answer
            .wants
            .iter()
            .find(|(n, _)| n == name)
            .map_or(answer.binary_default, |(_, b)| *b)
    };
    let encoded = v2::encode_response(
        &model.name,
        Some(&model.version),
        answer.id.as_ref(),
        &answer.outputs,
        binary,
    )
    .map_err(|e| {
        let outcome = if e.status() == 400 {
            "bad_request"
        } else {
            "error"
        };
        (ApiError::from(e), outcome)
    })?;
    answer.record(model);

    let mut response = Response::new(Body::from(encoded.body));
    let headers = response.headers_mut();
    match encoded.header_len {
        Some(n) => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(v2::HEADER_CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    Ok(response)
}

/// The largest output (bytes) classified on the worker; larger ones hand the worker off.
const CLASSIFY_ON_WORKER: usize = 256 << 10;

/// A request's answer, before it is encoded for its protocol.
pub(crate) struct Answer {
    /// The outputs asked for, in the manifest's datatypes.
    pub outputs: Vec<v2::Tensor>,
    pub id: Option<Value>,
    /// Each output, and whether the request asked for it in binary (HTTP).
    wants: Vec<(String, bool)>,
    binary_default: bool,
    times: crate::runtime::CallTimes,
    output_started: Instant,
    /// The rows this request inferred.
    rows: u64,
    /// The batch size of the model call this request reports (`None`: a batch-mate reports it).
    execution: Option<u64>,
}

impl Answer {
    /// Record the request's compute phases, once its answer is encoded. The three are recorded
    /// together so that their counts always agree (perf_analyzer refuses statistics where they
    /// do not).
    pub(crate) fn record(&self, model: &LoadedModel) {
        model.stats.answered(
            self.times.instantiate,
            self.times.call,
            self.output_started.elapsed(),
            self.rows,
            self.execution,
        );
    }
}

/// Validate a decoded request against the model, admit it, run it in the sandbox, and return
/// its outputs: the one path every protocol takes after decoding.
pub(crate) async fn execute(
    state: &ApiState,
    model: &LoadedModel,
    request: v2::InferRequest,
) -> Result<Answer, Outcome> {
    v2::validate_inputs(&request.inputs, model.inputs()).map_err(bad)?;
    v2::validate_batch(&request.inputs, model.manifest.resources.max_batch_size).map_err(bad)?;
    v2::select_outputs(&request.outputs, model.outputs()).map_err(bad)?;

    let all_inflight = &state.repo.metrics().inflight;
    model.metrics.inflight.inc();
    all_inflight.inc();
    let _inflight = InFlight(model, all_inflight);
    let overloaded = |queued: usize| {
        (
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "model `{}` is overloaded: {queued} requests are already queued; retry later",
                    model.name
                ),
            ),
            "overloaded",
        )
    };

    let rows = if model.manifest.resources.max_batch_size > 0 {
        request
            .inputs
            .first()
            .and_then(|t| t.shape.first().copied())
            .unwrap_or(1)
    } else {
        1
    };
    let id = request.id.clone();
    let wants: Vec<(String, bool)> = model
        .outputs()
        .iter()
        .map(|o| (o.name.clone(), request.wants_binary(&o.name)))
        .collect();
    let selected = request
        .outputs
        .iter()
        .map(|o| o.name.clone())
        .collect::<Vec<_>>();
    let classes: Vec<(String, u32)> = request
        .outputs
        .iter()
        .filter_map(|o| Some((o.name.clone(), o.classification?)))
        .collect();
    let binary_default = request.binary_data_output;
    let inputs: Vec<_> = request.inputs.into_iter().map(convert::to_guest).collect();

    let batching = model
        .batcher
        .as_ref()
        .and_then(|b| crate::batcher::joinable(&inputs, b.settings().limit).map(|rows| (b, rows)));
    // With nothing queued to join and a slot free, a batching model's request has no
    // batch-mates to wait for when there is no delay, or when another slot is free beside its
    // own (the batcher would not wait then either): it runs at once, as a lone batch would.
    let free_now = match &batching {
        Some((b, _)) if b.queued() == 0 => model
            .admission
            .try_enter()
            .filter(|_| b.settings().delay.is_zero() || model.admission.free() > 0),
        _ => None,
    };
    let (result, queue, execution) = match (batching, free_now) {
        (Some((batcher, rows)), None) => {
            let queued = batcher.queued();
            if queued >= model.admission.max_queue() {
                return Err(overloaded(queued));
            }
            let done = batcher.submit(inputs, rows).await;
            (done.result, done.queue, done.executed)
        }
        (_, free_now) => {
            let queued_at = Instant::now();
            let _permit = match free_now {
                Some(permit) => permit,
                None => model
                    .admission
                    .enter()
                    .await
                    .map_err(|o| overloaded(o.queued))?,
            };
            let queue = queued_at.elapsed();
            // A lone request of a quick model that imports nothing but wasi-nn runs on the
            // worker (see `handoff`), and leaves its instance's teardown, and the making of the
            // next request's, until its answer is out. Under load there is no idle moment to
            // move them to, so they stay in the call, which hands the worker off.
            let alone = all_inflight.get() <= 1 && model.model.wasi_free();
            let defer = alone && model.pace.quick();
            let (answered, _) = crate::handoff::run(&model.pace, alone, |upkeep| {
                crate::backend::catch_panic("the model call", || {
                    let (result, spent) = model.model.answer(inputs);
                    *upkeep += spent.made();
                    if defer {
                        return (result, Some(spent));
                    }
                    // Not deferred: the instance is dropped here, inside the call.
                    *upkeep += spent.tear_down();
                    (result, None)
                })
            });
            let result = match answered {
                Ok((result, spent)) => {
                    if let Some(spent) = spent {
                        let next = model.model.clone();
                        crate::handoff::after_answer(model.pace.clone(), move || next.tidy(spent));
                    }
                    result
                }
                Err(panicked) => Err(InvokeError::Failed {
                    model: model.name.clone(),
                    message: panicked,
                }),
            };
            (result, queue, Some(rows))
        }
    };
    model.stats.queue.record(queue);
    model.perf.queue(queue);
    model.metrics.queue.observe(queue.as_secs_f64());
    let (outputs, times) = result.map_err(|e| {
        let outcome = match e {
            InvokeError::InvalidInput { .. } => "bad_request",
            InvokeError::Timeout { .. } => "timeout",
            InvokeError::MemoryExceeded { .. } => "memory",
            InvokeError::Trap { .. } => "trap",
            InvokeError::Busy { .. } => "overloaded",
            _ => "error",
        };
        tracing::warn!(model = %model.name, "inference failed: {e}");
        (ApiError::from(&e), outcome)
    })?;
    model.perf.compute(times.call);
    model
        .metrics
        .compute
        .observe((times.instantiate + times.call).as_secs_f64());

    let output_started = Instant::now();
    let mut response_outputs = Vec::with_capacity(outputs.len());
    for t in outputs {
        let mut t = convert::from_guest(t);
        if !selected.is_empty() && !selected.contains(&t.name) {
            continue;
        }
        t.datatype = model
            .declared_output_type(&t.name, t.datatype)
            .map_err(|m| (ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m), "error"))?;
        if let Some((_, k)) = classes.iter().find(|(name, _)| *name == t.name) {
            let batched = model.manifest.resources.max_batch_size > 0;
            let labels = model.labels(&t.name);
            let classify = || v2::classify::classify(&t, *k as usize, batched, labels);
            // Ranking a large output (a mask, a vocabulary's logits) takes milliseconds.
            t = if t.data.len() > CLASSIFY_ON_WORKER {
                crate::handoff::long(classify)
            } else {
                classify()
            }
            .map_err(bad)?;
        }
        response_outputs.push(t);
    }
    Ok(Answer {
        outputs: response_outputs,
        id,
        wants,
        binary_default,
        times,
        output_started,
        rows,
        execution,
    })
}
