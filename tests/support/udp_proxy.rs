//! A fault-injecting UDP relay, for partitioning real processes that talk QUIC on 127.0.0.1.
//!
//! Each member `i` of a test cluster really listens on its port `R_i`, and the other members
//! are told to reach it at a relay port `P_i`. A [`Relay`] owns `P_i`: for every client
//! address `S` that sends to it, it opens (lazily) an upstream socket connected to `R_i`,
//! forwards `S`'s datagrams through it, and sends `R_i`'s replies back to `S` from `P_i`, so
//! to `S` the relay looks like the member itself.
//!
//! [`Faults`] is shared by all relays of a test. Isolating a member (by its real port) drops,
//! silently and in both directions, every datagram
//! - to or from that member's relay, and
//! - from or to a client whose source port is that member's real port. Members use one UDP
//!   socket for their server and client sides, so a member's own outgoing QUIC traffic comes
//!   from `R_j` and is cut too.
//!
//! Deafening a member (by its real port) drops only what is sent *to* it, through any relay:
//! what it sends still arrives. A deaf leader's appends reach the followers, who store and
//! acknowledge them, but their acknowledgements (and everything else) are lost on the way back:
//! entries commit without the leader knowing.
//!
//! Traffic that does not go through a relay (a member talking to itself) is never affected.
//!
//! Each relay runs one thread reading `P_i` and one thread per upstream socket. Sockets use
//! short read timeouts so that the threads notice the stop flag; dropping the [`Relay`] stops
//! and joins them all. Socket errors (a member that was killed answers with ICMP "port
//! unreachable", seen as `ConnectionRefused`) are logged to stderr, sparingly, and never stop
//! the relay.

// Each test binary includes this file with `#[path]` and uses only part of its API.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a relay thread waits on a socket before looking at its stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Larger than any UDP payload.
const MAX_DATAGRAM: usize = 65_536;

/// The isolated and the deaf members, shared by every relay of a test (clones share it).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    cut: Arc<Mutex<Cut>>,
}

/// Members' real ports.
#[derive(Debug, Default)]
struct Cut {
    /// Nothing to or from them.
    isolated: HashSet<u16>,
    /// Nothing to them.
    deaf: HashSet<u16>,
}

impl Faults {
    pub fn new() -> Faults {
        Faults::default()
    }

    /// Cuts the member whose real port is `member_real_port` off from every other member.
    pub fn isolate(&self, member_real_port: u16) {
        self.lock().isolated.insert(member_real_port);
    }

    /// Drops everything sent to the member whose real port is `member_real_port`; what it sends
    /// still arrives.
    pub fn deafen(&self, member_real_port: u16) {
        self.lock().deaf.insert(member_real_port);
    }

    /// Reconnects one member (isolated or deaf).
    pub fn heal(&self, member_real_port: u16) {
        let mut cut = self.lock();
        cut.isolated.remove(&member_real_port);
        cut.deaf.remove(&member_real_port);
    }

    /// Reconnects every member.
    pub fn heal_all(&self) {
        let mut cut = self.lock();
        cut.isolated.clear();
        cut.deaf.clear();
    }

    pub fn is_isolated(&self, port: u16) -> bool {
        self.lock().isolated.contains(&port)
    }

    pub fn is_deaf(&self, port: u16) -> bool {
        self.lock().deaf.contains(&port)
    }

    /// Whether a datagram from `from` to `to` is dropped (one of them is the member behind a
    /// relay, the other a client of that relay).
    fn blocks(&self, from: SocketAddr, to: SocketAddr) -> bool {
        let cut = self.lock();
        cut.isolated.contains(&from.port())
            || cut.isolated.contains(&to.port())
            || cut.deaf.contains(&to.port())
    }

    fn lock(&self) -> MutexGuard<'_, Cut> {
        // The sets stay consistent even if a thread panicked while holding the lock.
        self.cut
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A relay in front of one member; it stops when dropped.
pub struct Relay {
    /// The address other members are told to use (`P_i`).
    pub listen: SocketAddr,
    /// The member's real address (`R_i`).
    pub target: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Binds a fresh port on 127.0.0.1 and relays it to `target` under `faults`.
    pub fn start(target: SocketAddr, faults: Faults) -> io::Result<Relay> {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        socket.set_read_timeout(Some(POLL))?;
        let listen = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let downstream = Downstream {
            socket,
            target,
            faults,
            stop: stop.clone(),
            upstreams: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("udp-relay-{}", listen.port()))
            .spawn(move || downstream.run())?;
        Ok(Relay {
            listen,
            target,
            stop,
            thread: Some(thread),
        })
    }

    pub fn listen_port(&self) -> u16 {
        self.listen.port()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("udp relay {}: its thread panicked", self.listen);
        }
    }
}

/// The thread that reads `P_i` and forwards to the member through one upstream per client.
struct Downstream {
    socket: UdpSocket,
    target: SocketAddr,
    faults: Faults,
    stop: Arc<AtomicBool>,
    upstreams: HashMap<SocketAddr, Upstream>,
}

/// A socket connected to the member on behalf of one client, and the thread that carries the
/// member's replies back to that client.
struct Upstream {
    socket: UdpSocket,
    thread: JoinHandle<()>,
}

impl Downstream {
    fn run(mut self) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut errors = ErrorLog::new(format!("udp relay {} (from clients)", self.target));
        while !self.stop.load(Ordering::Relaxed) {
            let (len, peer) = match self.socket.recv_from(&mut buf) {
                Ok(received) => {
                    errors.clear();
                    received
                }
                Err(e) if is_timeout(&e) => continue,
                Err(e) => {
                    errors.record(&e);
                    continue;
                }
            };
            if self.faults.blocks(peer, self.target) {
                continue;
            }
            if !self.upstreams.contains_key(&peer) {
                match self.open_upstream(peer) {
                    Ok(upstream) => {
                        self.upstreams.insert(peer, upstream);
                    }
                    Err(e) => {
                        errors.record(&e);
                        continue;
                    }
                }
            }
            let Some(upstream) = self.upstreams.get(&peer) else {
                continue;
            };
            if let Err(e) = upstream.socket.send(&buf[..len]) {
                errors.record(&e);
            }
        }
        for (_, upstream) in self.upstreams.drain() {
            if upstream.thread.join().is_err() {
                eprintln!("udp relay {}: an upstream thread panicked", self.target);
            }
        }
    }

    fn open_upstream(&self, peer: SocketAddr) -> io::Result<Upstream> {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        socket.connect(self.target)?;
        socket.set_read_timeout(Some(POLL))?;
        let replies = Replies {
            upstream: socket.try_clone()?,
            downstream: self.socket.try_clone()?,
            target: self.target,
            peer,
            faults: self.faults.clone(),
            stop: self.stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("udp-relay-{}-{}", self.target.port(), peer.port()))
            .spawn(move || replies.run())?;
        Ok(Upstream { socket, thread })
    }
}

/// The thread that carries the member's replies to one client.
struct Replies {
    upstream: UdpSocket,
    downstream: UdpSocket,
    target: SocketAddr,
    peer: SocketAddr,
    faults: Faults,
    stop: Arc<AtomicBool>,
}

impl Replies {
    fn run(self) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut errors = ErrorLog::new(format!("udp relay {} (to {})", self.target, self.peer));
        while !self.stop.load(Ordering::Relaxed) {
            let len = match self.upstream.recv(&mut buf) {
                Ok(len) => {
                    errors.clear();
                    len
                }
                Err(e) if is_timeout(&e) => continue,
                Err(e) => {
                    errors.record(&e);
                    continue;
                }
            };
            if self.faults.blocks(self.target, self.peer) {
                continue;
            }
            if let Err(e) = self.downstream.send_to(&buf[..len], self.peer) {
                errors.record(&e);
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Logs socket errors to stderr without flooding it: a dead member refuses every datagram.
struct ErrorLog {
    context: String,
    /// Errors since the last datagram that arrived.
    count: u64,
}

impl ErrorLog {
    fn new(context: String) -> ErrorLog {
        ErrorLog { context, count: 0 }
    }

    fn record(&mut self, e: &io::Error) {
        self.count += 1;
        // The first few of a run, then one in a thousand.
        if self.count <= 3 || self.count.is_multiple_of(1000) {
            eprintln!("{}: {e} ({} in a row)", self.context, self.count);
        }
    }

    /// A datagram arrived: the path works again.
    fn clear(&mut self) {
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A UDP echo server on 127.0.0.1 that stops when dropped.
    struct Echo {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Echo {
        fn start() -> Echo {
            let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the echo server");
            socket
                .set_read_timeout(Some(POLL))
                .expect("set a read timeout");
            let addr = socket.local_addr().expect("the echo server's address");
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let thread = std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !flag.load(Ordering::Relaxed) {
                    if let Ok((len, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(&buf[..len], from);
                    }
                }
            });
            Echo {
                addr,
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for Echo {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    fn client() -> UdpSocket {
        UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a client")
    }

    /// Sends `message` to `to` and returns the reply, if one comes from `to` within `wait`.
    fn exchange(
        socket: &UdpSocket,
        to: SocketAddr,
        message: &[u8],
        wait: Duration,
    ) -> Option<Vec<u8>> {
        socket
            .set_read_timeout(Some(wait))
            .expect("set a read timeout");
        socket.send_to(message, to).expect("send");
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match socket.recv_from(&mut buf) {
                Ok((len, from)) if from == to => return Some(buf[..len].to_vec()),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    }

    /// The relay answers, retrying in case the very first datagram races the upstream thread.
    fn answers(socket: &UdpSocket, relay: &Relay, message: &[u8]) -> bool {
        (0..3).any(|_| {
            exchange(socket, relay.listen, message, Duration::from_secs(1)).as_deref()
                == Some(message)
        })
    }

    fn silent(socket: &UdpSocket, relay: &Relay, message: &[u8]) -> bool {
        exchange(socket, relay.listen, message, Duration::from_millis(300)).is_none()
    }

    #[test]
    fn relays_to_the_member_and_back() {
        let echo = Echo::start();
        let relay = Relay::start(echo.addr, Faults::new()).expect("start the relay");
        assert_eq!(relay.listen.ip(), Ipv4Addr::LOCALHOST);
        assert_eq!(relay.listen_port(), relay.listen.port());
        let socket = client();
        assert!(answers(&socket, &relay, b"ping"));
        for n in 0..20u8 {
            assert_eq!(
                exchange(&socket, relay.listen, &[n; 1200], Duration::from_secs(1)),
                Some(vec![n; 1200])
            );
        }
    }

    #[test]
    fn an_isolated_member_is_unreachable_until_healed() {
        let echo = Echo::start();
        let faults = Faults::new();
        let relay = Relay::start(echo.addr, faults.clone()).expect("start the relay");
        let socket = client();
        assert!(answers(&socket, &relay, b"before"));

        faults.isolate(echo.addr.port());
        assert!(faults.is_isolated(echo.addr.port()));
        assert!(silent(&socket, &relay, b"during"));
        assert!(silent(&socket, &relay, b"during, again"));

        faults.heal(echo.addr.port());
        assert!(!faults.is_isolated(echo.addr.port()));
        assert!(answers(&socket, &relay, b"after"));

        faults.isolate(echo.addr.port());
        assert!(silent(&socket, &relay, b"cut again"));
        faults.heal_all();
        assert!(answers(&socket, &relay, b"healed all"));
    }

    #[test]
    fn an_isolated_sender_is_cut_off_alone() {
        let echo = Echo::start();
        let faults = Faults::new();
        let relay = Relay::start(echo.addr, faults.clone()).expect("start the relay");
        let (isolated, other) = (client(), client());
        assert!(answers(&isolated, &relay, b"a"));
        assert!(answers(&other, &relay, b"b"));

        // The sender's real port is a member's port: that member is isolated.
        faults.isolate(isolated.local_addr().expect("address").port());
        assert!(silent(&isolated, &relay, b"a, cut"));
        assert!(answers(&other, &relay, b"b, still fine"));

        faults.heal_all();
        assert!(answers(&isolated, &relay, b"a, back"));
    }

    #[test]
    fn replies_are_cut_too() {
        // A member that answers late: the reply crosses the relay after the isolation began.
        let member = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the member");
        let faults = Faults::new();
        let relay = Relay::start(member.local_addr().expect("address"), faults.clone())
            .expect("start the relay");
        let socket = client();
        socket.send_to(b"question", relay.listen).expect("send");
        let mut buf = [0u8; 64];
        member
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("set a read timeout");
        let (len, upstream) = member.recv_from(&mut buf).expect("the question arrives");
        assert_eq!(&buf[..len], b"question");
        faults.isolate(member.local_addr().expect("address").port());
        member.send_to(b"answer", upstream).expect("send");
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("set a read timeout");
        assert!(
            socket.recv_from(&mut buf).is_err(),
            "the answer was dropped"
        );
    }

    #[test]
    fn a_deaf_member_is_heard_but_hears_nothing() {
        let faults = Faults::new();
        let deaf = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the deaf member");
        let deaf_relay = Relay::start(deaf.local_addr().expect("address"), faults.clone())
            .expect("start its relay");
        let peer = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a peer");
        let peer_relay = Relay::start(peer.local_addr().expect("address"), faults.clone())
            .expect("start its relay");
        for socket in [&deaf, &peer] {
            socket
                .set_read_timeout(Some(Duration::from_millis(300)))
                .expect("set a read timeout");
        }
        let mut buf = [0u8; 64];
        faults.deafen(deaf.local_addr().expect("address").port());
        assert!(faults.is_deaf(deaf.local_addr().expect("address").port()));

        // What the deaf member sends arrives; the answer does not.
        deaf.send_to(b"append", peer_relay.listen).expect("send");
        let (len, upstream) = peer.recv_from(&mut buf).expect("the peer hears it");
        assert_eq!(&buf[..len], b"append");
        peer.send_to(b"ack", upstream).expect("send");
        assert!(deaf.recv_from(&mut buf).is_err(), "the answer was dropped");

        // What is sent to it through its own relay is dropped too; its answers go out.
        let client = client();
        client
            .send_to(b"to the deaf", deaf_relay.listen)
            .expect("send");
        assert!(deaf.recv_from(&mut buf).is_err(), "nothing reaches it");

        faults.heal_all();
        assert!(!faults.is_deaf(deaf.local_addr().expect("address").port()));
        peer.send_to(b"ack again", upstream).expect("send");
        let (len, _) = deaf.recv_from(&mut buf).expect("healed: it hears again");
        assert_eq!(&buf[..len], b"ack again");
        client.send_to(b"hello", deaf_relay.listen).expect("send");
        let (len, from) = deaf
            .recv_from(&mut buf)
            .expect("healed: its relay delivers");
        assert_eq!(&buf[..len], b"hello");
        deaf.send_to(b"welcome", from).expect("send");
        client
            .set_read_timeout(Some(Duration::from_secs(1)))
            .expect("set a read timeout");
        let (len, _) = client
            .recv_from(&mut buf)
            .expect("and its answer comes back");
        assert_eq!(&buf[..len], b"welcome");
    }

    #[test]
    fn a_killed_member_does_not_stop_the_relay() {
        let faults = Faults::new();
        let echo = Echo::start();
        let addr = echo.addr;
        let relay = Relay::start(addr, faults).expect("start the relay");
        let socket = client();
        assert!(answers(&socket, &relay, b"alive"));
        drop(echo);
        // The member's port now refuses datagrams; the relay logs and carries on.
        for _ in 0..5 {
            assert!(silent(&socket, &relay, b"anyone?"));
        }
        // The member restarts on the same port.
        let restarted = UdpSocket::bind(addr).expect("rebind the member's port");
        let mut buf = [0u8; 64];
        restarted
            .set_read_timeout(Some(Duration::from_secs(1)))
            .expect("set a read timeout");
        socket.send_to(b"again", relay.listen).expect("send");
        let (len, upstream) = restarted
            .recv_from(&mut buf)
            .expect("the relay still forwards");
        assert_eq!(&buf[..len], b"again");
        restarted.send_to(b"welcome back", upstream).expect("send");
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .expect("set a read timeout");
        let (len, from) = socket.recv_from(&mut buf).expect("the reply comes back");
        assert_eq!((&buf[..len], from), (&b"welcome back"[..], relay.listen));
    }

    #[test]
    fn dropping_the_relay_stops_its_threads() {
        let echo = Echo::start();
        let relay = Relay::start(echo.addr, Faults::new()).expect("start the relay");
        let listen = relay.listen;
        let clients: Vec<UdpSocket> = (0..4).map(|_| client()).collect();
        for socket in &clients {
            assert!(answers(socket, &relay, b"hello"));
        }
        let started = Instant::now();
        drop(relay);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "stopping took {:?}",
            started.elapsed()
        );
        // Every thread held a handle on the relay port; it is free again only once they all
        // returned and closed it.
        UdpSocket::bind(listen).expect("the relay port is free after the drop");
    }
}
