//! The AOT cache: compiled components on disk, keyed by the component's SHA-256 and the engine's
//! compatibility hash, so a restart or redeploy never recompiles and a different wasmtime or
//! configuration never loads a stale artifact.
//!
//! Deserialising an artifact runs its machine code, so an entry is trusted only when it carries
//! an HMAC-SHA256 tag made with this node's key ([`CacheKey`], kept outside the cache directory).
//! An entry without a valid tag (written by someone else, corrupted, or from another node) is
//! ignored and compiled again from the signed bundle's component.

use super::WasmtimeExt;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Whether a component came from the cache or was compiled now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Loaded from an AOT artifact on disk.
    Cached,
    /// Compiled now (and written to the cache when there is one).
    Compiled,
}

/// The key that tags this node's cache entries.
pub struct CacheKey(ring::hmac::Key);

impl CacheKey {
    /// Read the key from `file`, making it (32 random bytes, owner-only) when missing; with no
    /// file, or one that cannot be made, a key for this process only.
    pub fn load(file: Option<&Path>) -> anyhow::Result<CacheKey> {
        let bytes = match file {
            Some(path) => match read_or_make_key(path) {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::warn!(
                        path = %path.display(),
                        "cannot keep the AOT cache key ({e:#}); cached components from earlier \
                         runs will be compiled again"
                    );
                    process_key()
                }
            },
            None => process_key(),
        };
        Ok(CacheKey(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &bytes,
        )))
    }

    fn tag(&self, bytes: &[u8]) -> Vec<u8> {
        ring::hmac::sign(&self.0, bytes).as_ref().to_vec()
    }

    fn verify(&self, bytes: &[u8], tag: &[u8]) -> bool {
        ring::hmac::verify(&self.0, bytes, tag).is_ok()
    }
}

/// One random key per process, for runtimes without a key file.
fn process_key() -> [u8; 32] {
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *KEY.get_or_init(random_key)
}

fn random_key() -> [u8; 32] {
    use ring::rand::SecureRandom;
    let mut key = [0u8; 32];
    if ring::rand::SystemRandom::new().fill(&mut key).is_err() {
        // The OS refused randomness: fall back to a hash of what differs between processes.
        let seed = format!(
            "{:?}{}{:?}",
            std::time::SystemTime::now(),
            std::process::id(),
            std::thread::current().id()
        );
        key = Sha256::digest(seed.as_bytes()).into();
    }
    key
}

fn read_or_make_key(path: &Path) -> anyhow::Result<[u8; 32]> {
    if path.exists() {
        return read_key(path);
    }
    let key = random_key();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(hex::encode(key).as_bytes())?;
        file.sync_all()?;
    }
    // Another process may have made one meanwhile: the first link wins, and both use it.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        Err(_) => read_key(path),
    }
}

fn read_key(path: &Path) -> anyhow::Result<[u8; 32]> {
    let bytes = hex::decode(std::fs::read_to_string(path)?.trim())?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| anyhow::anyhow!("{} does not hold a 32-byte key", path.display()))
}

/// Components already loaded in this process, by SHA-256 of their bytes.
#[derive(Default)]
pub struct Loaded(Mutex<HashMap<[u8; 32], Component>>);

fn artifact_path(dir: &Path, engine: &Engine, digest: &[u8; 32]) -> PathBuf {
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    dir.join(format!("{}-{:016x}.cwasm", hex::encode(digest), h.finish()))
}

/// Load a component: the copy already in memory, else from the disk cache, else compiled now
/// (and written to the disk cache).
pub fn load_component(
    engine: &Engine,
    loaded: &Loaded,
    cache_dir: Option<&Path>,
    key: &CacheKey,
    component: &[u8],
) -> anyhow::Result<(Component, Origin)> {
    let digest: [u8; 32] = Sha256::digest(component).into();
    if let Some(c) = loaded.0.lock().get(&digest) {
        return Ok((c.clone(), Origin::Cached));
    }
    let (c, origin) = load_uncached(engine, cache_dir, key, &digest, component)?;
    loaded.0.lock().insert(digest, c.clone());
    Ok((c, origin))
}

fn load_uncached(
    engine: &Engine,
    cache_dir: Option<&Path>,
    key: &CacheKey,
    digest: &[u8; 32],
    component: &[u8],
) -> anyhow::Result<(Component, Origin)> {
    let Some(dir) = cache_dir else {
        return Ok((Component::new(engine, component).wt()?, Origin::Compiled));
    };
    let path = artifact_path(dir, engine, digest);
    let tag_path = path.with_extension("cwasm.tag");
    if let Ok(bytes) = std::fs::read(&path) {
        let tag = std::fs::read_to_string(&tag_path)
            .ok()
            .and_then(|t| hex::decode(t.trim()).ok());
        match tag {
            Some(tag) if key.verify(&bytes, &tag) => match deserialize_bytes(engine, &bytes) {
                Ok(c) => return Ok((c, Origin::Cached)),
                Err(e) => tracing::warn!(
                    path = %path.display(), "ignoring unusable cached component: {e:#}"
                ),
            },
            _ => tracing::warn!(
                path = %path.display(),
                "ignoring a cached component that this node did not write (no valid tag): \
                 compiling it again"
            ),
        }
    }
    let compiled = engine.precompile_component(component).wt()?;
    let written = write_atomically(dir, &path, &compiled).and_then(|()| {
        write_atomically(dir, &tag_path, hex::encode(key.tag(&compiled)).as_bytes())
    });
    if let Err(e) = written {
        tracing::warn!(dir = %dir.display(), "could not write the component cache: {e:#}");
    }
    Ok((deserialize_bytes(engine, &compiled)?, Origin::Compiled))
}

#[allow(unsafe_code)]
fn deserialize_bytes(engine: &Engine, compiled: &[u8]) -> anyhow::Result<Component> {
    // SAFETY: wasmtime requires bytes produced by `precompile_component` of a compatible engine.
    // They were either produced just now by this engine, or read into memory (so nobody can
    // change them after the check) and carry a tag made with this node's key over exactly these
    // bytes, which only this module writes, after compiling them itself. The cache file is named
    // by the engine's compatibility hash, and wasmtime still checks the header.
    Ok(unsafe { Component::deserialize(engine, compiled).wt()? })
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Unique per write, not only per process: a node loads bundles in parallel, and two that
    // share a component write the same entry at once.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(dir: &Path, key: &CacheKey, component: &[u8]) -> Origin {
        let engine = Engine::default();
        load_component(&engine, &Loaded::default(), Some(dir), key, component)
            .expect("load")
            .1
    }

    #[test]
    fn only_entries_tagged_with_this_nodes_key_are_deserialised() {
        let dir = tempfile::tempdir().expect("tmp");
        let key_file = dir.path().join("keys/cache.key");
        let cache = dir.path().join("cache");
        let key = CacheKey::load(Some(&key_file)).expect("key");
        let component = sophon_sdk::components::PASSTHROUGH;
        assert_eq!(load(&cache, &key, component), Origin::Compiled);
        assert_eq!(load(&cache, &key, component), Origin::Cached);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key_file)
                .expect("key file")
                .permissions();
            assert_eq!(mode.mode() & 0o777, 0o600, "the key is the owner's only");
        }
        // The same key file gives the same key: a restarted node uses its cache.
        let again = CacheKey::load(Some(&key_file)).expect("key");
        assert_eq!(load(&cache, &again, component), Origin::Cached);

        let artifact = std::fs::read_dir(&cache)
            .expect("cache dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .expect("an artifact");
        // Someone who can write the cache swaps in another (valid) artifact: refused, rebuilt.
        let other = Engine::default()
            .precompile_component(sophon_sdk::components::CLASSIFIER)
            .expect("compile");
        std::fs::write(&artifact, &other).expect("tamper");
        assert_eq!(load(&cache, &key, component), Origin::Compiled);
        assert_eq!(load(&cache, &key, component), Origin::Cached);
        // An entry without its tag, or tagged with another node's key, is compiled again.
        std::fs::remove_file(artifact.with_extension("cwasm.tag")).expect("untag");
        assert_eq!(load(&cache, &key, component), Origin::Compiled);
        let stranger = CacheKey::load(Some(&dir.path().join("other.key"))).expect("key");
        assert_eq!(load(&cache, &stranger, component), Origin::Compiled);
    }
}
