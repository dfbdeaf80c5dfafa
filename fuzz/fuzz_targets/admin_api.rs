//! The admin API's JSON bodies, through the real router of a real single-member coordinator
//! (Raft driver, redb log, artifact store): any body on any route with a body gets an answer,
//! never a panic, and never a 500 (a 4xx for what a client got wrong). State carries over from
//! one input to the next, so sequences of writes are explored too.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use sophon_coordinator::server::{CoordinatorConfig, Running, api, init, start};
use tower::ServiceExt;

struct Admin {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    token: String,
    _running: Running,
    _dir: tempfile::TempDir,
}

/// The routes that take a JSON body.
const ROUTES: [(&str, &str); 14] = [
    ("POST", "/v1/approvals"),
    ("POST", "/v1/approvals/1/approve"),
    ("POST", "/v1/approvals/1/reject"),
    ("POST", "/v1/approvals/2/withdraw"),
    ("PUT", "/v1/policies/staging"),
    ("PUT", "/v1/policies/production"),
    ("POST", "/v1/deployments"),
    ("POST", "/v1/deployments/1/scale"),
    ("POST", "/v1/tokens"),
    ("POST", "/v1/keys"),
    ("PUT", "/v1/cluster/heartbeat-grace"),
    ("POST", "/v1/models/m/versions/1/tag"),
    ("POST", "/v1/models/m/versions/1/shelve"),
    ("POST", "/v1/bundles"),
];

fn admin() -> &'static Admin {
    static ADMIN: OnceLock<Admin> = OnceLock::new();
    ADMIN.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tmp");
        let data = dir.path().join("c1");
        let token = init(&data, "127.0.0.1:1", "127.0.0.1:2").expect("init");
        let any = ([127, 0, 0, 1], 0).into();
        let mut config = CoordinatorConfig::new(&data, any, any);
        config.driver.tick = Duration::from_millis(10);
        config.max_bundle_bytes = 1 << 20;
        let running = rt.block_on(start(config)).expect("start");
        let app = api::router(running.core.clone());
        Admin {
            rt,
            app,
            token,
            _running: running,
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let [route, auth, body @ ..] = data else {
        return;
    };
    let admin = admin();
    let (method, path) = ROUTES[usize::from(*route) % ROUTES.len()];
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if auth & 1 == 0 {
        request = request.header("authorization", format!("Bearer {}", admin.token));
    }
    let request = request.body(Body::from(body.to_vec())).expect("request");
    let (status, answer) = admin.rt.block_on(async {
        let response = admin.app.clone().oneshot(request).await.expect("answered");
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, bytes)
    });
    assert_ne!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{method} {path}: {}",
        String::from_utf8_lossy(&answer)
    );
});
