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
    /// Model name (with --onnx).
    #[arg(long, requires = "onnx")]
    name: Option<String>,
    /// Model version (with --onnx).
    #[arg(long, default_value = "1")]
    version: String,
    /// Pin an input's variable dimensions (with --onnx), as perf_analyzer's --shape does:
    /// NAME:d,d,... with -1 keeping a dimension variable. Repeat for several inputs.
    #[arg(long = "shape", value_name = "NAME:DIMS", requires = "onnx", value_parser = parse_shape)]
    shapes: Vec<(String, Vec<i64>)>,
    /// The wasi-nn backends to run the model on, best first (with --onnx): tract, ort. The
    /// node uses the first it has that loads the graph; without this, its own order.
    #[arg(long = "backend", value_name = "NAME", requires = "onnx")]
    backends: Vec<sophon_sdk::Backend>,
    /// Output bundle file.
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Signing key (default: the one `sophon keygen` wrote).
    #[arg(long)]
    key: Option<PathBuf>,
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

pub fn pack(args: PackArgs) -> anyhow::Result<()> {
    let key_path = args.key.unwrap_or_else(super::default_key_path);
    let key = keys::read_signing_key(&key_path).with_context(|| {
        format!(
            "reading the signing key {} (make one with `sophon keygen`)",
            key_path.display()
        )
    })?;
    let (bytes, default_out) = match (&args.onnx, &args.dir) {
        (Some(onnx), _) => {
            let name = args.name.as_deref().context("--onnx needs --name NAME")?;
            let model =
                std::fs::read(onnx).with_context(|| format!("reading {}", onnx.display()))?;
            let pins: std::collections::BTreeMap<_, _> = args.shapes.into_iter().collect();
            let bytes = sophon_sdk::pack_onnx_pinned(
                &model,
                name,
                &args.version,
                components::PASSTHROUGH,
                &key,
                &pins,
                &args.backends,
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
        (None, None) => bail!("give a manifest directory, or --onnx FILE --name NAME"),
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
        for (input, shape) in &g.shapes {
            println!("  analysed with {input} {shape:?}");
        }
    }
    if !m.hardware.backends.is_empty() {
        let names: Vec<&str> = m.hardware.backends.iter().map(|b| b.as_str()).collect();
        println!("backends   {}", names.join(", "));
    }
    for (role, specs) in [("input", &m.inputs), ("output", &m.outputs)] {
        for s in specs {
            println!("{role:<10} {} {} {:?}", s.name, s.datatype, s.shape);
        }
    }
    let r = &m.resources;
    println!(
        "limits     memory {} MiB, timeout {} ms",
        r.memory_mb, r.timeout_ms
    );
    if !m.capabilities.env.is_empty() {
        let names: Vec<&String> = m.capabilities.env.keys().collect();
        println!("grants     env {names:?}");
    }
    Ok(())
}
