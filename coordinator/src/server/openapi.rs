//! The admin API's OpenAPI 3.1 document, built from one route table ([`ROUTES`]); a test checks
//! that the router answers every route in it.

use serde_json::{Map, Value, json};

/// One operation: method, path (OpenAPI template), lowest role (`None`: no token), summary,
/// request body schema (a name under `components/schemas`), and success status.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub role: Option<&'static str>,
    pub summary: &'static str,
    pub body: Option<&'static str>,
    pub status: u16,
}

const fn r(
    method: &'static str,
    path: &'static str,
    role: Option<&'static str>,
    summary: &'static str,
    body: Option<&'static str>,
    status: u16,
) -> Route {
    Route {
        method,
        path,
        role,
        summary,
        body,
        status,
    }
}

const V: Option<&str> = Some("viewer");
const P: Option<&str> = Some("publisher");
const A: Option<&str> = Some("approver");
const O: Option<&str> = Some("operator");
const ADM: Option<&str> = Some("admin");

/// Every route the admin API serves.
pub const ROUTES: &[Route] = &[
    r("get", "/healthz", None, "Liveness", None, 200),
    r(
        "get",
        "/metrics",
        None,
        "Prometheus metrics (Raft term, commit and applied index, proposals, API latency)",
        None,
        200,
    ),
    r("get", "/openapi.json", None, "This document", None, 200),
    r(
        "get",
        "/v1/cluster/status",
        V,
        "This coordinator's Raft status and the cluster's counts",
        None,
        200,
    ),
    r(
        "get",
        "/v1/cluster/members",
        V,
        "Coordinators and nodes",
        None,
        200,
    ),
    r(
        "delete",
        "/v1/cluster/coordinators/{id}",
        ADM,
        "Remove a coordinator from the Raft membership and the cluster",
        None,
        200,
    ),
    r(
        "post",
        "/v1/cluster/join-tokens",
        ADM,
        "Make a join token for a new coordinator: single use, expires (default 1 h); it can do \
         nothing but join",
        Some("JoinToken"),
        201,
    ),
    r(
        "put",
        "/v1/cluster/heartbeat-grace",
        ADM,
        "How long a node may stay silent before it is marked down",
        Some("Grace"),
        200,
    ),
    r(
        "put",
        "/v1/cluster/overcommit",
        ADM,
        "How much host memory the scheduler may promise each node, in percent (nodes evict past their model memory)",
        Some("Overcommit"),
        200,
    ),
    r(
        "post",
        "/v1/bundles",
        P,
        "Push a signed bundle (the raw bytes as the body): verified, stored on a quorum, then registered on the shelf",
        Some("Bundle"),
        201,
    ),
    r(
        "get",
        "/v1/bundles/{digest}",
        V,
        "Fetch a bundle by digest",
        None,
        200,
    ),
    r(
        "get",
        "/v1/models",
        V,
        "The shelf: models and their versions",
        None,
        200,
    ),
    r("get", "/v1/models/{model}", V, "One model", None, 200),
    r(
        "get",
        "/v1/models/{model}/versions/{version}",
        V,
        "One version",
        None,
        200,
    ),
    r(
        "post",
        "/v1/models/{model}/versions/{version}/{action}",
        P,
        "Curate a version: action is shelve, unshelve, deprecate, tag or untag (tag/untag take {\"tag\"})",
        Some("Tag"),
        200,
    ),
    r(
        "get",
        "/v1/approvals",
        V,
        "Approval requests (?status=open|approved|rejected|withdrawn)",
        None,
        200,
    ),
    r(
        "post",
        "/v1/approvals",
        P,
        "Ask for approval of a version in an environment",
        Some("ApprovalRequest"),
        201,
    ),
    r(
        "get",
        "/v1/approvals/{id}",
        V,
        "One approval request with its decisions",
        None,
        200,
    ),
    r(
        "post",
        "/v1/approvals/{id}/{action}",
        A,
        "Decide (action approve or reject, with an optional comment) or withdraw (the submitter)",
        Some("Decision"),
        200,
    ),
    r(
        "get",
        "/v1/policies",
        V,
        "Approval policies by environment",
        None,
        200,
    ),
    r(
        "get",
        "/v1/policies/{environment}",
        V,
        "One environment's policy",
        None,
        200,
    ),
    r(
        "put",
        "/v1/policies/{environment}",
        ADM,
        "Set an environment's policy",
        Some("Policy"),
        200,
    ),
    r(
        "get",
        "/v1/deployments",
        V,
        "Deployments with their rollout status",
        None,
        200,
    ),
    r(
        "post",
        "/v1/deployments",
        O,
        "Deploy a version to an environment (refused unless approved where the policy requires it)",
        Some("Deployment"),
        201,
    ),
    r(
        "get",
        "/v1/deployments/{id}",
        V,
        "One deployment and its placements",
        None,
        200,
    ),
    r(
        "delete",
        "/v1/deployments/{id}",
        O,
        "Delete a deployment",
        None,
        200,
    ),
    r(
        "post",
        "/v1/deployments/{id}/scale",
        O,
        "Change a deployment's replica count",
        Some("Scale"),
        200,
    ),
    r(
        "post",
        "/v1/deployments/{id}/update",
        O,
        "Rolling update to another version (refused unless approved where the policy requires it)",
        Some("Update"),
        200,
    ),
    r(
        "post",
        "/v1/deployments/{id}/rollback",
        O,
        "Abandon a running update, or roll out an earlier revision again",
        Some("Rollback"),
        200,
    ),
    r(
        "post",
        "/v1/deployments/{id}/canary",
        O,
        "Start a canary: steps of traffic weight, each judged against the SLO and the serving revision",
        Some("Canary"),
        200,
    ),
    r(
        "post",
        "/v1/deployments/{id}/promote",
        O,
        "Promote a running canary now",
        None,
        200,
    ),
    r(
        "put",
        "/v1/deployments/{id}/autoscale",
        O,
        "Autoscale a deployment between bounds, to a target concurrency per replica (scale to zero with min 0)",
        Some("Autoscale"),
        200,
    ),
    r(
        "delete",
        "/v1/deployments/{id}/autoscale",
        O,
        "Stop autoscaling a deployment (its replica count stays)",
        None,
        200,
    ),
    r(
        "get",
        "/v1/deployments/{id}/series",
        V,
        "The last hour of a deployment's rate, errors, p50, p99 and replicas, sampled every 5 s on the leader",
        None,
        200,
    ),
    r(
        "get",
        "/v1/cluster/series",
        V,
        "The last hour of the cluster's request and error rates, sampled every 5 s on the leader",
        None,
        200,
    ),
    r(
        "get",
        "/v1/whoami",
        V,
        "The token's name, role and id",
        None,
        200,
    ),
    r(
        "put",
        "/v1/deployments/{id}/hot",
        O,
        "Mark a deployment hot: its nodes load it at once and evict it last",
        None,
        200,
    ),
    r(
        "delete",
        "/v1/deployments/{id}/hot",
        O,
        "Mark a deployment cold: its nodes load it on its first request and evict it first",
        None,
        200,
    ),
    r(
        "get",
        "/v1/deployments/{id}/history",
        V,
        "A deployment's revisions and its running update",
        None,
        200,
    ),
    r(
        "get",
        "/v1/tokens",
        ADM,
        "Tokens (never their secrets)",
        None,
        200,
    ),
    r(
        "post",
        "/v1/tokens",
        ADM,
        "Create a token; its secret is in this answer only",
        Some("Token"),
        201,
    ),
    r(
        "delete",
        "/v1/tokens/{id}",
        V,
        "Revoke a token (admins any, holders their own)",
        None,
        200,
    ),
    r("get", "/v1/keys", V, "Trusted publisher keys", None, 200),
    r(
        "post",
        "/v1/keys",
        ADM,
        "Trust a publisher key",
        Some("Key"),
        201,
    ),
    r(
        "delete",
        "/v1/keys/{key}",
        ADM,
        "Stop trusting a publisher key",
        None,
        200,
    ),
    r(
        "get",
        "/v1/audit",
        V,
        "The audit log (?from=SEQ&limit=N)",
        None,
        200,
    ),
];

fn schemas() -> Value {
    let s = |props: Value, required: &[&str]| json!({"type": "object", "properties": props, "required": required});
    json!({
        "Error": s(json!({"error": {"type": "object", "properties": {
            "code": {"type": "string", "description": "stable, machine-readable"},
            "message": {"type": "string"}}, "required": ["code", "message"]}}), &["error"]),
        "Bundle": {"type": "string", "format": "binary"},
        "Tag": s(json!({"tag": {"type": "string"}}), &[]),
        "ApprovalRequest": s(json!({"model": {"type": "string"}, "version": {"type": "string"},
            "environment": {"type": "string"}}), &["model", "version", "environment"]),
        "Decision": s(json!({"comment": {"type": "string"}}), &[]),
        "Policy": s(json!({"required_approvals": {"type": "integer", "minimum": 0},
            "approver_role": {"$ref": "#/components/schemas/Role"}}), &["required_approvals"]),
        "Deployment": s(json!({"model": {"type": "string"}, "version": {"type": "string"},
            "environment": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0},
            "hardware": {"type": "array", "items": {"enum": ["cpu", "gpu", "npu"]}},
            "hot": {"type": "boolean", "default": false,
                "description": "nodes load it at once and evict it last (default: on first request)"},
            "autoscale": {"$ref": "#/components/schemas/Autoscale"}}),
            &["model", "version", "environment"]),
        "Grace": s(json!({"grace_ms": {"type": "integer", "minimum": 1}}), &["grace_ms"]),
        "Overcommit": s(json!({"percent": {"type": "integer", "minimum": 100, "maximum": 10000}}),
            &["percent"]),
        "JoinToken": s(json!({"expires_in_s": {"type": "integer", "minimum": 1,
            "maximum": 604800, "default": 3600}}), &[]),
        "Scale": s(json!({"replicas": {"type": "integer", "minimum": 0}}), &["replicas"]),
        "Update": s(json!({"version": {"type": "string"},
            "max_surge": {"type": "integer", "minimum": 1}}), &["version"]),
        "Rollback": s(json!({"to": {"type": "integer", "minimum": 1}}), &[]),
        "Autoscale": s(json!({"min_replicas": {"type": "integer", "minimum": 0},
            "max_replicas": {"type": "integer", "minimum": 1},
            "target_concurrency": {"type": "number", "exclusiveMinimum": 0},
            "stable_window_ms": {"type": "integer", "minimum": 1000},
            "panic_window_ms": {"type": "integer", "minimum": 1},
            "panic_threshold_pct": {"type": "integer", "minimum": 110},
            "scale_to_zero_after_ms": {"type": "integer", "minimum": 1000}}),
            &["min_replicas", "max_replicas"]),
        "Canary": s(json!({"version": {"type": "string"},
            "steps": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 100}},
            "interval_ms": {"type": "integer", "minimum": 1000},
            "slo": {"type": "string", "example": "p99<50ms,errors<1%"},
            "mirror": {"type": "boolean"},
            "min_requests": {"type": "integer", "minimum": 1},
            "max_slowdown": {"type": "number", "minimum": 1}}), &["version"]),
        "Token": s(json!({"name": {"type": "string"}, "role": {"$ref": "#/components/schemas/Role"}}),
            &["name", "role"]),
        "Key": s(json!({"key": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "name": {"type": "string"}}), &["key", "name"]),
        "Role": {"enum": ["viewer", "publisher", "approver", "operator", "admin"]},
    })
}

/// The OpenAPI document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({
            "summary": route.summary,
            "parameters": params,
            "responses": {
                route.status.to_string(): {"description": "success"},
                "4XX": {"description": "a client error", "content": {"application/json":
                    {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "5XX": {"description": "unavailable (no leader) or a fault", "content": {"application/json":
                    {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        });
        match route.role {
            Some(role) => {
                op["security"] = json!([{"bearer": []}]);
                op["x-sophon-role"] = json!(role);
            }
            None => op["security"] = json!([]),
        }
        if let Some(body) = route.body {
            let media = if body == "Bundle" {
                "application/octet-stream"
            } else {
                "application/json"
            };
            op["requestBody"] = json!({"required": !matches!(body, "Tag" | "Decision" | "JoinToken"),
                "content": {media: {"schema": {"$ref": format!("#/components/schemas/{body}")}}}});
        }
        let entry = paths
            .entry(route.path.to_string())
            .or_insert_with(|| json!({}));
        entry[route.method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Sophon coordinator admin API", "version": env!("CARGO_PKG_VERSION"),
            "description": "Every coordinator serves it; followers forward writes to the leader. \
                Reads are linearizable unless ?consistency=local."},
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    })
}
