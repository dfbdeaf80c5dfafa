//! `sophon bench backends [--onnx FILE --shape NAME:d,d,...]`: each wasi-nn backend this node
//! has, run on its own (a backend execution context, no Wasm) and through the Wasm sandbox (a
//! bundle packed for that backend, a fresh instance per request), at batch 1 and 32 (`--batch`
//! chooses). The model is the example MLP, or an FP32 ONNX file whose one input has the given
//! shape (its first dimension is the batch).

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sophon_node::runtime::{GuestDatatype, GuestTensor};
use sophon_sdk::{Backend, Device, keys, ready};
use wasmtime_wasi_nn::backend::{BackendGraph, NamedTensor};
use wasmtime_wasi_nn::wit::TensorType;

use super::bench::{percentiles, us};

pub fn backends(
    iters: usize,
    onnx: Option<&std::path::Path>,
    shape: Option<&str>,
    only: &[Backend],
    batches: &[usize],
) -> anyhow::Result<()> {
    let (bytes, input, dims, label) = match onnx {
        None => (
            ready::mlp().to_onnx(),
            "input".to_string(),
            vec![1usize, 784],
            "MLP 784→128→10".to_string(),
        ),
        Some(path) => {
            let (name, dims) = shape
                .and_then(|s| s.rsplit_once(':'))
                .context("--onnx needs --shape NAME:d,d,... for its input")?;
            let dims = dims
                .split(',')
                .map(|d| d.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .context("--shape: sizes only")?;
            (
                std::fs::read(path).with_context(|| format!("read {}", path.display()))?,
                name.to_string(),
                dims,
                path.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into()),
            )
        }
    };
    let present: Vec<Backend> = sophon_node::backend::inventory()
        .into_iter()
        .filter(|(b, _)| only.is_empty() || only.contains(b))
        .filter_map(|(b, here)| match here {
            Ok(_) => Some(b),
            Err(why) => {
                println!("({}: absent, {why})", b.as_str());
                None
            }
        })
        .collect();
    // The same file for the reference: scripts/bench-onnxruntime FILE NAME:d,d,...
    let saved = std::env::temp_dir().join("sophon-bench-backends.onnx");
    std::fs::write(&saved, &bytes)?;
    let dims_text: Vec<String> = dims.iter().map(usize::to_string).collect();
    println!(
        "\n## backends: {label}, {iters} iterations each, alternating (reference: \
         scripts/bench-onnxruntime {} {input}:{})",
        saved.display(),
        dims_text.join(",")
    );
    println!("| backend | batch | native p50 | wasm p50 | wasm / native | native p99 | wasm p99 |");
    println!("|---|---|---|---|---|---|---|");
    let key = keys::generate();
    // Each backend on each device it has here (ONNX Runtime on the CPU and, with its CUDA
    // provider, on the GPU).
    let runs: Vec<(Backend, Device)> = present
        .into_iter()
        .flat_map(|b| {
            sophon_node::backend::devices_of(b)
                .into_iter()
                .map(move |d| (b, d))
        })
        .collect();
    for (backend, device) in runs {
        let no_shapes = Default::default();
        let loaded = sophon_node::backend::load_graph(
            &sophon_node::backend::GraphFile::onnx(&bytes, &no_shapes),
            &sophon_node::backend::Choice {
                backends: &[backend],
                preferred: &[device],
                ..Default::default()
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let label = format!("{} ({})", backend.as_str(), device.as_str());
        if loaded.device != device {
            println!(
                "| {label} | | not run: it loaded on {} |",
                loaded.device.as_str()
            );
            continue;
        }
        let graph = loaded.graph;
        let repo = super::bench::repository_trusting(&key)?;
        let name = format!("bench_{}_{}", backend.as_str(), device.as_str());
        let bundle = sophon_sdk::pack_onnx_with(
            &bytes,
            &name,
            "1",
            sophon_sdk::components::PASSTHROUGH,
            &key,
            &sophon_sdk::OnnxOptions {
                backends: vec![backend],
                preferred: vec![device],
                ..Default::default()
            },
        )?;
        repo.add_bundle(&bundle)?;
        let model = repo.lookup(&name, None)?;
        for &batch in batches {
            let mut shape = dims.clone();
            shape[0] = batch;
            let count: usize = shape.iter().product();
            let data: Vec<u8> = (0..count)
                .flat_map(|i| (((i * 31) % 97) as f32 / 97.0).to_le_bytes())
                .collect();
            let tensor = wasmtime_wasi_nn::Tensor::new(
                shape.iter().map(|d| *d as u32).collect(),
                TensorType::Fp32,
                data.clone(),
            );
            let guest = vec![GuestTensor {
                name: input.clone(),
                datatype: GuestDatatype::Fp32,
                shape: shape.iter().map(|d| *d as u64).collect(),
                data,
            }];
            // The input is cloned before the clock starts, as the Wasm path's request is.
            let owned = || {
                vec![NamedTensor {
                    name: input.clone(),
                    tensor: tensor.clone(),
                }]
            };
            let native = |io: Vec<NamedTensor>| -> anyhow::Result<()> {
                let mut ctx = graph_context(&graph)?;
                let out = ctx
                    .compute_with_io(io)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                black_box(out);
                Ok(())
            };
            let runs = if batch == 1 {
                iters
            } else {
                (iters / 8).max(50)
            };
            // A model with a fixed batch size runs at that size only.
            if let Err(e) = native(owned()) {
                println!("| {label} | {batch} | not run: {e:#} |");
                continue;
            }
            for _ in 0..(runs / 10).max(5) {
                native(owned())?;
                model.model.predict(guest.clone())?;
            }
            let (mut n, mut w) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
            for _ in 0..runs {
                let io = owned();
                let t = Instant::now();
                native(io)?;
                n.push(t.elapsed());
                let request = guest.clone();
                let t = Instant::now();
                black_box(model.model.predict(request)?);
                w.push(t.elapsed());
            }
            let (n50, n99) = percentiles(&mut n);
            let (w50, w99) = percentiles(&mut w);
            println!(
                "| {label} | {batch} | {} | {} | {:.2}× | {} | {} |",
                us(n50),
                us(w50),
                ratio(w50, n50),
                us(n99),
                us(w99)
            );
        }
    }
    Ok(())
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-12)
}

fn graph_context(
    graph: &wasmtime_wasi_nn::Graph,
) -> anyhow::Result<wasmtime_wasi_nn::ExecutionContext> {
    let backend: &dyn BackendGraph = &**graph;
    match backend.init_execution_context() {
        Ok(ctx) => Ok(ctx),
        Err(e) => bail!("{e}"),
    }
}
