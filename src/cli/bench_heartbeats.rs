//! `sophon bench heartbeats --nodes N`: N simulated nodes heartbeating over QUIC, once a second
//! each, against three coordinator processes.
//!
//! Each simulated node joins for real (a node join token, its own key and CSR, a certificate for
//! `node/sim-<i>`) and then heartbeats to the leader on its own mutual-TLS connection, all from
//! one UDP socket of this process. The leader's CPU (its process's user+system time) is sampled
//! at rising node counts, and admin writes are timed at each step against an idle baseline.
//! The generator runs on the same cores as the coordinators.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sophon_mesh::wire;

use super::bench::{AdminClient, Proc, free_port, spawn};

fn sophon(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(std::env::current_exe()?)
        .args(args)
        .env("SOPHON_LOG", "warn")
        .output()?;
    if !out.status.success() {
        bail!("sophon {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(dir: &Path, tick_ms: u64) -> anyhow::Result<Proc> {
    spawn(&[
        "coordinator",
        "run",
        "--data",
        dir.to_str().context("path")?,
        "--tick-ms",
        &tick_ms.to_string(),
    ])
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> Option<f64> {
    sophon_node::mesh::replicas::cpu_ticks(&pid.to_string()).map(|t| t as f64 / 100.0)
}

/// The admin API of any of the coordinators (calls name the full URL).
struct Api {
    client: AdminClient,
}

impl Api {
    fn call(&self, method: &str, url: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let body = body.map(|b| b.to_string());
        self.client
            .call(method, url, body.as_deref().map(str::as_bytes))
    }

    /// p50 and p99 of `n` admin writes (a policy set), in ms, and how many were not confirmed
    /// (a leader change); those count at the time they took.
    fn write_latency(&self, base: &str, n: usize) -> anyhow::Result<(f64, f64, usize)> {
        let mut lat = Vec::with_capacity(n);
        let mut unconfirmed = 0;
        for i in 0..n {
            let started = Instant::now();
            if self
                .call(
                    "PUT",
                    &format!("{base}/v1/policies/bench-hb"),
                    Some(json!({"required_approvals": i % 3, "approver_role": "approver"})),
                )
                .is_err()
            {
                unconfirmed += 1;
            }
            lat.push(started.elapsed().as_secs_f64() * 1e3);
        }
        lat.sort_by(f64::total_cmp);
        let at = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
        Ok((at(0.5), at(0.99), unconfirmed))
    }

    /// The leader's id, from any coordinator that answers.
    fn leader(&self, apis: &[String]) -> Option<usize> {
        apis.iter().find_map(|base| {
            let s = self
                .call("GET", &format!("{base}/v1/cluster/status"), None)
                .ok()?;
            s["raft"]["leader"]
                .as_u64()
                .filter(|l| *l > 0)
                .map(|l| l as usize)
        })
    }
}

pub fn heartbeats(nodes: usize, tick_ms: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let mut procs = Vec::new();
    let mut apis = Vec::new();
    let (api1, mesh1) = (free_port()?, free_port()?);
    let c1 = root.join("c1");
    let out = sophon(&[
        "coordinator",
        "init",
        "--data",
        c1.to_str().context("path")?,
        "--api",
        &format!("127.0.0.1:{api1}"),
        "--mesh",
        &format!("127.0.0.1:{mesh1}"),
    ])?;
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("Admin token (shown once, keep it): "))
        .context("the admin token")?
        .trim()
        .to_string();
    procs.push(run(&c1, tick_ms)?);
    apis.push(format!("http://127.0.0.1:{api1}"));
    let api = Api {
        client: AdminClient::new(&token),
    };
    let started = Instant::now();
    while api
        .call("GET", &format!("{}/v1/cluster/status", apis[0]), None)
        .is_err()
    {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("coordinator 1 did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for n in 2..=3 {
        let (a, m) = (free_port()?, free_port()?);
        let join = api.call("POST", &format!("{}/v1/cluster/join-tokens", apis[0]), None)?;
        let d = root.join(format!("c{n}"));
        sophon(&[
            "coordinator",
            "join",
            "--data",
            d.to_str().context("path")?,
            "--join-token",
            join["join_token"].as_str().context("join token")?,
            "--api",
            &format!("127.0.0.1:{a}"),
            "--mesh",
            &format!("127.0.0.1:{m}"),
        ])?;
        procs.push(run(&d, tick_ms)?);
        apis.push(format!("http://127.0.0.1:{a}"));
    }
    loop {
        let s = api.call("GET", &format!("{}/v1/cluster/status", apis[0]), None)?;
        if s["raft"]["voters"] == json!([1, 2, 3]) {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("three voters: {s}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let members = api.call("GET", &format!("{}/v1/cluster/members", apis[0]), None)?;
    let leader = members["coordinators"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["leader"] == json!(true))
        .context("a leader")?;
    let leader_id = leader["id"].as_u64().context("leader id")? as usize;
    let leader_mesh: SocketAddr = leader["mesh_address"]
        .as_str()
        .context("leader mesh address")?
        .parse()?;
    let leader_api = apis[leader_id - 1].clone();
    let leader_pid = procs[leader_id - 1].0.id();

    let minted = api.call(
        "POST",
        &format!("{leader_api}/v1/nodes/join-tokens"),
        Some(json!({"uses": nodes, "expires_in_s": 3600})),
    )?;
    let join = minted["join_token"]
        .as_str()
        .context("join token")?
        .to_string();
    let (fingerprint, secret, _) = wire::parse_join_token(&join).map_err(|e| anyhow::anyhow!(e))?;

    println!(
        "\n## Heartbeat scale: {nodes} simulated nodes over QUIC against 3 coordinator processes (Raft tick {tick_ms} ms)"
    );
    let (idle50, idle99, _) = api.write_latency(&leader_api, 200)?;
    println!("Admin writes with no node: p50 {idle50:.2} ms, p99 {idle99:.2} ms");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cfg = sophon_mesh::EndpointConfig {
        idle_timeout: Duration::from_secs(30),
        keep_alive: Duration::from_secs(5),
    };
    let endpoint = rt.block_on(async { sophon_mesh::client_endpoint(&cfg) })?;
    // Each step joins its nodes (its own key and certificate each) right before they start to
    // heartbeat: a node joined but silent would be marked down, and those transitions (each a
    // Raft write and a scheduler pass) are not what this measures.
    let joiner = rt.block_on(async {
        let config = sophon_mesh::join_client_config(&fingerprint, &cfg)?;
        anyhow::Ok(sophon_mesh::connect(&endpoint, leader_mesh, Some(config)).await?)
    })?;
    let mut join_time = Duration::ZERO;
    let mut identities: Vec<sophon_mesh::Identity> = Vec::with_capacity(nodes);
    // Connect each, then heartbeat once a second, spread over the second.
    let beats = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let active = Arc::new(AtomicU64::new(0));
    let steps: Vec<usize> = [nodes / 10, nodes / 4, nodes / 2, nodes]
        .into_iter()
        .filter(|n| *n > 0)
        .collect();
    println!(
        "| nodes heartbeating | heartbeats/s | leader CPU (cores) | leader RSS | admin write p50 | p99 |"
    );
    println!("|---|---|---|---|---|---|");
    let mut launched = 0usize;
    let mut last = (0usize, 0.0f64);
    for step in steps {
        let joined = Instant::now();
        identities.extend(rt.block_on(join_nodes(&joiner, &secret, launched..step))?);
        join_time += joined.elapsed();
        rt.block_on(async {
            for identity in &identities[launched..step] {
                let config = sophon_mesh::member_client_config(identity, &cfg)?;
                let conn = endpoint
                    .connect_with(config, leader_mesh, sophon_mesh::SERVER_NAME)?
                    .await?;
                let (beats, failed, stop, active) =
                    (beats.clone(), failed.clone(), stop.clone(), active.clone());
                let offset = Duration::from_millis(rand::random::<u64>() % 1000);
                tokio::spawn(async move {
                    active.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(offset).await;
                    let body = serde_json::to_vec(&wire::Heartbeat::default()).unwrap_or_default();
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        match sophon_mesh::call(&conn, wire::kind::HEARTBEAT, &body, 1 << 16).await
                        {
                            Ok((wire::kind::OK, _)) => beats.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                });
            }
            anyhow::Ok(())
        })?;
        launched = step;
        std::thread::sleep(Duration::from_secs(3));
        let (b0, c0, t0) = (
            beats.load(Ordering::Relaxed),
            cpu_seconds(leader_pid).unwrap_or(0.0),
            Instant::now(),
        );
        let (w50, w99, unconfirmed) = api.write_latency(&leader_api, 100)?;
        std::thread::sleep(Duration::from_secs(2));
        let secs = t0.elapsed().as_secs_f64();
        let rate = (beats.load(Ordering::Relaxed) - b0) as f64 / secs;
        let cores = (cpu_seconds(leader_pid).unwrap_or(0.0) - c0) / secs;
        let now_leader = api.leader(&apis);
        let note = match now_leader {
            Some(l) if l == leader_id => String::new(),
            other => format!(" (leadership moved to {other:?}: CPU is coordinator {leader_id}'s)"),
        };
        let note = if unconfirmed > 0 {
            format!("{note} ({unconfirmed} writes unconfirmed)")
        } else {
            note
        };
        let rss = super::bench::rss_bytes(leader_pid).unwrap_or(0) as f64 / (1 << 20) as f64;
        println!(
            "| {step} | {rate:.0} | {cores:.2} | {rss:.0} MiB | {w50:.2} ms | {w99:.2} ms |{note}"
        );
        last = (step, cores);
    }
    stop.store(true, Ordering::Relaxed);
    println!(
        "Joining took {:.1} s in all (each node a CSR signed and a JoinNode committed, 16 at a time)",
        join_time.as_secs_f64()
    );
    let (n, cores) = last;
    if cores > 0.0 {
        println!(
            "At {n} nodes the leader used {cores:.2} cores: one core at about {:.0} nodes (linear).",
            n as f64 / cores
        );
    }
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        println!("({failed} heartbeats failed)");
    }
    println!("Admin write p99 against idle ({idle99:.2} ms): see the last row (goal: within 2×).");
    drop(rt);
    drop(procs);
    Ok(())
}

/// Join simulated nodes `sim-<i>` for each `i` in `range`, 16 at a time, over `conn` (a
/// connection with the join client config).
async fn join_nodes(
    conn: &quinn::Connection,
    secret: &str,
    range: std::ops::Range<usize>,
) -> anyhow::Result<Vec<sophon_mesh::Identity>> {
    let mut tasks = tokio::task::JoinSet::new();
    let next = Arc::new(AtomicU64::new(range.start as u64));
    for _ in 0..16 {
        let (conn, secret, next, end) = (conn.clone(), secret.to_string(), next.clone(), range.end);
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= end {
                    return anyhow::Ok(out);
                }
                let id = format!("sim-{i}");
                let (key_pem, csr_pem) = sophon_mesh::new_csr()?;
                let request = wire::NodeJoinRequest {
                    secret: secret.clone(),
                    csr_pem,
                    node: wire::NodeInfo {
                        id: id.clone(),
                        mesh_address: "127.0.0.1:9".into(),
                        http_address: "127.0.0.1:9".into(),
                        inventory: wire::Inventory {
                            cpu_cores: 8,
                            memory_mb: 16_384,
                            backends: vec!["tract".into()],
                            ..wire::Inventory::default()
                        },
                        labels: Default::default(),
                        zone: format!("z{}", i % 3),
                        environments: Vec::new(),
                        version: "bench".into(),
                    },
                };
                let (k, bytes) =
                    sophon_node::mesh::join_call(&conn, &serde_json::to_vec(&request)?).await?;
                let answer: wire::NodeJoinAnswer = decode(k, &bytes)?;
                out.push(sophon_mesh::Identity {
                    principal: sophon_mesh::Principal::Node(id),
                    cert_pem: answer.cert_pem,
                    key_pem,
                    ca_pem: answer.ca_pem,
                });
            }
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    all.sort_by_key(|i| match &i.principal {
        sophon_mesh::Principal::Node(id) => id.trim_start_matches("sim-").parse::<usize>().ok(),
        _ => None,
    });
    Ok(all)
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(k: u8, bytes: &[u8]) -> anyhow::Result<T> {
    match k {
        wire::kind::OK => Ok(serde_json::from_slice(bytes)?),
        _ => bail!("refused: {}", String::from_utf8_lossy(bytes)),
    }
}
