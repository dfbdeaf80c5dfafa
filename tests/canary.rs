//! Canaries judged on live traffic, with real processes on 127.0.0.1: three coordinators, two
//! nodes, the real MLP serving as deployment 1 under a steady client load, and four canaries
//! started through the CLI as an operator would (`sophon deploy canary ... --wait`):
//!
//! 1. a release whose component fails 30 % of requests: rolled back on its own;
//! 2. the same release mirrored (`--mirror`), with the clients on gRPC: rolled back on the
//!    mirrored copies alone, and no client saw a failure;
//! 3. a release 2 ms slower per request (about 7× the MLP's median), within its SLO: rolled
//!    back for falling behind the serving revision;
//! 4. a good release: promoted step by step, then serving all the traffic.
//!
//! The clients count the failures they saw in each phase and the test prints the time each
//! rollback took; the coordinators' decisions, with their figures, are in `deploy show` and the
//! audit log.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/udp_proxy.rs"]
mod udp_proxy;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::Cluster;
use harness::{Api, ok};
use nodes::{NodeProc, agent};
use serde_json::{Value, json};

const PHASES: usize = 5;

/// What the clients saw in each phase: answers by version, failures, and when the last failure
/// and the last answer of each version came.
#[derive(Default)]
struct Seen {
    answers: [std::collections::BTreeMap<String, u64>; PHASES],
    failed: [u64; PHASES],
    errors: Vec<String>,
    /// When the clients saw the first and the last failure of each phase.
    failures: [Option<(Instant, Instant)>; PHASES],
}

struct Load {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    /// Send over gRPC (to the nodes' gRPC ports) instead of HTTP.
    grpc: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn input(seed: usize) -> Vec<f32> {
    (0..784)
        .map(|i| ((i * 7 + seed * 13) % 255) as f32 / 255.0)
        .collect()
}

/// One unversioned V2 JSON request over HTTP: (the version that answered, the output).
fn predict_http(agent: &ureq::Agent, node: &str, x: &[f32]) -> Result<(String, Vec<f32>), String> {
    let body = json!({"inputs": [{"name": "input", "datatype": "FP32",
        "shape": [1, 784], "data": x}]});
    let v = agent
        .post(format!("{node}/v2/models/mlp/infer"))
        .send_json(body)
        .map_err(|e| e.to_string())
        .and_then(|mut r| {
            let status = r.status().as_u16();
            let text = r.body_mut().read_to_string().unwrap_or_default();
            if status != 200 {
                return Err(format!("HTTP {status}: {text}"));
            }
            serde_json::from_str::<Value>(&text).map_err(|e| e.to_string())
        })?;
    let got = v["outputs"][0]["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .map(|f| f as f32)
        .collect();
    Ok((v["model_version"].as_str().unwrap_or("?").to_string(), got))
}

type GrpcClient = sophon_node::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient<
    tonic::transport::Channel,
>;

/// The same request over gRPC (`ModelInfer`, raw contents), on a client kept per node.
async fn predict_grpc(
    client: &mut Option<GrpcClient>,
    node: std::net::SocketAddr,
    x: &[f32],
) -> Result<(String, Vec<f32>), String> {
    use sophon_node::grpc::pb;
    if client.is_none() {
        *client = Some(
            GrpcClient::connect(format!("http://{node}"))
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let c = client.as_mut().expect("connected");
    let request = pb::ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 784],
            ..Default::default()
        }],
        raw_input_contents: vec![x.iter().flat_map(|v| v.to_le_bytes()).collect()],
        ..Default::default()
    };
    let r = c
        .model_infer(request)
        .await
        .map_err(|e| format!("gRPC {:?}: {}", e.code(), e.message()))?
        .into_inner();
    let got = r
        .raw_output_contents
        .first()
        .map(|b| {
            b.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
        .unwrap_or_default();
    Ok((r.model_version, got))
}

impl Load {
    fn start(
        targets: Vec<String>,
        grpc_targets: Vec<std::net::SocketAddr>,
        threads: usize,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicUsize::new(0));
        let grpc = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mlp = sophon_sdk::ready::mlp();
        let threads = (0..threads)
            .map(|t| {
                let (stop, phase, seen, grpc) =
                    (stop.clone(), phase.clone(), seen.clone(), grpc.clone());
                let (targets, grpc_targets, mlp) =
                    (targets.clone(), grpc_targets.clone(), mlp.clone());
                std::thread::spawn(move || {
                    let agent = agent();
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    let mut clients: Vec<Option<GrpcClient>> = vec![None; grpc_targets.len()];
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        let x = input(i);
                        let k = i % targets.len();
                        let answer = if grpc.load(Ordering::Relaxed) {
                            rt.block_on(predict_grpc(&mut clients[k], grpc_targets[k], &x))
                        } else {
                            predict_http(&agent, &targets[k], &x)
                        };
                        let p = phase.load(Ordering::Relaxed);
                        let mut s = seen.lock().expect("lock");
                        match answer {
                            Ok((version, got)) => {
                                let want = mlp.forward(&x);
                                let right = got.len() == want.len()
                                    && got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-3);
                                if right {
                                    *s.answers[p].entry(version).or_default() += 1;
                                } else {
                                    s.failed[p] += 1;
                                    s.errors.push(format!("phase {p}: a wrong answer"));
                                }
                            }
                            Err(e) => {
                                s.failed[p] += 1;
                                let now = Instant::now();
                                let first = s.failures[p].map_or(now, |(first, _)| first);
                                s.failures[p] = Some((first, now));
                                if s.errors.len() < 20 {
                                    s.errors.push(format!("phase {p}: {e}"));
                                }
                            }
                        }
                        drop(s);
                        i += 2;
                    }
                })
            })
            .collect();
        Load {
            stop,
            phase,
            grpc,
            seen,
            threads,
        }
    }

    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        std::mem::take(&mut *self.seen.lock().expect("lock"))
    }
}

/// The MLP as `version`, run by the flaky component with `env` granted (its failure rate and
/// delay).
fn flaky_bundle(version: &str, env: &[(&str, &str)], key: &sophon_sdk::SigningKey) -> Vec<u8> {
    let onnx = sophon_sdk::ready::mlp().to_onnx();
    let mut manifest = sophon_sdk::onnx::onnx_manifest(&onnx, "mlp", version).expect("manifest");
    for (k, v) in env {
        manifest
            .capabilities
            .env
            .insert(k.to_string(), v.to_string());
    }
    let component = std::fs::read(sophon_sdk::components::hostile::FLAKY).expect("guest built");
    sophon_sdk::pack_parts(
        &manifest,
        &component,
        &[("model.onnx".to_string(), onnx)],
        key,
    )
    .expect("pack")
}

/// Revision 1 serving alone on every replica again, or `version` serving after a promotion.
fn wait_serving(api: &Api, base: &str, version: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = ok(api.get(base, "/v1/deployments/1"), "show deployment 1");
        let d = &v["deployment"];
        let ready = v["placements"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["ready"] == json!(true))
            .count();
        if d["version"] == json!(version) && d["update"].is_null() && ready == 2 {
            return v;
        }
        assert!(Instant::now() < deadline, "{version} serving alone: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn canaries_are_judged_on_live_traffic_and_rolled_back_or_promoted_on_their_own() {
    let root = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start(root.path(), Duration::from_secs(10));
    let (api, c1, key) = (&cluster.api, cluster.c1.clone(), &cluster.key);
    let join = cluster.node_join_token(2);
    let nodes: Vec<NodeProc> = (1..=2)
        .map(|n| NodeProc::join(root.path(), n, &join))
        .collect();
    let logs = || nodes.iter().map(NodeProc::logs).collect::<String>();

    // The real MLP, two replicas; then three more versions of it on the shelf.
    ok(
        api.push(
            &c1,
            &sophon_sdk::ready::mlp_bundle("mlp", key).expect("pack"),
        ),
        "push mlp 1",
    );
    ok(
        api.send(
            "POST",
            &c1,
            "/v1/deployments",
            json!({"model": "mlp", "version": "1", "environment": "staging", "replicas": 2}),
        ),
        "deploy",
    );
    for bundle in [
        flaky_bundle("2", &[("FAIL_PERCENT", "30")], key),
        flaky_bundle("3", &[("DELAY_MS", "2")], key),
        flaky_bundle("4", &[], key),
    ] {
        ok(api.push(&c1, &bundle), "push a release");
    }
    wait_serving(api, &c1, "1", Duration::from_secs(120));
    let load = Load::start(
        nodes.iter().map(NodeProc::url).collect(),
        nodes.iter().map(|n| n.grpc).collect(),
        2,
    );
    std::thread::sleep(Duration::from_secs(1));

    let canary = |version: &str, extra: &[&str]| {
        let mut args = vec![
            "deploy",
            "canary",
            "1",
            "--version",
            version,
            "--steps",
            "10,50,100",
            "--interval",
            "3s",
            "--slo",
            "p99<500ms,errors<1%",
            "--wait",
            "--timeout",
            "90s",
        ];
        args.extend_from_slice(extra);
        let started = Instant::now();
        let (succeeded, _, stderr) = cluster.cli(&args);
        (succeeded, stderr, started.elapsed())
    };
    let mut timings = Vec::new();
    // After a rollback is committed, nodes take a moment to hear of it (their view is pushed on
    // each change): what clients see until then still belongs to the phase that ends.
    let settle = || std::thread::sleep(Duration::from_secs(1));

    // 1. Failing 30 %: rolled back while at 10 %.
    load.phase.store(1, Ordering::Relaxed);
    let (promoted, said, took) = canary("2", &[]);
    assert!(
        !promoted,
        "the failing canary was promoted: {said}\n{}",
        logs()
    );
    assert!(
        said.contains("was rolled back") && said.contains("errors"),
        "{said}"
    );
    let failures = load.seen.lock().expect("lock").failures[1];
    timings.push(("failing 30%", took, failures));
    wait_serving(api, &c1, "1", Duration::from_secs(30));
    settle();

    // 2. The same release mirrored, with clients on gRPC: rolled back on the copies alone, and
    // no client sees its failures.
    load.phase.store(2, Ordering::Relaxed);
    load.grpc.store(true, Ordering::Relaxed);
    let (promoted, said, took) = canary("2", &["--mirror"]);
    assert!(
        !promoted,
        "the mirrored failing canary was promoted: {said}"
    );
    assert!(said.contains("errors"), "{said}");
    timings.push(("failing 30%, mirrored (gRPC clients)", took, None));
    wait_serving(api, &c1, "1", Duration::from_secs(30));
    settle();
    load.grpc.store(false, Ordering::Relaxed);

    // 3. Several times slower, yet within the SLO: rolled back against the serving revision.
    load.phase.store(3, Ordering::Relaxed);
    let (promoted, said, took) = canary("3", &[]);
    assert!(!promoted, "the slow canary was promoted: {said}");
    assert!(said.contains("the serving revision's"), "{said}");
    timings.push(("2 ms slower", took, None));
    wait_serving(api, &c1, "1", Duration::from_secs(30));
    settle();

    // 4. A good release: promoted through every step, then serving alone.
    load.phase.store(4, Ordering::Relaxed);
    let (promoted, said, took) = canary("4", &[]);
    assert!(
        promoted,
        "the good canary was not promoted: {said}\n{}",
        logs()
    );
    timings.push(("good, promoted", took, None));
    wait_serving(api, &c1, "4", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let seen = load.finish();

    // What the operator sees: every decision with its figures.
    let (shown, show, _) = cluster.cli(&["deploy", "show", "1"]);
    assert!(shown);
    eprintln!("{show}");
    assert!(show.contains("canary decisions on revision"), "{show}");
    assert!(show.contains("promote"), "{show}");
    let v = ok(api.get(&c1, "/v1/deployments/1/history"), "history");
    let history = v["history"].as_array().expect("history").clone();
    let verdicts = |revision: u64| -> Vec<String> {
        history
            .iter()
            .find(|r| r["revision"] == json!(revision))
            .and_then(|r| r["decisions"].as_array())
            .into_iter()
            .flatten()
            .map(|d| d["verdict"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(verdicts(2), ["rollback"], "{v}");
    assert_eq!(verdicts(3), ["rollback"], "{v}");
    assert_eq!(verdicts(4), ["rollback"], "{v}");
    let good = verdicts(5);
    assert_eq!(good.last().map(String::as_str), Some("promote"), "{v}");
    let failing = history
        .iter()
        .find(|r| r["revision"] == json!(2))
        .expect("revision 2");
    let figures = &failing["decisions"][0]["canary"];
    assert!(figures["errors"].as_u64() > Some(0), "{failing}");
    let audit = ok(api.get(&c1, "/v1/audit?limit=10000"), "audit");
    let judged = audit["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["action"] == json!("judge-canary"))
        .count();
    assert!(judged >= 4, "{audit}");

    for (what, took, failures) in &timings {
        eprintln!("canary {what}: decided in {took:?} from the command");
        if let Some((first, last)) = failures {
            eprintln!(
                "  clients saw its failures for {:?}, from the first to the last",
                last.duration_since(*first)
            );
        }
    }
    for p in 0..PHASES {
        eprintln!(
            "phase {p}: answers {:?}, failed {}",
            seen.answers[p], seen.failed[p]
        );
    }
    eprintln!("first errors: {:?}", seen.errors);
    // Only the failing canary's answers failed, and only it answered with version 2.
    assert_eq!(seen.failed[0], 0, "{:?}", seen.errors);
    assert!(seen.failed[1] > 0, "the failing canary got no traffic");
    assert_eq!(seen.failed[2], 0, "mirrored: {:?}", seen.errors);
    assert_eq!(seen.failed[3], 0, "{:?}", seen.errors);
    assert_eq!(seen.failed[4], 0, "{:?}", seen.errors);
    assert!(
        seen.answers[2].keys().all(|v| v == "1"),
        "{:?}",
        seen.answers[2]
    );
    assert!(seen.answers[3].contains_key("3"), "{:?}", seen.answers[3]);
    assert!(seen.answers[4].contains_key("4"), "{:?}", seen.answers[4]);
    drop(nodes);
    drop(cluster);
}
