//! Frames on QUIC streams: `[u32 BE length][u8 kind][payload]`, the length counting kind and
//! payload.

use crate::error::{Error, Result, stream_err};

/// Writes one frame.
pub async fn write_frame(send: &mut quinn::SendStream, kind: u8, payload: &[u8]) -> Result<()> {
    let len = u32::try_from(payload.len() + 1).map_err(|_| Error::FrameTooLarge {
        len: payload.len() + 1,
        max: u32::MAX as usize,
    })?;
    let mut header = [0u8; 5];
    header[..4].copy_from_slice(&len.to_be_bytes());
    header[4] = kind;
    send.write_all(&header).await.map_err(stream_err)?;
    send.write_all(payload).await.map_err(stream_err)
}

/// Reads one frame of at most `max_len` bytes (kind and payload): `Ok(None)` if the stream ended
/// cleanly before one began. The length is checked before anything is allocated.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max_len: usize,
) -> Result<Option<(u8, Vec<u8>)>> {
    let mut header = [0u8; 5];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(Error::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(stream_err(e)),
    }
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len == 0 {
        return Err(Error::EmptyFrame);
    }
    if len > max_len {
        return Err(Error::FrameTooLarge { len, max: max_len });
    }
    let mut payload = vec![0u8; len - 1];
    match recv.read_exact(&mut payload).await {
        Ok(()) => Ok(Some((header[4], payload))),
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
