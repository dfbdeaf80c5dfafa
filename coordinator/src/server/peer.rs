//! Coordinator ↔ coordinator requests: the mesh's accept loop (which certificates may connect;
//! Raft streams read from current members only) and each request stream's dispatch by the kind
//! of its first frame (a node's streams go to [`super::nodes`]).

use std::sync::Arc;

use super::blobs::send_file;
use super::driver::Event;
use super::transport::{self, MeshCaller, kind};
use super::{Core, api, io, nodes, perf};
use crate::{Actor, Entry, Error, Result};

/// Accepts mesh connections and serves their streams.
pub(super) async fn accept_loop(
    endpoint: quinn::Endpoint,
    core: Arc<Core>,
    events: std::sync::mpsc::Sender<Event>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let core = core.clone();
        let events = events.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "a mesh handshake failed");
                    return;
                }
            };
            let caller = MeshCaller::of(&conn);
            if let MeshCaller::Coordinator { id: peer, serial } = &caller {
                // Only a current member's certificate: a removed coordinator is refused at
                // once, and dropped later if it is removed while connected.
                if let Err(reason) = core.peers.admits(*peer, serial.as_deref()) {
                    tracing::warn!(peer, %reason, "refused a mesh connection");
                    conn.close(transport::REFUSED.into(), b"not a current member");
                    return;
                }
                tokio::spawn(core.peers.clone().close_when_refused(
                    conn.clone(),
                    *peer,
                    serial.clone(),
                ));
                let (peer, serial) = (*peer, serial.clone());
                let uni = conn.clone();
                let events = events.clone();
                let peers = core.peers.clone();
                tokio::spawn(async move {
                    while let Ok(recv) = uni.accept_uni().await {
                        tokio::spawn(transport::read_raft_stream(
                            recv,
                            events.clone(),
                            peers.clone(),
                            peer,
                            serial.clone(),
                        ));
                    }
                });
            }
            // Anyone else's raft streams are never read.
            while let Ok((send, recv)) = conn.accept_bi().await {
                let core = core.clone();
                tokio::spawn(serve_request(core, caller.clone(), send, recv));
            }
        });
    }
}

pub(super) async fn answer(send: &mut quinn::SendStream, result: Result<serde_json::Value>) {
    let (k, body) = match result {
        Ok(v) => (kind::OK, serde_json::to_vec(&v).unwrap_or_default()),
        Err(e) => (
            kind::ERR,
            serde_json::to_vec(&api::WireError::from_error(&e)).unwrap_or_default(),
        ),
    };
    let _ = sophon_mesh::write_frame(send, k, &body).await;
    let _ = send.finish();
}

async fn serve_request(
    core: Arc<Core>,
    caller: MeshCaller,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let first = match sophon_mesh::read_frame(&mut recv, 1 << 20).await {
        Ok(Some(f)) => f,
        _ => return,
    };
    // A node's certificate is good for node requests only.
    if let MeshCaller::Node { id, serial } = &caller {
        nodes::serve_node_stream(core, id.clone(), serial.clone(), first, send).await;
        return;
    }
    // Checked on every stream: a coordinator removed since it connected is refused.
    let admitted = match &caller {
        MeshCaller::Coordinator { id, serial } => core.peers.admits(*id, serial.as_deref()),
        MeshCaller::Joiner => Err("this request needs a coordinator certificate".into()),
        MeshCaller::Node { id, .. } => Err(format!("node/{id} may not make coordinator requests")),
        MeshCaller::Other(p) => Err(format!("{p} may not make coordinator requests")),
    };
    let is_coordinator = admitted.is_ok();
    let forbidden = || Error::Unauthenticated {
        reason: admitted.clone().err().unwrap_or_default(),
    };
    let result = match first {
        (kind::JOIN, body) if is_coordinator || caller == MeshCaller::Joiner => {
            core.serve_join(&caller, &body).await
        }
        (sophon_mesh::wire::kind::NODE_JOIN, body)
            if is_coordinator || caller == MeshCaller::Joiner =>
        {
            core.serve_node_join(is_coordinator, &body).await
        }
        (_, _) if !is_coordinator => Err(forbidden()),
        (kind::SIGN, body) => match &caller {
            MeshCaller::Coordinator { id, .. } => core.serve_sign(*id, &body).await,
            _ => Err(forbidden()),
        },
        (kind::FORWARD, body) => match serde_json::from_slice::<Entry>(&body) {
            Ok(entry) => core
                .propose_or_forward(entry)
                .await
                .and_then(|o| serde_json::to_value(o).map_err(|e| io("encode", e))),
            Err(e) => Err(io("decode a forwarded entry", e)),
        },
        (kind::BLOB_PUT, header) => core.receive_blob(&header, &mut recv).await,
        (kind::STATS, body) => match serde_json::from_slice::<perf::StatsQuery>(&body) {
            Ok(query) => core.local_stats(&query),
            Err(e) => Err(io("decode a stats query", e)),
        },
        (kind::REMOVE, body) => match serde_json::from_slice::<(Actor, u64)>(&body) {
            Ok((actor, id)) => core
                .remove_coordinator(actor, id)
                .await
                .map(|()| serde_json::json!({"removed": id})),
            Err(e) => Err(io("decode a removal", e)),
        },
        (kind::BLOB_GET, digest) => {
            let digest = String::from_utf8_lossy(&digest).to_string();
            match core.blobs.path(&digest) {
                Some(path) => {
                    if send_file(&mut send, kind::BLOB_GET, &path).await.is_ok() {
                        let _ = send.finish();
                    }
                    return;
                }
                None => Err(Error::Remote {
                    status: 404,
                    code: "unknown_bundle".into(),
                    message: format!("bundle {digest} is not stored here"),
                }),
            }
        }
        (other, _) => Err(io("serve a mesh request", format!("unknown kind {other}"))),
    };
    answer(&mut send, result).await;
}
