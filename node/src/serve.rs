//! The node's HTTP accept loop: one task per connection, served by hyper's HTTP/1.1 connection
//! with the node's axum router, graceful shutdown, bounds on what slow or idle clients may hold
//! (a deadline for each request's head, a cap on connections), and a connection future that
//! does not reschedule itself when it wakes itself ([`PollAgain`]).
//!
//! Why not `axum::serve`: it spawns hyper's connection future as it is, and on every request
//! with a body that future wakes its own task while it runs. Hyper's body channel wakes the
//! sender (the connection) whenever the handler takes a chunk, and the handler runs inside the
//! connection's poll. Tokio answers a task that woke itself by queueing it again as a *yield* and
//! waking a parked worker to share the work: on two cores, a futex wake-up, a context switch and
//! a worker that searches, finds nothing (or steals the connection to another core) and parks
//! again, per request. [`PollAgain`] polls the connection again at once instead, which is what
//! the wake asked for.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;

/// At most this many polls in one when the future keeps waking itself; then it yields to the
/// scheduler as any task would (Tokio's budget makes a busy connection do so).
const MAX_POLLS: usize = 8;

/// Not being polled: a wake goes to the task's waker.
const IDLE: u8 = 0;
/// Being polled: a wake is remembered and answered by polling again.
const POLLING: u8 = 1;
/// Being polled, and woken meanwhile.
const WOKEN: u8 = 2;

/// A future that, when it wakes itself while it is being polled, is polled again in the same
/// poll instead of asking the scheduler to queue its task again. Wakes at any other time (the
/// socket became readable, a timer fired) reach the task as usual.
pub struct PollAgain<F> {
    inner: Pin<Box<F>>,
    hook: Arc<Hook>,
    waker: Waker,
}

struct Hook {
    state: AtomicU8,
    task: parking_lot::Mutex<Waker>,
}

impl Wake for Hook {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut now = self.state.load(Ordering::Acquire);
        loop {
            if now == IDLE {
                return self.task.lock().wake_by_ref();
            }
            // The poll under way will see WOKEN and poll again. A write even when it already
            // says WOKEN, so that the poll sees what every waker did before it woke.
            match self
                .state
                .compare_exchange_weak(now, WOKEN, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(seen) => now = seen,
            }
        }
    }
}

impl<F: Future> PollAgain<F> {
    /// Wrap `inner`.
    pub fn new(inner: F) -> PollAgain<F> {
        let hook = Arc::new(Hook {
            state: AtomicU8::new(IDLE),
            task: parking_lot::Mutex::new(Waker::noop().clone()),
        });
        let waker = Waker::from(hook.clone());
        PollAgain {
            inner: Box::pin(inner),
            hook,
            waker,
        }
    }
}

impl<F: Future> Future for PollAgain<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        {
            let mut task = this.hook.task.lock();
            if !task.will_wake(cx.waker()) {
                task.clone_from(cx.waker());
            }
        }
        let mut inner_cx = Context::from_waker(&this.waker);
        for _ in 0..MAX_POLLS {
            this.hook.state.store(POLLING, Ordering::Release);
            let polled = this.inner.as_mut().poll(&mut inner_cx);
            let woken = this
                .hook
                .state
                .compare_exchange(POLLING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                .is_err();
            if polled.is_ready() {
                this.hook.state.store(IDLE, Ordering::Release);
                return polled;
            }
            if !woken {
                return Poll::Pending;
            }
        }
        // Still waking itself: let the scheduler run others first.
        this.hook.state.store(IDLE, Ordering::Release);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// How many connections a node serves at once by default: half of the process's limit on open
/// files (the rest is for models, caches and the mesh), at most 10,000; 512 where the limit
/// cannot be read.
pub fn default_max_connections() -> usize {
    open_files_limit().map_or(512, |n| (n / 2).clamp(16, 10_000))
}

/// The soft limit on open files, from `/proc/self/limits`.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The protocol a listener speaks, for the words of a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1: refused with a 503 response.
    Http1,
    /// HTTP/2 (gRPC): refused with a GOAWAY frame that carries the reason.
    Http2,
}

/// The default cap on one client's connections for a node serving `max` at once: a quarter of
/// them, so that no one client (one IPv4 address, one IPv6 /64) can take every slot, but at
/// least 256 (a proxy or a sidecar on the node's host, or a benchmark, may hold that many for
/// all its clients); no cap of its own (`max`) when that would leave the others less than a
/// quarter.
pub fn default_max_connections_per_client(max: usize) -> usize {
    let cap = (max / 4).max(256);
    if cap > max * 3 / 4 { max } else { cap }
}

/// Refusals told their reason at once; past them, a refused connection is closed at once.
const REFUSING: usize = 64;

/// The node's connection slots, shared by its HTTP and gRPC listeners: open connections are
/// open files, and the process's other files (models, the cache, the mesh) need some too. One
/// client may hold at most `per_client` of them: past it, its new connections are refused with a
/// clear reason, while other clients' connections are served.
#[derive(Clone, Debug)]
pub struct Slots {
    free: Arc<tokio::sync::Semaphore>,
    max: usize,
    per_client: usize,
    /// How many connections each client holds now (clients holding none are not kept).
    clients: Arc<parking_lot::Mutex<std::collections::HashMap<Client, usize>>>,
    /// Connections open now, and refused so far (Prometheus).
    open: prometheus::IntGauge,
    refused: prometheus::IntCounter,
    /// Refusals being told their reason now: a connection refused past these is closed at once.
    refusing: Arc<tokio::sync::Semaphore>,
    /// When a refusal was last logged at warn level (seconds since `Slots::new`, plus one).
    warned: Arc<std::sync::atomic::AtomicU64>,
    started: std::time::Instant,
    /// How long a refused HTTP/2 client's first request is waited for.
    opening: Duration,
}

/// Who a connection comes from, for the per-client cap: an IPv4 address, or an IPv6 /64 (one
/// host is given a whole /64, and could take a new address for every connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Client(std::net::IpAddr);

impl Client {
    /// The client of a connection from `addr`.
    pub fn of(addr: std::net::IpAddr) -> Client {
        match addr {
            std::net::IpAddr::V4(v4) => Client(v4.into()),
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Client(v4.into()),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Client(std::net::Ipv6Addr::from(prefix).into())
                }
            },
        }
    }
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            std::net::IpAddr::V4(v4) => write!(f, "{v4}"),
            std::net::IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// One connection's hold on the node's [`Slots`]: its slot, and its place in its client's
/// count, both given back when it is dropped.
#[derive(Debug)]
pub struct Slot {
    _free: tokio::sync::OwnedSemaphorePermit,
    _client: Option<Counted>,
    open: prometheus::IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A connection counted against its client's cap until dropped.
#[derive(Debug)]
struct Counted {
    client: Client,
    clients: Arc<parking_lot::Mutex<std::collections::HashMap<Client, usize>>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut clients = self.clients.lock();
        if let Some(n) = clients.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                clients.remove(&self.client);
            }
        }
    }
}

impl Slots {
    /// Room for `max` connections at once, at most `per_client` of them from one client (no
    /// cap of its own when `per_client` is at least `max`).
    pub fn new(max: usize, per_client: usize) -> Slots {
        let max = max.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        Slots {
            free: Arc::new(tokio::sync::Semaphore::new(max)),
            max,
            per_client: per_client.max(1),
            clients: Arc::default(),
            open: prometheus::IntGauge::new("connections_open", "unregistered").expect("a name"),
            refused: prometheus::IntCounter::new("connections_refused", "unregistered")
                .expect("a name"),
            refusing: Arc::new(tokio::sync::Semaphore::new(REFUSING)),
            warned: Arc::default(),
            started: std::time::Instant::now(),
            opening: Duration::from_secs(1),
        }
    }

    /// The same slots, waiting at most `opening` (the header timeout) for a refused HTTP/2
    /// client's first request, to answer it with the reason.
    pub fn opening(mut self, opening: Duration) -> Slots {
        self.opening = opening;
        self
    }

    /// The same slots, counting open and refused connections in `open` and `refused`.
    pub fn reporting(
        mut self,
        open: prometheus::IntGauge,
        refused: prometheus::IntCounter,
    ) -> Slots {
        self.open = open;
        self.refused = refused;
        self
    }

    /// How many connections `client` holds now.
    pub fn held_by(&self, client: Client) -> usize {
        self.clients.lock().get(&client).copied().unwrap_or(0)
    }

    /// Count a connection from `client` against its cap; `None` when it holds its cap already.
    fn count(&self, client: Client) -> Option<Option<Counted>> {
        if self.per_client >= self.max {
            return Some(None);
        }
        let mut clients = self.clients.lock();
        let held = clients.entry(client).or_insert(0);
        if *held >= self.per_client {
            return None;
        }
        *held += 1;
        Some(Some(Counted {
            client,
            clients: self.clients.clone(),
        }))
    }

    /// The next connection on `listener` (with `TCP_NODELAY`) and the slot it holds. While every
    /// slot is taken, the connection just accepted waits for one and no other is accepted, so
    /// further connections wait in the listen backlog. The slot is taken after the accept, so that
    /// a listener with nobody connecting holds none. Dropping the future while it waits for a
    /// slot closes the connection it accepted. A connection from a client that holds its cap
    /// already is refused in `protocol`'s words, and closed.
    pub async fn accept(
        &self,
        listener: &tokio::net::TcpListener,
        protocol: Protocol,
    ) -> (tokio::net::TcpStream, Slot) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            };
            let client = Client::of(peer.ip());
            let Some(counted) = self.count(client) else {
                self.refuse(tcp, protocol, client);
                continue;
            };
            // Responses go out as soon as they are written: no Nagle delay on small answers
            // (for gRPC, a unary call's answer waited on the peer's delayed ACK).
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("could not set TCP_NODELAY: {e}");
            }
            let free = match self.free.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    tracing::warn!(
                        "serving the limit of {} connections: new ones wait until one closes",
                        self.max
                    );
                    match self.free.clone().acquire_owned().await {
                        Ok(slot) => slot,
                        // The semaphore is never closed.
                        Err(_) => continue,
                    }
                }
            };
            self.open.inc();
            let slot = Slot {
                _free: free,
                _client: counted,
                open: self.open.clone(),
            };
            return (tcp, slot);
        }
    }

    /// Refuse `tcp`, from `client` over its cap: told why while fewer than [`REFUSING`]
    /// refusals are under way, closed at once past them (each refusal holds its socket for up
    /// to two seconds, and nothing else bounds how fast a client can connect).
    fn refuse(&self, tcp: tokio::net::TcpStream, protocol: Protocol, client: Client) {
        self.refused.inc();
        // Logged at warn level once a minute at most (an attacker would fill the log), at debug
        // level otherwise.
        let now = self.started.elapsed().as_secs() + 1;
        let last = self.warned.load(Ordering::Relaxed);
        if (last == 0 || now >= last + 60)
            && self
                .warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                "refusing connections from {client}: it holds its limit of {} \
                 (--max-connections-per-client); more refusals are counted in \
                 sophon_connections_refused_total",
                self.per_client
            );
        } else {
            tracing::debug!("refused a connection from {client}");
        }
        match self.refusing.clone().try_acquire_owned() {
            Ok(permit) => {
                let (reason, opening) = (self.refusal(client), self.opening);
                tokio::spawn(async move {
                    crate::refuse::refuse(tcp, protocol, reason, opening).await;
                    drop(permit);
                });
            }
            Err(_) => drop(tcp),
        }
    }

    fn refusal(&self, client: Client) -> String {
        format!(
            "too many connections from {client}: each client may hold {} at once \
             (--max-connections-per-client); close idle ones or reuse them",
            self.per_client
        )
    }
}

/// Accept connections on `listener` and serve `app` on each until `shutdown` resolves; then stop
/// accepting, ask each connection to finish its request in flight and close, and return once all
/// have (the caller bounds that wait). A connection holds one of the node's connection slots
/// while it lives, must send each request's head within the header timeout of the server waiting
/// for it (which is also how long it may stay idle between requests), and is closed when it takes
/// nothing of a response for the body timeout.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    state: &crate::http::ApiState,
    shutdown: impl Future<Output = ()>,
) {
    let slots = &state.connections;
    let (header_timeout, send_timeout) = (state.config.header_timeout, state.config.body_timeout);
    // Connections wait for `stop` to close (its receiver is dropped on shutdown), and hold a
    // receiver of `live` until they end.
    let (stop, stopping) = tokio::sync::watch::channel(());
    let (live, alive) = tokio::sync::watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (tcp, slot) = tokio::select! {
            accepted = slots.accept(&listener, Protocol::Http1) => accepted,
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        let alive = alive.clone();
        tokio::spawn(PollAgain::new(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(Conn::new(tcp, slot, send_timeout)), service);
            tokio::pin!(conn);
            let served = tokio::select! {
                served = conn.as_mut() => served,
                () = stop.closed() => {
                    // Finish the request under way (its body may still be arriving), then close.
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            };
            if let Err(e) = served {
                tracing::trace!("connection ended: {e}");
            }
            drop(alive);
        }));
    }
    // Refuse new connections at once, so that clients try elsewhere while the drain goes on.
    drop(listener);
    drop(stopping);
    drop(alive);
    live.closed().await;
}

/// What an HTTP/2 client sends first: the 24-byte preface and the 9-byte head of its SETTINGS
/// frame.
const HTTP2_OPENING: usize = 24 + 9;

/// One served connection, HTTP/1.1 or HTTP/2. It holds one of the node's [`Slots`] while it
/// lives, and is closed:
/// - when a write waits longer than its send timeout: a client that asks for a response and never
///   reads it would otherwise hold its slot, and the response, forever. Each write that goes
///   through starts the wait afresh, so a slow client that keeps reading is served (as nginx's
///   `send_timeout`);
/// - for HTTP/2, unless it opens HTTP/2 (its preface and the head of its SETTINGS frame) within a
///   deadline: tonic's server waits for a client's preface forever, and a deadline that any first
///   byte met let a client hold its slot by sending one byte. (HTTP/1.1 has hyper's header
///   timeout for that.)
pub struct Conn {
    tcp: tokio::net::TcpStream,
    _slot: Slot,
    send_timeout: Duration,
    /// Set while a write waits on a full socket buffer.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Until an HTTP/2 client's opening is in: the bytes received so far, and the deadline.
    opening: Option<(usize, Pin<Box<tokio::time::Sleep>>)>,
    /// A gRPC connection's answers waiting on the client; closed when one waits too long.
    watch: Option<std::sync::Arc<crate::grpc::answers::Watch>>,
}

impl Conn {
    /// `tcp` holding `slot`, whose writes may wait at most `send_timeout` each.
    pub fn new(tcp: tokio::net::TcpStream, slot: Slot, send_timeout: Duration) -> Conn {
        Conn {
            tcp,
            _slot: slot,
            send_timeout,
            stalled: None,
            opening: None,
            watch: None,
        }
    }

    /// The same connection, closed when `watch` says (a gRPC answer waited on the client too
    /// long).
    pub fn watched(mut self, watch: std::sync::Arc<crate::grpc::answers::Watch>) -> Conn {
        self.watch = Some(watch);
        self
    }

    /// The connection's watch, if it has one.
    pub fn watch(&self) -> Option<&std::sync::Arc<crate::grpc::answers::Watch>> {
        self.watch.as_ref()
    }

    /// The same connection, closed unless it opens HTTP/2 within `deadline`.
    pub fn opening_http2(mut self, deadline: Duration) -> Conn {
        self.opening = Some((0, Box::pin(tokio::time::sleep(deadline))));
        self
    }

    /// The connection.
    pub fn tcp(&self) -> &tokio::net::TcpStream {
        &self.tcp
    }

    /// A write's outcome: once it went through the wait starts afresh; while it waits, an error
    /// once it has waited past the send timeout.
    fn wrote<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.send_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stalled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the client took nothing of the response for {} s",
                    timeout.as_secs_f64()
                ),
            )));
        }
        Poll::Pending
    }
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(watch) = &self.watch
            && watch.closed(cx)
        {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took none of an answer within the body timeout",
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.tcp).poll_read(cx, buf);
        let Some((received, deadline)) = self.opening.as_mut() else {
            return polled;
        };
        if polled.is_ready() {
            *received += buf.filled().len() - before;
            if *received >= HTTP2_OPENING {
                self.opening = None;
            }
        } else if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client did not open HTTP/2 within the header timeout",
            )));
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.wrote(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.wrote(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.tcp).poll_flush(cx);
        self.wrote(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// After a failed `accept`: errors of one connection are skipped; others (such as running out of
/// file descriptors) wait a moment before the next try, so that the loop does not spin.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::warn!("accepting a connection failed: {e}; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_an_ipv4_address_or_an_ipv6_64() {
        let of = |a: &str| Client::of(a.parse().expect("address")).to_string();
        assert_eq!(of("10.1.2.3"), "10.1.2.3");
        // An IPv4 client over an IPv6 socket is the same client.
        assert_eq!(of("::ffff:10.1.2.3"), "10.1.2.3");
        // Every address of one /64 is one client; the next /64 is another.
        assert_eq!(of("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(of("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::/64");
        assert_eq!(of("2001:db8:1:3::1"), "2001:db8:1:3::/64");
    }

    #[test]
    fn the_default_cap_per_client_is_a_quarter_and_at_least_256() {
        assert_eq!(default_max_connections_per_client(10_000), 2_500);
        assert_eq!(default_max_connections_per_client(512), 256);
        // Where 256 would leave the others less than a quarter, no cap of its own: a client
        // may take every slot, and waits in the backlog past them as before.
        assert_eq!(default_max_connections_per_client(300), 300);
        assert_eq!(default_max_connections_per_client(8), 8);
    }
    use std::sync::atomic::AtomicUsize;

    /// Counts the wakes that reach the task.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_future_that_wakes_itself_is_polled_again_without_waking_its_task() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut polls = 0;
        let mut fut = std::pin::pin!(PollAgain::new(std::future::poll_fn(|cx| {
            polls += 1;
            if polls < 3 {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(polls)
            }
        })));
        assert_eq!(fut.as_mut().poll(&mut cx), Poll::Ready(3));
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "the task was not woken");
    }

    #[test]
    fn wakes_after_the_poll_reach_the_task_and_endless_self_wakes_yield() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let stored = Arc::new(parking_lot::Mutex::new(None::<Waker>));
        let keep = stored.clone();
        let mut fut = std::pin::pin!(PollAgain::new(std::future::poll_fn(move |cx| {
            *keep.lock() = Some(cx.waker().clone());
            Poll::<()>::Pending
        })));
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        stored.lock().take().expect("waker kept").wake();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "a later wake reaches the task"
        );

        let spins = std::cell::Cell::new(0);
        let mut spinning = std::pin::pin!(PollAgain::new(std::future::poll_fn(|cx| {
            spins.set(spins.get() + 1);
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        })));
        assert!(spinning.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            spins.get(),
            MAX_POLLS,
            "polled again a bounded number of times"
        );
        assert_eq!(count.0.load(Ordering::SeqCst), 2, "then the task is woken");
    }
}
