//! The V2 API served through the router (no socket): real bundles, real components, real tract.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use serde_json::{Value, json};
use sophon_node::ServingLimits;
use sophon_node::http::HttpConfig;
use sophon_sdk::{keys, ready};

fn with_examples() -> Node {
    let n = node();
    n.repo
        .add_bundle(&ready::mlp_bundle("mlp", &n.key).expect("pack"))
        .expect("load mlp");
    n.repo
        .add_bundle(&ready::classifier_bundle(&n.key).expect("pack"))
        .expect("load classifier");
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn mlp_answers_like_the_reference_and_echoes_the_id() {
    let n = with_examples();
    assert_mlp_answers(&n.app).await;
    let (status, body) =
        post_json(&n.app, "/v2/models/mlp/versions/1/infer", &mlp_request(1)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["id"], "req-1");
    assert_eq!(body["model_name"], "mlp");
    assert_eq!(body["model_version"], "1");
    assert_eq!(body["outputs"][0]["shape"], json!([1, 10]));
    assert_eq!(body["outputs"][0]["datatype"], "FP32");
}

/// A binary request is read straight into its JSON part and its tensor data: the header
/// arriving in pieces, and header lengths that are wrong, each answered, and the node still
/// serves the next request.
#[tokio::test(flavor = "multi_thread")]
async fn binary_bodies_in_pieces_and_wrong_header_lengths() {
    let n = with_examples();
    let data = mlp_input(1);
    let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "parameters": {"binary_data_size": raw.len()}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": false}}],
    });
    let mut whole = serde_json::to_vec(&header).expect("json");
    let header_len = whole.len();
    whole.extend_from_slice(&raw);
    let want = ready::mlp().forward(&data);
    let send = |header_len: usize, pieces: usize| {
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = whole
            .chunks(pieces)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        Request::post("/v2/models/mlp/infer")
            .header("Inference-Header-Content-Length", header_len.to_string())
            .body(Body::from_stream(futures_util::stream::iter(chunks)))
            .expect("request")
    };
    let good = |status: StatusCode, body: &[u8]| {
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(body));
        let got: Value = serde_json::from_slice(body).expect("json");
        let got = got["outputs"][0]["data"].as_array().expect("data").clone();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g.as_f64().expect("number") as f32 - w).abs() < 1e-5);
        }
    };
    // In pieces of 7 bytes (the JSON header split across many), and of 1000.
    for pieces in [7, 1000, whole.len()] {
        let (status, body, _) = call(&n.app, send(header_len, pieces)).await;
        good(status, &body);
    }
    // A header length past the body, one byte short of the JSON, and one byte long.
    for (wrong, says) in [
        (whole.len() + 10, "Inference-Header-Content-Length"),
        (header_len - 1, "not valid V2 JSON"),
        (header_len + 1, "not valid V2 JSON"),
    ] {
        let (status, body, _) = call(&n.app, send(wrong, 100)).await;
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{wrong}: {text}");
        assert!(text.contains(says), "{wrong}: {text}");
    }
    let (status, body, _) = call(&n.app, send(header_len, 64)).await;
    good(status, &body);
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_input_and_output() {
    let n = with_examples();
    let data = mlp_input(1);
    let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "parameters": {"binary_data_size": raw.len()}}],
        "parameters": {"binary_data_output": true},
    });
    let mut body = serde_json::to_vec(&header).expect("json");
    let header_len = body.len();
    body.extend_from_slice(&raw);
    let req = Request::post("/v2/models/mlp/infer")
        .header("Inference-Header-Content-Length", header_len.to_string())
        .body(Body::from(body))
        .expect("request");
    let (status, body, headers) = call(&n.app, req).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let json_len: usize = headers["inference-header-content-length"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    let head: Value = serde_json::from_slice(&body[..json_len]).expect("json header");
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 40);
    let got: Vec<f32> = body[json_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let want = ready::mlp().forward(&data);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn classifier_runs_pre_and_post_processing_in_the_guest() {
    let n = with_examples();
    let pixels: Vec<u8> = (0..128).map(|i| (i * 37 % 256) as u8).collect();
    let req = json!({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 64], "data": pixels}]});
    let (status, body) = post_json(&n.app, "/v2/models/classifier/infer", &req).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let probs = f32s(&body["outputs"][0]["data"]);
    let scaled: Vec<f32> = pixels.iter().map(|p| *p as f32 / 255.0).collect();
    let logits = ready::classifier_mlp().forward(&scaled);
    for row in 0..2 {
        let l = &logits[row * 10..row * 10 + 10];
        let max = l.iter().cloned().fold(f32::MIN, f32::max);
        let sum: f32 = l.iter().map(|x| (x - max).exp()).sum();
        for c in 0..10 {
            let want = (l[c] - max).exp() / sum;
            assert!((probs[row * 10 + c] - want).abs() < 1e-5);
        }
    }
    let labels = body["outputs"][1]["data"].as_array().expect("labels");
    assert_eq!(body["outputs"][1]["datatype"], "BYTES");
    assert_eq!(labels.len(), 6);
    let first = labels[0].as_str().expect("string");
    let parts: Vec<&str> = first.split(':').collect();
    let best = (0..10)
        .max_by(|a, b| probs[*a].total_cmp(&probs[*b]))
        .expect("a class");
    assert_eq!(parts[1], best.to_string());
    assert_eq!(
        parts[2],
        ready::DIGIT_LABELS.split(',').nth(best).expect("label")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn selecting_an_output_returns_only_that_output() {
    let n = with_examples();
    let req = json!({
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 64], "data": vec![7u8; 64]}],
        "outputs": [{"name": "labels"}],
    });
    let (status, body) = post_json(&n.app, "/v2/models/classifier/infer", &req).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let outputs = body["outputs"].as_array().expect("outputs");
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0]["name"], "labels");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_errors() {
    let n = with_examples();
    let cases = [
        (
            json!({"inputs": [{"name": "input", "datatype": "INT32", "shape": [1, 784], "data": vec![0; 784]}]}),
            "datatype",
        ),
        (
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 783], "data": vec![0.0; 783]}]}),
            "shape",
        ),
        (
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": vec![0.0; 10]}]}),
            "input",
        ),
        (json!({"inputs": []}), "missing input"),
        (
            json!({"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1], "data": [1.0]}]}),
            "nope",
        ),
        (
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": vec![0.0; 784]}], "outputs": [{"name": "bogus"}]}),
            "bogus",
        ),
    ];
    for (req, needle) in cases {
        let (status, body) = post_json(&n.app, "/v2/models/mlp/infer", &req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{req} → {body}");
        let msg = body["error"].as_str().expect("error message");
        assert!(msg.contains(needle), "`{msg}` should mention `{needle}`");
    }
    let req = Request::post("/v2/models/mlp/infer")
        .body(Body::from("{not json"))
        .expect("request");
    let (status, body, _) = call(&n.app, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(serde_json::from_slice::<Value>(&body).expect("json")["error"].is_string());

    let (status, body) = post_json(&n.app, "/v2/models/ghost/infer", &mlp_request(1)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].as_str().expect("error").contains("ghost"));
    let (status, _) = post_json(&n.app, "/v2/models/mlp/versions/9/infer", &mlp_request(1)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The node still answers correctly afterwards.
    assert_mlp_answers(&n.app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_bodies_are_refused() {
    let n = node_with(
        ServingLimits::default(),
        HttpConfig {
            max_body_bytes: 1024,
            ..HttpConfig::default()
        },
    );
    n.repo
        .add_bundle(&ready::mlp_bundle("mlp", &n.key).expect("pack"))
        .expect("load");
    let (status, body) = post_json(&n.app, "/v2/models/mlp/infer", &mlp_request(1)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(body["error"].as_str().expect("error").contains("limit"));
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_config_stats_health_and_metrics() {
    let n = with_examples();
    assert_eq!(
        get_json(&n.app, "/v2/health/live").await.1,
        json!({"live": true})
    );
    assert_eq!(
        get_json(&n.app, "/v2/health/ready").await.1,
        json!({"ready": true})
    );
    let (_, server) = get_json(&n.app, "/v2").await;
    assert!(
        server["extensions"]
            .as_array()
            .expect("list")
            .contains(&json!("binary_tensor_data"))
    );
    for path in ["/v2/models/mlp", "/v2/models/mlp/versions/1"] {
        let (status, meta) = get_json(&n.app, path).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            meta["inputs"][0],
            json!({"name": "input", "datatype": "FP32", "shape": [-1, 784]})
        );
    }
    for path in ["/v2/models/mlp/ready", "/v2/models/mlp/versions/1/ready"] {
        assert_eq!(get_json(&n.app, path).await.1["ready"], true);
    }
    let (status, config) = get_json(&n.app, "/v2/models/classifier/config").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(config["input"][0]["data_type"], "TYPE_UINT8");
    assert_eq!(config["output"][1]["data_type"], "TYPE_STRING");

    assert_mlp_answers(&n.app).await;
    let _ = post_json(&n.app, "/v2/models/mlp/infer", &json!({"inputs": []})).await;
    let (_, stats) = get_json(&n.app, "/v2/models/mlp/stats").await;
    let s = &stats["model_stats"][0]["inference_stats"];
    assert_eq!(s["success"]["count"], 1);
    assert_eq!(s["fail"]["count"], 1);
    assert_eq!(s["queue"]["count"], 1);
    assert_eq!(s["compute_infer"]["count"], 1);
    assert!(s["compute_infer"]["ns"].as_u64().expect("ns") > 0);
    assert_eq!(
        get_json(&n.app, "/v2/models/ghost/stats").await.0,
        StatusCode::NOT_FOUND
    );

    let req = Request::get("/metrics")
        .body(Body::empty())
        .expect("request");
    let (_, text, _) = call(&n.app, req).await;
    let text = String::from_utf8(text).expect("utf-8");
    assert!(
        text.contains(
            r#"sophon_inference_requests_total{device="cpu",model="mlp",outcome="success",version="1"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"outcome="bad_request""#));
    assert!(text.contains("sophon_inference_compute_seconds_bucket"));
    assert!(text.contains("sophon_inflight_requests 0"));
    assert!(text.contains("process_resident_memory_bytes"));
}

#[tokio::test(flavor = "multi_thread")]
async fn repository_index_unload_and_load() {
    let n = with_examples();
    let (status, index) = post_json(&n.app, "/v2/repository/index", &json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        index
            .as_array()
            .expect("list")
            .iter()
            .any(|e| e["name"] == "mlp" && e["state"] == "READY")
    );
    let (status, _) = post_json(&n.app, "/v2/repository/models/mlp/unload", &json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = post_json(&n.app, "/v2/models/mlp/infer", &mlp_request(1)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        get_json(&n.app, "/v2/models/mlp/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let (_, index) = post_json(&n.app, "/v2/repository/index", &json!({"ready": true})).await;
    assert!(
        !index
            .as_array()
            .expect("list")
            .iter()
            .any(|e| e["name"] == "mlp")
    );
    let (status, _) = post_json(&n.app, "/v2/repository/models/mlp/load", &json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_mlp_answers(&n.app).await;
    let (status, _) = post_json(&n.app, "/v2/repository/models/ghost/load", &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn bundles_from_strangers_or_tampered_are_refused() {
    let n = node();
    let stranger = keys::generate();
    let err = n
        .repo
        .add_bundle(&ready::mlp_bundle("mlp", &stranger).expect("pack"))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("publisher"), "{err}");
    let mut bytes = ready::mlp_bundle("mlp", &n.key).expect("pack");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    let err = n.repo.add_bundle(&bytes).err().expect("refused");
    assert!(err.to_string().contains("bundle refused"), "{err}");
    assert!(n.repo.loaded().is_empty());
}
