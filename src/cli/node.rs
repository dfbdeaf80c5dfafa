//! `sophon node`: mint node join tokens, join and run mesh nodes, and list, show, drain,
//! resume or remove them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use sophon_node::http::HttpConfig;
use sophon_node::mesh::{JoinOptions, MeshNode, NodeFile};
use sophon_node::stats::Metrics;
use sophon_node::{NodeServer, Repository, Runtime, RuntimeConfig, ServingLimits};

use super::client::{Client, ClientArgs, Table, cell};
use super::coordinator::parse_duration;

/// How a node serves (shared by `join --run` and `run`).
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Requests of one model running at once (default: the number of cores).
    #[arg(long, value_parser = above_zero::<usize>)]
    pub concurrency: Option<usize>,
    /// Requests of one model that may wait before new ones get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 64 << 20, value_parser = above_zero::<usize>)]
    pub max_body_bytes: usize,
    /// Bytes of requests (as received, or as decoded where that is more) and of answers waiting
    /// for their clients, the node holds at once before it sheds with 503.
    #[arg(long, default_value_t = 1 << 30, value_parser = above_zero::<usize>)]
    pub max_inflight_bytes: usize,
    /// How long a request's body may take to arrive after its head (408 past it), and how long
    /// a response may wait on a client that reads none of it (the connection is closed).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub body_timeout: std::time::Duration,
    /// How long a connection may take to send a request's head, and stay idle between requests;
    /// past it the connection is closed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub header_timeout: std::time::Duration,
    /// Connections served at once, HTTP and gRPC together; further ones wait until one closes
    /// (default: half the process's limit on open files, at most 10,000).
    #[arg(long, value_parser = above_zero::<usize>)]
    pub max_connections: Option<usize>,
    /// Connections one client (an IPv4 address, an IPv6 /64) may hold at once; past it, its new
    /// ones are refused with the reason (HTTP 503; gRPC RESOURCE_EXHAUSTED, then GOAWAY).
    /// Default: a quarter of `--max-connections`, at least 256 (no cap of its own where that
    /// leaves the others less than a quarter). Behind a proxy that opens many connections,
    /// raise it to `--max-connections` (no cap).
    #[arg(long, value_parser = above_zero::<usize>)]
    pub max_connections_per_client: Option<usize>,
    /// Seconds a shutdown waits for requests in flight before it cancels them.
    #[arg(long, default_value_t = 30)]
    pub drain_secs: u64,
    /// Directory of the AOT component cache (default: ~/.cache/sophon/components).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Threads that serve HTTP and the mesh (default: the number of cores). Model calls move
    /// off them while they run. Fewer threads mean fewer hand-offs per request; on a machine
    /// shared with other processes, fewer than the cores can lower latency.
    #[arg(long, value_parser = above_zero::<usize>)]
    pub workers: Option<usize>,
    /// Address of the V2 gRPC API (`inference.GRPCInferenceService`, and `grpc.health.v1`);
    /// `off` for none. Default 127.0.0.1:8001, skipped with a warning when that port is taken.
    #[arg(long, value_name = "ADDR")]
    pub grpc: Option<String>,
    /// Dynamic batching for a model, over its manifest: MODEL=DELAY_US (the most a request
    /// waits for others, in microseconds), MODEL=DELAY_US/MAX (batches of at most MAX rows),
    /// or MODEL=off. `*` names every model that batches. Repeat for several.
    #[arg(long = "dynamic-batching", value_name = "MODEL=DELAY_US", value_parser = parse_batching)]
    pub dynamic_batching: Vec<(String, Option<sophon_sdk::Batching>)>,
    /// MiB the models placed here may take (weights and the backends' copies); past it the
    /// least recently used are evicted, and loaded again from disk on their next request.
    /// Default: 75 % of the RAM.
    #[arg(long, value_name = "MIB", value_parser = above_zero::<u64>)]
    pub model_memory: Option<u64>,
}

/// A count or size above zero: zero connections, workers, model slots or body bytes would make a
/// node that serves nothing, so it is refused rather than quietly raised.
fn above_zero<T: std::str::FromStr + Default + PartialEq>(text: &str) -> Result<T, String> {
    match text.trim().parse::<T>() {
        Ok(n) if n != T::default() => Ok(n),
        Ok(_) => Err("must be above zero: a node with none serves nothing".into()),
        Err(_) => Err(format!("`{text}` is not a whole number")),
    }
}

impl ServeArgs {
    /// `--model-memory` in bytes, or its default.
    pub fn model_memory(&self) -> Option<u64> {
        self.model_memory
            .map(|mib| mib << 20)
            .or_else(sophon_node::hardware::default_model_memory)
    }
}

/// `MODEL=DELAY_US[/MAX]` or `MODEL=off`.
fn parse_batching(text: &str) -> Result<(String, Option<sophon_sdk::Batching>), String> {
    let (model, how) = text.split_once('=').ok_or_else(|| {
        format!("`{text}`: write MODEL=DELAY_US, MODEL=DELAY_US/MAX or MODEL=off")
    })?;
    if model.is_empty() {
        return Err(format!(
            "`{text}`: the model name is missing (`*` for every model)"
        ));
    }
    if how == "off" {
        return Ok((model.to_string(), None));
    }
    let (delay, max) = match how.split_once('/') {
        Some((d, m)) => (d, Some(m)),
        None => (how, None),
    };
    let delay: u64 = delay
        .trim()
        .parse()
        .ok()
        .filter(|d| *d <= sophon_sdk::manifest::MAX_QUEUE_DELAY_US)
        .ok_or_else(|| format!("`{text}`: `{delay}` is not a delay from 0 to 1000000 µs"))?;
    let max_batch_size = match max {
        None => 0,
        Some(m) => m
            .trim()
            .parse()
            .ok()
            .filter(|m| *m > 0)
            .ok_or_else(|| format!("`{text}`: `{m}` is not a batch size above 0"))?,
    };
    Ok((
        model.to_string(),
        Some(sophon_sdk::Batching {
            max_batch_size,
            preferred_batch_sizes: Vec::new(),
            max_queue_delay_us: delay,
        }),
    ))
}

impl ServeArgs {
    /// Serve gRPC beside HTTP on the node's shared state, in the background; its address.
    pub async fn start_grpc(
        &self,
        state: std::sync::Arc<sophon_node::http::ApiState>,
    ) -> anyhow::Result<Option<std::net::SocketAddr>> {
        let (addr, explicit) = match self.grpc.as_deref() {
            Some("off") => return Ok(None),
            Some(addr) => (addr, true),
            None => ("127.0.0.1:8001", false),
        };
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) if !explicit => {
                tracing::warn!("gRPC not served: {addr}: {e} (pass --grpc ADDR, or --grpc off)");
                return Ok(None);
            }
            Err(e) => return Err(anyhow::anyhow!("gRPC address {addr}: {e}")),
        };
        let local = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(e) = sophon_node::grpc::serve(state, listener, std::future::pending()).await
            {
                tracing::error!("gRPC server stopped: {e:#}");
            }
        });
        Ok(Some(local))
    }

    /// HTTP settings of the node's V2 API.
    pub fn http(&self) -> HttpConfig {
        let max_connections = self
            .max_connections
            .unwrap_or_else(sophon_node::serve::default_max_connections);
        HttpConfig {
            max_body_bytes: self.max_body_bytes,
            max_inflight_bytes: self.max_inflight_bytes,
            body_timeout: self.body_timeout,
            header_timeout: self.header_timeout,
            max_connections,
            max_connections_per_client: self.max_connections_per_client.unwrap_or_else(|| {
                sophon_node::serve::default_max_connections_per_client(max_connections)
            }),
        }
    }
}

/// An empty repository serving with these options (`no_cache`: compile every component), that
/// loads bundles signed by one of `trusted`.
pub fn repository(
    serve: &ServeArgs,
    no_cache: bool,
    trusted: Vec<sophon_sdk::VerifyingKey>,
) -> anyhow::Result<Arc<Repository>> {
    let mut config = RuntimeConfig::default();
    if let Some(dir) = &serve.cache_dir {
        config.cache_dir = Some(dir.clone());
    }
    if no_cache {
        config.cache_dir = None;
    }
    let mut limits = ServingLimits {
        max_queue: serve.max_queue,
        batching: serve.dynamic_batching.iter().cloned().collect(),
        ..ServingLimits::default()
    };
    if let Some(n) = serve.concurrency {
        limits.default_concurrency = n;
    }
    Ok(Arc::new(Repository::new(
        Runtime::new(config)?,
        trusted,
        limits,
        Arc::new(Metrics::new()?),
    )))
}

#[derive(clap::Subcommand, Debug)]
pub enum NodeCmd {
    /// Make a node join token (needs an operator token): it admits `--uses` nodes until it
    /// expires, and can do nothing else.
    JoinToken {
        /// How long it stays valid: like `90s`, `30m`, `1h`, `2d` (at most 7 days).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        expires: Duration,
        /// How many nodes it admits.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Print only the join token (for `$(...)`).
        #[arg(long)]
        raw: bool,
    },
    /// Enroll this machine as a mesh node (the cluster signs `node/<id>`).
    Join {
        /// The token from `sophon node join-token`.
        #[arg(long)]
        join_token: String,
        /// The node's data directory (identity, bundles, last view).
        #[arg(long)]
        data: PathBuf,
        /// The node's id (default: the host name).
        #[arg(long)]
        id: Option<String>,
        /// Where the V2 HTTP API listens.
        #[arg(long, default_value = "127.0.0.1:8000")]
        http: SocketAddr,
        /// Where the mesh (QUIC) endpoint listens.
        #[arg(long, default_value = "127.0.0.1:7500")]
        mesh: SocketAddr,
        /// Where other members reach the mesh endpoint (default: --mesh).
        #[arg(long)]
        advertise: Option<String>,
        /// A label, `key=value` (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// The node's zone (the scheduler spreads replicas across zones).
        #[arg(long, default_value = "default")]
        zone: String,
        /// An environment this node serves (repeatable; none: every environment).
        #[arg(long = "environment")]
        environments: Vec<String>,
        /// Memory offered to replicas, in MiB (default: the machine's memory).
        #[arg(long)]
        memory_mb: Option<u64>,
        /// Run the node right after joining.
        #[arg(long)]
        run: bool,
        #[command(flatten)]
        serve: Box<ServeArgs>,
    },
    /// Run a node that has joined.
    Run {
        /// The node's data directory.
        #[arg(long)]
        data: PathBuf,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// List the nodes.
    List,
    /// Show a node and its replicas.
    Show { id: String },
    /// Move a node's replicas elsewhere and place nothing more on it.
    Drain { id: String },
    /// Place replicas on a drained node again.
    Resume { id: String },
    /// Remove a node from the cluster: its certificate is refused from then on.
    Remove { id: String },
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is no label: write it as key=value"))
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

pub fn run(cmd: NodeCmd, client: &ClientArgs) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::JoinToken { expires, uses, raw } => {
            let c = Client::new(client)?;
            let token = c.send(
                "POST",
                "/v1/nodes/join-tokens",
                Some(json!({"expires_in_s": expires.as_secs().max(1), "uses": uses})),
            )?;
            if raw {
                println!("{}", token["join_token"].as_str().unwrap_or_default());
                return Ok(());
            }
            c.print(&token, |v| {
                Table::fields(&[
                    ("join token", cell(&v["join_token"])),
                    ("token id", cell(&v["id"])),
                    ("uses", cell(&v["uses"])),
                    ("expires at (ms)", cell(&v["expires_at_ms"])),
                ])
            });
            Ok(())
        }
        NodeCmd::Join {
            join_token,
            data,
            id,
            http,
            mesh,
            advertise,
            labels,
            zone,
            environments,
            memory_mb,
            run,
            serve,
        } => {
            let options = JoinOptions {
                join_token,
                data_dir: data.clone(),
                id: id.unwrap_or_else(host_name),
                mesh_listen: mesh,
                mesh_address: advertise,
                http_listen: http,
                http_address: None,
                labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                zone,
                environments,
                memory_mb,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let file = rt.block_on(sophon_node::mesh::join(&options))?;
            drop(rt);
            println!(
                "Joined as node {} (mesh {}, V2 on http://{}); data in {}",
                file.id,
                file.mesh_address,
                file.http_address,
                data.display()
            );
            if run {
                return serve_node(data, *serve);
            }
            println!("Run it with: sophon node run --data {}", data.display());
            Ok(())
        }
        NodeCmd::Run { data, serve } => serve_node(data, serve),
        NodeCmd::List => {
            let c = Client::new(client)?;
            let v = c.get("/v1/nodes")?;
            c.print(&v, |v| {
                let mut t = Table::new(&[
                    "id",
                    "health",
                    "draining",
                    "zone",
                    "environments",
                    "replicas",
                    "mesh",
                    "http",
                    "heard (ms ago)",
                    "inflight",
                ]);
                for n in v["nodes"].as_array().into_iter().flatten() {
                    let envs = n["environments"]
                        .as_array()
                        .filter(|a| !a.is_empty())
                        .map(|a| a.iter().map(cell).collect::<Vec<_>>().join(","))
                        .unwrap_or_else(|| "all".into());
                    t.row(vec![
                        cell(&n["id"]),
                        cell(&n["health"]),
                        cell(&n["draining"]),
                        cell(&n["zone"]),
                        envs,
                        n["assigned"]
                            .as_array()
                            .map(|a| a.len().to_string())
                            .unwrap_or_default(),
                        cell(&n["address"]),
                        cell(&n["http_address"]),
                        cell(&n["live"]["last_heard_ms_ago"]),
                        cell(&n["live"]["load"]["inflight"]),
                    ]);
                }
                t
            });
            Ok(())
        }
        NodeCmd::Show { id } => {
            let c = Client::new(client)?;
            let v = c.get(&format!("/v1/nodes/{id}"))?;
            c.print(&v, |v| {
                let n = &v["node"];
                let mut t = Table::fields(&[
                    ("id", cell(&n["id"])),
                    ("health", cell(&n["health"])),
                    ("draining", cell(&n["draining"])),
                    ("zone", cell(&n["zone"])),
                    ("mesh", cell(&n["address"])),
                    ("http", cell(&n["http_address"])),
                    ("version", cell(&n["version"])),
                    ("cores", cell(&n["inventory"]["cpu_cores"])),
                    ("memory (MiB)", cell(&n["inventory"]["memory_mb"])),
                    ("backends", cell(&n["inventory"]["backends"])),
                    ("gpus", accelerators(&n["inventory"]["gpus"])),
                    ("npus", accelerators(&n["inventory"]["npus"])),
                    ("heard (ms ago)", cell(&v["live"]["last_heard_ms_ago"])),
                ]);
                for r in v["replicas"].as_array().into_iter().flatten() {
                    t.row(vec![
                        format!(
                            "replica {}/{} {}@{}",
                            cell(&r["deployment"]),
                            cell(&r["replica"]),
                            cell(&r["model"]),
                            cell(&r["version"])
                        ),
                        replica_state(r),
                    ]);
                }
                t
            });
            Ok(())
        }
        NodeCmd::Drain { id } => action(
            client,
            &format!("/v1/nodes/{id}/drain"),
            "POST",
            &id,
            "draining",
        ),
        NodeCmd::Resume { id } => action(
            client,
            &format!("/v1/nodes/{id}/resume"),
            "POST",
            &id,
            "resumed",
        ),
        NodeCmd::Remove { id } => {
            action(client, &format!("/v1/nodes/{id}"), "DELETE", &id, "removed")
        }
    }
}

/// `ready`, `failed: <reason>`, ...
pub fn replica_state(r: &Value) -> String {
    let phase = r["phase"].as_str().unwrap_or("pending");
    match r["reason"].as_str() {
        Some(reason) => format!("{phase}: {reason}"),
        None => phase.to_string(),
    }
}

fn action(
    client: &ClientArgs,
    path: &str,
    method: &str,
    id: &str,
    what: &str,
) -> anyhow::Result<()> {
    let c = Client::new(client)?;
    let v = c.send(method, path, None)?;
    c.print(&v, |_| Table::fields(&[("node", format!("{id} {what}"))]));
    Ok(())
}

/// Run a joined node: its repository, the mesh, then the V2 HTTP API.
fn serve_node(data: PathBuf, serve: ServeArgs) -> anyhow::Result<()> {
    sophon_node::hardware::probe_in_background();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = serve.workers {
        anyhow::ensure!(n > 0, "--workers must be at least 1");
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build()?;
    let served = rt.block_on(async move {
        let file = NodeFile::read(&data)?;
        // Trusted publishers come from the cluster, with the view.
        let repo = repository(&serve, false, Vec::new())?;
        let server = NodeServer::bind(file.http_listen, repo.clone(), serve.http())
            .await?
            .with_drain_deadline(Duration::from_secs(serve.drain_secs));
        let mesh = MeshNode::start(&data, repo.clone(), server.app(), serve.model_memory())
            .await
            .context("start the mesh")?;
        let _ = server.state().mesh.set(mesh.router.clone());
        let grpc = serve.start_grpc(server.state().clone()).await?;
        println!(
            "Sophon node {} serving KServe V2 on http://{} (mesh {})",
            mesh.file.id,
            server.local_addr()?,
            mesh.file.mesh_address
        );
        if let Some(grpc) = grpc {
            println!("gRPC: {grpc}");
        }
        for line in sophon_node::hardware::hardware().describe() {
            println!("{line}");
        }
        server.run(super::dev::shutdown_signal()).await
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    served
}

/// A node's GPUs or NPUs, as `model (memory MiB)`, comma-separated; `-` for none.
fn accelerators(list: &serde_json::Value) -> String {
    let shown: Vec<String> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| match d["memory_mb"].as_u64() {
            Some(mb) if mb > 0 => format!("{} ({mb} MiB)", d["model"].as_str().unwrap_or("?")),
            _ => d["model"].as_str().unwrap_or("?").to_string(),
        })
        .collect();
    if shown.is_empty() {
        "-".to_string()
    } else {
        shown.join(", ")
    }
}
