//! Coordinator ↔ coordinator traffic over the mesh's QUIC endpoint (mutual TLS).
//!
//! - Raft messages: one long-lived unidirectional stream per peer and direction, one frame per
//!   message ([`kind::RAFT`]); a sender task per peer owns the stream and reconnects.
//! - Requests (bidirectional stream, one request and one answer): a follower forwarding a write
//!   to the leader, a new coordinator joining, and bundle blobs put and fetched by digest.
//!
//! Every stream but a join must come from a coordinator's certificate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Duration;

use parking_lot::Mutex;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use sophon_mesh::{Principal, SERVER_NAME};
use tokio::sync::mpsc;

use super::driver::{Event, Outbox};
use crate::{Error, Result};

/// Frame kinds on the coordinators' streams.
pub mod kind {
    pub const RAFT: u8 = 1;
    pub const FORWARD: u8 = 2;
    pub const JOIN: u8 = 3;
    pub const BLOB_PUT: u8 = 4;
    pub const BLOB_GET: u8 = 5;
    pub const REMOVE: u8 = 6;
    /// The first frame of a raft stream: the sender's incarnation (random per process start).
    pub const HELLO: u8 = 7;
    /// An answer that carries a JSON body.
    pub const OK: u8 = 100;
    /// An answer that carries a JSON [`WireError`](super::super::api::WireError).
    pub const ERR: u8 = 101;
}

/// The largest frame a coordinator accepts (a snapshot travels as one frame).
pub const MAX_FRAME: usize = 512 << 20;

fn mesh_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable {
        reason: format!("{what}: {e}"),
    }
}

/// The coordinators' connections, by peer id, shared by the raft senders and the requests.
pub struct Peers {
    endpoint: quinn::Endpoint,
    /// Addresses known before the state arrived (from the join); the state's win.
    seeds: BTreeMap<u64, String>,
    addresses: Mutex<BTreeMap<u64, String>>,
    /// One slot per peer, so that connecting to a slow peer holds up no other.
    connections: Mutex<BTreeMap<u64, Slot>>,
    /// This process's incarnation, sent to peers first on every raft stream.
    incarnation: u64,
    /// The incarnation each peer last announced.
    seen: Mutex<BTreeMap<u64, u64>>,
    /// Bumped when a peer's connection must not be used any more (it restarted).
    generations: Mutex<BTreeMap<u64, u64>>,
}

type Slot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

impl Peers {
    pub fn new(endpoint: quinn::Endpoint, seeds: BTreeMap<u64, String>) -> Arc<Peers> {
        Arc::new(Peers {
            endpoint,
            addresses: Mutex::new(seeds.clone()),
            seeds,
            connections: Mutex::new(BTreeMap::new()),
            incarnation: rand::random(),
            seen: Mutex::new(BTreeMap::new()),
            generations: Mutex::new(BTreeMap::new()),
        })
    }

    /// This process's incarnation (random at each start).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The mesh endpoint.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// The address book, from the replicated state.
    pub fn set_addresses(&self, addresses: BTreeMap<u64, String>) {
        let mut merged = self.seeds.clone();
        merged.extend(addresses);
        *self.addresses.lock() = merged;
    }

    pub fn address(&self, id: u64) -> Option<String> {
        self.addresses.lock().get(&id).cloned()
    }

    /// A live connection to coordinator `id`, made if needed.
    pub async fn connection(&self, id: u64) -> Result<quinn::Connection> {
        let slot = self.connections.lock().entry(id).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.as_ref()
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        let address = self.address(id).ok_or_else(|| Error::Unavailable {
            reason: format!("no address is known for coordinator {id}"),
        })?;
        let addr = resolve(&address)?;
        let connecting = self
            .endpoint
            .connect(addr, SERVER_NAME)
            .map_err(|e| mesh_err(&format!("connect to coordinator {id} at {address}"), e))?;
        let conn = tokio::time::timeout(Duration::from_secs(2), connecting)
            .await
            .map_err(|_| mesh_err(&format!("connect to coordinator {id}"), "timed out"))?
            .map_err(|e| mesh_err(&format!("connect to coordinator {id} at {address}"), e))?;
        match sophon_mesh::peer_principal(&conn) {
            Some(Principal::Coordinator(peer)) if peer == id => {}
            other => {
                conn.close(0u32.into(), b"wrong peer");
                return Err(mesh_err(
                    &format!("coordinator {id} at {address}"),
                    format!("the peer presented {other:?}"),
                ));
            }
        }
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// The current generation of the connection to `id`.
    fn generation(&self, id: u64) -> u64 {
        self.generations.lock().get(&id).copied().unwrap_or(0)
    }

    /// A peer announced its incarnation. A new one means it restarted: the connection we hold
    /// to its previous process would swallow messages until its idle timeout, so drop it.
    pub async fn observe_incarnation(&self, id: u64, incarnation: u64) {
        let previous = self.seen.lock().insert(id, incarnation);
        if previous.is_some_and(|p| p != incarnation) {
            tracing::info!(peer = id, "coordinator restarted: reconnecting to it");
            *self.generations.lock().entry(id).or_default() += 1;
            self.forget(id).await;
        }
    }

    /// Forgets a connection that failed.
    pub async fn forget(&self, id: u64) {
        let slot = self.connections.lock().get(&id).cloned();
        if let Some(slot) = slot {
            *slot.lock().await = None;
        }
    }

    /// One request to coordinator `id`: `kind` and a JSON body; the answer's JSON body, or the
    /// error the peer returned.
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        id: u64,
        kind: u8,
        body: &impl serde::Serialize,
    ) -> Result<T> {
        let payload = serde_json::to_vec(body).map_err(|e| mesh_err("encode a request", e))?;
        let conn = self.connection(id).await?;
        let answer = sophon_mesh::call(&conn, kind, &payload, MAX_FRAME).await;
        let (k, bytes) = match answer {
            Ok(a) => a,
            Err(e) => {
                self.forget(id).await;
                return Err(mesh_err(&format!("request to coordinator {id}"), e));
            }
        };
        decode_answer(k, &bytes)
    }
}

/// Decodes an answer frame: the JSON body, or the peer's error.
pub fn decode_answer<T: serde::de::DeserializeOwned>(kind: u8, bytes: &[u8]) -> Result<T> {
    match kind {
        kind::OK => serde_json::from_slice(bytes).map_err(|e| mesh_err("decode an answer", e)),
        kind::ERR => {
            let wire: super::api::WireError =
                serde_json::from_slice(bytes).map_err(|e| mesh_err("decode an error", e))?;
            Err(wire.into_error())
        }
        other => Err(mesh_err(
            "decode an answer",
            format!("unexpected frame kind {other}"),
        )),
    }
}

/// Resolves `host:port`.
pub fn resolve(address: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    address
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| Error::Unavailable {
            reason: format!("cannot resolve {address}"),
        })
}

/// The driver's [`Outbox`]: a sender task per peer, each with its own queue.
pub struct MeshOutbox {
    peers: Arc<Peers>,
    runtime: tokio::runtime::Handle,
    events: Sender<Event>,
    senders: Mutex<BTreeMap<u64, mpsc::UnboundedSender<Message>>>,
}

impl MeshOutbox {
    pub fn new(peers: Arc<Peers>, runtime: tokio::runtime::Handle, events: Sender<Event>) -> Self {
        MeshOutbox {
            peers,
            runtime,
            events,
            senders: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Outbox for MeshOutbox {
    fn send(&self, msg: Message) {
        let to = msg.to;
        let mut senders = self.senders.lock();
        let tx = senders.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let link = PeerLink {
                id: to,
                peers: self.peers.clone(),
                events: self.events.clone(),
                rx,
            };
            self.runtime.spawn(link.run());
            tx
        });
        if tx.send(msg).is_err() {
            senders.remove(&to);
        }
    }

    fn peers_changed(&self, peers: BTreeMap<u64, String>) {
        self.peers.set_addresses(peers);
    }
}

/// Delivers raft messages to one peer, in order, over one unidirectional stream.
struct PeerLink {
    id: u64,
    peers: Arc<Peers>,
    events: Sender<Event>,
    rx: mpsc::UnboundedReceiver<Message>,
}

impl PeerLink {
    async fn run(mut self) {
        let mut stream: Option<(u64, quinn::SendStream)> = None;
        while let Some(msg) = self.rx.recv().await {
            let snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
            let sent = self.deliver(&mut stream, &msg).await;
            if snapshot {
                let _ = self.events.send(Event::SnapshotStatus {
                    to: self.id,
                    delivered: sent,
                });
            }
            if !sent {
                stream = None;
                let _ = self.events.send(Event::Unreachable(self.id));
                // Drop what queued up while the peer was away (raft resends), then back off.
                while self.rx.try_recv().is_ok() {}
                tokio::time::sleep(Duration::from_millis(100)).await;
                while self.rx.try_recv().is_ok() {}
            }
        }
    }

    async fn deliver(&self, stream: &mut Option<(u64, quinn::SendStream)>, msg: &Message) -> bool {
        let Ok(bytes) = msg.write_to_bytes() else {
            return false;
        };
        let generation = self.peers.generation(self.id);
        if stream.as_ref().is_some_and(|(g, _)| *g != generation) {
            *stream = None;
        }
        for _attempt in 0..2 {
            if stream.is_none() {
                let opened = match self.peers.connection(self.id).await {
                    Ok(conn) => conn.open_uni().await.ok(),
                    Err(e) => {
                        tracing::debug!(peer = self.id, error = %e, "peer unreachable");
                        return false;
                    }
                };
                let Some(mut s) = opened else {
                    self.peers.forget(self.id).await;
                    continue;
                };
                let hello = self.peers.incarnation.to_be_bytes();
                if sophon_mesh::write_frame(&mut s, kind::HELLO, &hello)
                    .await
                    .is_err()
                {
                    self.peers.forget(self.id).await;
                    continue;
                }
                *stream = Some((generation, s));
            }
            let Some((_, s)) = stream.as_mut() else {
                continue;
            };
            if sophon_mesh::write_frame(s, kind::RAFT, &bytes)
                .await
                .is_ok()
            {
                return true;
            }
            *stream = None;
            self.peers.forget(self.id).await;
        }
        false
    }
}

/// Reads raft messages from a peer's unidirectional stream into the driver.
pub async fn read_raft_stream(
    mut recv: quinn::RecvStream,
    events: Sender<Event>,
    peers: Arc<Peers>,
    peer: u64,
) {
    loop {
        match sophon_mesh::read_frame(&mut recv, MAX_FRAME).await {
            Ok(Some((kind::HELLO, bytes))) => {
                if let Ok(b) = <[u8; 8]>::try_from(bytes.as_slice()) {
                    peers.observe_incarnation(peer, u64::from_be_bytes(b)).await;
                }
            }
            Ok(Some((kind::RAFT, bytes))) => match Message::parse_from_bytes(&bytes) {
                Ok(msg) => {
                    if events.send(Event::Message(Box::new(msg))).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a peer sent an undecodable raft message");
                    return;
                }
            },
            Ok(Some((other, _))) => {
                tracing::warn!(kind = other, "unexpected frame on a raft stream");
                return;
            }
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "raft stream ended");
                return;
            }
        }
    }
}
