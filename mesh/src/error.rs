//! The mesh crate's one error type.

/// What went wrong in identity, TLS, QUIC or framing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate: {reason}")]
    Certificate { reason: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid endpoint config: {reason}")]
    Config { reason: String },
    #[error("tls configuration: {reason}")]
    Tls { reason: String },
    #[error("connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("a frame of {len} bytes is over the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("a frame of length 0 has no kind byte")]
    EmptyFrame,
    #[error("the stream ended inside a frame")]
    Truncated,
    #[error("the peer finished the stream without answering")]
    NoAnswer,
    #[error("stream: {reason}")]
    Stream { reason: String },
}

/// The mesh crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn cert_err(e: impl std::fmt::Display) -> Error {
    Error::Certificate {
        reason: e.to_string(),
    }
}

pub(crate) fn tls_err(e: impl std::fmt::Display) -> Error {
    Error::Tls {
        reason: e.to_string(),
    }
}

pub(crate) fn stream_err(e: impl std::fmt::Display) -> Error {
    Error::Stream {
        reason: e.to_string(),
    }
}
