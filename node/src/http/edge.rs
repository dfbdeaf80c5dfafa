//! What every HTTP request passes through: on a mesh node, routing to a node with a ready
//! replica (and mirroring to a canary), the response compressed when asked, and a large one
//! counted in the node's bytes in flight until the client has taken it.

use super::body::read_body;
use super::infer::run_infer;
use super::{ApiError, ApiState, Shared, observed};
use crate::coding;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// What every request passes through: routing through the mesh, and the response compressed
/// when the request's `Accept-Encoding` asks for it.
pub(super) async fn edge(
    state: Shared,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::body::HttpBody as _;
    let accept = coding::response_coding(request.headers().get(header::ACCEPT_ENCODING));
    // Inference answers count in flight; the node's own (metrics, statistics) stay answerable on
    // a node at its limit.
    let counting = request
        .uri()
        .path()
        .ends_with("/infer")
        .then(|| state.0.clone());
    let mut response = route_through_mesh(state, request, next).await;
    let compressible = !response.headers().contains_key(header::CONTENT_ENCODING)
        && response
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n >= COMPRESS_FROM);
    if !compressible {
        return counted(counting.as_ref(), response);
    }
    // Whether this answer comes compressed depends on the request's Accept-Encoding, so a cache
    // must key on it, whichever way this one went.
    response
        .headers_mut()
        .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    let response = match accept {
        Some(coding) => compressed(response, coding).await,
        None => response,
    };
    counted(counting.as_ref(), response)
}

/// Answers this large count in the node's bytes in flight until the client has taken them; a
/// smaller one fits in the socket's buffers.
const COUNT_FROM: u64 = crate::grpc::answers::SMALL as u64;

/// An inference answer, its body counted in the node's bytes in flight until the client has
/// taken it (see [`crate::grpc::answers`]): a client that reads none of its answer holds it in
/// the node until the write deadline closes its connection, and without the count a client on
/// many connections could hold many large answers at once. A body of known size (every answer
/// here, forwarded ones too) is counted whole now, and one with no room is a 503 instead, as a
/// request with none is; one of unknown size would be counted as it comes, and cut off when a
/// part of 64 KiB or more finds no room.
fn counted(state: Option<&Arc<ApiState>>, response: Response) -> Response {
    use axum::body::HttpBody as _;
    let Some(state) = state else {
        return response;
    };
    let prepaid = match response.body().size_hint().exact() {
        Some(n) if n < COUNT_FROM => return response,
        Some(n) => match usize::try_from(n) {
            Ok(n) if crate::grpc::inflate::acquire(state, n) => n,
            _ => return super::body::shed(state, n as usize).0.into_response(),
        },
        None => 0,
    };
    response.map(|body| {
        Body::new(crate::grpc::answers::Answer::http(
            state.clone(),
            body,
            prepaid,
        ))
    })
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
pub(super) struct PinnedVersion(pub(super) String);
