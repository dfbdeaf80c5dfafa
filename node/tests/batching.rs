//! Dynamic batching: requests sent together are computed in fewer calls of the model, and each
//! gets exactly what it gets alone. A property test sends random mixes of row counts at once;
//! a request that fails (ids past the embedding table) fails alone while its batch-mates get
//! their answers; requests that cannot join (their inputs disagree on dim 0) run alone.

mod common;

use axum::http::StatusCode;
use common::*;
use proptest::prelude::*;
use serde_json::{Value, json};
use sophon_node::ServingLimits;
use sophon_node::http::HttpConfig;
use sophon_sdk::{Batching, examples};

fn load(n: &Node, name: &str, onnx: Vec<u8>, batching: Option<Batching>) {
    load_onnx(n, name, onnx, |m| {
        m.resources.max_batch_size = 16;
        m.batching = batching;
        // One backend for every copy, so that batched and plain answers (and errors) compare.
        m.hardware.backends = vec![sophon_sdk::Backend::Tract];
    });
}

/// Batching that waits up to `delay_us` for batches of up to `max` rows (0: the model's).
fn batching(delay_us: u64, max: u32) -> Batching {
    Batching {
        max_batch_size: max,
        preferred_batch_sizes: Vec::new(),
        max_queue_delay_us: delay_us,
    }
}

/// A node whose models run one request at a time, so that concurrent ones queue and batch.
fn one_slot(limits: ServingLimits) -> Node {
    node_with(
        ServingLimits {
            default_concurrency: 1,
            ..limits
        },
        HttpConfig::default(),
    )
}

/// A node with an MLP and an embedding, each twice: batched (requests wait up to 20 ms for
/// others) and plain.
fn models() -> Node {
    // One instance slot per model: concurrent requests must queue, and batch.
    let n = one_slot(ServingLimits::default());
    let batching = batching(20_000, 0);
    let mlp = sophon_sdk::ready::mlp().to_onnx();
    load(&n, "mlp_batched", mlp.clone(), Some(batching.clone()));
    load(&n, "mlp", mlp, None);
    let embed = examples::embedding_onnx(10, 3, false);
    load(&n, "embed_batched", embed.clone(), Some(batching));
    load(&n, "embed", embed, None);
    n
}

fn mlp_body(rows: usize, seed: u64) -> Value {
    let data: Vec<f32> = (0..rows * 784)
        .map(|i| ((i as u64 * 7 + seed * 31) % 97) as f32 / 97.0)
        .collect();
    json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 784], "data": data}]})
}

fn embed_body(ids: &[i64]) -> Value {
    json!({"inputs": [{"name": "ids", "datatype": "INT64", "shape": [ids.len()], "data": ids}]})
}

async fn infer(n: &Node, model: &str, body: &Value) -> (StatusCode, Value) {
    post_json(&n.app, &format!("/v2/models/{model}/infer"), body).await
}

async fn counts(n: &Node, model: &str) -> (u64, u64) {
    let (status, stats) = get_json(&n.app, &format!("/v2/models/{model}/stats")).await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    let s = &stats["model_stats"][0];
    (
        s["inference_count"].as_u64().expect("inference_count"),
        s["execution_count"].as_u64().expect("execution_count"),
    )
}

fn close(got: &[f32], want: &[f32]) -> bool {
    got.len() == want.len() && got.iter().zip(want).all(|(g, w)| (g - w).abs() <= 1e-5)
}

#[test]
fn batched_answers_are_what_each_request_gets_alone() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let n = models();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    });
    let requests = prop::collection::vec((1usize..=5, 0u64..1000), 1..10);
    runner
        .run(&requests, |requests| {
            rt.block_on(async {
                let batched =
                    futures_util::future::join_all(requests.iter().map(|(rows, seed)| async {
                        infer(&n, "mlp_batched", &mlp_body(*rows, *seed)).await
                    }))
                    .await;
                for ((rows, seed), (status, body)) in requests.iter().zip(batched) {
                    prop_assert_eq!(status, StatusCode::OK, "{}", body);
                    let (status, alone) = infer(&n, "mlp", &mlp_body(*rows, *seed)).await;
                    prop_assert_eq!(status, StatusCode::OK, "{}", alone);
                    let out = &body["outputs"][0];
                    prop_assert_eq!(&out["shape"], &json!([rows, 10]));
                    let (got, want) = (f32s(&out["data"]), f32s(&alone["outputs"][0]["data"]));
                    prop_assert!(close(&got, &want), "rows {}: {:?} != {:?}", rows, got, want);
                }
                Ok(())
            })
        })
        .expect("each batched request answers as it does alone");
    let (inferences, executions) = rt.block_on(counts(&n, "mlp_batched"));
    assert!(
        executions < inferences,
        "requests sent together were batched: {executions} executions for {inferences} rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_request_fails_alone_and_its_batch_mates_get_their_answers() {
    let n = models();
    for round in 0..3 {
        let sets: Vec<Vec<i64>> = vec![
            vec![1, 2],
            vec![3],
            vec![4, 99], // 99 is past the table of 10 rows
            vec![0, 9, 5],
            vec![-1],
        ];
        let answers = futures_util::future::join_all(
            sets.iter()
                .map(|ids| async { infer(&n, "embed_batched", &embed_body(ids)).await }),
        )
        .await;
        for (ids, (status, body)) in sets.iter().zip(answers) {
            let (alone_status, alone) = infer(&n, "embed", &embed_body(ids)).await;
            assert_eq!(status, alone_status, "round {round}, ids {ids:?}: {body}");
            if ids.contains(&99) {
                assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
                // Word for word what it gets alone (element 1 of its own ids, not of the batch).
                let batched = body["error"].as_str().expect("error");
                let alone = alone["error"].as_str().expect("error");
                assert_eq!(batched.replace("embed_batched", "embed"), alone);
                continue;
            }
            assert_eq!(status, StatusCode::OK, "ids {ids:?}: {body}");
            assert_eq!(body["outputs"], alone["outputs"], "ids {ids:?}");
        }
    }
    // After the failures, a batch of good requests still runs as one call.
    let n = &n;
    let (before, executions_before) = counts(n, "embed_batched").await;
    let answers = futures_util::future::join_all(
        (0..6).map(|i| async move { infer(n, "embed_batched", &embed_body(&[i, i + 1])).await }),
    )
    .await;
    for (i, (status, body)) in answers.into_iter().enumerate() {
        assert_eq!(status, StatusCode::OK, "{body}");
        let got = f32s(&body["outputs"][0]["data"]);
        let i = i as f32;
        assert_eq!(got, vec![i, i, i, i + 1.0, i + 1.0, i + 1.0]);
    }
    let (after, executions_after) = counts(n, "embed_batched").await;
    assert_eq!(after - before, 12, "12 rows inferred");
    assert!(
        executions_after - executions_before < 6,
        "6 requests sent together ran in fewer calls: {}",
        executions_after - executions_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_and_statistics_report_the_batching() {
    let n = models();
    let (status, config) = get_json(&n.app, "/v2/models/mlp_batched/config").await;
    assert_eq!(status, StatusCode::OK, "{config}");
    assert_eq!(config["max_batch_size"], 16);
    assert_eq!(
        config["dynamic_batching"]["max_queue_delay_microseconds"],
        20_000
    );
    assert_eq!(config["input"][0]["dims"], json!([784]));
    let (_, plain) = get_json(&n.app, "/v2/models/mlp/config").await;
    assert!(plain.get("dynamic_batching").is_none(), "{plain}");

    let n = &n;
    let answers = futures_util::future::join_all(
        (0..4).map(|i| async move { infer(n, "mlp_batched", &mlp_body(2, i)).await }),
    )
    .await;
    assert!(answers.iter().all(|(s, _)| *s == StatusCode::OK));
    let (_, stats) = get_json(&n.app, "/v2/models/mlp_batched/stats").await;
    let s = &stats["model_stats"][0];
    assert_eq!(s["inference_count"], 8);
    let batches = s["batch_stats"].as_array().expect("batch_stats");
    let rows: u64 = batches
        .iter()
        .map(|b| {
            b["batch_size"].as_u64().expect("count")
                * b["compute_infer"]["count"].as_u64().expect("count")
        })
        .sum();
    assert_eq!(rows, 8, "batch_stats count every row once: {batches:?}");
    let executions: u64 = batches
        .iter()
        .map(|b| b["compute_infer"]["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(s["execution_count"].as_u64(), Some(executions));
    assert_eq!(s["inference_stats"]["success"]["count"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_node_overrides_the_manifest() {
    let mut limits = ServingLimits::default();
    limits
        .batching
        .insert("*".into(), Some(batching(10_000, 4)));
    limits.batching.insert("embed".into(), None);
    let n = one_slot(limits);
    load(&n, "mlp", sophon_sdk::ready::mlp().to_onnx(), None);
    let embed = examples::embedding_onnx(10, 3, false);
    load(&n, "embed", embed, Some(batching(10, 0)));
    let (_, config) = get_json(&n.app, "/v2/models/mlp/config").await;
    assert_eq!(
        config["dynamic_batching"]["max_queue_delay_microseconds"], 10_000,
        "{config}"
    );
    assert_eq!(
        config["parameters"]["sophon_batch_limit"]["string_value"],
        "4"
    );
    let (_, config) = get_json(&n.app, "/v2/models/embed/config").await;
    assert!(config.get("dynamic_batching").is_none(), "{config}");
    // A request of more rows than the batcher's limit (but within the model's) runs alone.
    let (status, body) = infer(&n, "mlp", &mlp_body(6, 1)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outputs"][0]["shape"], json!([6, 10]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_no_delay_a_busy_model_still_batches() {
    let n = one_slot(ServingLimits::default());
    let now = batching(0, 0);
    load(&n, "mlp", sophon_sdk::ready::mlp().to_onnx(), Some(now));
    // Alone, a request runs at once: nothing to wait for.
    let (status, body) = infer(&n, "mlp", &mlp_body(1, 7)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mlp = sophon_sdk::ready::mlp();
    for _ in 0..5 {
        let (before, executions_before) = counts(&n, "mlp").await;
        let tasks: Vec<_> = (0..24u64)
            .map(|seed| {
                let app = n.app.clone();
                tokio::spawn(async move {
                    let body = mlp_body(2, seed);
                    let answer = post_json(&app, "/v2/models/mlp/infer", &body).await;
                    (seed, answer)
                })
            })
            .collect();
        for task in tasks {
            let (seed, (status, body)) = task.await.expect("task");
            assert_eq!(status, StatusCode::OK, "{body}");
            let data: Vec<f32> = mlp_body(2, seed)["inputs"][0]["data"]
                .as_array()
                .expect("data")
                .iter()
                .map(|v| v.as_f64().expect("number") as f32)
                .collect();
            assert!(close(
                &f32s(&body["outputs"][0]["data"]),
                &mlp.forward(&data)
            ));
        }
        let (after, executions_after) = counts(&n, "mlp").await;
        assert_eq!(after - before, 48);
        if executions_after - executions_before < 24 {
            return;
        }
    }
    panic!("24 requests at once on one slot never batched in 5 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_delay_is_not_waited_while_another_slot_is_free() {
    // Two slots and the longest delay (a second): a lone request finds the other slot free, so
    // it runs at once instead of waiting for company while a slot stays idle. One that waited
    // would spend at least the delay in the queue.
    let n = node_with(
        ServingLimits {
            default_concurrency: 2,
            ..ServingLimits::default()
        },
        HttpConfig::default(),
    );
    load(
        &n,
        "mlp",
        sophon_sdk::ready::mlp().to_onnx(),
        Some(batching(1_000_000, 0)),
    );
    for seed in 0..3 {
        let (status, body) = infer(&n, "mlp", &mlp_body(1, seed)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(counts(&n, "mlp").await, (3, 3));
    let (_, stats) = get_json(&n.app, "/v2/models/mlp/stats").await;
    let queue = &stats["model_stats"][0]["inference_stats"]["queue"];
    assert_eq!(queue["count"], 3, "{stats}");
    let waited = queue["ns"].as_u64().expect("ns");
    assert!(
        waited < 1_000_000_000,
        "the requests waited {waited} ns in the queue: at least one waited out the delay"
    );

    // The HTTP path skips the batcher for such a lone request; the batcher itself, given one
    // with a slot free beside its own, does not wait either.
    let model = n.repo.lookup("mlp", None).expect("loaded");
    let batcher = model.batcher.as_ref().expect("batching");
    let input = sophon_node::runtime::GuestTensor {
        name: "input".into(),
        datatype: sophon_node::runtime::GuestDatatype::Fp32,
        shape: vec![1, 784],
        data: vec![0; 784 * 4],
    };
    let done = batcher.submit(vec![input], 1).await;
    assert!(done.result.is_ok(), "{:?}", done.result.err());
    assert!(
        done.queue < std::time::Duration::from_secs(1),
        "the batcher waited {:?} with a slot free",
        done.queue
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_whose_clients_leave_are_let_go_while_every_slot_is_busy() {
    // One slot, held here: the batcher waits for it. Requests whose clients leave meanwhile
    // leave the queue (and their inputs are freed) at once, not when the slot frees: their
    // bytes in flight were given back when their handlers ended, and the queue counted them
    // against the model's limit (429 for real clients).
    let n = one_slot(ServingLimits::default());
    load(
        &n,
        "mlp",
        sophon_sdk::ready::mlp().to_onnx(),
        Some(batching(0, 0)),
    );
    let model = n.repo.lookup("mlp", None).expect("loaded");
    let batcher = model.batcher.as_ref().expect("batching");
    let busy = model.admission.try_enter().expect("the one slot");
    let input = || sophon_node::runtime::GuestTensor {
        name: "input".into(),
        datatype: sophon_node::runtime::GuestDatatype::Fp32,
        shape: vec![1, 784],
        data: vec![0; 784 * 4],
    };
    let leaving: Vec<_> = (0..3)
        .map(|_| {
            let model = model.clone();
            let input = input();
            tokio::spawn(async move {
                let batcher = model.batcher.as_ref().expect("batching");
                batcher.submit(vec![input], 1).await.result.is_ok()
            })
        })
        .collect();
    let started = std::time::Instant::now();
    while batcher.queued() < 3 {
        assert!(started.elapsed().as_secs() < 10, "never queued");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for task in &leaving {
        task.abort();
    }
    let started = std::time::Instant::now();
    while batcher.queued() > 0 {
        assert!(
            started.elapsed().as_secs() < 10,
            "{} requests whose clients left stayed queued while the slot was busy",
            batcher.queued()
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // The slot frees: the next request is served.
    drop(busy);
    let (status, body) = infer(&n, "mlp", &mlp_body(1, 3)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_that_fails_after_its_call_still_counts_the_call() {
    // Inputs near FP32's largest make the MLP's outputs NaN, which JSON cannot carry: the
    // request fails after the model computed it. The call still ran (and in a batch, its
    // batch-mates were answered from it), so the execution counts and the request does not
    // (the execution was lost with the request that carried it).
    let n = models();
    let huge = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784],
                                  "data": vec![3.0e38f32; 784]}]});
    for model in ["mlp", "mlp_batched"] {
        let (status, refused) = infer(&n, model, &huge).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
        assert!(
            refused["error"]
                .as_str()
                .unwrap_or("")
                .contains("cannot be sent as JSON"),
            "{refused}"
        );
        assert_eq!(counts(&n, model).await, (0, 1), "{model}");
        let (status, answer) = infer(&n, model, &mlp_body(2, 1)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(counts(&n, model).await, (2, 2), "{model}");
        let (_, stats) = get_json(&n.app, &format!("/v2/models/{model}/stats")).await;
        let batches = stats["model_stats"][0]["batch_stats"].to_string();
        assert!(batches.contains("\"batch_size\":1"), "{batches}");
    }
}
