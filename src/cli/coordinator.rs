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

/// How the coordinator runs: its Raft loop, limits, and how its admin API is served.
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
    /// Serve the admin API over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The admin API's TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve the admin API in plain HTTP on a non-loopback address (behind a TLS proxy only).
    #[arg(long)]
    pub insecure_http: bool,
}

impl Tuning {
    /// Raft and limits only, the admin API in plain HTTP (loopback).
    pub fn plain(tick_ms: u64, snapshot_every: u64, max_bundle_mb: u64) -> Tuning {
        Tuning {
            tick_ms,
            snapshot_every,
            max_bundle_mb,
            tls_cert: None,
            tls_key: None,
            insecure_http: false,
        }
    }
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
    /// Make a join token for a new coordinator (needs an admin token): it admits one
    /// coordinator, expires, and can do nothing else.
    JoinToken {
        /// How long it stays valid: like `90s`, `30m`, `1h`, `2d` (at most 7 days).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        expires: Duration,
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
            if tuning.tls_cert.is_some() {
                println!(
                    "  export SOPHON_SERVER=https://{} SOPHON_TOKEN={secret} SOPHON_CA=<the CA of your --tls-cert>",
                    listen.api
                );
            } else {
                println!(
                    "  export SOPHON_SERVER=http://{} SOPHON_TOKEN={secret}",
                    listen.api
                );
            }
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
        CoordinatorCmd::JoinToken { expires, raw } => {
            let c = Client::new(client)?;
            let token = c.send(
                "POST",
                "/v1/cluster/join-tokens",
                Some(serde_json::json!({"expires_in_s": expires.as_secs().max(1)})),
            )?;
            let join = token["join_token"].as_str().unwrap_or_default();
            if raw {
                println!("{join}");
                return Ok(());
            }
            c.print(&token, |v| {
                Table::fields(&[
                    ("join token", cell(&v["join_token"])),
                    (
                        "token id",
                        format!(
                            "{} (single use; revoke it if it is not used)",
                            cell(&v["id"])
                        ),
                    ),
                    ("expires at (ms)", cell(&v["expires_at_ms"])),
                ])
            });
            Ok(())
        }
    }
}

/// A duration like `90s`, `30m`, `1h` or `2d` (a bare number is seconds).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is no duration: write it like 90s, 30m, 1h or 2d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?}: use s, m, h or d"
            ));
        }
    };
    if secs == 0 {
        return Err("the duration must be above zero".into());
    }
    Ok(Duration::from_secs(secs))
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
    if let (Some(cert), Some(key)) = (&tuning.tls_cert, &tuning.tls_key) {
        config.api_tls = Some(server::tls::ApiTls {
            cert: cert.clone(),
            key: key.clone(),
        });
    }
    config.insecure_http = tuning.insecure_http;
    Ok(config)
}

fn serve(
    data: PathBuf,
    api: Option<SocketAddr>,
    mesh: Option<SocketAddr>,
    tuning: &Tuning,
) -> anyhow::Result<()> {
    let config = config(data, api, mesh, tuning)?;
    let scheme = if config.api_tls.is_some() {
        "https"
    } else {
        "http"
    };
    let rt = runtime()?;
    rt.block_on(async move {
        let running = server::start(config).await?;
        println!(
            "Coordinator {} serving the admin API on {scheme}://{} (mesh {})",
            running.core.id, running.api_address, running.mesh_address
        );
        super::dev::shutdown_signal().await;
        running.shutdown().await;
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        for bad in ["", "h", "0s", "1w", "-1h", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
