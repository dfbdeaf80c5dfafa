//! Answers counted against the node's bytes in flight until the client takes them, and a gRPC
//! connection closed when its client takes nothing of the answers waiting on it for longer than
//! the body timeout.
//!
//! Once a handler has returned, tonic encodes its answer into one frame and hyper hands it to
//! h2, which holds it until the client's HTTP/2 flow-control window lets it go. A client that
//! grants no window never blocks the node on its socket, so no write deadline fires: it could
//! leave an answer of up to `max_output_bytes` on each of its streams, uncounted, for as long as
//! it kept its connection open (it only has to answer pings). [`Answering`] wraps every gRPC
//! response body in an [`Answer`]:
//! - each data frame takes permits of the node's bytes in flight for its length when tonic
//!   yields it, and holds them in the frame's buffer itself ([`Bytes::from_owner`]): they go
//!   back when the last view of it is dropped, that is when hyper and h2 have written all of it
//!   or the stream ended. A frame that finds no room is refused as a request that finds none
//!   is: `UNAVAILABLE` for a unary call; on `ModelStreamInfer`, an error answer in its place, and
//!   the stream goes on (as `Waiting::count` answers). A frame under [`SMALL`] (64 KiB) with no
//!   room goes uncounted instead, so health checks keep working on a node at its limit;
//! - the frame goes to hyper in views of the same buffer: [`PIECE`]s of 4 MiB, then its last
//!   byte alone. hyper hands a piece to h2 only once the client's window has room beyond what
//!   h2 already holds, and asks for the next right after; so each piece after the first waits
//!   on the client while it takes the one before. While a piece waits, the answer is on its
//!   connection's [`Watch`]. A sweep (every quarter of the body timeout, and at least every
//!   second) closes a connection with a piece that has waited longer than the body timeout
//!   while the client took no piece of any answer on it (a frame's first piece needs one byte
//!   of window only, so taking it is not progress), or longer than [`HARD_LIMIT`] body timeouts
//!   whatever it took; that ends its streams and frees what they hold. Progress on any answer
//!   counts, so a slow link that multiplexes many answers (h2 serves them one after another) is
//!   not closed. HTTP/2 leaves the node no smaller lever: a body cannot end its own stream
//!   while hyper waits on the window instead of asking it for more, so closing the connection
//!   ends every call on it.
//!
//! HTTP/1.1 inference answers of 64 KiB or more go through [`Answer::http`], counted the same
//! way (their permits taken before the headers go); the connection's write deadline closes a
//! client that stops reading.
//!
//! Smaller pieces (64 KiB or 1 MiB, each watched) cost a wait of the stream's task per piece:
//! 4 MiB answers took 40–60 % more of the node's CPU per call. A 4 MiB answer in one piece and
//! its last byte costs about 11 %, and an answer the window takes at once nothing measurable
//! (`docs/BENCHMARKS.md`).
//!
//! Left: a client that keeps taking pieces of one stream's answers while it takes none on its
//! other streams keeps those answers (counted) for up to [`HARD_LIMIT`] body timeouts; and a
//! stream's answer is uncounted for the moment between its `Waiting` count and this one (while
//! tonic encodes it), so at the limit an answer already made can become an error answer.

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

/// A frame smaller than this that finds no room in the bytes in flight goes uncounted instead of
/// refused: health checks and readiness answers keep working on a node at its limit.
pub const SMALL: usize = 64 << 10;

/// However the client takes its other answers, one piece may wait at most this many body
/// timeouts.
pub const HARD_LIMIT: u32 = 4;

/// How much of an answer goes to h2 at a time: the client must take each piece within the body
/// timeout.
pub const PIECE: usize = 4 << 20;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One gRPC connection's answers waiting on the client, and the switch that closes it.
pub struct Watch {
    /// Since when each waiting answer has waited (`None`: a slot not waiting now), and the
    /// free slots.
    waiting: Mutex<Slots>,
    closed: AtomicBool,
    reader: AtomicWaker,
}

struct Slots {
    since: Vec<Option<Instant>>,
    free: Vec<usize>,
    /// When the client last took a piece of any answer on this connection.
    progress: Instant,
}

impl Default for Watch {
    fn default() -> Watch {
        Watch {
            waiting: Mutex::new(Slots {
                since: Vec::new(),
                free: Vec::new(),
                progress: Instant::now(),
            }),
            closed: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        }
    }
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

    /// A piece handed: the answer waits on the client from now.
    fn waits(&self, slot: usize) {
        self.waiting.lock().expect("watch").since[slot] = Some(Instant::now());
    }

    /// Asked again: the piece the answer waited with has room in the client's window, and
    /// when `progress`, the client took a piece of the answer.
    fn taken(&self, slot: usize, progress: bool) {
        let mut slots = self.waiting.lock().expect("watch");
        if slots.since[slot].take().is_some() && progress {
            slots.progress = Instant::now();
        }
    }

    fn give_back(&self, slot: usize) {
        let mut slots = self.waiting.lock().expect("watch");
        slots.since[slot] = None;
        slots.free.push(slot);
    }

    /// Whether an answer on this connection has waited on the client longer than `patience`
    /// while the client took no piece of any answer on it, or longer than [`HARD_LIMIT`] times
    /// `patience` whatever it took.
    fn stuck(&self, now: Instant, patience: Duration) -> bool {
        let slots = self.waiting.lock().expect("watch");
        let longest = slots
            .since
            .iter()
            .flatten()
            .map(|since| now.saturating_duration_since(*since))
            .max()
            .unwrap_or_default();
        longest > patience.saturating_mul(HARD_LIMIT)
            || (longest > patience && now.saturating_duration_since(slots.progress) > patience)
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

    /// Close the connections with an answer that has waited longer than `patience` while their
    /// client took nothing; forget the ones that ended.
    fn sweep(&self, patience: Duration) {
        let now = Instant::now();
        let mut watches = self.0.lock().expect("watches");
        watches.retain(|w| {
            let Some(watch) = w.upgrade() else {
                return false;
            };
            if !watch.closed.load(Ordering::Acquire) && watch.stuck(now, patience) {
                tracing::debug!(
                    "closing a gRPC connection whose client took nothing of its answers for {} s",
                    patience.as_secs_f64()
                );
                watch.close();
            }
            true
        });
    }

    /// Sweep every quarter of `patience` (and at least every second, at most every 10 ms) until
    /// `watches` is dropped.
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

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let info = request.extensions().get::<ConnInfo>().cloned();
        let watch = info.as_ref().and_then(|info| info.watch.clone());
        // tonic's `Request::remote_addr` looks for its own connection info.
        if let Some(info) = info {
            request.extensions_mut().insert(info.tcp);
        }
        let refusal = if request.uri().path().ends_with("/ModelStreamInfer") {
            Refusal::Stream
        } else {
            Refusal::Status
        };
        let state = self.state.clone();
        let called = self.inner.call(request);
        Box::pin(async move {
            let response = called.await?;
            Ok(response.map(|inner| Answer::new(inner, state, watch, refusal, 0)))
        })
    }
}

/// A response body whose data is counted until the client takes it (see the module's
/// documentation).
pub struct Answer<B> {
    inner: B,
    state: Arc<ApiState>,
    watch: Option<Arc<Watch>>,
    /// This answer's slot in the watch, once it has handed a piece.
    slot: Option<usize>,
    /// What a frame that finds no room becomes.
    refusal: Refusal,
    /// Permits taken for this body before it was polled (an HTTP answer of known size).
    prepaid: usize,
    /// What is left of the current frame.
    rest: Bytes,
    /// How many pieces of the current frame have gone to hyper.
    handed: u32,
    ended: bool,
}

/// A frame's bytes and the permits of the bytes in flight they hold, given back when the last
/// view of them (a piece hyper or h2 still holds) is dropped.
struct Counted {
    data: Bytes,
    state: Arc<ApiState>,
    permits: usize,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.state.inflight_bytes.add_permits(self.permits);
    }
}

/// What a frame that finds no room in the bytes in flight becomes.
#[derive(Clone, Copy)]
enum Refusal {
    /// `UNAVAILABLE`, which ends the call.
    Status,
    /// On `ModelStreamInfer`, an error answer for each answer in the frame; the stream goes on.
    Stream,
    /// An error, which cuts the answer off (an HTTP answer whose headers have gone).
    Cut,
}

impl<B> Answer<B> {
    /// An HTTP/1.1 answer's body, counted until hyper has handed all of it but less than its
    /// write buffer (about 400 KiB) to the socket: `prepaid` permits were taken for it already
    /// (its size, when known); the rest is taken as it comes, and a part with no room cuts the
    /// answer off. The connection's write deadline closes a client that stops reading.
    pub fn http(state: Arc<ApiState>, inner: B, prepaid: usize) -> Answer<B> {
        Answer::new(inner, state, None, Refusal::Cut, prepaid)
    }

    fn new(
        inner: B,
        state: Arc<ApiState>,
        watch: Option<Arc<Watch>>,
        refusal: Refusal,
        prepaid: usize,
    ) -> Answer<B> {
        Answer {
            inner,
            state,
            watch,
            slot: None,
            refusal,
            prepaid,
            rest: Bytes::new(),
            handed: 0,
            ended: false,
        }
    }

    /// Hand the next piece of the current frame: [`PIECE`] bytes at a time (the last of them
    /// up to a quarter more), then its last byte alone. hyper asks for a piece right after
    /// handing h2 the one before, but hands it to h2 (and asks for the next) only once the
    /// client's window has room beyond what h2 holds: so each piece waits on the client while
    /// it takes the one before, and when hyper asks past the last byte the rest has gone, or
    /// h2 holds less than its send buffer (400 KiB) of it with window to send it.
    fn piece(&mut self) -> Frame<Bytes> {
        let len = self.rest.len();
        let n = match len.saturating_sub(1) {
            0 => len,
            before_last if before_last <= PIECE + PIECE / 4 => before_last,
            _ => PIECE,
        };
        let piece = self.rest.split_to(n);
        self.handed += 1;
        if let Some(watch) = &self.watch {
            let slot = *self.slot.get_or_insert_with(|| watch.take_slot());
            watch.waits(slot);
        }
        Frame::data(piece)
    }

    /// What goes in place of a frame that found no room in the bytes in flight (see
    /// [`Refusal`]): on `ModelStreamInfer` an error answer for each answer in it, as
    /// `Waiting::count` answers; otherwise `UNAVAILABLE`, as a request that finds no room is
    /// refused, or for HTTP an error.
    fn refused(&mut self, data: &Bytes) -> Result<Frame<Bytes>, BoxError> {
        let message = super::no_room(&self.state);
        match self.refusal {
            Refusal::Stream => {
                use prost::Message as _;
                let mut out = Vec::new();
                for answer in messages_in(data) {
                    // Named as the answer it replaces, so that the client knows which of its
                    // requests failed.
                    let answer = super::pb::ModelStreamInferResponse {
                        error_message: message.clone(),
                        infer_response: named_in(answer),
                    }
                    .encode_to_vec();
                    out.push(0);
                    out.extend_from_slice(&(answer.len() as u32).to_be_bytes());
                    out.extend_from_slice(&answer);
                }
                Ok(Frame::data(Bytes::from(out)))
            }
            Refusal::Status => {
                self.ended = true;
                let mut trailers = http::HeaderMap::new();
                // The message is plain ASCII, which a header value takes.
                let _ = tonic::Status::unavailable(message).add_header(&mut trailers);
                Ok(Frame::trailers(trailers))
            }
            Refusal::Cut => {
                self.ended = true;
                Err(message.into())
            }
        }
    }
}

impl<B> Drop for Answer<B> {
    fn drop(&mut self) {
        self.state.inflight_bytes.add_permits(self.prepaid);
        if let (Some(watch), Some(slot)) = (&self.watch, self.slot) {
            watch.give_back(slot);
        }
    }
}

/// The gRPC messages (a flag byte and a big-endian length before each) that `data` holds, each
/// without its prefix: at least one (a frame that is not whole messages cannot come from tonic;
/// its last is cut to what there is).
fn messages_in(data: &[u8]) -> Vec<&[u8]> {
    let (mut at, mut out) = (0, Vec::new());
    while let Some(prefix) = data.get(at..).and_then(|rest| rest.get(..5)) {
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        let start = at + 5;
        let end = start.saturating_add(len).min(data.len());
        out.push(&data[start..end]);
        at = start.saturating_add(len);
    }
    if out.is_empty() {
        out.push(&[][..]);
    }
    out
}

/// The model, version and id of the request a stream's answer answers, read from the encoded
/// answer without decoding it (there is no room to): fields 1 to 3 of its `infer_response`,
/// which prost writes first. `None` when it has none (an error answer).
fn named_in(answer: &[u8]) -> Option<super::pb::ModelInferResponse> {
    use prost::encoding::{WireType, decode_key, decode_varint};
    fn delimited<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = usize::try_from(decode_varint(buf).ok()?).ok()?;
        let (body, rest) = (buf.get(..len)?, buf.get(len..)?);
        *buf = rest;
        Some(body)
    }
    // `ModelStreamInferResponse`: error_message = 1, infer_response = 2.
    let mut buf = answer;
    let mut response = None;
    while !buf.is_empty() && response.is_none() {
        match decode_key(&mut buf).ok()? {
            (2, WireType::LengthDelimited) => response = Some(delimited(&mut buf)?),
            (_, WireType::LengthDelimited) => _ = delimited(&mut buf)?,
            _ => return None,
        }
    }
    let mut buf = response?;
    let mut named = super::pb::ModelInferResponse::default();
    while !buf.is_empty() {
        let (field @ 1..=3, WireType::LengthDelimited) = decode_key(&mut buf).ok()? else {
            break;
        };
        let text = String::from_utf8_lossy(delimited(&mut buf)?).into_owned();
        match field {
            1 => named.model_name = text,
            2 => named.model_version = text,
            _ => named.id = text,
        }
    }
    Some(named)
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
        // Asked again: the piece handed before has room in the client's window. Past a frame's
        // first piece that means the client took the piece before it (the first needs one
        // byte of window only).
        if let (Some(watch), Some(slot)) = (&this.watch, this.slot) {
            watch.taken(slot, this.handed > 1);
        }
        if !this.rest.is_empty() {
            return Poll::Ready(Some(Ok(this.piece())));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(other) => return Poll::Ready(Some(Ok(other))),
        };
        if data.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let n = data.len();
        let prepaid = n.min(this.prepaid);
        this.prepaid -= prepaid;
        let counted = prepaid == n || super::inflate::acquire(&this.state, n - prepaid);
        if !counted {
            this.state.inflight_bytes.add_permits(prepaid);
            if n >= SMALL {
                return Poll::Ready(Some(this.refused(&data)));
            }
        }
        // The permits go back when the last view of the frame is dropped: when hyper and h2
        // have written all of it, or the stream ended. A small frame with no room goes
        // uncounted (a health check's answer, say) rather than refused.
        this.rest = if counted {
            Bytes::from_owner(Counted {
                data,
                state: this.state.clone(),
                permits: n,
            })
        } else {
            data
        };
        this.handed = 0;
        Poll::Ready(Some(Ok(this.piece())))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.rest.is_empty() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.ended {
            return SizeHint::with_exact(0);
        }
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint.set_lower(inner.lower().saturating_add(rest));
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::{messages_in, named_in};
    use prost::Message as _;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7, len));
        m
    }

    #[test]
    fn a_frame_is_counted_in_whole_messages() {
        assert_eq!(messages_in(&message(10)), [&[7; 10][..]]);
        let three = [message(0), message(40_000), message(3)].concat();
        let lens: Vec<usize> = messages_in(&three).iter().map(|m| m.len()).collect();
        assert_eq!(lens, [0, 40_000, 3]);
        // A frame that is not whole messages (it cannot come from tonic) is at least one.
        assert_eq!(messages_in(&[1, 2]).len(), 1);
        assert_eq!(messages_in(&[0, 0xff, 0xff, 0xff, 0xff, 1]), [&[1u8][..]]);
    }

    #[test]
    fn a_refused_answer_is_named_as_its_request() {
        use super::super::pb;
        let answer = pb::ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(pb::ModelInferResponse {
                model_name: "mlp".into(),
                model_version: "2".into(),
                id: "req-7".into(),
                raw_output_contents: vec![vec![1; 1000]],
                ..Default::default()
            }),
        }
        .encode_to_vec();
        let named = named_in(&answer).expect("named");
        assert_eq!(
            (named.model_name.as_str(), named.model_version.as_str()),
            ("mlp", "2")
        );
        assert_eq!(named.id, "req-7");
        assert!(named.raw_output_contents.is_empty() && named.outputs.is_empty());
        // An answer without a response (an error answer) names nothing; a broken one neither.
        let error = pb::ModelStreamInferResponse {
            error_message: "failed".into(),
            infer_response: None,
        }
        .encode_to_vec();
        assert_eq!(named_in(&error), None);
        assert_eq!(named_in(&answer[..answer.len() / 2]), None);
        assert_eq!(named_in(&[0xff]), None);
    }
}
