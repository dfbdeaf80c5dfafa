//! The faults that find double applies and stale reads, against three real `sophon coordinator`
//! processes talking QUIC through fault-injecting UDP relays.
//!
//! Six clients write and read (four stay with one member until it fails them, two pick a member
//! at random for every request) while, round after round, the test
//! - pauses the leader with SIGSTOP for 2–4 s and continues it with SIGCONT: a deposed leader
//!   that comes back believing it still leads, with proposals and reads in flight;
//! - kills all three coordinators with SIGKILL at once and restarts them;
//! - makes the leader deaf for 2.5–3.5 s (the relays drop what is sent to it, not what it sends),
//!   so that its last appends commit under the next leader while it never hears so;
//! - pauses a follower, cuts the leader off through the relays, kills the leader alone;
//!
//! all with `--snapshot-every` between 100 and 200, so that logs are compacted and lagging
//! members (a paused or deaf leader above all) catch up by installing snapshots under load.
//!
//! The deaf leader is the fault that finds a deposed leader applying its own proposals twice: a
//! paused leader, once continued, mostly finds its followers' acknowledgements waiting and learns
//! that its last entries committed; a deaf one never gets them, so it learns of those entries
//! only from the next leader's snapshot, and must not propose them again.
//!
//! Every write carries a value no other write has: the heartbeat grace and the names of three
//! trusted keys are registers written with fresh values, and tokens are created with fresh names.
//! A stale read or a write applied twice therefore cannot hide behind an equal value. Afterwards:
//! - all members reach the same applied index and the same `state_digest`;
//! - the audit log (one record per applied change) holds every acknowledged write exactly once,
//!   at the audit position its acknowledgement named, and every ambiguous one (HTTP 503 "may have
//!   committed", a timeout, a dropped connection) at most once; the token list likewise;
//! - the history of the registers is linearizable.
//!
//! `SOPHON_SOAK_SECS` sets how long the faults go on (30 s by default), `SOPHON_FAULTS_SEED` the
//! seed (printed by every run), and `SOPHON_KEEP_DATA=1` keeps the data directories and logs
//! (they are always kept when the test fails).

#[path = "support/harness.rs"]
mod harness;
#[path = "support/linearizability.rs"]
mod linearizability;
#[path = "support/udp_proxy.rs"]
mod udp_proxy;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{Api, Member, Reply, Rng, all_logs, ok, wait_for_leader};
use linearizability::{History, Op, OpKind, Outcome, Verdict};
use serde_json::{Value, json};
use udp_proxy::Faults;

/// Heartbeat-grace values start here: above the default grace, below the largest accepted (a
/// day), with room for tens of millions of unique values.
const GRACE_BASE: u64 = 1_000_000;
/// The heartbeat grace of a new cluster: the register's initial value.
const DEFAULT_GRACE_MS: u64 = 15_000;
/// The registers: the heartbeat grace, and the names of these many trusted keys.
const KEYS: usize = 3;
const GRACE: &str = "grace";
/// Clients that stay with one member and move to another when it fails them: they keep the
/// load up (and the logs growing past snapshots) while a member is paused or deaf.
const STICKY_CLIENTS: u64 = 4;
/// Clients that send each request to a member drawn at random: they are the ones that reach a
/// stale leader or follower right after it comes back.
const ROAMING_CLIENTS: u64 = 2;
/// How long a client waits for an answer (a paused member answers only once continued).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

/// The trusted key whose name is register `key-{k}` (any 64 hex digits will do).
fn key_hex(k: usize) -> String {
    format!("{:064x}", 0x5eed_0000_u64 + k as u64)
}

fn key_register(k: usize) -> String {
    format!("key-{k}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// SIGSTOP the leader for 2–4 s, then SIGCONT.
    PauseLeader,
    /// SIGKILL all three at once, then restart them.
    KillAll,
    /// Drop everything sent to the leader for 2.5–3.5 s, while what it sends still arrives: the
    /// followers store and acknowledge its last appends, the acknowledgements are lost, and
    /// entries commit under the next leader without the deaf one knowing. Long enough for the
    /// next leader to compact its log past them (so the deaf one learns of them from a
    /// snapshot), short enough for that to happen while their clients still wait (5 s).
    DeafenLeader,
    /// Cut the leader off through the relays for 2–4 s (it stays alive and serves its clients).
    IsolateLeader,
    /// SIGSTOP a follower for 2–4 s, then SIGCONT (it serves reads again once continued).
    PauseFollower,
    /// SIGKILL the leader, then restart it.
    KillLeader,
}

/// The faults, round after round. The first [`MIN_ROUNDS`] always run, whatever the duration:
/// three leader pauses, two deaf leaders and a restart of all.
const SCHEDULE: [Fault; 11] = [
    Fault::PauseLeader,
    Fault::DeafenLeader,
    Fault::KillAll,
    Fault::PauseLeader,
    Fault::DeafenLeader,
    Fault::PauseLeader,
    Fault::DeafenLeader,
    Fault::IsolateLeader,
    Fault::PauseFollower,
    Fault::KillLeader,
    Fault::KillAll,
];
const MIN_ROUNDS: usize = 6;

/// What a client learned about one of its writes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fate {
    /// Acknowledged; a register write names the audit record its apply wrote, a token creation
    /// the token's id.
    Acked {
        audit_seq: Option<u64>,
        id: Option<String>,
    },
    /// Refused (4xx): it changed nothing. (None is expected: every write is valid.)
    Refused,
    /// No answer, or a 5xx: it may or may not have been applied, but never twice.
    Ambiguous,
}

/// Every write the clients sent, by what makes it unique, and anything unexpected they saw.
#[derive(Default)]
struct Ledger {
    /// (register, value) -> fate.
    registers: BTreeMap<(String, u64), Fate>,
    /// Token name -> fate.
    tokens: BTreeMap<String, Fate>,
    /// Answers that no correct cluster gives (a valid write refused, a value nobody wrote).
    surprises: Vec<String>,
    reads: u64,
    /// Why writes were ambiguous, roughly: how many times each.
    ambiguous: BTreeMap<String, u64>,
}

impl Ledger {
    fn ambiguous(&mut self, reply: &Reply) {
        if let Reply::Unknown(why) = reply {
            *self.ambiguous.entry(reason(why)).or_default() += 1;
        }
    }

    fn surprise(&mut self, what: String) {
        if self.surprises.len() < 100 {
            self.surprises.push(what);
        }
    }
}

/// What the client threads share.
#[derive(Clone)]
struct Shared {
    urls: Arc<Vec<String>>,
    token: String,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<History>>,
    ledger: Arc<Mutex<Ledger>>,
    next_value: Arc<AtomicU64>,
    epoch: Instant,
}

impl Shared {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn record(&self, op: Op) {
        self.history.lock().expect("history").push(op);
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().expect("ledger")
    }
}

fn fate(reply: &Reply) -> Fate {
    match reply {
        Reply::Ok(v) => Fate::Acked {
            audit_seq: v["audit_seq"].as_u64(),
            id: v["id"].as_str().map(str::to_string),
        },
        Reply::Refused(..) => Fate::Refused,
        Reply::Unknown(_) => Fate::Ambiguous,
    }
}

/// The gist of why a request got no clear answer: the status and the message's first words, or
/// the transport error.
fn reason(why: &str) -> String {
    let gist = match why.split_once(": ") {
        Some((status, body)) if status.starts_with("HTTP ") => {
            let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
            let message = v["error"]["message"].as_str().unwrap_or(body);
            format!("{status} {message}")
        }
        _ => why.to_string(),
    };
    // Numbers (terms, ids, addresses) would split one reason into many.
    let gist: String = gist
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect();
    gist.chars().take(70).collect()
}

/// A register's value as a read reports it: `None` before the first write.
fn grace_read(v: &Value) -> Result<Option<u64>, String> {
    match v["heartbeat_grace_ms"].as_u64() {
        Some(DEFAULT_GRACE_MS) => Ok(None),
        Some(g) if g >= GRACE_BASE => Ok(Some(g)),
        _ => Err(format!("a heartbeat grace nobody wrote: {v}")),
    }
}

/// The names of the test's keys in a `GET /v1/keys` answer.
fn key_reads(v: &Value) -> Result<[Option<u64>; KEYS], String> {
    let list = v.as_array().ok_or_else(|| format!("not a key list: {v}"))?;
    let mut out = [None; KEYS];
    for (k, slot) in out.iter_mut().enumerate() {
        let hex = key_hex(k);
        if let Some(entry) = list.iter().find(|e| e["key"] == json!(hex)) {
            let name = entry["name"].as_str().unwrap_or_default();
            let n = name
                .strip_prefix('v')
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("key {k} has a name nobody wrote: {entry}"))?;
            *slot = Some(n);
        }
    }
    Ok(out)
}

fn run_client(shared: Shared, client: u64, seed: u64) {
    let api = Api::new(&shared.token, CLIENT_TIMEOUT);
    let mut rng = Rng::new(seed ^ (client + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    // After a request that got no clear answer, a short pause (no spinning on a member that
    // fails fast while the cluster elects a leader), and a sticky client moves elsewhere.
    let mut backoff = false;
    let members = shared.urls.len() as u64;
    let sticky = client < STICKY_CLIENTS;
    let mut home = client % members;
    while !shared.stop.load(Ordering::Relaxed) {
        if std::mem::take(&mut backoff) {
            std::thread::sleep(Duration::from_millis(50));
            if sticky {
                home = (home + 1 + rng.below(members - 1)) % members;
            }
        }
        if !sticky {
            home = rng.below(members);
        }
        let base = &shared.urls[home as usize];
        let dice = rng.below(100);
        if dice < 35 {
            // A register write, with a value never written before.
            let n = shared.next_value.fetch_add(1, Ordering::Relaxed) + 1;
            let k = rng.below(KEYS as u64 + 1) as usize;
            let call = shared.now();
            let (register, value, reply) = if k == KEYS {
                let value = GRACE_BASE + n;
                let reply = api.send(
                    "PUT",
                    base,
                    "/v1/cluster/heartbeat-grace",
                    json!({"grace_ms": value}),
                );
                (GRACE.to_string(), value, reply)
            } else {
                let reply = api.send(
                    "POST",
                    base,
                    "/v1/keys",
                    json!({"key": key_hex(k), "name": format!("v{n}")}),
                );
                (key_register(k), n, reply)
            };
            let ret = shared.now();
            let fate = fate(&reply);
            let outcome = match fate {
                Fate::Acked { .. } => Some(Outcome::Ok),
                Fate::Ambiguous => Some(Outcome::Unknown),
                Fate::Refused => None,
            };
            if let Some(outcome) = outcome {
                shared.record(Op {
                    client,
                    key: register.clone(),
                    kind: OpKind::Write(value),
                    call,
                    ret,
                    outcome,
                });
            }
            let mut ledger = shared.ledger();
            if let Reply::Refused(status, v) = &reply {
                ledger.surprise(format!(
                    "client {client}: writing {value} to {register} through {base} was refused \
                     with {status}: {v}"
                ));
            }
            ledger.ambiguous(&reply);
            backoff = fate == Fate::Ambiguous;
            ledger.registers.insert((register, value), fate);
        } else if dice < 75 {
            // Linearizable reads: the grace, or the three key names at once.
            let grace = rng.below(2) == 0;
            let call = shared.now();
            let reply = if grace {
                api.get(base, "/v1/cluster/status")
            } else {
                api.get(base, "/v1/keys")
            };
            let ret = shared.now();
            let v = match reply {
                Reply::Ok(v) => v,
                Reply::Refused(status, v) => {
                    shared.ledger().surprise(format!(
                        "client {client}: a read through {base} was refused with {status}: {v}"
                    ));
                    continue;
                }
                // A read that got no answer tells nothing.
                Reply::Unknown(_) => {
                    backoff = true;
                    continue;
                }
            };
            let observed: Result<Vec<(String, Option<u64>)>, String> = if grace {
                grace_read(&v).map(|g| vec![(GRACE.to_string(), g)])
            } else {
                key_reads(&v).map(|names| {
                    names
                        .iter()
                        .enumerate()
                        .map(|(k, n)| (key_register(k), *n))
                        .collect()
                })
            };
            match observed {
                Ok(observed) => {
                    for (key, value) in observed {
                        shared.record(Op {
                            client,
                            key,
                            kind: OpKind::Read(value),
                            call,
                            ret,
                            outcome: Outcome::Ok,
                        });
                    }
                    shared.ledger().reads += 1;
                }
                Err(e) => shared
                    .ledger()
                    .surprise(format!("client {client}, through {base}: {e}")),
            }
        } else {
            // A token with a name never used before.
            let n = shared.next_value.fetch_add(1, Ordering::Relaxed) + 1;
            let name = format!("t{n}");
            let reply = api.send(
                "POST",
                base,
                "/v1/tokens",
                json!({"name": name, "role": "viewer"}),
            );
            let fate = fate(&reply);
            let mut ledger = shared.ledger();
            if let Reply::Refused(status, v) = &reply {
                ledger.surprise(format!(
                    "client {client}: creating token {name} through {base} was refused with \
                     {status}: {v}"
                ));
            }
            ledger.ambiguous(&reply);
            backoff = fate == Fate::Ambiguous;
            ledger.tokens.insert(name, fate);
        }
    }
}

/// The temporary directory, kept when the test fails (or on request) for its logs.
struct Scratch(Option<tempfile::TempDir>);

impl Drop for Scratch {
    fn drop(&mut self) {
        let keep = std::thread::panicking() || std::env::var_os("SOPHON_KEEP_DATA").is_some();
        if let Some(dir) = self.0.take()
            && keep
        {
            eprintln!("data directories and logs kept in {}", dir.keep().display());
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

/// A member's view of the cluster, from one local status read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct View {
    applied: u64,
    commit: u64,
    digest: String,
}

fn view(api: &Api, m: &Member) -> Option<View> {
    match api.get(&m.url(), "/v1/cluster/status?digest=true&consistency=local") {
        Reply::Ok(v) => Some(View {
            applied: v["raft"]["applied_index"].as_u64()?,
            commit: v["raft"]["commit_index"].as_u64()?,
            digest: v["state_digest"].as_str()?.to_string(),
        }),
        _ => None,
    }
}

/// A member's whole audit log, read locally.
fn audit_log(api: &Api, m: &Member) -> Vec<Value> {
    let mut records: Vec<Value> = Vec::new();
    loop {
        let page = ok(
            api.get(
                &m.url(),
                &format!(
                    "/v1/audit?from={}&limit=10000&consistency=local",
                    records.len()
                ),
            ),
            "the audit log",
        );
        let batch = page["records"].as_array().cloned().unwrap_or_default();
        let total = page["total"].as_u64().unwrap_or(0) as usize;
        if batch.is_empty() {
            assert_eq!(records.len(), total, "the audit log ended early");
            return records;
        }
        records.extend(batch);
        if records.len() >= total {
            return records;
        }
    }
}

/// Where the audit logs of members that should be equal part ways.
fn audit_divergence(api: &Api, members: &[Member]) -> String {
    let logs: Vec<Vec<Value>> = members.iter().map(|m| audit_log(api, m)).collect();
    let mut out = format!(
        "audit records: {:?}\n",
        logs.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let longest = logs.iter().map(Vec::len).max().unwrap_or(0);
    for seq in 0..longest {
        let at: Vec<Option<&Value>> = logs.iter().map(|l| l.get(seq)).collect();
        if at.iter().any(|r| *r != at[0]) {
            let _ = writeln!(out, "first difference at audit record {seq}:");
            for (m, r) in members.iter().zip(&at) {
                let _ = writeln!(out, "  coordinator {}: {r:?}", m.id);
            }
            return out;
        }
    }
    out + "the audit logs are identical: the difference is elsewhere in the state\n"
}

/// What a register write or token creation looks like in the audit log.
enum Audited {
    Register(String, u64),
    Token { name: String, id: String },
    Other,
}

fn audited(record: &Value) -> Result<Audited, String> {
    let action = record["action"].as_str().unwrap_or_default();
    let target = record["target"].as_str().unwrap_or_default();
    let detail = record["detail"].as_str().unwrap_or_default();
    let unexpected = || format!("an audit record not in the expected form: {record}");
    Ok(match action {
        // "15000 ms -> 1000042 ms"
        "set-heartbeat-grace" => {
            let new = detail
                .rsplit("-> ")
                .next()
                .and_then(|s| s.strip_suffix(" ms"))
                .and_then(|s| s.parse().ok())
                .ok_or_else(unexpected)?;
            Audited::Register(GRACE.to_string(), new)
        }
        // target "key <hex>", detail "trusted as v42"
        "trust-key" => {
            let hex = target.strip_prefix("key ").ok_or_else(unexpected)?;
            match (0..KEYS).find(|k| key_hex(*k) == hex) {
                Some(k) => {
                    let n = detail
                        .strip_prefix("trusted as v")
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(unexpected)?;
                    Audited::Register(key_register(k), n)
                }
                None => Audited::Other,
            }
        }
        // target "token <id>", detail "created for t42 with role viewer"
        "create-token" => {
            let id = target.strip_prefix("token ").ok_or_else(unexpected)?;
            let name = detail
                .strip_prefix("created for ")
                .and_then(|s| s.split(" with role ").next())
                .ok_or_else(unexpected)?;
            Audited::Token {
                name: name.to_string(),
                id: id.to_string(),
            }
        }
        _ => Audited::Other,
    })
}

/// One apply of a write, as the audit log shows it: the record's position and, for a token, the
/// id it created.
type Applied = (u64, Option<String>);

/// Checks one unique write against the audit records that carry it (`seqs`, with the ids they
/// name for tokens): exactly one if acknowledged (at the acknowledged position, with the
/// acknowledged id), at most one if ambiguous, none if refused.
fn check_once(what: &str, fate: Option<&Fate>, seqs: &[Applied]) -> Option<String> {
    let positions: Vec<u64> = seqs.iter().map(|(s, _)| *s).collect();
    match fate {
        None => Some(format!(
            "{what} was applied (audit records {positions:?}) but no client ever sent it"
        )),
        Some(_) if seqs.len() > 1 => Some(format!(
            "{what} was applied {} times: audit records {positions:?} (fate: {fate:?})",
            seqs.len()
        )),
        Some(Fate::Acked { audit_seq, id }) => match seqs.first() {
            None => Some(format!(
                "{what} was acknowledged (audit record {audit_seq:?}) but is lost: no audit \
                 record has it"
            )),
            Some((seq, _)) if audit_seq.is_some_and(|a| a != *seq) => Some(format!(
                "{what} was acknowledged as audit record {audit_seq:?} but is audit record {seq}"
            )),
            Some((_, applied)) if id.is_some() && applied != id => Some(format!(
                "{what} was acknowledged with id {id:?} but created as {applied:?}"
            )),
            Some(_) => None,
        },
        Some(Fate::Refused) if !seqs.is_empty() => Some(format!(
            "{what} was refused, yet applied: audit records {positions:?}"
        )),
        Some(Fate::Refused | Fate::Ambiguous) => None,
    }
}

#[test]
fn stale_leaders_and_full_restarts_apply_each_write_once_linearizably() {
    let seed = env_u64("SOPHON_FAULTS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let duration = Duration::from_secs(env_u64("SOPHON_SOAK_SECS").unwrap_or(30));
    let mut rng = Rng::new(seed);
    let snapshot_every = 100 + rng.below(101);
    eprintln!(
        "faults: seed {seed} (SOPHON_FAULTS_SEED), {} s of faults (SOPHON_SOAK_SECS), \
         --snapshot-every {snapshot_every}",
        duration.as_secs()
    );

    let scratch = Scratch(Some(tempfile::tempdir().expect("tempdir")));
    let root = scratch.0.as_ref().expect("the scratch directory").path();
    let faults = Faults::new();
    let (mut members, token) = harness::three_coordinators(root, &faults, |m| {
        m.snapshot_every = snapshot_every;
        // raft's own info lines say when a member installs a snapshot or wins an election.
        m.log_filter = "info".to_string();
    });
    let api = Api::new(&token, Duration::from_secs(5));

    let shared = Shared {
        urls: Arc::new(members.iter().map(Member::url).collect()),
        token: token.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        history: Arc::new(Mutex::new(History::default())),
        ledger: Arc::new(Mutex::new(Ledger::default())),
        next_value: Arc::new(AtomicU64::new(0)),
        epoch: Instant::now(),
    };
    let clients: Vec<_> = (0..STICKY_CLIENTS + ROAMING_CLIENTS)
        .map(|c| {
            let shared = shared.clone();
            std::thread::spawn(move || run_client(shared, c, seed))
        })
        .collect();

    // The faults, round after round.
    let mut injected: BTreeMap<Fault, u32> = BTreeMap::new();
    let mut crashes: Vec<String> = Vec::new();
    // Where each log stood when the faults began (the joins installed snapshots before).
    let log_start: Vec<usize> = members
        .iter()
        .map(|m| std::fs::read(&m.log).map_or(0, |l| l.len()))
        .collect();
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < duration || round < MIN_ROUNDS {
        std::thread::sleep(rng.millis(800, 1500));
        let fault = SCHEDULE[round % SCHEDULE.len()];
        let leader =
            wait_for_leader(&api, &members, Duration::from_secs(60)).unwrap_or_else(|| {
                panic!(
                    "seed {seed}: no leader before round {round} ({fault:?})\n{}",
                    all_logs(&members)
                )
            });
        let l = members
            .iter()
            .position(|m| m.id == leader)
            .expect("the leader is a member");
        eprintln!(
            "round {round} at {:.1} s: {fault:?} (leader: coordinator {leader})",
            started.elapsed().as_secs_f64()
        );
        match fault {
            Fault::PauseLeader | Fault::PauseFollower => {
                let victim = if fault == Fault::PauseLeader {
                    l
                } else {
                    (l + 1 + rng.below(2) as usize) % members.len()
                };
                members[victim].pause();
                std::thread::sleep(rng.millis(2000, 4000));
                members[victim].resume();
            }
            Fault::DeafenLeader => {
                faults.deafen(members[l].mesh.port());
                std::thread::sleep(rng.millis(2500, 3500));
                faults.heal_all();
            }
            Fault::IsolateLeader => {
                faults.isolate(members[l].mesh.port());
                std::thread::sleep(rng.millis(2000, 4000));
                faults.heal_all();
            }
            Fault::KillLeader => {
                members[l].kill();
                std::thread::sleep(rng.millis(300, 1000));
                members[l].start();
            }
            Fault::KillAll => {
                for m in members.iter_mut() {
                    m.kill();
                }
                std::thread::sleep(rng.millis(300, 1000));
                for m in members.iter_mut() {
                    m.start();
                }
            }
        }
        *injected.entry(fault).or_default() += 1;
        round += 1;
        for m in members.iter_mut() {
            if let Some(status) = m.exited() {
                crashes.push(format!("coordinator {} exited by itself: {status}", m.id));
                m.kill();
                m.start();
            }
        }
    }
    let fault_time = started.elapsed();
    // A calm while, then the clients stop.
    std::thread::sleep(Duration::from_secs(2));
    shared.stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    for m in members.iter_mut() {
        if let Some(status) = m.exited() {
            crashes.push(format!("coordinator {} exited by itself: {status}", m.id));
            m.start();
        }
    }

    // All members reach the same applied index, which stays put, and then have the same state.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut previous: Option<Vec<Option<View>>> = None;
    let mut differing = 0;
    let converged = loop {
        let views: Vec<Option<View>> = members.iter().map(|m| view(&api, m)).collect();
        let settled = views.iter().all(|v| {
            v.as_ref().is_some_and(|v| {
                views
                    .iter()
                    .flatten()
                    .all(|w| w.applied == v.applied && w.commit <= v.applied)
            })
        }) && previous.as_ref() == Some(&views);
        if settled {
            let first = views[0].clone().expect("a view");
            if views.iter().flatten().all(|v| v.digest == first.digest) {
                break first;
            }
            differing += 1;
            if differing >= 3 {
                panic!(
                    "seed {seed}: DIVERGENCE: the members applied the same entries but their \
                     states differ: {views:?}\n{}\n{}",
                    audit_divergence(&api, &members),
                    all_logs(&members)
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: the members did not converge: {views:?}\n{}",
            all_logs(&members)
        );
        previous = Some(views);
        std::thread::sleep(Duration::from_millis(500));
    };

    // Every write exactly once if acknowledged, at most once if ambiguous, as the audit log
    // (one record per applied change) and the token list show.
    let ledger = shared.ledger.lock().expect("ledger");
    let mut problems: Vec<String> = crashes;
    problems.extend(ledger.surprises.iter().cloned());
    let records = audit_log(&api, &members[0]);
    let mut registers: BTreeMap<(String, u64), Vec<Applied>> = BTreeMap::new();
    let mut tokens: BTreeMap<String, Vec<Applied>> = BTreeMap::new();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for (i, record) in records.iter().enumerate() {
        let seq = record["seq"].as_u64().unwrap_or(u64::MAX);
        if seq != i as u64 {
            problems.push(format!("audit record {i} is numbered {seq}"));
        }
        match audited(record) {
            Ok(Audited::Register(register, value)) => {
                last.insert(register.clone(), value);
                registers
                    .entry((register, value))
                    .or_default()
                    .push((seq, None));
            }
            Ok(Audited::Token { name, id }) if name.starts_with('t') => {
                tokens.entry(name).or_default().push((seq, Some(id)));
            }
            Ok(_) => {}
            Err(e) => problems.push(e),
        }
    }
    for (key, fate) in &ledger.registers {
        let what = format!("write of {} to {}", key.1, key.0);
        let seqs = registers.get(key).map(Vec::as_slice).unwrap_or_default();
        problems.extend(check_once(&what, Some(fate), seqs));
    }
    for (key, seqs) in &registers {
        if !ledger.registers.contains_key(key) {
            let what = format!("write of {} to {}", key.1, key.0);
            problems.extend(check_once(&what, None, seqs));
        }
    }
    for (name, fate) in &ledger.tokens {
        let what = format!("creation of token {name}");
        let seqs = tokens.get(name).map(Vec::as_slice).unwrap_or_default();
        problems.extend(check_once(&what, Some(fate), seqs));
    }
    for (name, seqs) in &tokens {
        if !ledger.tokens.contains_key(name) {
            problems.extend(check_once(&format!("creation of token {name}"), None, seqs));
        }
    }
    // No two acknowledgements name the same audit record.
    let mut acked_at: BTreeMap<u64, &(String, u64)> = BTreeMap::new();
    for (key, fate) in &ledger.registers {
        if let Fate::Acked {
            audit_seq: Some(seq),
            ..
        } = fate
            && let Some(other) = acked_at.insert(*seq, key)
        {
            problems.push(format!(
                "writes {other:?} and {key:?} were both acknowledged as audit record {seq}"
            ));
        }
    }
    // Every member lists each token once, and holds the registers' last audited values.
    for m in &members {
        let list = ok(api.get(&m.url(), "/v1/tokens?consistency=local"), "tokens");
        let mut held: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for t in list.as_array().expect("a token list") {
            held.entry(t["name"].as_str().unwrap_or_default().to_string())
                .or_default()
                .push(t["id"].as_str().unwrap_or_default().to_string());
        }
        for (name, fate) in &ledger.tokens {
            let ids = held.get(name).cloned().unwrap_or_default();
            let wrong = match fate {
                Fate::Acked { id, .. } => ids.len() != 1 || id.as_ref() != ids.first(),
                Fate::Ambiguous => ids.len() > 1,
                Fate::Refused => !ids.is_empty(),
            };
            if wrong {
                problems.push(format!(
                    "coordinator {} holds token {name} as {ids:?} (fate: {fate:?})",
                    m.id
                ));
            }
        }
        let status = ok(
            api.get(&m.url(), "/v1/cluster/status?consistency=local"),
            "status",
        );
        let keys = ok(api.get(&m.url(), "/v1/keys?consistency=local"), "keys");
        let mut held: Vec<(String, Option<u64>)> = vec![(
            GRACE.to_string(),
            grace_read(&status).unwrap_or_else(|e| panic!("{e}")),
        )];
        let names = key_reads(&keys).unwrap_or_else(|e| panic!("{e}"));
        held.extend((0..KEYS).map(|k| (key_register(k), names[k])));
        for (register, value) in held {
            if value != last.get(&register).copied() {
                problems.push(format!(
                    "coordinator {} holds {value:?} in {register}, but the audit log's last \
                     write there is {:?}",
                    m.id,
                    last.get(&register)
                ));
            }
        }
    }

    let count = |fates: &mut dyn Iterator<Item = &Fate>| {
        let mut by: BTreeMap<&str, u64> = BTreeMap::new();
        for f in fates {
            let k = match f {
                Fate::Acked { .. } => "acknowledged",
                Fate::Refused => "refused",
                Fate::Ambiguous => "ambiguous",
            };
            *by.entry(k).or_default() += 1;
        }
        by
    };
    // What the logs say since the faults began.
    let logs: Vec<String> = members
        .iter()
        .zip(&log_start)
        .map(|(m, &start)| {
            let log = std::fs::read(&m.log).unwrap_or_default();
            String::from_utf8_lossy(log.get(start..).unwrap_or_default()).into_owned()
        })
        .collect();
    let in_logs = |needle: &str| {
        logs.iter()
            .map(|l| l.matches(needle).count())
            .sum::<usize>()
    };
    let summary = format!(
        "seed {seed}, --snapshot-every {snapshot_every}, {:.1} s of faults in {round} rounds: \
         {injected:?}; register writes {:?}, {} reads; tokens {:?}; {} audit records, applied \
         index {}; {} leader elections, {} snapshot installs (from the logs, since the faults began); ambiguous \
         because: {:?}",
        fault_time.as_secs_f64(),
        count(&mut ledger.registers.values()),
        ledger.reads,
        count(&mut ledger.tokens.values()),
        records.len(),
        converged.applied,
        in_logs("became leader at term"),
        in_logs("] restored snapshot ["),
        ledger.ambiguous,
    );
    eprintln!("{summary}");
    assert!(
        problems.is_empty(),
        "seed {seed}: {} problems:\n{}\n{summary}\n{}",
        problems.len(),
        problems.join("\n"),
        all_logs(&members)
    );
    assert!(
        ledger
            .registers
            .values()
            .any(|f| matches!(f, Fate::Acked { .. })),
        "some register writes were acknowledged: {summary}"
    );
    assert!(
        ledger
            .tokens
            .values()
            .any(|f| matches!(f, Fate::Acked { .. })),
        "some tokens were acknowledged: {summary}"
    );

    // The register history is linearizable.
    let history = shared.history.lock().expect("history");
    match linearizability::check(&history, Duration::from_secs(120)) {
        Ok(Verdict::Linearizable) => {}
        Ok(Verdict::NotLinearizable { key, explanation }) => panic!(
            "seed {seed}: the history of {key} is not linearizable:\n{explanation}\n{summary}\n{}",
            all_logs(&members)
        ),
        Err(e) => panic!("seed {seed}: the linearizability checker gave up: {e}\n{summary}"),
    }
    eprintln!("{} register operations linearizable", history.len());
}
