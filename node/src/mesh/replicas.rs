//! The replicas placed on this node: fetched by digest, verified, loaded; unloaded when they
//! are placed elsewhere. Each replica's state (pending, fetching, loading, ready, failed with
//! the reason) goes to the leader with every heartbeat.
//!
//! **Cold and hot.** A replica placed cold (the default) is fetched and verified, and its
//! component compiled into the AOT cache and linked, but its graphs are not loaded: it is ready
//! at once, and its first request loads it. A hot replica loads at once. Both stay within the
//! memory budget: past it, the least recently used version that no request holds is evicted,
//! cold ones before hot ones, and loads again from disk on its next request. A load that fails
//! then marks the version's replicas failed, with the reason.
//!
//! **Measured memory.** Each version's first load here is measured ([`crate::heap`]): the heap
//! it keeps, plus the weights of graphs on a native backend (which allocate on their own).
//! That figure counts against the budget and goes to the leader, whose scheduler uses it.
//!
//! A bundle is checked before it serves: its digest must be the one the view names, its
//! signature must be by a publisher the cluster trusts (the view carries the list), and every
//! file must match its digest. Fetched bundles are kept under `bundles/<digest>`, so a
//! restart or a replica moving back does not fetch again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use parking_lot::Mutex;
use sophon_mesh::wire::{self, ReplicaId, ReplicaState};

use super::control::Coordinators;
use crate::Repository;

/// How long a version whose last replica here was taken away keeps serving (see
/// `Replicas::unload_if_unused`).
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The largest bundle a node fetches.
pub const MAX_BUNDLE_BYTES: usize = 2 << 30;

#[derive(Clone, Debug)]
struct Replica {
    assignment: wire::Assignment,
    state: ReplicaState,
    reason: Option<String>,
}

/// What is placed here and how far each replica got.
pub struct Replicas {
    bundles: PathBuf,
    repo: Arc<Repository>,
    replicas: Mutex<BTreeMap<ReplicaId, Replica>>,
    coordinators: Mutex<Option<Arc<Coordinators>>>,
    process: Mutex<ProcessSampler>,
    /// Woken when a replica changes state: the next heartbeat goes at once, so a replica
    /// ready now is routed to now, not at the next second.
    pub changed: tokio::sync::Notify,
    /// The memory the loaded models may take (`--model-memory`; `None`: no limit).
    budget: Option<u64>,
    /// Each loaded version's memory, and the versions placed here but not loaded (their
    /// replicas stay ready: the next request loads them from disk).
    memory: Mutex<Memory>,
    /// One load at a time: loads are CPU-bound, and many at once would overshoot the budget.
    loading: tokio::sync::Mutex<()>,
}

type Key = (String, String);

#[derive(Default)]
struct Memory {
    /// Each loaded version's memory (measured, else estimated).
    footprint: HashMap<Key, u64>,
    /// Placed here and not loaded now (placed cold, or evicted), with the bundle's digest.
    evicted: HashMap<Key, String>,
    /// The versions a hot replica here runs.
    hot: HashSet<Key>,
    /// The measured figure of each bundle loaded here (by digest), and the heartbeats that
    /// still carry it as new.
    measured: HashMap<String, (Key, u64)>,
    unreported: HashMap<Key, u8>,
    evictions: u64,
    reloads: u64,
}

/// How many heartbeats carry a new measurement (all of them are sent every
/// `control::MEMORY_EVERY` heartbeats besides).
const REPORT_NEW: u8 = 3;

/// A loaded version's memory, estimated from its bundle where it could not be measured: the
/// weights as read and the backend's copy of them, plus 1 MiB of plans and buffers. Compiled
/// components are shared between bundles that carry the same one (the runtime keeps one
/// copy), so they do not count per model.
fn estimate(bundle_bytes: usize) -> u64 {
    2 * bundle_bytes as u64 + (1 << 20)
}

impl Replicas {
    pub fn new(dir: &Path, repo: Arc<Repository>) -> anyhow::Result<Replicas> {
        let bundles = dir.join("bundles");
        std::fs::create_dir_all(&bundles)
            .with_context(|| format!("create {}", bundles.display()))?;
        Ok(Replicas {
            bundles,
            repo,
            replicas: Mutex::new(BTreeMap::new()),
            coordinators: Mutex::new(None),
            process: Mutex::new(ProcessSampler::default()),
            changed: tokio::sync::Notify::new(),
            budget: None,
            memory: Mutex::new(Memory::default()),
            loading: tokio::sync::Mutex::new(()),
        })
    }

    /// Keep the loaded models within `bytes`, evicting the least recently used.
    pub fn with_budget(mut self, bytes: Option<u64>) -> Replicas {
        self.budget = bytes;
        self
    }

    /// (loaded estimate in bytes, budget, versions evicted now, evictions, reloads).
    pub fn memory(&self) -> (u64, Option<u64>, usize, u64, u64) {
        let m = self.memory.lock();
        let loaded = self
            .repo
            .loaded()
            .iter()
            .filter_map(|l| m.footprint.get(&(l.name.clone(), l.version.clone())))
            .sum();
        (loaded, self.budget, m.evicted.len(), m.evictions, m.reloads)
    }

    /// Whether `model@version` (or, with no version, any version of it) was evicted here.
    pub fn evicted(&self, model: &str, version: Option<&str>) -> Option<(String, String)> {
        self.memory
            .lock()
            .evicted
            .keys()
            .find(|(m, v)| m == model && version.is_none_or(|want| want == v))
            .cloned()
    }

    /// Load an evicted version again, from the bundle on disk (once, however many requests
    /// ask at the same time). True once it is loaded.
    pub async fn reload(&self, model: &str, version: &str) -> bool {
        let _one = self.loading.lock().await;
        self.make_room();
        let key = (model.to_string(), version.to_string());
        let Some(digest) = self.memory.lock().evicted.get(&key).cloned() else {
            // Loaded meanwhile by another request (or never evicted).
            return self.repo.lookup(model, Some(version)).is_ok();
        };
        let path = self.bundles.join(format!("{digest}.sophon"));
        let loaded = match tokio::fs::read(&path).await {
            Ok(bytes) => self.load_making_room(Arc::new(bytes), digest).await,
            Err(e) => Err(anyhow::Error::from(e).context(format!("read {}", path.display()))),
        };
        match loaded {
            Ok(_) => {
                self.memory.lock().reloads += 1;
                self.evict_over_budget(&key);
                true
            }
            Err(e) => {
                let reason = format!("load on demand: {e:#}");
                tracing::warn!(%model, %version, %reason, "could not load a model placed here");
                // Its replicas here fail, so that the mesh routes around them and the leader
                // sees why; the bundle on disk is fetched again if it is placed again.
                self.memory.lock().evicted.remove(&key);
                let _ = std::fs::remove_file(&path);
                let ids: Vec<ReplicaId> = self
                    .replicas
                    .lock()
                    .iter()
                    .filter(|(_, r)| r.assignment.model == model && r.assignment.version == version)
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    self.set(id, ReplicaState::Failed, Some(reason.clone()));
                }
                false
            }
        }
    }

    /// The memory figures measured here since the last call (`all`: every one kept), for the
    /// heartbeat.
    pub fn measurements(&self, all: bool) -> Vec<wire::ModelMemory> {
        let mut m = self.memory.lock();
        let Memory {
            measured,
            unreported,
            ..
        } = &mut *m;
        let mut out = Vec::new();
        for ((model, version), bytes) in measured.values() {
            let key = (model.clone(), version.clone());
            let fresh = unreported.get_mut(&key).filter(|n| **n > 0);
            if let Some(n) = fresh {
                *n -= 1;
            } else if !all {
                continue;
            }
            out.push(wire::ModelMemory {
                model: model.clone(),
                version: version.clone(),
                bytes: *bytes,
            });
        }
        out
    }

    /// Load a bundle; when the instance pool is full, evict the least recently used model not
    /// in use (or give one being dropped a moment) and try again.
    ///
    /// The load's memory is measured (on its first load here) and recorded as the version's
    /// footprint; the version is no longer evicted.
    async fn load_making_room(
        &self,
        bytes: Arc<Vec<u8>>,
        digest: String,
    ) -> anyhow::Result<Arc<crate::repository::LoadedModel>> {
        let mut tries = 0;
        let len = bytes.len();
        loop {
            let (repo, bytes, want) = (self.repo.clone(), bytes.clone(), digest.clone());
            let (loaded, kept) = tokio::task::spawn_blocking(move || {
                crate::heap::measure(|| repo.add_bundle_expecting(&bytes, Some(&want)))
            })
            .await
            .context("the loader stopped")?;
            match loaded {
                Err(e) if Repository::pool_full(&e) && tries < 20 => {
                    tries += 1;
                    self.evict_one(&(String::new(), String::new()));
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e.into()),
                Ok(loaded) => {
                    let key = (loaded.name.clone(), loaded.version.clone());
                    // Native backends allocate their copy of the weights on their own.
                    let native = loaded.graphs.iter().any(|g| {
                        matches!(
                            g.backend,
                            sophon_sdk::Backend::Ort | sophon_sdk::Backend::Openvino
                        )
                    });
                    // A load that compiled its component allocated on the compiler's threads
                    // too: its count says nothing, and a later load measures.
                    let compiled = loaded.model.origin() == crate::runtime::cache::Origin::Compiled;
                    let mut m = self.memory.lock();
                    let bytes = match m.measured.get(&digest) {
                        Some((_, bytes)) => *bytes,
                        None => match kept.filter(|_| !compiled) {
                            Some(kept) => {
                                // It holds its bundle at least (read and kept whole).
                                let bytes =
                                    kept.max(len as u64) + if native { len as u64 } else { 0 };
                                m.measured.insert(digest.clone(), (key.clone(), bytes));
                                m.unreported.insert(key.clone(), REPORT_NEW);
                                tracing::info!(model = %key.0, version = %key.1, bytes, "measured the memory a load keeps");
                                bytes
                            }
                            None => estimate(len),
                        },
                    };
                    m.evicted.remove(&key);
                    m.footprint.insert(key, bytes);
                    return Ok(loaded);
                }
            }
        }
    }

    /// Evict the least recently used versions not in use until the loaded ones fit the
    /// budget; `keep` (just loaded) stays.
    fn evict_over_budget(&self, keep: &(String, String)) {
        let Some(budget) = self.budget else { return };
        loop {
            let total: u64 = {
                let m = self.memory.lock();
                self.repo
                    .loaded()
                    .iter()
                    .filter_map(|l| m.footprint.get(&(l.name.clone(), l.version.clone())))
                    .sum()
            };
            if total <= budget || !self.evict_one(keep) {
                return;
            }
        }
    }

    /// Before a load: free the instance slots a model takes by default (the node's pool holds
    /// a fixed number of instances, each loaded model reserving its concurrency), evicting the
    /// least recently used versions not in use.
    fn make_room(&self) {
        let none = (String::new(), String::new());
        loop {
            let (needed, free) = self.repo.free_slots();
            if free >= needed || !self.evict_one(&none) {
                return;
            }
        }
    }

    /// Evict the least recently used loaded version that no request holds, other than `keep`
    /// (one this node placed and can load again); false when there is none.
    fn evict_one(&self, keep: &(String, String)) -> bool {
        let loaded = self.repo.loaded();
        let mut m = self.memory.lock();
        // In use: held by a request besides the repository and this list.
        let victim = loaded
            .iter()
            .filter(|l| (&l.name, &l.version) != (&keep.0, &keep.1))
            .filter(|l| {
                m.footprint
                    .contains_key(&(l.name.clone(), l.version.clone()))
            })
            .filter(|l| Arc::strong_count(l) <= 2)
            // Cold before hot, then the least recently used.
            .min_by_key(|l| {
                (
                    m.hot.contains(&(l.name.clone(), l.version.clone())),
                    l.last_used.load(std::sync::atomic::Ordering::Relaxed),
                )
            });
        let Some(victim) = victim else { return false };
        let key = (victim.name.clone(), victim.version.clone());
        let digest = victim.digest.clone();
        drop(loaded);
        if !self.repo.remove_version(&key.0, &key.1) {
            return false;
        }
        tracing::info!(model = %key.0, version = %key.1, "evicted (least recently used)");
        m.evicted.insert(key, digest);
        m.evictions += 1;
        true
    }

    /// The repository the replicas load into.
    pub fn repository(&self) -> &Arc<Repository> {
        &self.repo
    }

    pub fn set_coordinators(&self, coordinators: Arc<Coordinators>) {
        *self.coordinators.lock() = Some(coordinators);
    }

    /// Trust the cluster's publisher keys (hex ed25519); unreadable ones are skipped.
    pub fn set_trusted(&self, keys: &[String]) {
        let keys = keys
            .iter()
            .filter_map(|k| {
                let bytes: [u8; 32] = hex::decode(k).ok()?.try_into().ok()?;
                sophon_sdk::VerifyingKey::from_bytes(&bytes).ok()
            })
            .collect();
        self.repo.set_trusted(keys);
    }

    /// Make what is placed here the `assignments`: start the new ones, drop the others.
    pub fn reconcile(self: &Arc<Self>, assignments: Vec<wire::Assignment>) {
        let wanted: BTreeMap<ReplicaId, wire::Assignment> = assignments
            .into_iter()
            .map(|a| {
                (
                    ReplicaId {
                        deployment: a.deployment,
                        revision: a.revision,
                        replica: a.replica,
                    },
                    a,
                )
            })
            .collect();
        let mut start = Vec::new();
        let mut dropped = Vec::new();
        let hot: HashSet<Key> = wanted
            .values()
            .filter(|a| a.hot)
            .map(|a| (a.model.clone(), a.version.clone()))
            .collect();
        // Versions placed here cold that a replica now wants hot: load them now.
        let warm: Vec<Key> = {
            let mut m = self.memory.lock();
            m.hot = hot;
            m.hot
                .iter()
                .filter(|k| m.evicted.contains_key(*k))
                .cloned()
                .collect()
        };
        {
            let mut replicas = self.replicas.lock();
            replicas.retain(|id, r| {
                let keep = wanted
                    .get(id)
                    .is_some_and(|a| a.digest == r.assignment.digest);
                if keep && let Some(a) = wanted.get(id) {
                    r.assignment.hot = a.hot;
                }
                if !keep {
                    dropped.push(r.assignment.clone());
                }
                keep
            });
            for (id, a) in &wanted {
                if !replicas.contains_key(id) {
                    replicas.insert(
                        *id,
                        Replica {
                            assignment: a.clone(),
                            state: ReplicaState::Pending,
                            reason: None,
                        },
                    );
                    start.push((*id, a.clone()));
                }
            }
        }
        for a in dropped {
            self.unload_if_unused(a);
        }
        for (id, a) in start {
            let me = self.clone();
            tokio::spawn(async move { me.bring_up(id, a).await });
        }
        for (model, version) in warm {
            let me = self.clone();
            tokio::spawn(async move { me.reload(&model, &version).await });
        }
    }

    /// Drop a model version no replica here needs any more, after [`DRAIN`]: the view that
    /// took the replica away also took its route away, but a request this node or another
    /// routed to it just before (with a view a moment older) still finds it. Requests in flight
    /// hold the model and finish in any case.
    fn unload_if_unused(self: &Arc<Self>, gone: wire::Assignment) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(DRAIN).await;
            let needed =
                me.replicas.lock().values().any(|r| {
                    r.assignment.model == gone.model && r.assignment.version == gone.version
                });
            if !needed {
                let key = (gone.model.clone(), gone.version.clone());
                let mut m = me.memory.lock();
                m.evicted.remove(&key);
                m.footprint.remove(&key);
            }
            if !needed && me.repo.remove_version(&gone.model, &gone.version) {
                tracing::info!(model = %gone.model, version = %gone.version, "replica moved away: unloaded");
            }
        });
    }

    fn set(&self, id: ReplicaId, state: ReplicaState, reason: Option<String>) -> bool {
        let found = match self.replicas.lock().get_mut(&id) {
            Some(r) => {
                r.state = state;
                r.reason = reason;
                true
            }
            None => false,
        };
        if found && matches!(state, ReplicaState::Ready | ReplicaState::Failed) {
            self.changed.notify_one();
        }
        found
    }

    async fn bring_up(self: Arc<Self>, id: ReplicaId, a: wire::Assignment) {
        let result = self.fetch_and_load(id, &a).await;
        match result {
            Ok(()) => {
                if self.set(id, ReplicaState::Ready, None) {
                    tracing::info!(deployment = id.deployment, replica = id.replica, model = %a.model, version = %a.version, "replica ready");
                } else {
                    // Moved away while it loaded.
                    self.unload_if_unused(a.clone());
                }
            }
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::warn!(deployment = id.deployment, replica = id.replica, model = %a.model, %reason, "replica failed");
                self.set(id, ReplicaState::Failed, Some(reason));
            }
        }
    }

    async fn fetch_and_load(&self, id: ReplicaId, a: &wire::Assignment) -> anyhow::Result<()> {
        let key = (a.model.clone(), a.version.clone());
        // Already loaded (another deployment of the same version, or a restart that kept it),
        // or placed here but not loaded (its next request loads it; a hot replica's now).
        if self
            .repo
            .lookup(&a.model, Some(&a.version))
            .is_ok_and(|m| m.digest == a.digest)
        {
            return Ok(());
        }
        if self
            .memory
            .lock()
            .evicted
            .get(&key)
            .is_some_and(|d| *d == a.digest)
        {
            if a.hot && !self.reload(&a.model, &a.version).await {
                bail!("{}@{} could not be loaded", a.model, a.version);
            }
            return Ok(());
        }
        let path = self.bundles.join(format!("{}.sophon", a.digest));
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(_) => {
                self.set(id, ReplicaState::Fetching, None);
                let coordinators = self
                    .coordinators
                    .lock()
                    .clone()
                    .context("no coordinators known")?;
                let bytes = coordinators
                    .fetch(&a.digest, MAX_BUNDLE_BYTES)
                    .await
                    .context("fetch the bundle")?;
                if let Err(e) = super::write_atomic(&path, &bytes) {
                    tracing::warn!(error = %e, "cannot keep the bundle on disk");
                }
                bytes
            }
        };
        self.set(id, ReplicaState::Loading, None);
        if !a.hot {
            // Cold: verified, compiled and linked now; loaded on its first request.
            let (repo, digest) = (self.repo.clone(), a.digest.clone());
            let prepared = tokio::task::spawn_blocking(move || repo.prepare(&bytes, &digest))
                .await
                .context("the loader stopped")?;
            let (name, version) = match prepared {
                Ok(found) => found,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(e.into());
                }
            };
            if (name.as_str(), version.as_str()) != (a.model.as_str(), a.version.as_str()) {
                bail!(
                    "the bundle holds {name}@{version}, not {}@{} as placed",
                    a.model,
                    a.version
                );
            }
            self.memory.lock().evicted.insert(key, a.digest.clone());
            return Ok(());
        }
        let _one = self.loading.lock().await;
        self.make_room();
        // The repository checks the digest, the signature and every file before loading.
        let loaded = match self
            .load_making_room(Arc::new(bytes), a.digest.clone())
            .await
        {
            Ok(loaded) => loaded,
            Err(e) => {
                // A damaged copy on disk is fetched again next time.
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let key = (loaded.name.clone(), loaded.version.clone());
        self.evict_over_budget(&key);
        if loaded.name != a.model || loaded.version != a.version {
            self.repo.remove_version(&loaded.name, &loaded.version);
            bail!(
                "the bundle holds {}@{}, not {}@{} as placed",
                loaded.name,
                loaded.version,
                a.model,
                a.version
            );
        }
        Ok(())
    }

    /// Every replica's state, for the heartbeat. A ready replica whose version was unloaded
    /// through the repository API is reported `unloaded` (so the mesh routes around it) until
    /// it is loaded again.
    pub fn reports(&self) -> Vec<wire::ReplicaReport> {
        self.replicas
            .lock()
            .iter()
            .map(|(id, r)| {
                let a = &r.assignment;
                let unloaded = r.state == ReplicaState::Ready
                    && !self
                        .repo
                        .lookup(&a.model, Some(&a.version))
                        .is_ok_and(|m| m.digest == a.digest)
                    && self.evicted(&a.model, Some(&a.version)).is_none();
                wire::ReplicaReport {
                    deployment: id.deployment,
                    revision: id.revision,
                    replica: id.replica,
                    state: if unloaded {
                        ReplicaState::Unloaded
                    } else {
                        r.state
                    },
                    reason: if unloaded {
                        Some(format!(
                            "unloaded on this node through the repository API; POST \
                             /v2/repository/models/{}/load serves it again",
                            a.model
                        ))
                    } else {
                        r.reason.clone()
                    },
                }
            })
            .collect()
    }

    /// Each loaded model version's performance since the last call (its window restarts).
    pub fn perf(&self, only: impl Fn(&str, &str) -> bool) -> Vec<wire::PerfReport> {
        self.repo
            .loaded()
            .iter()
            .filter(|m| only(&m.name, &m.version))
            .map(|m| m.perf.take(&m.name, &m.version))
            .collect()
    }

    /// The node's load now: requests running and queued, this process's CPU use since the
    /// last call (across all cores) and its resident memory.
    pub fn load(&self) -> wire::NodeLoad {
        let loaded = self.repo.loaded();
        let queued: usize = loaded.iter().map(|m| m.queued()).sum();
        let inflight: usize = loaded.iter().map(|m| m.admission.running()).sum();
        let (cpu_percent, memory_used_mb) = self.process.lock().sample();
        wire::NodeLoad {
            inflight: inflight as u32,
            queued: queued as u32,
            cpu_percent,
            memory_used_mb,
        }
    }
}

/// The CPU time (user + system, in ticks of 1/100 s) a process has used, from
/// `/proc/<pid>/stat` (`pid` may be `self`); `None` where there is no such file.
pub fn cpu_ticks(pid: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) close with ')'.
    let rest = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// This process's CPU time and resident memory, from `/proc/self` (zero where there is none).
#[derive(Default)]
struct ProcessSampler {
    last: Option<(std::time::Instant, u64)>,
}

impl ProcessSampler {
    /// (CPU % across all cores since the last sample, resident MiB).
    fn sample(&mut self) -> (u32, u64) {
        let cpu_ticks = cpu_ticks("self");
        let rss_mb = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|pages| pages * 4096 / (1 << 20))
            .unwrap_or(0);
        let now = std::time::Instant::now();
        let cpu = match (cpu_ticks, self.last) {
            (Some(ticks), Some((at, before))) => {
                // Linux reports CPU time in ticks of 1/100 s (USER_HZ).
                let used_s = ticks.saturating_sub(before) as f64 / 100.0;
                let wall_s = now.duration_since(at).as_secs_f64().max(1e-3);
                let cores = num_cpus::get().max(1) as f64;
                ((used_s / wall_s / cores) * 100.0)
                    .round()
                    .clamp(0.0, 100.0) as u32
            }
            _ => 0,
        };
        if let Some(ticks) = cpu_ticks {
            self.last = Some((now, ticks));
        }
        (cpu, rss_mb)
    }
}
