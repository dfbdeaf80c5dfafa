//! Real QUIC over 127.0.0.1: mutual TLS, foreign CAs refused, joiners pinned by fingerprint,
//! frames.

use std::net::SocketAddr;

use anyhow::Context as _;

use super::*;
use crate::{Ca, Error, call, read_frame, write_frame};

fn local() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

fn member(ca: &Ca, principal: Principal) -> anyhow::Result<(quinn::Endpoint, SocketAddr)> {
    let id = ca.issue_identity(&principal)?;
    let endpoint = endpoint(local(), &id, &EndpointConfig::default())?;
    let addr = endpoint.local_addr()?;
    Ok((endpoint, addr))
}

/// Serves the first connection whose handshake succeeds: answers each request with the peer's
/// principal, the kind and the payload's length; returns the principal it saw.
async fn serve_one(server: quinn::Endpoint) -> Option<Option<Principal>> {
    let conn = loop {
        if let Ok(conn) = server.accept().await?.await {
            break conn;
        }
    };
    let principal = peer_principal(&conn);
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let Ok(Some((kind, payload))) = read_frame(&mut recv, 64 << 20).await else {
            break;
        };
        let answer = format!("{principal:?} {kind} {}", payload.len());
        let _ = write_frame(&mut send, 1, answer.as_bytes()).await;
        let _ = send.finish();
    }
    Some(principal)
}

/// The outcome of the server's handshake with its first incoming connection.
async fn first_handshake(server: quinn::Endpoint) -> anyhow::Result<Option<Principal>> {
    let incoming = server.accept().await.context("endpoint closed")?;
    Ok(peer_principal(&incoming.await?))
}

#[tokio::test]
async fn members_of_one_ca_talk_and_see_each_other() -> anyhow::Result<()> {
    let ca = Ca::generate("test")?;
    let (server, addr) = member(&ca, Principal::Coordinator(1))?;
    let serving = tokio::spawn(serve_one(server));

    // The client's key never left it: a CSR, signed by the CA.
    let (key_pem, csr_pem) = crate::new_csr()?;
    let gpu7 = Principal::Node("gpu-7".into());
    let id = Identity {
        principal: gpu7.clone(),
        cert_pem: ca.issue(&csr_pem, &gpu7)?,
        key_pem,
        ca_pem: ca.cert_pem().to_string(),
    };
    let client = endpoint(local(), &id, &EndpointConfig::default())?;
    let conn = connect(&client, addr, None).await?;
    assert_eq!(peer_principal(&conn), Some(Principal::Coordinator(1)));
    let (kind, answer) = call(&conn, 7, b"hello", 1 << 20).await?;
    assert_eq!((kind, &answer[..]), (1, &b"Some(Node(\"gpu-7\")) 7 5"[..]));

    // A 20 MiB payload crosses on one stream.
    let big = vec![3u8; 20 << 20];
    let (_, answer) = call(&conn, 8, &big, 1 << 20).await?;
    assert!(String::from_utf8_lossy(&answer).ends_with(&format!(" 8 {}", 20 << 20)));
    conn.close(0u32.into(), b"done");
    assert_eq!(serving.await?, Some(Some(gpu7)));
    Ok(())
}

#[tokio::test]
async fn a_certificate_from_another_ca_fails_the_handshake() -> anyhow::Result<()> {
    let ca = Ca::generate("ours")?;
    let other = Ca::generate("theirs")?;
    let (server, addr) = member(&ca, Principal::Coordinator(1))?;
    let handshake = tokio::spawn(first_handshake(server));

    // The intruder trusts our CA (so only the server can refuse) but its certificate is foreign.
    let foreign = other.issue_identity(&Principal::Coordinator(1))?;
    let intruder = Identity {
        ca_pem: ca.cert_pem().to_string(),
        ..foreign
    };
    let client = endpoint(local(), &intruder, &EndpointConfig::default())?;
    let result = async {
        let conn = connect(&client, addr, None).await?;
        call(&conn, 1, b"x", 1024).await
    }
    .await;
    assert!(
        result.is_err(),
        "a foreign CA's member got an answer: {result:?}"
    );
    let seen = handshake.await?;
    assert!(
        seen.is_err(),
        "the server accepted a foreign certificate: {seen:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_member_refuses_a_server_from_another_ca() -> anyhow::Result<()> {
    let (server, addr) = member(&Ca::generate("theirs")?, Principal::Coordinator(1))?;
    tokio::spawn(serve_one(server));
    let (client, _) = member(&Ca::generate("ours")?, Principal::Coordinator(2))?;
    let refused = connect(&client, addr, None).await;
    assert!(matches!(refused, Err(Error::Connect { .. })), "{refused:?}");
    Ok(())
}

#[tokio::test]
async fn a_joiner_pins_the_ca_and_is_seen_without_a_principal() -> anyhow::Result<()> {
    let ca = Ca::generate("test")?;
    let (server, addr) = member(&ca, Principal::Coordinator(1))?;
    let serving = tokio::spawn(serve_one(server));
    let cfg = EndpointConfig::default();
    let joiner = client_endpoint(&cfg)?;

    let wrong = join_client_config(&Ca::generate("other")?.fingerprint(), &cfg)?;
    let refused = connect(&joiner, addr, Some(wrong)).await;
    assert!(matches!(refused, Err(Error::Connect { .. })), "{refused:?}");
    assert!(join_client_config("abc", &cfg).is_err());

    let right = join_client_config(&ca.fingerprint().to_uppercase(), &cfg)?;
    let conn = connect(&joiner, addr, Some(right)).await?;
    assert_eq!(peer_principal(&conn), Some(Principal::Coordinator(1)));
    let (_, answer) = call(&conn, 3, b"join", 1024).await?;
    assert_eq!(String::from_utf8_lossy(&answer), "None 3 4");
    conn.close(0u32.into(), b"done");
    assert_eq!(serving.await?, Some(None));
    Ok(())
}

#[tokio::test]
async fn a_joiner_refuses_a_server_of_the_pinned_ca_that_is_not_a_coordinator() -> anyhow::Result<()>
{
    let ca = Ca::generate("test")?;
    // A mesh node's certificate chains to the pinned CA, but a node may not answer a join.
    let (server, addr) = member(&ca, Principal::Node("x".into()))?;
    tokio::spawn(serve_one(server));
    let cfg = EndpointConfig::default();
    let joiner = client_endpoint(&cfg)?;
    let pinned = join_client_config(&ca.fingerprint(), &cfg)?;
    let refused = connect(&joiner, addr, Some(pinned)).await;
    match refused {
        Err(Error::Connect { reason, .. }) => {
            assert!(reason.contains("not a coordinator"), "{reason}")
        }
        other => panic!("a node answered a joiner: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn the_server_sees_the_serial_of_the_client_certificate() -> anyhow::Result<()> {
    let ca = Ca::generate("test")?;
    let (server, addr) = member(&ca, Principal::Coordinator(1))?;
    let seen = tokio::spawn(async move {
        let conn = server.accept().await?.await.ok()?;
        Some((peer_principal(&conn), peer_serial(&conn)))
    });
    let id = ca.issue_identity(&Principal::Coordinator(2))?;
    let client = endpoint(local(), &id, &EndpointConfig::default())?;
    let conn = connect(&client, addr, None).await?;
    let (principal, serial) = seen.await?.context("no connection")?;
    assert_eq!(principal, Some(Principal::Coordinator(2)));
    assert_eq!(serial, Some(crate::serial_of_pem(&id.cert_pem)?));
    // Two certificates for one principal have different serials.
    let again = ca.issue_identity(&Principal::Coordinator(2))?;
    assert_ne!(
        crate::serial_of_pem(&again.cert_pem)?,
        crate::serial_of_pem(&id.cert_pem)?
    );
    conn.close(0u32.into(), b"done");
    Ok(())
}

#[tokio::test]
async fn frames_round_trip_and_bad_ones_are_errors() -> anyhow::Result<()> {
    let ca = Ca::generate("test")?;
    let (server, addr) = member(&ca, Principal::Coordinator(1))?;
    let accept = tokio::spawn(async move {
        let conn = server.accept().await?.await.ok()?;
        let mut out = Vec::new();
        for _ in 0..6 {
            let (_, mut recv) = conn.accept_bi().await.ok()?;
            out.push(read_frame(&mut recv, 16).await);
        }
        Some(out)
    });
    let (client, _) = member(&ca, Principal::Coordinator(2))?;
    let conn = connect(&client, addr, None).await?;
    let mut keep = Vec::new(); // the receive halves stay open until the server has read
    for raw in [
        &[0, 0, 0, 6, 1, b's', b'm', b'a', b'l', b'l'][..],
        &[0, 0, 0, 65, 1][..], // over the limit of 16: refused before the payload is read
        &[0, 0, 0, 9, 1, 2][..],
        &[0, 0][..],
        &[0, 0, 0, 0, 1][..],
        &[][..],
    ] {
        let (mut send, recv) = conn.open_bi().await?;
        send.write_all(raw).await?;
        send.finish()?;
        keep.push((send, recv));
    }
    let out = accept.await?.context("the server saw too few streams")?;
    assert!(
        matches!(&out[0], Ok(Some((1, p))) if p == b"small"),
        "{:?}",
        out[0]
    );
    assert!(
        matches!(out[1], Err(Error::FrameTooLarge { len: 65, max: 16 })),
        "{:?}",
        out[1]
    );
    assert!(matches!(out[2], Err(Error::Truncated)), "{:?}", out[2]);
    assert!(matches!(out[3], Err(Error::Truncated)), "{:?}", out[3]);
    assert!(matches!(out[4], Err(Error::EmptyFrame)), "{:?}", out[4]);
    assert!(matches!(out[5], Ok(None)), "{:?}", out[5]);
    Ok(())
}

#[test]
fn configs_are_validated() {
    assert!(EndpointConfig::default().validate().is_ok());
    let slow_keep_alive = EndpointConfig {
        keep_alive: Duration::from_secs(10),
        ..EndpointConfig::default()
    };
    assert!(matches!(
        slow_keep_alive.validate(),
        Err(Error::Config { .. })
    ));
}
