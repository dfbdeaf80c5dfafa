//! `sophon coordinator init|run|join|join-token`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use sophon_coordinator::server::{self, CoordinatorConfig};

use super::client::{Client, ClientArgs, Table, cell};

#[derive(clap::Args, Debug, Clone)]
pub struct Listen {
    /// Admin API address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub api: SocketAddr,
    /// Mesh (QUIC) address the other coordinators reach.
    #[arg(long, default_value = "127.0.0.1:7401")]
    pub mesh: SocketAddr,
    /// The mesh address to tell the others, if not `--mesh` (behind NAT or a proxy).
    #[arg(long)]
    pub advertise_mesh: Option<String>,
}

impl Listen {
    fn mesh_advertised(&self) -> String {
        self.advertise_mesh
            .clone()
            .unwrap_or_else(|| self.mesh.to_string())
    }
}

/// How the Raft loop runs.
#[derive(clap::Args, Debug, Clone)]
pub struct Tuning {
    /// One Raft tick, in ms (elections take 10–20 ticks, heartbeats every 3).
    #[arg(long, default_value_t = 30)]
    pub tick_ms: u64,
    /// Applied entries between two snapshots.
    #[arg(long, default_value_t = 10_000)]
    pub snapshot_every: u64,
    /// Largest bundle accepted, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub max_bundle_mb: u64,
}

#[derive(Subcommand, Debug)]
pub enum CoordinatorCmd {
    /// Bootstrap a new cluster: its CA and first coordinator. Prints the admin token once.
    Init {
        #[arg(long)]
        data: PathBuf,
        #[command(flatten)]
        listen: Listen,
        /// Start serving right away.
        #[arg(long)]
        run: bool,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Run a coordinator from its data directory.
    Run {
        #[arg(long)]
        data: PathBuf,
        /// Admin API address (default: the one recorded at init/join).
        #[arg(long)]
        api: Option<SocketAddr>,
        /// Mesh address (default: the one recorded at init/join).
        #[arg(long)]
        mesh: Option<SocketAddr>,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Join an existing cluster with a join token (from `coordinator join-token`).
    Join {
        #[arg(long)]
        data: PathBuf,
        /// The join token.
        #[arg(long, env = "SOPHON_JOIN_TOKEN", hide_env_values = true)]
        join_token: String,
        #[command(flatten)]
        listen: Listen,
        /// Start serving right away.
        #[arg(long)]
        run: bool,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Make a join token for a new coordinator (needs an admin token).
    JoinToken {
        /// Print only the join token (for `$(...)`).
        #[arg(long)]
        raw: bool,
    },
}

pub fn run(cmd: CoordinatorCmd, client: &ClientArgs) -> anyhow::Result<()> {
    match cmd {
        CoordinatorCmd::Init {
            data,
            listen,
            run,
            tuning,
        } => {
            let secret = server::init(&data, &listen.mesh_advertised(), &listen.api.to_string())
                .with_context(|| format!("initialising {}", data.display()))?;
            server::record_mesh_listen(&data, &listen.mesh.to_string())?;
            println!("Initialised coordinator 1 in {}", data.display());
            println!("Admin token (shown once, keep it): {secret}");
            println!(
                "  export SOPHON_SERVER=http://{} SOPHON_TOKEN={secret}",
                listen.api
            );
            if run {
                serve(data, Some(listen.api), Some(listen.mesh), &tuning)?;
            }
            Ok(())
        }
        CoordinatorCmd::Run {
            data,
            api,
            mesh,
            tuning,
        } => serve(data, api, mesh, &tuning),
        CoordinatorCmd::Join {
            data,
            join_token,
            listen,
            run,
            tuning,
        } => {
            let rt = runtime()?;
            let id = rt.block_on(server::join(
                &data,
                &join_token,
                &listen.mesh_advertised(),
                &listen.api.to_string(),
            ))?;
            drop(rt);
            server::record_mesh_listen(&data, &listen.mesh.to_string())?;
            println!("Joined as coordinator {id}; data in {}", data.display());
            if run {
                serve(data, Some(listen.api), Some(listen.mesh), &tuning)?;
            }
            Ok(())
        }
        CoordinatorCmd::JoinToken { raw } => {
            let c = Client::new(client);
            let status = c.get("/v1/cluster/status")?;
            let name = format!("coordinator-join-{}", std::process::id());
            let token = c.send(
                "POST",
                "/v1/tokens",
                Some(serde_json::json!({"name": name, "role": "admin"})),
            )?;
            let join = server::join_string(
                status["ca_fingerprint"].as_str().unwrap_or_default(),
                token["secret"].as_str().unwrap_or_default(),
                status["mesh_address"].as_str().unwrap_or_default(),
            );
            if raw {
                println!("{join}");
                return Ok(());
            }
            c.print(
                &serde_json::json!({"join_token": join, "token_id": token["id"]}),
                |v| {
                    Table::fields(&[
                        ("join token", cell(&v["join_token"])),
                        (
                            "token id",
                            format!(
                                "{} (revoke it once the coordinator joined)",
                                cell(&v["token_id"])
                            ),
                        ),
                    ])
                },
            );
            Ok(())
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The coordinator's config for `data`, with the listen addresses recorded there unless given.
pub fn config(
    data: PathBuf,
    api: Option<SocketAddr>,
    mesh: Option<SocketAddr>,
    tuning: &Tuning,
) -> anyhow::Result<CoordinatorConfig> {
    let member: server::MemberFile = serde_json::from_str(
        &std::fs::read_to_string(data.join("coordinator.json")).with_context(|| {
            format!(
                "{} holds no coordinator: run `sophon coordinator init` or `join`",
                data.display()
            )
        })?,
    )?;
    let api = match api {
        Some(a) => a,
        None => member
            .api_address
            .parse()
            .context("the recorded api address")?,
    };
    let mesh = match mesh {
        Some(m) => m,
        None => member
            .mesh_listen
            .as_deref()
            .unwrap_or(&member.mesh_address)
            .parse()
            .context("the recorded mesh address")?,
    };
    let mut config = CoordinatorConfig::new(data, api, mesh);
    config.driver.tick = Duration::from_millis(tuning.tick_ms.max(1));
    config.driver.replica.snapshot_every = tuning.snapshot_every.max(1);
    config.max_bundle_bytes = tuning.max_bundle_mb.max(1) << 20;
    Ok(config)
}

fn serve(
    data: PathBuf,
    api: Option<SocketAddr>,
    mesh: Option<SocketAddr>,
    tuning: &Tuning,
) -> anyhow::Result<()> {
    let config = config(data, api, mesh, tuning)?;
    let rt = runtime()?;
    rt.block_on(async move {
        let running = server::start(config).await?;
        println!(
            "Coordinator {} serving the admin API on http://{} (mesh {})",
            running.core.id, running.api_address, running.mesh_address
        );
        super::dev::shutdown_signal().await;
        running.shutdown().await;
        anyhow::Ok(())
    })
}
