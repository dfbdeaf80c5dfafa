//! Refusing a connection in its protocol's words, for a client over its cap of connections
//! ([`crate::serve::Slots`]): the client is told why, and the connection closed without losing
//! the reason.
//!
//! - HTTP/1.1: a `503 Service Unavailable` with the reason as `{"error": ...}`, as the node's
//!   other errors are.
//! - HTTP/2 (gRPC): the server's SETTINGS at once, then, to the client's first request, a
//!   trailers-only gRPC answer, `RESOURCE_EXHAUSTED` with the reason as its message, then a
//!   GOAWAY (ENHANCE_YOUR_CALM) that carries the reason too. A GOAWAY alone before any request
//!   is what a lost connection looks like to grpc-core: Python's grpcio reconnected every second
//!   until the call's deadline, telling the caller nothing.
//!
//! Then the node stops writing and reads what the client still sends, for a moment, before it
//! closes: closing a socket with unread data resets the connection, and the client can lose the
//! answer it has not read yet.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::serve::Protocol;

/// How long a refused connection is kept, once told, to read what its client still sends.
const LINGER: Duration = Duration::from_secs(2);

/// Tell `tcp`'s client `reason` in `protocol`'s words, then close it. An HTTP/2 client's first
/// request is waited for at most `opening` (the node's header timeout).
pub async fn refuse(
    mut tcp: tokio::net::TcpStream,
    protocol: Protocol,
    reason: String,
    opening: Duration,
) {
    let _ = tokio::time::timeout(opening + LINGER, async {
        match protocol {
            Protocol::Http1 => tcp.write_all(&http1_refusal(&reason)).await?,
            Protocol::Http2 => {
                tcp.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
                // Answer the client's first request (within the header timeout), then go away:
                // a channel connected ahead of its first call (tonic's `connect`, grpcio's
                // `channel_ready_future`) is told too.
                let first = tokio::time::timeout(opening, first_request(&mut tcp)).await;
                let mut out = Vec::new();
                let last = match first {
                    Ok(Ok(Some(stream))) => {
                        out.extend(frame(
                            HEADERS,
                            END_STREAM | END_HEADERS,
                            stream,
                            &grpc_refusal(&reason),
                        ));
                        stream
                    }
                    _ => 0,
                };
                out.extend(goaway(last, &reason));
                tcp.write_all(&out).await?;
            }
        }
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        while tcp.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// A 503 with `reason`, closing the connection.
fn http1_refusal(reason: &str) -> Vec<u8> {
    let body = serde_json::json!({ "error": reason }).to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const HEADERS: u8 = 1;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// HTTP/2's error code for a peer that is generating excessive load.
const ENHANCE_YOUR_CALM: u32 = 0x0b;
/// The client's connection preface, before its first frame.
const PREFACE: usize = 24;
/// A frame's head: its length (3 bytes), type, flags and stream.
const HEAD: usize = 9;

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a small frame");
    let mut out = Vec::with_capacity(HEAD + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// GOAWAY: the last stream answered, ENHANCE_YOUR_CALM, and `reason` as its debug data.
fn goaway(last: u32, reason: &str) -> Vec<u8> {
    let mut payload = (last & 0x7fff_ffff).to_be_bytes().to_vec();
    payload.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    frame(GOAWAY, 0, 0, &payload)
}

/// The header block (HPACK) of a trailers-only gRPC answer: `:status 200`, the gRPC content
/// type, `grpc-status` 8 (RESOURCE_EXHAUSTED) and `reason` as `grpc-message`.
fn grpc_refusal(reason: &str) -> Vec<u8> {
    // `:status: 200` is entry 8 of HPACK's static table.
    let mut block = vec![0x88];
    for (name, value) in [
        ("content-type", "application/grpc".to_string()),
        ("grpc-status", "8".to_string()),
        ("grpc-message", percent_encode(reason)),
    ] {
        // A literal field without indexing, with a new name; no Huffman coding.
        block.push(0);
        hpack_string(&mut block, name.as_bytes());
        hpack_string(&mut block, value.as_bytes());
    }
    block
}

/// An HPACK string literal: its length as a 7-bit-prefix integer (RFC 7541, 5.1), then the bytes.
fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    let mut len = s.len();
    if len < 0x7f {
        out.push(len as u8);
    } else {
        out.push(0x7f);
        len -= 0x7f;
        while len >= 0x80 {
            out.push((len & 0x7f) as u8 | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(s);
}

/// `grpc-message`'s encoding: printable ASCII but `%` as is, every other byte as `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Read an HTTP/2 client's preface and frames, acknowledging its first SETTINGS, until its
/// first HEADERS frame: that request's stream, or `None` if the client closed, or sent more than
/// a client's opening frames (16 KiB) first. Only frame heads are kept, not their payloads.
async fn first_request(tcp: &mut tokio::net::TcpStream) -> std::io::Result<Option<u32>> {
    /// How much of a client's opening is read at most (its preface, SETTINGS and WINDOW_UPDATE
    /// are a few dozen bytes).
    const MOST: usize = 16 << 10;
    let mut read = 0usize;
    // Bytes still to skip: the preface, then each frame's payload.
    let mut skip = PREFACE;
    let mut head = [0u8; HEAD];
    let mut head_len = 0;
    let mut acked = false;
    let mut chunk = [0u8; 4096];
    while read < MOST {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        read += n;
        let mut rest = &chunk[..n];
        while !rest.is_empty() {
            if skip > 0 {
                let k = skip.min(rest.len());
                skip -= k;
                rest = &rest[k..];
                continue;
            }
            let k = (HEAD - head_len).min(rest.len());
            head[head_len..head_len + k].copy_from_slice(&rest[..k]);
            head_len += k;
            rest = &rest[k..];
            if head_len < HEAD {
                break;
            }
            head_len = 0;
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            match (head[3], head[4] & ACK) {
                (HEADERS, _) => return Ok(Some(stream)),
                (SETTINGS, 0) if !acked => {
                    acked = true;
                    tcp.write_all(&frame(SETTINGS, ACK, 0, &[])).await?;
                }
                _ => {}
            }
            skip = len;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_lengths_past_the_prefix_take_more_bytes() {
        let mut out = Vec::new();
        hpack_string(&mut out, &[b'a'; 126]);
        assert_eq!(out[0], 126);
        let mut out = Vec::new();
        hpack_string(&mut out, &[b'a'; 127]);
        assert_eq!(&out[..2], &[0x7f, 0]);
        let mut out = Vec::new();
        hpack_string(&mut out, &[b'a'; 1337]);
        // RFC 7541, C.1.2: 1337 with a 5-bit prefix; here 7 bits: 1337 - 127 = 1210.
        assert_eq!(&out[..3], &[0x7f, 0xba, 0x09]);
        assert_eq!(out.len(), 3 + 1337);
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(
            percent_encode("50% of 2001:db8::/64"),
            "50%25 of 2001:db8::/64"
        );
        assert_eq!(percent_encode("é\n"), "%C3%A9%0A");
    }
}
