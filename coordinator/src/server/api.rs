//! The admin API: HTTP + JSON (axum), bearer tokens, served by every coordinator.
//!
//! Reads run on the local replica after a ReadIndex round, so they are linearizable wherever
//! they are served (`?consistency=local` skips the round: fast, possibly stale). Writes become
//! [`Command`]s; a follower forwards them to the leader over the mesh ([`Core::write`]).
//! Every error is `{"error": {"code", "message"}}` with a 4xx or 5xx status; the codes are
//! [`Error::code`] and stable. The route table in [`ROUTES`] is also the OpenAPI document
//! served at `/openapi.json` (a test checks the router answers each of its routes).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Core;
use super::openapi;
use crate::scheduler::Device;
use crate::{Actor, Command, Error, ErrorKind, Outcome, Role, State};

/// An error as it crosses the wire (HTTP body or mesh answer).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl WireError {
    pub fn from_error(e: &Error) -> WireError {
        if let Error::Remote {
            status,
            code,
            message,
        } = e
        {
            return WireError {
                status: *status,
                code: code.clone(),
                message: message.clone(),
            };
        }
        let status = match e.kind() {
            ErrorKind::Unauthenticated => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::Invalid => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::TooLarge => 413,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        };
        WireError {
            status,
            code: e.code().to_string(),
            message: e.to_string(),
        }
    }

    /// Back to an [`Error`] that keeps the status and code (for a forwarded write).
    pub fn into_error(self) -> Error {
        Error::Remote {
            status: self.status,
            code: self.code,
            message: self.message,
        }
    }
}

/// An API error response.
pub struct ApiError(pub WireError);

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        ApiError(WireError::from_error(&e))
    }
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError(WireError {
            status: status.as_u16(),
            code: code.to_string(),
            message: message.into(),
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = json!({"error": {"code": self.0.code, "message": self.0.message}});
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

pub(super) type ApiResult<T = Json<Value>> = std::result::Result<T, ApiError>;
pub(super) type Shared = Arc<Core>;

/// The largest body of every route but a bundle upload: a few JSON fields.
pub const MAX_JSON_BODY: usize = 64 << 10;

/// Routes that anyone may call, without a token.
const PUBLIC: [&str; 3] = ["/healthz", "/metrics", "/openapi.json"];

/// Builds the router over a running coordinator.
pub fn router(core: Shared) -> Router {
    let limit = core.config.max_bundle_bytes as usize;
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { Json(openapi::document()) }))
        .route("/v1/whoami", get(whoami))
        .route("/v1/cluster/status", get(cluster_status))
        .route("/v1/cluster/members", get(cluster_members))
        .route("/v1/cluster/heartbeat-grace", axum::routing::put(set_grace))
        .route("/v1/cluster/overcommit", axum::routing::put(set_overcommit))
        .route(
            "/v1/cluster/coordinators/{id}",
            axum::routing::delete(remove_coordinator),
        )
        .route("/v1/cluster/join-tokens", post(create_join_token))
        // Only uploads may be large; every other route takes at most MAX_JSON_BODY.
        .route(
            "/v1/bundles",
            post(push_bundle).layer(DefaultBodyLimit::max(limit)),
        )
        .route("/v1/bundles/{digest}", get(fetch_bundle))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(show_model))
        .route("/v1/models/{model}/versions/{version}", get(show_version))
        .route(
            "/v1/models/{model}/versions/{version}/{action}",
            post(curate_version),
        )
        .route("/v1/approvals", get(list_approvals).post(request_approval))
        .route("/v1/approvals/{id}", get(show_approval))
        .route("/v1/approvals/{id}/{action}", post(decide_approval))
        .route("/v1/policies", get(list_policies))
        .route(
            "/v1/policies/{environment}",
            get(show_policy).put(set_policy),
        )
        .route(
            "/v1/deployments",
            get(list_deployments).post(create_deployment),
        )
        .route(
            "/v1/deployments/{id}",
            get(show_deployment).delete(delete_deployment),
        )
        .route("/v1/deployments/{id}/scale", post(scale_deployment))
        .route("/v1/deployments/{id}/update", post(update_deployment))
        .route("/v1/deployments/{id}/rollback", post(rollback_deployment))
        .route("/v1/deployments/{id}/canary", post(canary_deployment))
        .route("/v1/deployments/{id}/promote", post(promote_canary))
        .route(
            "/v1/deployments/{id}/autoscale",
            axum::routing::put(set_autoscale).delete(clear_autoscale),
        )
        .route(
            "/v1/deployments/{id}/hot",
            axum::routing::put(mark_hot).delete(mark_hot),
        )
        .route("/v1/deployments/{id}/history", get(deployment_history))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/keys", get(list_keys).post(trust_key))
        .route("/v1/keys/{key}", axum::routing::delete(distrust_key))
        .route("/v1/audit", get(audit))
        .merge(super::node_api::routes())
        .merge(super::console::routes())
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_route",
                "no such route: see /openapi.json",
            )
        })
        .route_layer(middleware::from_fn_with_state(
            core.clone(),
            authenticate_first,
        ))
        .layer(middleware::from_fn_with_state(core.clone(), observe))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .with_state(core)
}

/// Checks the bearer token before a byte of the body is read: an unauthenticated client cannot
/// make the coordinator receive (or buffer) a body. Each handler still checks the role it needs.
async fn authenticate_first(
    AxState(core): AxState<Shared>,
    request: Request,
    next: Next,
) -> Response {
    let public = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .is_some_and(|p| {
            PUBLIC.contains(&p.as_str()) || super::console::PATHS.contains(&p.as_str())
        });
    if !public && let Err(e) = authenticate(&core, request.headers(), Role::Viewer).await {
        return e.into_response();
    }
    // A body announced over the route's cap is refused before it is read.
    let cap = if request.uri().path() == "/v1/bundles" {
        core.config.max_bundle_bytes
    } else {
        MAX_JSON_BODY as u64
    };
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > cap) {
        return ApiError::from(Error::TooLarge { limit: cap }).into_response();
    }
    next.run(request).await
}

/// Records every request's latency by its route template.
async fn observe(AxState(core): AxState<Shared>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let start = Instant::now();
    let response = next.run(request).await;
    core.metrics
        .api_latency
        .with_label_values(&[route.as_str(), method.as_str(), response.status().as_str()])
        .observe(start.elapsed().as_secs_f64());
    response
}

/// Who the token is: its name, role and id (the console shapes its pages by the role).
async fn whoami(AxState(core): AxState<Shared>, headers: HeaderMap) -> ApiResult {
    let actor = authenticate(&core, &headers, Role::Viewer).await?;
    Ok(Json(json!({
        "name": actor.name,
        "role": actor.role,
        "token_id": actor.token_id,
    })))
}

async fn metrics(AxState(core): AxState<Shared>) -> impl IntoResponse {
    let (blobs, bytes) = core.blobs.usage();
    core.metrics.blobs.set(blobs as i64);
    core.metrics.blob_bytes.set(bytes as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        core.metrics.render(),
    )
}

// --- authentication and reads ---

fn bearer(headers: &HeaderMap) -> ApiResult<String> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "missing bearer token: send `Authorization: Bearer <token>`",
            )
        })?
        .to_str()
        .map_err(|_| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "the Authorization header is not text",
            )
        })?;
    value
        .strip_prefix("Bearer ")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "the Authorization header must be `Bearer <token>`",
            )
        })
}

fn check_actor(state: &State, secret: &str, needed: Role) -> Result<Actor, Error> {
    let actor = state
        .authenticate(secret)
        .ok_or_else(|| Error::Unauthenticated {
            reason: "unknown or revoked token".into(),
        })?;
    if !actor.role.allows(needed) {
        return Err(Error::Forbidden {
            action: "this request",
            role: actor.role,
            needed,
        });
    }
    Ok(actor)
}

/// How current a read must be.
#[derive(Deserialize, Default)]
pub(super) struct ReadOptions {
    #[serde(default)]
    consistency: Option<String>,
    /// `/v1/cluster/status` only: add `state_digest`, a SHA-256 of the whole replicated state.
    #[serde(default)]
    digest: bool,
}

impl ReadOptions {
    fn linearizable(&self) -> bool {
        self.consistency.as_deref() != Some("local")
    }
}

/// Authenticates with the role `needed`, then runs `f` on the state, linearizably unless the
/// client asked for a local read.
pub(super) async fn read<T: Serialize + Send + 'static>(
    core: &Core,
    headers: &HeaderMap,
    options: &ReadOptions,
    needed: Role,
    f: impl FnOnce(&State, &Actor) -> Result<T, Error> + Send + 'static,
) -> ApiResult {
    let secret = bearer(headers)?;
    let value = core
        .driver
        .read(options.linearizable(), move |state| {
            let actor = check_actor(state, &secret, needed)?;
            let out = f(state, &actor)?;
            serde_json::to_value(out).map_err(|e| Error::Io {
                what: "encode the answer".into(),
                reason: e.to_string(),
            })
        })
        .await??;
    Ok(Json(value))
}

/// Authenticates (any role: the command's own role is checked when applied), then commits
/// `command` and answers with its outcome.
pub(super) async fn write(
    core: &Core,
    headers: &HeaderMap,
    command: Command,
) -> ApiResult<Outcome> {
    let actor = authenticate(core, headers, command.required_role()).await?;
    let action = command.action();
    let result = core.write(actor.clone(), command).await;
    // What the approval rules refuse is audited too: who tried to run what, and where.
    if let Err(e @ crate::Error::NotApproved { model, version, .. }) = &result {
        let record = Command::RecordRefusal {
            action: action.to_string(),
            target: format!("model {model}@{version}"),
            reason: e.to_string(),
        };
        if let Err(failed) = core.write(actor, record).await {
            tracing::warn!(error = %failed, "could not audit a refusal");
        }
    }
    Ok(result?)
}

pub(super) async fn authenticate(
    core: &Core,
    headers: &HeaderMap,
    needed: Role,
) -> ApiResult<Actor> {
    let secret = bearer(headers)?;
    Ok(core
        .driver
        .read(false, move |state| check_actor(state, &secret, needed))
        .await??)
}

pub(super) fn outcome(outcome: Outcome) -> Json<Value> {
    Json(serde_json::to_value(outcome).unwrap_or(Value::Null))
}

pub(super) fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("the body is not the expected JSON: {e}"),
        )
    })
}

pub(super) fn parse_id(what: &str, s: &str) -> ApiResult<u64> {
    s.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("{what} must be a number, not {s:?}"),
        )
    })
}

// --- cluster ---

async fn cluster_status(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Query(opts): Query<ReadOptions>,
) -> ApiResult {
    let raft = core.driver.status();
    let me = core.config.api_advertise.clone();
    let mesh = core.config.mesh_advertise.clone();
    let fingerprint = core.ca_fingerprint();
    let digest = opts.digest;
    read(&core, &headers, &opts, Role::Viewer, move |state, _| {
        Ok(json!({
            "coordinator": raft.id,
            "api_address": me,
            "mesh_address": mesh,
            "ca_fingerprint": fingerprint,
            "raft": raft,
            "coordinators": state.coordinators().len(),
            "nodes": state.nodes().len(),
            "models": state.models().len(),
            "deployments": state.deployments().len(),
            "placements": state.placements().len(),
            "unplaced": state.unplaced().len(),
            "audit_records": state.audit().len(),
            "heartbeat_grace_ms": state.heartbeat_grace_ms(),
            "memory_overcommit_pct": state.memory_overcommit_pct(),
            // Only with `?digest=true`: hashing the whole state is not free.
            "state_digest": if digest { Some(state.digest()?) } else { None },
        }))
    })
    .await
}

async fn cluster_members(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Query(opts): Query<ReadOptions>,
) -> ApiResult {
    let raft = core.driver.status();
    read(&core, &headers, &opts, Role::Viewer, move |state, _| {
        let coordinators: Vec<Value> = state
            .coordinators()
            .values()
            .map(|c| {
                json!({
                    "id": c.id,
                    "mesh_address": c.address,
                    "api_address": c.api_address,
                    "voter": raft.voters.contains(&c.id),
                    "learner": raft.learners.contains(&c.id),
                    "leader": raft.leader == c.id,
                })
            })
            .collect();
        Ok(json!({
            "coordinators": coordinators,
            "nodes": state.nodes().values().collect::<Vec<_>>(),
        }))
    })
    .await
}

async fn set_grace(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    #[derive(Deserialize)]
    struct GraceBody {
        grace_ms: u64,
    }
    let b: GraceBody = json_body(&body)?;
    let command = Command::SetHeartbeatGrace {
        grace_ms: b.grace_ms,
    };
    Ok(outcome(write(&core, &headers, command).await?))
}

async fn set_overcommit(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct OvercommitBody {
        percent: u32,
    }
    let b: OvercommitBody = json_body(&body)?;
    let command = Command::SetMemoryOvercommit { percent: b.percent };
    Ok(outcome(write(&core, &headers, command).await?))
}

async fn remove_coordinator(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let id = parse_id("coordinator id", &id)?;
    let actor = authenticate(&core, &headers, Role::Admin).await?;
    core.remove_coordinator(actor, id).await?;
    Ok(Json(json!({"removed": id})))
}

/// Mints a join token (admin): single use, expiring after `expires_in_s` (default 1 h); the
/// answer holds the join string, shown once. A join token does nothing on this API.
async fn create_join_token(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    #[derive(Deserialize, Default)]
    struct JoinTokenBody {
        #[serde(default)]
        expires_in_s: Option<u64>,
    }
    let b: JoinTokenBody = if body.is_empty() {
        JoinTokenBody::default()
    } else {
        json_body(&body)?
    };
    let actor = authenticate(&core, &headers, Role::Admin).await?;
    let expires = b
        .expires_in_s
        .map(std::time::Duration::from_secs)
        .unwrap_or(super::admission::DEFAULT_JOIN_TOKEN_TTL);
    let token = core.create_join_token(actor, expires).await?;
    Ok((StatusCode::CREATED, Json(json!(token))))
}

// --- bundles ---

async fn push_bundle(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let actor = authenticate(&core, &headers, Role::Publisher).await?;
    let limit = core.config.max_bundle_bytes;
    let mut writer = core.blobs.writer(limit)?;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let chunk = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Err(e) => {
                core.blobs.discard(&writer.finish()?.tmp);
                // axum's body limit surfaces here as an error on the stream.
                let text = e.to_string();
                if text.contains("length limit") {
                    return Err(Error::TooLarge { limit }.into());
                }
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    format!("the upload broke off: {text}"),
                ));
            }
        };
        if let Err(e) = writer.write(&chunk) {
            core.blobs.discard(&writer.finish()?.tmp);
            return Err(e.into());
        }
        // Not a bundle (bad magic, a broken index, a part that does not match its hash is only
        // known at the end): refuse now rather than take the rest of the upload.
        if let Some(e) = writer.refused() {
            let reason = e.to_string();
            core.blobs.discard(&writer.finish()?.tmp);
            return Err(Error::BadBundle { reason }.into());
        }
    }
    let registered = core.push_bundle(actor, writer).await?;
    let status = if registered["already_on_shelf"] == json!(true) {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(registered)))
}

async fn fetch_bundle(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> ApiResult<Response> {
    authenticate(&core, &headers, Role::Viewer).await?;
    // A bundle on this coordinator's disk is streamed from the file, a chunk at a time.
    if let Some(path) = core.blobs.path(&digest)
        && let Ok(file) = tokio::fs::File::open(&path).await
    {
        let len = file.metadata().await.map(|m| m.len()).ok();
        let chunks = futures_util::stream::unfold(file, |mut file| async move {
            use tokio::io::AsyncReadExt;
            let mut chunk = vec![0u8; 1 << 20];
            match file.read(&mut chunk).await {
                Ok(0) => None,
                Ok(n) => {
                    chunk.truncate(n);
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from(chunk)), file))
                }
                Err(e) => Some((Err(e), file)),
            }
        });
        let mut response = (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            Body::from_stream(chunks),
        )
            .into_response();
        if let Some(len) = len {
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
        }
        return Ok(response);
    }
    let bytes = core.fetch_bundle(&digest).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from(bytes),
    )
        .into_response())
}

// --- shelf ---

async fn list_models(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Query(opts): Query<ReadOptions>,
) -> ApiResult {
    read(&core, &headers, &opts, Role::Viewer, |state, _| {
        Ok(state.models().values().cloned().collect::<Vec<_>>())
    })
    .await
}

async fn show_model(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(model): Path<String>,
    Query(opts): Query<ReadOptions>,
) -> ApiResult {
    read(&core, &headers, &opts, Role::Viewer, move |state, _| {
        state
            .models()
            .get(&model)
            .cloned()
            .ok_or(Error::UnknownModel { model })
    })
    .await
}

async fn show_version(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path((model, version)): Path<(String, String)>,
    Query(opts): Query<ReadOptions>,
) -> ApiResult {
    read(&core, &headers, &opts, Role::Viewer, move |state, _| {
        state.version(&model, &version).cloned()
    })
    .await
}

async fn curate_version(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path((model, version, action)): Path<(String, String, String)>,
    body: axum::body::Bytes,
) -> ApiResult {
    let command = match action.as_str() {
        "shelve" => Command::PutOnShelf { model, version },
        "unshelve" => Command::TakeOffShelf { model, version },
        "deprecate" => Command::Deprecate { model, version },
        "tag" | "untag" => {
            #[derive(Deserialize)]
            struct TagBody {
                tag: String,
            }
            let TagBody { tag } = json_body(&body)?;
            if action == "tag" {
                Command::Tag {
                    model,
                    version,
                    tag,
                }
            } else {
                Command::Untag { model, tag }
            }
        }
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no_route",
                format!("no action {other:?}: use shelve, unshelve, deprecate, tag or untag"),
            ));
        }
    };
    Ok(outcome(write(&core, &headers, command).await?))
}

// --- approvals ---

#[derive(Deserialize)]
struct ApprovalFilter {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    consistency: Option<String>,
}

async fn list_approvals(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Query(filter): Query<ApprovalFilter>,
) -> ApiResult {
    let opts = ReadOptions {
        consistency: filter.consistency,
        digest: false,
    };
    let status = filter.status;
    read(&core, &headers, &opts, Role::Viewer, move |state, _| {
        Ok(state
            .requests()
            .values()
            .filter(|r| status.as_deref().is_none_or(|s| r.status.as_str() == s))
            .cloned()
            .collect::<Vec<_>>())
    })
    .await
}

async fn show_approval(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(opts): Query<ReadOptions>,
) -> ApiResult {
    let id = parse_id("approval request id", &id)?;
    read(&core, &headers, &opts, Role::Viewer, move |state, _| {
        state
            .requests()
            .get(&id)
            .cloned()
            .ok_or(Error::UnknownRequest { id })
    })
    .await
}

#[derive(Deserialize)]
struct ApprovalBody {
    model: String,
    version: String,
    environment: String,
}

async fn request_approval(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let b: ApprovalBody = json_body(&body)?;
    let out = write(
        &core,
        &headers,
        Command::RequestApproval {
            model: b.model,
            version: b.version,
            environment: b.environment,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, outcome(out)))
}

async fn decide_approval(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult {
    let request = parse_id("approval request id", &id)?;
    #[derive(Deserialize, Default)]
    struct DecisionBody {
        #[serde(default)]
        comment: String,
    }
    let comment = if body.is_empty() {
        String::new()
    } else {
        json_body::<DecisionBody>(&body)?.comment
    };
    let command = match action.as_str() {
        "approve" | "reject" => Command::Decide {
            request,
            approve: action == "approve",
            comment,
        },
        "withdraw" => Command::Withdraw { request },
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no_route",
                format!("no action {other:?}: use approve, reject or withdraw"),
            ));
        }
    };
    Ok(outcome(write(&core, &headers, command).await?))
}

// --- policies ---

async fn list_policies(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Query(opts): Query<ReadOptions>,
) -> ApiResult {
    read(&core, &headers, &opts, Role::Viewer, |state, _| {
        Ok(state.policies().values().cloned().collect::<Vec<_>>())
    })
    .await
}

async fn show_policy(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(environment): Path<String>,
    Query(opts): Query<ReadOptions>,
) -> ApiResult {
    read(&core, &headers, &opts, Role::Viewer, move |state, _| {
        state
            .policies()
            .get(&environment)
            .cloned()
            .ok_or(Error::UnknownEnvironment { environment })
    })
    .await
}

#[derive(Deserialize)]
struct PolicyBody {
    required_approvals: u32,
    #[serde(default = "default_approver")]
    approver_role: Role,
}

fn default_approver() -> Role {
    Role::Approver
}

async fn set_policy(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(environment): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let b: PolicyBody = json_body(&body)?;
    let command = Command::SetPolicy {
        environment,
        required_approvals: b.required_approvals,
        approver_role: b.approver_role,
    };
    Ok(outcome(write(&core, &headers, command).await?))
}

// --- deployments ---

async fn list_deployments(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Query(opts): Query<ReadOptions>,
) -> ApiResult {
    read(&core, &headers, &opts, Role::Viewer, |state, _| {
        Ok(state.deployments().values().cloned().collect::<Vec<_>>())
    })
    .await
}

async fn show_deployment(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(opts): Query<ReadOptions>,
) -> ApiResult {
    let id = parse_id("deployment id", &id)?;
    read(&core, &headers, &opts, Role::Viewer, move |state, _| {
        let deployment = state.deployment(id)?.clone();
        let placements: Vec<_> = state
            .placements()
            .iter()
            .filter(|p| p.deployment == id)
            .cloned()
            .collect();
        Ok(json!({"deployment": deployment, "placements": placements}))
    })
    .await
}

#[derive(Deserialize)]
struct DeploymentBody {
    model: String,
    version: String,
    environment: String,
    #[serde(default = "one")]
    replicas: u32,
    #[serde(default)]
    hardware: Option<Vec<Device>>,
    /// Load at once on its nodes and evict last (default: on first request).
    #[serde(default)]
    hot: bool,
    /// Autoscale from the start (the body of `PUT /v1/deployments/{id}/autoscale`).
    #[serde(default)]
    autoscale: Option<AutoscaleBody>,
}

fn one() -> u32 {
    1
}

async fn create_deployment(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let b: DeploymentBody = json_body(&body)?;
    let out = write(
        &core,
        &headers,
        Command::CreateDeployment {
            model: b.model,
            version: b.version,
            environment: b.environment,
            replicas: b.replicas,
            hardware: b.hardware,
            hot: b.hot,
            autoscale: b.autoscale.map(AutoscaleBody::bounds).transpose()?,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, outcome(out)))
}

async fn scale_deployment(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let deployment = parse_id("deployment id", &id)?;
    #[derive(Deserialize)]
    struct ScaleBody {
        replicas: u32,
    }
    let b: ScaleBody = json_body(&body)?;
    let command = Command::ScaleDeployment {
        deployment,
        replicas: b.replicas,
    };
    Ok(outcome(write(&core, &headers, command).await?))
}

async fn update_deployment(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let deployment = parse_id("deployment id", &id)?;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct UpdateBody {
        version: String,
        #[serde(default)]
        max_surge: Option<u32>,
    }
    let b: UpdateBody = json_body(&body)?;
    let command = Command::UpdateDeployment {
        deployment,
        version: b.version,
        max_surge: b.max_surge,
    };
    Ok(outcome(write(&core, &headers, command).await?))
}

async fn canary_deployment(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    use crate::state::canary::{self, CanarySpec, Slo};
    let deployment = parse_id("deployment id", &id)?;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct CanaryBody {
        version: String,
        #[serde(default)]
        steps: Option<Vec<u32>>,
        #[serde(default)]
        interval_ms: Option<u64>,
        /// Like `p99<50ms,errors<1%`.
        #[serde(default)]
        slo: Option<String>,
        #[serde(default)]
        mirror: bool,
        #[serde(default)]
        min_requests: Option<u64>,
        /// How many times slower than the serving revision the canary's median may be.
        #[serde(default)]
        max_slowdown: Option<f64>,
    }
    let b: CanaryBody = json_body(&body)?;
    let slo = Slo::parse(b.slo.as_deref().unwrap_or(canary::DEFAULT_SLO))?;
    let max_slowdown_pct = match b.max_slowdown {
        None => canary::DEFAULT_MAX_SLOWDOWN_PCT,
        Some(f) if f.is_finite() && (1.0..=100.0).contains(&f) => (f * 100.0).round() as u32,
        Some(f) => {
            return Err(crate::error::invalid(
                "max_slowdown",
                f.to_string(),
                "a factor from 1 to 100",
            )
            .into());
        }
    };
    let command = Command::CanaryDeployment {
        deployment,
        version: b.version,
        spec: CanarySpec {
            steps: b.steps.unwrap_or_else(|| canary::DEFAULT_STEPS.to_vec()),
            interval_ms: b.interval_ms.unwrap_or(canary::DEFAULT_INTERVAL_MS),
            slo,
            mirror: b.mirror,
            min_requests: b.min_requests.unwrap_or(canary::DEFAULT_MIN_REQUESTS),
            max_slowdown_pct,
        },
    };
    Ok(outcome(write(&core, &headers, command).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AutoscaleBody {
    min_replicas: u32,
    max_replicas: u32,
    /// Requests in flight per replica to aim at (default 1).
    #[serde(default)]
    target_concurrency: Option<f64>,
    #[serde(default)]
    stable_window_ms: Option<u64>,
    #[serde(default)]
    panic_window_ms: Option<u64>,
    #[serde(default)]
    panic_threshold_pct: Option<u32>,
    #[serde(default)]
    scale_to_zero_after_ms: Option<u64>,
}

impl AutoscaleBody {
    fn bounds(self) -> ApiResult<crate::state::autoscale::Autoscale> {
        use crate::state::autoscale::{self, Autoscale};
        let target = self.target_concurrency.unwrap_or(1.0);
        if !target.is_finite() || target <= 0.0 || target > 10_000.0 {
            return Err(crate::error::invalid(
                "target_concurrency",
                target.to_string(),
                "above 0 and at most 10000 requests in flight per replica",
            )
            .into());
        }
        Ok(Autoscale {
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            target_concurrency_milli: (target * 1000.0).round().max(1.0) as u32,
            stable_window_ms: self
                .stable_window_ms
                .unwrap_or(autoscale::DEFAULT_STABLE_WINDOW_MS),
            panic_window_ms: self
                .panic_window_ms
                .unwrap_or(autoscale::DEFAULT_PANIC_WINDOW_MS),
            panic_threshold_pct: self
                .panic_threshold_pct
                .unwrap_or(autoscale::DEFAULT_PANIC_THRESHOLD_PCT),
            scale_to_zero_after_ms: self.scale_to_zero_after_ms,
        })
    }
}

async fn set_autoscale(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let deployment = parse_id("deployment id", &id)?;
    let b: AutoscaleBody = json_body(&body)?;
    let a = b.bounds()?;
    let command = Command::SetAutoscale {
        deployment,
        autoscale: Some(a),
    };
    Ok(outcome(write(&core, &headers, command).await?))
}

/// `PUT` marks a deployment hot, `DELETE` cold.
async fn mark_hot(
    AxState(core): AxState<Shared>,
    method: axum::http::Method,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let deployment = parse_id("deployment id", &id)?;
    let hot = method == axum::http::Method::PUT;
    let command = Command::SetDeploymentHot { deployment, hot };
    Ok(outcome(write(&core, &headers, command).await?))
}

async fn clear_autoscale(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let deployment = parse_id("deployment id", &id)?;
    let command = Command::SetAutoscale {
        deployment,
        autoscale: None,
    };
    Ok(outcome(write(&core, &headers, command).await?))
}

async fn promote_canary(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let deployment = parse_id("deployment id", &id)?;
    Ok(outcome(
        write(&core, &headers, Command::PromoteCanary { deployment }).await?,
    ))
}

async fn rollback_deployment(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let deployment = parse_id("deployment id", &id)?;
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct RollbackBody {
        #[serde(default)]
        to: Option<u32>,
    }
    let b: RollbackBody = if body.is_empty() {
        RollbackBody::default()
    } else {
        json_body(&body)?
    };
    let command = Command::RollbackDeployment {
        deployment,
        to: b.to,
    };
    Ok(outcome(write(&core, &headers, command).await?))
}

async fn deployment_history(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(opts): Query<ReadOptions>,
) -> ApiResult {
    let id = parse_id("deployment id", &id)?;
    read(&core, &headers, &opts, Role::Viewer, move |state, _| {
        let d = state.deployment(id)?;
        Ok(
            json!({"deployment": id, "revision": d.revision, "update": d.update,
                  "history": d.history}),
        )
    })
    .await
}

async fn delete_deployment(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let deployment = parse_id("deployment id", &id)?;
    Ok(outcome(
        write(&core, &headers, Command::DeleteDeployment { deployment }).await?,
    ))
}

// --- tokens and keys ---

async fn list_tokens(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Query(opts): Query<ReadOptions>,
) -> ApiResult {
    read(&core, &headers, &opts, Role::Admin, |state, _| {
        Ok(state
            .tokens()
            .values()
            .map(|t| {
                json!({"id": t.id, "name": t.name, "role": t.role, "created_by": t.created_by,
                       "created_at_ms": t.created_at_ms, "revoked_at_ms": t.revoked_at_ms})
            })
            .collect::<Vec<_>>())
    })
    .await
}

#[derive(Deserialize)]
struct TokenBody {
    name: String,
    role: Role,
}

async fn create_token(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let b: TokenBody = json_body(&body)?;
    let (id, secret) = super::new_token();
    let command = Command::CreateToken {
        id: id.clone(),
        name: b.name.clone(),
        role: b.role,
        secret_hash: crate::hash_secret(&secret),
    };
    write(&core, &headers, command).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "name": b.name, "role": b.role, "secret": secret})),
    ))
}

async fn revoke_token(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    Ok(outcome(
        write(&core, &headers, Command::RevokeToken { id }).await?,
    ))
}

async fn list_keys(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Query(opts): Query<ReadOptions>,
) -> ApiResult {
    read(&core, &headers, &opts, Role::Viewer, |state, _| {
        Ok(state.trusted_keys().values().cloned().collect::<Vec<_>>())
    })
    .await
}

async fn trust_key(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    #[derive(Deserialize)]
    struct KeyBody {
        key: String,
        name: String,
    }
    let b: KeyBody = json_body(&body)?;
    let out = write(
        &core,
        &headers,
        Command::TrustKey {
            key: b.key,
            name: b.name,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, outcome(out)))
}

async fn distrust_key(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> ApiResult {
    Ok(outcome(
        write(&core, &headers, Command::DistrustKey { key }).await?,
    ))
}

// --- audit ---

#[derive(Deserialize)]
struct AuditQuery {
    /// Records with `seq` ≥ this.
    #[serde(default)]
    from: u64,
    #[serde(default = "default_limit")]
    limit: usize,
    #[serde(default)]
    consistency: Option<String>,
}

fn default_limit() -> usize {
    100
}

async fn audit(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> ApiResult {
    let opts = ReadOptions {
        consistency: q.consistency,
        digest: false,
    };
    let (from, limit) = (q.from, q.limit.min(10_000));
    read(&core, &headers, &opts, Role::Viewer, move |state, _| {
        let records = state.audit();
        let start = (from as usize).min(records.len());
        let end = start.saturating_add(limit).min(records.len());
        Ok(json!({"total": records.len(), "records": &records[start..end]}))
    })
    .await
}

/// Reads a whole small body (for mesh handlers and tests).
pub async fn body_bytes(body: Body) -> Vec<u8> {
    body.collect()
        .await
        .map(|c| c.to_bytes().to_vec())
        .unwrap_or_default()
}
