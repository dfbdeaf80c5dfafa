//! Shared set-up of the node's tests: a repository with real bundles and the router.
#![allow(dead_code)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use sophon_node::http::{ApiState, HttpConfig, router};
use sophon_node::stats::Metrics;
use sophon_node::{Repository, Runtime, RuntimeConfig, ServingLimits};
use sophon_sdk::{SigningKey, keys};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tower::ServiceExt;

pub struct Node {
    pub repo: Arc<Repository>,
    pub app: axum::Router,
    pub key: SigningKey,
}

pub fn node_with(limits: ServingLimits, http: HttpConfig) -> Node {
    let key = keys::generate();
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: None,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let repo = Arc::new(Repository::new(
        runtime,
        vec![key.verifying_key()],
        limits,
        Arc::new(Metrics::new().expect("metrics")),
    ));
    let state = ApiState::new(repo.clone(), http);
    state.ready.store(true, Ordering::Release);
    let state = Arc::new(state);
    Node {
        app: router(state),
        repo,
        key,
    }
}

pub fn node() -> Node {
    node_with(ServingLimits::default(), HttpConfig::default())
}

pub async fn call(
    app: &axum::Router,
    req: Request<Body>,
) -> (StatusCode, Vec<u8>, axum::http::HeaderMap) {
    let res = app.clone().oneshot(req).await.expect("router answers");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    (status, body, headers)
}

pub async fn post_json(app: &axum::Router, path: &str, body: &Value) -> (StatusCode, Value) {
    let req = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("json")))
        .expect("request");
    let (status, body, _) = call(app, req).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

pub async fn get_json(app: &axum::Router, path: &str) -> (StatusCode, Value) {
    let req = Request::get(path).body(Body::empty()).expect("request");
    let (status, body, _) = call(app, req).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

pub fn mlp_input(batch: usize) -> Vec<f32> {
    (0..batch * 784)
        .map(|i| ((i * 13) % 101) as f32 / 101.0)
        .collect()
}

pub fn mlp_request(batch: usize) -> Value {
    serde_json::json!({"id": "req-1", "inputs": [{"name": "input", "datatype": "FP32", "shape": [batch, 784], "data": mlp_input(batch)}]})
}

/// Post an MLP request and check the answer against the plain-Rust forward pass.
pub async fn assert_mlp_answers(app: &axum::Router) {
    let (status, body) = post_json(app, "/v2/models/mlp/infer", &mlp_request(2)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let got = f32s(&body["outputs"][0]["data"]);
    let want = sophon_sdk::ready::mlp().forward(&mlp_input(2));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "mlp output {g} != reference {w}");
    }
}

/// Load `onnx` as model `name` (version 1) through the passthrough component, with its manifest
/// as `edit` leaves it.
pub fn load_onnx(
    n: &Node,
    name: &str,
    onnx: Vec<u8>,
    edit: impl FnOnce(&mut sophon_sdk::Manifest),
) {
    let mut manifest = sophon_sdk::onnx::onnx_manifest(&onnx, name, "1").expect("manifest");
    edit(&mut manifest);
    let bundle = sophon_sdk::pack_parts(
        &manifest,
        sophon_sdk::components::PASSTHROUGH,
        &[("model.onnx".to_string(), onnx)],
        &n.key,
    )
    .expect("pack");
    n.repo.add_bundle(&bundle).expect("load");
}

/// A node serving the MLP (`mlp`) with `config`, bound to a free port on 127.0.0.1 and not yet
/// running.
pub async fn mlp_server(config: HttpConfig) -> sophon_node::NodeServer {
    let n = node();
    n.repo
        .add_bundle(&sophon_sdk::ready::mlp_bundle("mlp", &n.key).expect("pack"))
        .expect("load");
    sophon_node::NodeServer::bind("127.0.0.1:0".parse().expect("addr"), n.repo, config)
        .await
        .expect("bind")
}

/// Check a V2 JSON answer for one MLP row of `mlp_input(1)` against the reference forward pass.
pub fn assert_mlp_answer(answer: &Value) {
    let got = f32s(&answer["outputs"][0]["data"]);
    let want = sophon_sdk::ready::mlp().forward(&mlp_input(1));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "mlp output {g} != reference {w}");
    }
}

/// Serve gRPC beside `server` (sharing its state, until the test ends) on a free port; its address.
pub async fn serve_grpc(server: &sophon_node::NodeServer) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind gRPC");
    let grpc = listener.local_addr().expect("addr");
    tokio::spawn(sophon_node::grpc::serve(
        server.state().clone(),
        listener,
        std::future::pending(),
    ));
    grpc
}

/// A client of the node's V2 gRPC service.
pub type GrpcClient =
    sophon_node::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >;

/// A gRPC client connected to `addr`.
pub async fn grpc_client(addr: std::net::SocketAddr) -> GrpcClient {
    GrpcClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

/// A gRPC request to `model` (an MLP) of `rows` rows of `mlp_input`, as raw contents.
pub fn mlp_grpc_request(model: &str, rows: usize) -> sophon_node::grpc::pb::ModelInferRequest {
    use sophon_node::grpc::pb;
    pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 784],
            ..Default::default()
        }],
        raw_input_contents: vec![
            mlp_input(rows)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ],
        ..Default::default()
    }
}

/// The elements of a `BYTES` tensor's raw data (each after its 4-byte length), as UTF-8 text.
pub fn bytes_strings(data: &[u8]) -> Vec<String> {
    sophon_node::v2::Tensor::new("bytes", sophon_sdk::Datatype::Bytes, vec![], data.to_vec())
        .bytes_elements()
        .expect("BYTES framing")
        .into_iter()
        .map(|e| String::from_utf8(e.to_vec()).expect("utf-8"))
        .collect()
}

/// The bytes `state` holds in flight once they have come down to `at_most`, or after five
/// seconds of waiting for that.
pub async fn held_once_at_most(state: &ApiState, at_most: usize) -> usize {
    let max = state.config.max_inflight_bytes;
    let held = || max - state.inflight_bytes.available_permits();
    let started = std::time::Instant::now();
    while held() > at_most && started.elapsed() < std::time::Duration::from_secs(5) {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    held()
}
