//! gRPC request messages counted against the node's bytes in flight from the moment they
//! arrive, and compressed ones inflated by the node instead of by tonic.
//!
//! tonic reads a request's messages into a buffer of its own and decodes them before the
//! handler sees them, bounded only by the message size limit: a client could open streams that
//! each send a message of `--max-body-bytes` and never end, and the node held all of it
//! uncounted, where HTTP counts a body as it arrives. With `grpc-encoding: gzip` or `deflate`
//! it was worse: tonic inflated a 64 KiB message to the limit. [`Inflating`] sits in front of
//! tonic's decoder on every request. It reads the body's length-prefixed messages; each chunk
//! takes permits of the node's bytes in flight as it arrives. An inference message is copied
//! into one buffer, counted by its capacity, and handed to tonic whole, prefix and all, with
//! what decoding it will allocate ([`super::weigh`]) counted beside it; a compressed one is
//! first inflated, with its compressed flag cleared, through the same metered inflater that
//! HTTP bodies go through ([`crate::coding::inflate`]), counted as it inflates. The messages of
//! other calls (1 MiB at most) pass on as they arrive. What tonic has taken of a whole message
//! stays counted until the client's next frame arrives or the body ends (on a stream, until
//! tonic asks for more, but for the largest message, whose buffer tonic keeps until the stream
//! ends), and what it has taken of a message still arriving until that message is whole (see
//! [`Messages`]).
//!
//! A message over the limit, that inflates past it, or that would decode to more than the bytes
//! in flight allow at all, is `RESOURCE_EXHAUSTED`; one that is not valid in its coding, or not a
//! valid inference request, `INVALID_ARGUMENT`; and one that finds no room in the bytes in flight
//! `UNAVAILABLE`. Each ends its call only (a stream's earlier answers stand), and its permits are
//! returned.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::http;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::Frame;
use tonic::Status;

use crate::coding::{self, Coding, InflateError};
use crate::http::ApiState;

/// The length prefix of a gRPC message: a compressed flag and a big-endian length.
const PREFIX: usize = 5;

/// The largest message of a call other than an inference: metadata, configuration, statistics
/// and repository requests carry names and versions. Decoding is not weighed for them, and a
/// message of many empty map entries or repeated fields takes tens of times its size in memory,
/// so their limit keeps that small.
const OTHER_LIMIT: usize = 1 << 20;

/// A tower layer's service: every request gets a body whose messages are counted, and inflated
/// when its `grpc-encoding` is gzip or deflate (see the module's documentation).
#[derive(Clone)]
pub struct Inflating<S> {
    inner: S,
    state: Arc<ApiState>,
}

impl<S> Inflating<S> {
    /// Wrap `inner`, counting against `state`'s bytes in flight and body limit.
    pub fn new(inner: S, state: Arc<ApiState>) -> Inflating<S> {
        Inflating { inner, state }
    }
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Inflating<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let coding = match request.headers().get("grpc-encoding").map(|v| v.as_bytes()) {
            None | Some(b"identity") => None,
            Some(b"gzip") => Some(Coding::Gzip),
            Some(b"deflate") => Some(Coding::Deflate),
            // A coding tonic refuses with UNIMPLEMENTED before it reads the body.
            Some(_) => return self.inner.call(request),
        };
        let (parts, body) = request.into_parts();
        // Inference requests are weighed as prost will decode them (`weigh`); every other
        // call's messages are names and versions, and have a small limit instead.
        let inference = matches!(
            parts.uri.path(),
            "/inference.GRPCInferenceService/ModelInfer"
                | "/inference.GRPCInferenceService/ModelStreamInfer"
        );
        let limit = if inference {
            self.state.config.max_body_bytes
        } else {
            self.state.config.max_body_bytes.min(OTHER_LIMIT)
        };
        let messages = Messages {
            body,
            coding,
            limit: limit.min(u32::MAX as usize),
            weighed: inference,
            streaming: parts.uri.path() == "/inference.GRPCInferenceService/ModelStreamInfer",
            largest: 0,
            kept: 0,
            state: self.state.clone(),
            prefix: [0; PREFIX],
            prefix_len: 0,
            current: Current::Between,
            pending: Vec::new(),
            out: VecDeque::new(),
            trailers: None,
            held: 0,
            handed: 0,
            partial: 0,
            ended: false,
        };
        let frames = futures_util::stream::unfold(messages, |mut m| async move {
            let frame = m.next().await?;
            Some((frame, m))
        });
        let body = tonic::body::Body::new(http_body_util::StreamBody::new(frames));
        self.inner.call(http::Request::from_parts(parts, body))
    }
}

/// Where the body's reading stands in its messages.
#[derive(Clone, Copy)]
enum Current {
    /// Before a message, or inside its prefix.
    Between,
    /// In an uncompressed message, this many bytes of it still to pass.
    Passing(usize),
    /// In a message of this many bytes buffered until it is whole: a compressed one, to be
    /// inflated, or an inference request, to be weighed.
    Buffered { len: usize, compressed: bool },
}

/// The request body, rewritten message by message.
///
/// Every byte it holds is counted in `held`: the chunks read (by their length, as they arrive),
/// the buffer of a buffered message (by its capacity), an inflated message (by what the
/// inflater took), and, with an inference message, what decoding it will allocate. A frame queued for tonic carries its count; once tonic has taken the frame the
/// count moves to `handed`. It is given back when the client's next frame arrives or the body
/// ends (or is dropped): tonic holds a message it has read until it has decoded it, and a unary
/// call waits for the end of the body before its handler runs (which then counts the decoded
/// request itself). On a stream it goes back as soon as tonic asks for a frame again: tonic asks
/// only when it holds no whole message, and has handed the decoded ones to their handlers
/// (all but `kept`, the largest message's size, for tonic's buffer).
struct Messages {
    body: tonic::body::Body,
    /// How compressed messages are coded: none for a request without `grpc-encoding`, whose
    /// messages tonic refuses if they say they are compressed.
    coding: Option<Coding>,
    /// The largest message, before or after inflating.
    limit: usize,
    /// Whether messages are inference requests, weighed before tonic decodes them.
    weighed: bool,
    /// Whether the call is a stream, whose handler takes each message as it is decoded.
    streaming: bool,
    /// The most bytes tonic's buffer has held for one message of this stream: tonic keeps
    /// that buffer, its capacity unchanged, for as long as the stream lasts.
    largest: usize,
    /// Of `held`, the permits that count tonic's buffer on a stream (up to `largest`).
    kept: usize,
    state: Arc<ApiState>,
    /// The current message's prefix, as far as it has arrived.
    prefix: [u8; PREFIX],
    prefix_len: usize,
    current: Current,
    /// A buffered message (see [`Current::Buffered`]), as far as it has arrived.
    pending: Vec<u8>,
    /// Frames ready for tonic, each with the permits it carries and whether it ends its
    /// message.
    out: VecDeque<(Frame<Bytes>, usize, bool)>,
    /// The body's trailers, handed on after every message.
    trailers: Option<Frame<Bytes>>,
    /// Permits of the bytes in flight this body holds now.
    held: usize,
    /// Of those, the ones for frames of whole messages tonic has taken.
    handed: usize,
    /// Of those, the ones for frames tonic has taken of the message still arriving: tonic
    /// holds every frame of a message until the last, so they stay counted until that one is
    /// taken (a message sent in pieces that never ends held only its latest piece counted).
    partial: usize,
    ended: bool,
}

impl Drop for Messages {
    fn drop(&mut self) {
        self.state.inflight_bytes.add_permits(self.held);
    }
}

impl Messages {
    /// The next frame for tonic.
    async fn next(&mut self) -> Option<Result<Frame<Bytes>, Status>> {
        // On a stream, tonic asks for more only once it has decoded every whole message it
        // holds and handed it on (to the request's handler, which counts it): what it took goes
        // back now, not when the client next sends, or a stream left idle after a message would
        // keep it, and what decoding it took, counted for as long as it idles. A unary call
        // keeps its message until the body ends, so its count waits for that.
        if self.streaming {
            // tonic's buffer keeps the capacity of the largest message it has read: that much
            // stays counted until the stream ends.
            let handed = std::mem::take(&mut self.handed);
            let kept = self.largest.saturating_sub(self.kept).min(handed);
            self.kept += kept;
            self.give_back(handed - kept);
        }
        loop {
            if let Some((frame, permits, ends)) = self.out.pop_front() {
                if ends {
                    self.handed += std::mem::take(&mut self.partial) + permits;
                } else {
                    self.partial += permits;
                }
                return Some(Ok(frame));
            }
            if self.ended {
                if matches!(self.current, Current::Buffered { .. }) || self.prefix_len > 0 {
                    return Some(Err(
                        self.fail(Status::internal("the request ended inside a message"))
                    ));
                }
                self.give_back(self.handed);
                self.handed = 0;
                return self.trailers.take().map(Ok);
            }
            let read = self.body.frame().await;
            // What tonic took before has been decoded by now: it asked for more, and the
            // client sent more (or ended).
            self.give_back(self.handed);
            self.handed = 0;
            let step = match read {
                None => {
                    self.ended = true;
                    Ok(())
                }
                Some(Err(status)) => Err(status),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.read(data).await,
                    // Trailers end the body; they go on after every message.
                    Err(trailers) => {
                        self.trailers = Some(trailers);
                        self.ended = true;
                        Ok(())
                    }
                },
            };
            if let Err(status) = step {
                return Some(Err(self.fail(status)));
            }
        }
    }

    /// End the call with `status`: nothing it took stays held, nothing more is read.
    fn fail(&mut self, status: Status) -> Status {
        self.give_back(self.held);
        self.handed = 0;
        self.partial = 0;
        self.kept = 0;
        self.out.clear();
        self.pending = Vec::new();
        self.prefix_len = 0;
        self.current = Current::Between;
        self.trailers = None;
        self.ended = true;
        status
    }

    /// Take in one chunk of the body: counted as it arrives, then passed on, or buffered and
    /// inflated as messages complete.
    async fn read(&mut self, mut data: Bytes) -> Result<(), Status> {
        self.take(data.len())?;
        while !data.is_empty() {
            match self.current {
                Current::Between => {
                    let n = (PREFIX - self.prefix_len).min(data.len());
                    self.prefix[self.prefix_len..self.prefix_len + n]
                        .copy_from_slice(&data.split_to(n));
                    self.prefix_len += n;
                    if self.prefix_len < PREFIX {
                        continue;
                    }
                    self.prefix_len = 0;
                    let len = u32::from_be_bytes(self.prefix[1..].try_into().expect("4 bytes"));
                    let len = len as usize;
                    if len > self.limit {
                        return Err(Status::resource_exhausted(format!(
                            "the request message of {len} bytes is over the limit of {} bytes",
                            self.limit
                        )));
                    }
                    let compressed = self.prefix[0] == 1 && self.coding.is_some();
                    if compressed || (self.weighed && self.prefix[0] == 0) {
                        // Buffered whole, and handed to tonic with its prefix only then: tonic
                        // reserves a prefix's length at once, and the pieces of a message
                        // passed on as they arrive stay in memory as views of the connection's
                        // buffers (each piece, however small, keeping its frame's) while the
                        // walk waits for the last. The prefix's bytes, read, go back.
                        self.give_back(PREFIX);
                        self.current = Current::Buffered { len, compressed };
                        if len == 0 {
                            self.complete().await?;
                        }
                    } else {
                        // Uncompressed, or a flag tonic refuses: passed on as it arrives.
                        let prefix = Bytes::copy_from_slice(&self.prefix);
                        self.out.push_back((Frame::data(prefix), PREFIX, len == 0));
                        self.current = if len == 0 {
                            Current::Between
                        } else {
                            Current::Passing(len)
                        };
                    }
                }
                Current::Passing(rest) => {
                    let n = rest.min(data.len());
                    let piece = data.split_to(n);
                    self.out.push_back((Frame::data(piece), n, rest == n));
                    self.current = if rest == n {
                        Current::Between
                    } else {
                        Current::Passing(rest - n)
                    };
                }
                Current::Buffered { len, .. } => {
                    let n = (len - self.pending.len()).min(data.len());
                    // The buffer is counted by its capacity as it grows (never by the length
                    // the client announced); the chunk's bytes, copied, go back.
                    let before = self.pending.capacity();
                    self.pending.reserve(n);
                    let grown = self.pending.capacity() - before;
                    self.take(grown)?;
                    self.pending.extend_from_slice(&data.split_to(n));
                    self.give_back(n);
                    if self.pending.len() == len {
                        self.complete().await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Queue the whole message in `pending` for tonic: inflated if it is compressed, weighed
    /// if it is an inference request, its prefix with it.
    async fn complete(&mut self) -> Result<(), Status> {
        let Current::Buffered { compressed, .. } = self.current else {
            unreachable!("only a buffered message completes");
        };
        if compressed {
            return self.inflate().await;
        }
        self.current = Current::Between;
        // Counted by the buffer's capacity as it grew (in `held`); the count goes with the
        // message, and covers tonic's copy of it once this one is dropped.
        let capacity = self.pending.capacity();
        let message = Bytes::from(std::mem::take(&mut self.pending));
        let weight = self.weigh(&message)?;
        self.queue(message, capacity + weight);
        Ok(())
    }

    /// Queue a whole uncompressed message for tonic: its prefix, then the message, which
    /// carries `permits`.
    fn queue(&mut self, message: Bytes, permits: usize) {
        let len = u32::try_from(message.len()).expect("within the limit, itself within u32");
        let mut prefix = Vec::with_capacity(PREFIX);
        prefix.push(0);
        prefix.extend_from_slice(&len.to_be_bytes());
        self.largest = self.largest.max(message.len());
        self.out
            .push_back((Frame::data(Bytes::from(prefix)), 0, false));
        self.out.push_back((Frame::data(message), permits, true));
    }

    /// Inflate the whole compressed message in `pending` and queue it uncompressed.
    async fn inflate(&mut self) -> Result<(), Status> {
        let (Some(coding), limit) = (self.coding, self.limit) else {
            unreachable!("a compressed message is buffered only with a coding");
        };
        let state = self.state.clone();
        let compressed = std::mem::take(&mut self.pending);
        let before = self.held;
        // Counted into `held` as it is taken, so that a call dropped while it inflates (the
        // client's deadline, a reset stream) gives it back.
        let held = &mut self.held;
        let inflated = coding::inflate(coding, &compressed, limit, |n| {
            let ok = acquire(&state, n);
            if ok {
                *held += n;
            }
            ok
        })
        .await;
        let taken = self.held - before;
        self.give_back(compressed.capacity());
        drop(compressed);
        self.current = Current::Between;
        let coding = coding.name();
        let inflated = inflated.map_err(|e| match e {
            InflateError::TooLarge { .. } => Status::resource_exhausted(format!(
                "the request message is over the limit of {limit} bytes once inflated from \
                 {coding}"
            )),
            InflateError::Corrupt { reason, .. } => Status::invalid_argument(format!(
                "the request message is not valid {coding}: {reason}"
            )),
            InflateError::NoRoom => self.overloaded(),
            InflateError::Unsupported(_) => Status::unimplemented(e.to_string()),
        })?;
        let taken = taken + self.weigh(&inflated)?;
        self.queue(inflated, taken);
        Ok(())
    }

    /// Count what decoding this whole inference message will allocate (see
    /// [`super::weigh`]), held with its last frame until tonic has decoded it; 0 for a message
    /// of another call.
    fn weigh(&mut self, message: &[u8]) -> Result<usize, Status> {
        if !self.weighed {
            return Ok(0);
        }
        let Some(n) = super::weigh::weigh(message) else {
            return Err(Status::invalid_argument(
                "the request message is not a valid ModelInferRequest",
            ));
        };
        // What this body holds already counts against the same limit.
        let most = self.state.config.max_inflight_bytes;
        if n.saturating_add(self.held) > most || u32::try_from(n).is_err() {
            return Err(Status::resource_exhausted(format!(
                "the request message would take {n} bytes of memory decoded, over the node's \
                 limit of {most} bytes in flight: send fewer or larger elements, or raw contents"
            )));
        }
        self.take(n)?;
        Ok(n)
    }

    /// Take `n` bytes of the node's bytes in flight.
    fn take(&mut self, n: usize) -> Result<(), Status> {
        if !acquire(&self.state, n) {
            return Err(self.overloaded());
        }
        self.held += n;
        Ok(())
    }

    fn give_back(&mut self, n: usize) {
        let n = n.min(self.held);
        self.held -= n;
        self.state.inflight_bytes.add_permits(n);
    }

    fn overloaded(&self) -> Status {
        Status::unavailable(super::no_room(&self.state))
    }
}

/// Take `n` permits of `state`'s bytes in flight, to be given back by count (`add_permits`);
/// false if there is no room.
pub(crate) fn acquire(state: &ApiState, n: usize) -> bool {
    u32::try_from(n)
        .ok()
        .and_then(|n| state.inflight_bytes.try_acquire_many(n).ok())
        .map(tokio::sync::SemaphorePermit::forget)
        .is_some()
}
