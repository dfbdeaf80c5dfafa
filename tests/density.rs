//! Many models on one node, within a memory budget: three coordinators and one node started
//! with `--model-memory 24` (MiB; `SOPHON_MODEL_MEMORY` to change it), and `SOPHON_MODELS` distinct MLP deployments (40 by default;
//! the benchmark runs 1,000) pushed and deployed to it. More than fit: the node keeps the least
//! recently used within the budget, evicts the others, and loads an evicted one again from its
//! disk when a request comes. Every model answers correctly; the test prints the p50 of a hit
//! (loaded) and of a miss (loaded on demand), and the node's RSS.
//!
//! Placements are cold but one: no model but the hot `m0` is loaded before its first request.
//! The node measures what each load keeps, and the shelf records it for the scheduler.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/udp_proxy.rs"]
mod udp_proxy;

use std::time::{Duration, Instant};

use cluster::Cluster;
use harness::ok;
use nodes::{NodeProc, agent};
use serde_json::{Value, json};

fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

fn predict(agent: &ureq::Agent, node: &str, model: &str, x: &[f32]) -> Result<Vec<f32>, String> {
    let body =
        json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": x}]});
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
    Ok(v["outputs"][0]["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .map(|f| f as f32)
        .collect())
}

/// A log line without its terminal colours.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn p50(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn a_node_serves_more_models_than_its_memory_holds_by_evicting_and_reloading() {
    let models: usize = std::env::var("SOPHON_MODELS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(40);
    let budget_mib: u64 = std::env::var("SOPHON_MODEL_MEMORY")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(24);
    let root = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start(root.path(), Duration::from_secs(30));
    let (api, c1, key) = (&cluster.api, cluster.c1.clone(), &cluster.key);
    let join = cluster.node_join_token(1);
    // The node evicts, so the scheduler may promise it more than its memory.
    let (set, _, said) = cluster.cli(&["cluster", "overcommit", "400"]);
    assert!(set, "{said}");
    let status = ok(api.get(&c1, "/v1/cluster/status"), "status");
    assert_eq!(status["memory_overcommit_pct"], json!(400), "{status}");
    let node = NodeProc::join_with(
        root.path(),
        1,
        &join,
        &[
            "--memory-mb",
            "20000",
            "--model-memory",
            &budget_mib.to_string(),
        ],
    );
    let url = node.url();
    let pid = node.pid().expect("running");

    // N distinct MLPs (each its own name and digest), each asking 8 MiB of the node.
    let mlp = sophon_sdk::ready::mlp();
    let onnx = mlp.to_onnx();
    let started = Instant::now();
    let mut bundle_bytes = 0;
    for i in 0..models {
        let name = format!("m{i}");
        let mut manifest = sophon_sdk::onnx::onnx_manifest(&onnx, &name, "1").expect("manifest");
        manifest.resources.memory_mb = 8;
        let bundle = sophon_sdk::pack_parts(
            &manifest,
            sophon_sdk::components::PASSTHROUGH,
            &[("model.onnx".to_string(), onnx.clone())],
            key,
        )
        .expect("pack");
        bundle_bytes = bundle.len();
        ok(api.push(&c1, &bundle), "push");
        ok(
            api.send(
                "POST",
                &c1,
                "/v1/deployments",
                json!({"model": name, "version": "1", "environment": "staging", "replicas": 1,
                       "hot": i == 0}),
            ),
            "deploy",
        );
    }
    eprintln!(
        "{models} models of {} KiB pushed and deployed in {:?}",
        bundle_bytes / 1024,
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(60 + models as u64 / 2);
    loop {
        let v = ok(api.get(&c1, "/v1/deployments"), "list");
        let available = v
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["rollout"]["state"] == json!("available"))
            .count();
        if available == models {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{available} of {models} available\n{}",
            node.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "all {models} ready {:?} after the first push; node RSS {} MiB",
        started.elapsed(),
        rss_mib(pid)
    );

    // Cold placements are verified and compiled, not loaded: only the hot one is.
    let loaded: Vec<String> = node
        .logs()
        .lines()
        .filter(|l| l.contains("model loaded"))
        .map(plain)
        .collect();
    assert!(
        loaded.len() == 1 && loaded[0].contains(" model=m0 "),
        "only the hot model loads before a request: {loaded:#?}"
    );

    let agent = agent();
    let x: Vec<f32> = (0..784).map(|i| (i % 255) as f32 / 255.0).collect();
    let want = mlp.forward(&x);
    let right = |got: &[f32]| {
        got.len() == want.len() && got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-3)
    };
    // Every model in turn, twice: more than the budget holds, so least-recently-used order
    // makes each request a miss (loaded again from disk).
    let mut misses = Vec::new();
    for round in 0..2 {
        for i in 0..models {
            let t = Instant::now();
            let got = predict(&agent, &url, &format!("m{i}"), &x)
                .unwrap_or_else(|e| panic!("round {round}, m{i}: {e}\n{}", node.logs()));
            misses.push(t.elapsed());
            assert!(right(&got), "m{i}");
        }
    }
    // One model again and again: loaded, so each request is a hit.
    let mut hits = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let got = predict(&agent, &url, "m0", &x).expect("hit");
        hits.push(t.elapsed());
        assert!(right(&got));
    }
    let rss = rss_mib(pid);
    let logs = node.logs();
    let evicted = logs.matches("evicted").count();
    eprintln!(
        "{models} models, budget {budget_mib} MiB: hit p50 {:?}, miss p50 {:?} (ratio {:.1}); node RSS {rss} MiB ({:.2} MiB per model)",
        p50(&mut hits),
        p50(&mut misses),
        p50(&mut misses).as_secs_f64() / p50(&mut hits).as_secs_f64(),
        rss as f64 / models as f64
    );
    eprintln!("evictions: {evicted}");
    assert!(!logs.contains("could not load"), "{logs}");
    // What a load keeps, as the node measured it, replaces the manifest's figure on the shelf.
    let deadline = Instant::now() + Duration::from_secs(20);
    let v = loop {
        let v = ok(api.get(&c1, "/v1/models/m1/versions/1"), "version");
        if v["measured"]["memory_mb"].is_u64() || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let measured = v["measured"]["memory_mb"]
        .as_u64()
        .unwrap_or_else(|| panic!("m1's memory was never measured: {v}\n{}", node.logs()));
    eprintln!(
        "measured per model: {measured} MiB once loaded (manifest estimate {} MiB)",
        v["manifest"]["memory_mb"]
    );
    assert_eq!(v["measured"]["node"], json!("n1"), "{v}");
    // 40 models of about 1 MiB each (as measured) do not fit 24 MiB.
    if (models as u64) * measured > budget_mib {
        assert!(
            evicted > 0,
            "nothing was evicted: {:#?}",
            logs.lines()
                .filter(|l| l.contains("measured"))
                .map(plain)
                .take(3)
                .collect::<Vec<_>>()
        );
    }

    drop(node);
    drop(cluster);
}
