//! The Sophon node: it serves signed model bundles as sandboxed Wasm components behind the
//! KServe V2 / Open Inference Protocol.
//!
//! The request path, edge to core: [`http`] (axum: parse, validate against the manifest, bounded
//! queue) → [`repository`] (which model and version, its limits and statistics) → [`runtime`]
//! (a fresh instance of the pre-linked component, with epoch deadline and memory cap) → the guest
//! calls wasi-nn → [`backend`] (tract by default) → back out, encoded by [`v2`].
//!
//! Nothing here trusts a request or a guest: every input is checked before it enters the sandbox,
//! every guest failure becomes a clear error for that request only, and the node never panics on
//! what a client or a component does.

pub mod backend;
pub mod batcher;
pub mod coding;
pub mod convert;
pub mod grpc;
pub mod handoff;
pub mod hardware;
pub mod heap;
pub mod http;
pub mod mesh;
pub mod perf;
pub mod refuse;
pub mod repository;
pub mod runtime;
pub mod serve;
pub mod stats;
/// The KServe V2 codec, its own crate (`v2/`) so that the fuzz targets build without wasmtime.
pub use sophon_v2 as v2;

pub use repository::{Repository, ServingLimits};
pub use runtime::{Runtime, RuntimeConfig};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// A running node's HTTP server: `run` serves until `shutdown` resolves, then stops accepting,
/// reports not-ready, and lets in-flight requests finish for up to the drain deadline.
pub struct NodeServer {
    state: Arc<http::ApiState>,
    listener: tokio::net::TcpListener,
    drain: std::time::Duration,
}

/// How long a shutdown waits for requests in flight before it cancels them.
pub const DEFAULT_DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

impl NodeServer {
    /// Bind the HTTP listener.
    pub async fn bind(
        addr: SocketAddr,
        repo: Arc<Repository>,
        config: http::HttpConfig,
    ) -> anyhow::Result<NodeServer> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let state = Arc::new(http::ApiState::new(repo, config));
        Ok(NodeServer {
            state,
            listener,
            drain: DEFAULT_DRAIN,
        })
    }

    /// Set how long a shutdown waits for requests in flight (default [`DEFAULT_DRAIN`]).
    pub fn with_drain_deadline(mut self, drain: std::time::Duration) -> NodeServer {
        self.drain = drain;
        self
    }

    /// The API's shared state (a mesh node sets its router there).
    pub fn state(&self) -> &Arc<http::ApiState> {
        &self.state
    }

    /// The node's HTTP routes (a mesh node serves forwarded requests through them).
    pub fn app(&self) -> axum::Router {
        http::router(self.state.clone())
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serve until `shutdown` resolves; in-flight requests finish before this returns, or are
    /// cancelled once the drain deadline passes.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        state.ready.store(true, Ordering::Release);
        let app = http::router(self.state.clone());
        let ready = self.state.clone();
        let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
        let serve = serve::serve(self.listener, app, &state, async move {
            shutdown.await;
            ready.ready.store(false, Ordering::Release);
            tracing::info!("shutting down: finishing requests in flight");
            let _ = stopping_tx.send(());
        });
        tokio::pin!(serve);
        let drain = self.drain;
        tokio::select! {
            () = &mut serve => {}
            Ok(()) = stopping => {
                if tokio::time::timeout(drain, &mut serve).await.is_err() {
                    tracing::warn!(
                        "requests still in flight after the drain deadline of {drain:?}: cancelled"
                    );
                }
            }
        }
        Ok(())
    }
}
