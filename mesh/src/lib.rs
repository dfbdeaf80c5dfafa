//! Sophon's mesh plumbing, shared by coordinators and (mesh) nodes.
//!
//! # What it owns
//! - [`identity`]: the cluster CA ([`Ca`]), member identities ([`Identity`]) whose certificate
//!   names a [`Principal`] (`coordinator/3`, `node/gpu-7`), and certificate signing requests, so a
//!   private key never leaves the member that made it.
//! - [`endpoint`](mod@endpoint): QUIC endpoints (quinn) with mutual TLS (rustls, ring): every
//!   member presents its certificate and verifies the peer's against the cluster CA. One
//!   exception: a joiner with no certificate yet may connect ([`join_client_config`] pins the
//!   CA by fingerprint and accepts only a coordinator's certificate), and the application must
//!   refuse it everything but the join request ([`peer_principal`] is `None`). The
//!   application authorises a peer by its principal and certificate serial ([`peer_serial`]).
//! - [`codec`]: length-prefixed frames on QUIC streams, and a one-request one-answer [`call`].
//!
//! # How data flows
//! Bootstrap: [`Ca::generate`], then [`Ca::issue_identity`] for the first member, saved with
//! [`Identity::save`]. Joining: the joiner makes a key and CSR ([`new_csr`]), connects with
//! [`join_client_config`] (no certificate; the server must present the CA the join token
//! pins), sends the CSR in a [`call`], and a member answers with [`Ca::issue`]'s certificate
//! (never the CA's key), which the joiner checks with [`Identity::check`].
//! From then on every connection is between two [`endpoint`](endpoint())s presenting
//! certificates, and the application authorises requests by [`peer_principal`]. On every
//! stream, bytes travel as frames: `[u32 BE length][u8 kind][payload]`.
//!
//! # What it must never do
//! Trust a peer it did not verify; panic on anything a peer sends; allocate for a frame larger
//! than the caller's limit; rely on a process-wide crypto provider (every config names ring);
//! accept 0-RTT data (it can be replayed).

pub mod codec;
pub mod endpoint;
pub mod error;
pub mod identity;
pub mod wire;

pub use codec::{call, read_frame, write_frame};
pub use endpoint::{
    EndpointConfig, SERVER_NAME, client_endpoint, connect, endpoint, join_client_config,
    member_client_config, peer_principal, peer_serial,
};
pub use error::{Error, Result};
pub use identity::{
    Ca, Identity, Principal, fingerprint_of_pem, new_csr, principal_of_pem, serial_of_pem,
};
