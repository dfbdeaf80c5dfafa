//! The floor under a forwarded prediction: one request and its answer on a new QUIC stream
//! between two mesh endpoints in one process (mutual TLS, loopback), with no model behind it.
//!
//! `cargo run --release -p sophon-mesh --example rtt -- [WORKERS] [BYTES]`: WORKERS 0 runs both
//! ends on one thread (no hand-offs between threads); N runs a multi-thread runtime of N.

use std::time::{Duration, Instant};

use sophon_mesh::{Ca, EndpointConfig, Principal};

fn main() -> anyhow::Result<()> {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (workers, bytes) = (arg(1, 2), arg(2, 3200));
    let rt = match workers {
        0 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    let times = rt.block_on(round_trips(bytes, 6000))?;
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    println!(
        "workers {workers}, {bytes} bytes each way: p50 {:.1} µs, p99 {:.1} µs",
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6
    );
    Ok(())
}

async fn round_trips(bytes: usize, n: usize) -> anyhow::Result<Vec<Duration>> {
    let ca = Ca::generate("rtt")?;
    let config = EndpointConfig::default();
    let a = ca.issue_identity(&Principal::Node("a".into()))?;
    let b = ca.issue_identity(&Principal::Node("b".into()))?;
    let client = sophon_mesh::endpoint(([127, 0, 0, 1], 0).into(), &a, &config)?;
    let server = sophon_mesh::endpoint(([127, 0, 0, 1], 0).into(), &b, &config)?;
    let addr = server.local_addr()?;
    tokio::spawn(async move {
        let Some(incoming) = server.accept().await else {
            return;
        };
        let Ok(conn) = incoming.await else {
            return;
        };
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            tokio::spawn(async move {
                if let Ok(body) = recv.read_to_end(1 << 20).await
                    && send.write_all(&body).await.is_ok()
                {
                    let _ = send.finish();
                }
            });
        }
    });
    let conn = sophon_mesh::connect(&client, addr, None).await?;
    let payload = vec![7u8; bytes];
    let mut times = Vec::with_capacity(n);
    for i in 0..n + 1000 {
        let started = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&payload).await?;
        send.finish()?;
        let answer = recv.read_to_end(1 << 20).await?;
        anyhow::ensure!(answer.len() == bytes, "a short answer");
        if i >= 1000 {
            times.push(started.elapsed());
        }
    }
    times.sort();
    Ok(times)
}
