//! Three real `sophon coordinator` processes on 127.0.0.1, joined with join tokens, talking QUIC
//! with mutual TLS through fault-injecting UDP relays.
//!
//! Clients write continuously (bundle pushes, approval requests and decisions, deployments,
//! policy and heartbeat-grace registers) and read the registers linearizably, each request to a
//! random coordinator, while the leader is killed with SIGKILL and restarted again and again and
//! a follower is cut off. Afterwards every acknowledged write is on every coordinator, and the
//! history of register operations is checked for linearizability.

#[path = "support/harness.rs"]
mod harness;
#[path = "support/linearizability.rs"]
mod linearizability;
#[path = "support/udp_proxy.rs"]
mod udp_proxy;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{Api, Member, Reply, eventually, ok, wait_for_leader};
use linearizability::{History, Op, OpKind, Outcome, Verdict};
use serde_json::json;
use udp_proxy::Faults;

/// Heartbeat-grace values the clients write start here: above the default grace (15 s), and
/// far enough below the largest grace accepted (one day) to stay unique.
const GRACE_BASE: u64 = 1_000_000;

/// Acknowledged writes other than the registers, to find on every member afterwards.
#[derive(Default)]
struct Acked {
    models: Vec<String>,
    requests: Vec<u64>,
    deployments: Vec<u64>,
}

#[test]
fn three_coordinators_survive_kill_9_and_a_partition_linearizably() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let faults = Faults::new();
    let (mut members, token) = harness::three_coordinators(root, &faults, |_| {});
    let api = Api::new(&token, Duration::from_secs(5));

    // A trusted publisher key, and bundles signed by it.
    let key = sophon_sdk::keys::generate();
    eventually("trust the publisher key", || {
        api.send(
            "POST",
            &members[0].url(),
            "/v1/keys",
            json!({"key": sophon_sdk::keys::public_key_hex(&key.verifying_key()), "name": "test"}),
        )
    });

    let urls: Vec<String> = members.iter().map(Member::url).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(History::default()));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let epoch = Instant::now();
    let next_value = Arc::new(AtomicU64::new(1));
    let bundles: Arc<Vec<(String, Vec<u8>)>> = Arc::new(
        (0..40)
            .map(|n| {
                let name = format!("m{n}");
                let bytes = sophon_sdk::ready::mlp_bundle(&name, &key).expect("bundle");
                (name, bytes)
            })
            .collect(),
    );
    let pushed = Arc::new(AtomicU64::new(0));

    let clients: Vec<_> = (0..6u64)
        .map(|client| {
            let (urls, stop, history, acked, next_value, bundles, pushed) = (
                urls.clone(),
                stop.clone(),
                history.clone(),
                acked.clone(),
                next_value.clone(),
                bundles.clone(),
                pushed.clone(),
            );
            let api = Api::new(&token, Duration::from_secs(4));
            std::thread::spawn(move || {
                let mut rng = client * 7919 + 17;
                let mut rand = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let now = || epoch.elapsed().as_micros() as u64;
                while !stop.load(Ordering::Relaxed) {
                    let base = &urls[(rand() % urls.len() as u64) as usize];
                    let dice = rand() % 100;
                    if dice < 70 {
                        // A register: one of three policies (values 0..=10) or the heartbeat
                        // grace (unique values).
                        let k = rand() % 4;
                        let key = if k == 3 { "grace".to_string() } else { format!("lin-{k}") };
                        let write = rand() % 2 == 0;
                        let call = now();
                        if write {
                            let value = if k == 3 {
                                GRACE_BASE + next_value.fetch_add(1, Ordering::Relaxed)
                            } else {
                                rand() % 11
                            };
                            let reply = if k == 3 {
                                api.send("PUT", base, "/v1/cluster/heartbeat-grace", json!({"grace_ms": value}))
                            } else {
                                api.send("PUT", base, &format!("/v1/policies/{key}"), json!({"required_approvals": value}))
                            };
                            let ret = now();
                            let outcome = match reply {
                                Reply::Ok(_) => Outcome::Ok,
                                Reply::Refused(..) => continue,
                                Reply::Unknown(_) => Outcome::Unknown,
                            };
                            history.lock().expect("history").push(Op { client, key, kind: OpKind::Write(value), call, ret, outcome });
                        } else {
                            let reply = if k == 3 {
                                api.get(base, "/v1/cluster/status")
                            } else {
                                api.get(base, &format!("/v1/policies/{key}"))
                            };
                            let ret = now();
                            let observed = match reply {
                                Reply::Ok(v) if k == 3 => {
                                    let g = v["heartbeat_grace_ms"].as_u64().unwrap_or(0);
                                    // The default grace is the register's initial value.
                                    if g >= GRACE_BASE { Some(g) } else { None }
                                }
                                Reply::Ok(v) => v["required_approvals"].as_u64(),
                                Reply::Refused(404, _) => None,
                                _ => continue,
                            };
                            history.lock().expect("history").push(Op { client, key, kind: OpKind::Read(observed), call, ret, outcome: Outcome::Ok });
                        }
                    } else if dice < 80 {
                        let n = pushed.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some((name, bytes)) = bundles.get(n) else { continue };
                        if let Reply::Ok(_) = api.push(base, bytes) {
                            acked.lock().expect("acked").models.push(name.clone());
                        }
                    } else if dice < 90 {
                        // Ask for production approval of a pushed model, and decide it.
                        let models = acked.lock().expect("acked").models.clone();
                        if models.is_empty() { continue }
                        let model = &models[(rand() % models.len() as u64) as usize];
                        if let Reply::Ok(v) = api.send("POST", base, "/v1/approvals",
                            json!({"model": model, "version": "1", "environment": "production"}))
                            && let Some(id) = v["created"]["approval_request"].as_u64()
                        {
                            acked.lock().expect("acked").requests.push(id);
                            // The admin may decide (the policy's role is lower), but not as the
                            // submitter: refused, and that refusal changes nothing.
                            let r = api.send("POST", base, &format!("/v1/approvals/{id}/approve"), json!({"comment": "self"}));
                            assert!(matches!(r, Reply::Refused(403, _) | Reply::Unknown(_)), "self-approval must be refused");
                        }
                    } else {
                        let models = acked.lock().expect("acked").models.clone();
                        if models.is_empty() { continue }
                        let model = &models[(rand() % models.len() as u64) as usize];
                        if let Reply::Ok(v) = api.send("POST", base, "/v1/deployments",
                            json!({"model": model, "version": "1", "environment": "staging", "replicas": 1}))
                            && let Some(id) = v["created"]["deployment"].as_u64()
                        {
                            acked.lock().expect("acked").deployments.push(id);
                        }
                    }
                }
            })
        })
        .collect();

    // Chaos: kill -9 the leader and restart it, four times; once, cut a follower off for 3 s.
    let mut kills = 0;
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(2500));
        let leader =
            wait_for_leader(&api, &members, Duration::from_secs(15)).unwrap_or_else(|| {
                panic!(
                    "no leader in round {round}\n{}",
                    members.iter().map(Member::logs).collect::<String>()
                )
            });
        let victim = members
            .iter_mut()
            .find(|m| m.id == leader)
            .expect("the leader is a member");
        victim.kill();
        kills += 1;
        std::thread::sleep(Duration::from_millis(800));
        victim.start();
        if round == 1 {
            std::thread::sleep(Duration::from_millis(1000));
            let leader =
                wait_for_leader(&api, &members, Duration::from_secs(15)).expect("a leader");
            let follower = members.iter().find(|m| m.id != leader).expect("a follower");
            faults.isolate(follower.mesh.port());
            std::thread::sleep(Duration::from_secs(3));
            faults.heal_all();
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    assert_eq!(kills, 4);

    // Every member converges to the same applied index.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let applied: Vec<Option<u64>> = members
            .iter()
            .map(
                |m| match api.get(&m.url(), "/v1/cluster/status?consistency=local") {
                    Reply::Ok(v) => v["raft"]["applied_index"].as_u64(),
                    _ => None,
                },
            )
            .collect();
        let leader_commit = wait_for_leader(&api, &members, Duration::from_secs(10))
            .and_then(|l| members.iter().find(|m| m.id == l))
            .and_then(|m| match api.get(&m.url(), "/v1/cluster/status") {
                Reply::Ok(v) => v["raft"]["commit_index"].as_u64(),
                _ => None,
            });
        if applied.iter().all(|a| a.is_some() && *a == applied[0]) && applied[0] >= leader_commit {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "members did not converge: {applied:?} vs commit {leader_commit:?}\n{}",
            members.iter().map(Member::logs).collect::<String>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Every acknowledged write is on every member.
    let acked = acked.lock().expect("acked");
    assert!(!acked.models.is_empty(), "some pushes were acknowledged");
    for m in &members {
        let url = m.url();
        let models = ok(api.get(&url, "/v1/models?consistency=local"), "models");
        for name in &acked.models {
            assert!(
                models
                    .as_array()
                    .expect("list")
                    .iter()
                    .any(|x| x["name"] == json!(name)),
                "coordinator {} lacks acknowledged model {name}",
                m.id
            );
        }
        for id in &acked.requests {
            ok(
                api.get(&url, &format!("/v1/approvals/{id}?consistency=local")),
                "an acknowledged approval request",
            );
        }
        for id in &acked.deployments {
            ok(
                api.get(&url, &format!("/v1/deployments/{id}?consistency=local")),
                "an acknowledged deployment",
            );
        }
        // Each acknowledged bundle can be fetched through every member.
        let digest = models[0]["versions"]["1"]["digest"]
            .as_str()
            .expect("a digest")
            .to_string();
        let agent = ureq::agent();
        let bytes = agent
            .get(format!("{url}/v1/bundles/{digest}"))
            .header("Authorization", format!("Bearer {token}"))
            .call()
            .expect("fetch a bundle")
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .expect("bundle bytes");
        let bundle = sophon_sdk::Bundle::read(&bytes).expect("a verified bundle");
        assert_eq!(bundle.digest_hex(), digest);
        // And through the CLI, which verifies what it downloads.
        let out = root.join(format!("pulled-{}.sbundle", m.id));
        let pulled = Command::new(env!("CARGO_BIN_EXE_sophon"))
            .args(["model", "pull", &digest, "-o"])
            .arg(&out)
            .args(["--server", &url])
            .env("SOPHON_TOKEN", &token)
            .env("SOPHON_LOG", "warn")
            .output()
            .expect("run sophon model pull");
        assert!(
            pulled.status.success(),
            "{}",
            String::from_utf8_lossy(&pulled.stderr)
        );
        assert_eq!(std::fs::read(&out).expect("pulled file"), bytes);
    }

    // Every decision and refusal: the audit log has each acknowledged request.
    let audit = ok(api.get(&members[0].url(), "/v1/audit?limit=10000"), "audit");
    let requested = audit["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["action"] == json!("request-approval"))
        .count();
    assert!(requested >= acked.requests.len());

    // The register history is linearizable.
    let history = history.lock().expect("history");
    assert!(
        history.len() > 100,
        "the clients did work: {} ops",
        history.len()
    );
    match linearizability::check(&history, Duration::from_secs(60)) {
        Ok(Verdict::Linearizable) => {}
        Ok(Verdict::NotLinearizable { key, explanation }) => {
            panic!("the history of {key} is not linearizable:\n{explanation}")
        }
        Err(e) => panic!("the checker gave up: {e}"),
    }
    eprintln!(
        "{} register ops, {} models, {} approval requests, {} deployments acknowledged across {kills} leader kills",
        history.len(),
        acked.models.len(),
        acked.requests.len(),
        acked.deployments.len()
    );
}
