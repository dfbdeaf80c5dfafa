//! `sophon top`: a live table of the deployments: rate, errors, p50, p99, replicas ready of
//! wanted, from the nodes' reports as the leader aggregates them.

use std::time::Duration;

use serde_json::Value;

use super::client::{Client, ClientArgs, Table, cell};
use super::coordinator::parse_duration;

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// How often to refresh, like `2s`.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub every: Duration,
    /// Print the table once and exit.
    #[arg(long)]
    pub once: bool,
}

fn ms(v: &Value) -> String {
    v.as_u64()
        .map(|us| format!("{:.2}", us as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

fn table(c: &Client) -> anyhow::Result<Table> {
    let deployments = c.get("/v1/deployments")?;
    let mut t = Table::new(&[
        "deployment",
        "model",
        "environment",
        "ready/wanted",
        "req/s",
        "err/s",
        "p50 ms",
        "p99 ms",
        "queue p99 ms",
    ]);
    for d in deployments.as_array().into_iter().flatten() {
        let id = cell(&d["id"]);
        let s = c.get(&format!("/v1/deployments/{id}/stats"))?;
        t.row(vec![
            id,
            format!("{}@{}", cell(&d["model"]), cell(&d["version"])),
            cell(&d["environment"]),
            format!("{}/{}", cell(&s["ready"]), cell(&s["replicas"])),
            cell(&s["rate_per_s"]),
            cell(&s["error_rate_per_s"]),
            ms(&s["total_us"]["p50"]),
            ms(&s["total_us"]["p99"]),
            ms(&s["queue_us"]["p99"]),
        ]);
    }
    Ok(t)
}

pub fn run(client: &ClientArgs, args: TopArgs) -> anyhow::Result<()> {
    let c = Client::new(client)?;
    loop {
        let t = table(&c)?;
        if args.once {
            println!("{t}");
            return Ok(());
        }
        // Clear the screen and home the cursor, then redraw.
        print!(
            "\x1b[2J\x1b[H{t}\n(refreshing every {:?}; Ctrl-C to stop)\n",
            args.every
        );
        std::thread::sleep(args.every);
    }
}
