//! Request bodies, read within the node's limits: the body cap, the node-wide bytes in flight
//! (taken as the bytes arrive), the body's deadline, and content codings.

use super::{ApiError, ApiState, Outcome, bad};
use crate::{coding, v2};
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};

pub(super) fn too_large(state: &ApiState) -> Outcome {
    (
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is over the limit of {} bytes",
                state.config.max_body_bytes
            ),
        ),
        "bad_request",
    )
}

pub(super) fn shed(state: &ApiState, held: usize) -> Outcome {
    (
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the node is holding its limit of {} bytes of requests in flight \
                 (this one needs over {held}); retry later",
                state.config.max_inflight_bytes
            ),
        ),
        "overloaded",
    )
}

/// `n` more bytes of the node's bytes in flight, or the answer that sheds the request.
fn take_inflight(state: &ApiState, n: usize) -> Result<tokio::sync::SemaphorePermit<'_>, Outcome> {
    let n32 = u32::try_from(n).map_err(|_| too_large(state))?;
    state
        .inflight_bytes
        .try_acquire_many(n32)
        .map_err(|_| shed(state, n))
}

/// Count a decoded request at what it takes, when that is more than its body held: a JSON
/// number of two bytes (`0,`) is an INT64 element of eight, or a JSON value of 32 bytes or more
/// in a request's `parameters` or `id`, so a body of the limit could hold many times its count.
/// The body's own buffer is gone by now. A request that could never fit is told so (413), not
/// told to retry.
pub(super) fn hold_decoded<'a>(
    state: &'a ApiState,
    held: &mut tokio::sync::SemaphorePermit<'a>,
    request: &v2::InferRequest,
) -> Result<(), Outcome> {
    let tensors: usize = request
        .inputs
        .iter()
        .map(|t| {
            std::mem::size_of::<v2::Tensor>()
                + t.data.capacity()
                + t.name.capacity()
                + t.shape.capacity() * std::mem::size_of::<u64>()
        })
        .sum();
    let outputs: usize = request
        .outputs
        .iter()
        .map(|o| std::mem::size_of::<v2::RequestedOutput>() + o.name.capacity())
        .sum();
    let json = request.id.as_ref().map_or(0, json_weight)
        + request
            .parameters
            .iter()
            .map(|(k, v)| k.capacity() + json_weight(v))
            .sum::<usize>();
    let decoded = tensors.saturating_add(outputs).saturating_add(json);
    if decoded > state.config.max_inflight_bytes {
        return Err((
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request takes {decoded} bytes of memory decoded, over the node's limit \
                     of {} bytes in flight: send its tensors as binary tensor data, or split it",
                    state.config.max_inflight_bytes
                ),
            ),
            "bad_request",
        ));
    }
    hold_ahead(state, held, decoded.max(held.num_permits()))
}

/// About what a decoded JSON value takes: a `Value` per node (twice, for the growth of the
/// vector or map holding it), and its strings and keys. serde_json nests at most 128 deep.
fn json_weight(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    let node = 2 * std::mem::size_of::<Value>();
    node + match value {
        Value::String(s) => s.capacity(),
        Value::Array(items) => items.iter().map(json_weight).sum(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| std::mem::size_of::<String>() + k.capacity() + json_weight(v))
            .sum(),
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
    }
}

/// Room a body's buffers hold ahead of its bytes (`room`), counted in flight as the bytes are,
/// by `ahead`: an announced length reserves up to 1 MiB before the bytes come, and connections
/// that each announce much and send a byte would otherwise hold that memory uncounted.
fn hold_ahead<'a>(
    state: &'a ApiState,
    ahead: &mut tokio::sync::SemaphorePermit<'a>,
    room: usize,
) -> Result<(), Outcome> {
    let held = ahead.num_permits();
    if room > held {
        ahead.merge(take_inflight(state, room - held)?);
    } else if room < held {
        drop(ahead.split(held - room));
    }
    Ok(())
}

/// Reads a request body frame by frame into `put`, within the body limit, the node's bytes in
/// flight (held by the permit returned, with the body's size) and the body's deadline.
async fn read_frames<'a>(
    state: &'a ApiState,
    mut body: Body,
    mut put: impl FnMut(bytes::Bytes) -> Result<(), Outcome>,
) -> Result<(usize, tokio::sync::SemaphorePermit<'a>), Outcome> {
    use axum::body::HttpBody as _;
    use http_body_util::BodyExt;
    let limit = state.config.max_body_bytes;
    if body.size_hint().exact().is_some_and(|n| n as usize > limit) {
        return Err(too_large(state));
    }
    // The cap is taken as the bytes arrive, not as announced: a client that announces a large
    // body and sends nothing holds nothing, and the whole body has a deadline.
    let mut held = take_inflight(state, 0)?;
    let deadline = tokio::time::Instant::now() + state.config.body_timeout;
    let mut size = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => {
                return Err((
                    ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "the request body did not arrive within {} s",
                            state.config.body_timeout.as_secs_f64()
                        ),
                    ),
                    "bad_request",
                ));
            }
        };
        let frame = frame.map_err(|e| {
            (
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("request body could not be read: {e}"),
                ),
                "bad_request",
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        size += data.len();
        if size > limit {
            return Err(too_large(state));
        }
        held.merge(take_inflight(state, data.len())?);
        put(data)?;
    }
    Ok((size, held))
}

/// Room in `buf` for `incoming` more bytes of `expected`: up to what was announced, but never
/// more than 1 MiB, or than has arrived, ahead of the bytes (an announcement holds nothing).
/// Past what was announced (a chunked body announces nothing) the room at least doubles, so a
/// body sent in many small pieces is moved a bounded number of times, not once per piece.
fn make_room(buf: &mut Vec<u8>, expected: usize, incoming: usize) {
    let need = buf.len() + incoming;
    if need > buf.capacity() {
        let target = expected
            .max(need)
            .max(buf.capacity().saturating_mul(2))
            .min(need + need.max(1 << 20));
        buf.reserve_exact(target - buf.len());
    }
}

/// A binary request's body (`Inference-Header-Content-Length: header_len`, no content coding)
/// read straight into its JSON part and its binary part, each a buffer of its own: one copy of
/// each byte, where joining the chunks and then copying each tensor out of the joined body made
/// two (a tensor that is all of the binary part takes that buffer; see
/// `v2::decode_request_split`).
pub(super) async fn read_split<'a>(
    state: &'a ApiState,
    body: Body,
    header_len: usize,
) -> Result<(Vec<u8>, Vec<u8>, tokio::sync::SemaphorePermit<'a>), Outcome> {
    use axum::body::HttpBody as _;
    let announced = body.size_hint().exact().map_or(0, |n| n as usize);
    let mut json = Vec::new();
    let mut binary = Vec::new();
    let (mut ahead, mut arrived) = (take_inflight(state, 0)?, 0usize);
    let (size, mut held) = read_frames(state, body, |data| {
        arrived += data.len();
        let head = header_len.saturating_sub(json.len()).min(data.len());
        make_room(&mut json, header_len, head);
        json.extend_from_slice(&data[..head]);
        if head < data.len() {
            let rest = &data[head..];
            make_room(
                &mut binary,
                announced.saturating_sub(header_len),
                rest.len(),
            );
            binary.extend_from_slice(rest);
        }
        let room = (json.capacity() + binary.capacity()).saturating_sub(arrived);
        hold_ahead(state, &mut ahead, room)
    })
    .await?;
    held.merge(ahead);
    if size < header_len {
        return Err(bad(v2::V2Error::BinaryData(format!(
            "{} is {header_len} but the body has only {size} bytes: send the length of the \
             JSON part",
            v2::HEADER_CONTENT_LENGTH
        ))));
    }
    Ok((json, binary, held))
}

/// Read a request body, holding its bytes against the node-wide in-flight cap while the
/// request lives: a node under a flood of large bodies sheds with 503 instead of running out of
/// memory. The cap is taken chunk by chunk, so a body costs what it has sent, whatever it
/// announced; a body that does not arrive within `body_timeout` gets 408.
///
/// A body sent with a `Content-Encoding` (gzip, deflate) is inflated here, and what it
/// inflates to counts against the same limit and cap (see [`crate::coding`]).
pub(super) async fn read_body<'a>(
    state: &'a ApiState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(bytes::Bytes, tokio::sync::SemaphorePermit<'a>), Outcome> {
    use axum::body::HttpBody as _;
    let coding = coding::request_coding(headers.get(header::CONTENT_ENCODING)).map_err(|e| {
        (
            ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, e.to_string()),
            "bad_request",
        )
    })?;
    let limit = state.config.max_body_bytes;
    let announced = body.size_hint().exact().map(|n| n as usize);
    // A body that arrives in one chunk is kept as it came, without a copy.
    let mut whole: Option<bytes::Bytes> = None;
    let mut parts: Option<bytes::BytesMut> = None;
    let mut size = 0usize;
    let mut ahead = take_inflight(state, 0)?;
    let (_, mut held) = read_frames(state, body, |data| {
        size += data.len();
        if let Some(parts) = parts.as_mut() {
            parts.extend_from_slice(&data);
        } else if let Some(first) = whole.take() {
            // Room for what was announced, up to 1 MiB ahead; past that it grows as it arrives.
            let room = announced.map_or(size, |n| n.min(size.max(1 << 20)));
            let mut joined = bytes::BytesMut::with_capacity(room.max(size));
            joined.extend_from_slice(&first);
            joined.extend_from_slice(&data);
            parts = Some(joined);
        } else {
            whole = Some(data);
        }
        let room = parts
            .as_ref()
            .map_or(0, |p| p.capacity().saturating_sub(size));
        hold_ahead(state, &mut ahead, room)
    })
    .await?;
    held.merge(ahead);
    let bytes = match (parts, whole) {
        (Some(parts), _) => parts.freeze(),
        (None, Some(whole)) => whole,
        (None, None) => bytes::Bytes::new(),
    };
    let Some(coding) = coding else {
        return Ok((bytes, held));
    };
    // The compressed bytes stay counted until the request ends, beside what they inflate to.
    let mut inflated_held = 0usize;
    let inflated = coding::inflate(coding, &bytes, limit, |n| match take_inflight(state, n) {
        Ok(more) => {
            held.merge(more);
            inflated_held += n;
            true
        }
        Err(_) => false,
    })
    .await
    .map_err(|e| match e {
        coding::InflateError::NoRoom => shed(state, size + inflated_held),
        coding::InflateError::TooLarge { .. } => (
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
            "bad_request",
        ),
        _ => (
            ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
            "bad_request",
        ),
    })?;
    Ok((inflated, held))
}

#[cfg(test)]
mod tests {
    use super::make_room;

    /// Each time the buffer had to grow, and how far.
    fn grow(expected: usize, pieces: &[usize]) -> (Vec<u8>, usize) {
        let mut buf = Vec::new();
        let mut moves = 0;
        for &n in pieces {
            let before = buf.capacity();
            make_room(&mut buf, expected, n);
            assert!(buf.capacity() >= buf.len() + n, "room for the piece");
            if buf.capacity() != before {
                moves += 1;
            }
            buf.extend(std::iter::repeat_n(7u8, n));
        }
        (buf, moves)
    }

    #[test]
    fn an_announced_body_gets_its_room_once() {
        let (buf, moves) = grow(600_000, &[16_384; 36]);
        assert_eq!(moves, 1);
        assert_eq!(buf.capacity(), 600_000);
        assert_eq!(buf.len(), 16_384 * 36);
    }

    #[test]
    fn a_body_in_tiny_pieces_is_not_moved_for_each_piece() {
        // A chunked body announces nothing: 1 MiB arriving a byte at a time.
        let (buf, moves) = grow(0, &vec![1; 1 << 20]);
        assert_eq!(buf.len(), 1 << 20);
        assert!(moves <= 25, "the buffer grew {moves} times");
        // An announcement smaller than the body (a lie, or the JSON part's length) neither.
        let (_, moves) = grow(10, &vec![100; 10_000]);
        assert!(moves <= 25, "the buffer grew {moves} times");
    }

    #[test]
    fn an_announcement_alone_reserves_no_more_than_a_mebibyte_ahead() {
        let (buf, _) = grow(1 << 30, &[1]);
        assert!(buf.capacity() <= (1 << 20) + 1, "{}", buf.capacity());
    }
}
