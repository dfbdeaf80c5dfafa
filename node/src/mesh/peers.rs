//! Connections this node keeps to other mesh members (coordinators, other nodes): one per
//! peer, opened on first use, checked once for the certificate that peer must present, and
//! reused while it lives.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, bail};
use sophon_mesh::Principal;

pub struct Peers {
    endpoint: quinn::Endpoint,
    conns: tokio::sync::Mutex<HashMap<String, quinn::Connection>>,
}

impl Peers {
    pub fn new(endpoint: quinn::Endpoint) -> Peers {
        Peers {
            endpoint,
            conns: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The connection to peer `key` at `address`, opened within `within` if there is none
    /// alive. A new connection is kept only if `expected` accepts the principal of the
    /// peer's certificate (it says what it wanted otherwise).
    pub async fn get(
        &self,
        key: &str,
        address: &str,
        within: Duration,
        expected: impl Fn(Option<&Principal>) -> Result<(), String>,
    ) -> anyhow::Result<quinn::Connection> {
        let mut conns = self.conns.lock().await;
        if let Some(conn) = conns.get(key)
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        let addr = super::resolve(address)?;
        let conn = tokio::time::timeout(within, sophon_mesh::connect(&self.endpoint, addr, None))
            .await
            .with_context(|| format!("connect to {address}: timed out"))?
            .with_context(|| format!("connect to {address}"))?;
        let principal = sophon_mesh::peer_principal(&conn);
        if let Err(wanted) = expected(principal.as_ref()) {
            conn.close(0u32.into(), b"unexpected certificate");
            bail!("{address} presented {principal:?}, not {wanted}");
        }
        conns.insert(key.to_string(), conn.clone());
        Ok(conn)
    }

    /// Drop the connection to `key` (it failed), so the next call opens a new one.
    pub async fn forget(&self, key: &str) {
        self.conns.lock().await.remove(key);
    }
}
