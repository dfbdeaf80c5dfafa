//! Coordinator ↔ coordinator traffic over the mesh's QUIC endpoint (mutual TLS).
//!
//! - Raft messages: one long-lived unidirectional stream per peer and direction, one frame per
//!   message ([`kind::RAFT`]); a sender task per peer owns the stream and reconnects.
//! - Requests (bidirectional stream, one request and one answer): a follower forwarding a write
//!   to the leader, a new coordinator joining, a leader without the CA key asking a key holder
//!   to sign a joiner's certificate, and bundle blobs put and fetched by digest.
//!
//! # Who may speak ([`MeshMembers`])
//! Every stream but a join must come from the certificate of a **current** coordinator:
//! `coordinator/N` where N is a voter or learner of the Raft configuration this replica has
//! applied, not revoked, and holding the certificate serial the replicated state recorded for
//! N (when it recorded one). It is checked when a connection is accepted, on every stream and
//! every Raft message (whose `from` must be N), and when the membership changes the open
//! connections of a peer that is no longer admitted are closed. A mesh node's certificate
//! (`node/...`) is refused everything here. A coordinator that has applied no membership yet
//! (it just joined) admits the coordinators its join answer named.

use std::collections::{BTreeMap, BTreeSet};
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
    /// The leader asks a coordinator that holds the CA key to sign a joiner's CSR.
    pub const SIGN: u8 = 8;
    /// A follower asks the leader for deployment or node performance (the leader's soft state).
    pub const STATS: u8 = 9;
    /// An answer that carries a JSON body.
    pub const OK: u8 = 100;
    /// An answer that carries a JSON [`WireError`](super::super::api::WireError).
    pub const ERR: u8 = 101;
}

/// The largest frame a coordinator accepts (a snapshot travels as one frame).
pub const MAX_FRAME: usize = 512 << 20;

/// The QUIC close code for a peer the mesh does not admit.
pub const REFUSED: u32 = 403;

/// Who is at the other end of a mesh connection, by its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshCaller {
    /// No certificate: a coordinator joining (it may only send `JOIN`).
    Joiner,
    /// A coordinator's certificate, admitted when the connection was accepted.
    Coordinator { id: u64, serial: Option<String> },
    /// A mesh node's certificate: node requests only (see `nodes`).
    Node { id: String, serial: Option<String> },
    /// Any other principal: refused everything here.
    Other(Principal),
}

impl MeshCaller {
    /// The caller of `conn`, by the certificate it presented.
    pub fn of(conn: &quinn::Connection) -> MeshCaller {
        match sophon_mesh::peer_principal(conn) {
            None => MeshCaller::Joiner,
            Some(Principal::Coordinator(id)) => MeshCaller::Coordinator {
                id,
                serial: sophon_mesh::peer_serial(conn),
            },
            Some(Principal::Node(id)) => MeshCaller::Node {
                id,
                serial: sophon_mesh::peer_serial(conn),
            },
        }
    }
}

/// Which coordinators the mesh admits: the Raft configuration and the replicated state's
/// certificate serials and revocation list, as this replica has applied them (see the module
/// page).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshMembers {
    /// Voters and learners. Empty: no membership applied yet (a coordinator that just joined).
    pub members: BTreeSet<u64>,
    /// The certificate serial recorded for each coordinator (`None`: not recorded).
    pub serials: BTreeMap<u64, Option<String>>,
    /// Revoked principals (`coordinator/3`).
    pub revoked: BTreeSet<String>,
}

impl MeshMembers {
    /// The view of a replica whose state is `state` and Raft configuration `voters`/`learners`.
    pub fn new(state: &crate::State, voters: &[u64], learners: &[u64]) -> MeshMembers {
        MeshMembers {
            members: voters.iter().chain(learners).copied().collect(),
            serials: state
                .coordinators()
                .values()
                .map(|c| (c.id, c.cert_serial.clone()))
                .collect(),
            revoked: state.revoked().keys().cloned().collect(),
        }
    }

    /// Whether `coordinator/<id>` presenting a certificate with `serial` may send Raft
    /// messages and requests; `seeds` are the coordinators a new one joined through.
    pub fn admits(
        &self,
        id: u64,
        serial: Option<&str>,
        seeds: &BTreeMap<u64, String>,
    ) -> std::result::Result<(), String> {
        self.vouches(id, serial)?;
        let principal = Principal::Coordinator(id);
        if self.members.is_empty() {
            return if seeds.contains_key(&id) {
                Ok(())
            } else {
                Err(format!(
                    "{principal} is not among the coordinators this one joined through"
                ))
            };
        }
        if !self.members.contains(&id) {
            return Err(format!(
                "{principal} is not a current member (voter or learner)"
            ));
        }
        Ok(())
    }

    /// Whether `coordinator/<id>`'s certificate may be used at all: not revoked, and the one
    /// recorded for it (when one is).
    pub fn vouches(&self, id: u64, serial: Option<&str>) -> std::result::Result<(), String> {
        let principal = Principal::Coordinator(id);
        if self.revoked.contains(&principal.to_string()) {
            return Err(format!("{principal} is revoked (it was removed)"));
        }
        if let Some(Some(recorded)) = self.serials.get(&id)
            && serial != Some(recorded.as_str())
        {
            return Err(format!(
                "{principal} presented certificate {}, not the one recorded for it ({recorded})",
                serial.unwrap_or("(none)")
            ));
        }
        Ok(())
    }
}

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
    /// Who the mesh admits (from the driver, after every change).
    members: parking_lot::RwLock<MeshMembers>,
    /// Bumped whenever `members` changes, so that open connections are checked again.
    members_changed: tokio::sync::watch::Sender<u64>,
}

type Slot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

impl Peers {
    /// `members` is the view of the state this replica starts from.
    pub fn new(
        endpoint: quinn::Endpoint,
        seeds: BTreeMap<u64, String>,
        members: MeshMembers,
    ) -> Arc<Peers> {
        Arc::new(Peers {
            endpoint,
            addresses: Mutex::new(seeds.clone()),
            seeds,
            connections: Mutex::new(BTreeMap::new()),
            incarnation: rand::random(),
            seen: Mutex::new(BTreeMap::new()),
            generations: Mutex::new(BTreeMap::new()),
            members: parking_lot::RwLock::new(members),
            members_changed: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Whether `coordinator/<id>` with a certificate of this serial may speak here now (see
    /// [`MeshMembers::admits`]).
    pub fn admits(&self, id: u64, serial: Option<&str>) -> std::result::Result<(), String> {
        self.members.read().admits(id, serial, &self.seeds)
    }

    /// The membership changed: record it, have every open incoming connection checked again,
    /// and close the outgoing ones to peers no longer admitted.
    pub fn set_members(&self, members: MeshMembers) {
        *self.members.write() = members;
        self.members_changed.send_modify(|n| *n += 1);
        let slots: Vec<(u64, Slot)> = self
            .connections
            .lock()
            .iter()
            .map(|(id, slot)| (*id, slot.clone()))
            .collect();
        for (id, slot) in slots {
            let Ok(mut slot) = slot.try_lock() else {
                continue; // being connected: checked when the handshake is done
            };
            let refused = slot.as_ref().and_then(|conn| {
                let serial = sophon_mesh::peer_serial(conn);
                self.admits(id, serial.as_deref()).err()
            });
            if let (Some(reason), Some(conn)) = (refused, slot.take()) {
                tracing::warn!(peer = id, %reason, "closing the connection to a coordinator no longer admitted");
                conn.close(REFUSED.into(), b"not a current member");
            }
        }
    }

    /// Closes `conn` (an incoming connection of `coordinator/<id>`) as soon as a membership
    /// change stops admitting it; returns when the connection closes.
    pub async fn close_when_refused(
        self: Arc<Self>,
        conn: quinn::Connection,
        id: u64,
        serial: Option<String>,
    ) {
        let mut changed = self.members_changed.subscribe();
        // A change between the check at accept and the subscription above is not missed.
        changed.mark_changed();
        loop {
            tokio::select! {
                _ = conn.closed() => return,
                moved = changed.changed() => {
                    if moved.is_err() {
                        return;
                    }
                    if let Err(reason) = self.admits(id, serial.as_deref()) {
                        tracing::warn!(peer = id, %reason, "closing the connection of a coordinator no longer admitted");
                        conn.close(REFUSED.into(), b"not a current member");
                        return;
                    }
                }
            }
        }
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
        // Never talk to a revoked coordinator, or to a certificate not recorded for it. (Its
        // membership is not required: messages go to new members as soon as they are added.)
        let serial = sophon_mesh::peer_serial(&conn);
        if let Err(reason) = self.members.read().vouches(id, serial.as_deref()) {
            conn.close(REFUSED.into(), b"refused");
            return Err(mesh_err(&format!("coordinator {id} at {address}"), reason));
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

    fn members_changed(&self, members: MeshMembers) {
        self.peers.set_members(members);
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

/// Reads raft messages from a peer's unidirectional stream into the driver: only while the
/// peer (`coordinator/<peer>` with a certificate of this `serial`) is admitted, and only
/// messages whose `from` is the peer; anything else ends the stream.
pub async fn read_raft_stream(
    mut recv: quinn::RecvStream,
    events: Sender<Event>,
    peers: Arc<Peers>,
    peer: u64,
    serial: Option<String>,
) {
    loop {
        match sophon_mesh::read_frame(&mut recv, MAX_FRAME).await {
            Ok(Some((kind::HELLO, bytes))) => {
                if let Ok(b) = <[u8; 8]>::try_from(bytes.as_slice()) {
                    peers.observe_incarnation(peer, u64::from_be_bytes(b)).await;
                }
            }
            Ok(Some((kind::RAFT, bytes))) => match Message::parse_from_bytes(&bytes) {
                Ok(msg) if msg.from != peer => {
                    tracing::warn!(
                        peer,
                        from = msg.from,
                        "refused a raft message whose sender is not the certificate's coordinator"
                    );
                    let _ = recv.stop(REFUSED.into());
                    return;
                }
                Ok(msg) => {
                    // Checked for every message: a peer removed meanwhile is refused at once.
                    if let Err(reason) = peers.admits(peer, serial.as_deref()) {
                        tracing::warn!(peer, %reason, "refused a raft message");
                        let _ = recv.stop(REFUSED.into());
                        return;
                    }
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
