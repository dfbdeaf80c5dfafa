//! The admin API through its router (no socket), over a real single-member coordinator: Raft
//! driver, redb log, artifact store. Bad input gets a 4xx JSON error and changes nothing; the
//! approval rules hold; pushed bundles are verified, stored and served.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt as _;

use super::api::{body_bytes, router};
use super::openapi::ROUTES;
use super::{CoordinatorConfig, Running, init, start};

struct Fixture {
    _dir: tempfile::TempDir,
    running: Running,
    admin: String,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("c1");
    let admin = init(&data, "127.0.0.1:1", "127.0.0.1:2").unwrap_or_else(|e| panic!("{e}"));
    let any = "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"));
    let mut config = CoordinatorConfig::new(&data, any, any);
    config.driver.tick = Duration::from_millis(10);
    config.max_bundle_bytes = 2 << 20;
    let running = start(config).await.unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..500 {
        if running.core.driver.status().is_leader {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(running.core.driver.status().is_leader);
    Fixture {
        _dir: dir,
        running,
        admin,
    }
}

impl Fixture {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Body,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(body).unwrap_or_else(|e| panic!("{e}"));
        let resp = router(self.running.core.clone())
            .oneshot(req)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let status = resp.status();
        let bytes = body_bytes(resp.into_body()).await;
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    async fn json(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Value,
    ) -> (StatusCode, Value) {
        self.call(method, path, Some(token), Body::from(body.to_string()))
            .await
    }

    async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call("GET", path, Some(token), Body::empty()).await
    }

    /// A token with `role`, named `name`; returns its secret.
    async fn token(&self, name: &str, role: &str) -> String {
        let (s, v) = self
            .json(
                "POST",
                "/v1/tokens",
                &self.admin,
                json!({"name": name, "role": role}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["secret"].as_str().unwrap_or_default().to_string()
    }

    /// The replicated state, serialized: to check that a refusal changed nothing.
    async fn state(&self) -> String {
        self.running
            .core
            .driver
            .read(true, |s| serde_json::to_string(s).unwrap_or_default())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn trust(&self, key: &sophon_sdk::SigningKey) {
        let hex = sophon_sdk::keys::public_key_hex(&key.verifying_key());
        let (s, v) = self
            .json(
                "POST",
                "/v1/keys",
                &self.admin,
                json!({"key": hex, "name": "pub"}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }

    async fn push(&self, token: &str, bytes: Vec<u8>) -> (StatusCode, Value) {
        self.call("POST", "/v1/bundles", Some(token), Body::from(bytes))
            .await
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("(no code)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let f = fixture().await;
    let viewer = f.token("vera", "viewer").await;
    let revoked = f.token("rex", "admin").await;
    let (s, _) = f
        .call("DELETE", "/v1/tokens/none", Some(&f.admin), Body::empty())
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let tokens = f.get("/v1/tokens", &f.admin).await.1;
    let rex = tokens
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "rex"))
        .map(|t| t["id"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    let (s, v) = f
        .call(
            "DELETE",
            &format!("/v1/tokens/{rex}"),
            Some(&f.admin),
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    let key = sophon_sdk::keys::generate();
    let good = sophon_sdk::ready::mlp_bundle("fraud", &key).unwrap_or_else(|e| panic!("{e}"));
    let mut tampered = good.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 1;
    let before = f.state().await;

    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Body, StatusCode, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "GET",
            "/v1/models",
            None,
            Body::empty(),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
        ),
        (
            "GET",
            "/v1/models",
            Some("sph_wrong"),
            Body::empty(),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
        ),
        (
            "GET",
            "/v1/models",
            Some(&revoked),
            Body::empty(),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
        ),
        (
            "PUT",
            "/v1/policies/prod",
            Some(&viewer),
            Body::from(r#"{"required_approvals":1}"#),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            "PUT",
            "/v1/policies/prod",
            Some(&f.admin),
            Body::from("{not json"),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "PUT",
            "/v1/policies/prod",
            Some(&f.admin),
            Body::from(r#"{"required_approvals":"two"}"#),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "PUT",
            "/v1/policies/bad%20name",
            Some(&f.admin),
            Body::from(r#"{"required_approvals":1}"#),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "GET",
            "/v1/models/nope",
            Some(&viewer),
            Body::empty(),
            StatusCode::NOT_FOUND,
            "unknown_model",
        ),
        (
            "GET",
            "/v1/approvals/999",
            Some(&viewer),
            Body::empty(),
            StatusCode::NOT_FOUND,
            "unknown_request",
        ),
        (
            "GET",
            "/v1/approvals/abc",
            Some(&viewer),
            Body::empty(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "POST",
            "/v1/deployments/999/scale",
            Some(&f.admin),
            Body::from(r#"{"replicas":2}"#),
            StatusCode::NOT_FOUND,
            "unknown_deployment",
        ),
        (
            "POST",
            "/v1/approvals/999/approve",
            Some(&f.admin),
            Body::from("{}"),
            StatusCode::NOT_FOUND,
            "unknown_request",
        ),
        (
            "GET",
            "/v1/nowhere",
            Some(&f.admin),
            Body::empty(),
            StatusCode::NOT_FOUND,
            "no_route",
        ),
        (
            "POST",
            "/v1/bundles",
            Some(&f.admin),
            Body::from(vec![0u8; 3 << 20]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            "POST",
            "/v1/bundles",
            Some(&f.admin),
            Body::from(tampered),
            StatusCode::BAD_REQUEST,
            "bad_bundle",
        ),
        (
            "POST",
            "/v1/bundles",
            Some(&f.admin),
            Body::from(b"SOPHONB\0 not really".to_vec()),
            StatusCode::BAD_REQUEST,
            "bad_bundle",
        ),
        // A well-formed bundle whose key nobody trusts.
        (
            "POST",
            "/v1/bundles",
            Some(&f.admin),
            Body::from(good.clone()),
            StatusCode::CONFLICT,
            "untrusted_key",
        ),
        (
            "POST",
            "/v1/bundles",
            Some(&viewer),
            Body::from(good),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            "GET",
            "/v1/bundles/00",
            Some(&viewer),
            Body::empty(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
    ];
    for (method, path, token, body, status, expected) in cases {
        let (s, v) = f.call(method, path, token, body).await;
        assert_eq!((s, code(&v)), (status, expected), "{method} {path}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
    }
    assert_eq!(
        before,
        f.state().await,
        "a refused request changed the state"
    );
    f.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_approve_deploy_through_the_api_with_the_approval_rules() {
    let f = fixture().await;
    let key = sophon_sdk::keys::generate();
    f.trust(&key).await;
    let sam = f.token("sam", "publisher").await;
    let ann = f.token("ann", "approver").await;
    let bob = f.token("bob", "approver").await;
    let ops = f.token("ops", "operator").await;

    let bytes = sophon_sdk::ready::mlp_bundle("fraud", &key).unwrap_or_else(|e| panic!("{e}"));
    let (s, v) = f.push(&sam, bytes.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let digest = v["digest"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        (v["model"].as_str(), v["version"].as_str()),
        (Some("fraud"), Some("1"))
    );
    // The same bundle again changes nothing and says so; another bundle under the same
    // version is a conflict, not a second version.
    let (s, v) = f.push(&sam, bytes.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["already_on_shelf"], serde_json::json!(true), "{v}");
    assert_eq!(v["digest"].as_str(), Some(digest.as_str()));
    let other = sophon_sdk::onnx::pack_onnx(
        &sophon_sdk::examples::mlp_onnx(4, 8, 3, 1),
        "fraud",
        "1",
        sophon_sdk::components::PASSTHROUGH,
        &key,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (s, v) = f.push(&sam, other).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "version_exists"),
        "{v}"
    );
    // It is stored by digest and served back byte for byte.
    let resp = router(f.running.core.clone())
        .oneshot(
            Request::get(format!("/v1/bundles/{digest}"))
                .header("authorization", format!("Bearer {sam}"))
                .body(Body::empty())
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_bytes(resp.into_body()).await, bytes);

    // Production needs two approvals (the default policy); deploying before is refused.
    let deploy =
        json!({"model": "fraud", "version": "1", "environment": "production", "replicas": 1});
    let (s, v) = f
        .json("POST", "/v1/deployments", &ops, deploy.clone())
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "not_approved"), "{v}");
    // The refusal is in the audit log: who tried to deploy what, and why it was refused.
    let (s, v) = f.get("/v1/audit", &ops).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let last = v["records"]
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (&last["action"], &last["actor"], &last["target"]),
        (&json!("refused"), &json!("ops"), &json!("model fraud@1")),
        "{v}"
    );
    let detail = last["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("create-deployment refused: fraud@1 is not approved for production"),
        "{detail}"
    );
    let (s, v) = f
        .json(
            "POST",
            "/v1/approvals",
            &sam,
            json!({"model": "fraud", "version": "1", "environment": "production"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["created"]["approval_request"]
        .as_u64()
        .unwrap_or_default();
    // A publisher may not decide; the submitter may not approve their own request.
    let (s, v) = f
        .json(
            "POST",
            &format!("/v1/approvals/{id}/approve"),
            &sam,
            json!({}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"), "{v}");
    let sam_as_approver = f.token("sam", "approver").await;
    let (s, v) = f
        .json(
            "POST",
            &format!("/v1/approvals/{id}/approve"),
            &sam_as_approver,
            json!({}),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::FORBIDDEN, "self_approval"),
        "{v}"
    );
    let (s, v) = f
        .json(
            "POST",
            &format!("/v1/approvals/{id}/approve"),
            &ann,
            json!({"comment": "eval ok"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = f
        .json("POST", "/v1/deployments", &ops, deploy.clone())
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "not_approved"),
        "one of two approvals: {v}"
    );
    let (s, v) = f
        .json(
            "POST",
            &format!("/v1/approvals/{id}/approve"),
            &bob,
            json!({"comment": "lgtm"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = f.json("POST", "/v1/deployments", &ops, deploy).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let dep = v["created"]["deployment"].as_u64().unwrap_or_default();
    let (s, v) = f
        .json(
            "POST",
            &format!("/v1/deployments/{dep}/scale"),
            &ops,
            json!({"replicas": 3}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = f.get(&format!("/v1/deployments/{dep}"), &sam).await;
    assert_eq!(
        (s, v["deployment"]["replicas"].as_u64()),
        (StatusCode::OK, Some(3)),
        "{v}"
    );

    // Every decision is in the audit log, with its actor and comment.
    let (_, audit) = f.get("/v1/audit?limit=1000", &sam).await;
    let decisions: Vec<&Value> = audit["records"]
        .as_array()
        .map(|r| r.iter().filter(|r| r["action"] == "decide").collect())
        .unwrap_or_default();
    assert_eq!(decisions.len(), 2, "{audit}");
    assert_eq!(decisions[0]["actor"], "ann");
    assert!(
        decisions[0]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("eval ok")
    );
    assert_eq!(decisions[1]["actor"], "bob");
    f.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_is_served_and_metrics_show_raft() {
    let f = fixture().await;
    for route in ROUTES {
        let path = route
            .path
            .replace("{digest}", &"0".repeat(64))
            .replace("{action}", "shelve")
            .replace(['{', '}'], "");
        let (s, v) = f
            .call(
                &route.method.to_uppercase(),
                &path,
                Some(&f.admin),
                Body::from("{}"),
            )
            .await;
        assert!(
            s != StatusCode::METHOD_NOT_ALLOWED && code(&v) != "no_route",
            "{} {} is documented but not served: {s} {v}",
            route.method,
            route.path
        );
    }
    let (s, doc) = f.call("GET", "/openapi.json", None, Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let (_, metrics) = f.call("GET", "/metrics", None, Body::empty()).await;
    let text = metrics.as_str().unwrap_or_default();
    for name in [
        "sophon_raft_term",
        "sophon_raft_commit_index",
        "sophon_raft_applied_index",
        "sophon_raft_proposals_total",
        "sophon_api_request_seconds",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    f.running.shutdown().await;
}

/// `sophon dev` starts a single coordinator and at once trusts the user's key through a
/// linearizable read and a write, before the coordinator has elected itself. Reads and writes
/// that arrive before any leader is known wait for the first election instead of failing
/// ("no leader confirmed the read in time").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_issued_at_start_up_wait_for_the_first_election() {
    use crate::{Actor, Command, Entry, Role};

    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("c1");
    let secret = init(&data, "127.0.0.1:1", "127.0.0.1:2").expect("init");
    let any = "127.0.0.1:0".parse().expect("address");
    let mut config = CoordinatorConfig::new(&data, any, any);
    // Elections after 10 to 20 ticks of silence: 0.5 to 1 s, so nothing below finds a leader.
    config.driver.tick = Duration::from_millis(50);
    let running = start(config).await.expect("start");
    let core = running.core.clone();
    assert_eq!(core.driver.status().leader, 0, "no leader is known yet");

    // What `sophon dev` does: authenticate the admin linearizably, then write.
    let admin = core
        .driver
        .read(true, move |s| s.authenticate(&secret))
        .await
        .expect("a linearizable read at start-up waits for the election")
        .expect("the admin token");

    // The same, all at once through every entry point, on a fresh start.
    running.shutdown().await;
    let mut config = CoordinatorConfig::new(&data, any, any);
    config.driver.tick = Duration::from_millis(50);
    let running = start(config).await.expect("restart");
    let core = running.core.clone();
    assert_eq!(core.driver.status().leader, 0, "no leader is known yet");
    let trust = |key: &str| Command::TrustKey {
        key: key.repeat(64),
        name: "dev-publisher".into(),
    };
    let (read, write, proposed) = tokio::join!(
        core.driver.read(true, |s| s.trusted_keys().len()),
        core.write(admin.clone(), trust("a")),
        core.driver.propose(Entry {
            actor: Actor::system("test", Role::Admin),
            now_ms: 0,
            command: trust("b"),
            write_id: None,
        }),
    );
    assert!(read.expect("the read waits for a leader") <= 2);
    write.expect("the write waits for a leader");
    proposed.expect("a proposal to the driver waits for a leader");
    let keys = core
        .driver
        .read(true, |s| s.trusted_keys().len())
        .await
        .expect("read");
    assert_eq!(keys, 2);
    running.shutdown().await;
}

/// A body that must never be read: polling it panics the test.
fn unreadable_body() -> Body {
    Body::from_stream(futures_util::stream::poll_fn(
        |_| -> std::task::Poll<Option<Result<bytes::Bytes, std::io::Error>>> {
            panic!("the body was read before the token was checked")
        },
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_before_bodies_and_bodies_are_capped_per_route() {
    let f = fixture().await;
    for path in [
        "/v1/bundles",
        "/v1/approvals",
        "/v1/tokens",
        "/v1/policies/staging",
    ] {
        for token in [None, Some("not-a-token")] {
            let method = if path.starts_with("/v1/policies") {
                "PUT"
            } else {
                "POST"
            };
            let (status, v) = f.call(method, path, token, unreadable_body()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {v}");
        }
    }
    // Over the JSON cap: 413, announced or not.
    let big = json!({"name": "x".repeat(super::api::MAX_JSON_BODY), "role": "viewer"});
    let (status, v) = f.json("POST", "/v1/tokens", &f.admin, big.clone()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    let req = Request::post("/v1/tokens")
        .header("authorization", format!("Bearer {}", f.admin))
        .header("content-length", "1000000000")
        .body(unreadable_body())
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = router(f.running.core.clone())
        .oneshot(req)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // A bundle upload may be larger than the JSON cap (this one is garbage: refused as such).
    let (status, v) = f
        .call(
            "POST",
            "/v1/bundles",
            Some(&f.admin),
            Body::from(vec![7u8; 2 * super::api::MAX_JSON_BODY]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(code(&v), "bad_bundle", "{v}");
    // The state did not change, and a good request still works.
    let (status, _) = f
        .json(
            "POST",
            "/v1/tokens",
            &f.admin,
            json!({"name": "ok", "role": "viewer"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_public_and_locked_down_and_whoami_needs_a_token() {
    let f = fixture().await;
    for (path, kind) in [
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let resp = router(f.running.core.clone())
            .oneshot(
                Request::builder()
                    .uri(path)
                    .body(Body::empty())
                    .unwrap_or_else(|e| panic!("{e}")),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let h = resp.headers();
        let get = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert!(get("content-type").starts_with(kind), "{path}");
        assert_eq!(get("content-security-policy"), super::console::CSP);
        assert_eq!(get("x-content-type-options"), "nosniff");
        assert_eq!(get("x-frame-options"), "DENY");
    }
    // The console's data is not public.
    let (s, _) = f.call("GET", "/v1/whoami", None, Body::empty()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = f.get("/v1/whoami", &f.admin).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((&v["name"], &v["role"]), (&json!("admin"), &json!("admin")));
    let vic = f.token("vic", "viewer").await;
    let (_, v) = f.get("/v1/whoami", &vic).await;
    assert_eq!((&v["name"], &v["role"]), (&json!("vic"), &json!("viewer")));
}
