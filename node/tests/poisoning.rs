//! A request must not poison, crash or stall the node: a failed run leaves no state behind for
//! the next request, data that would make the backend read out of bounds is refused, a backend
//! panic fails one request only, and batches over `max_batch_size` are refused. Each case sends
//! the bad request, then good ones.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::{Value, json};
use sophon_sdk::examples;

fn load(n: &Node, name: &str, onnx: Vec<u8>, max_batch_size: u32) {
    load_onnx(n, name, onnx, |m| {
        m.resources.max_batch_size = max_batch_size
    });
}

fn rows(name: &str, batch: usize, width: usize, value: f32) -> Value {
    json!({"name": name, "datatype": "FP32", "shape": [batch, width], "data": vec![value; batch * width]})
}

async fn add(n: &Node, a: usize, b: usize) -> (StatusCode, Value) {
    let body = json!({"inputs": [rows("a", a, 4, 1.0), rows("b", b, 4, 2.0)]});
    post_json(&n.app, "/v2/models/add/infer", &body).await
}

async fn assert_adds(n: &Node, batch: usize) {
    let (status, body) = add(n, batch, batch).await;
    assert_eq!(status, StatusCode::OK, "batch {batch}: {body}");
    assert_eq!(f32s(&body["outputs"][0]["data"]), vec![3.0; batch * 4]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_run_does_not_poison_the_pool() {
    let n = node();
    load(&n, "add", examples::add_onnx(4), 0);
    assert_adds(&n, 2).await;
    for _ in 0..3 {
        // Each input passes the manifest's [-1, 4]; together they clash on the graph's `batch`.
        let (status, body) = add(&n, 2, 3).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let message = body["error"].as_str().expect("error");
        assert!(message.contains("rejected the input"), "{message}");
        // Every other batch size still works, not only the one left bound by the failed run.
        for batch in [3, 1, 5, 2] {
            assert_adds(&n, batch).await;
        }
    }
}

async fn embed(n: &Node, model: &str, inputs: Value) -> (StatusCode, Value) {
    post_json(
        &n.app,
        &format!("/v2/models/{model}/infer"),
        &json!({ "inputs": inputs }),
    )
    .await
}

fn ids(name: &str, values: &[i64]) -> Value {
    json!({"name": name, "datatype": "INT64", "shape": [values.len()], "data": values})
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_range_ids_are_refused_and_the_model_keeps_serving() {
    let n = node();
    load(&n, "embed", examples::embedding_onnx(10, 4, false), 0);
    for bad in [vec![3, 10], vec![-11], vec![i64::MAX], vec![i64::MIN]] {
        let (status, body) = embed(&n, "embed", json!([ids("ids", &bad)])).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
        let message = body["error"].as_str().expect("error");
        assert!(message.contains("table of 10 rows"), "{message}");
        let (status, body) = embed(&n, "embed", json!([ids("ids", &[9, -1, 0])])).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let mut want = vec![9.0; 8];
        want.extend([0.0; 4]);
        assert_eq!(f32s(&body["outputs"][0]["data"]), want);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_panic_fails_one_request_only() {
    let n = node();
    // The ids are a sum of two inputs, so the node cannot check them before tract runs, and
    // tract's Gather indexes past its table and panics.
    load(&n, "summed", examples::embedding_onnx(10, 4, true), 0);
    for _ in 0..2 {
        let (status, body) = embed(&n, "summed", json!([ids("a", &[1000]), ids("b", &[0])])).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
        let message = body["error"].as_str().expect("error");
        assert!(message.contains("panicked"), "{message}");
        let (status, body) = embed(&n, "summed", json!([ids("a", &[2]), ids("b", &[3])])).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(f32s(&body["outputs"][0]["data"]), vec![5.0; 4]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_over_max_batch_size_are_refused() {
    let n = node();
    load(&n, "add", examples::add_onnx(4), 4);
    let (status, body) = add(&n, 5, 5).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["error"].as_str().expect("error");
    assert!(message.contains("max_batch_size of 4"), "{message}");
    assert_adds(&n, 4).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_sheds_with_503_past_its_bytes_in_flight() {
    let n = node_with(
        sophon_node::ServingLimits::default(),
        sophon_node::http::HttpConfig {
            max_inflight_bytes: 4096,
            ..sophon_node::http::HttpConfig::default()
        },
    );
    load(&n, "add", examples::add_onnx(4), 0);
    let (status, body) = add(&n, 200, 200).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let message = body["error"].as_str().expect("error");
    assert!(message.contains("in flight"), "{message}");
    assert_adds(&n, 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn models_reserve_instance_slots_and_one_that_does_not_fit_is_refused() {
    use sophon_node::{Repository, Runtime, RuntimeConfig, ServingLimits};
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: None,
        cache_key_file: None,
        max_instances: 5,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let key = sophon_sdk::keys::generate();
    let repo = Repository::new(
        runtime,
        vec![key.verifying_key()],
        ServingLimits {
            default_concurrency: 2,
            ..ServingLimits::default()
        },
        std::sync::Arc::new(sophon_node::stats::Metrics::new().expect("metrics")),
    );
    // 5 slots, one kept for loading: two models of concurrency 2 fit, a third does not.
    for name in ["a", "b"] {
        repo.add_bundle(&sophon_sdk::ready::mlp_bundle(name, &key).expect("pack"))
            .expect("fits");
    }
    assert_eq!(repo.reserved_slots(), 4);
    let err = repo
        .add_bundle(&sophon_sdk::ready::mlp_bundle("c", &key).expect("pack"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("does not fit this node's instance pool"),
        "{err}"
    );
    // Unloading gives the slots back.
    repo.unload("a").expect("unload");
    assert_eq!(repo.reserved_slots(), 2);
    repo.add_bundle(&sophon_sdk::ready::mlp_bundle("c", &key).expect("pack"))
        .expect("fits now");
}
