//! Clients that are slow or hold back, over a real socket: a head that does not arrive, a body
//! that does not arrive, a body announced but never sent, room reserved ahead of a body's
//! bytes, answers never read, more connections than the node serves at once, a gRPC client that
//! does not open HTTP/2 (the two ports share the connection limit), a gRPC client that reads
//! none of its answer, and gRPC clients that grant no window for their answers (a stream's and
//! unary ones). Each is bounded, and each time a good request is served afterwards.

mod common;

use common::*;
use sophon_node::http::HttpConfig;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A node serving the MLP with `config`; its address, and the sender that stops it.
async fn serve(config: HttpConfig) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let server = mlp_server(config).await;
    let addr = server.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

/// What the server sends until it closes the connection or `wait` passes.
fn read_all(s: &mut TcpStream, wait: Duration) -> String {
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A good MLP request on a new connection; its status line.
fn good_request(addr: SocketAddr) -> String {
    let body = mlp_request(1).to_string();
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let answer = read_all(&mut s, Duration::from_secs(20));
    answer.lines().next().unwrap_or_default().to_string()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("client thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_does_not_arrive_in_time_closes_the_connection() {
    let (addr, _stop) = serve(HttpConfig {
        header_timeout: Duration::from_millis(300),
        ..HttpConfig::default()
    })
    .await;
    let (closed_after, idle_closed_after, answer) = blocking(move || {
        let mut slow = TcpStream::connect(addr).expect("connect");
        slow.write_all(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n")
            .expect("half a head");
        let started = Instant::now();
        let said = read_all(&mut slow, Duration::from_secs(10));
        let closed_after = started.elapsed();
        assert!(!said.contains("200"), "{said}");
        // A kept-alive connection left idle is closed the same way.
        let mut idle = TcpStream::connect(addr).expect("connect");
        let started = Instant::now();
        let said = read_all(&mut idle, Duration::from_secs(10));
        assert!(
            said.is_empty() || said.starts_with("HTTP/1.1 408"),
            "{said}"
        );
        (closed_after, started.elapsed(), good_request(addr))
    })
    .await;
    assert!(closed_after < Duration::from_secs(5), "{closed_after:?}");
    assert!(
        idle_closed_after < Duration::from_secs(5),
        "{idle_closed_after:?}"
    );
    assert_eq!(answer, "HTTP/1.1 200 OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    let (addr, _stop) = serve(HttpConfig {
        body_timeout: Duration::from_millis(300),
        ..HttpConfig::default()
    })
    .await;
    let (said, index_said, answer) = blocking(move || {
        let mut slow = TcpStream::connect(addr).expect("connect");
        slow.write_all(
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inputs\"",
        )
        .expect("a head and a little body");
        let said = read_all(&mut slow, Duration::from_secs(10));
        // The repository's index reads its body under the same deadline.
        let mut index = TcpStream::connect(addr).expect("connect");
        index
            .write_all(b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            .expect("a head and a little body");
        let index_said = read_all(&mut index, Duration::from_secs(10));
        (said, index_said, good_request(addr))
    })
    .await;
    for said in [&said, &index_said] {
        assert!(said.starts_with("HTTP/1.1 408"), "{said}");
        assert!(
            said.contains("the request body did not arrive within 0.3 s"),
            "{said}"
        );
    }
    assert_eq!(answer, "HTTP/1.1 200 OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_announced_but_not_sent_holds_none_of_the_bytes_in_flight() {
    // Room for one MLP request (3 KB) in flight; the hostile clients announce the largest body
    // allowed and send nothing. Before, each reserved what it announced, and the good request
    // got 503 until they left.
    let (addr, _stop) = serve(HttpConfig {
        max_body_bytes: 16 << 10,
        max_inflight_bytes: 16 << 10,
        ..HttpConfig::default()
    })
    .await;
    let answer = blocking(move || {
        let mut holders = Vec::new();
        for _ in 0..4 {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(
                b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 16384\r\n\r\n",
            )
            .expect("head");
            holders.push(s);
        }
        std::thread::sleep(Duration::from_millis(200));
        let answer = good_request(addr);
        drop(holders);
        answer
    })
    .await;
    assert_eq!(answer, "HTTP/1.1 200 OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_reserved_ahead_of_a_body_counts_in_flight() {
    // A binary body's first bytes reserve room for what it announced (up to 1 MiB ahead), and
    // that room counts against the bytes in flight as the bytes will: a client that announces
    // 512 KiB and sends 11 bytes is shed at once, where it held half a MiB uncounted until its
    // body deadline before.
    let (addr, _stop) = serve(HttpConfig {
        max_body_bytes: 1 << 20,
        max_inflight_bytes: 64 << 10,
        ..HttpConfig::default()
    })
    .await;
    let (said, answer) = blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 524288\r\n\
              Inference-Header-Content-Length: 10\r\n\r\n{\"inputs\":x",
        )
        .expect("a head and 11 bytes");
        let said = read_all(&mut s, Duration::from_secs(5));
        (said, good_request(addr))
    })
    .await;
    assert!(said.starts_with("HTTP/1.1 503"), "{said}");
    assert!(said.contains("in flight"), "{said}");
    assert_eq!(answer, "HTTP/1.1 200 OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_until_one_closes() {
    let (addr, _stop) = serve(HttpConfig {
        max_connections: 2,
        ..HttpConfig::default()
    })
    .await;
    let (waiting, served) = blocking(move || {
        let idle: Vec<TcpStream> = (0..2)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        // The kernel completes the handshake, but the node does not read a third connection.
        let body = mlp_request(1).to_string();
        let mut third = TcpStream::connect(addr).expect("connect");
        write!(
            third,
            "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let waiting = read_all(&mut third, Duration::from_millis(500));
        drop(idle);
        let served = read_all(&mut third, Duration::from_secs(20));
        (waiting, served)
    })
    .await;
    assert!(
        waiting.is_empty(),
        "no answer while at the limit: {waiting}"
    );
    assert!(served.starts_with("HTTP/1.1 200 OK"), "{served}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_none_of_its_answers_is_closed() {
    let (addr, _stop) = serve(HttpConfig {
        max_connections: 1,
        body_timeout: Duration::from_millis(300),
        ..HttpConfig::default()
    })
    .await;
    let (served_after, answer) = blocking(move || {
        // Pipelined requests whose answers fill the socket buffers, and are never read: the
        // connection holds the node's only slot while its writes wait.
        let greedy = TcpStream::connect(addr).expect("connect");
        let mut writer = greedy.try_clone().expect("clone");
        let asking = std::thread::spawn(move || {
            let asks = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
            for _ in 0..1000 {
                if writer.write_all(&asks).is_err() {
                    break;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let answer = good_request(addr);
        let served_after = started.elapsed();
        // Ends the asking thread's write, should the node still be waiting on it.
        let _ = greedy.shutdown(std::net::Shutdown::Both);
        asking.join().expect("asking thread");
        (served_after, answer)
    })
    .await;
    assert_eq!(answer, "HTTP/1.1 200 OK", "the slot came free");
    assert!(served_after < Duration::from_secs(10), "{served_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_shares_the_connection_limit_and_closes_a_client_that_does_not_open_http2() {
    let server = mlp_server(HttpConfig {
        max_connections: 1,
        header_timeout: Duration::from_millis(500),
        ..HttpConfig::default()
    })
    .await;
    let addr = server.local_addr().expect("addr");
    let grpc = serve_grpc(&server).await;
    tokio::spawn(server.run(std::future::pending()));

    let (silent_closed_after, waiting, served) = blocking(move || {
        // A gRPC client that connects, starts its preface and stops takes the node's only
        // connection slot.
        let mut silent = TcpStream::connect(grpc).expect("connect gRPC");
        silent.write_all(b"PRI * HTTP/2.0").expect("part of a preface");
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(100));
        let body = mlp_request(1).to_string();
        let mut http = TcpStream::connect(addr).expect("connect HTTP");
        write!(
            http,
            "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let waiting = read_all(&mut http, Duration::from_millis(200));
        // The silent client is closed at the header timeout, and its slot serves the request.
        let _ = read_all(&mut silent, Duration::from_secs(10));
        let silent_closed_after = started.elapsed();
        let served = read_all(&mut http, Duration::from_secs(20));
        (silent_closed_after, waiting, served)
    })
    .await;
    assert!(
        waiting.is_empty(),
        "no answer while gRPC holds the slot: {waiting}"
    );
    assert!(
        silent_closed_after < Duration::from_secs(5),
        "{silent_closed_after:?}"
    );
    assert!(served.starts_with("HTTP/1.1 200 OK"), "{served}");
}

/// A client connection that stops reading once it has written `quiet_after` bytes (its request
/// is out), and never reads again: the server's answer fills the socket buffers and waits.
struct StopsReading {
    tcp: tokio::net::TcpStream,
    written: usize,
    quiet_after: usize,
}

impl tokio::io::AsyncRead for StopsReading {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.written >= self.quiet_after {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for StopsReading {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = polled {
            self.written += n;
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_client_that_reads_none_of_its_answer_is_closed() {
    use sophon_node::grpc::pb;
    let config = HttpConfig {
        max_connections: 1,
        body_timeout: Duration::from_millis(300),
        ..HttpConfig::default()
    };
    let n = node_with(sophon_node::ServingLimits::default(), config.clone());
    // 8,192 floats out for each id in: a small request, a large answer.
    load_onnx(
        &n,
        "embed",
        sophon_sdk::examples::embedding_onnx(4, 8192, false),
        |_| {},
    );
    n.repo
        .add_bundle(&sophon_sdk::ready::mlp_bundle("mlp", &n.key).expect("pack"))
        .expect("load");
    let app = n.app.clone();
    let server =
        sophon_node::NodeServer::bind("127.0.0.1:0".parse().expect("addr"), n.repo, config)
            .await
            .expect("bind");
    let addr = server.local_addr().expect("addr");
    let grpc = serve_grpc(&server).await;
    tokio::spawn(server.run(std::future::pending()));

    // 8 KiB in and 32 MiB out: more than the socket buffers of both ends hold. The request fits
    // in the node's HTTP/2 windows, so the client sends it all before it stops reading, and it
    // grants the node windows as large as the answer, so that what stops the answer is the
    // socket the client does not read, not flow control.
    let ids = 1024;
    let request = pb::ModelInferRequest {
        model_name: "embed".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "ids".into(),
            datatype: "INT64".into(),
            shape: vec![ids],
            ..Default::default()
        }],
        raw_input_contents: vec![(0..ids).flat_map(|i| (i % 4).to_le_bytes()).collect()],
        ..Default::default()
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .expect("endpoint")
        .initial_stream_window_size(1 << 30)
        .initial_connection_window_size(1 << 30)
        .connect_with_connector(tower::service_fn(move |_| async move {
            let tcp = tokio::net::TcpStream::connect(grpc).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(StopsReading {
                tcp,
                written: 0,
                quiet_after: ids as usize * 8,
            }))
        }))
        .await
        .expect("connect gRPC");
    let mut client = pb::grpc_inference_service_client::GrpcInferenceServiceClient::new(channel)
        .max_encoding_message_size(usize::MAX);
    let asking = tokio::spawn(async move { client.model_infer(request).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The gRPC connection holds the node's only slot while its answer waits; the write deadline
    // closes it, and an HTTP request is served.
    let started = Instant::now();
    let answer = blocking(move || good_request(addr)).await;
    let served_after = started.elapsed();
    if asking.is_finished() {
        panic!(
            "the gRPC call ended: {:?}",
            asking.await.map(|r| r.map(|_| "answered"))
        );
    }
    asking.abort();
    assert_eq!(answer, "HTTP/1.1 200 OK", "the slot came free");
    assert!(served_after < Duration::from_secs(10), "{served_after:?}");
    let (_, stats) = get_json(&app, "/v2/models/embed/stats").await;
    assert_eq!(
        stats["model_stats"][0]["inference_stats"]["success"]["count"], 1,
        "the gRPC request was answered (the answer is what waited): {stats}"
    );
}

/// What a client over its cap of two is told.
const SAYS: &str = "too many connections from 127.0.0.1: each client may hold 2 at once";

/// A connection to `addr` from the local address `from` (any of 127.0.0.0/8 on Linux).
async fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("address"))
        .expect("bind");
    let tcp = socket.connect(addr).await.expect("connect");
    let tcp = tcp.into_std().expect("std");
    tcp.set_nonblocking(false).expect("blocking");
    tcp
}

/// A good MLP request on `s`; what the node answered.
fn request_on(mut s: TcpStream) -> String {
    let body = mlp_request(1).to_string();
    write!(
        s,
        "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    read_all(&mut s, Duration::from_secs(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_holds_at_most_its_share_of_connections() {
    let server = mlp_server(HttpConfig {
        max_connections: 8,
        max_connections_per_client: 2,
        ..HttpConfig::default()
    })
    .await;
    let state = server.state().clone();
    let addr = server.local_addr().expect("addr");
    let grpc = serve_grpc(&server).await;
    tokio::spawn(server.run(std::future::pending()));
    let client = sophon_node::serve::Client::of("127.0.0.1".parse().expect("ip"));

    // A client holds its two connections, idle.
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(connect_from("127.0.0.1", addr).await);
    }
    let started = Instant::now();
    while state.connections.held_by(client) < 2 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(state.connections.held_by(client), 2);

    // Its third is refused with the reason, twice, on HTTP and on gRPC...
    for _ in 0..2 {
        let third = connect_from("127.0.0.1", addr).await;
        let answer = blocking(move || request_on(third)).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.contains("too many connections from 127.0.0.1")
                && answer.contains("each client may hold 2 at once"),
            "{answer}"
        );
    }
    // A call at once, and on a channel connected well before its first call: each is answered
    // RESOURCE_EXHAUSTED with the reason, then the connection goes away.
    for after in [Duration::ZERO, Duration::from_millis(1500)] {
        let status = grpc_client_from(grpc, after).await;
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            status
                .message()
                .contains("too many connections from 127.0.0.1"),
            "{status:?}"
        );
    }
    // A burst of connections past the cap: each is told why or, past the refusals the node
    // tells at once, closed; none waits.
    let burst = blocking(move || {
        let conns: Vec<TcpStream> = (0..150)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        conns
            .into_iter()
            .map(|mut c| read_all(&mut c, Duration::from_secs(5)))
            .collect::<Vec<_>>()
    })
    .await;
    let told = burst.iter().filter(|a| a.contains(SAYS)).count();
    assert!(
        burst.iter().all(|a| a.is_empty() || a.contains(SAYS)),
        "each refused, or closed"
    );
    assert!(told > 0, "some are told why");
    // ...while another client is served on both.
    let other = connect_from("127.0.0.2", addr).await;
    let answer = blocking(move || request_on(other)).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert_eq!(
        state.connections.held_by(client),
        2,
        "refusals hold nothing"
    );
    let refused = state.repo.metrics().connections_refused.get();
    assert!(refused >= 3, "the refusals are counted: {refused}");

    // Once it closes one, its next connection is served.
    drop(idle.pop());
    let started = Instant::now();
    while state.connections.held_by(client) > 1 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let again = connect_from("127.0.0.1", addr).await;
    let answer = blocking(move || request_on(again)).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    drop(idle);
    let started = Instant::now();
    while state.connections.held_by(client) > 0 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        state.connections.held_by(client),
        0,
        "every count given back"
    );
    let mut grpc = grpc_client(grpc).await;
    grpc.model_infer(mlp_grpc_request("mlp", 1))
        .await
        .expect("gRPC served once the client is under its cap");
}

/// A gRPC call from 127.0.0.1 to `addr` on a fresh channel, `after` it connected; its status.
async fn grpc_client_from(addr: SocketAddr, after: Duration) -> tonic::Status {
    let channel = match tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
    {
        Ok(channel) => channel,
        Err(e) => return tonic::Status::unavailable(format!("{e:?}")),
    };
    tokio::time::sleep(after).await;
    match GrpcClient::new(channel)
        .model_infer(mlp_grpc_request("mlp", 1))
        .await
    {
        Ok(_) => tonic::Status::ok("served"),
        Err(status) => status,
    }
}

/// A node serving the embedding model (8,192 floats out per id in: 128 KiB answers to 32-byte
/// requests of 4 ids) with `config`: its state, and its HTTP and gRPC addresses.
async fn embed_server(
    config: HttpConfig,
) -> (
    std::sync::Arc<sophon_node::http::ApiState>,
    SocketAddr,
    SocketAddr,
) {
    let n = node_with(sophon_node::ServingLimits::default(), config.clone());
    load_onnx(
        &n,
        "embed",
        sophon_sdk::examples::embedding_onnx(4, 8192, false),
        |_| {},
    );
    let server =
        sophon_node::NodeServer::bind("127.0.0.1:0".parse().expect("addr"), n.repo, config)
            .await
            .expect("bind");
    let state = server.state().clone();
    let addr = server.local_addr().expect("addr");
    let grpc = serve_grpc(&server).await;
    tokio::spawn(server.run(std::future::pending()));
    (state, addr, grpc)
}

/// A gRPC request for `ids` embedding rows (ids 0, 1, 2, 3, 0, ...).
fn embed_grpc_request(ids: i64) -> sophon_node::grpc::pb::ModelInferRequest {
    use sophon_node::grpc::pb;
    pb::ModelInferRequest {
        model_name: "embed".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "ids".into(),
            datatype: "INT64".into(),
            shape: vec![ids],
            ..Default::default()
        }],
        raw_input_contents: vec![(0..ids).flat_map(|i| (i % 4).to_le_bytes()).collect()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_stream_whose_answers_are_not_taken_is_ended_and_holds_nothing() {
    use sophon_node::grpc::pb;
    let config = HttpConfig {
        body_timeout: Duration::from_millis(500),
        ..HttpConfig::default()
    };
    let (state, _, grpc) = embed_server(config).await;
    let request = || embed_grpc_request(4);
    // A client that grants no HTTP/2 window: the node can send it none of an answer, and never
    // blocks on its socket, so no write deadline fires.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .expect("endpoint")
        .initial_stream_window_size(0)
        .connect()
        .await
        .expect("connect gRPC");
    let mut client = pb::grpc_inference_service_client::GrpcInferenceServiceClient::new(channel);
    let requests = tokio_stream::iter((0..40).map(move |_| request()));
    let call = tokio::spawn(async move { client.model_stream_infer(requests).await });

    let max = state.config.max_inflight_bytes;
    let held = || max - state.inflight_bytes.available_permits();
    let started = Instant::now();
    let mut most = 0;
    while most < 1 << 20 && started.elapsed() < Duration::from_secs(10) {
        most = most.max(held());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        most >= 1 << 20,
        "the answers waiting for the client were not counted in flight: at most {most} bytes"
    );
    // Past the deadline the stream is ended and its answers dropped (the stream's own deadline),
    // or its connection closed (the watch on the answer waiting in h2): either way nothing
    // stays held.
    let started = Instant::now();
    while held() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} bytes still held for a client that takes no answers",
            held()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !call.is_finished() || call.await.is_ok(),
        "the call itself stands"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_grpc_answers_not_taken_count_in_flight_until_their_connection_is_closed() {
    use sophon_node::grpc::pb;
    let config = HttpConfig {
        body_timeout: Duration::from_millis(500),
        ..HttpConfig::default()
    };
    let (state, _, grpc) = embed_server(config).await;
    let request = || embed_grpc_request(4);
    // A client that grants no HTTP/2 window: each handler returns, and its answer waits in the
    // node for a window that never comes, while the client answers the node's pings.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .expect("endpoint")
        .initial_stream_window_size(0)
        .connect()
        .await
        .expect("connect gRPC");
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let mut client =
                pb::grpc_inference_service_client::GrpcInferenceServiceClient::new(channel.clone());
            let request = request();
            tokio::spawn(async move { client.model_infer(request).await })
        })
        .collect();

    let max = state.config.max_inflight_bytes;
    let held = || max - state.inflight_bytes.available_permits();
    let started = Instant::now();
    let mut most = 0;
    while most < 1 << 20 && started.elapsed() < Duration::from_secs(10) {
        most = most.max(held());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        most >= 1 << 20,
        "the answers waiting for the client were not counted in flight: at most {most} bytes"
    );
    // Past the body timeout the connection is closed: the calls fail and nothing stays held.
    let started = Instant::now();
    while held() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} bytes still held for a client that takes no answers",
            held()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for call in calls {
        let answered = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the call ends")
            .expect("task");
        assert!(answered.is_err(), "an answer arrived with no window");
    }
    // A client that takes its answer gets all of it, and the count goes back to nothing.
    let mut client = grpc_client(grpc).await;
    let answer = client
        .model_infer(request())
        .await
        .expect("a good client is served")
        .into_inner();
    assert_eq!(answer.raw_output_contents[0].len(), 4 * 8192 * 4);
    let started = Instant::now();
    while held() > 0 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(held(), 0, "the taken answer is no longer counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_answer_with_no_room_in_flight_is_refused_and_the_next_one_served() {
    // Room for 64 KiB in flight: a request of 4 ids (a 128 KiB answer) fits, its answer does not.
    let config = HttpConfig {
        max_inflight_bytes: 64 << 10,
        ..HttpConfig::default()
    };
    let (state, _, grpc) = embed_server(config).await;
    let request = embed_grpc_request;
    let mut client = grpc_client(grpc).await;
    let refused = client
        .model_infer(request(4))
        .await
        .expect_err("a 128 KiB answer against 64 KiB of room");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("bytes of requests in flight"),
        "{refused:?}"
    );
    // One id: a 32 KiB answer fits, on the same connection.
    let answer = client
        .model_infer(request(1))
        .await
        .expect("the answer that fits is served")
        .into_inner();
    assert_eq!(answer.raw_output_contents[0].len(), 8192 * 4);
    let available = || state.inflight_bytes.available_permits();
    let started = Instant::now();
    while available() < 64 << 10 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(available(), 64 << 10, "every count given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_answer_of_several_pieces_arrives_whole() {
    let (state, _, grpc) = embed_server(HttpConfig::default()).await;
    let request = embed_grpc_request;
    let mut client = grpc_client(grpc).await.max_decoding_message_size(64 << 20);
    let rows = client
        .model_infer(request(4))
        .await
        .expect("4 rows")
        .into_inner()
        .raw_output_contents
        .remove(0);
    // 300 rows of 32 KiB: a 9.4 MiB answer, handed to the connection in three pieces and its
    // last byte.
    let big = client
        .model_infer(request(300))
        .await
        .expect("300 rows")
        .into_inner()
        .raw_output_contents
        .remove(0);
    assert_eq!(big.len(), 300 * 8192 * 4);
    let row = 8192 * 4;
    for (i, got) in big.chunks(row).enumerate() {
        assert_eq!(got, &rows[(i % 4) * row..(i % 4 + 1) * row], "row {i}");
    }
    let max = state.config.max_inflight_bytes;
    let started = Instant::now();
    while state.inflight_bytes.available_permits() < max
        && started.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        state.inflight_bytes.available_permits(),
        max,
        "nothing held"
    );
}

/// An HTTP request for `ids` embedding rows, the answer's tensor in binary.
fn embed_request(ids: usize) -> Vec<u8> {
    let body = serde_json::json!({
        "inputs": [{"name": "ids", "datatype": "INT64", "shape": [ids],
                    "data": (0..ids).map(|i| i % 4).collect::<Vec<_>>()}],
        "parameters": {"binary_data_output": true},
    })
    .to_string();
    format!(
        "POST /v2/models/embed/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_answer_not_read_counts_in_flight_until_its_connection_is_closed() {
    let (state, addr, _) = embed_server(HttpConfig {
        body_timeout: Duration::from_millis(500),
        ..HttpConfig::default()
    })
    .await;
    let max = state.config.max_inflight_bytes;
    let held = || max - state.inflight_bytes.available_permits();
    // A 32 MiB answer to a client that reads none of it: more than the sockets' buffers take.
    let mut greedy = TcpStream::connect(addr).expect("connect");
    greedy.write_all(&embed_request(1024)).expect("send");
    let started = Instant::now();
    let mut most = 0;
    while most < 8 << 20 && started.elapsed() < Duration::from_secs(10) {
        most = most.max(held());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        most >= 8 << 20,
        "the answer waiting for the client was not counted in flight: at most {most} bytes"
    );
    // Past the write deadline the connection is closed, and nothing stays held.
    let started = Instant::now();
    while held() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} bytes still held for a client that reads nothing",
            held()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(greedy);
    assert_eq!(
        blocking(move || {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(&embed_request(4)).expect("send");
            read_all(&mut s, Duration::from_secs(2))
        })
        .await
        .lines()
        .next()
        .unwrap_or_default(),
        "HTTP/1.1 200 OK"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_answer_with_no_room_in_flight_is_a_503_and_the_next_one_served() {
    // Room for 64 KiB in flight: a request of 4 ids fits, its 128 KiB answer does not.
    let (state, addr, _) = embed_server(HttpConfig {
        max_inflight_bytes: 64 << 10,
        ..HttpConfig::default()
    })
    .await;
    let (refused, served) = blocking(move || {
        let ask = |ids| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(&embed_request(ids)).expect("send");
            read_all(&mut s, Duration::from_secs(2))
        };
        (ask(4), ask(1))
    })
    .await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("bytes of requests in flight"), "{refused}");
    assert!(served.starts_with("HTTP/1.1 200 OK"), "{served}");
    let started = Instant::now();
    while state.inflight_bytes.available_permits() < 64 << 10
        && started.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(state.inflight_bytes.available_permits(), 64 << 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_client_granting_one_byte_of_window_per_stream_is_closed_all_the_same() {
    use prost::Message as _;
    let config = HttpConfig {
        body_timeout: Duration::from_millis(500),
        ..HttpConfig::default()
    };
    let (state, _, grpc) = embed_server(config).await;
    // A raw HTTP/2 client with one byte of window per stream that never gives any back: each
    // answer's first piece goes to h2 at once, and nothing after it ever does.
    let tcp = tokio::net::TcpStream::connect(grpc).await.expect("connect");
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(1)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("HTTP/2");
    tokio::spawn(connection);
    let call = move |method: &str, message: Vec<u8>| {
        let client = client.clone();
        let request = axum::http::Request::post(format!(
            "http://{grpc}/inference.GRPCInferenceService/{method}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
        async move {
            let mut body = vec![0];
            body.extend_from_slice(&(message.len() as u32).to_be_bytes());
            body.extend_from_slice(&message);
            let mut client = client.ready().await.ok()?;
            let (response, mut send) = client.send_request(request, false).ok()?;
            send.send_data(body.into(), true).ok()?;
            // Holds the answer's stream without reading it: no window goes back.
            let response = response.await.ok()?;
            Some(response)
        }
    };
    let infer = embed_grpc_request(4).encode_to_vec();
    let mut kept = Vec::new();
    for _ in 0..8 {
        kept.push(tokio::spawn(call("ModelInfer", infer.clone())));
    }
    // And a cheap call every 100 ms on the same connection, whose first pieces go out too.
    let cheap = tokio::spawn(async move {
        let mut answers = Vec::new();
        loop {
            answers.push(call("ServerLive", Vec::new()).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        #[allow(unreachable_code)]
        answers
    });
    let max = state.config.max_inflight_bytes;
    let held = || max - state.inflight_bytes.available_permits();
    let started = Instant::now();
    while held() < 512 << 10 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        held() >= 512 << 10,
        "the answers were not counted: {}",
        held()
    );
    let started = Instant::now();
    while held() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} bytes still held for a client that takes one byte of each answer",
            held()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cheap.abort();
    drop(kept);
}
