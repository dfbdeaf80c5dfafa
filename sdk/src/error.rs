//! The SDK's one error type.
//!
//! Every fallible function in this crate returns [`Result`]. Variants carry what is involved (the
//! bundle part, the versions, the file path, the key) so the node and the CLI can print them as they
//! are; messages are lowercase and say what to do about the problem.

use std::path::PathBuf;

/// Everything that can go wrong reading, writing, packing or verifying a bundle.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes do not start with the bundle magic.
    #[error("not a sophon bundle (bad magic bytes): pack the model with `sophon pack` first")]
    BadMagic,

    /// The bundle uses a format version this build does not read.
    #[error(
        "bundle format version {found} is not supported (this build reads version {supported}): \
         upgrade sophon or repack the bundle with this version"
    )]
    UnsupportedVersion { found: u16, supported: u16 },

    /// The bundle ends before the part named by `what`.
    #[error("bundle is truncated: {what}; copy the whole file again")]
    Truncated { what: String },

    /// The bundle has bytes after its signature trailer.
    #[error(
        "bundle has {count} trailing bytes after its signature: copy the file again or repack it"
    )]
    TrailingBytes { count: u64 },

    /// The bundle index is not well formed (names, counts, order).
    #[error("bundle index is malformed: {what}; repack the bundle")]
    Malformed { what: String },

    /// A part's bytes do not hash to the SHA-256 in the signed index.
    #[error(
        "bundle part `{part}` does not match its sha-256: the bundle was corrupted or tampered with; \
         fetch it again from the publisher"
    )]
    DigestMismatch { part: String },

    /// The signature does not verify against the publisher key in the trailer.
    #[error(
        "bundle signature does not verify against its publisher key: the bundle was tampered with; \
         fetch it again from the publisher"
    )]
    BadSignature,

    /// The trailer holds no publisher key and signature.
    #[error(
        "bundle is not signed: pack it with a publisher key (`sophon keygen`, then `sophon pack --key`)"
    )]
    Unsigned,

    /// The bundle is correctly signed, but by a key the caller does not trust.
    #[error(
        "bundle publisher {key_hex} is not trusted: add its public key to the trusted publishers to accept it"
    )]
    UntrustedPublisher { key_hex: String },

    /// The manifest does not parse or does not validate.
    #[error("invalid manifest: {0}")]
    Manifest(String),

    /// A part the manifest names is not in the bundle (or not given to the packer).
    #[error("bundle part `{name}` named by the manifest is missing: add the file and repack")]
    MissingPart { name: String },

    /// A part is in the bundle (or given to the packer) that the manifest does not name.
    #[error(
        "bundle part `{name}` is not named by the manifest: remove it or list it under [[graphs]]"
    )]
    UnexpectedPart { name: String },

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The ONNX model could not be read or described.
    #[error("onnx model: {0}")]
    Onnx(String),

    /// A key (or key file) is malformed.
    #[error("key: {0}")]
    Key(String),
}

/// The SDK's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn truncated(what: impl Into<String>) -> Self {
        Error::Truncated { what: what.into() }
    }

    pub(crate) fn malformed(what: impl Into<String>) -> Self {
        Error::Malformed { what: what.into() }
    }
}
