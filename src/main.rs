//! `sophon`: the single binary of the Sophon model serving mesh.
//!
//! `sophon dev` runs an all-in-one coordinator and node serving the example models; `keygen`,
//! `pack` and `inspect` make and check signed model bundles; `coordinator` runs the control
//! plane; `node` joins and runs mesh nodes; `model`, `approval`, `policy`, `deploy`, `cluster`, `token`, `key` and `audit` drive
//! its admin API; `bench` measures the serving path and the control plane.

mod cli;

/// Counts each thread's allocations, so that a node can measure what a model load keeps.
#[global_allocator]
static ALLOCATOR: sophon_node::heap::Counting = sophon_node::heap::Counting;

use clap::{Parser, Subcommand};

/// Sophon: deploy ML models as signed Wasm bundles and serve them over KServe V2.
#[derive(Parser, Debug)]
#[command(name = "sophon", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    client: cli::client::ClientArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the example models (and any bundle given) on 127.0.0.1:8000.
    Dev(cli::dev::DevArgs),
    /// Make a publisher signing key (ed25519).
    Keygen(cli::bundle::KeygenArgs),
    /// Pack a model bundle from a manifest directory, or a plain ONNX file with --onnx.
    Pack(cli::bundle::PackArgs),
    /// Verify a bundle and show what it holds.
    Inspect(cli::bundle::InspectArgs),
    /// One backend's part of `pack`'s check, run in a process of its own.
    #[command(hide = true)]
    CheckBackend(cli::bundle::CheckArgs),
    /// Time one backend on a graph for the node's choice, in a process of its own (the job
    /// comes on stdin).
    #[command(hide = true)]
    MeasureBackend,
    /// Measure the serving path and the control plane (see docs/BENCHMARKS.md).
    Bench(cli::bench::BenchArgs),
    /// Run a coordinator: init a cluster, join one, run, make join tokens.
    #[command(subcommand)]
    Coordinator(cli::coordinator::CoordinatorCmd),
    /// Mesh nodes: join tokens, join, run, list, show, drain, resume, remove.
    #[command(subcommand)]
    Node(cli::node::NodeCmd),
    /// A live table of the deployments: rate, errors, latency, replicas.
    Top(cli::top::TopArgs),
    /// The model shelf: push bundles, list, show, curate.
    #[command(subcommand)]
    Model(cli::admin::ModelCmd),
    /// Approval requests and decisions.
    #[command(subcommand)]
    Approval(cli::admin::ApprovalCmd),
    /// Approval policies per environment.
    #[command(subcommand)]
    Policy(cli::admin::PolicyCmd),
    /// Deployments: create, list, show, scale, delete.
    #[command(subcommand)]
    Deploy(cli::admin::DeployCmd),
    /// Cluster status and members.
    #[command(subcommand)]
    Cluster(cli::admin::ClusterCmd),
    /// API tokens.
    #[command(subcommand)]
    Token(cli::admin::TokenCmd),
    /// Trusted publisher keys.
    #[command(subcommand)]
    Key(cli::admin::KeyCmd),
    /// The audit log.
    Audit(cli::admin::AuditArgs),
}

fn main() -> std::process::ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    let log_filter =
        tracing_subscriber::EnvFilter::try_from_env("SOPHON_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,raft=warn,openvino_finder=warn")
        });
    tracing_subscriber::fmt()
        .with_env_filter(log_filter)
        .with_writer(std::io::stderr)
        .init();
    // The node times backends for its choice in children of this program, which a backend
    // that kills its process cannot take down.
    if let Ok(exe) = std::env::current_exe() {
        sophon_node::backend::choose::measure_in_children(exe, vec!["measure-backend".into()]);
    }
    let result = match cli.command {
        Command::Dev(args) => cli::dev::run(args),
        Command::Keygen(args) => cli::bundle::keygen(args),
        Command::Pack(args) => cli::bundle::pack(args),
        Command::Inspect(args) => cli::bundle::inspect(args),
        Command::CheckBackend(args) => cli::bundle::check_backend(args),
        Command::MeasureBackend => sophon_node::backend::choose::measure_child(),
        Command::Bench(args) => cli::bench::run(args),
        Command::Coordinator(cmd) => cli::coordinator::run(cmd, &cli.client),
        Command::Node(cmd) => cli::node::run(cmd, &cli.client),
        Command::Top(args) => cli::top::run(&cli.client, args),
        Command::Model(cmd) => cli::admin::model(&cli.client, cmd),
        Command::Approval(cmd) => cli::admin::approval(&cli.client, cmd),
        Command::Policy(cmd) => cli::admin::policy(&cli.client, cmd),
        Command::Deploy(cmd) => cli::admin::deploy(&cli.client, cmd),
        Command::Cluster(cmd) => cli::admin::cluster(&cli.client, cmd),
        Command::Token(cmd) => cli::admin::token(&cli.client, cmd),
        Command::Key(cmd) => cli::admin::key(&cli.client, cmd),
        Command::Audit(args) => cli::admin::audit(&cli.client, args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A reader that stops early (`sophon inspect b.sbundle | head -1`) closes the pipe, and the next
/// print panics (Rust ignores SIGPIPE). Exit quietly then, with the status a process killed by
/// SIGPIPE has (141), as other command-line tools do.
fn quiet_on_closed_stdout() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
}
