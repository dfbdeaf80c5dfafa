//! `ModelStreamInfer` over a real socket: the requests of one stream run at once (as many unary
//! calls would), their answers come back in the order the requests were sent, a bad request in
//! the middle is answered with its error while the ones after it are served, and a client that
//! goes away mid-stream leaves nothing held.

mod common;

use common::*;
use sophon_node::grpc::pb;
use sophon_node::http::HttpConfig;

fn request(id: usize, rows: usize) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        id: id.to_string(),
        ..mlp_grpc_request("mlp", rows)
    }
}

/// A node serving the MLP (two requests at once) over gRPC; its repository and gRPC address.
async fn serve() -> (
    std::sync::Arc<sophon_node::Repository>,
    std::net::SocketAddr,
) {
    let n = node_with(
        sophon_node::ServingLimits {
            default_concurrency: 2,
            ..Default::default()
        },
        HttpConfig::default(),
    );
    n.repo
        .add_bundle(&sophon_sdk::ready::mlp_bundle("mlp", &n.key).expect("pack"))
        .expect("load");
    let repo = n.repo.clone();
    let server = sophon_node::NodeServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        n.repo,
        HttpConfig::default(),
    )
    .await
    .expect("bind");
    (repo, serve_grpc(&server).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_streams_requests_run_at_once_and_are_answered_in_order() {
    let (repo, grpc) = serve().await;
    let mut client = grpc_client(grpc).await;

    // Large and small requests alternate, so that a small one finishes before the large one sent
    // before it; request 7 names an input the model does not have.
    let rows = |i: usize| if i.is_multiple_of(2) { 1024 } else { 1 };
    let requests: Vec<_> = (0..16)
        .map(|i| {
            let mut r = request(i, rows(i));
            if i == 7 {
                r.inputs[0].name = "nope".into();
            }
            r
        })
        .collect();
    let mut answers = client
        .model_stream_infer(tokio_stream::iter(requests))
        .await
        .expect("stream")
        .into_inner();

    // Watch the node's requests in flight while the stream is answered, from a thread of its
    // own (a timer's millisecond would miss requests that overlap for less).
    let inflight = repo.metrics().inflight.clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watching = std::thread::spawn({
        let done = done.clone();
        move || {
            let mut most = 0;
            while most < 2 && !done.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(inflight.get());
                std::thread::yield_now();
            }
            most
        }
    });
    let mut got = Vec::new();
    while let Some(answer) = tokio_stream::StreamExt::next(&mut answers).await {
        got.push(answer.expect("a stream answer"));
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = watching.join().expect("watcher");
    assert_eq!(got.len(), 16);
    for (i, answer) in got.iter().enumerate() {
        if i == 7 {
            // The error answer names its request, as Triton's do.
            let named = answer
                .infer_response
                .as_ref()
                .expect("the failed request named");
            assert_eq!(named.id, "7");
            assert!(named.outputs.is_empty() && named.raw_output_contents.is_empty());
            assert!(
                answer.error_message.contains("nope"),
                "{}",
                answer.error_message
            );
            continue;
        }
        assert_eq!(answer.error_message, "", "request {i}");
        let response = answer.infer_response.as_ref().expect("a response");
        assert_eq!(response.id, i.to_string(), "answers come in request order");
        let values: Vec<f32> = response.raw_output_contents[0]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let want = sophon_sdk::ready::mlp().forward(&mlp_input(rows(i)));
        assert_eq!(values.len(), want.len(), "request {i}");
        for (g, w) in values.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "request {i}: {g} != {w}");
        }
    }
    assert!(most > 1, "the stream's requests ran one at a time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_leaves_nothing_held() {
    let (repo, grpc) = serve().await;
    let mut client = grpc_client(grpc).await;
    let inflight = repo.metrics().inflight.clone();
    // A stream whose sender stays open: 32 large requests, then the client goes away while
    // they run.
    let (send, asks) = tokio::sync::mpsc::channel(64);
    for i in 0..32 {
        send.send(request(i, 1024)).await.expect("queue a request");
    }
    let mut answers = client
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(asks))
        .await
        .expect("stream")
        .into_inner();
    let first = tokio_stream::StreamExt::next(&mut answers).await;
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    drop((answers, send, client));
    // What was running finishes or is aborted; nothing stays in flight.
    let started = std::time::Instant::now();
    while inflight.get() > 0 && started.elapsed() < std::time::Duration::from_secs(30) {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        inflight.get(),
        0,
        "requests still in flight after the client left"
    );
    // The model's slots all came back: a new stream of 4 is answered in full.
    let mut client = grpc_client(grpc).await;
    let requests: Vec<_> = (0..4).map(|i| request(i, 1)).collect();
    let mut answers = client
        .model_stream_infer(tokio_stream::iter(requests))
        .await
        .expect("stream")
        .into_inner();
    let mut served = 0;
    while let Some(answer) = tokio_stream::StreamExt::next(&mut answers).await {
        let answer = answer.expect("an answer");
        assert_eq!(answer.error_message, "");
        served += 1;
    }
    assert_eq!(served, 4);
}
