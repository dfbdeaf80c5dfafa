//! The AOT cache: compiled components on disk, keyed by the component's SHA-256 and the engine's
//! compatibility hash, so a restart or redeploy never recompiles and a different wasmtime or
//! configuration never loads a stale artifact.

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
    component: &[u8],
) -> anyhow::Result<(Component, Origin)> {
    let digest: [u8; 32] = Sha256::digest(component).into();
    if let Some(c) = loaded.0.lock().get(&digest) {
        return Ok((c.clone(), Origin::Cached));
    }
    let (c, origin) = load_uncached(engine, cache_dir, &digest, component)?;
    loaded.0.lock().insert(digest, c.clone());
    Ok((c, origin))
}

fn load_uncached(
    engine: &Engine,
    cache_dir: Option<&Path>,
    digest: &[u8; 32],
    component: &[u8],
) -> anyhow::Result<(Component, Origin)> {
    let Some(dir) = cache_dir else {
        return Ok((Component::new(engine, component).wt()?, Origin::Compiled));
    };
    let path = artifact_path(dir, engine, digest);
    if path.exists() {
        match deserialize(engine, &path) {
            Ok(c) => return Ok((c, Origin::Cached)),
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring unusable cached component: {e:#}")
            }
        }
    }
    let compiled = engine.precompile_component(component).wt()?;
    if let Err(e) = write_atomically(dir, &path, &compiled) {
        tracing::warn!(dir = %dir.display(), "could not write the component cache: {e:#}");
    }
    Ok((deserialize_bytes(engine, &compiled)?, Origin::Compiled))
}

#[allow(unsafe_code)]
fn deserialize(engine: &Engine, path: &Path) -> anyhow::Result<Component> {
    // SAFETY: wasmtime requires that the file was produced by `precompile_component` of a
    // compatible engine and is not modified while mapped. Only this module writes the cache
    // directory, atomically (temp file + rename), and names each artifact by the engine's
    // compatibility hash; wasmtime still checks the header and refuses a mismatched artifact.
    Ok(unsafe { Component::deserialize_file(engine, path).wt()? })
}

#[allow(unsafe_code)]
fn deserialize_bytes(engine: &Engine, compiled: &[u8]) -> anyhow::Result<Component> {
    // SAFETY: `compiled` was produced just now by `precompile_component` of this same engine.
    Ok(unsafe { Component::deserialize(engine, compiled).wt()? })
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
