//! `sophon bench raft` and `sophon bench failover`: the control plane's committed writes per
//! second and its recovery after the leader is killed.
//!
//! - `raft`: 1 and 3 real coordinators in this process (QUIC with mutual TLS between them, redb
//!   logs on disk), N tasks writing `set-policy` entries through the leader's write path; the
//!   baseline is one durable redb transaction per write on the same disk, measured in the same
//!   run, so the figure says how much batching buys over an fsync per write.
//! - `failover`: 3 `sophon coordinator` processes; a client writes continuously to the
//!   followers; the leader gets SIGKILL; the time until a write is acknowledged again.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sophon_coordinator::server::{self, CoordinatorConfig, Running};
use sophon_coordinator::{Actor, Command as Cmd, Role};

fn free_tcp() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn free_udp() -> anyhow::Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Starts `members` coordinators in `root`, joined into one cluster; returns them, leader first.
async fn cluster(root: &Path, members: usize, snapshot_every: u64) -> anyhow::Result<Vec<Running>> {
    let mut running = Vec::new();
    let (api, mesh) = (free_tcp()?, free_udp()?);
    let dir = root.join("c1");
    let secret = server::init(&dir, &mesh.to_string(), &api.to_string())?;
    let config = |dir: &Path, api, mesh| {
        let mut c = CoordinatorConfig::new(dir, api, mesh);
        c.driver.tick = Duration::from_millis(30);
        c.driver.replica.snapshot_every = snapshot_every;
        c
    };
    running.push(server::start(config(&dir, api, mesh)).await?);
    wait_leader(&running[0]).await?;
    for n in 2..=members {
        let admin = Actor::system("bench", Role::Admin);
        let token = running[0]
            .core
            .create_join_token(admin, Duration::from_secs(600))
            .await?;
        let (a, m) = (free_tcp()?, free_udp()?);
        let d = root.join(format!("c{n}"));
        server::join(&d, &token.join_token, &m.to_string(), &a.to_string()).await?;
        running.push(server::start(config(&d, a, m)).await?);
    }
    let _ = secret;
    // Let every member catch up before measuring.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let commit = running[0].core.driver.status().commit_index;
        if running
            .iter()
            .all(|r| r.core.driver.status().applied_index >= commit)
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the members did not catch up");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(running)
}

async fn wait_leader(r: &Running) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !r.core.driver.status().is_leader {
        if Instant::now() > deadline {
            bail!("coordinator 1 did not become leader");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Writes for `duration` from `concurrency` tasks; returns (writes, sorted latencies).
async fn load(
    running: &Running,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<(usize, Vec<Duration>, Duration)> {
    let core = running.core.clone();
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..concurrency {
        let core = core.clone();
        let failed = failed.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u32;
            while start.elapsed() < duration {
                let began = Instant::now();
                let cmd = Cmd::SetPolicy {
                    environment: format!("bench-{t}"),
                    required_approvals: n % 3,
                    approver_role: Role::Approver,
                };
                match core.write(Actor::system("bench", Role::Admin), cmd).await {
                    Ok(_) => lat.push(began.elapsed()),
                    Err(e) => {
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(error = %e, "a write failed");
                    }
                }
                n += 1;
            }
            anyhow::Ok(lat)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    let failed = failed.load(std::sync::atomic::Ordering::Relaxed);
    if failed > 0 {
        println!("  ({failed} writes were not confirmed: a leader change under load)");
    }
    Ok((all.len(), all, elapsed))
}

/// One durable redb transaction per write, on the same disk: what an unbatched log costs.
fn fsync_baseline(dir: &Path, writes: usize) -> anyhow::Result<Duration> {
    let db = redb::Database::create(dir.join("baseline.redb"))?;
    let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");
    let payload = vec![7u8; 200];
    let start = Instant::now();
    for i in 0..writes as u64 {
        let tx = db.begin_write()?;
        {
            let mut t = tx.open_table(table)?;
            t.insert(i, payload.as_slice())?;
        }
        tx.commit()?;
    }
    Ok(start.elapsed() / writes as u32)
}

pub fn raft(seconds: u64, snapshot_every: u64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let fsync = fsync_baseline(dir.path(), 300)?;
    let fsync_rate = 1.0 / fsync.as_secs_f64();
    println!(
        "raft: baseline, one durable redb transaction per write: {} ({fsync_rate:.0}/s)",
        ms(fsync)
    );
    println!(
        "{:<9} {:>11} {:>12} {:>10} {:>10} {:>10} {:>14}",
        "members", "concurrency", "writes/s", "p50", "p99", "max", "vs fsync rate"
    );
    for members in [1usize, 3] {
        let root = dir.path().join(format!("m{members}"));
        rt.block_on(async {
            let running = cluster(&root, members, snapshot_every).await?;
            for concurrency in [1usize, 64] {
                // Warm up, then measure.
                load(&running[0], concurrency, Duration::from_millis(500)).await?;
                let (n, lat, elapsed) =
                    load(&running[0], concurrency, Duration::from_secs(seconds)).await?;
                let rate = n as f64 / elapsed.as_secs_f64();
                println!(
                    "{members:<9} {concurrency:>11} {rate:>12.0} {:>10} {:>10} {:>10} {:>13.2}×",
                    ms(percentile(&lat, 0.5)),
                    ms(percentile(&lat, 0.99)),
                    ms(percentile(&lat, 1.0)),
                    rate / fsync_rate
                );
            }
            for r in running {
                r.shutdown().await;
            }
            anyhow::Ok(())
        })?;
    }
    Ok(())
}

struct Proc {
    child: Option<Child>,
    data: std::path::PathBuf,
    api: SocketAddr,
}

impl Proc {
    fn start(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe()?;
        self.child = Some(
            Command::new(exe)
                .args(["coordinator", "run", "--data"])
                .arg(&self.data)
                .env("SOPHON_LOG", "error")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_millis(500)))
            .build(),
    )
}

fn leader_of(agent: &ureq::Agent, procs: &[Proc], token: &str) -> Option<u64> {
    for p in procs.iter().filter(|p| p.child.is_some()) {
        let Ok(mut r) = agent
            .get(format!(
                "http://{}/v1/cluster/status?consistency=local",
                p.api
            ))
            .header("Authorization", format!("Bearer {token}"))
            .call()
        else {
            continue;
        };
        let v: serde_json::Value = r.body_mut().read_json().unwrap_or_default();
        if v["raft"]["is_leader"].as_bool() == Some(true) {
            return v["raft"]["id"].as_u64();
        }
    }
    None
}

fn write_ok(agent: &ureq::Agent, api: SocketAddr, token: &str, n: u64) -> bool {
    agent
        .put(format!("http://{api}/v1/policies/failover"))
        .header("Authorization", format!("Bearer {token}"))
        .send_json(serde_json::json!({"required_approvals": n % 3}))
        .map(|r| r.status().is_success())
        .unwrap_or(false)
}

pub fn failover(rounds: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let mut procs = Vec::new();
    let (api, mesh) = (free_tcp()?, free_udp()?);
    let d1 = dir.path().join("c1");
    let out = Command::new(&exe)
        .args(["coordinator", "init", "--data"])
        .arg(&d1)
        .args(["--api", &api.to_string(), "--mesh", &mesh.to_string()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("Admin token (shown once, keep it): "))
        .context("init printed no token")?
        .trim()
        .to_string();
    procs.push(Proc {
        child: None,
        data: d1,
        api,
    });
    procs[0].start()?;
    let agent = agent();
    let deadline = Instant::now() + Duration::from_secs(20);
    while leader_of(&agent, &procs, &token).is_none() {
        if Instant::now() > deadline {
            bail!("no leader");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for n in 2..=3 {
        let (a, m) = (free_tcp()?, free_udp()?);
        let d = dir.path().join(format!("c{n}"));
        let out = Command::new(&exe)
            .args([
                "coordinator",
                "join-token",
                "--json",
                "--server",
                &format!("http://{api}"),
                "--token",
                &token,
            ])
            .output()?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("join-token output")?;
        let join = v["join_token"].as_str().context("join token")?.to_string();
        let status = Command::new(&exe)
            .args(["coordinator", "join", "--data"])
            .arg(&d)
            .args([
                "--join-token",
                &join,
                "--api",
                &a.to_string(),
                "--mesh",
                &m.to_string(),
            ])
            .status()?;
        if !status.success() {
            bail!("coordinator {n} did not join");
        }
        let mut p = Proc {
            child: None,
            data: d,
            api: a,
        };
        p.start()?;
        procs.push(p);
    }
    std::thread::sleep(Duration::from_secs(2));
    let mut times = Vec::new();
    let mut n = 0u64;
    for _ in 0..rounds {
        let Some(leader) = leader_of(&agent, &procs, &token) else {
            bail!("no leader before a round");
        };
        let idx = (leader - 1) as usize;
        // Writes flow before the kill.
        let survivor = procs
            .iter()
            .position(|p| p.child.is_some() && p.api != procs[idx].api)
            .context("a survivor")?;
        if !write_ok(&agent, procs[survivor].api, &token, n) {
            std::thread::sleep(Duration::from_millis(500));
        }
        let killed = Instant::now();
        procs[idx].kill();
        let survivors: Vec<SocketAddr> = procs
            .iter()
            .filter(|p| p.child.is_some())
            .map(|p| p.api)
            .collect();
        // Like a client that knows every coordinator: each attempt goes to all survivors at
        // once, and the first acknowledgement counts.
        let t = loop {
            n += 1;
            let acked = std::thread::scope(|scope| {
                let tries: Vec<_> = survivors
                    .iter()
                    .map(|api| {
                        let (agent, token) = (&agent, &token);
                        scope.spawn(move || write_ok(agent, *api, token, n).then(Instant::now))
                    })
                    .collect();
                tries
                    .into_iter()
                    .filter_map(|t| t.join().ok().flatten())
                    .min()
            });
            if let Some(at) = acked {
                break at.duration_since(killed);
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("no write was acknowledged within 30 s of the kill");
            }
        };
        println!(
            "failover: writes acknowledged again {} after SIGKILL of leader {leader}",
            ms(t)
        );
        times.push(t);
        procs[idx].start()?;
        std::thread::sleep(Duration::from_secs(2));
    }
    times.sort_unstable();
    println!(
        "failover over {rounds} kills: p50 {}, max {} (election timeout 10–20 ticks of 30 ms)",
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 1.0))
    );
    Ok(())
}
