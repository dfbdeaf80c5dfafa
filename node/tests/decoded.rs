//! Requests that take more memory decoded than on the wire count in flight at what they take:
//! typed gRPC contents of one-byte varints, gRPC messages of empty repeated fields (weighed
//! before prost decodes them), and JSON numbers of two bytes. Each is refused when there is no
//! room for it, gives everything back, and a good request is served after it.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::json;
use sophon_node::grpc::pb;
use sophon_node::http::HttpConfig;

/// INT64 `Identity`, as `ident`.
const INT64: i32 = 7;

/// A node serving `ident` with room for `inflight` bytes: its state, its in-process HTTP router
/// and its gRPC address.
async fn ident_server(
    inflight: usize,
) -> (
    std::sync::Arc<sophon_node::http::ApiState>,
    axum::Router,
    std::net::SocketAddr,
) {
    let config = HttpConfig {
        max_inflight_bytes: inflight,
        ..HttpConfig::default()
    };
    let n = node_with(sophon_node::ServingLimits::default(), config.clone());
    // No batch dimension: a request of any length is one tensor.
    load_onnx(
        &n,
        "ident",
        sophon_sdk::examples::identity_onnx(INT64),
        |m| m.resources.max_batch_size = 0,
    );
    let app = n.app.clone();
    let server =
        sophon_node::NodeServer::bind("127.0.0.1:0".parse().expect("addr"), n.repo, config)
            .await
            .expect("bind");
    let state = server.state().clone();
    let grpc = serve_grpc(&server).await;
    tokio::spawn(server.run(std::future::pending()));
    (state, app, grpc)
}

/// A gRPC request of `n` INT64 zeros as typed contents: one byte each on the wire.
fn typed_zeros(n: usize) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: "ident".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "INT64".into(),
            shape: vec![n as i64],
            contents: Some(pb::InferTensorContents {
                int64_contents: vec![0; n],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Wait until nothing is held in flight.
async fn all_given_back(state: &sophon_node::http::ApiState) {
    assert_eq!(
        held_once_at_most(state, 0).await,
        0,
        "every count given back"
    );
}

/// The status `request` is refused with, which must be `code` with `needle` in its message.
async fn refused_with(
    client: &mut GrpcClient,
    request: pb::ModelInferRequest,
    code: tonic::Code,
    needle: &str,
) -> tonic::Status {
    let refused = client
        .model_infer(request)
        .await
        .map(|_| ())
        .expect_err("refused");
    assert_eq!(refused.code(), code, "{refused:?}");
    assert!(refused.message().contains(needle), "{refused:?}");
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_grpc_contents_count_at_their_decoded_size() {
    // 100,000 zeros: about 100 KB on the wire, 800 KB as INT64 (1.6 MB while prost's vector
    // grows). Counted by their wire size, they passed wherever 100 KB of room was left.
    let (state, _, grpc) = ident_server(4 << 20).await;
    let mut client = grpc_client(grpc).await.max_decoding_message_size(64 << 20);
    // Other requests hold all but 1 MiB.
    let others = state
        .inflight_bytes
        .try_acquire_many(3 << 20)
        .expect("room for the others");
    // 1.6 MB decoded against 1 MiB of room.
    let request = typed_zeros(100_000);
    refused_with(&mut client, request, tonic::Code::Unavailable, "in flight").await;
    drop(others);
    all_given_back(&state).await;
    // With the room back, the same request is served on the same connection, whole.
    let answer = client
        .model_infer(typed_zeros(100_000))
        .await
        .expect("100,000 zeros fit in 4 MiB")
        .into_inner();
    assert_eq!(answer.outputs[0].shape, vec![100_000]);
    assert!(answer.raw_output_contents[0] == vec![0u8; 800_000]);
    all_given_back(&state).await;
    // One that could never fit is told so, not to retry.
    // 6.4 MB decoded against 4 MiB in all.
    let request = typed_zeros(400_000);
    refused_with(
        &mut client,
        request,
        tonic::Code::ResourceExhausted,
        "decoded",
    )
    .await;
    all_given_back(&state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_message_of_empty_inputs_is_refused_before_it_is_decoded() {
    // Four bytes per empty input and raw buffer on the wire, hundreds of bytes each in memory:
    // 2 MiB of them decoded to hundreds of MiB, uncounted, before any handler ran.
    let (state, _, grpc) = ident_server(16 << 20).await;
    let mut client = grpc_client(grpc).await;
    let n = 512 << 10;
    let hostile = pb::ModelInferRequest {
        model_name: "ident".into(),
        inputs: vec![Default::default(); n],
        raw_input_contents: vec![Vec::new(); n],
        ..Default::default()
    };
    assert_eq!(prost::Message::encoded_len(&hostile), 4 * n + 7);
    // A message that decodes to hundreds of MiB against 16 MiB.
    refused_with(
        &mut client,
        hostile,
        tonic::Code::ResourceExhausted,
        "decoded",
    )
    .await;
    all_given_back(&state).await;
    let answer = client
        .model_infer(typed_zeros(3))
        .await
        .expect("a good request after it")
        .into_inner();
    assert_eq!(answer.raw_output_contents[0], vec![0u8; 24]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_to_a_call_that_takes_names_is_refused() {
    // A model's metadata request takes a name and a version: a message of 2 MiB is no such
    // request, and one of empty map entries would take tens of times its size decoded.
    let (state, _, grpc) = ident_server(1 << 30).await;
    let mut client = grpc_client(grpc).await;
    let refused = client
        .model_metadata(pb::ModelMetadataRequest {
            name: "x".repeat(2 << 20),
            version: String::new(),
        })
        .await
        .map(|_| ())
        .expect_err("2 MiB of name");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("over the limit of 1048576 bytes"),
        "{}",
        &refused.message()[..refused.message().len().min(200)]
    );
    all_given_back(&state).await;
    let metadata = client
        .model_metadata(pb::ModelMetadataRequest {
            name: "ident".into(),
            version: String::new(),
        })
        .await
        .expect("a good request after it")
        .into_inner();
    assert_eq!(metadata.name, "ident");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_numbers_count_at_their_decoded_size() {
    // 100,000 zeros: 200 KB of JSON, 800 KB as INT64, against 512 KiB of room. Counted by the
    // body, they passed, and so did their 200 KB answer.
    let (_, app, _) = ident_server(512 << 10).await;
    let body = |n: usize| json!({"inputs": [{"name": "x", "datatype": "INT64", "shape": [n], "data": vec![0; n]}]});
    // More than the node's whole room: told so (413), not told to retry.
    let (status, refused) = post_json(&app, "/v2/models/ident/infer", &body(100_000)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or("")
            .contains("bytes of memory decoded, over the node's limit of 524288 bytes in flight"),
        "{refused}"
    );
    // 100,000 zeros in the request's parameters: 200 KB of JSON, over 3 MB of JSON values (they
    // were not counted at all).
    let mut with_parameters = body(1000);
    with_parameters["parameters"] = json!({"p": vec![0; 100_000]});
    let (status, refused) = post_json(&app, "/v2/models/ident/infer", &with_parameters).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{refused}");
    let (status, answer) = post_json(&app, "/v2/models/ident/infer", &body(1000)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outputs"][0]["data"], json!(vec![0; 1000]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_left_idle_after_a_request_holds_only_tonics_buffer() {
    // One request on a stream that then stays open and sends nothing: once it is answered, what
    // decoding it took is no longer counted (it stayed until the client's next frame), and the
    // message's own size is, for as long as the stream lasts: tonic's buffer keeps it.
    let (state, _, grpc) = ident_server(16 << 20).await;
    let mut client = grpc_client(grpc).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut answers = client
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    tx.send(typed_zeros(20_000)).await.expect("send");
    let answer = tokio_stream::StreamExt::next(&mut answers)
        .await
        .expect("an answer")
        .expect("a stream answer");
    assert_eq!(answer.error_message, "");
    // tonic keeps its buffer of the message's size for the stream's life, and that stays
    // counted; the request's weight decoded (twenty times more) does not.
    let message = prost::Message::encoded_len(&typed_zeros(20_000));
    let held = held_once_at_most(&state, message).await;
    assert!(held <= message, "{held} bytes held by an idle stream");
    // The stream still serves.
    tx.send(typed_zeros(3)).await.expect("send");
    let answer = tokio_stream::StreamExt::next(&mut answers)
        .await
        .expect("an answer")
        .expect("a stream answer");
    let response = answer.infer_response.expect("a response");
    assert_eq!(response.raw_output_contents[0], vec![0u8; 24]);
    drop(tx);
    drop(answers);
    all_given_back(&state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_do_not_echo_a_huge_name() {
    // A model name of 512 KiB: its NOT_FOUND named it whole, in a header the client's own
    // limit refused ("h2 protocol error"), and a JSON input's name came back whole in the body.
    let (state, app, grpc) = ident_server(16 << 20).await;
    let mut client = grpc_client(grpc).await;
    let huge = "m".repeat(512 << 10);
    let mut request = typed_zeros(3);
    request.model_name = huge.clone();
    let refused = refused_with(&mut client, request, tonic::Code::NotFound, "unknown model").await;
    assert!(
        refused.message().len() <= 1100,
        "{}",
        refused.message().len()
    );
    assert!(refused.message().starts_with("unknown model `mmm"));
    assert!(refused.message().contains("bytes left out"));
    all_given_back(&state).await;
    let answer = client
        .model_infer(typed_zeros(3))
        .await
        .expect("a good request after it")
        .into_inner();
    assert_eq!(answer.raw_output_contents[0], vec![0u8; 24]);

    let body = json!({"inputs": [{"name": huge, "datatype": "INT64", "shape": [1], "data": [0]}]});
    let (status, refused) = post_json(&app, "/v2/models/ident/infer", &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = refused["error"].as_str().unwrap_or("");
    assert!(message.len() <= 1100, "{}", message.len());
    assert!(
        message.starts_with("unknown input 'mmm"),
        "{}",
        &message[..100]
    );
    assert!(message.ends_with("the model's inputs are 'x'"), "{message}");
}
