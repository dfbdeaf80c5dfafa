//! The mesh end to end, with real processes on 127.0.0.1: three `sophon coordinator`s and three
//! `sophon node`s joined with a node join token through the CLI, a real model pushed and
//! deployed with two replicas, and V2 predictions sent to every node, including the one that
//! holds no replica (its requests are forwarded over QUIC). Then, under load: a node holding a
//! replica is killed with SIGKILL (its replica is placed and ready elsewhere), the coordinator
//! leader is killed (no prediction fails), and every coordinator is stopped (predictions keep
//! working from the nodes' last view).

#[path = "support/harness.rs"]
mod harness;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/udp_proxy.rs"]
mod udp_proxy;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use harness::{Api, Reply, ok, three_coordinators, trusted_key, wait_for_leader};
use nodes::{NodeProc, agent};
use serde_json::{Value, json};
use udp_proxy::Faults;

fn input(seed: usize) -> Vec<f32> {
    (0..784)
        .map(|i| ((i * 7 + seed * 13) % 255) as f32 / 255.0)
        .collect()
}

/// One V2 prediction of the MLP; `Ok(outputs)` or `Err(what went wrong)`.
fn predict(agent: &ureq::Agent, node: &str, x: &[f32]) -> Result<Vec<f32>, String> {
    let body =
        json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": x}]});
    let resp = agent
        .post(format!("{node}/v2/models/mlp/infer"))
        .send_json(body)
        .map_err(|e| e.to_string())?;
    first_output(resp)
}

/// The first output's values of a V2 answer, or what went wrong.
fn first_output(mut resp: ureq::http::Response<ureq::Body>) -> Result<Vec<f32>, String> {
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("HTTP {status}: {text}"));
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    Ok(v["outputs"][0]["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_f64)
                .map(|f| f as f32)
                .collect()
        })
        .unwrap_or_default())
}

/// The same request in Triton's binary tensor format.
fn predict_binary(agent: &ureq::Agent, node: &str, x: &[f32]) -> Result<Vec<f32>, String> {
    let header = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784],
        "parameters": {"binary_data_size": x.len() * 4}}]})
    .to_string();
    let mut body = header.clone().into_bytes();
    for v in x {
        body.extend_from_slice(&v.to_le_bytes());
    }
    let resp = agent
        .post(format!("{node}/v2/models/mlp/infer"))
        .header("Inference-Header-Content-Length", header.len().to_string())
        .header("Content-Type", "application/octet-stream")
        .send(&body[..])
        .map_err(|e| e.to_string())?;
    first_output(resp)
}

/// The same request as `predict`, its body in gzip and its answer asked for in gzip. The row
/// goes four times, so that the answer is long enough to be compressed; the first row's
/// outputs come back.
fn predict_gzip(agent: &ureq::Agent, node: &str, x: &[f32]) -> Result<Vec<f32>, String> {
    use std::io::{Read, Write};
    let rows: Vec<f32> = x.repeat(4);
    let body =
        json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [4, 784], "data": rows}]});
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    let mut resp = agent
        .post(format!("{node}/v2/models/mlp/infer"))
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "gzip")
        .header("Accept-Encoding", "gzip")
        .send(&gz.finish().map_err(|e| e.to_string())?[..])
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let coding = resp
        .headers()
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let raw = resp.body_mut().read_to_vec().map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&raw)));
    }
    if coding.as_deref() != Some("gzip") {
        return Err(format!("answer not in gzip: {coding:?}"));
    }
    let mut text = String::new();
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    Ok(v["outputs"][0]["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .take(10)
                .filter_map(Value::as_f64)
                .map(|f| f as f32)
                .collect()
        })
        .unwrap_or_default())
}

/// The MLP's output for one row of `width` values, through the node's gRPC API.
fn predict_grpc(
    node: std::net::SocketAddr,
    x: &[f32],
    width: i64,
) -> Result<Vec<f32>, tonic::Status> {
    use sophon_node::grpc::pb;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut client = pb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
            format!("http://{node}"),
        )
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let request = pb::ModelInferRequest {
            model_name: "mlp".into(),
            id: "grpc-1".into(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![1, width],
                ..Default::default()
            }],
            raw_input_contents: vec![x.iter().flat_map(|v| v.to_le_bytes()).collect()],
            ..Default::default()
        };
        let response = client.model_infer(request).await?.into_inner();
        assert_eq!(response.id, "grpc-1");
        assert_eq!(response.outputs[0].shape, [1, 10]);
        Ok(response.raw_output_contents[0]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    })
}

fn close(got: &[f32], want: &[f32]) -> bool {
    got.len() == want.len() && got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-3)
}

/// Sends predictions round-robin to `targets` until stopped; counts successes and failures
/// (a wrong answer is a failure).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(targets: Vec<String>, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mlp = sophon_sdk::ready::mlp();
        let handles = (0..threads)
            .map(|t| {
                let (stop, ok, failed, errors) =
                    (stop.clone(), ok.clone(), failed.clone(), errors.clone());
                let targets = targets.clone();
                let mlp = mlp.clone();
                std::thread::spawn(move || {
                    let agent = agent();
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        let x = input(i);
                        let node = &targets[i % targets.len()];
                        match predict(&agent, node, &x) {
                            Ok(y) if close(&y, &mlp.forward(&x)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors
                                    .lock()
                                    .expect("lock")
                                    .push(format!("{node}: wrong answer"));
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.lock().expect("lock").push(format!("{node}: {e}"));
                            }
                        }
                        i += threads;
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            errors,
            threads: handles,
        }
    }

    /// Stop; (succeeded, failed, the first errors).
    fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let errors = self
            .errors
            .lock()
            .expect("lock")
            .iter()
            .take(5)
            .cloned()
            .collect();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

fn placements(api: &Api, base: &str, deployment: u64) -> Value {
    ok(
        api.get(base, &format!("/v1/deployments/{deployment}")),
        "show the deployment",
    )
}

fn ready_nodes(v: &Value) -> Vec<String> {
    v["placements"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["ready"] == json!(true))
        .filter_map(|p| p["node"].as_str().map(str::to_string))
        .collect()
}

fn wait_ready(api: &Api, base: &str, deployment: u64, replicas: usize, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Reply::Ok(v) = api.get(base, &format!("/v1/deployments/{deployment}"))
            && ready_nodes(&v).len() == replicas
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{replicas} ready replicas of deployment {deployment} within {within:?}: {:?}",
            api.get(base, &format!("/v1/deployments/{deployment}"))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn three_coordinators_and_three_nodes_serve_route_and_survive_losses() {
    let root = tempfile::tempdir().expect("tempdir");
    let faults = Faults::new();
    let (mut coordinators, token) = three_coordinators(root.path(), &faults, |_| {});
    let api = Api::new(&token, Duration::from_secs(10));
    let c1 = coordinators[0].url();
    ok(
        api.send(
            "PUT",
            &c1,
            "/v1/cluster/heartbeat-grace",
            json!({"grace_ms": 2000}),
        ),
        "set the heartbeat grace",
    );
    let key = trusted_key(&api, &c1);

    // A node join token for three nodes, through the CLI as the README shows.
    let out = Command::new(env!("CARGO_BIN_EXE_sophon"))
        .args(["node", "join-token", "--uses", "3", "--raw"])
        .env("SOPHON_SERVER", &c1)
        .env("SOPHON_TOKEN", &token)
        .output()
        .expect("sophon node join-token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let join = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(join.starts_with("sophon-join:"), "{join}");
    let mut nodes: Vec<NodeProc> = (1..=3)
        .map(|n| NodeProc::join(root.path(), n, &join))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = ok(api.get(&c1, "/v1/nodes"), "list nodes");
        let up = v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["health"] == json!("up"))
            .count();
        if up == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "three nodes up: {v}\n{}",
            nodes.iter().map(NodeProc::logs).collect::<String>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The token is used up: a fourth node is refused.
    let fourth = Command::new(env!("CARGO_BIN_EXE_sophon"))
        .args(["node", "join", "--join-token", &join, "--data"])
        .arg(root.path().join("n4"))
        .args(["--id", "n4"])
        .output()
        .expect("sophon node join");
    assert!(!fourth.status.success());
    let said = String::from_utf8_lossy(&fourth.stderr);
    assert!(said.contains("used up"), "{said}");

    // Push the real MLP and deploy two replicas.
    let bundle = sophon_sdk::ready::mlp_bundle("mlp", &key).expect("pack");
    ok(api.push(&c1, &bundle), "push the bundle");
    let created = ok(
        api.send(
            "POST",
            &c1,
            "/v1/deployments",
            json!({"model": "mlp", "version": "1", "environment": "staging", "replicas": 2}),
        ),
        "deploy",
    );
    let deployment = created["created"]["deployment"]
        .as_u64()
        .expect("deployment id");
    let started = Instant::now();
    let v = wait_ready(&api, &c1, deployment, 2, Duration::from_secs(120));
    eprintln!("deploy to 2 replicas ready: {:?}", started.elapsed());
    let hosts = ready_nodes(&v);
    let spare = nodes
        .iter()
        .position(|n| !hosts.contains(&n.id))
        .expect("one node holds no replica");

    // Every node holds a view, so it can route: ready.
    for n in &nodes {
        let mut ready = agent()
            .get(format!("{}/v2/health/ready", n.url()))
            .call()
            .expect("ready");
        assert_eq!(ready.status().as_u16(), 200, "{}", n.id);
        let text = ready.body_mut().read_to_string().expect("body");
        assert!(text.contains("true"), "{}: {text}", n.id);
    }

    // Every node answers, the one without a replica by forwarding; JSON and binary bodies.
    let mlp = sophon_sdk::ready::mlp();
    let agent = agent();
    for n in &nodes {
        let x = input(3);
        let want = mlp.forward(&x);
        let got = eventually_predict(&agent, &n.url(), &x);
        assert!(close(&got, &want), "{}: {got:?}", n.id);
        let got = predict_binary(&agent, &n.url(), &x).unwrap_or_else(|e| panic!("{}: {e}", n.id));
        assert!(close(&got, &want), "{} (binary): {got:?}", n.id);
    }
    // A compressed request through the forwarding node is inflated once, there, and its answer
    // comes back compressed as asked (tritonclient's compression options).
    let x = input(4);
    let got = predict_gzip(&agent, &nodes[spare].url(), &x).expect("gzip through the spare node");
    assert!(close(&got, &mlp.forward(&x)), "gzip forwarded: {got:?}");
    // A bad request through the forwarding node gets the serving node's clear 400, and the
    // next good one is answered.
    let bad = agent
        .post(format!("{}/v2/models/mlp/infer", nodes[spare].url()))
        .send_json(json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}))
        .expect("send");
    assert_eq!(bad.status().as_u16(), 400);
    assert!(predict(&agent, &nodes[spare].url(), &input(1)).is_ok());
    // Over gRPC too: the node without a replica forwards, a bad request gets the serving
    // node's INVALID_ARGUMENT, and the next good one is answered.
    let x = input(5);
    let got = predict_grpc(nodes[spare].grpc, &x, 784).expect("gRPC through the spare node");
    assert!(close(&got, &mlp.forward(&x)), "gRPC forwarded: {got:?}");
    let bad = predict_grpc(nodes[spare].grpc, &x[..3], 3).expect_err("3 values");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("input"), "{bad:?}");
    let got = predict_grpc(nodes[spare].grpc, &x, 784).expect("gRPC after a bad request");
    assert!(close(&got, &mlp.forward(&x)));

    // An operator unloads the model on one host through Triton's repository API: the mesh
    // hears it at once, routes that node's requests to the other replica, and does not move
    // the replica; loading it again brings it back.
    let host = nodes
        .iter()
        .position(|n| n.id == hosts[0])
        .expect("a host node");
    let unload = agent
        .post(format!(
            "{}/v2/repository/models/mlp/unload",
            nodes[host].url()
        ))
        .send_json(json!({}))
        .expect("unload");
    assert_eq!(unload.status().as_u16(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = placements(&api, &c1, deployment);
        let phase = v["placements"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["node"] == json!(hosts[0]))
            .map(|p| (p["phase"].clone(), p["reason"].clone()));
        if let Some((phase, reason)) = &phase
            && phase == &json!("unloaded")
        {
            assert!(reason.to_string().contains("repository API"), "{reason}");
            assert_eq!(ready_nodes(&v), vec![hosts[1].clone()], "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "reported unloaded: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let x = input(5);
    let got = eventually_predict(&agent, &nodes[host].url(), &x);
    assert!(
        close(&got, &mlp.forward(&x)),
        "forwarded from the unloaded host: {got:?}"
    );
    let load = agent
        .post(format!(
            "{}/v2/repository/models/mlp/load",
            nodes[host].url()
        ))
        .send_json(json!({}))
        .expect("load");
    assert_eq!(load.status().as_u16(), 200);
    wait_ready(&api, &c1, deployment, 2, Duration::from_secs(10));

    // Performance reports reach the coordinators (any of them answers; the leader has them).
    let load = Load::start(nodes.iter().map(NodeProc::url).collect(), 2);
    let deadline = Instant::now() + Duration::from_secs(30);
    let stats = loop {
        let s = ok(
            api.get(&c1, &format!("/v1/deployments/{deployment}/stats")),
            "deployment stats",
        );
        if s["count"].as_u64().unwrap_or(0) > 0 && s["total_us"]["p99"].is_u64() {
            break s;
        }
        assert!(Instant::now() < deadline, "performance reported: {s}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let (succeeded, failed, errors) = load.finish();
    assert_eq!(failed, 0, "{errors:?}");
    assert!(succeeded > 0);
    assert!(stats["rate_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{stats}");
    assert_eq!(stats["ready"], json!(2), "{stats}");
    let host_stats = ok(
        api.get(&c1, &format!("/v1/nodes/{}/stats", hosts[0])),
        "node stats",
    );
    assert!(
        host_stats["models"]
            .as_array()
            .is_some_and(|m| !m.is_empty()),
        "{host_stats}"
    );
    let top = Command::new(env!("CARGO_BIN_EXE_sophon"))
        .args(["top", "--once"])
        .env("SOPHON_SERVER", &c1)
        .env("SOPHON_TOKEN", &token)
        .output()
        .expect("sophon top");
    let shown = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success() && shown.contains("mlp@1") && shown.contains("2/2"),
        "{shown}"
    );
    // The leader's gauges follow its placement view, which a new leader rebuilds from the
    // nodes' reports: read them until they show both replicas (or the deadline passes).
    let want = format!(
        "sophon_deployment_replicas{{deployment=\"{deployment}\",model=\"mlp@1\",state=\"ready\"}} 2"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let leader =
            wait_for_leader(&api, &coordinators, Duration::from_secs(10)).expect("a leader");
        let leader_url = coordinators
            .iter()
            .find(|m| m.id == leader)
            .map(|m| m.url())
            .expect("leader");
        let metrics = ureq::get(format!("{leader_url}/metrics"))
            .call()
            .expect("metrics")
            .body_mut()
            .read_to_string()
            .expect("metrics text");
        if metrics.contains(&want) {
            break;
        }
        assert!(Instant::now() < deadline, "{want} not in:\n{metrics}");
        std::thread::sleep(Duration::from_millis(300));
    }

    // kill -9 a node that holds a replica, under load on the other two.
    let victim = nodes
        .iter()
        .position(|n| hosts.contains(&n.id))
        .expect("a host");
    let others: Vec<String> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, n)| n.url())
        .collect();
    let load = Load::start(others.clone(), 4);
    std::thread::sleep(Duration::from_millis(500));
    let killed_at = Instant::now();
    nodes[victim].kill();
    let victim_id = nodes[victim].id.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = placements(&api, &c1, deployment);
        let ready = ready_nodes(&v);
        if ready.len() == 2 && !ready.contains(&victim_id) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica moves off {victim_id}: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let moved = killed_at.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let (succeeded, failed, errors) = load.finish();
    let rate = failed as f64 / (succeeded + failed).max(1) as f64;
    eprintln!(
        "node loss: replica ready elsewhere {moved:?} after kill -9 (grace 2 s); \
         {failed} of {} predictions failed ({:.3} %): {errors:?}",
        succeeded + failed,
        rate * 100.0
    );
    assert!(succeeded > 100, "the load ran: {succeeded}");
    assert!(
        moved < Duration::from_secs(2 + 8),
        "ready elsewhere in {moved:?}"
    );
    assert!(
        rate <= 0.01,
        "{failed} of {} failed: {errors:?}",
        succeeded + failed
    );

    // kill -9 the coordinator leader under load: no prediction fails.
    let load = Load::start(others.clone(), 4);
    std::thread::sleep(Duration::from_millis(300));
    let leader = wait_for_leader(&api, &coordinators, Duration::from_secs(10)).expect("a leader");
    let li = coordinators
        .iter()
        .position(|m| m.id == leader)
        .expect("leader is a member");
    coordinators[li].kill();
    std::thread::sleep(Duration::from_secs(3));
    let (succeeded, failed, errors) = load.finish();
    assert!(succeeded > 50, "the load ran: {succeeded}");
    assert_eq!(
        failed, 0,
        "no prediction fails when the leader dies: {errors:?}"
    );

    // Every coordinator down: the nodes keep serving and routing from their last view.
    for m in &mut coordinators {
        m.kill();
    }
    let load = Load::start(others, 4);
    std::thread::sleep(Duration::from_secs(3));
    let (succeeded, failed, errors) = load.finish();
    assert!(succeeded > 50, "the load ran: {succeeded}");
    assert_eq!(
        failed, 0,
        "predictions keep working without coordinators: {errors:?}"
    );
}

/// The first prediction on a node may come before its view has the routes: retry a while.
fn eventually_predict(agent: &ureq::Agent, node: &str, x: &[f32]) -> Vec<f32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match predict(agent, node, x) {
            Ok(y) => return y,
            Err(e) => {
                assert!(Instant::now() < deadline, "{node}: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
