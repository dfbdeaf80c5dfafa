//! `sophon dev`: an all-in-one node serving the example models and any bundles given.

use anyhow::Context;
use sophon_node::http::HttpConfig;
use sophon_node::stats::Metrics;
use sophon_node::{NodeServer, Repository, Runtime, RuntimeConfig, ServingLimits};
use sophon_sdk::{keys, ready};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Address of the V2 HTTP API.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub http: SocketAddr,
    /// A bundle to serve as well (repeatable).
    #[arg(long = "bundle")]
    pub bundles: Vec<PathBuf>,
    /// A publisher public key to trust besides your own (repeatable).
    #[arg(long = "trust")]
    pub trust: Vec<PathBuf>,
    /// Do not serve the example models.
    #[arg(long)]
    pub no_examples: bool,
    /// Requests of one model running at once (default: the number of cores).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Requests of one model that may wait before new ones get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_body_bytes: usize,
    /// Directory of the AOT component cache (default: ~/.cache/sophon/components).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Compile components at start-up instead of using the AOT cache.
    #[arg(long)]
    pub no_cache: bool,
}

/// Build the node's repository with the examples and the bundles given.
pub fn build_repository(args: &DevArgs) -> anyhow::Result<Arc<Repository>> {
    let mut config = RuntimeConfig::default();
    if let Some(dir) = &args.cache_dir {
        config.cache_dir = Some(dir.clone());
    }
    if args.no_cache {
        config.cache_dir = None;
    }
    let runtime = Runtime::new(config)?;
    let metrics = Arc::new(Metrics::new()?);
    // The examples are signed at start-up by a key that lives only in this process.
    let example_key = keys::generate();
    let mut trusted = vec![example_key.verifying_key()];
    let own = super::default_key_path().with_extension("pub");
    if own.exists() {
        trusted.push(keys::read_public_key(&own)?);
    }
    for path in &args.trust {
        trusted.push(
            keys::read_public_key(path).with_context(|| format!("reading {}", path.display()))?,
        );
    }
    let mut limits = ServingLimits {
        max_queue: args.max_queue,
        ..ServingLimits::default()
    };
    if let Some(n) = args.concurrency {
        limits.default_concurrency = n;
    }
    let repo = Arc::new(Repository::new(runtime, trusted, limits, metrics));
    if !args.no_examples {
        repo.add_bundle(&ready::mlp_bundle("mlp", &example_key)?)?;
        repo.add_bundle(&ready::classifier_bundle(&example_key)?)?;
    }
    for path in &args.bundles {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        repo.add_bundle(&bytes)
            .with_context(|| format!("serving {}", path.display()))?;
    }
    Ok(repo)
}

pub fn run(args: DevArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let repo = build_repository(&args)?;
        let config = HttpConfig {
            max_body_bytes: args.max_body_bytes,
        };
        let server = NodeServer::bind(args.http, repo.clone(), config).await?;
        let addr = server.local_addr()?;
        print_banner(addr, &repo);
        server.run(shutdown_signal()).await
    })
}

fn print_banner(addr: SocketAddr, repo: &Repository) {
    println!("Sophon dev node serving KServe V2 on http://{addr}");
    for m in repo.loaded() {
        println!("  model {} (version {}) ready", m.name, m.version);
    }
    if repo.lookup("classifier", None).is_ok() {
        let pixels: Vec<String> = (0..64).map(|i| ((i * 37) % 256).to_string()).collect();
        println!("Try it:");
        println!(
            "  curl -s http://{addr}/v2/models/classifier/infer -d '{{\"inputs\":[{{\"name\":\"image\",\"datatype\":\"UINT8\",\"shape\":[1,64],\"data\":[{}]}}]}}'",
            pixels.join(",")
        );
    }
    println!("Metrics: http://{addr}/metrics   Stop: Ctrl-C");
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
