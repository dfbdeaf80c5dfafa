//! The admin commands: `model`, `approval`, `policy`, `deploy`, `cluster`, `token`, `key`,
//! `audit`. Each is one or two admin API calls; tables by default, `--json` for scripts.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::{Value, json};

use super::client::{Client, ClientArgs, Table, cell, time};

#[derive(Subcommand, Debug)]
pub enum ModelCmd {
    /// Push a signed bundle: verified, stored on a quorum of coordinators, put on the shelf.
    Push { bundle: PathBuf },
    /// Fetch a bundle by digest from any coordinator, verify it and write it to a file.
    Pull {
        digest: String,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// List the shelf.
    List,
    /// Show a model, or one version (`MODEL VERSION`).
    Show {
        model: String,
        version: Option<String>,
    },
    /// Put a version back on the shelf.
    Shelve { model: String, version: String },
    /// Take a version off the shelf.
    Unshelve { model: String, version: String },
    /// Mark a version deprecated.
    Deprecate { model: String, version: String },
    /// Point a tag at a version.
    Tag {
        model: String,
        version: String,
        tag: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ApprovalCmd {
    /// Ask for approval of a version in an environment.
    Request {
        model: String,
        version: String,
        environment: String,
    },
    /// List requests.
    List {
        /// open, approved, rejected or withdrawn.
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one request with its decisions.
    Show { id: u64 },
    /// Approve a request.
    Approve {
        id: u64,
        #[arg(long, short, default_value = "")]
        comment: String,
    },
    /// Reject a request.
    Reject {
        id: u64,
        #[arg(long, short, default_value = "")]
        comment: String,
    },
    /// Withdraw your own request.
    Withdraw { id: u64 },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Set how many approvals an environment needs, and from which role.
    Set {
        environment: String,
        #[arg(long)]
        required: u32,
        #[arg(long, default_value = "approver")]
        role: String,
    },
    /// Show the policies (or one).
    Show { environment: Option<String> },
}

/// Autoscaling bounds (`deploy autoscale`, and `deploy create` with --max-replicas).
#[derive(clap::Args, Debug)]
pub struct Bounds {
    /// The fewest replicas (0: scale to zero when idle; default 1).
    #[arg(long)]
    min_replicas: Option<u32>,
    #[arg(long)]
    max_replicas: Option<u32>,
    /// Requests in flight per replica to aim at.
    #[arg(long, default_value_t = 1.0)]
    target_concurrency: f64,
    /// The average that sizes it in steady state.
    #[arg(long, default_value = "60s", value_parser = super::coordinator::parse_duration)]
    stable_window: std::time::Duration,
    /// The short average that scales up at once in a burst.
    #[arg(long, default_value = "6s", value_parser = super::coordinator::parse_duration)]
    panic_window: std::time::Duration,
    /// With --min-replicas 0: idle time before going to zero (default 5m).
    #[arg(long, value_parser = super::coordinator::parse_duration)]
    scale_to_zero_after: Option<std::time::Duration>,
}

impl Bounds {
    /// The body of `PUT /v1/deployments/{id}/autoscale`; `None` without --max-replicas.
    fn body(&self) -> anyhow::Result<Option<Value>> {
        let Some(max) = self.max_replicas else {
            if self.min_replicas.is_some() {
                anyhow::bail!("--min-replicas needs --max-replicas");
            }
            return Ok(None);
        };
        Ok(Some(json!({
            "min_replicas": self.min_replicas.unwrap_or(1), "max_replicas": max,
            "target_concurrency": self.target_concurrency,
            "stable_window_ms": self.stable_window.as_millis() as u64,
            "panic_window_ms": self.panic_window.as_millis() as u64,
            "scale_to_zero_after_ms": self.scale_to_zero_after.map(|d| d.as_millis() as u64),
        })))
    }
}

#[derive(Subcommand, Debug)]
pub enum DeployCmd {
    /// Deploy a version to an environment.
    Create {
        model: String,
        version: String,
        environment: String,
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// Devices, best first (cpu,gpu,npu); default: the manifest's.
        #[arg(long, value_delimiter = ',')]
        hardware: Vec<String>,
        /// Show progress until every replica is ready; fail with the nodes' reasons if it
        /// cannot be placed, or after `--timeout`.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits, like `90s` or `5m`.
        #[arg(long, default_value = "5m", value_parser = super::coordinator::parse_duration)]
        timeout: std::time::Duration,
        /// Nodes load it at once and evict it last (default: cold, loaded on its first
        /// request and evicted first).
        #[arg(long)]
        hot: bool,
        /// Autoscale it from the start (with --max-replicas; see `deploy autoscale`).
        #[command(flatten)]
        bounds: Bounds,
    },
    /// Mark a deployment hot (loaded at once on its nodes, evicted last) or, with --off, cold.
    Hot {
        id: u64,
        #[arg(long)]
        off: bool,
    },
    List,
    Show {
        id: u64,
    },
    Scale {
        id: u64,
        replicas: u32,
        /// Show progress until every replica is ready (as `create --wait`).
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits, like `90s` or `5m`.
        #[arg(long, default_value = "5m", value_parser = super::coordinator::parse_duration)]
        timeout: std::time::Duration,
    },
    Delete {
        id: u64,
    },
    /// Rolling update to another version: new replicas first, each ready before an old one
    /// goes, so requests never fail. Refused unless the version is approved where the
    /// environment's policy requires it.
    Update {
        id: u64,
        #[arg(long)]
        version: String,
        /// Replicas added beyond the replica count at once (default: a quarter, at least 1).
        #[arg(long)]
        max_surge: Option<u32>,
        /// Show progress until the update completes; fail if it is rolled back.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits, like `90s` or `5m`.
        #[arg(long, default_value = "5m", value_parser = super::coordinator::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Try a version on a share of the traffic, step by step. At each step the coordinators
    /// compare its performance with the SLO and with the serving revision, then move it on,
    /// promote it or roll it back on their own.
    Canary {
        id: u64,
        #[arg(long)]
        version: String,
        /// Traffic weights in percent, rising.
        #[arg(long, default_value = "5,25,50,100", value_delimiter = ',')]
        steps: Vec<u32>,
        /// How long each step runs before it is judged, like `30s` or `5m`.
        #[arg(long, default_value = "30s", value_parser = super::coordinator::parse_duration)]
        interval: std::time::Duration,
        /// Objectives the canary must meet, like `p99<50ms,p50<10ms,errors<1%`.
        #[arg(long, default_value = "errors<1%")]
        slo: String,
        /// Send the canary a copy of each step's share of requests, and drop its answers
        /// (a shadow); clients move to it only once it is promoted.
        #[arg(long)]
        mirror: bool,
        /// The fewest canary requests a step needs to be judged.
        #[arg(long, default_value_t = 20)]
        min_requests: u64,
        /// How many times slower than the serving revision its median latency may be.
        #[arg(long, default_value_t = 2.0)]
        max_slowdown: f64,
        /// Show each step until the canary is promoted (and rolled out) or rolled back; fail
        /// if it is rolled back.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits.
        #[arg(long, default_value = "30m", value_parser = super::coordinator::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Let the coordinators size the deployment from the concurrency its nodes measure
    /// (Knative's KPA): between --min-replicas and --max-replicas, aiming at
    /// --target-concurrency requests in flight per replica. With --min-replicas 0 it goes to
    /// zero after --scale-to-zero-after without a request, and a request activates it again.
    Autoscale {
        id: u64,
        #[command(flatten)]
        bounds: Bounds,
        /// Stop autoscaling (the replica count stays where it is).
        #[arg(long, conflicts_with_all = ["min_replicas", "max_replicas"])]
        off: bool,
    },
    /// Promote a running canary now, skipping its remaining steps.
    Promote {
        id: u64,
    },
    /// The deployment's revisions: which version each ran, who made it, and how it ended.
    History {
        id: u64,
    },
    /// Abandon a running update, or roll out an earlier revision's version again (a rolling
    /// update too; default: the revision that served before the current one).
    Rollback {
        id: u64,
        #[arg(long)]
        to: Option<u32>,
        /// Show progress until the rollback completes.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits, like `90s` or `5m`.
        #[arg(long, default_value = "5m", value_parser = super::coordinator::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Raft status of the coordinator you talk to, and the cluster's counts.
    Status,
    /// Coordinators and nodes.
    Members,
    /// Let the scheduler promise each node this percent of its host memory (default 100).
    /// Above 100, nodes hold more models than fit at once and evict the least recently used
    /// (see `--model-memory`).
    Overcommit { percent: u32 },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token (its secret is printed once).
    Create {
        #[arg(long)]
        name: String,
        /// viewer, publisher, approver, operator or admin.
        #[arg(long)]
        role: String,
    },
    /// Revoke a token by id.
    Revoke { id: String },
    /// List tokens (never their secrets).
    List,
}

#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// Trust a publisher key: a `.pub` file from `sophon keygen`, or 64 hex digits.
    Trust {
        key: String,
        #[arg(long)]
        name: String,
    },
    /// Stop trusting a key.
    Distrust {
        key: String,
    },
    List,
}

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// First record (sequence number).
    #[arg(long, default_value_t = 0)]
    from: u64,
    #[arg(long, default_value_t = 100)]
    limit: u64,
}

fn done(client: &Client, value: &Value, what: &str) {
    client.print(value, |v| {
        let mut t = Table::fields(&[("done", what.to_string())]);
        if let Some(seq) = v.get("audit_seq").filter(|s| !s.is_null()) {
            t.row(vec!["audit record".into(), cell(seq)]);
        }
        if let Some(created) = v.get("created").and_then(|c| c.as_object()) {
            for (k, id) in created {
                t.row(vec![k.replace('_', " "), cell(id)]);
            }
        }
        t
    });
}

pub fn model(args: &ClientArgs, cmd: ModelCmd) -> anyhow::Result<()> {
    let c = Client::new(args)?;
    match cmd {
        ModelCmd::Push { bundle } => {
            let file = std::fs::File::open(&bundle)
                .with_context(|| format!("opening {}", bundle.display()))?;
            let len = file.metadata()?.len();
            let bar = indicatif::ProgressBar::new(len);
            if c.json {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message("pushing");
            let reader = bar.wrap_read(file);
            let result = c.upload("/v1/bundles", reader, len);
            bar.finish_and_clear();
            let v = result?;
            c.print(&v, |v| {
                Table::fields(&[
                    ("model", cell(&v["model"])),
                    ("version", cell(&v["version"])),
                    ("digest", cell(&v["digest"])),
                    ("publisher key", cell(&v["publisher_key"])),
                    ("size", format!("{} bytes", cell(&v["size"]))),
                ])
            });
        }
        ModelCmd::Pull { digest, out } => {
            let bytes = c.get_bytes(&format!("/v1/bundles/{digest}"))?;
            let bundle = sophon_sdk::Bundle::read(&bytes)
                .with_context(|| format!("the bundle served for {digest} does not verify"))?;
            anyhow::ensure!(
                bundle.digest_hex() == digest,
                "the coordinator served bundle {} for {digest}",
                bundle.digest_hex()
            );
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            let v = json!({"digest": digest, "model": bundle.manifest.model.name,
                           "version": bundle.manifest.model.version, "file": out.display().to_string(),
                           "size": bytes.len()});
            c.print(&v, |v| {
                Table::fields(&[
                    ("model", cell(&v["model"])),
                    ("version", cell(&v["version"])),
                    ("file", cell(&v["file"])),
                    ("size", format!("{} bytes (verified)", cell(&v["size"]))),
                ])
            });
        }
        ModelCmd::List => {
            let v = c.get("/v1/models")?;
            c.print(&v, |v| {
                let mut t = Table::new(&[
                    "model", "version", "digest", "shelf", "stages", "tags", "created",
                ]);
                for m in v.as_array().into_iter().flatten() {
                    for (_, ver) in m["versions"].as_object().into_iter().flatten() {
                        t.row(version_row(&m["name"], ver));
                    }
                }
                t
            });
        }
        ModelCmd::Show { model, version } => match version {
            Some(version) => {
                let v = c.get(&format!("/v1/models/{model}/versions/{version}"))?;
                c.print(&v, |v| {
                    Table::fields(&[
                        ("version", cell(&v["version"])),
                        ("digest", cell(&v["digest"])),
                        ("publisher key", cell(&v["publisher_key"])),
                        (
                            "created",
                            format!(
                                "{} by {}",
                                time(&v["created_at_ms"]),
                                cell(&v["created_by"])
                            ),
                        ),
                        ("on shelf", cell(&v["on_shelf"])),
                        ("deprecated", cell(&v["deprecated"])),
                        ("stages", stages(&v["stages"])),
                        (
                            "memory",
                            match v["measured"]["memory_mb"].as_u64() {
                                Some(mb) => format!(
                                    "{mb} MiB, measured on node {} (manifest: {} MiB)",
                                    cell(&v["measured"]["node"]),
                                    cell(&v["manifest"]["memory_mb"])
                                ),
                                None => format!(
                                    "{} MiB (manifest; not measured yet)",
                                    cell(&v["manifest"]["memory_mb"])
                                ),
                            },
                        ),
                        ("hardware", cell(&v["manifest"]["preferred"])),
                        ("inputs", tensors(&v["manifest"]["inputs"])),
                        ("outputs", tensors(&v["manifest"]["outputs"])),
                    ])
                });
            }
            None => {
                let v = c.get(&format!("/v1/models/{model}"))?;
                c.print(&v, |v| {
                    let mut t = Table::new(&[
                        "model", "version", "digest", "shelf", "stages", "tags", "created",
                    ]);
                    for (_, ver) in v["versions"].as_object().into_iter().flatten() {
                        t.row(version_row(&v["name"], ver));
                    }
                    t
                });
            }
        },
        ModelCmd::Shelve { model, version } => curate(&c, &model, &version, "shelve", None)?,
        ModelCmd::Unshelve { model, version } => curate(&c, &model, &version, "unshelve", None)?,
        ModelCmd::Deprecate { model, version } => curate(&c, &model, &version, "deprecate", None)?,
        ModelCmd::Tag {
            model,
            version,
            tag,
        } => curate(&c, &model, &version, "tag", Some(json!({"tag": tag})))?,
    }
    Ok(())
}

fn curate(
    c: &Client,
    model: &str,
    version: &str,
    action: &str,
    body: Option<Value>,
) -> anyhow::Result<()> {
    let v = c.send(
        "POST",
        &format!("/v1/models/{model}/versions/{version}/{action}"),
        body,
    )?;
    done(c, &v, &format!("{action} {model}@{version}"));
    Ok(())
}

fn version_row(model: &Value, v: &Value) -> Vec<String> {
    let shelf = if v["deprecated"].as_bool() == Some(true) {
        "deprecated"
    } else if v["on_shelf"].as_bool() == Some(true) {
        "on"
    } else {
        "off"
    };
    let digest = cell(&v["digest"]);
    vec![
        cell(model),
        cell(&v["version"]),
        digest.chars().take(12).collect(),
        shelf.into(),
        stages(&v["stages"]),
        cell(&v["tags"]),
        time(&v["created_at_ms"]),
    ]
}

fn stages(v: &Value) -> String {
    let parts: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .map(|(env, stage)| {
            let name = stage
                .as_object()
                .and_then(|o| o.keys().next().cloned())
                .unwrap_or_default();
            format!("{env}:{name}")
        })
        .collect();
    if parts.is_empty() {
        "draft".into()
    } else {
        parts.join(",")
    }
}

fn tensors(v: &Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            format!(
                "{} {} {}",
                cell(&t["name"]),
                cell(&t["datatype"]),
                t["shape"]
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn approval(args: &ClientArgs, cmd: ApprovalCmd) -> anyhow::Result<()> {
    let c = Client::new(args)?;
    let decide = |id: u64, action: &str, body: Option<Value>| -> anyhow::Result<()> {
        let v = c.send("POST", &format!("/v1/approvals/{id}/{action}"), body)?;
        done(&c, &v, &format!("{action} request {id}"));
        Ok(())
    };
    match cmd {
        ApprovalCmd::Request {
            model,
            version,
            environment,
        } => {
            let v = c.send(
                "POST",
                "/v1/approvals",
                Some(json!({"model": model, "version": version, "environment": environment})),
            )?;
            done(
                &c,
                &v,
                &format!("asked to approve {model}@{version} for {environment}"),
            );
        }
        ApprovalCmd::List { status } => {
            let path = match status {
                Some(s) => format!("/v1/approvals?status={s}"),
                None => "/v1/approvals".into(),
            };
            let v = c.get(&path)?;
            c.print(&v, |v| {
                let mut t = Table::new(&[
                    "id",
                    "model",
                    "environment",
                    "status",
                    "approvals",
                    "submitter",
                    "created",
                ]);
                for r in v.as_array().into_iter().flatten() {
                    t.row(request_row(r));
                }
                t
            });
        }
        ApprovalCmd::Show { id } => {
            let v = c.get(&format!("/v1/approvals/{id}"))?;
            c.print(&v, |v| {
                let mut t = Table::new(&[
                    "id",
                    "model",
                    "environment",
                    "status",
                    "approvals",
                    "submitter",
                    "created",
                ]);
                t.row(request_row(v));
                let mut out = t.to_string();
                let mut d = Table::new(&["approver", "role", "decision", "at", "comment"]);
                for dec in v["decisions"].as_array().into_iter().flatten() {
                    let what = if dec["approve"].as_bool() == Some(true) {
                        "approve"
                    } else {
                        "reject"
                    };
                    d.row(vec![
                        cell(&dec["approver"]),
                        cell(&dec["role"]),
                        what.into(),
                        time(&dec["at_ms"]),
                        cell(&dec["comment"]),
                    ]);
                }
                out.push('\n');
                out.push_str(&d.to_string());
                let mut t = Table::new(&[""]);
                t.row(vec![out]);
                t
            });
        }
        ApprovalCmd::Approve { id, comment } => {
            decide(id, "approve", Some(json!({"comment": comment})))?
        }
        ApprovalCmd::Reject { id, comment } => {
            decide(id, "reject", Some(json!({"comment": comment})))?
        }
        ApprovalCmd::Withdraw { id } => decide(id, "withdraw", None)?,
    }
    Ok(())
}

fn request_row(r: &Value) -> Vec<String> {
    let approvals = r["decisions"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter(|x| x["approve"].as_bool() == Some(true))
                .count()
        })
        .unwrap_or(0);
    vec![
        cell(&r["id"]),
        format!("{}@{}", cell(&r["model"]), cell(&r["version"])),
        cell(&r["environment"]),
        cell(&r["status"]),
        format!("{approvals}/{}", cell(&r["required_approvals"])),
        cell(&r["submitter"]),
        time(&r["created_at_ms"]),
    ]
}

pub fn policy(args: &ClientArgs, cmd: PolicyCmd) -> anyhow::Result<()> {
    let c = Client::new(args)?;
    match cmd {
        PolicyCmd::Set {
            environment,
            required,
            role,
        } => {
            let v = c.send(
                "PUT",
                &format!("/v1/policies/{environment}"),
                Some(json!({"required_approvals": required, "approver_role": role})),
            )?;
            done(
                &c,
                &v,
                &format!("{environment} needs {required} approval(s) from {role}"),
            );
        }
        PolicyCmd::Show { environment } => {
            let v = match &environment {
                Some(e) => json!([c.get(&format!("/v1/policies/{e}"))?]),
                None => c.get("/v1/policies")?,
            };
            let v = if environment.is_some() && c.json {
                v[0].clone()
            } else {
                v
            };
            c.print(&v, |v| {
                let mut t = Table::new(&[
                    "environment",
                    "required",
                    "approver role",
                    "set by",
                    "set at",
                ]);
                for p in v.as_array().into_iter().flatten() {
                    t.row(vec![
                        cell(&p["environment"]),
                        cell(&p["required_approvals"]),
                        cell(&p["approver_role"]),
                        cell(&p["set_by"]),
                        time(&p["set_at_ms"]),
                    ]);
                }
                t
            });
        }
    }
    Ok(())
}

pub fn deploy(args: &ClientArgs, cmd: DeployCmd) -> anyhow::Result<()> {
    let c = Client::new(args)?;
    let row = |d: &Value| {
        vec![
            cell(&d["id"]),
            match d["update"]["version"].as_str() {
                Some(to) => format!("{}@{} → {to}", cell(&d["model"]), cell(&d["version"])),
                None => format!("{}@{}", cell(&d["model"]), cell(&d["version"])),
            },
            cell(&d["environment"]),
            cell(&d["replicas"]),
            cell(&d["rollout"]["state"]),
            format!(
                "{}/{}/{}",
                cell(&d["rollout"]["placed"]),
                cell(&d["rollout"]["ready"]),
                cell(&d["rollout"]["unplaced"])
            ),
            cell(&d["hardware"]),
        ]
    };
    let headers = [
        "id",
        "model",
        "environment",
        "replicas",
        "rollout",
        "placed/ready/unplaced",
        "hardware",
    ];
    match cmd {
        DeployCmd::Create {
            model,
            version,
            environment,
            replicas,
            hardware,
            wait,
            timeout,
            hot,
            bounds,
        } => {
            let hw = if hardware.is_empty() {
                Value::Null
            } else {
                json!(hardware)
            };
            let v = c.send(
                "POST",
                "/v1/deployments",
                Some(
                    json!({"model": model, "version": version, "environment": environment,
                            "replicas": replicas, "hardware": hw, "hot": hot,
                            "autoscale": bounds.body()?}),
                ),
            )?;
            done(
                &c,
                &v,
                &format!("deployed {model}@{version} to {environment}"),
            );
            if wait && let Some(id) = v["created"]["deployment"].as_u64() {
                wait_ready(&c, id, timeout)?;
            }
        }
        DeployCmd::List => {
            let v = c.get("/v1/deployments")?;
            c.print(&v, |v| {
                let mut t = Table::new(&headers);
                for d in v.as_array().into_iter().flatten() {
                    t.row(row(d));
                }
                t
            });
        }
        DeployCmd::Show { id } => {
            let v = c.get(&format!("/v1/deployments/{id}"))?;
            c.print(&v, |v| {
                let mut t = Table::new(&headers);
                t.row(row(&v["deployment"]));
                let mut p = Table::new(&["revision", "replica", "node", "device", "state"]);
                for pl in v["placements"].as_array().into_iter().flatten() {
                    p.row(vec![
                        cell(&pl["revision"]),
                        cell(&pl["replica"]),
                        cell(&pl["node"]),
                        cell(&pl["device"]),
                        super::node::replica_state(pl),
                    ]);
                }
                for (node, reason) in v["deployment"]["failed_on"]
                    .as_object()
                    .into_iter()
                    .flatten()
                {
                    p.row(vec![
                        "-".into(),
                        "-".into(),
                        node.clone(),
                        "-".into(),
                        format!("failed earlier: {}", cell(reason)),
                    ]);
                }
                let mut out = Table::new(&[""]);
                out.row(vec![format!("{t}\n{p}{}", canary_lines(&v["deployment"]))]);
                out
            });
        }
        DeployCmd::Scale {
            id,
            replicas,
            wait,
            timeout,
        } => {
            let v = c.send(
                "POST",
                &format!("/v1/deployments/{id}/scale"),
                Some(json!({"replicas": replicas})),
            )?;
            done(&c, &v, &format!("deployment {id} scaled to {replicas}"));
            if wait {
                wait_ready(&c, id, timeout)?;
            }
        }
        DeployCmd::Delete { id } => {
            let v = c.send("DELETE", &format!("/v1/deployments/{id}"), None)?;
            done(&c, &v, &format!("deployment {id} deleted"));
        }
        DeployCmd::Update {
            id,
            version,
            max_surge,
            wait,
            timeout,
        } => {
            let v = c.send(
                "POST",
                &format!("/v1/deployments/{id}/update"),
                Some(json!({"version": version, "max_surge": max_surge})),
            )?;
            done(&c, &v, &format!("deployment {id}: rolling out {version}"));
            if wait {
                wait_update(&c, id, timeout)?;
            }
        }
        DeployCmd::Rollback {
            id,
            to,
            wait,
            timeout,
        } => {
            let body = to.map(|to| json!({"to": to}));
            let v = c.send("POST", &format!("/v1/deployments/{id}/rollback"), body)?;
            done(&c, &v, &format!("deployment {id}: rolling back"));
            if wait {
                wait_update(&c, id, timeout)?;
            }
        }
        DeployCmd::Canary {
            id,
            version,
            steps,
            interval,
            slo,
            mirror,
            min_requests,
            max_slowdown,
            wait,
            timeout,
        } => {
            let v = c.send(
                "POST",
                &format!("/v1/deployments/{id}/canary"),
                Some(json!({
                    "version": version, "steps": steps,
                    "interval_ms": interval.as_millis() as u64, "slo": slo, "mirror": mirror,
                    "min_requests": min_requests, "max_slowdown": max_slowdown,
                })),
            )?;
            done(&c, &v, &format!("deployment {id}: canary of {version}"));
            if wait {
                wait_update(&c, id, timeout)?;
            }
        }
        DeployCmd::Autoscale { id, bounds, off } => {
            let path = format!("/v1/deployments/{id}/autoscale");
            if off {
                let v = c.send("DELETE", &path, None)?;
                done(&c, &v, &format!("deployment {id}: autoscaling off"));
            } else {
                if bounds.min_replicas.is_none() || bounds.max_replicas.is_none() {
                    anyhow::bail!("give --min-replicas and --max-replicas, or --off");
                }
                let v = c.send("PUT", &path, bounds.body()?)?;
                done(&c, &v, &format!("deployment {id}: autoscaled"));
            }
        }
        DeployCmd::Hot { id, off } => {
            let path = format!("/v1/deployments/{id}/hot");
            let v = c.send(if off { "DELETE" } else { "PUT" }, &path, None)?;
            let what = if off { "cold" } else { "hot" };
            done(&c, &v, &format!("deployment {id}: {what}"));
        }
        DeployCmd::Promote { id } => {
            let v = c.send("POST", &format!("/v1/deployments/{id}/promote"), None)?;
            done(&c, &v, &format!("deployment {id}: canary promoted"));
        }
        DeployCmd::History { id } => {
            let v = c.get(&format!("/v1/deployments/{id}/history"))?;
            c.print(&v, |v| {
                let mut t = Table::new(&[
                    "revision", "version", "status", "cause", "by", "at", "reason",
                ]);
                for r in v["history"].as_array().into_iter().flatten() {
                    t.row(vec![
                        cell(&r["revision"]),
                        cell(&r["version"]),
                        cell(&r["status"]),
                        cell(&r["cause"]),
                        cell(&r["created_by"]),
                        super::client::time(&r["created_at_ms"]),
                        cell(&r["reason"]),
                    ]);
                }
                t
            });
        }
    }
    Ok(())
}

/// `deploy show`'s lines below the table: hot or cold, autoscaling, the running canary's
/// step, and the decisions on the newest revision that had any, with the figures behind each.
fn canary_lines(d: &Value) -> String {
    let mut out = String::new();
    if d["hot"] == true {
        out.push_str(
            "
hot: its nodes load it at once and evict it last
",
        );
    } else {
        out.push_str(
            "
cold: its nodes load it on its first request and evict it first
",
        );
    }
    let a = &d["autoscale"];
    if let Some(min) = a["min_replicas"].as_u64() {
        out.push_str(&format!(
            "\nautoscale: {min}..{} replicas, target {} in flight per replica, windows {} s (stable) / {} s (panic){}\n",
            cell(&a["max_replicas"]),
            a["target_concurrency_milli"].as_u64().unwrap_or(0) as f64 / 1000.0,
            a["stable_window_ms"].as_u64().unwrap_or(0) / 1000,
            a["panic_window_ms"].as_u64().unwrap_or(0) / 1000,
            if min == 0 {
                format!(
                    ", to zero after {} s idle",
                    a["scale_to_zero_after_ms"].as_u64().unwrap_or(300_000) / 1000
                )
            } else {
                String::new()
            }
        ));
    }
    let canary = &d["update"]["canary"];
    if let Some(step) = canary["step"].as_u64() {
        let steps: Vec<String> = canary["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| format!("{}%", cell(s)))
            .collect();
        out.push_str(&format!(
            "\ncanary: revision {} ({}) at step {}/{} ({}){}, steps {}, every {} s, SLO min {} requests, median at most {}× the serving one\n",
            cell(&d["update"]["revision"]),
            cell(&d["update"]["version"]),
            step + 1,
            steps.len(),
            steps.get(step as usize).cloned().unwrap_or_default(),
            if canary["mirror"] == json!(true) { ", mirrored" } else { "" },
            steps.join(" → "),
            canary["interval_ms"].as_u64().unwrap_or(0) / 1000,
            cell(&canary["min_requests"]),
            canary["max_slowdown_pct"].as_u64().unwrap_or(200) as f64 / 100.0,
        ));
        out.push_str(&format!("  objectives: {}\n", slo_text(&canary["slo"])));
    }
    let judged = d["history"]
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .find(|r| r["decisions"].as_array().is_some_and(|a| !a.is_empty()));
    if let Some(r) = judged {
        let mut t = Table::new(&[
            "at", "step", "weight", "verdict", "by", "canary", "serving", "reason",
        ]);
        for x in r["decisions"].as_array().into_iter().flatten() {
            t.row(vec![
                super::client::time(&x["at_ms"]),
                (x["step"].as_u64().unwrap_or(0) + 1).to_string(),
                format!("{}%", cell(&x["weight"])),
                cell(&x["verdict"]),
                cell(&x["by"]),
                figures_text(&x["canary"]),
                figures_text(&x["stable"]),
                cell(&x["reason"]),
            ]);
        }
        out.push_str(&format!(
            "\ncanary decisions on revision {} ({}, {}):\n{t}",
            cell(&r["revision"]),
            cell(&r["version"]),
            cell(&r["status"])
        ));
    }
    out
}

fn slo_text(slo: &Value) -> String {
    let mut parts = Vec::new();
    for (key, name) in [("p50_us", "p50"), ("p99_us", "p99")] {
        if let Some(us) = slo[key].as_u64() {
            parts.push(format!("{name} < {:.1} ms", us as f64 / 1000.0));
        }
    }
    if let Some(bp) = slo["errors_bp"].as_u64() {
        parts.push(format!("errors < {}%", bp as f64 / 100.0));
    }
    parts.join(", ")
}

/// `412 req, 0.2% err, p50 1.1 ms, p99 3.0 ms`.
fn figures_text(f: &Value) -> String {
    let requests = f["requests"].as_u64().unwrap_or(0);
    if requests == 0 {
        return "-".into();
    }
    let errors = f["errors"].as_u64().unwrap_or(0);
    let ms = |k: &str| {
        f[k].as_u64()
            .map_or("-".into(), |us| format!("{:.1} ms", us as f64 / 1000.0))
    };
    format!(
        "{requests} req, {:.1}% err, p50 {}, p99 {}",
        errors as f64 * 100.0 / requests as f64,
        ms("p50_us"),
        ms("p99_us")
    )
}

/// Print a rolling update's progress until it ends: Ok once its revision serves, an error
/// if it was rolled back (with the reason) or time runs out.
fn wait_update(c: &Client, id: u64, timeout: std::time::Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    let started = c.get(&format!("/v1/deployments/{id}/history"))?;
    let Some(revision) = started["update"]["revision"].as_u64() else {
        // Nothing rolling (an abandoned update): the serving revision never stopped.
        return wait_ready(c, id, timeout);
    };
    let mut last = String::new();
    loop {
        let v = c.get(&format!("/v1/deployments/{id}"))?;
        let d = &v["deployment"];
        let count = |rev: u64| {
            let of = |p: &&Value| p["revision"].as_u64() == Some(rev);
            let all = v["placements"].as_array().into_iter().flatten();
            let ready = all
                .clone()
                .filter(of)
                .filter(|p| p["ready"] == json!(true))
                .count();
            (all.filter(of).count(), ready)
        };
        let (new_placed, new_ready) = count(revision);
        let mut line = format!(
            "deployment {id}: revision {revision} {new_ready}/{} ready ({new_placed} placed)",
            cell(&d["replicas"])
        );
        let canary = &d["update"]["canary"];
        if let Some(step) = canary["step"].as_u64() {
            let steps = canary["steps"].as_array().map_or(0, Vec::len);
            let weight = &canary["steps"][step as usize];
            line.push_str(&format!(
                "; canary step {}/{steps} at {}%{}",
                step + 1,
                cell(weight),
                if canary["mirror"] == json!(true) {
                    " (mirrored)"
                } else {
                    ""
                }
            ));
        }
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        if d["revision"].as_u64() == Some(revision) {
            return Ok(());
        }
        if d["update"]["revision"].as_u64() != Some(revision) {
            let h = c.get(&format!("/v1/deployments/{id}/history"))?;
            let reason = h["history"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["revision"].as_u64() == Some(revision))
                .map(|r| cell(&r["reason"]))
                .unwrap_or_default();
            anyhow::bail!(
                "revision {revision} of deployment {id} was rolled back: {reason}; revision {} serves",
                cell(&d["revision"])
            );
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("the update of deployment {id} has not finished after {timeout:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Print each change of a deployment's replicas until all are ready; an error if some cannot
/// be placed (with the reasons nodes gave) or time runs out.
fn wait_ready(c: &Client, id: u64, timeout: std::time::Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let v = c.get(&format!("/v1/deployments/{id}"))?;
        let d = &v["deployment"];
        let wanted = d["replicas"].as_u64().unwrap_or(0);
        let states: Vec<String> = v["placements"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| format!("{}: {}", cell(&p["node"]), super::node::replica_state(p)))
            .collect();
        let ready = v["placements"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["ready"] == json!(true))
            .count() as u64;
        let line = format!(
            "deployment {id}: {ready}/{wanted} ready [{}]",
            states.join(", ")
        );
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        if ready >= wanted {
            return Ok(());
        }
        let unplaced = d["rollout"]["unplaced"].as_u64().unwrap_or(0);
        let failed = d["failed_on"].as_object().cloned().unwrap_or_default();
        if unplaced > 0 && !failed.is_empty() {
            let reasons: Vec<String> = failed
                .iter()
                .map(|(node, r)| format!("{node}: {}", cell(r)))
                .collect();
            anyhow::bail!(
                "{unplaced} replica(s) of deployment {id} cannot be placed; nodes that failed it: {}",
                reasons.join("; ")
            );
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "deployment {id} is not ready after {timeout:?}: {ready}/{wanted} ready, {unplaced} unplaced"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

pub fn cluster(args: &ClientArgs, cmd: ClusterCmd) -> anyhow::Result<()> {
    let c = Client::new(args)?;
    match cmd {
        ClusterCmd::Status => {
            let v = c.get("/v1/cluster/status")?;
            c.print(&v, |v| {
                let r = &v["raft"];
                Table::fields(&[
                    ("coordinator", cell(&v["coordinator"])),
                    (
                        "role",
                        if r["is_leader"].as_bool() == Some(true) {
                            "leader".into()
                        } else {
                            "follower".into()
                        },
                    ),
                    ("leader", cell(&r["leader"])),
                    ("term", cell(&r["term"])),
                    ("commit index", cell(&r["commit_index"])),
                    ("applied index", cell(&r["applied_index"])),
                    ("voters", cell(&r["voters"])),
                    ("nodes", cell(&v["nodes"])),
                    ("models", cell(&v["models"])),
                    ("deployments", cell(&v["deployments"])),
                    ("audit records", cell(&v["audit_records"])),
                ])
            });
        }
        ClusterCmd::Overcommit { percent } => {
            let v = c.send(
                "PUT",
                "/v1/cluster/overcommit",
                Some(json!({ "percent": percent })),
            )?;
            done(&c, &v, &format!("memory overcommit {percent}%"));
        }
        ClusterCmd::Members => {
            let v = c.get("/v1/cluster/members")?;
            c.print(&v, |v| {
                let mut t = Table::new(&["kind", "id", "address", "api", "state"]);
                for co in v["coordinators"].as_array().into_iter().flatten() {
                    let state = if co["leader"].as_bool() == Some(true) {
                        "leader"
                    } else if co["voter"].as_bool() == Some(true) {
                        "voter"
                    } else if co["learner"].as_bool() == Some(true) {
                        "learner (catching up)"
                    } else {
                        "not a member"
                    };
                    t.row(vec![
                        "coordinator".into(),
                        cell(&co["id"]),
                        cell(&co["mesh_address"]),
                        cell(&co["api_address"]),
                        state.into(),
                    ]);
                }
                for n in v["nodes"].as_array().into_iter().flatten() {
                    t.row(vec![
                        "node".into(),
                        cell(&n["id"]),
                        cell(&n["address"]),
                        "-".into(),
                        cell(&n["health"]),
                    ]);
                }
                t
            });
        }
    }
    Ok(())
}

pub fn token(args: &ClientArgs, cmd: TokenCmd) -> anyhow::Result<()> {
    let c = Client::new(args)?;
    match cmd {
        TokenCmd::Create { name, role } => {
            let v = c.send(
                "POST",
                "/v1/tokens",
                Some(json!({"name": name, "role": role})),
            )?;
            c.print(&v, |v| {
                Table::fields(&[
                    ("id", cell(&v["id"])),
                    ("name", cell(&v["name"])),
                    ("role", cell(&v["role"])),
                    (
                        "secret",
                        format!("{}   (shown once: keep it)", cell(&v["secret"])),
                    ),
                ])
            });
        }
        TokenCmd::Revoke { id } => {
            let v = c.send("DELETE", &format!("/v1/tokens/{id}"), None)?;
            done(&c, &v, &format!("revoked token {id}"));
        }
        TokenCmd::List => {
            let v = c.get("/v1/tokens")?;
            c.print(&v, |v| {
                let mut t = Table::new(&["id", "name", "role", "created", "revoked"]);
                for tk in v.as_array().into_iter().flatten() {
                    t.row(vec![
                        cell(&tk["id"]),
                        cell(&tk["name"]),
                        cell(&tk["role"]),
                        time(&tk["created_at_ms"]),
                        time(&tk["revoked_at_ms"]),
                    ]);
                }
                t
            });
        }
    }
    Ok(())
}

pub fn key(args: &ClientArgs, cmd: KeyCmd) -> anyhow::Result<()> {
    let c = Client::new(args)?;
    match cmd {
        KeyCmd::Trust { key, name } => {
            let hex = if std::path::Path::new(&key).is_file() {
                let k = sophon_sdk::keys::read_public_key(std::path::Path::new(&key))?;
                sophon_sdk::keys::public_key_hex(&k)
            } else {
                key
            };
            let v = c.send("POST", "/v1/keys", Some(json!({"key": hex, "name": name})))?;
            done(&c, &v, &format!("trusted {name}'s key {hex}"));
        }
        KeyCmd::Distrust { key } => {
            let v = c.send("DELETE", &format!("/v1/keys/{key}"), None)?;
            done(&c, &v, &format!("no longer trusting {key}"));
        }
        KeyCmd::List => {
            let v = c.get("/v1/keys")?;
            c.print(&v, |v| {
                let mut t = Table::new(&["key", "name", "added by", "added"]);
                for k in v.as_array().into_iter().flatten() {
                    t.row(vec![
                        cell(&k["key"]),
                        cell(&k["name"]),
                        cell(&k["added_by"]),
                        time(&k["added_at_ms"]),
                    ]);
                }
                t
            });
        }
    }
    Ok(())
}

pub fn audit(args: &ClientArgs, a: AuditArgs) -> anyhow::Result<()> {
    let c = Client::new(args)?;
    let v = c.get(&format!("/v1/audit?from={}&limit={}", a.from, a.limit))?;
    c.print(&v, |v| {
        let mut t = Table::new(&["seq", "at", "actor", "role", "action", "target", "detail"]);
        for r in v["records"].as_array().into_iter().flatten() {
            t.row(vec![
                cell(&r["seq"]),
                time(&r["at_ms"]),
                cell(&r["actor"]),
                cell(&r["role"]),
                cell(&r["action"]),
                cell(&r["target"]),
                cell(&r["detail"]),
            ]);
        }
        t
    });
    Ok(())
}
