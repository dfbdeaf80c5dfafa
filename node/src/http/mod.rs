//! The KServe V2 / Open Inference Protocol HTTP API, with Triton's binary tensor data, model
//! configuration, statistics and model repository extensions, and Prometheus `/metrics`.
//!
//! Every error is `{"error": "..."}`: 400 for a bad request, 404 for an unknown model or version,
//! 413 for a body over the cap, 429 when a model's queue is full, 503 when not ready, 504 when a
//! model runs past its deadline, 500 only for a failure inside the model or the node.
//!
//! - this module: settings, shared state, errors, the routes and the metadata, health,
//!   configuration, statistics, repository and metrics handlers;
//! - [`edge`]: what every request passes through (routing through the mesh, compression);
//! - [`body`]: reading request bodies within the node's limits;
//! - [`infer`]: the inference route, and the one path every protocol takes after decoding.

mod body;
mod edge;
mod infer;

use body::read_body;
use edge::edge;
pub(crate) use edge::mirror;
use infer::infer;
pub(crate) use infer::{Answer, execute, observed};

use crate::repository::{LoadedModel, RepoError, Repository};
use crate::runtime::InvokeError;
use crate::v2::V2Error;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Settings of the HTTP API.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Bytes of request bodies and of answers waiting for their clients the whole node holds at
    /// once; past it, new requests get 503 (and answers with no room are refused) instead of the
    /// node running out of memory.
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
    /// Bytes of request bodies and answers held now, counted against `config.max_inflight_bytes`.
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
        (self.status, Json(json!({"error": clipped(self.message)}))).into_response()
    }
}

/// The most bytes of an error message sent back: messages name what the client sent (a model, a
/// tensor, a shape), and a client that sends a 2 MiB name must not get it back, nor break its own
/// gRPC client's header limit with it (gRPC sends the message as a header).
pub(crate) const MESSAGE_LIMIT: usize = 1024;

/// An error message cut to [`MESSAGE_LIMIT`] bytes: its start and its end (where the advice
/// is), and how much was left out between them.
pub(crate) fn clipped(message: String) -> String {
    if message.len() <= MESSAGE_LIMIT {
        return message;
    }
    let head = message.floor_char_boundary(MESSAGE_LIMIT * 3 / 4);
    let tail = message.floor_char_boundary(message.len() - MESSAGE_LIMIT / 5);
    format!(
        "{} … ({} bytes left out) … {}",
        &message[..head],
        tail - head,
        &message[tail..]
    )
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

/// A failed request: the error, and its outcome label for the metrics.
pub(crate) type Outcome = (ApiError, &'static str);

fn bad(e: impl Into<ApiError>) -> Outcome {
    (e.into(), "bad_request")
}

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
        "platform": triton_platform(&m).0,
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

/// What a load that asks for a changed configuration or other files is told: Triton's load takes
/// a `config` to use instead of the model's and `file:` contents to load instead of its files,
/// and a node loads a bundle only as its publisher signed it.
pub(crate) fn no_load_overrides<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let keys: Vec<&str> = keys.into_iter().collect();
    (!keys.is_empty()).then(|| {
        format!(
            "load parameters {keys:?} are not taken: a node loads a model's bundle as its \
             publisher signed it; to change its configuration or files, pack and publish a new \
             version"
        )
    })
}

async fn repository_load(
    State(state): Shared,
    Path(model): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    if !body.iter().all(u8::is_ascii_whitespace) {
        let request: Value = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("malformed body: {e}; send {{}} or no body"),
            )
        })?;
        let keys = request
            .get("parameters")
            .and_then(Value::as_object)
            .map(|p| p.keys().map(String::as_str).collect::<Vec<_>>())
            .unwrap_or_default();
        if let Some(refused) = no_load_overrides(keys) {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, refused));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_keep_their_start_and_end() {
        assert_eq!(clipped("short".into()), "short");
        let name = "é".repeat(1 << 20);
        let message = format!("unknown model `{name}`: see the index");
        let cut = clipped(message.clone());
        assert!(cut.len() <= MESSAGE_LIMIT + 64, "{}", cut.len());
        assert!(cut.starts_with("unknown model `éé"), "{cut}");
        assert!(cut.ends_with("éé`: see the index"), "{cut}");
        let kept = cut.len() - " … ( bytes left out) … ".len();
        let digits = (message.len() - kept).to_string().len();
        let left_out = message.len() - (kept - digits);
        assert!(
            cut.contains(&format!("({left_out} bytes left out)")),
            "{cut}"
        );
    }
}
