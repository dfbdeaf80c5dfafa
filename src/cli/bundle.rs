//! `sophon keygen`, `sophon pack` and `sophon inspect`.

use anyhow::{Context, bail};
use sophon_sdk::{Bundle, components, keys};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the signing key (the public key goes beside it, with `.pub`).
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Overwrite an existing key.
    #[arg(long)]
    force: bool,
}

pub fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    let path = args.out.unwrap_or_else(super::default_key_path);
    if path.exists() && !args.force {
        bail!(
            "{} already exists; pass --force to replace it",
            path.display()
        );
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let public = path.with_extension("pub");
    if args.force {
        for old in [&path, &public] {
            if old.exists() {
                std::fs::remove_file(old).with_context(|| format!("removing {}", old.display()))?;
            }
        }
    }
    let key = keys::generate();
    keys::write_signing_key(&path, &key)?;
    keys::write_public_key(&public, &key.verifying_key())?;
    println!("signing key: {}", path.display());
    println!(
        "public key:  {} ({})",
        public.display(),
        keys::public_key_hex(&key.verifying_key())
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct PackArgs {
    /// A directory holding `sophon.toml`, the component and the model files.
    dir: Option<PathBuf>,
    /// Pack this plain ONNX file with the generic passthrough component instead.
    #[arg(long, conflicts_with = "dir")]
    onnx: Option<PathBuf>,
    /// Pack this OpenVINO IR model (the XML; its weights are the `.bin` beside it, or
    /// --weights) with the passthrough component instead. Only the openvino backend runs it.
    #[arg(long, conflicts_with_all = ["dir", "onnx"], value_name = "XML")]
    openvino: Option<PathBuf>,
    /// The weights of the --openvino model (default: the XML's path with `.bin`).
    #[arg(long, requires = "openvino", value_name = "BIN")]
    weights: Option<PathBuf>,
    /// Model name (with --onnx or --openvino).
    #[arg(long)]
    name: Option<String>,
    /// Model version (with --onnx or --openvino).
    #[arg(long, default_value = "1")]
    version: String,
    /// Pin an input's variable dimensions (with --onnx), as perf_analyzer's --shape does:
    /// NAME:d,d,... with -1 keeping a dimension variable. Repeat for several inputs.
    #[arg(long = "shape", value_name = "NAME:DIMS", value_parser = parse_shape)]
    shapes: Vec<(String, Vec<i64>)>,
    /// The wasi-nn backends to run the model on, best first (with --onnx): tract, ort,
    /// openvino, tract-cuda. The node uses the first it has that loads the graph; without
    /// this, the fastest it measures on the model's preferred device.
    #[arg(long = "backend", value_name = "NAME", requires = "onnx")]
    backends: Vec<sophon_sdk::Backend>,
    /// The devices the model prefers, best first (with --onnx or --openvino): cpu, gpu, npu.
    /// A node tries them in this order, then the CPU.
    #[arg(long = "device", value_name = "DEVICE", value_delimiter = ',')]
    devices: Vec<sophon_sdk::Device>,
    /// GPU memory the model needs, in MiB: a node reserves it before loading the model on a
    /// GPU, and runs it elsewhere when no GPU has that much left.
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    min_gpu_memory_mb: u64,
    /// Threads one request computes on in ONNX Runtime and OpenVINO (default 1; tract uses the
    /// request's own thread).
    #[arg(long, value_name = "N", default_value_t = 0)]
    threads: u32,
    /// The most rows one request may hold (with --onnx or --openvino). Default: 1024 when every
    /// input and output leads with a variable dimension (that is then the batch), as Triton's
    /// auto-complete decides; 0 says the model does not batch.
    #[arg(long, value_name = "N")]
    max_batch_size: Option<u32>,
    /// Turn on dynamic batching: requests wait up to this many microseconds for others to run
    /// with them, in one call of the model (0: only those already waiting join).
    #[arg(long, value_name = "US")]
    max_queue_delay_us: Option<u64>,
    /// With dynamic batching: a batch size to cut at (repeat for several).
    #[arg(
        long = "preferred-batch-size",
        value_name = "N",
        requires = "max_queue_delay_us"
    )]
    preferred_batch_sizes: Vec<u32>,
    /// Class names of an output (with --onnx or --openvino), for Triton's classification
    /// extension: OUTPUT=FILE, a text file with one name per line, line i naming class i (as
    /// Triton's label_filename). Repeat for several outputs.
    #[arg(long = "labels", value_name = "OUTPUT=FILE", value_parser = parse_labels)]
    labels: Vec<(String, PathBuf)>,
    /// Output bundle file.
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Signing key (default: the one `sophon keygen` wrote).
    #[arg(long)]
    key: Option<PathBuf>,
}

/// The `[batching]` the flags ask for.
fn batching(args: &PackArgs) -> Option<sophon_sdk::Batching> {
    args.max_queue_delay_us.map(|delay| sophon_sdk::Batching {
        max_batch_size: 0,
        preferred_batch_sizes: args.preferred_batch_sizes.clone(),
        max_queue_delay_us: delay,
    })
}

/// `OUTPUT=FILE`.
fn parse_labels(text: &str) -> Result<(String, PathBuf), String> {
    match text.split_once('=') {
        Some((output, file)) if !output.is_empty() && !file.is_empty() => {
            Ok((output.to_string(), PathBuf::from(file)))
        }
        _ => Err(format!(
            "`{text}`: write OUTPUT=FILE (for example softmax=labels.txt)"
        )),
    }
}

/// The text of each `--labels` file, by output.
fn read_labels(args: &PackArgs) -> anyhow::Result<std::collections::BTreeMap<String, Vec<u8>>> {
    let mut labels = std::collections::BTreeMap::new();
    for (output, file) in &args.labels {
        let text = std::fs::read(file)
            .with_context(|| format!("reading the labels of `{output}` from {}", file.display()))?;
        sophon_sdk::manifest::parse_labels(&text)
            .with_context(|| format!("the labels of `{output}` in {}", file.display()))?;
        if labels.insert(output.clone(), text).is_some() {
            bail!("--labels names output `{output}` twice");
        }
    }
    Ok(labels)
}

/// `NAME:d,d,...` (the name may hold colons: the dims follow the last one).
fn parse_shape(text: &str) -> Result<(String, Vec<i64>), String> {
    let (name, dims) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("`{text}`: write NAME:d,d,... (for example x:1,3,320,320)"))?;
    let dims = dims
        .split(',')
        .map(|d| {
            d.trim()
                .parse::<i64>()
                .ok()
                .filter(|d| *d >= -1)
                .ok_or_else(|| format!("`{text}`: `{d}` is not a size (or -1)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if name.is_empty() {
        return Err(format!("`{text}`: the input name is missing"));
    }
    Ok((name.to_string(), dims))
}

/// The pack-time check: load the graph on every backend this machine has and run it once on a
/// synthetic input (zeros; each variable dimension 1 for the first axis, 32 for the others).
/// Each backend is checked in a child process (`sophon check-backend`), because a native
/// library may kill its process on an input it cannot take (ONNX Runtime raises SIGFPE on
/// some shapes of some models). Says what each backend did, warns when tract cannot load the
/// graph, and returns the backends that loaded it (empty when none did: the manifest then
/// claims nothing).
fn check_backends(
    model_path: &std::path::Path,
    pins: &std::collections::BTreeMap<String, Vec<i64>>,
) -> anyhow::Result<Vec<sophon_sdk::Backend>> {
    let mut loads_on = Vec::new();
    println!("backend check (each backend this machine has loads the graph and runs it once):");
    for (backend, here) in sophon_node::backend::inventory() {
        if let Err(why) = here {
            println!("  {:<5} not checked: absent here ({why})", backend.as_str());
            continue;
        }
        let mut child = std::process::Command::new(std::env::current_exe()?);
        child
            .args(["check-backend", "--backend", backend.as_str(), "--onnx"])
            .arg(model_path)
            .env("SOPHON_LOG", "error");
        for (input, dims) in pins {
            let dims: Vec<String> = dims.iter().map(i64::to_string).collect();
            child.args(["--shape", &format!("{input}:{}", dims.join(","))]);
        }
        let out = child.output()?;
        // Native libraries' messages span lines; the check shows each backend on one.
        let said = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        match out.status.code() {
            Some(0) => {
                loads_on.push(backend);
                println!("  {:<5} {said}", backend.as_str());
            }
            Some(_) => println!("  {:<5} {said}", backend.as_str()),
            None => {
                use std::os::unix::process::ExitStatusExt;
                // It loaded (the child says so before it runs), then died running.
                if said.starts_with("loaded") {
                    loads_on.push(backend);
                }
                println!(
                    "  {:<5} loaded it, then the process died (signal {}) on a synthetic input: \
                     requests of such shapes would kill a node; pin the inputs with --shape",
                    backend.as_str(),
                    out.status.signal().unwrap_or(0)
                );
                eprintln!(
                    "warning: {} crashed its process on a synthetic input of this model",
                    backend.as_str()
                );
            }
        }
    }
    if !loads_on.contains(&sophon_sdk::Backend::Tract) {
        eprintln!(
            "warning: tract cannot load this model: it runs only on nodes with another backend \
             (ONNX Runtime); the coordinators place it on those alone"
        );
    }
    if loads_on.is_empty() {
        eprintln!("warning: no backend here loads this model; the bundle claims none");
    }
    Ok(loads_on)
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    #[arg(long)]
    onnx: PathBuf,
    #[arg(long)]
    backend: sophon_sdk::Backend,
    #[arg(long = "shape", value_parser = parse_shape)]
    shapes: Vec<(String, Vec<i64>)>,
}

/// One backend's part of the pack-time check, in a process of its own: prints what it did;
/// exits 0 when the backend loaded the graph, 1 when it did not.
pub fn check_backend(args: CheckArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    use wasmtime_wasi_nn::backend::BackendGraph;
    let model = std::fs::read(&args.onnx)?;
    let options = sophon_sdk::OnnxOptions {
        pins: args.shapes.into_iter().collect(),
        ..Default::default()
    };
    let manifest = sophon_sdk::onnx::onnx_manifest_with(&model, "check", "1", &options)?;
    let graph = manifest.graphs.first().context("no graph")?;
    let file = sophon_node::backend::GraphFile::onnx(&model, &graph.shapes);
    let graph = match sophon_node::backend::load_graph_on(&file, args.backend) {
        Ok(loaded) => loaded.graph,
        Err(e) => {
            println!("cannot load it: {e}");
            std::process::exit(1);
        }
    };
    // Said before running, in case the run kills this process.
    print!("loaded it");
    std::io::stdout().flush()?;
    let Some(inputs) =
        sophon_node::backend::choose::synthetic_inputs(&manifest.inputs, file.shapes)
    else {
        println!(" (not run: an input type has no synthetic value)");
        return Ok(());
    };
    let started = std::time::Instant::now();
    let g: &dyn BackendGraph = &*graph;
    match g
        .init_execution_context()
        .and_then(|mut ctx| ctx.compute_with_io(inputs))
    {
        Ok(_) => println!(
            " and ran it ({:.1} ms on a synthetic input)",
            started.elapsed().as_secs_f64() * 1e3
        ),
        Err(e) => {
            let detail = sophon_node::backend::take_last_error()
                .map_or_else(|| e.to_string(), |d| d.message);
            println!("; a synthetic input did not run ({detail})");
        }
    }
    Ok(())
}

pub fn pack(args: PackArgs) -> anyhow::Result<()> {
    let key_path = args.key.clone().unwrap_or_else(super::default_key_path);
    let key = keys::read_signing_key(&key_path).with_context(|| {
        format!(
            "reading the signing key {} (make one with `sophon keygen`)",
            key_path.display()
        )
    })?;
    if args.dir.is_some()
        && (args.name.is_some()
            || !args.shapes.is_empty()
            || !args.backends.is_empty()
            || args.max_batch_size.is_some()
            || args.max_queue_delay_us.is_some()
            || !args.labels.is_empty())
    {
        bail!(
            "--name, --shape, --backend, --max-batch-size, --max-queue-delay-us and --labels go \
             with --onnx or --openvino; a directory's sophon.toml says them"
        );
    }
    let (bytes, default_out) = match (&args.onnx, &args.dir) {
        (None, None) if args.openvino.is_some() => {
            let name = args
                .name
                .as_deref()
                .context("--openvino needs --name NAME")?;
            let bytes = pack_openvino(&args, name, &key)?;
            (
                bytes,
                PathBuf::from(format!("{name}-{}.sbundle", args.version)),
            )
        }
        (Some(onnx), _) => {
            let name = args.name.as_deref().context("--onnx needs --name NAME")?;
            let model =
                std::fs::read(onnx).with_context(|| format!("reading {}", onnx.display()))?;
            let batching = batching(&args);
            let labels = read_labels(&args)?;
            let mut options = sophon_sdk::OnnxOptions {
                pins: args.shapes.into_iter().collect(),
                backends: args.backends,
                loads_on: Vec::new(),
                preferred: args.devices,
                min_gpu_memory_mb: args.min_gpu_memory_mb,
                threads: args.threads,
                max_batch_size: args.max_batch_size,
                batching,
                labels,
            };
            // The file must make a manifest (pins included) before the backends see it.
            sophon_sdk::onnx::onnx_manifest_with(&model, name, &args.version, &options)?;
            options.loads_on = check_backends(onnx, &options.pins)?;
            let bytes = sophon_sdk::pack_onnx_with(
                &model,
                name,
                &args.version,
                components::PASSTHROUGH,
                &key,
                &options,
            )?;
            (
                bytes,
                PathBuf::from(format!("{name}-{}.sbundle", args.version)),
            )
        }
        (None, Some(dir)) => {
            let bytes = sophon_sdk::pack_dir(dir, &key)?;
            let bundle = Bundle::read(&bytes)?;
            let m = &bundle.manifest.model;
            (
                bytes,
                PathBuf::from(format!("{}-{}.sbundle", m.name, m.version)),
            )
        }
        (None, None) => bail!(
            "give a manifest directory, or --onnx FILE --name NAME, or --openvino XML --name NAME"
        ),
    };
    let out = args.out.unwrap_or(default_out);
    std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    let bundle = Bundle::read(&bytes)?;
    println!(
        "{} ({} bytes, digest {})",
        out.display(),
        bytes.len(),
        bundle.digest_hex()
    );
    Ok(())
}

/// `pack --openvino`: an OpenVINO IR model (XML and weights) with the passthrough component.
/// OpenVINO reads the model here to write its inputs and outputs into the manifest, so packing
/// needs the library (the `openvino` wheel); the bundle claims the openvino backend alone.
fn pack_openvino(
    args: &PackArgs,
    name: &str,
    key: &sophon_sdk::SigningKey,
) -> anyhow::Result<Vec<u8>> {
    let xml_path = args.openvino.as_deref().context("--openvino XML")?;
    let weights_path = args
        .weights
        .clone()
        .unwrap_or_else(|| xml_path.with_extension("bin"));
    let xml = std::fs::read(xml_path).with_context(|| format!("reading {}", xml_path.display()))?;
    let weights = std::fs::read(&weights_path).with_context(|| {
        format!(
            "reading the weights {} (or give --weights)",
            weights_path.display()
        )
    })?;
    let (inputs, outputs) =
        sophon_node::backend::openvino_model_io(&xml, &weights).map_err(anyhow::Error::msg)?;
    let options = sophon_sdk::OnnxOptions {
        pins: args.shapes.iter().cloned().collect(),
        backends: vec![sophon_sdk::Backend::Openvino],
        loads_on: vec![sophon_sdk::Backend::Openvino],
        preferred: args.devices.clone(),
        min_gpu_memory_mb: args.min_gpu_memory_mb,
        threads: args.threads,
        max_batch_size: args.max_batch_size,
        batching: batching(args),
        labels: read_labels(args)?,
    };
    let graph = sophon_sdk::GraphSpec {
        name: sophon_sdk::onnx::ONNX_GRAPH_NAME.to_string(),
        file: "model.xml".to_string(),
        encoding: sophon_sdk::GraphEncoding::Openvino,
        shapes: Default::default(),
        weights: Some("model.bin".to_string()),
    };
    let mut manifest =
        sophon_sdk::onnx::graph_manifest(inputs, outputs, graph, name, &args.version, &options)?;
    let mut files = vec![
        ("model.xml".to_string(), xml),
        ("model.bin".to_string(), weights),
    ];
    sophon_sdk::onnx::add_labels(&mut manifest, &mut files, &options);
    Ok(sophon_sdk::pack_parts(
        &manifest,
        components::PASSTHROUGH,
        &files,
        key,
    )?)
}

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The bundle file.
    bundle: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.bundle)
        .with_context(|| format!("reading {}", args.bundle.display()))?;
    let bundle = Bundle::read(&bytes)
        .with_context(|| format!("{} is not a valid bundle", args.bundle.display()))?;
    let m = &bundle.manifest;
    if args.json {
        let files: serde_json::Map<String, serde_json::Value> = bundle
            .files
            .iter()
            .map(|(k, v)| (k.clone(), v.len().into()))
            .collect();
        let out = serde_json::json!({
            "digest": bundle.digest_hex(),
            "publisher": bundle.publisher_hex(),
            "size": bytes.len(),
            "component_size": bundle.component.len(),
            "files": files,
            "manifest": m,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("bundle     {}", args.bundle.display());
    println!("model      {} version {}", m.model.name, m.model.version);
    if let Some(d) = &m.model.description {
        println!("about      {d}");
    }
    println!("digest     {}", bundle.digest_hex());
    println!("publisher  {}", bundle.publisher_hex());
    println!("signature  valid");
    println!("component  {} bytes", bundle.component.len());
    for g in &m.graphs {
        let size = bundle.files.get(&g.file).map_or(0, Vec::len);
        println!(
            "graph      {} ({:?}, {}, {} bytes)",
            g.name, g.encoding, g.file, size
        );
        if let Some(weights) = &g.weights {
            let size = bundle.files.get(weights).map_or(0, Vec::len);
            println!("  weights {weights} ({size} bytes)");
        }
        for (input, shape) in &g.shapes {
            println!("  analysed with {input} {shape:?}");
        }
    }
    if !m.hardware.loads_on.is_empty() {
        let names: Vec<&str> = m.hardware.loads_on.iter().map(|b| b.as_str()).collect();
        println!("loads on   {} (checked at pack time)", names.join(", "));
    }
    if !m.hardware.backends.is_empty() {
        let names: Vec<&str> = m.hardware.backends.iter().map(|b| b.as_str()).collect();
        println!("backends   {}", names.join(", "));
    }
    let devices: Vec<&str> = m
        .hardware
        .preferred
        .iter()
        .map(|d| sophon_node::backend::choose::name(*d))
        .collect();
    if devices != ["cpu"] || m.hardware.min_gpu_memory_mb > 0 {
        let mut line = format!("devices    {}", devices.join(", "));
        if m.hardware.min_gpu_memory_mb > 0 {
            line += &format!(" ({} MiB of GPU memory)", m.hardware.min_gpu_memory_mb);
        }
        println!("{line}");
    }
    for (role, specs) in [("input", &m.inputs), ("output", &m.outputs)] {
        for s in specs {
            println!("{role:<10} {} {} {:?}", s.name, s.datatype, s.shape);
        }
    }
    for (output, file) in &m.labels {
        let count = bundle
            .files
            .get(file)
            .map_or(0, |text| String::from_utf8_lossy(text).lines().count());
        println!("labels     {output}: {count} classes ({file})");
    }
    let r = &m.resources;
    let threads = match r.threads {
        0 => String::new(),
        n => format!(", {n} thread(s) per request"),
    };
    println!(
        "limits     memory {} MiB, timeout {} ms{threads}",
        r.memory_mb, r.timeout_ms
    );
    if r.max_batch_size > 0 {
        println!("batch      dim 0, at most {} rows", r.max_batch_size);
    }
    if let Some(b) = &m.batching {
        let mut line = format!(
            "batching   dynamic, up to {} rows, waiting at most {} µs",
            b.limit(r.max_batch_size),
            b.max_queue_delay_us
        );
        if !b.preferred_batch_sizes.is_empty() {
            line += &format!(", preferring {:?}", b.preferred_batch_sizes);
        }
        println!("{line}");
    }
    if !m.capabilities.env.is_empty() {
        let names: Vec<&String> = m.capabilities.env.keys().collect();
        println!("grants     env {names:?}");
    }
    Ok(())
}
