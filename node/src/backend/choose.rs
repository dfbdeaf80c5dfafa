//! Choosing where a graph runs: the backend and the device.
//!
//! 1. The manifest's `[hardware] backends`, when it names some, is the order: the first that
//!    loads the graph runs it, on the first of the manifest's preferred devices it has.
//! 2. Otherwise the node goes down the manifest's `[hardware] preferred` devices (then the CPU).
//!    On each device it loads the graph on every backend it has for that device; where more
//!    than one loads it, each runs the graph on a synthetic input (zeros, shaped by the
//!    manifest) a few times and the fastest wins. The measurement is kept in the cache
//!    directory, keyed by the graph's bytes, shapes, device and candidates, so a restart loads
//!    only the winner.
//! 3. A device where no backend loads the graph is passed over, and the reason is kept in the
//!    description of how the graph runs. When no backend loads it anywhere, the load fails with
//!    every backend's reason (absent ones included).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use sophon_sdk::{Backend, Device, TensorSpec};
use wasmtime_wasi_nn::Graph;
use wasmtime_wasi_nn::backend::{BackendGraph, NamedTensor};
use wasmtime_wasi_nn::wit::TensorType;

use super::{ALL_BACKENDS, CPU_BACKENDS, GraphFile, LoadError, devices_of, load_on};
use crate::hardware::{GpuReservation, reserve_gpu};

/// How the node may choose.
#[derive(Clone, Copy, Default)]
pub struct Choice<'a> {
    /// The manifest's `[hardware] backends`, best first (empty: the node chooses).
    pub backends: &'a [Backend],
    /// The manifest's `[hardware] preferred` devices, best first.
    pub preferred: &'a [Device],
    /// The graph's inputs (the manifest's, when they are the graph's): candidates are timed on
    /// zeros of these types, shaped by the graph's `shapes` (`None`: not measured; the first
    /// in order wins).
    pub probe: Option<&'a [TensorSpec]>,
    /// Where measured choices are kept.
    pub cache_dir: Option<&'a Path>,
    /// The manifest's `min_gpu_memory_mb`: reserved on a GPU before loading there (0: the
    /// memory the load is seen to take is reserved after it).
    pub gpu_memory_mb: u64,
}

/// A graph loaded on its backend.
pub struct Loaded {
    pub graph: Graph,
    pub backend: Backend,
    pub device: Device,
    /// How it runs, and why there, in words (`/config` shows it).
    pub how: String,
    /// The GPU memory it holds, when it runs on an NVIDIA GPU.
    pub gpu_memory: Option<GpuReservation>,
}

/// Timed runs per candidate, after one warm-up run.
const TIMED_RUNS: usize = 5;
/// Most time spent timing one candidate (at least one timed run is made).
const TIMING_BUDGET: Duration = Duration::from_millis(300);

/// Load a graph on one backend, on the first device it has.
pub fn load_graph_on(file: &GraphFile<'_>, backend: Backend) -> Result<Loaded, LoadError> {
    load_graph(
        file,
        &Choice {
            backends: &[backend],
            ..Choice::default()
        },
    )
}

/// Load a graph where it runs best (see the module's documentation).
///
/// GPU memory: with the manifest's `min_gpu_memory_mb`, that much is reserved on an NVIDIA GPU
/// before the graph is loaded there, and the GPU is passed over, with the reason, when none has
/// it left. Without it, the memory the load is seen to take (NVML's free memory before and
/// after) is recorded against GPU 0, where tract-cuda and ONNX Runtime's CUDA provider load.
pub fn load_graph(file: &GraphFile<'_>, choice: &Choice<'_>) -> Result<Loaded, LoadError> {
    let wants_gpu = device_order(choice.preferred).contains(&Device::Gpu)
        || choice.backends.contains(&Backend::TractCuda);
    let mut held = None;
    let mut gpu_refused = None;
    let mut free_before = None;
    if wants_gpu && !crate::hardware::hardware().gpus.is_empty() {
        if choice.gpu_memory_mb > 0 {
            match reserve_gpu(choice.gpu_memory_mb) {
                Ok(r) => held = Some(r),
                Err(why) => gpu_refused = Some(why),
            }
        } else {
            free_before = crate::hardware::gpu_free_mb(0);
        }
    }
    let mut loaded = pick(file, choice, gpu_refused.as_deref())?;
    let nvidia = matches!(loaded.backend, Backend::TractCuda | Backend::Ort);
    if loaded.device == Device::Gpu && nvidia {
        loaded.gpu_memory = held.or_else(|| {
            let after = crate::hardware::gpu_free_mb(0)?;
            Some(crate::hardware::record_gpu(
                0,
                free_before?.saturating_sub(after).max(1),
            ))
        });
    }
    Ok(loaded)
}

fn pick(
    file: &GraphFile<'_>,
    choice: &Choice<'_>,
    gpu_refused: Option<&str>,
) -> Result<Loaded, LoadError> {
    let devices: Vec<Device> = device_order(choice.preferred)
        .into_iter()
        .filter(|d| *d != Device::Gpu || gpu_refused.is_none())
        .collect();
    let mut refused: Vec<String> = Vec::new();
    if !choice.backends.is_empty() {
        for backend in choice.backends {
            let has = devices_of(*backend);
            if has.is_empty() {
                refused.push(absent(*backend));
                continue;
            }
            // The preferred devices it has, in order; where it has none of them, its own (a
            // manifest that names tract-cuda and prefers no GPU still means the GPU).
            let mut order: Vec<Device> = devices
                .iter()
                .copied()
                .filter(|d| has.contains(d))
                .collect();
            if order.is_empty() {
                order = has;
            }
            order.retain(|d| *d != Device::Gpu || gpu_refused.is_none());
            if order.is_empty() {
                let why = gpu_refused.unwrap_or("it runs on no device of this node");
                refused.push(format!("{}: {why}", backend.as_str()));
            }
            for device in &order {
                match load_on(*backend, *device, file) {
                    Ok((graph, how)) => {
                        return Ok(Loaded {
                            graph,
                            backend: *backend,
                            device: *device,
                            how: with_refusals(how, &refused),
                            gpu_memory: None,
                        });
                    }
                    Err(e) => refused.push(format!("{}: {e}", backend.as_str())),
                }
            }
        }
        return Err(LoadError::Backend(refused));
    }
    let mut passed_over: Vec<String> = Vec::new();
    if let Some(why) = gpu_refused {
        passed_over.push(format!("on the gpu: {why}"));
        refused.push(format!("gpu: {why}"));
    }
    for device in &devices {
        // Whether a backend is here is asked only when it is needed: a native library is
        // loaded (tens of milliseconds) only for a graph that may run on it.
        let here = |b: &Backend| devices_of(*b).contains(device);
        let all = candidates_for(*device);
        let key = cache_key(file, *device, &all);
        if let Some((winner, measured)) = cached(choice.cache_dir, &key)
            && all.contains(&winner)
            && here(&winner)
            && let Ok((graph, how)) = load_on(winner, *device, file)
        {
            return Ok(Loaded {
                graph,
                backend: winner,
                device: *device,
                how: with_refusals(
                    format!("{how}; the fastest here, as measured at an earlier load ({measured})"),
                    &passed_over,
                ),
                gpu_memory: None,
            });
        }
        let mut loaded = Vec::new();
        let mut here_refused = Vec::new();
        let mut present = 0;
        for backend in all.iter().filter(|b| here(b)) {
            present += 1;
            match load_on(*backend, *device, file) {
                Ok(ok) => loaded.push((*backend, ok)),
                Err(e) => here_refused.push(format!("{}: {e}", backend.as_str())),
            }
            // Without inputs to time them on, the first that loads the graph runs it.
            if choice.probe.is_none() && !loaded.is_empty() {
                break;
            }
        }
        if present == 0 {
            if *device != Device::Cpu {
                passed_over.push(format!("no backend here runs on the {}", name(*device)));
            }
            continue;
        }
        if loaded.is_empty() {
            refused.extend(here_refused.iter().cloned());
            passed_over.push(format!(
                "on the {}: {}",
                name(*device),
                here_refused.join("; ")
            ));
            continue;
        }
        passed_over.extend(here_refused);
        let pick = match choice.probe {
            None => {
                let (backend, (graph, how)) = loaded.remove(0);
                let how = format!(
                    "{how}; the first in the node's order that loads it (not measured: the \
                     manifest gives no input shapes)"
                );
                (backend, graph, how)
            }
            Some(_) if loaded.len() == 1 => {
                let (backend, (graph, how)) = loaded.remove(0);
                (backend, graph, how)
            }
            Some(probe) => {
                let mut timed = Vec::new();
                let mut failed = Vec::new();
                for (i, (backend, (graph, _))) in loaded.iter().enumerate() {
                    match measure(*backend, *device, graph, file, probe) {
                        Ok(t) => timed.push((i, t)),
                        Err(e) => failed.push(format!("{}: {e}", backend.as_str())),
                    }
                }
                timed.sort_by_key(|(_, t)| *t);
                match timed.first() {
                    // None ran the synthetic input: keep the node's order.
                    None => {
                        let (backend, (graph, how)) = loaded.remove(0);
                        let why = failed.join("; ");
                        (
                            backend,
                            graph,
                            format!(
                                "{how}; first in the node's order (a synthetic input did not \
                                 run: {why})"
                            ),
                        )
                    }
                    Some(&(best, _)) => {
                        let measured = timed
                            .iter()
                            .map(|(i, t)| {
                                let ms = t.as_secs_f64() * 1e3;
                                format!("{} {ms:.3} ms", loaded[*i].0.as_str())
                            })
                            .chain(failed)
                            .collect::<Vec<_>>()
                            .join(", ");
                        let (backend, (graph, how)) = loaded.swap_remove(best);
                        remember(choice.cache_dir, &key, backend, &measured);
                        (
                            backend,
                            graph,
                            format!("{how}; the fastest here on a synthetic input ({measured})"),
                        )
                    }
                }
            }
        };
        let (backend, graph, how) = pick;
        tracing::info!(backend = backend.as_str(), device = name(*device), "{how}");
        return Ok(Loaded {
            graph,
            backend,
            device: *device,
            how: with_refusals(how, &passed_over),
            gpu_memory: None,
        });
    }
    for backend in ALL_BACKENDS {
        if devices_of(backend).is_empty() {
            refused.push(absent(backend));
        }
    }
    Err(LoadError::Backend(refused))
}

fn absent(backend: Backend) -> String {
    let why = super::describe(backend).err().unwrap_or_default();
    format!("{}: absent ({why})", backend.as_str())
}

fn with_refusals(how: String, refused: &[String]) -> String {
    if refused.is_empty() {
        how
    } else {
        format!("{how} (not {})", refused.join("; "))
    }
}

/// The manifest's devices, best first, then the CPU.
fn device_order(preferred: &[Device]) -> Vec<Device> {
    let mut order: Vec<Device> = Vec::new();
    for device in preferred.iter().chain([&Device::Cpu]) {
        if !order.contains(device) {
            order.push(*device);
        }
    }
    order
}

/// The backends that may run a graph on a kind of device, in the order used when they
/// cannot be measured.
fn candidates_for(device: Device) -> Vec<Backend> {
    match device {
        Device::Cpu => CPU_BACKENDS.to_vec(),
        Device::Gpu => vec![Backend::TractCuda, Backend::Ort, Backend::Openvino],
        Device::Npu => vec![Backend::Openvino],
    }
}

/// A device kind in words.
pub fn name(device: Device) -> &'static str {
    match device {
        Device::Cpu => "cpu",
        Device::Gpu => "gpu",
        Device::Npu => "npu",
    }
}

/// Where candidates are timed: `None`, in this process; else each in a child process (this
/// program with these arguments, which runs [`measure_child`]), so that a native library that
/// kills its process on the synthetic input (ONNX Runtime raises SIGFPE on some shapes of
/// some models) takes down only the child, and is passed over.
static IN_CHILDREN: std::sync::OnceLock<(PathBuf, Vec<String>)> = std::sync::OnceLock::new();

/// Time candidates in child processes: `program args...` runs [`measure_child`].
pub fn measure_in_children(program: PathBuf, args: Vec<String>) {
    let _ = IN_CHILDREN.set((program, args));
}

/// What a child process measures: one backend and device, the graph, and its inputs.
#[derive(serde::Serialize, serde::Deserialize)]
struct Job {
    backend: Backend,
    device: Device,
    encoding: sophon_sdk::GraphEncoding,
    shapes: std::collections::BTreeMap<String, Vec<i64>>,
    inputs: Vec<TensorSpec>,
    model_len: usize,
    weights_len: Option<usize>,
    threads: u32,
}

fn measure(
    backend: Backend,
    device: Device,
    graph: &Graph,
    file: &GraphFile<'_>,
    inputs: &[TensorSpec],
) -> Result<Duration, String> {
    let Some((program, args)) = IN_CHILDREN.get() else {
        let probe =
            synthetic_inputs(inputs, file.shapes).ok_or("an input type has no synthetic value")?;
        return time(graph, &probe);
    };
    use std::io::Write as _;
    let job = Job {
        backend,
        device,
        encoding: file.encoding,
        shapes: file.shapes.clone(),
        inputs: inputs.to_vec(),
        model_len: file.bytes.len(),
        weights_len: file.weights.map(<[u8]>::len),
        threads: file.threads,
    };
    let mut child = std::process::Command::new(program)
        .args(args)
        .env("SOPHON_LOG", "error")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", program.display()))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let header = serde_json::to_string(&job).map_err(|e| e.to_string())?;
    let wrote = writeln!(stdin, "{header}")
        .and_then(|()| stdin.write_all(file.bytes))
        .and_then(|()| stdin.write_all(file.weights.unwrap_or_default()));
    drop(stdin);
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    wrote.map_err(|e| format!("writing to the measuring process: {e}"))?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        use std::os::unix::process::ExitStatusExt as _;
        return Err(match out.status.signal() {
            Some(signal) => format!(
                "its process died (signal {signal}) on a synthetic input: requests of such \
                 shapes would kill a node"
            ),
            None => said,
        });
    }
    let nanos: u64 = said
        .strip_prefix("ok ")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("the measuring process said {said:?}"))?;
    Ok(Duration::from_nanos(nanos))
}

/// The child's side of [`measure_in_children`]: reads a job on stdin, loads the graph on the
/// backend, times it on the synthetic input, and prints `ok NANOS` (exit 0) or the error
/// (exit 1).
pub fn measure_child() -> ! {
    use std::io::{BufRead as _, Read as _};
    let run = || -> Result<Duration, String> {
        let mut stdin = std::io::stdin().lock();
        let mut header = String::new();
        stdin.read_line(&mut header).map_err(|e| e.to_string())?;
        let job: Job = serde_json::from_str(&header).map_err(|e| e.to_string())?;
        let mut model = vec![0; job.model_len];
        stdin.read_exact(&mut model).map_err(|e| e.to_string())?;
        let weights = match job.weights_len {
            Some(n) => {
                let mut w = vec![0; n];
                stdin.read_exact(&mut w).map_err(|e| e.to_string())?;
                Some(w)
            }
            None => None,
        };
        let file = GraphFile {
            encoding: job.encoding,
            bytes: &model,
            weights: weights.as_deref(),
            shapes: &job.shapes,
            threads: job.threads,
        };
        let (graph, _) = load_on(job.backend, job.device, &file)?;
        let probe = synthetic_inputs(&job.inputs, &job.shapes)
            .ok_or("an input type has no synthetic value")?;
        time(&graph, &probe)
    };
    match run() {
        Ok(t) => {
            println!("ok {}", t.as_nanos());
            std::process::exit(0)
        }
        Err(e) => {
            println!("{e}");
            std::process::exit(1)
        }
    }
}

/// The median time of a few runs of `probe` on `graph`, after one warm-up run.
fn time(graph: &Graph, probe: &[NamedTensor]) -> Result<Duration, String> {
    let g: &dyn BackendGraph = &**graph;
    let mut ctx = g.init_execution_context().map_err(|e| e.to_string())?;
    let mut run = || {
        let inputs = probe
            .iter()
            .map(|t| NamedTensor {
                name: t.name.clone(),
                tensor: t.tensor.clone(),
            })
            .collect();
        ctx.compute_with_io(inputs)
            .map_err(|e| super::take_last_error().map_or_else(|| e.to_string(), |d| d.message))
    };
    run()?;
    let started = Instant::now();
    let mut times = Vec::with_capacity(TIMED_RUNS);
    while times.len() < TIMED_RUNS && (times.is_empty() || started.elapsed() < TIMING_BUDGET) {
        let t = Instant::now();
        run()?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// What identifies a measurement: the graph, its shapes, the device, the candidates, and this
/// build of the node.
fn cache_key(file: &GraphFile<'_>, device: Device, candidates: &[Backend]) -> String {
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION"));
    h.update(file.bytes);
    if let Some(w) = file.weights {
        h.update(w);
    }
    h.update(format!("{:?}", file.shapes));
    h.update(file.threads.to_le_bytes());
    h.update(name(device));
    for b in candidates {
        h.update(b.as_str());
    }
    hex::encode(h.finalize())
}

fn cache_path(dir: &Path, key: &str) -> PathBuf {
    dir.join("backend-choice").join(format!("{key}.txt"))
}

/// A kept measurement: the winner, and what was measured.
fn cached(dir: Option<&Path>, key: &str) -> Option<(Backend, String)> {
    let text = std::fs::read_to_string(cache_path(dir?, key)).ok()?;
    let (winner, measured) = text.trim().split_once('\n')?;
    Some((winner.parse().ok()?, measured.to_string()))
}

/// Keep a measurement (written under a unique name, then renamed, so readers never see half).
fn remember(dir: Option<&Path>, key: &str, winner: Backend, measured: &str) {
    let Some(dir) = dir else { return };
    let path = cache_path(dir, key);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(path.parent().unwrap_or(dir))?;
        let tmp = path.with_extension(format!(
            "tmp{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&tmp, format!("{}\n{measured}\n", winner.as_str()))?;
        std::fs::rename(&tmp, &path)
    };
    if let Err(e) = write() {
        tracing::warn!(path = %path.display(), "could not keep the backend measurement: {e}");
    }
}

/// Zeros for each of a graph's inputs, shaped by the manifest (`shapes` first, then the input's
/// declared shape); each variable dimension is 1 on the first axis and 32 on the others.
/// `None` when an input's type has no synthetic value (BYTES) or its shape is unknown.
pub fn synthetic_inputs(
    inputs: &[TensorSpec],
    shapes: &std::collections::BTreeMap<String, Vec<i64>>,
) -> Option<Vec<NamedTensor>> {
    if inputs.is_empty() {
        return None;
    }
    inputs
        .iter()
        .map(|spec| {
            let (ty, width) = carrier(spec.datatype)?;
            let shape = shapes.get(&spec.name).unwrap_or(&spec.shape);
            let dims: Vec<u32> = shape
                .iter()
                .enumerate()
                .map(|(axis, d)| match *d {
                    d if d >= 0 => d as u32,
                    _ if axis == 0 => 1,
                    _ => 32,
                })
                .collect();
            let count: usize = dims.iter().map(|d| *d as usize).product();
            Some(NamedTensor {
                name: spec.name.clone(),
                tensor: wasmtime_wasi_nn::Tensor::new(dims, ty, vec![0; count * width]),
            })
        })
        .collect()
}

/// The wasi-nn carrier of a V2 datatype (the type of the same width), and that width
/// (`None`: BYTES).
pub fn carrier(dt: sophon_sdk::Datatype) -> Option<(TensorType, usize)> {
    let width = dt.element_size()?;
    let ty = match (dt, width) {
        (sophon_sdk::Datatype::Fp32, _) => TensorType::Fp32,
        (sophon_sdk::Datatype::Fp64, _) => TensorType::Fp64,
        (_, 1) => TensorType::U8,
        (_, 2) => TensorType::Fp16,
        (_, 4) => TensorType::I32,
        _ => TensorType::I64,
    };
    Some((ty, width))
}
