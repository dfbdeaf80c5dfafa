//! Coordinators in one process over real QUIC (mutual TLS) and redb: joining with join tokens
//! (any other token, an expired or a used one refused; followers forward a join to the leader,
//! which signs, or has a key holder sign when it holds no CA key; the CA key never leaves the
//! coordinator that made it), forwarded writes, linearizable reads on followers, removing a
//! member, the leadership hand-over of a graceful shutdown, and the mesh admitting only current
//! members (no node certificates, no Raft message under another id, no removed coordinator).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use sophon_mesh::{Ca, EndpointConfig, Identity, Principal};

use super::transport::{self, kind};
use super::{
    CoordinatorConfig, JoinAnswer, JoinRequest, Running, init, join, join_string, new_token,
    parse_join_string, start,
};
use crate::{Actor, Command, Entry, Role};

fn any() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

fn free_udp() -> SocketAddr {
    let s = std::net::UdpSocket::bind(any()).unwrap_or_else(|e| panic!("{e}"));
    s.local_addr().unwrap_or_else(|e| panic!("{e}"))
}

fn config(dir: &Path, mesh: SocketAddr) -> CoordinatorConfig {
    let mut c = CoordinatorConfig::new(dir, any(), mesh);
    c.driver.tick = Duration::from_millis(10);
    c
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn admin() -> Actor {
    Actor::system("test", Role::Admin)
}

/// A join string for a new join token, pointing at `member`'s mesh address.
async fn join_token(member: &Running, ttl: Duration) -> String {
    member
        .core
        .create_join_token(admin(), ttl)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .join_token
}

/// A join string whose secret is a plain token of `role` (no join token).
async fn role_token(first: &Running, role: Role) -> String {
    let secret = plain_token(first, role).await;
    join_string(
        &first.core.ca_fingerprint(),
        &secret,
        &first.mesh_address.to_string(),
    )
}

fn policy(env: &str, n: u32) -> Command {
    Command::SetPolicy {
        environment: env.into(),
        required_approvals: n,
        approver_role: Role::Approver,
    }
}

/// The voters `member` knows, sorted.
fn voters(member: &Running) -> Vec<u64> {
    let mut voters = member.core.driver.status().voters;
    voters.sort();
    voters
}

fn leader(members: &[Running]) -> Option<u64> {
    members
        .iter()
        .find(|m| m.core.driver.status().is_leader)
        .map(|m| m.core.id)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The CA (with its key) from the data directory `coordinator init` made.
fn ca_of(dir: &Path) -> Ca {
    Ca::from_pem(&read(&dir.join("ca/ca.pem")), &read(&dir.join("ca/ca.key")))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Checks that no file under `dir` holds the CA key.
fn assert_no_ca_key(dir: &Path, ca: &Ca) {
    assert!(!dir.join("ca").exists(), "{} has a ca/", dir.display());
    let key = ca.key_pem().trim().as_bytes().to_vec();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{e}")) {
            let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap_or_default();
                assert!(
                    !bytes.windows(key.len()).any(|w| w == key.as_slice()),
                    "{} holds the CA key",
                    path.display()
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_forward_remove_and_hand_over_leadership() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mesh1 = free_udp();
    init(&dir.path().join("c1"), &mesh1.to_string(), "127.0.0.1:1")
        .unwrap_or_else(|e| panic!("{e}"));
    let ca = ca_of(&dir.path().join("c1"));
    let c1 = start(config(&dir.path().join("c1"), mesh1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    until("c1 leads", || c1.core.driver.status().is_leader).await;
    assert!(c1.core.holds_ca_key());
    let hour = Duration::from_secs(3600);

    // A joiner is refused with a wrong CA fingerprint, and with any token but a join token:
    // an admin's included.
    let good = join_token(&c1, hour).await;
    let wrong_ca = good.replacen(&c1.core.ca_fingerprint(), &"0".repeat(64), 1);
    let mesh = free_udp().to_string();
    assert!(
        join(&dir.path().join("x"), &wrong_ca, &mesh, "127.0.0.1:1")
            .await
            .is_err()
    );
    for role in [Role::Admin, Role::Operator] {
        let token = role_token(&c1, role).await;
        let refused = join(&dir.path().join("y"), &token, &mesh, "127.0.0.1:1").await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("not a join token")),
            "{role}: {refused:?}"
        );
    }
    // An expired join token is refused (by the entry's clock when the join commits).
    let short = join_token(&c1, Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let refused = join(&dir.path().join("y"), &short, &mesh, "127.0.0.1:1").await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("expired")),
        "{refused:?}"
    );

    // Two joins racing with one token: one wins.
    let (a, b) = (dir.path().join("c2a"), dir.path().join("c2b"));
    let (mesh_a, mesh_b) = (free_udp(), free_udp());
    let (addr_a, addr_b) = (mesh_a.to_string(), mesh_b.to_string());
    let (ra, rb) = tokio::join!(
        join(&a, &good, &addr_a, "127.0.0.1:1"),
        join(&b, &good, &addr_b, "127.0.0.1:1"),
    );
    let (won, lost, mesh2) = match (ra, rb) {
        (Ok(id), Err(e)) => ((id, a), e, mesh_a),
        (Err(e), Ok(id)) => ((id, b), e, mesh_b),
        other => panic!("one join must win and one lose: {other:?}"),
    };
    assert_eq!(won.0, 2);
    assert!(lost.to_string().contains("used up"), "{lost}");
    // Used once, it is used up.
    let again = join(&dir.path().join("z"), &good, &mesh, "127.0.0.1:1").await;
    assert!(
        again
            .as_ref()
            .is_err_and(|e| e.to_string().contains("used up")),
        "{again:?}"
    );
    // The joiner got no CA key: only its own key, and the CA's certificate.
    assert_no_ca_key(&won.1, &ca);
    let mut members = vec![c1];
    members.push(
        start(config(&won.1, mesh2))
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    assert!(!members[1].core.holds_ca_key());

    // A join sent to a follower (it has no CA key) is forwarded to the leader, which signs.
    until("c2 knows the leader", || {
        members[1].core.driver.status().leader == 1
    })
    .await;
    let via_follower = join_token(&members[1], hour).await;
    assert!(via_follower.ends_with(&mesh2.to_string()), "{via_follower}");
    let d3 = dir.path().join("c3");
    let mesh3 = free_udp();
    let id = join(&d3, &via_follower, &mesh3.to_string(), "127.0.0.1:1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(id, 3);
    assert_no_ca_key(&d3, &ca);
    members.push(
        start(config(&d3, mesh3))
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    until("three voters", || voters(&members[0]) == [1, 2, 3]).await;

    // A write on a follower is forwarded; a linearizable read on the other follower sees it.
    members[1]
        .core
        .write(admin(), policy("forwarded", 3))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let seen = members[2]
        .core
        .driver
        .read(true, |s| {
            s.policies().get("forwarded").map(|p| p.required_approvals)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(seen, Some(3));

    // A leader without the CA key has the key holder sign: coordinator 1 hands leadership
    // away, then a join through it goes to the new leader, which asks coordinator 1 to sign.
    assert!(members[0].core.driver.transfer_leadership().await);
    until("a leader without the key", || {
        leader(&members).is_some_and(|l| l != 1)
            && members[0].core.driver.status().leader != 1
            && members[0].core.driver.status().leader != 0
    })
    .await;
    let token = join_token(&members[0], hour).await;
    let d4 = dir.path().join("c4");
    let mesh4 = free_udp();
    let id = join(&d4, &token, &mesh4.to_string(), "127.0.0.1:1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(id, 4);
    assert_no_ca_key(&d4, &ca);
    members.push(
        start(config(&d4, mesh4))
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    until("four voters", || voters(&members[0]) == [1, 2, 3, 4]).await;

    // A graceful shutdown of the leader hands leadership to another voter, well within an
    // election timeout, and writes go on with three of four.
    let at = members
        .iter()
        .position(|m| m.core.driver.status().is_leader)
        .unwrap_or_else(|| panic!("no leader"));
    let gone = members.remove(at);
    let gone_id = gone.core.id;
    let began = Instant::now();
    gone.shutdown().await;
    until("a new leader", || leader(&members).is_some()).await;
    assert!(began.elapsed() < Duration::from_secs(5));
    members[1]
        .core
        .write(admin(), policy("after-handover", 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Remove the stopped coordinator through whichever member is asked: its id is retired.
    members[0]
        .core
        .remove_coordinator(admin(), gone_id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut rest: Vec<u64> = members.iter().map(|m| m.core.id).collect();
    rest.sort();
    until("three voters", || voters(&members[1]) == rest).await;
    let (known, revoked, next) = members[1]
        .core
        .driver
        .read(true, |s| {
            (
                s.coordinators().keys().copied().collect::<Vec<_>>(),
                s.revoked().keys().cloned().collect::<Vec<_>>(),
                s.next_coordinator_id(),
            )
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(known, rest);
    assert_eq!(revoked, [format!("coordinator/{gone_id}")]);
    assert_eq!(next, 5);
    // Three remain and keep committing.
    members[0]
        .core
        .write(admin(), policy("three-left", 2))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for m in members {
        m.shutdown().await;
    }
}

/// A mesh client presenting `identity`, connected to `addr` (the endpoint must outlive the
/// connection).
async fn connect_as(
    identity: &Identity,
    addr: SocketAddr,
) -> (quinn::Endpoint, sophon_mesh::Result<quinn::Connection>) {
    let endpoint = sophon_mesh::endpoint(any(), identity, &EndpointConfig::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let conn = sophon_mesh::connect(&endpoint, addr, None).await;
    (endpoint, conn)
}

/// Sends one request on `conn` and decodes the answer.
async fn request(conn: &quinn::Connection, k: u8, body: &[u8]) -> crate::Result<serde_json::Value> {
    let (k, bytes) = sophon_mesh::call(conn, k, body, 1 << 20)
        .await
        .map_err(super::mesh)?;
    transport::decode_answer(k, &bytes)
}

fn forwarded(env: &str) -> Vec<u8> {
    let entry = Entry {
        actor: admin(),
        now_ms: 0,
        command: policy(env, 1),
        write_id: None,
    };
    serde_json::to_vec(&entry).unwrap_or_else(|e| panic!("{e}"))
}

/// A heartbeat that, if accepted, moves the receiver to `term`.
fn heartbeat(from: u64, to: u64, term: u64) -> Vec<u8> {
    let mut msg = Message::default();
    msg.set_msg_type(MessageType::MsgHeartbeat);
    msg.from = from;
    msg.to = to;
    msg.term = term;
    msg.write_to_bytes().unwrap_or_else(|e| panic!("{e}"))
}

/// Sends `msg` on a new raft stream of `conn`.
async fn send_raft(conn: &quinn::Connection, msg: &[u8]) {
    if let Ok(mut stream) = conn.open_uni().await {
        let _ = sophon_mesh::write_frame(&mut stream, kind::RAFT, msg).await;
        let _ = stream.finish();
    }
}

async fn has_policy(member: &Running, env: &'static str) -> bool {
    member
        .core
        .driver
        .read(true, move |s| s.policies().contains_key(env))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_admits_only_current_members() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (d1, d2) = (dir.path().join("c1"), dir.path().join("c2"));
    let (mesh1, mesh2) = (free_udp(), free_udp());
    init(&d1, &mesh1.to_string(), "127.0.0.1:1").unwrap_or_else(|e| panic!("{e}"));
    let ca = ca_of(&d1);
    let c1 = start(config(&d1, mesh1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    until("c1 leads", || c1.core.driver.status().is_leader).await;
    let token = join_token(&c1, Duration::from_secs(60)).await;
    join(&d2, &token, &mesh2.to_string(), "127.0.0.1:1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let c2 = start(config(&d2, mesh2))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    until("two voters", || voters(&c1) == [1, 2]).await;

    // The JOIN answer, as it crosses the wire, holds a certificate and no private key.
    let token = join_token(&c1, Duration::from_secs(60)).await;
    let (fingerprint, secret, _) = parse_join_string(&token).unwrap_or_else(|e| panic!("{e}"));
    let (key_pem, csr_pem) = sophon_mesh::new_csr().unwrap_or_else(|e| panic!("{e}"));
    let join_request = serde_json::to_vec(&JoinRequest {
        secret: secret.clone(),
        csr_pem,
        mesh_address: free_udp().to_string(),
        api_address: "127.0.0.1:1".into(),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let cfg = EndpointConfig::default();
    let joiner = sophon_mesh::client_endpoint(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let pinned =
        sophon_mesh::join_client_config(&fingerprint, &cfg).unwrap_or_else(|e| panic!("{e}"));
    let conn = sophon_mesh::connect(&joiner, mesh1, Some(pinned))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (k, raw) = sophon_mesh::call(&conn, kind::JOIN, &join_request, 1 << 20)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(k, kind::OK, "{}", String::from_utf8_lossy(&raw));
    let text = String::from_utf8_lossy(&raw);
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    assert!(!text.contains(ca.key_pem().trim()), "{text}");
    let fields: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&raw).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        fields.keys().map(String::as_str).collect::<Vec<_>>(),
        ["ca_pem", "cert_pem", "id", "peers"]
    );
    let answer: JoinAnswer = serde_json::from_slice(&raw).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answer.id, 3);
    // That coordinator (a learner that never starts) is the test's to play.
    let c3 = Identity {
        principal: Principal::Coordinator(3),
        cert_pem: answer.cert_pem,
        key_pem,
        ca_pem: answer.ca_pem,
    };
    c3.check().unwrap_or_else(|e| panic!("{e}"));

    // A mesh node's certificate (the same CA signed it) may not forward, join or send Raft.
    let node = ca
        .issue_identity(&Principal::Node("x".into()))
        .unwrap_or_else(|e| panic!("{e}"));
    let (_node_endpoint, node_conn) = connect_as(&node, mesh1).await;
    let node_conn = node_conn.unwrap_or_else(|e| panic!("{e}"));
    let refused = request(&node_conn, kind::FORWARD, &forwarded("from-a-node")).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("node x is not a member")),
        "{refused:?}"
    );
    let another = join_token(&c1, Duration::from_secs(60)).await;
    let (_, secret, _) = parse_join_string(&another).unwrap_or_else(|e| panic!("{e}"));
    let node_join = serde_json::to_vec(&JoinRequest {
        secret,
        csr_pem: sophon_mesh::new_csr().unwrap_or_else(|e| panic!("{e}")).1,
        mesh_address: "127.0.0.1:9".into(),
        api_address: "127.0.0.1:1".into(),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let refused = request(&node_conn, kind::JOIN, &node_join).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("node x is not a member")),
        "{refused:?}"
    );
    let term = c1.core.driver.status().term;
    send_raft(&node_conn, &heartbeat(2, 1, term + 1000)).await;

    // A member's certificate sending a Raft message in another member's name.
    let c2_identity = Identity::load(&d2.join("identity")).unwrap_or_else(|e| panic!("{e}"));
    let (_c2_endpoint, c2_conn) = connect_as(&c2_identity, mesh1).await;
    let c2_conn = c2_conn.unwrap_or_else(|e| panic!("{e}"));
    send_raft(&c2_conn, &heartbeat(3, 1, term + 1000)).await;

    // A second certificate for coordinator/2, signed by the CA but not the one recorded.
    let forged = ca
        .issue_identity(&Principal::Coordinator(2))
        .unwrap_or_else(|e| panic!("{e}"));
    let (_forged_endpoint, forged_conn) = connect_as(&forged, mesh1).await;
    if let Ok(conn) = &forged_conn {
        send_raft(conn, &heartbeat(2, 1, term + 1000)).await;
        let refused = request(conn, kind::FORWARD, &forwarded("forged")).await;
        assert!(refused.is_err(), "{refused:?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        c1.core.driver.status().term,
        term,
        "a refused message got in"
    );
    assert!(c1.core.driver.status().is_leader);
    assert!(!has_policy(&c1, "from-a-node").await);
    assert!(!has_policy(&c1, "forged").await);

    // The learner that joined is a current member: its requests are served.
    let (_c3_endpoint, held) = connect_as(&c3, mesh1).await;
    let held = held.unwrap_or_else(|e| panic!("{e}"));
    request(&held, kind::FORWARD, &forwarded("from-the-learner"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(has_policy(&c1, "from-the-learner").await);

    // Removed, its certificate is revoked: the open connection is dropped, and a new one is
    // refused, by every member.
    c1.core
        .remove_coordinator(admin(), 3)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    until("the removed coordinator's connection is dropped", || {
        held.close_reason().is_some()
    })
    .await;
    let revoked = c1
        .core
        .driver
        .read(true, |s| s.revoked().contains_key("coordinator/3"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(revoked);
    for addr in [mesh1, mesh2] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_endpoint, conn) = connect_as(&c3, addr).await;
            let answer = match conn {
                Ok(conn) => request(&conn, kind::FORWARD, &forwarded("after-removal")).await,
                Err(e) => Err(super::mesh(e)),
            };
            if answer.is_err() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{addr} still serves a removed coordinator"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(!has_policy(&c1, "after-removal").await);

    // Last, the control: coordinator 2's certificate in its own name gets through (and moves
    // coordinator 1 to the higher term).
    assert_eq!(c1.core.driver.status().term, term);
    send_raft(&c2_conn, &heartbeat(2, 1, term + 1000)).await;
    until("coordinator 1 took coordinator 2's message", || {
        c1.core.driver.status().term >= term + 1000
    })
    .await;
    c2.shutdown().await;
    c1.shutdown().await;
}

/// One admin API call through the router: (status, JSON body).
async fn api(
    member: &Running,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    use tower::ServiceExt as _;
    let request = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {token}"))
        .body(axum::body::Body::from(body.to_string()))
        .unwrap_or_else(|e| panic!("{e}"));
    let response = super::api::router(member.core.clone())
        .oneshot(request)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = response.status().as_u16();
    let bytes = super::api::body_bytes(response.into_body()).await;
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_is_minted_by_admins_and_does_nothing_on_the_admin_api() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d1 = dir.path().join("c1");
    let mesh1 = free_udp();
    let root = init(&d1, &mesh1.to_string(), "127.0.0.1:1").unwrap_or_else(|e| panic!("{e}"));
    let c1 = start(config(&d1, mesh1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    until("c1 leads", || c1.core.driver.status().is_leader).await;

    let (s, minted) = api(&c1, "POST", "/v1/cluster/join-tokens", &root, "").await;
    assert_eq!(s, 201, "{minted}");
    let join = minted["join_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (fingerprint, secret, address) = parse_join_string(&join).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fingerprint, c1.core.ca_fingerprint());
    assert_eq!(address, mesh1.to_string());
    // One hour by default, by the cluster's clock.
    let clock = c1
        .core
        .driver
        .read(true, |s| s.clock_ms())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let expires = minted["expires_at_ms"].as_u64().unwrap_or_default();
    assert!(expires.abs_diff(clock + 3_600_000) < 60_000, "{minted}");
    let (s, v) = api(
        &c1,
        "POST",
        "/v1/cluster/join-tokens",
        &root,
        r#"{"expires_in_s": 60}"#,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = api(
        &c1,
        "POST",
        "/v1/cluster/join-tokens",
        &root,
        r#"{"expires_in_s": 700000}"#,
    )
    .await;
    assert_eq!(s, 400, "a join token lives at most 7 days: {v}");
    // A join token cannot be made through the plain token route (it would never expire).
    let (s, v) = api(
        &c1,
        "POST",
        "/v1/tokens",
        &root,
        r#"{"name": "j", "role": "join"}"#,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, viewer) = api(
        &c1,
        "POST",
        "/v1/tokens",
        &root,
        r#"{"name": "v", "role": "viewer"}"#,
    )
    .await;
    assert_eq!(s, 201, "{viewer}");
    let viewer = viewer["secret"].as_str().unwrap_or_default().to_string();
    let (s, v) = api(&c1, "POST", "/v1/cluster/join-tokens", &viewer, "").await;
    assert_eq!(s, 403, "only admins mint join tokens: {v}");

    // The join token itself is refused by every admin route.
    let token_id = minted["id"].as_str().unwrap_or_default().to_string();
    let routes = [
        ("GET", "/v1/cluster/status".to_string(), ""),
        ("GET", "/v1/cluster/members".to_string(), ""),
        ("GET", "/v1/models".to_string(), ""),
        ("GET", "/v1/audit".to_string(), ""),
        ("GET", "/v1/tokens".to_string(), ""),
        (
            "POST",
            "/v1/tokens".to_string(),
            r#"{"name": "x", "role": "admin"}"#,
        ),
        ("POST", "/v1/cluster/join-tokens".to_string(), ""),
        (
            "PUT",
            "/v1/policies/x".to_string(),
            r#"{"required_approvals": 1}"#,
        ),
        ("DELETE", format!("/v1/tokens/{token_id}"), ""),
        ("DELETE", "/v1/cluster/coordinators/1".to_string(), ""),
        ("GET", format!("/v1/bundles/{}", "0".repeat(64)), ""),
    ];
    for (method, path, body) in routes {
        let (s, v) = api(&c1, method, &path, &secret, body).await;
        assert!(
            s == 401 || s == 403,
            "{method} {path} answered a join token with {s}: {v}"
        );
    }
    // It is still unused, and listed with its limits.
    let (s, tokens) = api(&c1, "GET", "/v1/tokens", &root, "").await;
    assert_eq!(s, 200, "{tokens}");
    let listed = tokens
        .as_array()
        .and_then(|t| t.iter().find(|t| t["id"] == token_id.as_str()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(listed["role"], "join", "{tokens}");
    assert!(listed["revoked_at_ms"].is_null(), "{listed}");
    let left = c1
        .core
        .driver
        .read(true, move |s| {
            s.tokens().get(&token_id).and_then(|t| t.uses_left)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(left, Some(1));
    c1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collection_needs_a_confirmed_read_of_the_shelf() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (d1, d2) = (dir.path().join("c1"), dir.path().join("c2"));
    let (mesh1, mesh2) = (free_udp(), free_udp());
    init(&d1, &mesh1.to_string(), "127.0.0.1:1").unwrap_or_else(|e| panic!("{e}"));
    let c1 = start(config(&d1, mesh1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    until("c1 leads", || c1.core.driver.status().is_leader).await;
    let token = join_token(&c1, Duration::from_secs(60)).await;
    join(&d2, &token, &mesh2.to_string(), "127.0.0.1:1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = config(&d2, mesh2);
    cfg.gc_grace = Duration::ZERO;
    let c2 = start(cfg).await.unwrap_or_else(|e| panic!("{e}"));
    until("two voters", || voters(&c1) == [1, 2]).await;
    until("c2 caught up", || voters(&c2) == [1, 2]).await;

    // An unreferenced blob on c2 is collected while the cluster can confirm the shelf.
    let blob = |n: u8| {
        let path = d2.join("blobs").join(hex::encode([n; 32]));
        std::fs::write(&path, b"not referenced").unwrap_or_else(|e| panic!("{e}"));
        path
    };
    let first = blob(1);
    let deleted = c2
        .core
        .collect_garbage()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(deleted, vec![hex::encode([1u8; 32])]);
    assert!(!first.exists());

    // Cut off from its only peer, c2 cannot confirm what the shelf holds: it collects nothing
    // (a stale local read could take a bundle the shelf references now for garbage).
    let second = blob(2);
    c1.shutdown().await;
    let refused = c2.core.collect_garbage().await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(
        second.exists(),
        "nothing is collected without a confirmed read"
    );
    c2.shutdown().await;
}

/// A plain token of `role`: its secret.
async fn plain_token(first: &Running, role: Role) -> String {
    let (id, secret) = new_token();
    first
        .core
        .write(
            admin(),
            Command::CreateToken {
                id,
                name: format!("a-{role}"),
                role,
                secret_hash: crate::hash_secret(&secret),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    secret
}

/// Joins node `id` over the wire with `join` (a node join string); its identity, or the error.
async fn join_node(join: &str, id: &str) -> crate::Result<Identity> {
    use sophon_mesh::wire;
    let (fingerprint, secret, address) = parse_join_string(join)?;
    let (key_pem, csr_pem) = sophon_mesh::new_csr().map_err(super::mesh)?;
    let cfg = EndpointConfig::default();
    let endpoint = sophon_mesh::client_endpoint(&cfg).map_err(super::mesh)?;
    let client = sophon_mesh::join_client_config(&fingerprint, &cfg).map_err(super::mesh)?;
    let addr: SocketAddr = address.parse().unwrap_or_else(|e| panic!("{e}"));
    let conn = sophon_mesh::connect(&endpoint, addr, Some(client))
        .await
        .map_err(super::mesh)?;
    let join = wire::NodeJoinRequest {
        secret,
        csr_pem,
        node: wire::NodeInfo {
            id: id.into(),
            mesh_address: "127.0.0.1:9".into(),
            http_address: "127.0.0.1:8".into(),
            inventory: wire::Inventory {
                cpu_cores: 2,
                memory_mb: 4096,
                backends: vec!["tract".into()],
                ..wire::Inventory::default()
            },
            labels: Default::default(),
            zone: "a".into(),
            environments: Vec::new(),
            version: "test".into(),
        },
    };
    let body = serde_json::to_vec(&join).unwrap_or_else(|e| panic!("{e}"));
    let answer = request(&conn, wire::kind::NODE_JOIN, &body).await?;
    let answer: wire::NodeJoinAnswer =
        serde_json::from_value(answer).unwrap_or_else(|e| panic!("{e}"));
    let identity = Identity {
        principal: Principal::Node(id.into()),
        cert_pem: answer.cert_pem,
        key_pem,
        ca_pem: answer.ca_pem,
    };
    identity.check().map_err(super::mesh)?;
    Ok(identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_does_node_things_only_and_only_while_a_member() {
    use sophon_mesh::wire;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d1 = dir.path().join("c1");
    let mesh1 = free_udp();
    let root = init(&d1, &mesh1.to_string(), "127.0.0.1:1").unwrap_or_else(|e| panic!("{e}"));
    let c1 = start(config(&d1, mesh1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    until("c1 leads", || c1.core.driver.status().is_leader).await;

    // An operator mints node join tokens; a viewer may not.
    let viewer = plain_token(&c1, Role::Viewer).await;
    let operator = plain_token(&c1, Role::Operator).await;
    let (s, _) = api(&c1, "POST", "/v1/nodes/join-tokens", &viewer, "").await;
    assert_eq!(s, 403);
    let (s, minted) = api(
        &c1,
        "POST",
        "/v1/nodes/join-tokens",
        &operator,
        r#"{"uses": 1, "expires_in_s": 60}"#,
    )
    .await;
    assert_eq!(s, 201, "{minted}");
    let join = minted["join_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // A coordinator join token is no node join token.
    let coordinator_join = join_token(&c1, Duration::from_secs(60)).await;
    let refused = join_node(&coordinator_join, "x").await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("not a node join token")),
        "{:?}",
        refused.err()
    );
    let n1 = join_node(&join, "n1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // One use only.
    let again = join_node(&join, "n2").await;
    assert!(
        again
            .as_ref()
            .is_err_and(|e| e.to_string().contains("used up")),
        "{:?}",
        again.err()
    );

    let (_endpoint, conn) = connect_as(&n1, mesh1).await;
    let conn = conn.unwrap_or_else(|e| panic!("{e}"));
    let hb = serde_json::to_vec(&wire::Heartbeat::default()).unwrap_or_else(|e| panic!("{e}"));
    let answer = request(&conn, wire::kind::HEARTBEAT, &hb)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answer["accepted"], true, "{answer}");

    // The watch pushes the node's view.
    let (mut send, mut recv) = conn.open_bi().await.unwrap_or_else(|e| panic!("{e}"));
    let watch =
        serde_json::to_vec(&wire::WatchRequest::default()).unwrap_or_else(|e| panic!("{e}"));
    sophon_mesh::write_frame(&mut send, wire::kind::WATCH, &watch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = send.finish();
    let (k, body) = sophon_mesh::read_frame(&mut recv, 1 << 20)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("a view"));
    assert_eq!(k, wire::kind::VIEW);
    let view: wire::View = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}"));
    assert!(view.members.contains_key("n1"), "{view:?}");

    // Nothing a coordinator may do: forward, join, sign, Raft, a bundle it was not given.
    for (k, body) in [
        (kind::FORWARD, forwarded("from-a-node")),
        (kind::JOIN, b"{}".to_vec()),
        (kind::SIGN, b"{}".to_vec()),
        (kind::BLOB_GET, b"00".repeat(32)),
    ] {
        let refused = request(&conn, k, &body).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("n1")),
            "kind {k}: {refused:?}"
        );
    }
    let term = c1.core.driver.status().term;
    send_raft(&conn, &heartbeat(2, 1, term + 1000)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        c1.core.driver.status().term,
        term,
        "a node's Raft message is ignored"
    );
    assert!(!has_policy(&c1, "from-a-node").await);

    // Removed: refused from then on, and the watch says so.
    let (s, out) = api(&c1, "DELETE", "/v1/nodes/n1", &operator, "").await;
    assert_eq!(s, 200, "{out}");
    let (k, body) = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let frame = sophon_mesh::read_frame(&mut recv, 1 << 20)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("a view"));
            let view: wire::View =
                serde_json::from_slice(&frame.1).unwrap_or_else(|e| panic!("{e}"));
            if view.removed {
                return frame;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the watch says the node was removed"));
    assert_eq!(k, wire::kind::VIEW, "{}", String::from_utf8_lossy(&body));
    let refused = request(&conn, wire::kind::HEARTBEAT, &hb).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("not a member")),
        "{refused:?}"
    );
    let _ = root;
    c1.shutdown().await;
}
