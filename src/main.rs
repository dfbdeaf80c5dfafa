//! `sophon`: the single binary of the Sophon model serving mesh.
//!
//! `sophon dev` runs an all-in-one node serving the example models; `keygen`, `pack` and
//! `inspect` make and check signed model bundles; `bench` measures the serving path.

mod cli;

use clap::{Parser, Subcommand};

/// Sophon: deploy ML models as signed Wasm bundles and serve them over KServe V2.
#[derive(Parser, Debug)]
#[command(name = "sophon", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    /// Measure the serving path (sandbox cost, HTTP, cold start, memory).
    Bench(cli::bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let log_filter = tracing_subscriber::EnvFilter::try_from_env("SOPHON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(log_filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Dev(args) => cli::dev::run(args),
        Command::Keygen(args) => cli::bundle::keygen(args),
        Command::Pack(args) => cli::bundle::pack(args),
        Command::Inspect(args) => cli::bundle::inspect(args),
        Command::Bench(args) => cli::bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
