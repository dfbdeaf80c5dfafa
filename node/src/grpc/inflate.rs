//! Compressed gRPC request messages, inflated by the node instead of by tonic, so that what a
//! message inflates to counts against the node's bytes in flight while it is inflated.
//!
//! tonic inflates a message with its `grpc-encoding` into a buffer of its own before the
//! handler sees it, bounded only by the message size limit: sixty-four 64 KiB messages that
//! each inflate to `--max-body-bytes` would make the node hold gigabytes that nothing counted.
//! [`Inflating`] sits in front of tonic's decoder on requests sent with `grpc-encoding: gzip` or
//! `deflate`. It reads the body's length-prefixed messages, and hands each compressed one to
//! tonic inflated, with its compressed flag cleared, through the same metered inflater that HTTP
//! bodies go through ([`crate::coding::inflate`]): the bytes it buffers and inflates take
//! permits of the node's bytes in flight as they arrive, and give them back once tonic has taken
//! the message. Uncompressed messages in the same stream pass through as they arrive.
//!
//! A message that inflates past the limit is `RESOURCE_EXHAUSTED`, one that is not valid in its
//! coding `INVALID_ARGUMENT`, and one that finds no room in the bytes in flight `UNAVAILABLE`;
//! each ends its call only (a stream's earlier answers stand), and its permits are returned.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::http;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::Frame;
use tonic::Status;

use crate::coding::{self, Coding, InflateError};
use crate::http::ApiState;

/// The length prefix of a gRPC message: a compressed flag and a big-endian length.
const PREFIX: usize = 5;

/// A tower layer's service: requests with a compressed `grpc-encoding` get a body whose
/// messages are inflated and counted (see the module's documentation); others pass as they are.
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
            Some(b"gzip") => Coding::Gzip,
            Some(b"deflate") => Coding::Deflate,
            // Identity, or a coding tonic refuses with UNIMPLEMENTED.
            _ => return self.inner.call(request),
        };
        let (parts, body) = request.into_parts();
        let messages = Messages {
            body,
            coding,
            state: self.state.clone(),
            buf: BytesMut::new(),
            current: Current::Between,
            out: VecDeque::new(),
            held: 0,
            handed: 0,
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
    /// Before a message's prefix.
    Between,
    /// In an uncompressed message, this many bytes of it still to pass.
    Passing(usize),
    /// In a compressed message of this many bytes, buffered until it is whole.
    Compressed(usize),
}

/// The request body, rewritten message by message.
struct Messages {
    body: tonic::body::Body,
    coding: Coding,
    state: Arc<ApiState>,
    /// Read from the body and not yet handed on.
    buf: BytesMut,
    current: Current,
    /// Frames ready for tonic.
    out: VecDeque<Frame<Bytes>>,
    /// Permits of the bytes in flight this body holds now.
    held: usize,
    /// Of those, the ones for bytes already handed to tonic: returned when it asks for more.
    handed: usize,
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
        // Tonic asks for more once it has taken what it was given.
        self.give_back(self.handed);
        self.handed = 0;
        loop {
            if let Some(frame) = self.out.pop_front() {
                return Some(Ok(frame));
            }
            if let Err(status) = self.step().await {
                // The call ends here; nothing it took stays held.
                self.give_back(self.held);
                self.handed = 0;
                self.buf.clear();
                self.ended = true;
                return Some(Err(status));
            }
            if self.ended && self.out.is_empty() && self.buf.is_empty() {
                return None;
            }
        }
    }

    /// Move what `buf` holds on to `out` as far as it goes, or read more of the body.
    async fn step(&mut self) -> Result<(), Status> {
        match self.current {
            Current::Passing(rest) if rest > 0 && !self.buf.is_empty() => {
                let n = rest.min(self.buf.len());
                let bytes = self.buf.split_to(n).freeze();
                self.hand(bytes);
                self.current = Current::Passing(rest - n);
                return Ok(());
            }
            Current::Passing(0) => {
                self.current = Current::Between;
                return Ok(());
            }
            Current::Between if self.buf.len() >= PREFIX => {
                let flag = self.buf[0];
                let len = u32::from_be_bytes(self.buf[1..PREFIX].try_into().expect("4 bytes"));
                let len = len as usize;
                let limit = self.state.config.max_body_bytes;
                if len > limit {
                    return Err(Status::resource_exhausted(format!(
                        "the request message of {len} bytes is over the limit of {limit} bytes"
                    )));
                }
                if flag == 1 {
                    self.current = Current::Compressed(len);
                } else {
                    // Uncompressed (or a flag tonic refuses): passed on as it arrives.
                    let prefix = self.buf.split_to(PREFIX).freeze();
                    self.hand(prefix);
                    self.current = Current::Passing(len);
                }
                return Ok(());
            }
            Current::Compressed(len) if self.buf.len() >= PREFIX + len => {
                let compressed = self.buf.split_to(PREFIX + len);
                return self.inflate(&compressed[PREFIX..]).await;
            }
            _ => {}
        }
        if self.ended {
            // The body ended inside a message: tonic says so when it sees the rest.
            if !self.buf.is_empty() {
                let rest = self.buf.split().freeze();
                self.hand(rest);
            }
            return Ok(());
        }
        match self.body.frame().await {
            None => self.ended = true,
            Some(Err(status)) => return Err(status),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    self.take(data.len())?;
                    self.buf.extend_from_slice(&data);
                }
                // Trailers end the body.
                Err(frame) => {
                    self.out.push_back(frame);
                    self.ended = true;
                }
            },
        }
        Ok(())
    }

    /// Inflate one whole message (its bytes are held) and queue it uncompressed.
    async fn inflate(&mut self, compressed: &[u8]) -> Result<(), Status> {
        let limit = self.state.config.max_body_bytes;
        let state = self.state.clone();
        let mut taken = 0usize;
        let inflated = coding::inflate(self.coding, compressed, limit, |n| {
            let ok = u32::try_from(n)
                .ok()
                .and_then(|n| state.inflight_bytes.try_acquire_many(n).ok())
                .map(tokio::sync::SemaphorePermit::forget)
                .is_some();
            if ok {
                taken += n;
            }
            ok
        })
        .await;
        // What inflated is held as handed (tonic copies it into its buffer); the compressed
        // bytes, read and done with, go back now.
        self.held += taken;
        self.handed += taken;
        self.give_back(compressed.len() + PREFIX);
        self.current = Current::Between;
        let coding = self.coding.name();
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
        let len = u32::try_from(inflated.len()).expect("within the body limit");
        let mut prefix = Vec::with_capacity(PREFIX);
        prefix.push(0);
        prefix.extend_from_slice(&len.to_be_bytes());
        self.out.push_back(Frame::data(Bytes::from(prefix)));
        if !inflated.is_empty() {
            self.out.push_back(Frame::data(inflated));
        }
        Ok(())
    }

    /// Queue `bytes` (held while in `buf`) for tonic.
    fn hand(&mut self, bytes: Bytes) {
        self.handed += bytes.len();
        self.out.push_back(Frame::data(bytes));
    }

    /// Take `n` bytes of the node's bytes in flight for what was read.
    fn take(&mut self, n: usize) -> Result<(), Status> {
        let n32 = u32::try_from(n).map_err(|_| self.overloaded())?;
        match self.state.inflight_bytes.try_acquire_many(n32) {
            Ok(permit) => {
                permit.forget();
                self.held += n;
                Ok(())
            }
            Err(_) => Err(self.overloaded()),
        }
    }

    fn give_back(&mut self, n: usize) {
        let n = n.min(self.held);
        self.held -= n;
        self.state.inflight_bytes.add_permits(n);
    }

    fn overloaded(&self) -> Status {
        Status::unavailable(format!(
            "the node is holding its limit of {} bytes of requests in flight; retry later",
            self.state.config.max_inflight_bytes
        ))
    }
}
