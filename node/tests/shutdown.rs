//! The accept loop over a real socket: a request in flight when shutdown begins still gets its
//! whole answer, and the server then stops; a kept-alive connection serves good requests after
//! bad ones, and when idle it does not hold shutdown; a request whose body is still arriving when
//! shutdown begins is answered, and no new connection is accepted meanwhile.

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
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "new connections are refused while the request in flight finishes"
    );
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

/// One request over a kept-alive connection; the answer's status line and body.
fn exchange(s: &mut std::net::TcpStream, body: &str) -> (String, String) {
    write!(
        s,
        "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("utf-8 head");
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().expect("length"))
        })
        .expect("content-length");
    let mut answer = vec![0u8; length];
    s.read_exact(&mut answer).expect("body");
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, String::from_utf8(answer).expect("utf-8 body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_serves_bad_then_good_requests_and_does_not_hold_shutdown() {
    let server = mlp_server(HttpConfig::default()).await;
    let addr = server.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let good = mlp_request(1).to_string();
    let bad = r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,3],"data":[1,2,3]}]}"#;
    let (idle, answers) = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        let mut answers = Vec::new();
        for body in [
            good.as_str(),
            bad,
            "{not json",
            good.as_str(),
            good.as_str(),
        ] {
            answers.push(exchange(&mut s, body));
        }
        (s, answers)
    })
    .await
    .expect("client");
    let statuses: Vec<&str> = answers.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        statuses,
        [
            "HTTP/1.1 200 OK",
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK"
        ],
        "{answers:?}"
    );
    assert_mlp_answer(&serde_json::from_str(&answers[0].1).expect("json answer"));
    assert_eq!(
        answers[0].1, answers[3].1,
        "the same answer after the bad ones"
    );
    assert_eq!(answers[3].1, answers[4].1);

    // The connection stays open and idle; shutdown closes it instead of waiting for the drain
    // deadline (30 s).
    let asked = Instant::now();
    stop.send(()).expect("signal");
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("an idle connection does not hold shutdown")
        .expect("task")
        .expect("server stops cleanly");
    assert!(asked.elapsed() < Duration::from_secs(5));
    let mut idle = idle;
    let mut rest = Vec::new();
    let _ = idle.read_to_end(&mut rest);
    assert!(rest.is_empty(), "closed without a word: {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_is_still_arriving_at_shutdown_is_answered() {
    let server = mlp_server(HttpConfig::default()).await;
    let addr = server.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let body = mlp_request(1).to_string();
    let (half, rest) = body.split_at(body.len() / 2);
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{half}",
        body.len()
    )
    .expect("send the head and half the body");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(()).expect("signal");
    // The connection has seen the stop (and been asked to finish) before the rest arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rest = rest.to_string();
    let answer = tokio::task::spawn_blocking(move || {
        s.write_all(rest.as_bytes()).expect("send the rest");
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .expect("read the answer, then the close");
        answer
    })
    .await
    .expect("client");
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    let json = answer.split("\r\n\r\n").nth(1).expect("a body");
    assert_mlp_answer(&serde_json::from_str(json).expect("json"));
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("the server stops once the answer is out")
        .expect("task")
        .expect("server stops cleanly");
}
