//! Graceful shutdown over a real socket: a request in flight when shutdown begins still gets its
//! whole answer, and the server then stops.

mod common;

use common::*;
use sophon_node::NodeServer;
use sophon_node::http::HttpConfig;
use sophon_sdk::components::hostile;
use sophon_sdk::ready;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_finish_on_shutdown() {
    let n = node();
    let wasm = std::fs::read(hostile::SPIN).expect("guest built");
    n.repo
        .add_bundle(&ready::hostile_bundle("spin", &wasm, 64, 700, &n.key).expect("pack"))
        .expect("load");
    let server = NodeServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        n.repo.clone(),
        HttpConfig::default(),
    )
    .await
    .expect("bind");
    let addr = server.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let client = std::thread::spawn(move || {
        let body = r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1.0]}]}"#;
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        write!(
            s,
            "POST /v2/models/spin/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("read");
        answer
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = Instant::now();
    stop.send(()).expect("signal");
    let answer = tokio::task::spawn_blocking(move || client.join().expect("client"))
        .await
        .expect("join");
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("deadline of 700 ms"), "{answer}");
    serving.await.expect("task").expect("server stops cleanly");
    assert!(asked.elapsed() < Duration::from_secs(5));
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "no longer listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_what_is_left_at_the_drain_deadline() {
    let n = node();
    let wasm = std::fs::read(hostile::SLEEPER).expect("guest built");
    // The sleeper holds its request until its own deadline of 5 s.
    n.repo
        .add_bundle(&ready::hostile_bundle("sleeper", &wasm, 64, 5_000, &n.key).expect("pack"))
        .expect("load");
    let server = NodeServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        n.repo.clone(),
        HttpConfig::default(),
    )
    .await
    .expect("bind")
    .with_drain_deadline(Duration::from_millis(500));
    let addr = server.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let _client = std::thread::spawn(move || {
        let body = r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1.0]}]}"#;
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        let _ = write!(
            s,
            "POST /v2/models/sleeper/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    stop.send(()).expect("signal");
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("shutdown ends at the drain deadline, not when the guest wakes")
        .expect("task")
        .expect("server stops cleanly");
    assert!(asked.elapsed() < Duration::from_secs(3));
}
