//! Triton's classification extension: a requested output with `parameters.classification = k`
//! comes back as its top k classes, `"value:index"` strings, per row of a model with a batch
//! dimension and over the whole output of one without; over HTTP (JSON and binary) and gRPC.
//! A count that is no count, or an output that holds no numbers, gets a clear error before the
//! model runs, and the next request is served.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::{Value, json};
use sophon_node::grpc::pb;
use sophon_node::http::HttpConfig;

/// `rows` rows of the MLP's input, as a V2 JSON request asking for `output`'s top `k`.
fn request(rows: usize, k: Value) -> Value {
    json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 784], "data": mlp_input(rows)}],
        "outputs": [{"name": "output", "parameters": {"classification": k, "binary_data": false}}]
    })
}

/// The classes the reference forward pass gives for `values` (one row or the whole tensor).
fn want(values: &[f32], k: usize) -> Vec<(f32, usize)> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|a, b| values[*b].total_cmp(&values[*a]).then(a.cmp(b)));
    order.iter().take(k).map(|&i| (values[i], i)).collect()
}

/// Check `"value:index"` strings against `want`: the same indices, in order, and the values to
/// within float noise, printed with six decimals as Triton prints them.
fn check(got: &[String], want: &[(f32, usize)]) {
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (text, (value, index)) in got.iter().zip(want) {
        let (v, i) = text.split_once(':').expect("value:index");
        assert_eq!(i.parse::<usize>().expect("index"), *index, "{got:?}");
        assert_eq!(v.split_once('.').expect("decimals").1.len(), 6, "{text}");
        let v: f32 = v.parse().expect("value");
        assert!((v - value).abs() < 1e-4, "{text} against {value}");
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

/// A node serving the MLP twice from ONNX: `mlpb`, whose leading variable dimension pack
/// detects as the batch, and `mlp`, packed as a model that does not batch
/// (`max_batch_size = 0`); and the classifier example.
fn two_mlps() -> Node {
    let n = node();
    load_onnx(&n, "mlp", sophon_sdk::ready::mlp().to_onnx(), |m| {
        m.resources.max_batch_size = 0;
    });
    load_onnx(&n, "mlpb", sophon_sdk::ready::mlp().to_onnx(), |m| {
        assert!(m.resources.max_batch_size > 0, "pack detects the batch");
    });
    n.repo
        .add_bundle(&sophon_sdk::ready::classifier_bundle(&n.key).expect("pack"))
        .expect("load");
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn top_classes_per_row_or_over_the_whole_output() {
    let n = two_mlps();
    let rows = 3;
    let reference = sophon_sdk::ready::mlp().forward(&mlp_input(rows));

    // With a batch dimension: the top 4 of each row, shape [3, 4].
    let (status, body) = post_json(&n.app, "/v2/models/mlpb/infer", &request(rows, json!(4))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let out = &body["outputs"][0];
    assert_eq!(out["datatype"], "BYTES");
    assert_eq!(out["shape"], json!([3, 4]));
    let got = strings(&out["data"]);
    for (r, row) in reference.chunks(10).enumerate() {
        check(&got[r * 4..r * 4 + 4], &want(row, 4));
    }

    // Without one: the top 5 of the whole output, shape [5]; more than there are gives all.
    let (status, body) = post_json(&n.app, "/v2/models/mlp/infer", &request(rows, json!(5))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outputs"][0]["shape"], json!([5]));
    check(&strings(&body["outputs"][0]["data"]), &want(&reference, 5));
    let (status, body) = post_json(&n.app, "/v2/models/mlp/infer", &request(1, json!(1000))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outputs"][0]["shape"], json!([10]));

    // In binary: the strings as V2 BYTES elements, each after its 4-byte length.
    let mut binary = request(2, json!(2));
    binary["outputs"][0]["parameters"]["binary_data"] = json!(true);
    let req = axum::http::Request::post("/v2/models/mlpb/infer")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(binary.to_string()))
        .expect("request");
    let (status, raw, headers) = call(&n.app, req).await;
    assert_eq!(status, StatusCode::OK);
    let header: usize = headers["inference-header-content-length"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("length");
    let got = bytes_strings(&raw[header..]);
    let reference = sophon_sdk::ready::mlp().forward(&mlp_input(2));
    check(&got[..2], &want(&reference[..10], 2));
    check(&got[2..], &want(&reference[10..], 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn counts_that_are_no_counts_and_outputs_without_numbers_are_refused() {
    let n = two_mlps();
    for k in [
        json!(0),
        json!(-3),
        json!(1.5),
        json!("3"),
        json!(1u64 << 40),
    ] {
        let (status, body) =
            post_json(&n.app, "/v2/models/mlpb/infer", &request(1, k.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{k}: {body}");
        let error = body["error"].as_str().expect("error");
        assert!(
            error.contains("output 'output': parameters.classification must be a count"),
            "{k}: {error}"
        );
        let (status, body) =
            post_json(&n.app, "/v2/models/mlpb/infer", &request(1, json!(2))).await;
        assert_eq!(status, StatusCode::OK, "after {k}: {body}");
    }
    // The classifier's `labels` output holds strings.
    let ask = json!({
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 64], "data": vec![7u8; 64]}],
        "outputs": [{"name": "labels", "parameters": {"classification": 2}}]
    });
    let (status, body) = post_json(&n.app, "/v2/models/classifier/infer", &ask).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .expect("error")
            .contains("a BYTES output cannot be classified"),
        "{body}"
    );
    let (status, _) = post_json(&n.app, "/v2/models/mlpb/infer", &request(1, json!(2))).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn classification_over_grpc() {
    let n = two_mlps();
    let server = sophon_node::NodeServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        n.repo,
        HttpConfig::default(),
    )
    .await
    .expect("bind");
    let grpc = serve_grpc(&server).await;
    let mut client = grpc_client(grpc).await;
    let ask = |k: i64| pb::ModelInferRequest {
        outputs: vec![pb::model_infer_request::InferRequestedOutputTensor {
            name: "output".into(),
            parameters: [(
                "classification".to_string(),
                pb::InferParameter {
                    parameter_choice: Some(pb::infer_parameter::ParameterChoice::Int64Param(k)),
                },
            )]
            .into(),
        }],
        ..mlp_grpc_request("mlpb", 2)
    };
    let answer = client
        .model_infer(ask(3))
        .await
        .expect("served")
        .into_inner();
    assert_eq!(answer.outputs[0].datatype, "BYTES");
    assert_eq!(answer.outputs[0].shape, vec![2, 3]);
    let got = bytes_strings(&answer.raw_output_contents[0]);
    let reference = sophon_sdk::ready::mlp().forward(&mlp_input(2));
    check(&got[..3], &want(&reference[..10], 3));
    check(&got[3..], &want(&reference[10..], 3));

    let refused = client.model_infer(ask(0)).await.expect_err("no count");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused
            .message()
            .contains("parameters.classification must be a count"),
        "{refused:?}"
    );
    client.model_infer(ask(1)).await.expect("served after");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_output_is_ranked_off_the_worker_and_bounded() {
    let n = node();
    // 8,192 floats out for each id in: 64 ids make a 2 MiB output, ranked with the worker
    // handed off. Row i holds i in every column: equal values keep index order.
    load_onnx(
        &n,
        "embed",
        sophon_sdk::examples::embedding_onnx(4, 8192, false),
        |_| {},
    );
    let ids: Vec<i64> = (0..64).map(|i| i % 4).collect();
    for (k, per_row) in [(json!(3), 3), (json!(u32::MAX), 8192)] {
        let ask = json!({
            "inputs": [{"name": "ids", "datatype": "INT64", "shape": [64], "data": ids}],
            "outputs": [{"name": "vectors", "parameters": {"classification": k}}]
        });
        let (status, body) = post_json(&n.app, "/v2/models/embed/infer", &ask).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let out = &body["outputs"][0];
        assert_eq!(out["shape"], json!([64, per_row]));
        let got = strings(&out["data"]);
        assert_eq!(got.len(), 64 * per_row);
        for (row, id) in ids.iter().enumerate() {
            let first = &got[row * per_row..row * per_row + 3];
            assert_eq!(
                first,
                [0, 1, 2].map(|i| format!("{id}.000000:{i}")),
                "row {row}"
            );
        }
    }
}
