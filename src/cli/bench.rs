//! `sophon bench`: measurements of the serving path, each against a baseline taken in the same
//! run (these machines are noisy, so ratios matter more than absolute figures).
//!
//! - `sandbox`: predict through the Wasm path (a fresh instance per request) vs native tract on
//!   the same MLP, batch 1 and 32.
//! - `http`: the V2 HTTP round trip (JSON and binary, concurrency 1 and 8) vs the Wasm path.
//! - `coldstart`: process start to first successful prediction, warm AOT cache and cold (JIT).
//! - `memory`: RSS with 1 MLP bundle, then with 100 copies under different names.
//! - `scheduler`: the coordinators' placement of 100,000 replicas over 10,000 nodes, from scratch
//!   and again after 1% of the nodes went down.
//! - `raft`, `failover`: the control plane (see [`super::bench_raft`]).
//! - `backends`: each wasi-nn backend on its own and through the sandbox
//!   (see [`super::bench_backends`]).

use anyhow::{Context, bail};
use sophon_node::runtime::{GuestDatatype, GuestTensor};
use sophon_node::stats::Metrics;
use sophon_node::{Repository, Runtime, RuntimeConfig, ServingLimits};
use sophon_sdk::{keys, ready};
use std::hint::black_box;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tract_onnx::prelude::{Tensor, tvec};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum, default_value = "all")]
    what: Which,
    /// Iterations per measurement (sandbox) or requests per connection (http).
    #[arg(long, default_value_t = 3000)]
    iters: usize,
    /// Seconds per raft measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Applied entries between two snapshots (raft).
    #[arg(long, default_value_t = 10_000)]
    snapshot_every: u64,
    /// Leader kills for the failover measurement.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Simulated nodes for the heartbeat measurement.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Threads each node serves with in the mesh measurement (`node run --workers`; default:
    /// the number of cores).
    #[arg(long)]
    node_workers: Option<usize>,
    /// The coordinators' Raft tick in the heartbeat measurement (`coordinator run --tick-ms`).
    #[arg(long, default_value_t = 30)]
    tick_ms: u64,
    /// An FP32 ONNX model for the backends measurement (default: the example MLP).
    #[arg(long)]
    onnx: Option<std::path::PathBuf>,
    /// The --onnx model's input, NAME:d,d,... (the first dimension is the batch).
    #[arg(long)]
    shape: Option<String>,
    /// Measure only these backends (repeat; default: every backend this node has).
    #[arg(long = "backend")]
    backends: Vec<sophon_sdk::Backend>,
    /// Batch sizes for the sandbox and backends measurements, for example `--batch 1` to
    /// profile one alone, or `--batch 1,8,32` to see how a backend's cost grows with the batch.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 32])]
    batch: Vec<usize>,
    /// Where `json-floor` listens.
    #[arg(long, default_value = "127.0.0.1:18300")]
    serve: std::net::SocketAddr,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    All,
    Sandbox,
    Http,
    Coldstart,
    Memory,
    Scheduler,
    Raft,
    Failover,
    Mesh,
    Heartbeats,
    Backends,
    /// Not a measurement: serves the bare JSON baseline on `--serve` until killed.
    JsonFloor,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let all = args.what == Which::All;
    if all || args.what == Which::Sandbox {
        sandbox(args.iters, &args.batch)?;
    }
    if all || args.what == Which::Http {
        http(args.iters)?;
    }
    if all || args.what == Which::Coldstart {
        coldstart()?;
    }
    if all || args.what == Which::Memory {
        memory()?;
    }
    if all || args.what == Which::Scheduler {
        scheduler()?;
    }
    if all || args.what == Which::Raft {
        super::bench_raft::raft(args.seconds, args.snapshot_every)?;
    }
    if all || args.what == Which::Failover {
        super::bench_raft::failover(args.rounds)?;
    }
    if all || args.what == Which::Mesh {
        super::bench_mesh::mesh(args.iters, args.node_workers)?;
    }
    if all || args.what == Which::Backends {
        super::bench_backends::backends(
            args.iters,
            args.onnx.as_deref(),
            args.shape.as_deref(),
            &args.backends,
            &args.batch,
        )?;
    }
    // Not part of `all`: a server for scripts/bench-mlserver, which runs until it is killed.
    if args.what == Which::JsonFloor {
        super::bench_floor::json_floor(args.serve)?;
    }
    // Not part of `all`: it joins thousands of simulated nodes (minutes on 2 cores).
    if args.what == Which::Heartbeats {
        super::bench_heartbeats::heartbeats(args.nodes, args.tick_ms)?;
    }
    Ok(())
}

/// p50 and p99 of a set of samples.
pub(super) fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.99))
}

pub(super) fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn input_data(batch: usize) -> Vec<f32> {
    (0..batch * 784)
        .map(|i| ((i * 31) % 97) as f32 / 97.0)
        .collect()
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// An empty repository with default limits that trusts `key`'s bundles.
pub(super) fn repository_trusting(key: &sophon_sdk::SigningKey) -> anyhow::Result<Arc<Repository>> {
    Ok(Arc::new(Repository::new(
        Runtime::new(RuntimeConfig::default())?,
        vec![key.verifying_key()],
        ServingLimits::default(),
        Arc::new(Metrics::new()?),
    )))
}

fn mlp_repository() -> anyhow::Result<(Arc<Repository>, sophon_sdk::SigningKey)> {
    let key = keys::generate();
    let repo = repository_trusting(&key)?;
    repo.add_bundle(&ready::mlp_bundle("mlp", &key)?)?;
    Ok((repo, key))
}

fn sandbox(iters: usize, batches: &[usize]) -> anyhow::Result<()> {
    let onnx = ready::mlp().to_onnx();
    let native = sophon_node::backend::tract::TractGraph::from_onnx(&onnx)?;
    let (repo, _key) = mlp_repository()?;
    let model = repo.lookup("mlp", None)?;
    println!("## sandbox cost: MLP 784→128→10, {iters} iterations, fresh instance per request");
    println!(
        "Wasm: the tensors by handle (`sophon:model/direct`); by value: the same component \
         through `predictor.predict`, the tensors copied through its memory."
    );
    println!(
        "Ready: the request's path when its instance was made ahead of it and its teardown \
         waits until after the answer (`Model::answer`, as a lone request on a node runs); \
         tidy: that teardown plus making the next instance, off the request's path."
    );
    println!(
        "| batch | native p50 | native p99 | wasm p50 | wasm p99 | ratio p50 | ratio p99 | instantiate p50 | call p50 | teardown p50 | by value p50 | by value ratio p50 | ready p50 | ready ratio p50 | tidy p50 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &batch in batches {
        let data = input_data(batch);
        let bytes = le_bytes(&data);
        let inputs = vec![GuestTensor {
            name: "input".into(),
            datatype: GuestDatatype::Fp32,
            shape: vec![batch as u64, 784],
            data: bytes.clone(),
        }];
        let run_native = || -> anyhow::Result<()> {
            let input = Tensor::from_shape(&[batch, 784], &data)?;
            let out = native.run_native(tvec!(input.into()))?;
            black_box(out[0].as_bytes().to_vec());
            Ok(())
        };
        for _ in 0..200 {
            run_native()?;
            model.model.predict(inputs.clone())?;
            model.model.predict_by_value(inputs.clone())?;
        }
        let (mut n, mut w, mut v) = (Vec::new(), Vec::new(), Vec::new());
        let (mut inst, mut call, mut down) = (Vec::new(), Vec::new(), Vec::new());
        let (mut ready, mut tidy) = (Vec::new(), Vec::new());
        for _ in 0..iters {
            let t = Instant::now();
            run_native()?;
            n.push(t.elapsed());
            // The request's tensors, as a decoded request hands them over (not timed: the
            // native run's input is built from a borrowed slice).
            let request = inputs.clone();
            let t = Instant::now();
            let (out, times) = model.model.predict(request)?;
            w.push(t.elapsed());
            inst.push(times.instantiate);
            call.push(times.call);
            down.push(times.teardown);
            black_box(out);
            let request = inputs.clone();
            let t = Instant::now();
            black_box(model.model.predict_by_value(request)?);
            v.push(t.elapsed());
            let request = inputs.clone();
            let t = Instant::now();
            let (out, spent) = model.model.answer(request);
            ready.push(t.elapsed());
            black_box(out?);
            let t = Instant::now();
            model.model.tidy(spent);
            tidy.push(t.elapsed());
        }
        let (n50, n99) = percentiles(&mut n);
        let (w50, w99) = percentiles(&mut w);
        let (v50, _) = percentiles(&mut v);
        let (i50, _) = percentiles(&mut inst);
        let (c50, _) = percentiles(&mut call);
        let (t50, _) = percentiles(&mut down);
        let (r50, _) = percentiles(&mut ready);
        let (d50, _) = percentiles(&mut tidy);
        println!(
            "| {batch} | {} | {} | {} | {} | {:.2}× | {:.2}× | {} | {} | {} | {} | {:.2}× | {} | {:.2}× | {} |",
            us(n50),
            us(n99),
            us(w50),
            us(w99),
            w50.as_secs_f64() / n50.as_secs_f64(),
            w99.as_secs_f64() / n99.as_secs_f64(),
            us(i50),
            us(c50),
            us(t50),
            us(v50),
            v50.as_secs_f64() / n50.as_secs_f64(),
            us(r50),
            r50.as_secs_f64() / n50.as_secs_f64(),
            us(d50),
        );
    }
    Ok(())
}

/// One keep-alive HTTP/1.1 connection sending the same request again and again.
pub(super) struct Client {
    reader: BufReader<TcpStream>,
    request: Vec<u8>,
}

impl Client {
    pub(super) fn connect(
        addr: SocketAddr,
        path: &str,
        body: &[u8],
        header_len: Option<usize>,
    ) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n",
            body.len()
        );
        match header_len {
            Some(n) => request.push_str(&format!(
                "Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {n}\r\n"
            )),
            None => request.push_str("Content-Type: application/json\r\n"),
        }
        request.push_str("\r\n");
        let mut request = request.into_bytes();
        request.extend_from_slice(body);
        Ok(Client {
            reader: BufReader::new(stream),
            request,
        })
    }

    pub(super) fn call(&mut self) -> anyhow::Result<Vec<u8>> {
        self.reader.get_mut().write_all(&self.request)?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut length = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse()?;
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        if status != "200" {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(body)
    }
}

pub(super) fn http_bodies(batch: usize) -> [(&'static str, Vec<u8>, Option<usize>); 2] {
    let data = input_data(batch);
    let json = serde_json::json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [batch, 784], "data": data}]});
    let json = serde_json::to_vec(&json).unwrap_or_default();
    let raw = le_bytes(&data);
    let header = serde_json::json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [batch, 784], "parameters": {"binary_data_size": raw.len()}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": true}}],
    });
    let mut binary = serde_json::to_vec(&header).unwrap_or_default();
    let header_len = binary.len();
    binary.extend_from_slice(&raw);
    [("json", json, None), ("binary", binary, Some(header_len))]
}

fn http(iters: usize) -> anyhow::Result<()> {
    let (repo, _key) = mlp_repository()?;
    let model = repo.lookup("mlp", None)?;
    let inputs = vec![GuestTensor {
        name: "input".into(),
        datatype: GuestDatatype::Fp32,
        shape: vec![1, 784],
        data: le_bytes(&input_data(1)),
    }];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let server = rt.block_on(sophon_node::NodeServer::bind(
        "127.0.0.1:0".parse()?,
        repo.clone(),
        sophon_node::http::HttpConfig::default(),
    ))?;
    let addr = server.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = rt.spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    // The transport floor: a keep-alive round trip that does no model work at all.
    let mut floor = Vec::with_capacity(2000);
    let mut c = Client::connect(addr, "/v2/health/live", b"", None)?;
    c.request = format!("GET /v2/health/live HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes();
    for i in 0..2200 {
        let t = Instant::now();
        black_box(c.call()?);
        if i >= 200 {
            floor.push(t.elapsed());
        }
    }
    let (f50, f99) = percentiles(&mut floor);
    println!("\n## HTTP: MLP batch 1 over V2 on 127.0.0.1 (client threads in the same process)");
    println!(
        "Transport floor (GET /v2/health/live, keep-alive, concurrency 1): p50 {}, p99 {}\n",
        us(f50),
        us(f99)
    );
    println!("| body | concurrency | requests/s | p50 | p99 | wasm path p50 | HTTP adds (p50) |");
    println!("|---|---|---|---|---|---|---|");
    for (kind, body, header_len) in http_bodies(1) {
        for concurrency in [1usize, 8] {
            // The Wasm path alone, measured right before, as the baseline.
            let mut direct = Vec::with_capacity(iters);
            for _ in 0..iters.min(2000) {
                let request = inputs.clone();
                let t = Instant::now();
                black_box(model.model.predict(request)?);
                direct.push(t.elapsed());
            }
            let (d50, _) = percentiles(&mut direct);
            let per_conn = (iters / concurrency).max(200);
            let started = Instant::now();
            let handles: Vec<_> = (0..concurrency)
                .map(|_| {
                    let body = body.clone();
                    std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                        let mut c =
                            Client::connect(addr, "/v2/models/mlp/infer", &body, header_len)?;
                        for _ in 0..50 {
                            c.call()?;
                        }
                        let mut lat = Vec::with_capacity(per_conn);
                        for _ in 0..per_conn {
                            let t = Instant::now();
                            black_box(c.call()?);
                            lat.push(t.elapsed());
                        }
                        Ok(lat)
                    })
                })
                .collect();
            let mut all = Vec::new();
            for h in handles {
                all.extend(
                    h.join()
                        .map_err(|_| anyhow::anyhow!("client thread panicked"))??,
                );
            }
            let wall = started.elapsed();
            let rps = all.len() as f64 / wall.as_secs_f64();
            let (p50, p99) = percentiles(&mut all);
            let adds = if concurrency == 1 {
                us(p50.saturating_sub(d50))
            } else {
                "n/a".to_string()
            };
            println!(
                "| {kind} | {concurrency} | {rps:.0} | {} | {} | {} | {adds} |",
                us(p50),
                us(p99),
                us(d50)
            );
        }
    }
    // The floor moves by a factor of 3 between minutes on a shared VM, so a floor read once
    // and requests read later do not subtract: alternate them, round by round, and take the
    // median of each round's difference. The Wasm path is then taken alone, back to back (its
    // lowest reading: run between network calls it reads about twice as long, cache-cold), so
    // the net figure errs high.
    println!(
        "\nAlternating at concurrency 1, {iters} rounds of a health check and a request; \
         *request − floor* is the median of the rounds' differences:\n"
    );
    println!(
        "| body | floor p50 | request p50 | request − floor | wasm path p50 | HTTP adds, net of the floor |"
    );
    println!("|---|---|---|---|---|---|");
    for (kind, body, header_len) in http_bodies(1) {
        let mut infer = Client::connect(addr, "/v2/models/mlp/infer", &body, header_len)?;
        for _ in 0..200 {
            infer.call()?;
            c.call()?;
        }
        let (mut floors, mut requests) = (Vec::new(), Vec::new());
        let mut over = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            black_box(c.call()?);
            let f = t.elapsed();
            let t = Instant::now();
            black_box(infer.call()?);
            let r = t.elapsed();
            over.push(r.as_secs_f64() - f.as_secs_f64());
            floors.push(f);
            requests.push(r);
        }
        over.sort_unstable_by(f64::total_cmp);
        let over = over[over.len() / 2] * 1e6;
        let mut direct = Vec::with_capacity(iters);
        for _ in 0..iters {
            let request = inputs.clone();
            let t = Instant::now();
            black_box(model.model.predict(request)?);
            direct.push(t.elapsed());
        }
        let d50 = percentiles(&mut direct).0;
        println!(
            "| {kind} | {} | {} | {over:.1} µs | {} | **{:.1} µs** |",
            us(percentiles(&mut floors).0),
            us(percentiles(&mut requests).0),
            us(d50),
            over - d50.as_secs_f64() * 1e6
        );
    }
    let _ = stop_tx.send(());
    rt.block_on(serving)??;
    Ok(())
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A process of this binary, killed when dropped.
pub(super) struct Proc(pub(super) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start this binary with `args`, its output discarded.
pub(super) fn spawn(args: &[&str]) -> anyhow::Result<Proc> {
    let child = Command::new(std::env::current_exe()?)
        .args(args)
        .env("SOPHON_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Proc(child))
}

fn spawn_dev(args: &[&str], port: u16) -> anyhow::Result<Proc> {
    let http = format!("127.0.0.1:{port}");
    spawn(&[&["dev", "--http", http.as_str()], args].concat())
}

/// The admin API, with a bearer token; every call must answer 2xx.
pub(super) struct AdminClient {
    agent: ureq::Agent,
    token: String,
}

impl AdminClient {
    pub(super) fn new(token: &str) -> AdminClient {
        AdminClient {
            agent: ureq::Agent::new_with_config(
                ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(30)))
                    .build(),
            ),
            token: token.to_string(),
        }
    }

    /// `method` on `url`, with `body` (sent as is) if any; the JSON answer.
    pub(super) fn call(
        &self,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<serde_json::Value> {
        let auth = format!("Bearer {}", self.token);
        let mut resp = match (method, body) {
            ("GET", _) => self.agent.get(url).header("Authorization", &auth).call()?,
            ("DELETE", _) => self
                .agent
                .delete(url)
                .header("Authorization", &auth)
                .call()?,
            ("PUT", Some(b)) => self.agent.put(url).header("Authorization", &auth).send(b)?,
            (_, Some(b)) => self
                .agent
                .post(url)
                .header("Authorization", &auth)
                .send(b)?,
            (_, None) => self
                .agent
                .post(url)
                .header("Authorization", &auth)
                .send_empty()?,
        };
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string()?;
        if !(200..300).contains(&status) {
            bail!("{method} {url}: HTTP {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }
}

/// Start a dev node and time until the first prediction succeeds.
fn time_to_first_prediction(args: &[&str]) -> anyhow::Result<Duration> {
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let [(_, body, _), _] = http_bodies(1);
    let started = Instant::now();
    let _server = spawn_dev(args, port)?;
    loop {
        if let Ok(mut c) = Client::connect(addr, "/v2/models/mlp/infer", &body, None)
            && c.call().is_ok()
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the dev node did not answer within 120 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn coldstart() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let cache_dir = cache.path().to_str().context("temp path is not UTF-8")?;
    println!(
        "\n## cold start: process start → first successful prediction (`sophon dev`, 2 models)"
    );
    println!("| AOT cache | runs | median | min | max |");
    println!("|---|---|---|---|---|");
    // First run fills the cache.
    time_to_first_prediction(&["--cache-dir", cache_dir])?;
    for (label, args) in [
        ("warm", vec!["--cache-dir", cache_dir]),
        ("none (JIT compile)", vec!["--no-cache"]),
    ] {
        let mut runs = Vec::new();
        for _ in 0..5 {
            runs.push(time_to_first_prediction(&args)?);
        }
        runs.sort_unstable();
        println!(
            "| {label} | 5 | {:.1} ms | {:.1} ms | {:.1} ms |",
            runs[2].as_secs_f64() * 1e3,
            runs[0].as_secs_f64() * 1e3,
            runs[4].as_secs_f64() * 1e3
        );
    }
    Ok(())
}

pub(super) fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS in /proc/PID/status")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmRSS")?
        .parse()?;
    Ok(kb * 1024)
}

fn wait_ready(port: u16) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(300) {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(
                b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            );
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the dev node did not become ready")
}

fn rss_with(
    dir: &Path,
    count: usize,
    key: &sophon_sdk::SigningKey,
    trust: &str,
    cache: &str,
) -> anyhow::Result<u64> {
    let mut args: Vec<String> = vec![
        "--no-examples".into(),
        "--trust".into(),
        trust.into(),
        "--cache-dir".into(),
        cache.into(),
    ];
    for i in 0..count {
        let path = dir.join(format!("mlp-{i:03}.sbundle"));
        if !path.exists() {
            std::fs::write(&path, ready::mlp_bundle(&format!("mlp-{i:03}"), key)?)?;
        }
        args.push("--bundle".into());
        args.push(path.to_string_lossy().into_owned());
    }
    let port = free_port()?;
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = spawn_dev(&refs, port)?;
    wait_ready(port)?;
    std::thread::sleep(Duration::from_millis(300));
    rss_bytes(server.0.id())
}

fn memory() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let key = keys::generate();
    let trust = dir.path().join("bench.pub");
    keys::write_public_key(&trust, &key.verifying_key())?;
    let trust = trust.to_string_lossy().into_owned();
    let cache = dir.path().join("cache").to_string_lossy().into_owned();
    let weights = {
        let m = ready::mlp();
        (m.w1.len() + m.b1.len() + m.w2.len() + m.b2.len()) * 4
    };
    rss_with(dir.path(), 1, &key, &trust, &cache)?; // fills the AOT cache
    let one = rss_with(dir.path(), 1, &key, &trust, &cache)?;
    let hundred = rss_with(dir.path(), 100, &key, &trust, &cache)?;
    let per_model = (hundred.saturating_sub(one)) as f64 / 99.0;
    let mib = |b: f64| b / (1 << 20) as f64;
    println!("\n## memory: RSS of `sophon dev --no-examples` after ready");
    println!(
        "| models | RSS | per extra model | weights per model | per extra model beyond weights |"
    );
    println!("|---|---|---|---|---|");
    println!("| 1 | {:.1} MiB | | | |", mib(one as f64));
    println!(
        "| 100 | {:.1} MiB | {:.2} MiB | {:.2} MiB | {:.2} MiB |",
        mib(hundred as f64),
        mib(per_model),
        mib(weights as f64),
        mib(per_model - weights as f64)
    );
    Ok(())
}

fn scheduler() -> anyhow::Result<()> {
    use sophon_coordinator::scheduler::{check_plan, place, synthetic::synthetic_cluster};
    let cluster = synthetic_cluster(10_000, 100_000, 42);
    println!("\n## scheduler: 100,000 replicas over 10,000 simulated nodes (5 runs each)");
    println!("| case | median | min | max | placed | unplaced |");
    println!("|---|---|---|---|---|---|");
    let mut runs = Vec::new();
    let mut plan = place(&cluster.nodes, &cluster.deployments, &[]);
    for _ in 0..5 {
        let t = Instant::now();
        plan = black_box(place(&cluster.nodes, &cluster.deployments, &[]));
        runs.push(t.elapsed());
    }
    if let Err(e) = check_plan(&cluster.nodes, &cluster.deployments, &plan) {
        bail!("the scheduler broke an invariant: {e}");
    }
    let row = |case: &str, runs: &mut Vec<Duration>, plan: &sophon_coordinator::scheduler::Plan| {
        runs.sort_unstable();
        let unplaced: usize = plan.unplaced.iter().map(|u| u.replicas.len()).sum();
        println!(
            "| {case} | {:.1} ms | {:.1} ms | {:.1} ms | {} | {unplaced} |",
            runs[2].as_secs_f64() * 1e3,
            runs[0].as_secs_f64() * 1e3,
            runs[4].as_secs_f64() * 1e3,
            plan.placements.len()
        );
    };
    row("from scratch", &mut runs, &plan);
    let mut nodes = cluster.nodes.clone();
    for node in nodes.iter_mut().step_by(100) {
        node.schedulable = false;
    }
    let current = plan.placements.clone();
    let mut runs = Vec::new();
    let mut replanned = plan;
    for _ in 0..5 {
        let t = Instant::now();
        replanned = black_box(place(&nodes, &cluster.deployments, &current));
        runs.push(t.elapsed());
    }
    row("replan after 100 nodes went down", &mut runs, &replanned);
    Ok(())
}
