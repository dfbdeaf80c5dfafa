//! gRPC answers counted against the node's bytes in flight until the client takes them, and a
//! connection closed when one of its answers waits on the client for longer than the body
//! timeout.
//!
//! Once a handler has returned, tonic encodes its answer into one frame and hyper hands it to
//! h2, which holds it until the client's HTTP/2 flow-control window lets it go. A client that
//! grants no window never blocks the node on its socket, so no write deadline fires: it could
//! leave an answer of up to `max_output_bytes` on each of its streams, uncounted, for as long as
//! it kept its connection open (it only has to answer pings). [`Answering`] wraps every gRPC
//! response body:
//! - each data frame takes permits of the node's bytes in flight for its length when tonic
//!   yields it, and keeps them until the client has taken it: the frame goes to hyper as all of
//!   it but its last byte, then that byte (views of the same buffer, no copy). hyper hands a
//!   piece to h2 only once the client's window has room beyond what h2 already holds, and asks
//!   for the next piece right after, so when it asks past the last byte the rest has gone or is
//!   going, and the permits go back (or when the stream ends). A frame that finds no room ends
//!   the call with `UNAVAILABLE`, as a request that finds none is refused;
//! - while its last byte waits for the client's window, the answer is on its connection's
//!   [`Watch`]; a sweep closes a connection with an answer that has waited longer than the body
//!   timeout (a client must take an answer within the body timeout, as it must send a request's
//!   body within it; one that stops reading its socket is closed too), which ends its streams
//!   and frees what they hold.
//!
//! Smaller pieces (a watch on each 64 KiB or 1 MiB that the client takes) cost a wait of the
//! stream's task per piece: 4 MiB answers took 40–60 % more of the node's CPU per call. One
//! split costs about 10 % there, and nothing for an answer the window takes at once.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::http::ApiState;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One gRPC connection's answers waiting on the client, and the switch that closes it.
#[derive(Default)]
pub struct Watch {
    /// Since when each waiting answer has waited (`None`: a slot not waiting now), and the
    /// free slots.
    waiting: Mutex<Slots>,
    closed: AtomicBool,
    reader: AtomicWaker,
}

#[derive(Default)]
struct Slots {
    since: Vec<Option<Instant>>,
    free: Vec<usize>,
}

impl Watch {
    /// Whether the sweep closed the connection; registers `cx` to be woken when it does.
    pub fn closed(&self, cx: &Context<'_>) -> bool {
        self.reader.register(cx.waker());
        self.closed.load(Ordering::Acquire)
    }

    fn take_slot(&self) -> usize {
        let mut slots = self.waiting.lock().expect("watch");
        match slots.free.pop() {
            Some(i) => i,
            None => {
                slots.since.push(None);
                slots.since.len() - 1
            }
        }
    }

    fn set(&self, slot: usize, since: Option<Instant>) {
        self.waiting.lock().expect("watch").since[slot] = since;
    }

    fn give_back(&self, slot: usize) {
        let mut slots = self.waiting.lock().expect("watch");
        slots.since[slot] = None;
        slots.free.push(slot);
    }

    /// The longest wait of an answer on this connection now.
    fn longest(&self, now: Instant) -> Duration {
        let slots = self.waiting.lock().expect("watch");
        slots
            .since
            .iter()
            .flatten()
            .map(|since| now.saturating_duration_since(*since))
            .max()
            .unwrap_or_default()
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.reader.wake();
    }
}

/// The node's gRPC connections, swept for answers that wait too long.
#[derive(Default)]
pub struct Watches(Mutex<Vec<Weak<Watch>>>);

impl Watches {
    /// A new connection's watch.
    pub fn watch(&self) -> Arc<Watch> {
        let watch = Arc::new(Watch::default());
        self.0.lock().expect("watches").push(Arc::downgrade(&watch));
        watch
    }

    /// Close the connections with an answer that has waited longer than `patience`; forget
    /// the ones that ended.
    fn sweep(&self, patience: Duration) {
        let now = Instant::now();
        let mut watches = self.0.lock().expect("watches");
        watches.retain(|w| {
            let Some(watch) = w.upgrade() else {
                return false;
            };
            if watch.longest(now) > patience {
                tracing::debug!(
                    "closing a gRPC connection whose client took none of an answer for {} s",
                    patience.as_secs_f64()
                );
                watch.close();
            }
            true
        });
    }

    /// Sweep every quarter of `patience` (10 ms to 1 s) until `watches` is dropped.
    pub async fn sweep_every(watches: Weak<Watches>, patience: Duration) {
        let tick = (patience / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Some(watches) = watches.upgrade() else {
                return;
            };
            watches.sweep(patience);
        }
    }
}

/// What tonic learns of a gRPC connection: its addresses, and its watch.
#[derive(Clone)]
pub struct ConnInfo {
    /// The connection's addresses.
    pub tcp: tonic::transport::server::TcpConnectInfo,
    /// The connection's answers waiting on the client.
    pub watch: Option<Arc<Watch>>,
}

/// A tower layer's service: every response body is an [`Answer`] (see the module's
/// documentation).
#[derive(Clone)]
pub struct Answering<S> {
    inner: S,
    state: Arc<ApiState>,
}

impl<S> Answering<S> {
    /// Wrap `inner`, counting against `state`'s bytes in flight.
    pub fn new(inner: S, state: Arc<ApiState>) -> Answering<S> {
        Answering { inner, state }
    }
}

impl<S, B> tower::Service<http::Request<tonic::body::Body>> for Answering<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<Answer<B>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let watch = request
            .extensions()
            .get::<ConnInfo>()
            .and_then(|info| info.watch.clone());
        let state = self.state.clone();
        let called = self.inner.call(request);
        Box::pin(async move {
            let response = called.await?;
            Ok(response.map(|inner| Answer {
                inner: Some(inner),
                next: None,
                state,
                watch,
                slot: None,
                rest: Bytes::new(),
                held: 0,
                ended: false,
            }))
        })
    }
}

/// A response body whose data is counted until the client takes it (see the module's
/// documentation).
pub struct Answer<B> {
    /// tonic's body, until it has yielded its last frame.
    inner: Option<B>,
    /// Its frame after the current one, when it was ready early.
    next: Option<Result<Frame<Bytes>, BoxError>>,
    state: Arc<ApiState>,
    watch: Option<Arc<Watch>>,
    /// This answer's slot in the watch, once it has handed a piece.
    slot: Option<usize>,
    /// What is left of the current frame.
    rest: Bytes,
    /// Permits of the bytes in flight held for the current frame.
    held: usize,
    ended: bool,
}

impl<B> Answer<B> {
    fn release(&mut self) {
        self.state
            .inflight_bytes
            .add_permits(std::mem::take(&mut self.held));
    }

    /// Hand the next piece of the current frame: all of it but its last byte, then that byte.
    /// hyper asks for a piece right after handing h2 the one before, but hands it over (and asks
    /// for the next) only once the client's window has room beyond what h2 holds: so when hyper
    /// asks past the last byte, everything before it has gone or is going, and until then the
    /// answer waits on the client.
    fn piece(&mut self) -> Frame<Bytes> {
        let n = self
            .rest
            .len()
            .saturating_sub(1)
            .max(1)
            .min(self.rest.len());
        let piece = self.rest.split_to(n);
        if let Some(watch) = &self.watch {
            let slot = *self.slot.get_or_insert_with(|| watch.take_slot());
            watch.set(slot, Some(Instant::now()));
        }
        Frame::data(piece)
    }
}

impl<B> Drop for Answer<B> {
    fn drop(&mut self) {
        self.release();
        if let (Some(watch), Some(slot)) = (&self.watch, self.slot) {
            watch.give_back(slot);
        }
    }
}

impl<B> Body for Answer<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        // Asked again: the piece handed before has room in the client's window.
        if let (Some(watch), Some(slot)) = (&this.watch, this.slot) {
            watch.set(slot, None);
        }
        if !this.rest.is_empty() {
            return Poll::Ready(Some(Ok(this.piece())));
        }
        this.release();
        if this.ended {
            return Poll::Ready(None);
        }
        let frame = match this.next.take() {
            Some(frame) => frame,
            None => {
                let Some(inner) = this.inner.as_mut() else {
                    return Poll::Ready(None);
                };
                match Pin::new(inner).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => {
                        this.inner = None;
                        return Poll::Ready(None);
                    }
                    Poll::Ready(Some(frame)) => frame.map_err(Into::into),
                }
            }
        };
        let data = match frame.map(Frame::into_data) {
            Ok(Ok(data)) => data,
            Ok(Err(other)) => return Poll::Ready(Some(Ok(other))),
            Err(e) => return Poll::Ready(Some(Err(e))),
        };
        if data.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if !super::inflate::acquire(&this.state, data.len()) {
            // The answer is dropped, and the call ends with the error a request finding no room
            // gets.
            this.ended = true;
            let mut trailers = http::HeaderMap::new();
            let status = tonic::Status::unavailable(super::no_room(&this.state));
            if status.add_header(&mut trailers).is_err() {
                return Poll::Ready(Some(Err("no room for the answer".into())));
            }
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        this.held = data.len();
        this.rest = data;
        // A unary answer's trailers are ready with its data: take them now, so that tonic's
        // body (and its encoding buffer) goes while the answer waits on the client.
        if let Some(inner) = this.inner.as_mut() {
            match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => {}
                Poll::Ready(None) => this.inner = None,
                Poll::Ready(Some(frame)) => {
                    let last = frame.as_ref().map_or(true, Frame::is_trailers);
                    this.next = Some(frame.map_err(Into::into));
                    if last {
                        this.inner = None;
                    }
                }
            }
        }
        Poll::Ready(Some(Ok(this.piece())))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
            || (self.rest.is_empty()
                && self.next.is_none()
                && self.inner.as_ref().is_none_or(Body::is_end_stream))
    }

    fn size_hint(&self) -> SizeHint {
        if self.ended {
            return SizeHint::with_exact(0);
        }
        let mut hint = self
            .inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let next = match &self.next {
            Some(Ok(frame)) => frame.data_ref().map_or(0, Bytes::len),
            _ => 0,
        };
        let more = (self.rest.len() + next) as u64;
        hint.set_lower(hint.lower().saturating_add(more));
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper.saturating_add(more));
        }
        hint
    }
}
