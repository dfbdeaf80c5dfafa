//! Mesh node processes for the tests: `sophon node join --run` on 127.0.0.1.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{free_tcp, free_udp};

/// A mesh node process.
pub struct NodeProc {
    pub id: String,
    pub http: std::net::SocketAddr,
    pub grpc: std::net::SocketAddr,
    child: Option<Child>,
    log: PathBuf,
}

impl NodeProc {
    /// `sophon node join --run`: enrolls and keeps serving.
    pub fn join(root: &Path, n: usize, token: &str) -> NodeProc {
        NodeProc::join_with(root, n, token, &["--memory-mb", "4096"])
    }

    /// `join`, with these options as well (`--memory-mb` among them).
    pub fn join_with(root: &Path, n: usize, token: &str, extra: &[&str]) -> NodeProc {
        let id = format!("n{n}");
        let data = root.join(&id);
        let http = free_tcp();
        let grpc = free_tcp();
        let mesh = free_udp();
        let log = root.join(format!("{id}.log"));
        let file = std::fs::File::create(&log).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_sophon"))
            .args(["node", "join", "--join-token", token, "--data"])
            .arg(&data)
            .args(["--id", &id, "--http", &http.to_string()])
            .args(["--grpc", &grpc.to_string()])
            .args(["--mesh", &mesh.to_string(), "--zone", &format!("z{n}")])
            .args(extra)
            .args(["--run", "--cache-dir"])
            .arg(root.join("aot-cache"))
            .env("SOPHON_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start a node");
        NodeProc {
            id,
            http,
            grpc,
            child: Some(child),
            log,
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP client that returns error statuses as answers.
pub fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build(),
    )
}
