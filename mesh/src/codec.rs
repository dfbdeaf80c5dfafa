//! Frames on QUIC streams: `[u32 BE length][u8 kind][payload]`, the length counting kind and
//! payload.

use crate::error::{Error, Result, stream_err};

/// Bytes of a frame header: the length and the kind.
pub const HEADER_LEN: usize = 5;

/// The header of a frame of `kind` carrying `payload_len` bytes.
pub fn encode_header(kind: u8, payload_len: usize) -> Result<[u8; HEADER_LEN]> {
    let len = u32::try_from(payload_len + 1).map_err(|_| Error::FrameTooLarge {
        len: payload_len + 1,
        max: u32::MAX as usize,
    })?;
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&len.to_be_bytes());
    header[4] = kind;
    Ok(header)
}

/// Checks a frame header: its kind and the payload length that follows, which must fit
/// `max_len` (kind and payload) before anything is allocated for it.
pub fn decode_header(header: &[u8; HEADER_LEN], max_len: usize) -> Result<(u8, usize)> {
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len == 0 {
        return Err(Error::EmptyFrame);
    }
    if len > max_len {
        return Err(Error::FrameTooLarge { len, max: max_len });
    }
    Ok((header[4], len - 1))
}

/// Splits a byte buffer into the frames it holds, as a stream reader would read them.
pub fn decode_frames(mut bytes: &[u8], max_len: usize) -> Result<Vec<(u8, &[u8])>> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let header: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(Error::Truncated)?;
        let (kind, len) = decode_header(header, max_len)?;
        let payload = bytes
            .get(HEADER_LEN..HEADER_LEN + len)
            .ok_or(Error::Truncated)?;
        frames.push((kind, payload));
        bytes = &bytes[HEADER_LEN + len..];
    }
    Ok(frames)
}

/// Writes one frame.
pub async fn write_frame(send: &mut quinn::SendStream, kind: u8, payload: &[u8]) -> Result<()> {
    let header = encode_header(kind, payload.len())?;
    send.write_all(&header).await.map_err(stream_err)?;
    send.write_all(payload).await.map_err(stream_err)
}

/// Reads one frame of at most `max_len` bytes (kind and payload): `Ok(None)` if the stream ended
/// cleanly before one began. The length is checked before anything is allocated.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max_len: usize,
) -> Result<Option<(u8, Vec<u8>)>> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(Error::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(stream_err(e)),
    }
    let (kind, len) = decode_header(&header, max_len)?;
    let mut payload = vec![0u8; len];
    match recv.read_exact(&mut payload).await {
        Ok(()) => Ok(Some((kind, payload))),
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(Error::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => Err(stream_err(e)),
    }
}

/// One request and its answer on a new bidirectional stream: writes one frame, finishes the
/// stream and reads one frame of at most `max_response` bytes.
pub async fn call(
    conn: &quinn::Connection,
    kind: u8,
    payload: &[u8],
    max_response: usize,
) -> Result<(u8, Vec<u8>)> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(stream_err)?;
    write_frame(&mut send, kind, payload).await?;
    send.finish().map_err(stream_err)?;
    read_frame(&mut recv, max_response)
        .await?
        .ok_or(Error::NoAnswer)
}
