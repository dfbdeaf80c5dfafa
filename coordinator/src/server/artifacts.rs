//! The artifact store: bundles kept by digest on this coordinator's disk.
//!
//! `blobs/<digest>` holds a verified bundle; `blobs/tmp/` holds uploads in progress. A blob is
//! written to `tmp/`, fsynced, then renamed into place, so a crash leaves either the whole blob
//! or an orphan in `tmp/` that [`BlobStore::collect`] removes later.
//!
//! The push path ([`super::api`]) stores a bundle here, copies it to the other coordinators
//! ([`super::transport::kind::BLOB_PUT`]) and registers the version on the shelf only once a
//! quorum holds it. Blobs that no shelf version references any more, and that are older than a
//! grace period (a push may be between its copy and its commit), are garbage-collected.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sophon_sdk::bundle::{StreamVerifier, StreamedBundle};

use crate::{Error, Result};

/// Bundles by digest, in one directory.
#[derive(Clone, Debug)]
pub struct BlobStore {
    dir: PathBuf,
}

fn io(what: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::Io {
        what: what.into(),
        reason: e.to_string(),
    }
}

/// Whether `s` is a digest: 64 lowercase hex digits (so it is also a safe file name).
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A blob being written: bytes go to a temporary file, hashed and verified as a bundle as they
/// come ([`StreamVerifier`]), so memory stays flat whatever the blob's size and the file is
/// never read back to be checked.
pub struct BlobWriter {
    file: std::fs::File,
    path: PathBuf,
    verifier: StreamVerifier,
    /// Why the bytes are not a valid bundle, as soon as that is known.
    refused: Option<sophon_sdk::Error>,
    len: u64,
    limit: u64,
}

/// A finished blob: its temporary file, and what verifying it as a bundle found.
pub struct FinishedBlob {
    pub tmp: PathBuf,
    pub bundle: std::result::Result<StreamedBundle, sophon_sdk::Error>,
}

impl BlobWriter {
    /// Appends bytes; fails once the blob passes the limit.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if self.len + bytes.len() as u64 > self.limit {
            return Err(Error::TooLarge { limit: self.limit });
        }
        self.len += bytes.len() as u64;
        if self.refused.is_none()
            && let Err(e) = self.verifier.update(bytes)
        {
            self.refused = Some(e);
        }
        self.file
            .write_all(bytes)
            .map_err(|e| io(format!("write {}", self.path.display()), e))
    }

    /// The bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Why the bytes so far cannot be a valid bundle, if that is already known (a client can
    /// be stopped early instead of uploading the rest).
    pub fn refused(&self) -> Option<&sophon_sdk::Error> {
        self.refused.as_ref()
    }

    /// Flushes to disk; returns the temporary file, its SHA-256 and the verdict on the bundle.
    pub fn finish(self) -> Result<FinishedBlob> {
        self.file
            .sync_all()
            .map_err(|e| io(format!("sync {}", self.path.display()), e))?;
        let bundle = match self.refused {
            Some(e) => Err(e),
            None => self.verifier.finish(),
        };
        Ok(FinishedBlob {
            tmp: self.path,
            bundle,
        })
    }
}

impl BlobStore {
    /// Opens (creating) the store in `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<BlobStore> {
        let dir = dir.into();
        std::fs::create_dir_all(dir.join("tmp"))
            .map_err(|e| io(format!("create {}", dir.display()), e))?;
        Ok(BlobStore { dir })
    }

    /// The file of a stored blob.
    pub fn path(&self, digest: &str) -> Option<PathBuf> {
        if !is_digest(digest) {
            return None;
        }
        let path = self.dir.join(digest);
        path.is_file().then_some(path)
    }

    /// Starts a new blob of at most `limit` bytes.
    pub fn writer(&self, limit: u64) -> Result<BlobWriter> {
        let name = format!("{:016x}", rand::random::<u64>());
        let path = self.dir.join("tmp").join(name);
        let file = std::fs::File::create(&path)
            .map_err(|e| io(format!("create {}", path.display()), e))?;
        Ok(BlobWriter {
            file,
            path,
            verifier: StreamVerifier::new(),
            refused: None,
            len: 0,
            limit,
        })
    }

    /// Moves a finished temporary file into place under `key` (the bundle digest).
    pub fn commit(&self, tmp: &Path, key: &str) -> Result<PathBuf> {
        if !is_digest(key) {
            return Err(Error::BadBundle {
                reason: format!("{key:?} is not a digest"),
            });
        }
        let target = self.dir.join(key);
        std::fs::rename(tmp, &target)
            .map_err(|e| io(format!("move a blob into {}", target.display()), e))?;
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(target)
    }

    /// Removes a temporary file (an upload that failed).
    pub fn discard(&self, tmp: &Path) {
        let _ = std::fs::remove_file(tmp);
    }

    /// Digests stored here.
    pub fn list(&self) -> Result<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| io(format!("list {}", self.dir.display()), e))?;
        for entry in entries.flatten() {
            if let Some(name) = entry.file_name().to_str()
                && is_digest(name)
            {
                out.insert(name.to_string());
            }
        }
        Ok(out)
    }

    /// (count, bytes) of the stored blobs.
    pub fn usage(&self) -> (u64, u64) {
        let Ok(list) = self.list() else {
            return (0, 0);
        };
        let bytes = list
            .iter()
            .filter_map(|d| std::fs::metadata(self.dir.join(d)).ok())
            .map(|m| m.len())
            .sum();
        (list.len() as u64, bytes)
    }

    /// Deletes blobs not in `referenced` and temporary files, when older than `grace`.
    /// Returns the digests deleted.
    pub fn collect(&self, referenced: &BTreeSet<String>, grace: Duration) -> Vec<String> {
        let old = |path: &Path| {
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age >= grace)
        };
        let mut deleted = Vec::new();
        for digest in self.list().unwrap_or_default() {
            let path = self.dir.join(&digest);
            if !referenced.contains(&digest) && old(&path) && std::fs::remove_file(&path).is_ok() {
                deleted.push(digest);
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.dir.join("tmp")) {
            for entry in entries.flatten() {
                if old(&entry.path()) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        deleted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn put(store: &BlobStore, bytes: &[u8]) -> String {
        let mut w = store.writer(1 << 20).unwrap_or_else(|e| panic!("{e}"));
        w.write(bytes).unwrap_or_else(|e| panic!("{e}"));
        let tmp = w.finish().unwrap_or_else(|e| panic!("{e}")).tmp;
        let sha = hex::encode(Sha256::digest(bytes));
        store.commit(&tmp, &sha).unwrap_or_else(|e| panic!("{e}"));
        sha
    }

    #[test]
    fn blobs_are_stored_by_digest_and_collected_when_unreferenced() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = BlobStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let a = put(&store, b"bundle a");
        let b = put(&store, b"bundle b");
        assert_eq!(a, hex::encode(Sha256::digest(b"bundle a")));
        assert!(store.path(&a).is_some());
        assert!(store.path("../etc/passwd").is_none());
        assert_eq!(store.usage(), (2, 16));
        // Young blobs survive even unreferenced; old unreferenced ones go.
        let keep: BTreeSet<String> = [a.clone()].into();
        assert!(store.collect(&keep, Duration::from_secs(3600)).is_empty());
        assert_eq!(store.collect(&keep, Duration::ZERO), vec![b.clone()]);
        assert!(store.path(&a).is_some() && store.path(&b).is_none());
    }

    #[test]
    fn a_blob_over_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = BlobStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let mut w = store.writer(4).unwrap_or_else(|e| panic!("{e}"));
        assert!(w.write(b"1234").is_ok());
        assert!(matches!(w.write(b"5"), Err(Error::TooLarge { limit: 4 })));
    }
}
