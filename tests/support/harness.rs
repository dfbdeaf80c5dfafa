//! Real `sophon coordinator` processes for the multi-process tests: free ports, a member's
//! process (started, killed with SIGKILL, paused with SIGSTOP and resumed with SIGCONT), a small
//! admin API client, and the bootstrap of a three-coordinator cluster behind UDP relays.

// Each test binary includes this file with `#[path]` and uses only part of its API.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::udp_proxy::{Faults, Relay};

/// One Raft tick, in ms.
pub const TICK_MS: &str = "20";

/// A free port below the ephemeral range (32768 and up on Linux), so that no socket bound to
/// port 0 (the relays' own) can take a member's port while the member is down.
fn free_port(udp: bool) -> SocketAddr {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = u64::from(std::process::id()) * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
    for i in 0..10_000u64 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + ((seed + (n + i) * 104_729) % 12_000) as u16;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let free = if udp {
            UdpSocket::bind(addr).is_ok() && TcpListener::bind(addr).is_ok()
        } else {
            TcpListener::bind(addr).is_ok()
        };
        if free {
            return addr;
        }
    }
    panic!("no free port")
}

pub fn free_tcp() -> SocketAddr {
    free_port(false)
}

pub fn free_udp() -> SocketAddr {
    free_port(true)
}

/// One coordinator: its data directory, addresses, relay and (while it runs) process.
pub struct Member {
    pub id: u64,
    pub data: PathBuf,
    pub api: SocketAddr,
    pub mesh: SocketAddr,
    pub relay: Relay,
    child: Option<Child>,
    /// Stopped with SIGSTOP and not yet continued.
    paused: bool,
    pub log: PathBuf,
    /// `--snapshot-every` for `coordinator run`.
    pub snapshot_every: u64,
    /// `SOPHON_LOG` for `coordinator run`.
    pub log_filter: String,
}

impl Member {
    pub fn new(root: &Path, n: usize, faults: &Faults) -> Member {
        let mesh = free_udp();
        let relay = Relay::start(mesh, faults.clone()).expect("relay");
        Member {
            id: 0,
            data: root.join(format!("c{n}")),
            api: free_tcp(),
            mesh,
            relay,
            child: None,
            paused: false,
            log: root.join(format!("c{n}.log")),
            snapshot_every: 300,
            log_filter: "info,raft=warn".to_string(),
        }
    }

    pub fn advertised(&self) -> String {
        format!("127.0.0.1:{}", self.relay.listen_port())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.api)
    }

    /// Whether its process exists (it may be paused).
    pub fn is_started(&self) -> bool {
        self.child.is_some()
    }

    /// Whether its process exists and is not paused: it can answer.
    pub fn is_running(&self) -> bool {
        self.child.is_some() && !self.paused
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "coordinator {} already runs", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_sophon"))
            .args(["coordinator", "run", "--data"])
            .arg(&self.data)
            .args(["--tick-ms", TICK_MS, "--snapshot-every"])
            .arg(self.snapshot_every.to_string())
            .env("SOPHON_LOG", &self.log_filter)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a coordinator");
        self.child = Some(child);
        self.paused = false;
    }

    /// SIGKILL (a paused process dies too).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("a running coordinator");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill {signal} {}: {status}", child.id());
    }

    /// SIGSTOP: the process stays alive, holds its sockets and its state, and does nothing.
    pub fn pause(&mut self) {
        self.signal("-STOP");
        self.paused = true;
    }

    /// SIGCONT: it carries on where it stopped, unaware of the time that passed.
    pub fn resume(&mut self) {
        if self.paused {
            self.signal("-CONT");
            self.paused = false;
        }
    }

    /// Whether its process ended by itself (a crash): it then counts as stopped.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        self.paused = false;
        Some(status)
    }

    /// The tail of its log.
    pub fn logs(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut start = text.len().saturating_sub(4000);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        format!("--- coordinator {} ---\n{}", self.id, &text[start..])
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the `sophon` binary to completion; panics unless it succeeds.
pub fn sophon(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sophon"))
        .args(args)
        .env("SOPHON_LOG", "warn")
        .output()
        .expect("run sophon");
    assert!(
        out.status.success(),
        "sophon {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A small HTTP client for the admin API.
#[derive(Clone)]
pub struct Api {
    agent: ureq::Agent,
    pub token: String,
}

/// What a request came to.
#[derive(Debug)]
pub enum Reply {
    Ok(Value),
    /// The server refused it (4xx): nothing changed.
    Refused(u16, Value),
    /// No answer, or 5xx: it may or may not have taken effect.
    Unknown(String),
}

impl Api {
    pub fn new(token: &str, timeout: Duration) -> Api {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .build();
        Api {
            agent: ureq::Agent::new_with_config(config),
            token: token.to_string(),
        }
    }

    fn finish(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
        match r {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let text = resp
                    .body_mut()
                    .with_config()
                    .limit(64 << 20)
                    .read_to_string()
                    .unwrap_or_default();
                let v = serde_json::from_str(&text).unwrap_or(Value::Null);
                match status {
                    200..=299 => Reply::Ok(v),
                    400..=499 => Reply::Refused(status, v),
                    _ => Reply::Unknown(format!("HTTP {status}: {text}")),
                }
            }
            Err(e) => Reply::Unknown(e.to_string()),
        }
    }

    pub fn get(&self, base: &str, path: &str) -> Reply {
        Self::finish(
            self.agent
                .get(format!("{base}{path}"))
                .header("Authorization", format!("Bearer {}", self.token))
                .call(),
        )
    }

    pub fn send(&self, method: &str, base: &str, path: &str, body: Value) -> Reply {
        let url = format!("{base}{path}");
        let auth = format!("Bearer {}", self.token);
        Self::finish(match method {
            "PUT" => self
                .agent
                .put(url)
                .header("Authorization", auth)
                .send_json(body),
            _ => self
                .agent
                .post(url)
                .header("Authorization", auth)
                .send_json(body),
        })
    }

    pub fn push(&self, base: &str, bundle: &[u8]) -> Reply {
        Self::finish(
            self.agent
                .post(format!("{base}/v1/bundles"))
                .header("Authorization", format!("Bearer {}", self.token))
                .send(bundle),
        )
    }
}

/// The leader of the highest term that a running member reports (a stale leader that was
/// paused may still believe it leads, in an older term).
pub fn wait_for_leader(api: &Api, members: &[Member], within: Duration) -> Option<u64> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let leader = members
            .iter()
            .filter(|m| m.is_running())
            .filter_map(
                |m| match api.get(&m.url(), "/v1/cluster/status?consistency=local") {
                    Reply::Ok(v) if v["raft"]["is_leader"].as_bool() == Some(true) => Some((
                        v["raft"]["term"].as_u64().unwrap_or(0),
                        v["raft"]["id"].as_u64()?,
                    )),
                    _ => None,
                },
            )
            .max();
        if let Some((_, id)) = leader {
            return Some(id);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

pub fn ok(reply: Reply, what: &str) -> Value {
    match reply {
        Reply::Ok(v) => v,
        Reply::Refused(s, v) => panic!("{what}: refused with {s}: {v}"),
        Reply::Unknown(e) => panic!("{what}: {e}"),
    }
}

/// Retries `f` until it succeeds (setup steps during elections).
pub fn eventually(what: &str, mut f: impl FnMut() -> Reply) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f() {
            Reply::Ok(v) => return v,
            other if Instant::now() > deadline => return ok(other, what),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Every member's logs, for a failure message.
pub fn all_logs(members: &[Member]) -> String {
    members.iter().map(Member::logs).collect()
}

/// Three coordinators behind relays sharing `faults`: coordinator 1 bootstrapped with
/// `coordinator init`, 2 and 3 joined with join tokens and promoted to voters. `configure`
/// adjusts each member (snapshot interval, log filter) before its first start. Returns the
/// members and the admin token.
pub fn three_coordinators(
    root: &Path,
    faults: &Faults,
    configure: impl Fn(&mut Member),
) -> (Vec<Member>, String) {
    let mut members: Vec<Member> = (1..=3).map(|n| Member::new(root, n, faults)).collect();
    for m in &mut members {
        configure(m);
    }

    // Bootstrap coordinator 1 and read its admin token off the output.
    let out = sophon(&[
        "coordinator",
        "init",
        "--data",
        &members[0].data.display().to_string(),
        "--api",
        &members[0].api.to_string(),
        "--mesh",
        &members[0].mesh.to_string(),
        "--advertise-mesh",
        &members[0].advertised(),
    ]);
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("Admin token (shown once, keep it): "))
        .expect("the admin token is printed")
        .trim()
        .to_string();
    members[0].id = 1;
    members[0].start();
    let api = Api::new(&token, Duration::from_secs(5));
    assert_eq!(
        wait_for_leader(&api, &members, Duration::from_secs(30)),
        Some(1),
        "{}",
        members[0].logs()
    );

    // Two more join with join tokens, through coordinator 1.
    for i in 1..3 {
        // A single-use join token that expires (the server builds the join string from the
        // mesh address it advertises, the relay's here).
        let created = eventually("create a join token", || {
            api.send(
                "POST",
                &members[0].url(),
                "/v1/cluster/join-tokens",
                json!({"expires_in_s": 600}),
            )
        });
        let join = created["join_token"]
            .as_str()
            .expect("join token")
            .to_string();
        let out = sophon(&[
            "coordinator",
            "join",
            "--data",
            &members[i].data.display().to_string(),
            "--join-token",
            &join,
            "--api",
            &members[i].api.to_string(),
            "--mesh",
            &members[i].mesh.to_string(),
            "--advertise-mesh",
            &members[i].advertised(),
        ]);
        assert!(
            out.contains(&format!("Joined as coordinator {}", i + 1)),
            "{out}"
        );
        members[i].id = i as u64 + 1;
        members[i].start();
        // The new member catches up (from the bootstrap snapshot) and serves reads.
        let url = members[i].url();
        eventually("the new coordinator serves", || api.get(&url, "/v1/models"));
    }
    // Each learner is promoted to voter once it caught up, asynchronously.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = ok(api.get(&members[0].url(), "/v1/cluster/status"), "status");
        if status["raft"]["voters"] == json!([1, 2, 3]) {
            break;
        }
        assert!(Instant::now() < deadline, "three voters: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    (members, token)
}

/// A xorshift generator: the tests' randomness, reproducible from a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Never zero (xorshift's fixed point), and different seeds diverge at once.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `0..n` (n > 0), near enough.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `[lo, hi]` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// A fresh publisher key, trusted by the cluster behind `base` (through the admin API).
pub fn trusted_key(api: &Api, base: &str) -> sophon_sdk::SigningKey {
    let key = sophon_sdk::keys::generate();
    ok(
        api.send(
            "POST",
            base,
            "/v1/keys",
            json!({"key": sophon_sdk::keys::public_key_hex(&key.verifying_key()), "name": "ci"}),
        ),
        "trust the publisher",
    );
    key
}
