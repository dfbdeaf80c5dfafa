//! Requests by handle (`sophon:model/direct`): the ONNX passthrough takes each request's tensors
//! as wasi-nn tensors the host holds. Its answers must be exactly those of the by-value path
//! (`predictor.predict`, tensors copied through the guest), for every datatype wasi-nn carries,
//! and its errors must leave the model serving.

mod common;

use common::*;
use sophon_node::runtime::{GuestDatatype, GuestTensor, InvokeError};
use sophon_sdk::examples::identity_onnx;

/// ONNX element types, their V2 datatype, and three elements' bytes (1, 2, 3).
fn cases() -> Vec<(i32, GuestDatatype, Vec<u8>)> {
    let ints = |width: usize| -> Vec<u8> {
        (1u8..=3)
            .flat_map(|v| {
                let mut e = vec![0u8; width];
                e[0] = v;
                e
            })
            .collect()
    };
    let f32s: Vec<u8> = [1.0f32, 2.0, 3.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let f64s: Vec<u8> = [1.0f64, 2.0, 3.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    // 1.0, 2.0 and 3.0 in IEEE half precision.
    let f16s: Vec<u8> = [0x3c00u16, 0x4000, 0x4200]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    vec![
        (1, GuestDatatype::Fp32, f32s),
        (2, GuestDatatype::Uint8, ints(1)),
        (3, GuestDatatype::Int8, vec![1, 0xff, 3]),
        (4, GuestDatatype::Uint16, ints(2)),
        (5, GuestDatatype::Int16, ints(2)),
        (6, GuestDatatype::Int32, ints(4)),
        (7, GuestDatatype::Int64, ints(8)),
        (9, GuestDatatype::Bool, vec![1, 0, 1]),
        (10, GuestDatatype::Fp16, f16s),
        (11, GuestDatatype::Fp64, f64s),
        (12, GuestDatatype::Uint32, ints(4)),
        (13, GuestDatatype::Uint64, ints(8)),
    ]
}

fn input(datatype: GuestDatatype, data: Vec<u8>) -> Vec<GuestTensor> {
    let width = data.len() / 3;
    vec![GuestTensor {
        name: "x".into(),
        datatype,
        shape: vec![(data.len() / width) as u64],
        data,
    }]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_datatype_answers_the_same_by_handle_and_by_value() {
    let n = node();
    for (elem, datatype, data) in cases() {
        let name = format!("identity{elem}");
        load_onnx(&n, &name, identity_onnx(elem), |_| {});
        let model = n.repo.lookup(&name, None).expect("loaded");
        assert!(
            model.model.takes_handles(),
            "{name}: the passthrough exports direct"
        );
        let (by_handle, _) = model
            .model
            .predict(input(datatype, data.clone()))
            .unwrap_or_else(|e| panic!("{name} ({datatype:?}) by handle: {e}"));
        let (by_value, _) = model
            .model
            .predict_by_value(input(datatype, data.clone()))
            .unwrap_or_else(|e| panic!("{name} ({datatype:?}) by value: {e}"));
        assert_eq!(by_handle.len(), 1, "{name}");
        assert_eq!(by_value.len(), 1, "{name}");
        let (h, v) = (&by_handle[0], &by_value[0]);
        assert_eq!(h.name, v.name, "{name}");
        assert_eq!(h.datatype, v.datatype, "{name}: the same carrier both ways");
        assert_eq!(h.shape, v.shape, "{name}");
        assert_eq!(h.data, v.data, "{name}");
        assert_eq!(h.name, "y");
        assert_eq!(h.shape, vec![3], "{name}");
        assert_eq!(h.data, data, "{name}: identity");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_without_direct_is_called_by_value() {
    let n = node();
    n.repo
        .add_bundle(&sophon_sdk::ready::classifier_bundle(&n.key).expect("pack"))
        .expect("load classifier");
    let model = n.repo.lookup("classifier", None).expect("loaded");
    assert!(!model.model.takes_handles());
    assert!(
        !model.model.wasi_free(),
        "a component built with std imports WASI, so its calls hand the worker off"
    );
    let pixels = vec![7u8; 64];
    let (out, _) = model
        .model
        .predict(vec![GuestTensor {
            name: "image".into(),
            datatype: GuestDatatype::Uint8,
            shape: vec![1, 64],
            data: pixels,
        }])
        .expect("classifier answers");
    assert!(!out.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn inputs_by_handle_count_toward_the_memory_limit() {
    let n = node();
    // 4 MiB for the call: the instance's 2 MiB of linear memory plus the request's tensors.
    load_onnx(&n, "small", identity_onnx(1), |m| m.resources.memory_mb = 4);
    let model = n.repo.lookup("small", None).expect("loaded");
    let big = vec![0u8; 3 << 20];
    let err = model
        .model
        .predict(vec![GuestTensor {
            name: "x".into(),
            datatype: GuestDatatype::Fp32,
            shape: vec![(big.len() / 4) as u64],
            data: big,
        }])
        .expect_err("3 MiB of input over a 4 MiB limit");
    assert!(
        matches!(err, InvokeError::MemoryExceeded { limit_mib: 4, .. }),
        "{err}"
    );
    // The next request is served.
    let (out, _) = model
        .model
        .predict(input(
            GuestDatatype::Fp32,
            vec![0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64],
        ))
        .expect("a small request after the refused one");
    assert_eq!(out[0].data, vec![0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shape_the_graph_refuses_fails_by_handle_and_the_next_request_is_served() {
    let n = node();
    load_onnx(&n, "mlp", sophon_sdk::ready::mlp().to_onnx(), |_| {});
    let model = n.repo.lookup("mlp", None).expect("loaded");
    // The manifest's checks run in the HTTP layer; called directly, a wrong width reaches the
    // backend, which refuses it as the caller's fault.
    let wrong = GuestTensor {
        name: "input".into(),
        datatype: GuestDatatype::Fp32,
        shape: vec![1, 3],
        data: vec![0; 12],
    };
    let err = model.model.predict(vec![wrong]).expect_err("wrong width");
    assert!(
        matches!(
            err,
            InvokeError::InvalidInput { .. } | InvokeError::Failed { .. }
        ),
        "{err}"
    );
    let x = mlp_input(1);
    let (out, _) = model
        .model
        .predict(vec![GuestTensor {
            name: "input".into(),
            datatype: GuestDatatype::Fp32,
            shape: vec![1, 784],
            data: x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }])
        .expect("the next request");
    let got: Vec<f32> = out[0]
        .data
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let want = sophon_sdk::ready::mlp().forward(&x);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "{g} != {w}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_by_handle_are_held_to_the_output_limit() {
    let n = node_with(
        sophon_node::ServingLimits {
            max_output_bytes: 1 << 10,
            ..sophon_node::ServingLimits::default()
        },
        sophon_node::http::HttpConfig::default(),
    );
    load_onnx(&n, "identity", identity_onnx(1), |_| {});
    let model = n.repo.lookup("identity", None).expect("loaded");
    let floats = 1024usize;
    let err = model
        .model
        .predict(vec![GuestTensor {
            name: "x".into(),
            datatype: GuestDatatype::Fp32,
            shape: vec![floats as u64],
            data: vec![0; floats * 4],
        }])
        .expect_err("4 KiB of output over a 1 KiB limit");
    assert!(
        matches!(
            err,
            InvokeError::OutputTooLarge {
                bytes: Some(4096),
                limit: 1024,
                ..
            }
        ),
        "{err}"
    );
    let (out, _) = model
        .model
        .predict(input(GuestDatatype::Fp32, vec![0; 12]))
        .expect("a small request after the refused one");
    assert_eq!(out[0].data.len(), 12);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_made_ahead_on_another_thread_keeps_the_memory_limit() {
    let n = node();
    // 4 MiB for the call: the instance's 2 MiB of linear memory plus the request's tensors.
    load_onnx(&n, "small", identity_onnx(1), |m| m.resources.memory_mb = 4);
    let model = n.repo.lookup("small", None).expect("loaded");
    assert!(
        model.model.wasi_free(),
        "the passthrough imports wasi-nn alone"
    );
    let small = || {
        input(
            GuestDatatype::Fp32,
            vec![0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64],
        )
    };
    let (answer, spent) = model.model.answer(small());
    answer.expect("a small request");
    // The next instance is made on another thread, as a node's worker may.
    std::thread::scope(|s| {
        s.spawn(|| model.model.tidy(spent));
    });
    assert!(model.model.has_spare());
    // 3 MiB of input fits 4 MiB only if the instance's memory, made on the other thread, is
    // forgotten: it must not be.
    let big = vec![0u8; 3 << 20];
    let (answer, spent) = model.model.answer(vec![GuestTensor {
        name: "x".into(),
        datatype: GuestDatatype::Fp32,
        shape: vec![(big.len() / 4) as u64],
        data: big,
    }]);
    assert!(
        !model.model.has_spare(),
        "the request took the instance made for it"
    );
    let err = answer.expect_err("3 MiB of input over a 4 MiB limit");
    assert!(
        matches!(err, InvokeError::MemoryExceeded { limit_mib: 4, .. }),
        "{err}"
    );
    std::thread::scope(|s| {
        s.spawn(|| model.model.tidy(spent));
    });
    let (answer, _spent) = model.model.answer(small());
    let (out, times) = answer.expect("a small request after the refused one");
    assert_eq!(out[0].data, vec![0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64]);
    assert!(times.instantiate < std::time::Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn lone_requests_run_in_instances_made_ahead_and_bad_ones_leave_them_clean() {
    let n = node();
    load_onnx(&n, "mlp", sophon_sdk::ready::mlp().to_onnx(), |_| {});
    let x = mlp_input(1);
    let good = serde_json::json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": x}]});
    let bad = serde_json::json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2.0, 3.0]}]});
    let want = sophon_sdk::ready::mlp().forward(&x);
    let model = n.repo.lookup("mlp", None).expect("loaded");
    // A call slowed by this shared machine (tests run in parallel) hands the next 256 off
    // without making instances ahead; count the requests that did find one, for up to 60 s.
    // A request is a chance when the model was quick for it and for the one before it (whose
    // answer then makes its instance). On a machine so loaded that the model seldom stays quick
    // (a CI run saw none in 60 s) the test cannot see the feature; with 20 chances and no
    // instance made ahead it fails.
    let mut ahead = 0;
    let mut chances = 0;
    let mut was_quick = false;
    let started = std::time::Instant::now();
    while ahead < 3 && started.elapsed() < std::time::Duration::from_secs(60) {
        let quick = model.pace.quick();
        if quick {
            for _ in 0..1000 {
                if model.model.has_spare() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        let had = model.model.has_spare();
        chances += usize::from(quick && was_quick);
        let (status, body) = post_json(&n.app, "/v2/models/mlp/infer", &good).await;
        assert_eq!(status, axum::http::StatusCode::OK, "{body}");
        let got = f32s(&body["outputs"][0]["data"]);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} != {w}");
        }
        let (status, body) = post_json(&n.app, "/v2/models/mlp/infer", &bad).await;
        assert_eq!(status, axum::http::StatusCode::BAD_REQUEST, "{body}");
        ahead += usize::from(had);
        was_quick = quick;
    }
    let (strikes, last) = model.pace.strikes();
    if ahead < 3 {
        eprintln!(
            "{ahead} instances made ahead in {chances} chances: the machine kept the model slow \
             ({strikes} strikes, the last {last:?})"
        );
    }
    assert!(
        ahead == 3 || chances < 20,
        "lone requests ran in instances made ahead of them: {ahead} of 3 in {chances} chances \
         ({strikes} strikes, the last {last:?})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_call_hands_the_worker_off_and_makes_no_instance_ahead() {
    let n = node();
    load_onnx(&n, "mlp", sophon_sdk::ready::mlp().to_onnx(), |_| {});
    let model = n.repo.lookup("mlp", None).expect("loaded");
    let rows = 1024;
    let x = mlp_input(rows);
    let big = serde_json::json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 784], "data": x}]});
    let (status, body) = post_json(&n.app, "/v2/models/mlp/infer", &big).await;
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    assert!(
        !model.pace.quick(),
        "{rows} rows of the MLP take longer than {:?}",
        sophon_node::handoff::QUICK
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !model.model.has_spare(),
        "a model that turned slow makes no instance on the worker"
    );
    let x = mlp_input(1);
    let small = serde_json::json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": x}]});
    let (status, body) = post_json(&n.app, "/v2/models/mlp/infer", &small).await;
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    let want = sophon_sdk::ready::mlp().forward(&x);
    for (g, w) in f32s(&body["outputs"][0]["data"]).iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "{g} != {w}");
    }
}
