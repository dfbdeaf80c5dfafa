//! The admin API's node routes: list, show, drain, resume, remove, and node join tokens.
//!
//! Committed facts (health, draining, placements) come from the replicated state. What only the
//! leader knows (when each node was last heard from, its load, its latest performance report)
//! is added when this coordinator leads; a follower answers without it (`"live": null`).

use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::{ApiResult, ReadOptions, Shared, authenticate, json_body, outcome, read, write};
use super::nodes::load_of;
use super::perf::StatsQuery;
use crate::state::tokens::MAX_JOIN_TOKEN_MS;
use crate::{Command, Error, Role};

/// A node join token lives 1 hour unless asked otherwise.
pub const DEFAULT_NODE_TOKEN_TTL: Duration = Duration::from_secs(3600);

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/join-tokens", post(create_node_join_token))
        .route("/v1/nodes/{id}", get(show_node).delete(remove_node))
        .route("/v1/nodes/{id}/{action}", post(node_action))
        .route("/v1/nodes/{id}/stats", get(node_stats))
        .route("/v1/deployments/{id}/stats", get(deployment_stats))
        .route("/v1/deployments/{id}/series", get(deployment_series))
        .route("/v1/cluster/series", get(cluster_series))
}

/// What the leader alone knows about each node, as JSON (`None` on a follower).
fn live(core: &Shared) -> Option<serde_json::Map<String, Value>> {
    let liveness = core.nodes.liveness.lock();
    if !liveness.leads() {
        return None;
    }
    let now = Instant::now();
    Some(
        liveness
            .all_seen()
            .iter()
            .map(|(id, seen)| {
                (
                    id.clone(),
                    json!({
                        "last_heard_ms_ago": now.saturating_duration_since(seen.at).as_millis() as u64,
                        "load": load_of(&seen.load),
                        "queued": seen.load.queued,
                    }),
                )
            })
            .collect(),
    )
}

async fn list_nodes(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Query(opts): Query<ReadOptions>,
) -> ApiResult {
    let live = live(&core);
    read(&core, &headers, &opts, Role::Viewer, move |state, _| {
        let nodes: Vec<Value> = state
            .nodes()
            .values()
            .map(|n| {
                let mut v = json!(n);
                v["live"] = live
                    .as_ref()
                    .map(|l| l.get(&n.id).cloned().unwrap_or(Value::Null))
                    .unwrap_or(Value::Null);
                v
            })
            .collect();
        Ok(json!({"nodes": nodes}))
    })
    .await
}

async fn show_node(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(opts): Query<ReadOptions>,
) -> ApiResult {
    let live = live(&core);
    read(&core, &headers, &opts, Role::Viewer, move |state, _| {
        let node = state
            .nodes()
            .get(&id)
            .ok_or_else(|| Error::UnknownNode { id: id.clone() })?;
        let replicas: Vec<Value> = state
            .placements()
            .iter()
            .filter(|p| p.node == id)
            .map(|p| {
                let d = state.deployments().get(&p.deployment);
                json!({
                    "deployment": p.deployment,
                    "replica": p.replica,
                    "model": d.map(|d| d.model.clone()),
                    "version": d.map(|d| d.version.clone()),
                    "environment": d.map(|d| d.environment.clone()),
                    "device": p.device,
                    "phase": p.phase,
                    "reason": p.reason,
                })
            })
            .collect();
        let mut v = json!({"node": node, "replicas": replicas});
        v["live"] = live
            .as_ref()
            .and_then(|l| l.get(&id).cloned())
            .unwrap_or(Value::Null);
        Ok(v)
    })
    .await
}

async fn deployment_stats(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    authenticate(&core, &headers, Role::Viewer).await?;
    let id = super::api::parse_id("deployment id", &id)?;
    Ok(Json(core.stats(StatsQuery::Deployment(id)).await?))
}

/// The last hour of a deployment's figures, sampled every 5 s on the leader.
async fn deployment_series(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    authenticate(&core, &headers, Role::Viewer).await?;
    let id = super::api::parse_id("deployment id", &id)?;
    Ok(Json(core.stats(StatsQuery::Series(Some(id))).await?))
}

/// The last hour of the cluster's request and error rates.
async fn cluster_series(AxState(core): AxState<Shared>, headers: HeaderMap) -> ApiResult {
    authenticate(&core, &headers, Role::Viewer).await?;
    Ok(Json(core.stats(StatsQuery::Series(None)).await?))
}

async fn node_stats(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    authenticate(&core, &headers, Role::Viewer).await?;
    Ok(Json(core.stats(StatsQuery::Node(id)).await?))
}

async fn node_action(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult {
    let command = match action.as_str() {
        "drain" => Command::DrainNode { node: id },
        "resume" => Command::ResumeNode { node: id },
        other => {
            return Err(super::api::ApiError(super::api::WireError {
                status: 404,
                code: "no_route".into(),
                message: format!("no node action `{other}`: use drain or resume"),
            }));
        }
    };
    Ok(outcome(write(&core, &headers, command).await?))
}

async fn remove_node(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    Ok(outcome(
        write(&core, &headers, Command::LeaveNode { node: id }).await?,
    ))
}

#[derive(Deserialize, Default)]
struct NodeTokenBody {
    #[serde(default)]
    expires_in_s: Option<u64>,
    #[serde(default)]
    uses: Option<u32>,
}

async fn create_node_join_token(
    AxState(core): AxState<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let b: NodeTokenBody = if body.is_empty() {
        NodeTokenBody::default()
    } else {
        json_body(&body)?
    };
    let actor = authenticate(&core, &headers, Role::Operator).await?;
    let expires_ms = b
        .expires_in_s
        .map(|s| s.saturating_mul(1000))
        .unwrap_or(DEFAULT_NODE_TOKEN_TTL.as_millis() as u64)
        .min(MAX_JOIN_TOKEN_MS.saturating_add(1));
    let uses = b.uses.unwrap_or(1);
    let (id, secret) = super::new_token();
    core.write(
        actor,
        Command::CreateLimitedToken {
            id: id.clone(),
            name: "node-join".into(),
            role: Role::NodeJoin,
            secret_hash: crate::hash_secret(&secret),
            expires_in_ms: Some(expires_ms),
            uses: Some(uses),
        },
    )
    .await?;
    let token_id = id.clone();
    let expires_at_ms = core
        .driver
        .read(true, move |s| {
            s.tokens().get(&token_id).and_then(|t| t.expires_at_ms)
        })
        .await?
        .unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": id,
            "join_token": super::join_string(
                &core.ca_fingerprint(),
                &secret,
                &core.config.mesh_advertise,
            ),
            "expires_at_ms": expires_at_ms,
            "uses": uses,
        })),
    ))
}
