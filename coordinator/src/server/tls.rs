//! The admin API over TLS (rustls): `--tls-cert` and `--tls-key` give the certificate chain and
//! key in PEM. Plain HTTP stays for loopback: a coordinator refuses to serve its admin API in
//! the clear on any other address unless told `--insecure-http`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Error, Result};

/// The admin API's certificate chain and key, PEM files.
#[derive(Clone, Debug)]
pub struct ApiTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn bad(what: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        what: format!("read {}", what.display()),
        reason: e.to_string(),
    }
}

/// A rustls server configuration from PEM files (TLS 1.2 and 1.3, HTTP/1.1 by ALPN).
pub fn server_config(tls: &ApiTls) -> Result<Arc<rustls::ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| bad(&tls.cert, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(&tls.cert, e))?;
    if chain.is_empty() {
        return Err(bad(&tls.cert, "no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| bad(&tls.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&tls.cert, e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| bad(&tls.key, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Refuses a plain-HTTP admin API on an address other than loopback, unless `insecure`.
pub fn check_plain_http(listen: SocketAddr, tls: bool, insecure: bool) -> Result<()> {
    if tls || insecure || listen.ip().is_loopback() {
        return Ok(());
    }
    Err(Error::Io {
        what: format!("serve the admin API on {listen}"),
        reason: "refusing plain HTTP on a non-loopback address: tokens would cross the network \
                 in the clear. Give --tls-cert and --tls-key, or --insecure-http if a proxy in \
                 front terminates TLS"
            .into(),
    })
}

/// Serves `app` over TLS on `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    config: Arc<rustls::ServerConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, app, stop) = (acceptor.clone(), app.clone(), stop.clone());
        tokio::spawn(async move {
            let mut stop = stop;
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            tokio::pin!(conn);
            let stopping = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(%peer, error = %e, "admin API connection ended");
                    }
                }
                () = stopping => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}
