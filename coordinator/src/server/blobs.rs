//! Bundles between coordinators: a push (verified, stored on a quorum of coordinators, then
//! registered on the shelf), a bundle fetched by digest from here or from another coordinator,
//! a bundle another coordinator copies here (`BLOB_PUT`), and collecting unreferenced ones.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::artifacts::{self, BlobWriter};
use super::transport::{self, Peers, kind};
use super::{Core, io};
use crate::state::shelf::{ManifestSummary, TensorSummary};
use crate::{Actor, Command, Error, Result, Role};

impl Core {
    /// Verifies an uploaded bundle, stores it on a quorum of coordinators, then registers its
    /// version on the shelf.
    pub async fn push_bundle(&self, actor: Actor, writer: BlobWriter) -> Result<serde_json::Value> {
        let finished = writer.finish()?;
        let tmp = finished.tmp;
        let bundle = match finished.bundle {
            Ok(b) => b,
            Err(e) => {
                self.blobs.discard(&tmp);
                return Err(Error::BadBundle {
                    reason: e.to_string(),
                });
            }
        };
        let digest = bundle.digest_hex();
        let key = bundle.publisher_hex();
        let trusted = {
            let key = key.clone();
            self.driver
                .read(true, move |s| s.trusted_keys().contains_key(&key))
                .await?
        };
        if !trusted {
            self.blobs.discard(&tmp);
            return Err(Error::UntrustedKey { key });
        }
        // Pushing the very bundle that is already on the shelf is a success that changes
        // nothing (a retried push, `sophon dev --bundle` then `model push`), for a publisher.
        let (name, version) = (
            bundle.manifest.model.name.clone(),
            bundle.manifest.model.version.clone(),
        );
        let already = {
            let (name, version, digest) = (name.clone(), version.clone(), digest.clone());
            self.driver
                .read(true, move |s| {
                    s.models()
                        .get(&name)
                        .and_then(|m| m.versions.get(&version))
                        .is_some_and(|v| v.digest == digest)
                })
                .await?
        };
        if already && actor.role.allows(Role::Publisher) && self.blobs.path(&digest).is_some() {
            self.blobs.discard(&tmp);
            return Ok(serde_json::json!({
                "model": name,
                "version": version,
                "digest": digest,
                "publisher_key": key,
                "size": bundle.len,
                "audit_seq": null,
                "already_on_shelf": true,
            }));
        }
        let path = self.blobs.commit(&tmp, &digest)?;
        self.replicate_blob(&digest, &path).await?;
        let m = &bundle.manifest;
        let weights: u64 = bundle.files.values().sum();
        let summary = ManifestSummary {
            inputs: m.inputs.iter().map(tensor_summary).collect(),
            outputs: m.outputs.iter().map(tensor_summary).collect(),
            memory_mb: u64::from(m.resources.memory_mb) + weights.div_ceil(1 << 20),
            preferred: m
                .hardware
                .preferred
                .iter()
                .map(|d| match d {
                    sophon_sdk::manifest::Device::Cpu => crate::Device::Cpu,
                    sophon_sdk::manifest::Device::Gpu => crate::Device::Gpu,
                    sophon_sdk::manifest::Device::Npu => crate::Device::Npu,
                })
                .collect(),
            loads_on: m
                .hardware
                .loads_on
                .iter()
                .map(|b| b.as_str().to_string())
                .collect(),
        };
        let outcome = self
            .write(
                actor,
                Command::RegisterModelVersion {
                    model: m.model.name.clone(),
                    version: m.model.version.clone(),
                    digest: digest.clone(),
                    manifest: summary,
                    publisher_key: key.clone(),
                },
            )
            .await?;
        Ok(serde_json::json!({
            "model": m.model.name,
            "version": m.model.version,
            "digest": digest,
            "publisher_key": key,
            "size": bundle.len,
            "audit_seq": outcome.audit_seq,
        }))
    }

    /// Copies a stored blob to the other coordinators until a quorum (this one included)
    /// holds it.
    async fn replicate_blob(&self, digest: &str, path: &Path) -> Result<()> {
        let voters = self.driver.status().voters;
        let others: Vec<u64> = voters.iter().copied().filter(|v| *v != self.id).collect();
        let quorum = voters.len() / 2 + 1;
        let mut have = 1usize;
        if have >= quorum {
            return Ok(());
        }
        let mut tasks = tokio::task::JoinSet::new();
        for peer in others {
            let peers = self.peers.clone();
            let path = path.to_path_buf();
            let digest = digest.to_string();
            tasks.spawn(async move { put_blob(&peers, peer, &digest, &path).await });
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut errors = Vec::new();
        while let Ok(Some(done)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
            match done {
                Ok(Ok(())) => {
                    have += 1;
                    if have >= quorum {
                        // The rest finish in the background.
                        tasks.detach_all();
                        return Ok(());
                    }
                }
                Ok(Err(e)) => errors.push(e.to_string()),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(Error::Unavailable {
            reason: format!(
                "the bundle reached {have} of the {quorum} coordinators a quorum needs: {}",
                errors.join("; ")
            ),
        })
    }

    /// A bundle by digest: from this coordinator's disk, else from another coordinator.
    pub async fn fetch_bundle(&self, digest: &str) -> Result<Vec<u8>> {
        if !artifacts::is_digest(digest) {
            return Err(Error::Invalid {
                what: "digest",
                value: digest.chars().take(80).collect(),
                hint: "64 lowercase hex digits".into(),
            });
        }
        if let Some(path) = self.blobs.path(digest) {
            return tokio::fs::read(&path)
                .await
                .map_err(|e| io(format!("read {}", path.display()), e));
        }
        let voters = self.driver.status().voters;
        for peer in voters.into_iter().filter(|v| *v != self.id) {
            if let Ok(bytes) = get_blob(&self.peers, peer, digest).await {
                return Ok(bytes);
            }
        }
        Err(Error::Remote {
            status: 404,
            code: "unknown_bundle".into(),
            message: format!("no coordinator holds bundle {digest}"),
        })
    }

    /// The digests the shelf references, read linearizably: a follower that is cut off or
    /// behind must not take a bundle that the shelf references now for an unreferenced one.
    async fn referenced(&self) -> Result<BTreeSet<String>> {
        self.driver
            .read(true, |s| {
                s.models()
                    .values()
                    .flat_map(|m| m.versions.values().map(|v| v.digest.clone()))
                    .collect()
            })
            .await
    }

    /// Stores a bundle another coordinator copies here, after verifying it.
    pub(super) async fn receive_blob(
        &self,
        header: &[u8],
        recv: &mut quinn::RecvStream,
    ) -> Result<serde_json::Value> {
        #[derive(Deserialize)]
        struct Header {
            digest: String,
            size: u64,
        }
        let h: Header =
            serde_json::from_slice(header).map_err(|e| io("decode a blob header", e))?;
        if h.size > self.config.max_bundle_bytes {
            return Err(Error::TooLarge {
                limit: self.config.max_bundle_bytes,
            });
        }
        let mut writer = self.blobs.writer(self.config.max_bundle_bytes)?;
        loop {
            match sophon_mesh::read_frame(recv, BLOB_CHUNK + 16).await {
                Ok(Some((kind::BLOB_PUT, chunk))) => writer.write(&chunk)?,
                Ok(Some((k, _))) => {
                    return Err(io("receive a blob", format!("unexpected kind {k}")));
                }
                Ok(None) => break,
                Err(e) => return Err(io("receive a blob", e)),
            }
        }
        let finished = writer.finish()?;
        let tmp = finished.tmp;
        let verified = finished.bundle.map_err(|e| e.to_string()).and_then(|b| {
            if b.digest_hex() == h.digest {
                Ok(())
            } else {
                Err(format!(
                    "its digest is {}, not {}",
                    b.digest_hex(),
                    h.digest
                ))
            }
        });
        if let Err(reason) = verified {
            self.blobs.discard(&tmp);
            return Err(Error::BadBundle { reason });
        }
        self.blobs.commit(&tmp, &h.digest)?;
        Ok(serde_json::json!({"stored": h.digest}))
    }
}

fn tensor_summary(t: &sophon_sdk::types::TensorSpec) -> TensorSummary {
    TensorSummary {
        name: t.name.clone(),
        datatype: t.datatype.as_str().to_string(),
        shape: t.shape.clone(),
    }
}

const BLOB_CHUNK: usize = 1 << 20;

/// Sends a file as `kind` frames of at most [`BLOB_CHUNK`] bytes, reading it a chunk at a time.
pub(super) async fn send_file(send: &mut quinn::SendStream, kind: u8, path: &Path) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| io(format!("open {}", path.display()), e))?;
    let mut chunk = vec![0u8; BLOB_CHUNK];
    loop {
        let n = file
            .read(&mut chunk)
            .await
            .map_err(|e| io(format!("read {}", path.display()), e))?;
        if n == 0 {
            return Ok(());
        }
        sophon_mesh::write_frame(send, kind, &chunk[..n])
            .await
            .map_err(|e| Error::Unavailable {
                reason: format!("send a blob: {e}"),
            })?;
    }
}

async fn put_blob(peers: &Peers, peer: u64, digest: &str, path: &Path) -> Result<()> {
    let conn = peers.connection(peer).await?;
    let fail = |e: &dyn std::fmt::Display| Error::Unavailable {
        reason: format!("copy bundle to coordinator {peer}: {e}"),
    };
    let size = tokio::fs::metadata(path)
        .await
        .map_err(|e| io(format!("stat {}", path.display()), e))?
        .len();
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| fail(&e))?;
    let header = serde_json::json!({"digest": digest, "size": size}).to_string();
    sophon_mesh::write_frame(&mut send, kind::BLOB_PUT, header.as_bytes())
        .await
        .map_err(|e| fail(&e))?;
    send_file(&mut send, kind::BLOB_PUT, path)
        .await
        .map_err(|e| fail(&e))?;
    send.finish().map_err(|e| fail(&e))?;
    match sophon_mesh::read_frame(&mut recv, 1 << 20).await {
        Ok(Some((k, body))) => transport::decode_answer::<serde_json::Value>(k, &body).map(|_| ()),
        Ok(None) => Err(fail(&"no answer")),
        Err(e) => Err(fail(&e)),
    }
}

async fn get_blob(peers: &Peers, peer: u64, digest: &str) -> Result<Vec<u8>> {
    let conn = peers.connection(peer).await?;
    let fail = |e: &dyn std::fmt::Display| Error::Unavailable {
        reason: format!("fetch bundle from coordinator {peer}: {e}"),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| fail(&e))?;
    sophon_mesh::write_frame(&mut send, kind::BLOB_GET, digest.as_bytes())
        .await
        .map_err(|e| fail(&e))?;
    send.finish().map_err(|e| fail(&e))?;
    let mut out = Vec::new();
    loop {
        match sophon_mesh::read_frame(&mut recv, transport::MAX_FRAME).await {
            Ok(Some((kind::BLOB_GET, chunk))) => out.extend_from_slice(&chunk),
            Ok(Some((k, body))) => {
                return transport::decode_answer::<serde_json::Value>(k, &body)
                    .and(Err(fail(&"unexpected answer")));
            }
            Ok(None) => return Ok(out),
            Err(e) => return Err(fail(&e)),
        }
    }
}

/// Collects unreferenced bundles now and then.
pub(super) async fn gc_loop(core: Arc<Core>) {
    let mut interval = tokio::time::interval(core.config.gc_interval);
    interval.tick().await;
    loop {
        interval.tick().await;
        match core.collect_garbage().await {
            Ok(deleted) => {
                for digest in &deleted {
                    tracing::info!(%digest, "collected an unreferenced bundle");
                }
            }
            Err(e) => tracing::debug!(error = %e, "no garbage collection this round"),
        }
    }
}

impl Core {
    /// Deletes the stored bundles that the shelf does not reference and that are older than
    /// the grace period. Nothing is deleted unless the shelf could be read linearizably.
    pub async fn collect_garbage(&self) -> Result<Vec<String>> {
        let referenced = self.referenced().await?;
        let blobs = self.blobs.clone();
        let grace = self.config.gc_grace;
        let deleted = tokio::task::spawn_blocking(move || blobs.collect(&referenced, grace))
            .await
            .unwrap_or_default();
        self.metrics.blobs_collected.inc_by(deleted.len() as u64);
        Ok(deleted)
    }
}
