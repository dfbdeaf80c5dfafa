//! QUIC endpoints with mutual TLS over the cluster CA (TLS 1.3, ring).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result, cert_err, tls_err};
use crate::identity::{Identity, Principal, principal_of, serial_of};

/// The name every member's certificate carries, and every client asks for.
pub const SERVER_NAME: &str = "sophon.mesh";
const ALPN: &[u8] = b"sophon-mesh/1";

/// Requests (bidirectional streams) a peer may have in flight on one connection.
pub const MAX_STREAMS: u32 = 256;
/// Unidirectional streams (Raft's) a peer may have open on one connection.
pub const MAX_UNI_STREAMS: u32 = 32;

/// QUIC transport settings.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Keep-alives keep an idle connection open (and notice a dead peer).
    pub keep_alive: Duration,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            idle_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(1),
        }
    }
}

impl EndpointConfig {
    /// Checks that keep-alives come before the idle timeout would close the connection.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: &str| {
            Err(Error::Config {
                reason: reason.to_string(),
            })
        };
        if self.idle_timeout.is_zero() || quinn::IdleTimeout::try_from(self.idle_timeout).is_err() {
            return bad("idle_timeout must be above zero and below 2^62 ms");
        }
        if self.keep_alive.is_zero() || self.keep_alive >= self.idle_timeout {
            return bad("keep_alive must be above zero and below idle_timeout");
        }
        Ok(())
    }
}

/// Every config is built with ring, never with a process-wide default provider.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport(cfg: &EndpointConfig) -> Result<Arc<quinn::TransportConfig>> {
    cfg.validate()?;
    let idle = cfg.idle_timeout.try_into().map_err(|e| Error::Config {
        reason: format!("idle_timeout: {e}"),
    })?;
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(Some(cfg.keep_alive));
    // Streams a peer may have open at once (more wait for one to close). quinn sets aside an
    // entry for each allowed stream when a connection opens, so these limits are memory per
    // connection: at 4096 + 1024 a coordinator held ~10,000 node connections in gigabytes.
    t.max_concurrent_bidi_streams(MAX_STREAMS.into());
    t.max_concurrent_uni_streams(MAX_UNI_STREAMS.into());
    // Snapshots and multi-MB blobs go over single streams.
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    Ok(Arc::new(t))
}

fn roots(ca_pem: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.map_err(cert_err)?).map_err(cert_err)?;
    }
    if roots.is_empty() {
        return Err(cert_err("the CA PEM holds no certificate"));
    }
    Ok(roots)
}

fn chain(identity: &Identity) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let mut chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
            .collect::<std::result::Result<_, _>>()
            .map_err(cert_err)?;
    // The CA goes along so that a joiner can pin it by fingerprint.
    for ca in CertificateDer::pem_slice_iter(identity.ca_pem.as_bytes()) {
        chain.push(ca.map_err(cert_err)?);
    }
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).map_err(cert_err)?;
    Ok((chain, key))
}

fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    identity: Option<&Identity>,
    cfg: &EndpointConfig,
) -> Result<quinn::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match identity {
        Some(id) => {
            let (chain, key) = chain(id)?;
            builder.with_client_auth_cert(chain, key).map_err(tls_err)?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport(cfg)?);
    Ok(config)
}

/// The client config a member's endpoint uses by default (its certificate presented, the
/// server's verified against the cluster CA), for connecting as `identity` from an endpoint
/// that is not its own (with [`quinn::Endpoint::connect_with`]): one socket for many members,
/// as a load generator needs.
pub fn member_client_config(
    identity: &Identity,
    cfg: &EndpointConfig,
) -> Result<quinn::ClientConfig> {
    let roots = Arc::new(roots(&identity.ca_pem)?);
    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(tls_err)?;
    client_config(server_verifier, Some(identity), cfg)
}

/// An endpoint that serves (requiring certificates from the CA, or none at all; see the crate
/// page) and connects as `identity`.
pub fn endpoint(
    bind: SocketAddr,
    identity: &Identity,
    cfg: &EndpointConfig,
) -> Result<quinn::Endpoint> {
    let roots = Arc::new(roots(&identity.ca_pem)?);
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .allow_unauthenticated()
        .build()
        .map_err(tls_err)?;
    let (chain, key) = chain(identity)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain, key)
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(tls_err)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport(cfg)?);
    let mut endpoint = quinn::Endpoint::server(server, bind)
        .map_err(|source| Error::Bind { addr: bind, source })?;
    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(tls_err)?;
    endpoint.set_default_client_config(client_config(server_verifier, Some(identity), cfg)?);
    Ok(endpoint)
}

/// An endpoint for outgoing connections only (IPv4), with no default client config: connect
/// with [`quinn::Endpoint::connect_with`] and a config such as [`join_client_config`]'s, which
/// carries the transport settings. `cfg` is validated.
pub fn client_endpoint(cfg: &EndpointConfig) -> Result<quinn::Endpoint> {
    cfg.validate()?;
    let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
    quinn::Endpoint::client(bind).map_err(|source| Error::Bind { addr: bind, source })
}

/// Connects to `addr` as [`SERVER_NAME`], with `config` or else the endpoint's default, and
/// waits for the handshake.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    config: Option<quinn::ClientConfig>,
) -> Result<quinn::Connection> {
    let failed = |e: &dyn std::fmt::Display| Error::Connect {
        address: addr.to_string(),
        reason: e.to_string(),
    };
    let connecting = match config {
        Some(config) => endpoint.connect_with(config, addr, SERVER_NAME),
        None => endpoint.connect(addr, SERVER_NAME),
    }
    .map_err(|e| failed(&e))?;
    connecting.await.map_err(|e| failed(&e))
}

/// A client config for a joiner: no certificate; the server is accepted only if it presents the
/// CA whose SHA-256 is `ca_fingerprint` and a leaf that CA signed for a coordinator
/// (`coordinator/N`): a mesh node's certificate, signed by the same CA, is refused.
pub fn join_client_config(
    ca_fingerprint: &str,
    cfg: &EndpointConfig,
) -> Result<quinn::ClientConfig> {
    let fingerprint = ca_fingerprint.to_ascii_lowercase();
    if fingerprint.len() != 64 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(cert_err(format!(
            "{ca_fingerprint:?} is no CA fingerprint (64 hex digits of SHA-256)"
        )));
    }
    let verifier = Arc::new(PinnedCa {
        fingerprint,
        provider: provider(),
    });
    client_config(verifier, None, cfg)
}

/// The principal the peer's verified certificate names (`None`: it presented none).
pub fn peer_principal(conn: &quinn::Connection) -> Option<Principal> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    principal_of(certs.first()?.as_ref())
}

/// The serial number of the peer's verified certificate, lowercase hex (`None`: it presented
/// none).
pub fn peer_serial(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    serial_of(certs.first()?.as_ref())
}

/// Accepts a server whose chain carries the pinned CA, and whose leaf that CA signed for a
/// coordinator.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| hex::encode(Sha256::digest(c.as_ref())) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General("the server does not present the pinned cluster CA".into())
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified =
            inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        // Any member's leaf chains to the CA; only a coordinator may answer a join.
        match principal_of(end_entity.as_ref()) {
            Some(Principal::Coordinator(_)) => Ok(verified),
            Some(other) => Err(rustls::Error::General(format!(
                "the server's certificate names {other}, not a coordinator"
            ))),
            None => Err(rustls::Error::General(
                "the server's certificate names no principal".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests;
