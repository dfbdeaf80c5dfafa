//! `sophon bench mesh`: a coordinator and two nodes as real processes on 127.0.0.1.
//!
//! - Forwarded prediction: the MLP (binary body, batch 1, keep-alive, concurrency 1) sent to the
//!   node that holds the replica and to the node that forwards it over QUIC, alternately; the
//!   difference of the p50s is what forwarding adds.
//! - Deploy to ready: from `POST /v1/deployments` to the replica ready, with nodes whose AOT
//!   cache and bundle store are empty (cold), then after a delete and a new deployment of the
//!   same version (warm: the bundle is on disk and its component compiled).

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sophon_sdk::{keys, ready};

use super::bench::{AdminClient, Client, free_port, http_bodies, percentiles, spawn, us};

/// The admin API of the benchmark's coordinator.
struct Admin {
    client: AdminClient,
    base: String,
}

impl Admin {
    fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> anyhow::Result<Value> {
        self.client
            .call(method, &format!("{}{path}", self.base), body)
    }

    fn ready_on(&self, deployment: u64) -> anyhow::Result<Vec<String>> {
        let v = self.call("GET", &format!("/v1/deployments/{deployment}"), None)?;
        Ok(v["placements"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["ready"] == json!(true))
            .filter_map(|p| p["node"].as_str().map(str::to_string))
            .collect())
    }

    /// Deploy the MLP with one replica; (deployment id, time to ready, the node that holds it).
    fn deploy(&self) -> anyhow::Result<(u64, Duration, String)> {
        let body = json!({"model": "mlp", "version": "1", "environment": "staging", "replicas": 1});
        let started = Instant::now();
        let out = self.call("POST", "/v1/deployments", Some(body.to_string().as_bytes()))?;
        let id = out["created"]["deployment"]
            .as_u64()
            .context("no deployment id")?;
        loop {
            if let Some(node) = self.ready_on(id)?.into_iter().next() {
                return Ok((id, started.elapsed(), node));
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("deployment {id} not ready within 120 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

pub fn mesh(iters: usize, node_workers: Option<usize>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let (api, mesh) = (free_port()?, free_port()?);
    let exe = std::env::current_exe()?;
    let init = Command::new(&exe)
        .args(["coordinator", "init", "--data"])
        .arg(root.join("c1"))
        .args([
            "--api",
            &format!("127.0.0.1:{api}"),
            "--mesh",
            &format!("127.0.0.1:{mesh}"),
        ])
        .env("SOPHON_LOG", "warn")
        .output()?;
    let text = String::from_utf8_lossy(&init.stdout);
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("Admin token (shown once, keep it): "))
        .context("the admin token")?
        .trim()
        .to_string();
    let c1 = root.join("c1");
    let _coordinator = spawn(&["coordinator", "run", "--data", c1.to_str().context("path")?])?;
    let admin = Admin {
        client: AdminClient::new(&token),
        base: format!("http://127.0.0.1:{api}"),
    };
    let started = Instant::now();
    while admin.call("GET", "/v1/cluster/status", None).is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the coordinator did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let key = keys::generate();
    let trust = json!({"key": keys::public_key_hex(&key.verifying_key()), "name": "bench"});
    admin.call("POST", "/v1/keys", Some(trust.to_string().as_bytes()))?;
    let minted = admin.call(
        "POST",
        "/v1/nodes/join-tokens",
        Some(json!({"uses": 2}).to_string().as_bytes()),
    )?;
    let join = minted["join_token"]
        .as_str()
        .context("join token")?
        .to_string();
    let mut nodes = Vec::new();
    let mut http = Vec::new();
    let mut datas = Vec::new();
    for n in 1..=2 {
        let (h, m) = (free_port()?, free_port()?);
        let data = root.join(format!("n{n}"));
        let cache = root.join(format!("n{n}-cache"));
        let workers = node_workers.map(|n| n.to_string());
        let (id, http_at, mesh_at) = (
            format!("n{n}"),
            format!("127.0.0.1:{h}"),
            format!("127.0.0.1:{m}"),
        );
        let mut args = vec![
            "node",
            "join",
            "--join-token",
            &join,
            "--data",
            data.to_str().context("path")?,
            "--id",
            &id,
            "--http",
            &http_at,
            "--mesh",
            &mesh_at,
            "--memory-mb",
            "4096",
            "--cache-dir",
            cache.to_str().context("path")?,
            "--run",
        ];
        if let Some(w) = &workers {
            args.extend(["--workers", w.as_str()]);
        }
        nodes.push(spawn(&args)?);
        http.push((format!("n{n}"), SocketAddr::from(([127, 0, 0, 1], h))));
        datas.push((data, cache));
    }
    loop {
        let v = admin.call("GET", "/v1/nodes", None)?;
        let up = v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["health"] == json!("up"))
            .count();
        if up == 2 {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("two nodes did not join");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let bundle = ready::mlp_bundle("mlp", &key)?;
    admin.call("POST", "/v1/bundles", Some(&bundle))?;

    println!(
        "\n## Mesh: one coordinator and two nodes as processes on 127.0.0.1 (MLP 784→128→10; node workers: {})",
        node_workers.map_or("one per core".to_string(), |n| n.to_string())
    );
    let (id, cold, _) = admin.deploy()?;
    admin.call("DELETE", &format!("/v1/deployments/{id}"), None)?;
    // Wait for the replica to go (its node unloads the version).
    std::thread::sleep(Duration::from_secs(2));
    let (id2, warm, holder) = admin.deploy()?;
    println!("Deploy to ready (`POST /v1/deployments` → replica ready), one replica:");
    println!("| caches | time |\n|---|---|");
    println!(
        "| cold (bundle fetched, component compiled) | {:.0} ms |",
        cold.as_secs_f64() * 1e3
    );
    println!(
        "| warm (bundle on disk, component in the AOT cache) | {:.0} ms |",
        warm.as_secs_f64() * 1e3
    );

    let local = http.iter().find(|(n, _)| *n == holder).context("holder")?.1;
    let remote = http.iter().find(|(n, _)| *n != holder).context("other")?.1;
    let [_, (_, body, header_len)] = http_bodies(1);
    let mut to_local = Client::connect(local, "/v2/models/mlp/infer", &body, header_len)?;
    // The other node routes once its view has the ready replica.
    let waiting = Instant::now();
    let mut to_remote = loop {
        let mut c = Client::connect(remote, "/v2/models/mlp/infer", &body, header_len)?;
        if c.call().is_ok() {
            break c;
        }
        if waiting.elapsed() > Duration::from_secs(30) {
            bail!("the other node does not route to the replica");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for _ in 0..200 {
        to_local.call()?;
        to_remote.call()?;
    }
    let (mut l, mut r) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
    for _ in 0..iters {
        let t = Instant::now();
        std::hint::black_box(to_local.call()?);
        l.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(to_remote.call()?);
        r.push(t.elapsed());
    }
    let (l50, l99) = percentiles(&mut l);
    let (r50, r99) = percentiles(&mut r);
    println!(
        "\nForwarded prediction (binary body, batch 1, keep-alive, concurrency 1, {iters} each, alternating):"
    );
    println!("| path | p50 | p99 |\n|---|---|---|");
    println!("| local replica | {} | {} |", us(l50), us(l99));
    println!(
        "| forwarded over QUIC to the replica's node | {} | {} |",
        us(r50),
        us(r99)
    );
    println!(
        "Forwarding adds {} at p50 ({:.2}× the local path).",
        us(r50.saturating_sub(l50)),
        r50.as_secs_f64() / l50.as_secs_f64().max(1e-9)
    );

    // Throughput: 8 keep-alive clients against one node (its local replica), then spread over
    // both nodes with a replica each.
    let body_clone = body.clone();
    let rps = |targets: Vec<SocketAddr>| -> anyhow::Result<f64> {
        let per = iters.max(400);
        let started = Instant::now();
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let addr = targets[i % targets.len()];
                let body = body_clone.clone();
                std::thread::spawn(move || -> anyhow::Result<usize> {
                    let mut c = Client::connect(addr, "/v2/models/mlp/infer", &body, header_len)?;
                    for _ in 0..per / 8 {
                        c.call()?;
                    }
                    Ok(per / 8)
                })
            })
            .collect();
        let mut done = 0;
        for h in handles {
            done += h
                .join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        }
        Ok(done as f64 / started.elapsed().as_secs_f64())
    };
    let one = rps(vec![local])?;
    admin.call(
        "POST",
        &format!("/v1/deployments/{id2}/scale"),
        Some(json!({"replicas": 2}).to_string().as_bytes()),
    )?;
    let waiting = Instant::now();
    while admin.ready_on(id2)?.len() < 2 {
        if waiting.elapsed() > Duration::from_secs(60) {
            bail!("two replicas not ready");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Both nodes now answer locally.
    std::thread::sleep(Duration::from_millis(500));
    let two = rps(vec![local, remote])?;
    println!(
        "\nThroughput, 8 keep-alive clients, binary batch 1 (clients, coordinator and nodes share {} cores):",
        num_cpus()
    );
    println!("| nodes serving | requests/s |\n|---|---|");
    println!("| one node | {one:.0} |");
    println!("| two nodes, a replica each | {two:.0} |");
    println!("Two nodes against one: {:.2}×.", two / one.max(1e-9));

    // Node loss: kill -9 the node holding the replica; time until it is ready on the other.
    admin.call(
        "PUT",
        "/v1/cluster/heartbeat-grace",
        Some(json!({"grace_ms": 2000}).to_string().as_bytes()),
    )?;
    admin.call(
        "POST",
        &format!("/v1/deployments/{id2}/scale"),
        Some(json!({"replicas": 1}).to_string().as_bytes()),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let mut losses = Vec::new();
    for _ in 0..5 {
        let holder = loop {
            if let Some(node) = admin.ready_on(id2)?.into_iter().next() {
                break node;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let i = http
            .iter()
            .position(|(n, _)| *n == holder)
            .context("holder")?;
        let killed = Instant::now();
        drop(std::mem::replace(&mut nodes[i], spawn(&["--version"])?));
        loop {
            if admin.ready_on(id2)?.iter().any(|n| *n != holder) {
                break;
            }
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("the replica did not move off {holder}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        losses.push(killed.elapsed());
        // The killed node comes back (and is up again) for the next round.
        let (data, cache) = &datas[i];
        nodes[i] = spawn(&[
            "node",
            "run",
            "--data",
            data.to_str().context("path")?,
            "--cache-dir",
            cache.to_str().context("path")?,
        ])?;
        loop {
            let v = admin.call("GET", &format!("/v1/nodes/{holder}"), None)?;
            if v["node"]["health"] == json!("up")
                && v["live"]["last_heard_ms_ago"]
                    .as_u64()
                    .is_some_and(|ms| ms < 500)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut sorted = losses.clone();
    sorted.sort();
    println!(
        "\nNode loss (kill -9 of the replica's node → ready on the other; grace 2 s), 5 runs: p50 {:.2} s, max {:.2} s ({})",
        sorted[2].as_secs_f64(),
        sorted[4].as_secs_f64(),
        losses
            .iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    drop(nodes);
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
