//! `sophon dev`: one coordinator and one node in one process, joined through the real mesh
//! (QUIC on loopback, a real node join token). The example models and any bundle given are
//! pushed, and deployed to `staging`, through the same path as a user's; the node serves what is
//! deployed. `--no-coordinator` runs a bare node with the bundles loaded directly.

use anyhow::Context;
use sophon_node::{NodeServer, Repository};
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
    #[command(flatten)]
    pub serve: super::node::ServeArgs,
    /// Compile components at start-up instead of using the AOT cache.
    #[arg(long)]
    pub no_cache: bool,
    /// The single-member coordinator's data directory (made on first run).
    #[arg(long, default_value = ".sophon-dev")]
    pub data: PathBuf,
    /// The coordinator's admin API address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub admin: SocketAddr,
    /// The coordinator's mesh (QUIC) address.
    #[arg(long, default_value = "127.0.0.1:7401")]
    pub mesh: SocketAddr,
    /// The dev node's mesh (QUIC) address.
    #[arg(long, default_value = "127.0.0.1:7402")]
    pub node_mesh: SocketAddr,
    /// Run the node only, without a coordinator.
    #[arg(long)]
    pub no_coordinator: bool,
}

/// Starts the dev coordinator: initialises `args.data` on first run (the admin token is kept
/// in `admin-token` there, readable by the owner only, so later runs can print it again).
async fn start_coordinator(
    args: &DevArgs,
) -> anyhow::Result<(sophon_coordinator::server::Running, String)> {
    use sophon_coordinator::server;
    let token_file = args.data.join("admin-token");
    if !args.data.join("coordinator.json").exists() {
        let secret = server::init(&args.data, &args.mesh.to_string(), &args.admin.to_string())
            .with_context(|| format!("initialising {}", args.data.display()))?;
        server::write_private(&token_file, &secret)?;
    }
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading {}", token_file.display()))?
        .trim()
        .to_string();
    let tuning = super::coordinator::Tuning::plain(30, 10_000, 1024);
    let config = super::coordinator::config(
        args.data.clone(),
        Some(args.admin),
        Some(args.mesh),
        &tuning,
    )?;
    let running = server::start(config).await?;
    // Trust your own publisher key (from `sophon keygen`), so `sophon model push` just works.
    let own = super::default_key_path().with_extension("pub");
    if own.exists() {
        let key = keys::read_public_key(&own)?;
        let admin = running
            .core
            .driver
            .read(true, {
                let token = token.clone();
                move |s| s.authenticate(&token)
            })
            .await?;
        if let Some(admin) = admin {
            let command = sophon_coordinator::Command::TrustKey {
                key: keys::public_key_hex(&key),
                name: "dev-publisher".into(),
            };
            running.core.write(admin, command).await?;
        }
    }
    // The examples' key, and the keys given with --trust, are trusted by the cluster.
    let examples = examples_key(args)?;
    let mut trusted = vec![("dev-examples".to_string(), examples.verifying_key())];
    for path in &args.trust {
        let key =
            keys::read_public_key(path).with_context(|| format!("reading {}", path.display()))?;
        trusted.push((format!("dev-trusted-{}", trusted.len()), key));
    }
    let admin = admin_actor(&running, &token).await?;
    for (name, key) in trusted {
        let hex = keys::public_key_hex(&key);
        let known = {
            let hex = hex.clone();
            running
                .core
                .driver
                .read(true, move |s| s.trusted_keys().contains_key(&hex))
                .await?
        };
        if !known {
            let command = sophon_coordinator::Command::TrustKey { key: hex, name };
            running.core.write(admin.clone(), command).await?;
        }
    }
    Ok((running, token))
}

/// The key the dev cluster's examples are signed with, kept in the data directory (the same
/// bundles, the same digests, across restarts), and trusted by the cluster.
fn examples_key(args: &DevArgs) -> anyhow::Result<sophon_sdk::SigningKey> {
    let path = args.data.join("examples.key");
    if path.exists() {
        return Ok(keys::read_signing_key(&path)?);
    }
    let key = keys::generate();
    keys::write_signing_key(&path, &key)?;
    Ok(key)
}

/// The admin actor of the dev cluster's admin token.
async fn admin_actor(
    running: &sophon_coordinator::server::Running,
    token: &str,
) -> anyhow::Result<sophon_coordinator::Actor> {
    let token = token.to_string();
    running
        .core
        .driver
        .read(true, move |s| s.authenticate(&token))
        .await?
        .context("the dev admin token is not valid")
}

/// Join the dev node to the dev coordinator with a real node join token, once.
async fn join_dev_node(
    args: &DevArgs,
    running: &sophon_coordinator::server::Running,
    token: &str,
) -> anyhow::Result<PathBuf> {
    use sophon_coordinator::server;
    let dir = args.data.join("node");
    if dir.join("node.json").exists() {
        return Ok(dir);
    }
    let admin = admin_actor(running, token).await?;
    let (id, secret) = server::new_token();
    running
        .core
        .write(
            admin,
            sophon_coordinator::Command::CreateLimitedToken {
                id,
                name: "dev-node".into(),
                role: sophon_coordinator::Role::NodeJoin,
                secret_hash: sophon_coordinator::hash_secret(&secret),
                expires_in_ms: Some(600_000),
                uses: Some(1),
            },
        )
        .await?;
    let join = server::join_string(
        &running.core.ca_fingerprint(),
        &secret,
        &running.mesh_address.to_string(),
    );
    let options = sophon_node::mesh::JoinOptions {
        join_token: join,
        data_dir: dir.clone(),
        id: "dev".into(),
        mesh_listen: args.node_mesh,
        mesh_address: None,
        http_listen: args.http,
        http_address: None,
        labels: Default::default(),
        zone: "default".into(),
        environments: Vec::new(),
        memory_mb: None,
    };
    sophon_node::mesh::join(&options).await?;
    Ok(dir)
}

/// Push `bundle` and deploy it hot to staging with one replica, through the admin API as a user
/// would (a version already on the shelf, or already deployed, is left as it is). Returns the
/// model's name and version.
fn push_and_deploy(admin: &str, token: &str, bundle: &[u8]) -> anyhow::Result<(String, String)> {
    let parsed = sophon_sdk::Bundle::read(bundle)?;
    let (name, version) = (
        parsed.manifest.model.name.clone(),
        parsed.manifest.model.version.clone(),
    );
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(60)))
            .build(),
    );
    let auth = format!("Bearer {token}");
    let mut pushed = agent
        .post(format!("http://{admin}/v1/bundles"))
        .header("Authorization", &auth)
        .send(bundle)?;
    let status = pushed.status().as_u16();
    let text = pushed.body_mut().read_to_string().unwrap_or_default();
    if !(200..300).contains(&status) && !text.contains("version_exists") {
        anyhow::bail!("push {name}@{version}: HTTP {status}: {text}");
    }
    if text.contains("version_exists") {
        tracing::info!(model = %name, %version, "already on the shelf: serving the version there");
    }
    let body = serde_json::json!({
        "model": name, "version": version, "environment": "staging", "replicas": 1,
        // Loaded at once: `sophon dev` lists what it serves, and its first request is fast.
        "hot": true,
    });
    let mut deployed = agent
        .post(format!("http://{admin}/v1/deployments"))
        .header("Authorization", &auth)
        .send_json(body)?;
    let status = deployed.status().as_u16();
    let text = deployed.body_mut().read_to_string().unwrap_or_default();
    if !(200..300).contains(&status) && !text.contains("deployment_exists") {
        anyhow::bail!("deploy {name}@{version}: HTTP {status}: {text}");
    }
    Ok((name, version))
}

/// Build the node's repository. With `--no-coordinator` it loads the examples (signed by a key
/// that lives only in this process) and the bundles given directly; otherwise it starts empty
/// and trusts what the cluster trusts (the mesh brings what is deployed).
pub fn build_repository(args: &DevArgs) -> anyhow::Result<Arc<Repository>> {
    if !args.no_coordinator {
        return super::node::repository(&args.serve, args.no_cache, Vec::new());
    }
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
    let repo = super::node::repository(&args.serve, args.no_cache, trusted)?;
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
    sophon_node::hardware::probe_in_background();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let served = rt.block_on(async move {
        let repo = build_repository(&args)?;
        let config = args.serve.http();
        let coordinator = if args.no_coordinator {
            None
        } else {
            Some(start_coordinator(&args).await?)
        };
        let server = NodeServer::bind(args.http, repo.clone(), config)
            .await?
            .with_drain_deadline(std::time::Duration::from_secs(args.serve.drain_secs));
        let addr = server.local_addr()?;
        let grpc = args.serve.start_grpc(server.state().clone()).await?;
        let mut mesh_node = None;
        if let Some((running, token)) = &coordinator {
            // The node joins the coordinator through the mesh and serves what is deployed.
            let dir = join_dev_node(&args, running, token).await?;
            let node = sophon_node::mesh::MeshNode::start(
                &dir,
                repo.clone(),
                server.app(),
                args.serve.model_memory(),
            )
            .await
            .context("start the dev node's mesh")?;
            let _ = server.state().mesh.set(node.router.clone());
            let key = examples_key(&args)?;
            let mut bundles = Vec::new();
            if !args.no_examples {
                bundles.push(ready::mlp_bundle("mlp", &key)?);
                bundles.push(ready::classifier_bundle(&key)?);
            }
            for path in &args.bundles {
                bundles.push(
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
                );
            }
            let api = running.api_address.to_string();
            let token = token.clone();
            let wanted = tokio::task::spawn_blocking(move || {
                bundles
                    .iter()
                    .map(|b| push_and_deploy(&api, &token, b))
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .await??;
            let started = std::time::Instant::now();
            for (name, version) in &wanted {
                // Loaded, or ready to load on its first request (a cold deployment an earlier
                // run made in the same data directory).
                while repo.lookup(name, Some(version)).is_err()
                    && node.replicas.evicted(name, Some(version)).is_none()
                {
                    if started.elapsed() > std::time::Duration::from_secs(120) {
                        anyhow::bail!(
                            "{name}@{version} was deployed but did not become ready on the dev node"
                        );
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
            mesh_node = Some(node);
        }
        print_banner(addr, &repo);
        if let Some(grpc) = grpc {
            println!("gRPC (KServe V2 / Triton): {grpc}");
        }
        if let Some((running, token)) = &coordinator {
            println!(
                "Coordinator (data in {}) admin API on http://{}",
                args.data.display(),
                running.api_address
            );
            println!(
                "  export SOPHON_SERVER=http://{} SOPHON_TOKEN={token}",
                running.api_address
            );
            println!("  sophon cluster status; sophon model list; sophon audit");
        }
        let served = server.run(shutdown_signal()).await;
        drop(mesh_node);
        if let Some((running, _)) = coordinator {
            running.shutdown().await;
        }
        served
    });
    // A guest call cancelled at the drain deadline may still hold a thread until its own
    // deadline: do not wait for it.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    served
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
    for line in sophon_node::hardware::hardware().describe() {
        println!("{line}");
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
