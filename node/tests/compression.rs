//! Compressed bodies, as tritonclient sends and asks for them: a request body in gzip or deflate
//! is inflated (over HTTP and gRPC), an answer is compressed when `Accept-Encoding` asks, and a
//! body that is not what its coding says, inflates past the limits or names a coding the node
//! does not speak gets a clear error and leaves nothing held: the good request after it is
//! served.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use serde_json::Value;
use sophon_node::grpc::pb;
use sophon_node::http::{ApiState, HttpConfig, router};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Everything `r` reads: an encoder or decoder over a slice, run to its end.
fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    r.read_to_end(&mut out).expect("a valid stream");
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    read_all(flate2::read::GzEncoder::new(
        data,
        flate2::Compression::default(),
    ))
}

fn zlib(data: &[u8]) -> Vec<u8> {
    read_all(flate2::read::ZlibEncoder::new(
        data,
        flate2::Compression::default(),
    ))
}

fn raw_deflate(data: &[u8]) -> Vec<u8> {
    read_all(flate2::read::DeflateEncoder::new(
        data,
        flate2::Compression::default(),
    ))
}

/// The MLP's node with `config`, and its shared state (to read what it holds).
fn mlp_node(config: HttpConfig) -> (axum::Router, Arc<ApiState>) {
    let n = node();
    n.repo
        .add_bundle(&sophon_sdk::ready::mlp_bundle("mlp", &n.key).expect("pack"))
        .expect("load");
    let state = ApiState::new(n.repo, config);
    state.ready.store(true, Ordering::Release);
    let state = Arc::new(state);
    (router(state.clone()), state)
}

/// Post `body` to the MLP's infer route with `headers`; the status, body and headers.
async fn post(
    app: &axum::Router,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> (StatusCode, Vec<u8>, axum::http::HeaderMap) {
    let mut req = Request::post("/v2/models/mlp/infer").header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    call(app, req.body(Body::from(body)).expect("request")).await
}

fn json_request(rows: usize) -> Vec<u8> {
    serde_json::to_vec(&mlp_request(rows)).expect("json")
}

/// Check an answer to `mlp_request(rows)` against the reference forward pass.
fn assert_answer(body: &[u8], rows: usize) {
    let answer: Value = serde_json::from_slice(body).expect("a JSON answer");
    let got = f32s(&answer["outputs"][0]["data"]);
    let want = sophon_sdk::ready::mlp().forward(&mlp_input(rows));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "mlp output {g} != reference {w}");
    }
}

fn error_of(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).expect("a JSON error");
    v["error"].as_str().expect("error").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn gzip_and_deflate_request_bodies_are_inflated() {
    let (app, state) = mlp_node(HttpConfig::default());
    let plain = json_request(3);
    for (coding, body) in [
        ("gzip", gzip(&plain)),
        ("x-gzip", gzip(&plain)),
        ("deflate", zlib(&plain)),
        // Raw deflate, which some clients send as `deflate` too.
        ("deflate", raw_deflate(&plain)),
        ("identity", plain.clone()),
    ] {
        let (status, body, _) = post(&app, body, &[("content-encoding", coding)]).await;
        assert_eq!(status, StatusCode::OK, "{coding}: {}", error_of(&body));
        assert_answer(&body, 3);
    }

    // Binary tensors: the JSON header's length is that of the inflated body, as in Triton.
    let header = br#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,784],"parameters":{"binary_data_size":3136}}]}"#;
    let mut binary = header.to_vec();
    binary.extend(mlp_input(1).iter().flat_map(|v| v.to_le_bytes()));
    let len = header.len().to_string();
    let (status, body, _) = post(
        &app,
        gzip(&binary),
        &[
            ("content-encoding", "gzip"),
            ("inference-header-content-length", &len),
            ("content-type", "application/octet-stream"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", error_of(&body));
    assert_answer(&body, 1);
    assert_eq!(
        state.inflight_bytes.available_permits(),
        HttpConfig::default().max_inflight_bytes,
        "every request's bytes are given back"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_are_compressed_when_the_client_asks() {
    let (app, _) = mlp_node(HttpConfig::default());
    let inflate_gzip = |b: &[u8]| read_all(flate2::read::GzDecoder::new(b));
    let inflate_zlib = |b: &[u8]| read_all(flate2::read::ZlibDecoder::new(b));
    // An answer of 8 rows is well over the size from which answers are compressed.
    for (accept, want) in [
        ("gzip", Some("gzip")),
        ("deflate", Some("deflate")),
        ("gzip;q=0, deflate", Some("deflate")),
        ("deflate;q=0.5, gzip;q=0.8", Some("gzip")),
        ("br, *", Some("gzip")),
        ("identity", None),
        ("gzip;q=0", None),
    ] {
        let (status, body, headers) =
            post(&app, json_request(8), &[("accept-encoding", accept)]).await;
        assert_eq!(status, StatusCode::OK, "{accept}");
        let got = headers
            .get("content-encoding")
            .map(|v| v.to_str().expect("ascii"));
        assert_eq!(got, want, "Accept-Encoding: {accept}");
        let plain = match want {
            Some("gzip") => inflate_gzip(&body),
            Some(_) => inflate_zlib(&body),
            None => body,
        };
        // Compressed or not, the answer says that it depends on Accept-Encoding.
        assert_eq!(
            headers.get("vary").map(|v| v.to_str().expect("ascii")),
            Some("accept-encoding")
        );
        assert_answer(&plain, 8);
    }

    // A short answer goes as it is.
    let req = Request::get("/v2/health/live")
        .header("accept-encoding", "gzip")
        .body(Body::empty())
        .expect("request");
    let (status, _, headers) = call(&app, req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("content-encoding").is_none());
    assert!(headers.get("vary").is_none());

    // A request and its answer both compressed, as tritonclient sends them with both options.
    let (status, body, headers) = post(
        &app,
        zlib(&json_request(8)),
        &[("content-encoding", "deflate"), ("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-encoding"], "gzip");
    assert_answer(&inflate_gzip(&body), 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_codings_get_clear_errors_and_hold_nothing() {
    let good = gzip(&json_request(2));
    let plain = json_request(2);
    let mut truncated = good.clone();
    truncated.truncate(good.len() / 2);
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    // 16 MiB of zeros: 16 KiB on the wire, 16 times the body limit once inflated.
    let bomb = gzip(&vec![0u8; 16 << 20]);
    assert!(bomb.len() < 32 << 10, "{}", bomb.len());
    // 200 KiB inflated: under the body limit, over the bytes in flight of a node with 64 KiB.
    let wide = gzip(&vec![b' '; 200 << 10]);

    let cases: Vec<(&str, Vec<u8>, &str, StatusCode, &str)> = vec![
        (
            "an unknown coding",
            plain.clone(),
            "br",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Encoding 'br' is not supported",
        ),
        (
            "two codings",
            gzip(&good),
            "gzip, gzip",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "is not supported",
        ),
        (
            "a plain body said to be gzip",
            plain.clone(),
            "gzip",
            StatusCode::BAD_REQUEST,
            "not valid gzip",
        ),
        (
            "a truncated gzip body",
            truncated,
            "gzip",
            StatusCode::BAD_REQUEST,
            "not valid gzip",
        ),
        (
            "a gzip body with a flipped byte",
            flipped,
            "gzip",
            StatusCode::BAD_REQUEST,
            "not valid gzip",
        ),
        (
            "a body that is not deflate",
            plain.clone(),
            "deflate",
            StatusCode::BAD_REQUEST,
            "not valid deflate",
        ),
        (
            "a gzip bomb",
            bomb,
            "gzip",
            StatusCode::PAYLOAD_TOO_LARGE,
            "over the limit of 1048576 bytes once inflated from gzip",
        ),
    ];
    let config = HttpConfig {
        max_body_bytes: 1 << 20,
        ..HttpConfig::default()
    };
    refused_then_served(config, &good, cases).await;
    let narrow = HttpConfig {
        max_body_bytes: 1 << 20,
        max_inflight_bytes: 64 << 10,
        ..HttpConfig::default()
    };
    let cases = vec![(
        "a body that inflates past the bytes in flight",
        wide,
        "gzip",
        StatusCode::SERVICE_UNAVAILABLE,
        "retry later",
    )];
    refused_then_served(narrow, &good, cases).await;
}

/// Send each bad case to a node with `config`, then `good` (gzip), twice each; at the end the
/// node holds no bytes.
async fn refused_then_served(
    config: HttpConfig,
    good: &[u8],
    cases: Vec<(&str, Vec<u8>, &str, StatusCode, &str)>,
) {
    let (app, state) = mlp_node(config.clone());
    for (what, body, coding, status, says) in cases {
        // Twice each: a request that leaked what it held would fail the good one after it.
        for _ in 0..2 {
            let (got, body, _) = post(&app, body.clone(), &[("content-encoding", coding)]).await;
            let error = error_of(&body);
            assert_eq!(got, status, "{what}: {error}");
            assert!(error.contains(says), "{what}: {error:?} lacks {says:?}");
            let (got, body, _) = post(&app, good.to_vec(), &[("content-encoding", "gzip")]).await;
            assert_eq!(got, StatusCode::OK, "after {what}: {}", error_of(&body));
            assert_answer(&body, 2);
        }
    }
    assert_eq!(
        state.inflight_bytes.available_permits(),
        config.max_inflight_bytes,
        "nothing stays held"
    );
}

fn assert_grpc_answer(answer: &pb::ModelInferResponse, rows: usize) {
    let got: Vec<f32> = answer.raw_output_contents[0]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    let want = sophon_sdk::ready::mlp().forward(&mlp_input(rows));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "mlp output {g} != reference {w}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn compressed_grpc_requests_are_read_within_the_limit() {
    use tonic::codec::CompressionEncoding;
    let server = mlp_server(HttpConfig {
        max_body_bytes: 1 << 20,
        ..HttpConfig::default()
    })
    .await;
    let grpc = serve_grpc(&server).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Deflate] {
        let mut client = GrpcClient::new(channel.clone()).send_compressed(encoding);
        let answer = client
            .model_infer(mlp_grpc_request("mlp", 4))
            .await
            .expect("a compressed request is served")
            .into_inner();
        assert_grpc_answer(&answer, 4);

        // A request that inflates past the limit (400 rows: 1.25 MB of floats, compressed to
        // far less) is refused as too large, and the next one is served.
        let status = client
            .model_infer(mlp_grpc_request("mlp", 400))
            .await
            .expect_err("over the limit once inflated");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        let answer = client
            .model_infer(mlp_grpc_request("mlp", 1))
            .await
            .expect("served after a refusal")
            .into_inner();
        assert_grpc_answer(&answer, 1);
    }
}

/// `rows` rows of MLP input that do not compress much (an LCG's floats), so that a compressed
/// message spans many HTTP/2 frames.
fn noisy_input(rows: usize) -> Vec<f32> {
    let mut x = 0x2545_f491u32;
    (0..rows * 784)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 8) as f32 / (1 << 24) as f32
        })
        .collect()
}

fn grpc_request_of(input: &[f32]) -> pb::ModelInferRequest {
    let mut request = mlp_grpc_request("mlp", input.len() / 784);
    request.raw_input_contents = vec![input.iter().flat_map(|v| v.to_le_bytes()).collect()];
    request
}

fn assert_grpc_answer_of(answer: &pb::ModelInferResponse, input: &[f32]) {
    let got: Vec<f32> = answer.raw_output_contents[0]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    let want = sophon_sdk::ready::mlp().forward(input);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "mlp output {g} != reference {w}");
    }
}

/// Wait (a second at most) until every byte in flight of `state` is given back.
async fn all_given_back(state: &ApiState, what: &str) {
    for _ in 0..100 {
        if state.inflight_bytes.available_permits() == state.config.max_inflight_bytes {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!(
        "{what}: {} of {} bytes in flight still held",
        state.config.max_inflight_bytes - state.inflight_bytes.available_permits(),
        state.config.max_inflight_bytes
    );
}

/// Call `ModelInfer` with a body made by hand (`grpc-encoding: coding`); its gRPC status.
async fn raw_model_infer(
    channel: &tonic::transport::Channel,
    coding: &str,
    body: Vec<u8>,
) -> tonic::Status {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;
    let request = axum::http::Request::post(format!(
        "http://{}/inference.GRPCInferenceService/ModelInfer",
        "127.0.0.1"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-encoding", coding)
    .body(full_body(body))
    .expect("request");
    let response = channel.clone().oneshot(request).await.expect("an answer");
    let (parts, body) = response.into_parts();
    if let Some(status) = tonic::Status::from_header_map(&parts.headers) {
        return status;
    }
    let collected = body.collect().await.expect("the body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    tonic::Status::from_header_map(&trailers).expect("a grpc-status")
}

/// A gRPC message: the compressed flag, the length, the bytes.
fn grpc_message(compressed: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(compressed)];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn compressed_grpc_messages_are_counted_as_they_inflate() {
    use prost::Message as _;
    use tonic::codec::CompressionEncoding;
    // Room for requests of a few rows only: 64 KiB in flight, 1 MiB per message.
    let server = mlp_server(HttpConfig {
        max_body_bytes: 1 << 20,
        max_inflight_bytes: 64 << 10,
        ..HttpConfig::default()
    })
    .await;
    let state = server.state().clone();
    let grpc = serve_grpc(&server).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let good = grpc_request_of(&noisy_input(2));
    // 100 rows of zeros: 313 KB once inflated, a few hundred bytes on the wire.
    let zeros = grpc_request_of(&vec![0.0; 100 * 784]);
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Deflate] {
        let mut client = GrpcClient::new(channel.clone()).send_compressed(encoding);
        for _ in 0..2 {
            let status = client
                .model_infer(zeros.clone())
                .await
                .expect_err("no room once inflated");
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(
                status.message().contains("bytes of requests in flight"),
                "{status:?}"
            );
            all_given_back(&state, "after a message that inflates past the room").await;
            let answer = client
                .model_infer(good.clone())
                .await
                .expect("served after a refusal")
                .into_inner();
            assert_grpc_answer_of(&answer, &noisy_input(2));
            all_given_back(&state, "after a good message").await;
        }
    }

    // Bodies made by hand: a compressed message that is not gzip, a compressed length over the
    // limit, and a gzip stream cut short; each refused with its reason, then a good one.
    let encoded = good.encode_to_vec();
    let mut cut = gzip(&encoded);
    cut.truncate(cut.len() / 2);
    let cases: [(&str, Vec<u8>, tonic::Code, &str); 4] = [
        (
            "gzip",
            grpc_message(true, b"this is not gzip at all"),
            tonic::Code::InvalidArgument,
            "not valid gzip",
        ),
        (
            "deflate",
            grpc_message(true, &[0xff; 64]),
            tonic::Code::InvalidArgument,
            "not valid deflate",
        ),
        (
            "gzip",
            grpc_message(true, &cut),
            tonic::Code::InvalidArgument,
            "not valid gzip",
        ),
        (
            "gzip",
            {
                let mut m = vec![1];
                m.extend_from_slice(&(2u32 << 20).to_be_bytes());
                m.extend_from_slice(&[0; 64]);
                m
            },
            tonic::Code::ResourceExhausted,
            "over the limit",
        ),
    ];
    for (coding, body, code, says) in cases {
        let status = raw_model_infer(&channel, coding, body).await;
        assert_eq!(status.code(), code, "{says}: {status:?}");
        assert!(status.message().contains(says), "{says}: {status:?}");
        all_given_back(&state, says).await;
        // The same request, whole and compressed by hand, is served.
        let status = raw_model_infer(&channel, "gzip", grpc_message(true, &gzip(&encoded))).await;
        assert_eq!(status.code(), tonic::Code::Ok, "after {says}: {status:?}");
        all_given_back(&state, "after a good message").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn large_and_streamed_compressed_grpc_messages_are_served() {
    use tonic::codec::CompressionEncoding;
    let server = mlp_server(HttpConfig {
        max_body_bytes: 4 << 20,
        ..HttpConfig::default()
    })
    .await;
    let state = server.state().clone();
    let grpc = serve_grpc(&server).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Deflate] {
        let mut client = GrpcClient::new(channel.clone()).send_compressed(encoding);
        // 1,000 rows of noise: 3 MB, still megabytes compressed, so many HTTP/2 frames.
        let input = noisy_input(1000);
        let answer = client
            .model_infer(grpc_request_of(&input))
            .await
            .expect("a large compressed message is served")
            .into_inner();
        assert_grpc_answer_of(&answer, &input);

        // A stream of messages of different sizes, each answered (by its id: a stream's
        // requests run side by side).
        let sizes = [1usize, 40, 3, 200, 7];
        let requests: Vec<_> = sizes
            .iter()
            .map(|&rows| pb::ModelInferRequest {
                id: rows.to_string(),
                ..grpc_request_of(&noisy_input(rows))
            })
            .collect();
        let mut answers = client
            .model_stream_infer(tokio_stream::iter(requests))
            .await
            .expect("a stream")
            .into_inner();
        let mut seen = Vec::new();
        while let Some(answer) = answers.message().await.expect("an answer") {
            assert!(answer.error_message.is_empty(), "{}", answer.error_message);
            let response = answer.infer_response.expect("a response");
            let rows: usize = response.id.parse().expect("the request's id");
            assert_grpc_answer_of(&response, &noisy_input(rows));
            seen.push(rows);
        }
        seen.sort_unstable();
        let mut want = sizes.to_vec();
        want.sort_unstable();
        assert_eq!(seen, want, "every request answered once");
        all_given_back(&state, "after the stream").await;
    }
}

/// The shared state of a node serving the MLP with `max_body_bytes`, for the gRPC layer alone.
async fn layer_state(max_body_bytes: usize) -> Arc<ApiState> {
    mlp_server(HttpConfig {
        max_body_bytes,
        ..HttpConfig::default()
    })
    .await
    .state()
    .clone()
}

/// Send `body` (sent with `grpc-encoding: coding`, if any) to `ModelInfer` through the node's
/// gRPC layer in front of `reader`, a service that reads it as tonic's decoder would; what
/// `reader` answers.
async fn through_layer<T>(
    state: &Arc<ApiState>,
    reader: impl tower::Service<
        axum::http::Request<tonic::body::Body>,
        Response = T,
        Error = std::convert::Infallible,
    >,
    coding: Option<&str>,
    body: tonic::body::Body,
) -> T {
    use tower::ServiceExt as _;
    let mut request = axum::http::Request::post("/inference.GRPCInferenceService/ModelInfer");
    if let Some(coding) = coding {
        request = request.header("grpc-encoding", coding);
    }
    let request = request.body(body).expect("request");
    sophon_node::grpc::inflate::Inflating::new(reader, state.clone())
        .oneshot(request)
        .await
        .expect("read")
}

/// An inference request of `n` zeros as raw contents, encoded.
fn raw_zeros(n: usize) -> Vec<u8> {
    prost::Message::encode_to_vec(&sophon_node::grpc::pb::ModelInferRequest {
        raw_input_contents: vec![vec![0; n]],
        ..Default::default()
    })
}

/// A whole body of `bytes`.
fn full_body(bytes: Vec<u8>) -> tonic::body::Body {
    tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(bytes)))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compressed_grpc_message_is_counted_while_it_is_decoded() {
    use http_body_util::BodyExt as _;
    // The layer in front of tonic, over a service that reads the body as tonic's decoder does
    // and watches the node's bytes in flight as it goes.
    let state = layer_state(4 << 20).await;
    let max = state.config.max_inflight_bytes;
    let watched = state.clone();
    let reader = tower::service_fn(move |request: axum::http::Request<tonic::body::Body>| {
        let state = watched.clone();
        async move {
            let mut body = request.into_body();
            let (mut bytes, mut least) = (Vec::new(), usize::MAX);
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.expect("a frame").into_data() {
                    bytes.extend_from_slice(&data);
                }
                least = least.min(state.inflight_bytes.available_permits());
            }
            Ok::<_, std::convert::Infallible>((bytes, least))
        }
    });
    // A compressed request of 2 MiB of zeros, then a plain one, in one body (as on a stream).
    let zeros = raw_zeros(2 << 20);
    let plain = prost::Message::encode_to_vec(&sophon_node::grpc::pb::ModelInferRequest {
        model_name: "a plain message".into(),
        ..Default::default()
    });
    let mut body = grpc_message(true, &gzip(&zeros));
    body.extend(grpc_message(false, &plain));
    let (read, least) = through_layer(&state, reader, Some("gzip"), full_body(body)).await;
    let mut want = grpc_message(false, &zeros);
    want.extend(grpc_message(false, &plain));
    assert!(read == want, "the messages arrive inflated, flags cleared");
    assert!(
        max - least >= zeros.len(),
        "the inflated message was held uncounted: at most {} bytes counted",
        max - least
    );
    all_given_back(&state, "after the body is read").await;
}

/// A body that sends `data` as one frame, then neither more nor its end until `open` is dropped.
fn held_open_body(data: Vec<u8>) -> (tonic::body::Body, tokio::sync::mpsc::Sender<()>) {
    held_open_frames(vec![data])
}

/// A body that sends each of `frames`, then neither more nor its end until `open` is dropped.
fn held_open_frames(frames: Vec<Vec<u8>>) -> (tonic::body::Body, tokio::sync::mpsc::Sender<()>) {
    let (open, closed) = tokio::sync::mpsc::channel::<()>(1);
    let first = futures_util::stream::iter(frames.into_iter().map(|data| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(data)))
    }));
    let rest = futures_util::stream::unfold(closed, |mut closed| async move {
        closed.recv().await;
        None::<(
            Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
            _,
        )>
    });
    let stream = futures_util::StreamExt::chain(first, rest);
    (
        tonic::body::Body::new(http_body_util::StreamBody::new(stream)),
        open,
    )
}

/// A service in front of which the layer runs: it reads `bytes` of the body, then waits for
/// more (as a unary call waits for the end of the body before its handler runs; the client
/// sends nothing more), and answers with what the node's bytes in flight count meanwhile.
fn reads_then_waits(
    state: &Arc<ApiState>,
    bytes: usize,
) -> impl tower::Service<
    axum::http::Request<tonic::body::Body>,
    Response = usize,
    Error = std::convert::Infallible,
> {
    use http_body_util::BodyExt as _;
    let max = state.config.max_inflight_bytes;
    let watched = state.clone();
    tower::service_fn(move |request: axum::http::Request<tonic::body::Body>| {
        let state = watched.clone();
        async move {
            let mut body = request.into_body();
            let mut got = 0;
            while got < bytes {
                let frame = body.frame().await.expect("a frame").expect("data");
                got += frame.into_data().map_or(0, |d| d.len());
            }
            let waiting =
                tokio::time::timeout(std::time::Duration::from_millis(200), body.frame()).await;
            assert!(waiting.is_err(), "the client sent nothing more");
            Ok::<_, std::convert::Infallible>(max - state.inflight_bytes.available_permits())
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_sent_in_pieces_stays_counted_until_it_is_whole() {
    let state = layer_state(4 << 20).await;
    // A 2 MiB message announced, 1.5 MiB of it sent in two frames, then nothing: the layer
    // holds both pieces until the message is whole (once, tonic held them; the first piece's
    // bytes were given back when the second arrived, so that a client could hold a message of
    // the body limit per stream with one frame of it counted). An inference message reaches
    // tonic only whole, so tonic sees nothing of it yet.
    let message = grpc_message(false, &vec![7u8; 2 << 20]);
    let (first, second) = (
        message[..5 + (1 << 20)].to_vec(),
        message[5 + (1 << 20)..5 + (3 << 19)].to_vec(),
    );
    let (body, open) = held_open_frames(vec![first, second]);
    // The reader gets nothing of it, and nothing more is sent.
    let counted = through_layer(&state, reads_then_waits(&state, 0), None, body).await;
    assert!(
        counted >= 3 << 19,
        "both pieces of the unfinished message stay counted: {counted} bytes"
    );
    drop(open);
    all_given_back(&state, "once the body is dropped").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_stays_counted_until_the_client_sends_more_or_ends() {
    let state = layer_state(4 << 20).await;
    let zeros = raw_zeros(2 << 20);
    // Compressed (inflated by the node) and plain (passed on as it arrives): both counted.
    for (coding, message) in [
        (Some("gzip"), grpc_message(true, &gzip(&zeros))),
        (None, grpc_message(false, &zeros)),
    ] {
        let (body, open) = held_open_body(message);
        // The message and its 5-byte prefix.
        let reader = reads_then_waits(&state, 5 + zeros.len());
        let counted = through_layer(&state, reader, coding, body).await;
        assert!(
            counted >= zeros.len(),
            "{coding:?}: while the body stays open, the message stays counted: {counted} bytes"
        );
        drop(open);
        all_given_back(&state, "once the body is dropped").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_dropped_while_its_message_inflates_gives_everything_back() {
    use http_body_util::BodyExt as _;
    let state = layer_state(64 << 20).await;
    // 60 MiB of zeros: about 60 KB compressed, and many slices of inflating, each followed by a
    // yield where the call can be dropped (a client's deadline, a reset stream).
    let bomb = gzip(&vec![0u8; 60 << 20]);
    for after_ms in [0u64, 1, 3, 10, 30] {
        let reader = tower::service_fn(
            move |request: axum::http::Request<tonic::body::Body>| async move {
                let mut body = request.into_body();
                let _ = tokio::time::timeout(std::time::Duration::from_millis(after_ms), async {
                    while body.frame().await.is_some() {}
                })
                .await;
                Ok::<_, std::convert::Infallible>(())
            },
        );
        through_layer(
            &state,
            reader,
            Some("gzip"),
            full_body(grpc_message(true, &bomb)),
        )
        .await;
        all_given_back(&state, &format!("a call dropped after {after_ms} ms")).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_of_one_byte_frames_arrives_whole_and_gives_everything_back() {
    use http_body_util::BodyExt as _;
    // Two inference messages, each byte in a frame of its own, the second starting in the
    // frame that ends the first: tonic gets each whole, prefix first, byte for byte, and every
    // count goes back with the body.
    let state = layer_state(4 << 20).await;
    let (a, b) = (raw_zeros(3000), raw_zeros(17));
    let wire = [grpc_message(false, &a), grpc_message(false, &b)].concat();
    let mut frames: Vec<Vec<u8>> = wire.iter().map(|&byte| vec![byte]).collect();
    // The first message's last byte and the second's first, in one frame.
    let last = 5 + a.len() - 1;
    let joined = [frames.remove(last), frames.remove(last)].concat();
    frames.insert(last, joined);
    let (body, open) = held_open_frames(frames);
    let total = wire.len();
    let reader = tower::service_fn(
        move |request: axum::http::Request<tonic::body::Body>| async move {
            let mut body = request.into_body();
            let (mut frames, mut got) = (Vec::new(), Vec::new());
            while got.len() < total {
                let frame = body.frame().await.expect("a frame").expect("data");
                let data = frame.into_data().expect("data");
                frames.push(data.len());
                got.extend_from_slice(&data);
            }
            Ok::<_, std::convert::Infallible>((frames, got))
        },
    );
    let (frames, got) = through_layer(&state, reader, None, body).await;
    assert_eq!(
        frames,
        [5, a.len(), 5, b.len()],
        "each message whole, after its prefix"
    );
    assert!(got == wire, "byte for byte");
    drop(open);
    all_given_back(&state, "once the body is dropped").await;
}
