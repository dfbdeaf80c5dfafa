//! Autoscaling and scale to zero with real processes on 127.0.0.1: three coordinators, two
//! nodes, and two autoscaled deployments set up through the CLI (`sophon deploy autoscale`):
//!
//! - `slow` (the MLP behind a component that takes 20 ms a request), min 1, max 2, target 1 in
//!   flight per replica: four clients without pause make it scale up to 2; when they stop it
//!   scales back down to 1 (its minimum);
//! - `mlp` (the real MLP), min 0: idle, it goes to zero replicas; then a request sent to a node
//!   is held there while the deployment is activated, and answered. The test prints each
//!   activation's latency, from the request to its answer.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/udp_proxy.rs"]
mod udp_proxy;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cluster::Cluster;
use harness::{Api, ok};
use nodes::{NodeProc, agent};
use serde_json::{Value, json};

fn input(seed: usize) -> Vec<f32> {
    (0..784)
        .map(|i| ((i * 7 + seed * 13) % 255) as f32 / 255.0)
        .collect()
}

/// One unversioned V2 request for `model` at `node`: Ok(version) or what went wrong.
fn predict(agent: &ureq::Agent, node: &str, model: &str, seed: usize) -> Result<String, String> {
    let body = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784],
        "data": input(seed)}]});
    let mut r = agent
        .post(format!("{node}/v2/models/{model}/infer"))
        .send_json(body)
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    if status != 200 {
        return Err(format!("HTTP {status}: {text}"));
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    if v["outputs"][0]["shape"] != json!([1, 10]) {
        return Err(format!("a wrong answer: {text}"));
    }
    Ok(v["model_version"].as_str().unwrap_or("?").to_string())
}

fn deployment(api: &Api, base: &str, id: u64) -> Value {
    ok(api.get(base, &format!("/v1/deployments/{id}")), "show")
}

fn ready(v: &Value) -> usize {
    v["placements"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["ready"] == json!(true))
        .count()
}

/// Wait until deployment `id` wants `replicas` and has that many ready.
fn wait_replicas(api: &Api, base: &str, id: u64, replicas: u64, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let v = deployment(api, base, id);
        if v["deployment"]["replicas"].as_u64() == Some(replicas) && ready(&v) as u64 == replicas {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "deployment {id} at {replicas} replicas within {within:?}: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn deployments_scale_with_their_load_and_down_to_zero_and_a_request_wakes_them() {
    let root = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start(root.path(), Duration::from_secs(10));
    let (api, c1, key) = (&cluster.api, cluster.c1.clone(), &cluster.key);
    let join = cluster.node_join_token(2);
    let nodes: Vec<NodeProc> = (1..=2)
        .map(|n| NodeProc::join(root.path(), n, &join))
        .collect();
    let logs = || nodes.iter().map(NodeProc::logs).collect::<String>();

    // `slow`: the MLP behind a component that sleeps 20 ms a request; `mlp`: the MLP.
    let onnx = sophon_sdk::ready::mlp().to_onnx();
    let mut manifest = sophon_sdk::onnx::onnx_manifest(&onnx, "slow", "1").expect("manifest");
    manifest
        .capabilities
        .env
        .insert("DELAY_MS".into(), "20".into());
    let component = std::fs::read(sophon_sdk::components::hostile::FLAKY).expect("guest built");
    let slow = sophon_sdk::pack_parts(
        &manifest,
        &component,
        &[("model.onnx".to_string(), onnx)],
        key,
    )
    .expect("pack");
    ok(api.push(&c1, &slow), "push slow");
    ok(
        api.push(
            &c1,
            &sophon_sdk::ready::mlp_bundle("mlp", key).expect("pack"),
        ),
        "push mlp",
    );
    for model in ["slow", "mlp"] {
        ok(
            api.send(
                "POST",
                &c1,
                "/v1/deployments",
                json!({"model": model, "version": "1", "environment": "staging", "replicas": 1}),
            ),
            "deploy",
        );
    }
    wait_replicas(api, &c1, 1, 1, Duration::from_secs(120));
    wait_replicas(api, &c1, 2, 1, Duration::from_secs(120));
    for args in [
        vec![
            "deploy",
            "autoscale",
            "1",
            "--min-replicas",
            "1",
            "--max-replicas",
            "2",
            "--target-concurrency",
            "1",
            "--stable-window",
            "4s",
            "--panic-window",
            "2s",
        ],
        vec![
            "deploy",
            "autoscale",
            "2",
            "--min-replicas",
            "0",
            "--max-replicas",
            "2",
            "--stable-window",
            "2s",
            "--panic-window",
            "1s",
            "--scale-to-zero-after",
            "2s",
        ],
    ] {
        let (set, out, err) = cluster.cli(&args);
        assert!(set, "{out}{err}");
    }
    let (_, shown, _) = cluster.cli(&["deploy", "show", "2"]);
    assert!(shown.contains("autoscale: 0..2 replicas"), "{shown}");

    // Four clients without pause on `slow`: about four requests in flight, one replica aims at
    // one, so it scales to its maximum, 2.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let targets: Vec<String> = nodes.iter().map(NodeProc::url).collect();
    let load: Vec<_> = (0..4)
        .map(|t| {
            let (stop, failed, targets) = (stop.clone(), failed.clone(), targets.clone());
            std::thread::spawn(move || {
                let agent = agent();
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    if predict(&agent, &targets[i % 2], "slow", i).is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 4;
                }
            })
        })
        .collect();
    let up = wait_replicas(api, &c1, 1, 2, Duration::from_secs(30));
    eprintln!("slow: scaled up to 2 replicas {up:?} after the load started");
    stop.store(true, Ordering::Relaxed);
    for t in load {
        let _ = t.join();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "{}", logs());
    let down = wait_replicas(api, &c1, 1, 1, Duration::from_secs(30));
    eprintln!("slow: back to 1 replica {down:?} after the load stopped");

    // `mlp`, idle, goes to zero; a request wakes it, again and again (`SOPHON_ACTIVATIONS`
    // times, 3 by default; the benchmark runs 20).
    let rounds: usize = std::env::var("SOPHON_ACTIVATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    let agent = agent();
    let mut activations = Vec::new();
    let mut warm = Vec::new();
    for round in 0..rounds {
        let idle = wait_replicas(api, &c1, 2, 0, Duration::from_secs(30));
        // The node keeps the version loaded 2 s after its replica goes: wait until it is gone.
        std::thread::sleep(Duration::from_millis(2500));
        let node = &targets[round % 2];
        let started = Instant::now();
        let answer = predict(&agent, node, "mlp", round);
        let took = started.elapsed();
        assert_eq!(answer, Ok("1".to_string()), "{}", logs());
        eprintln!("mlp: at zero {idle:?} after it was last used; activation answered in {took:?}");
        activations.push(took);
        // Answered while held: the deployment is active again, with one replica.
        let v = deployment(api, &c1, 2);
        assert_eq!(v["deployment"]["replicas"], json!(1), "{v}");
        // The same request once active: the baseline.
        for i in 0..5 {
            let started = Instant::now();
            assert!(predict(&agent, node, "mlp", round + i).is_ok());
            warm.push(started.elapsed());
        }
    }
    activations.sort();
    warm.sort();
    let p50 = |v: &[Duration]| v[v.len() / 2];
    eprintln!(
        "scale from zero, {rounds} activations: p50 {:?}, max {:?}; a request once active: p50 {:?} (ratio {:.1})",
        p50(&activations),
        activations.last().copied().unwrap_or_default(),
        p50(&warm),
        p50(&activations).as_secs_f64() / p50(&warm).as_secs_f64()
    );
    let audit = ok(api.get(&c1, "/v1/audit?limit=10000"), "audit");
    let scaled: Vec<String> = audit["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["action"] == json!("autoscale"))
        .map(|r| r["detail"].as_str().unwrap_or("").to_string())
        .collect();
    eprintln!("{}", scaled.join("\n"));
    assert!(
        scaled.iter().any(|d| d.contains("activated by a request")),
        "{scaled:?}"
    );
    assert!(
        scaled.iter().any(|d| d.contains("scaled to zero")),
        "{scaled:?}"
    );
    drop(nodes);
    drop(cluster);
}
