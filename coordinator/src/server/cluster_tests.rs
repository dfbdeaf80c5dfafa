//! Three coordinators in one process over real QUIC (mutual TLS) and redb: joining with join
//! tokens, forwarded writes, linearizable reads on followers, removing a member, and the
//! leadership hand-over of a graceful shutdown.

use std::time::{Duration, Instant};

use super::{CoordinatorConfig, Running, init, join, join_string, new_token, start};
use crate::{Actor, Command, Role};

fn any() -> std::net::SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

fn free_udp() -> std::net::SocketAddr {
    let s = std::net::UdpSocket::bind(any()).unwrap_or_else(|e| panic!("{e}"));
    s.local_addr().unwrap_or_else(|e| panic!("{e}"))
}

fn config(dir: &std::path::Path, mesh: std::net::SocketAddr) -> CoordinatorConfig {
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

async fn join_token(first: &Running, role: Role) -> String {
    let (id, secret) = new_token();
    first
        .core
        .write(
            admin(),
            Command::CreateToken {
                id,
                name: "joiner".into(),
                role,
                secret_hash: crate::hash_secret(&secret),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_forward_remove_and_hand_over_leadership() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mesh1 = free_udp();
    init(&dir.path().join("c1"), &mesh1.to_string(), "127.0.0.1:1")
        .unwrap_or_else(|e| panic!("{e}"));
    let c1 = start(config(&dir.path().join("c1"), mesh1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    until("c1 leads", || c1.core.driver.status().is_leader).await;

    // A joiner is refused with a wrong CA fingerprint or a token that is not an admin's.
    let good = join_token(&c1, Role::Admin).await;
    let wrong_ca = good.replacen(&c1.core.ca_fingerprint(), &"0".repeat(64), 1);
    let mesh = free_udp().to_string();
    assert!(
        join(&dir.path().join("x"), &wrong_ca, &mesh, "127.0.0.1:1")
            .await
            .is_err()
    );
    let weak = join_token(&c1, Role::Operator).await;
    let refused = join(&dir.path().join("y"), &weak, &mesh, "127.0.0.1:1").await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("admin")),
        "{refused:?}"
    );

    let mut members = vec![c1];
    for n in 2..=3u64 {
        let token = join_token(&members[0], Role::Admin).await;
        let d = dir.path().join(format!("c{n}"));
        let mesh = free_udp();
        let id = join(&d, &token, &mesh.to_string(), "127.0.0.1:1")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(id, n);
        members.push(
            start(config(&d, mesh))
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    until("three voters", || {
        members[0].core.driver.status().voters == [1, 2, 3]
    })
    .await;

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

    // A graceful shutdown of the leader hands leadership to another voter, well within an
    // election timeout, and writes go on with two of three.
    let leader = members.remove(0);
    assert!(leader.core.driver.status().is_leader);
    let began = Instant::now();
    leader.shutdown().await;
    until("a new leader", || {
        members.iter().any(|m| m.core.driver.status().is_leader)
    })
    .await;
    assert!(began.elapsed() < Duration::from_secs(5));
    members[1]
        .core
        .write(admin(), policy("after-handover", 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Remove the stopped coordinator 1 through whichever member is asked.
    members[0]
        .core
        .remove_coordinator(admin(), 1)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    until("two voters", || {
        members[1].core.driver.status().voters == [2, 3]
    })
    .await;
    let known = members[1]
        .core
        .driver
        .read(true, |s| {
            s.coordinators().keys().copied().collect::<Vec<_>>()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(known, [2, 3]);
    // Two remain and keep committing.
    members[0]
        .core
        .write(admin(), policy("two-left", 2))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for m in members {
        m.shutdown().await;
    }
}
