//! The shelf: models and their versions.
//!
//! A version is immutable once registered (its bundle digest, manifest summary and publisher key
//! never change); what changes is its curation (on or off the shelf, deprecated, tags) and, per
//! environment, its approval [`Stage`]: draft (no entry) → pending → approved or rejected, and back
//! to draft when the request is withdrawn. A rejected version may be submitted again.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::validate;
use super::{Change, Ctx, State};
use crate::error::{Error, Result, invalid};
use crate::scheduler::Device;

/// At most this many inputs or outputs, dimensions per shape.
pub const MAX_TENSORS: usize = 256;
pub const MAX_DIMS: usize = 16;
/// The largest memory a replica may ask for: 16 TiB.
pub const MAX_MEMORY_MB: u64 = 16 * 1024 * 1024;

/// A publisher key the cluster trusts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedKey {
    pub key: String,
    /// Whose key it is.
    pub name: String,
    pub added_by: String,
    pub added_at_ms: u64,
}

/// One declared input or output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSummary {
    pub name: String,
    /// A KServe V2 datatype, like `FP32` or `BYTES`.
    pub datatype: String,
    /// `-1` for a variable dimension.
    pub shape: Vec<i64>,
}

/// What the shelf keeps of a bundle's manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSummary {
    pub inputs: Vec<TensorSummary>,
    pub outputs: Vec<TensorSummary>,
    /// Memory one replica needs on its device.
    pub memory_mb: u64,
    /// Devices the model runs on, best first: the default hardware wish of its deployments.
    pub preferred: Vec<Device>,
    /// The wasi-nn backends that loaded the model where it was packed (`tract`, `ort`): it is
    /// placed only on nodes with one of them. Empty: not checked, any node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loads_on: Vec<String>,
}

impl ManifestSummary {
    fn validate(&self) -> Result<()> {
        for (what, tensors) in [("inputs", &self.inputs), ("outputs", &self.outputs)] {
            if tensors.len() > MAX_TENSORS {
                return Err(invalid(
                    what,
                    tensors.len().to_string(),
                    format!("declare at most {MAX_TENSORS}"),
                ));
            }
            let mut names = BTreeSet::new();
            for t in tensors {
                // Any name an exported model may carry (`gpu_0/data_0`, `input:0`), as the
                // bundle's manifest allows: non-empty, bounded, no control characters.
                validate::text("tensor name", &t.name, validate::MAX_TEXT_LEN, true)?;
                validate::id("tensor datatype", &t.datatype)?;
                if !names.insert(&t.name) {
                    return Err(invalid("tensor name", &t.name, "name each tensor once"));
                }
                if t.shape.len() > MAX_DIMS || t.shape.iter().any(|d| *d < -1) {
                    return Err(invalid(
                        "tensor shape",
                        format!("{:?}", t.shape),
                        format!("give at most {MAX_DIMS} dimensions, each -1 or more"),
                    ));
                }
            }
        }
        if self.memory_mb == 0 || self.memory_mb > MAX_MEMORY_MB {
            return Err(invalid(
                "memory",
                format!("{} MiB", self.memory_mb),
                format!("give 1 to {MAX_MEMORY_MB} MiB"),
            ));
        }
        validate_hardware(&self.preferred)
    }
}

/// A hardware wish: at least one device, each once.
pub(crate) fn validate_hardware(devices: &[Device]) -> Result<()> {
    let distinct: BTreeSet<&Device> = devices.iter().collect();
    if devices.is_empty() || distinct.len() != devices.len() {
        return Err(invalid(
            "hardware",
            format!("{devices:?}"),
            "name one or more of cpu, gpu, npu, best first, each once",
        ));
    }
    Ok(())
}

/// Where a version stands in one environment (no entry means draft).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Pending { request: u64 },
    Approved { request: u64 },
    Rejected { request: u64 },
}

/// One registered version of a model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelVersion {
    pub version: String,
    /// The bundle digest (64 lowercase hex digits): its identity on the shelf.
    pub digest: String,
    pub manifest: ManifestSummary,
    /// The ed25519 public key that signed the bundle (64 lowercase hex digits).
    pub publisher_key: String,
    pub created_by: String,
    pub created_at_ms: u64,
    pub on_shelf: bool,
    pub deprecated: bool,
    pub tags: BTreeSet<String>,
    /// Approval stage per environment; an environment not listed is draft.
    pub stages: BTreeMap<String, Stage>,
    /// What it keeps in memory once loaded, as the nodes measured it (the largest figure
    /// reported), with the node that measured it; `None` until one loads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
}

/// A model version's memory as a node measured it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measured {
    pub memory_mb: u64,
    pub node: String,
    pub at_ms: u64,
}

impl ModelVersion {
    /// The memory the scheduler charges a replica: measured where a node has loaded it, the
    /// manifest's estimate (its declared memory plus its weights) until then.
    pub fn memory_mb(&self) -> u64 {
        self.measured
            .as_ref()
            .map_or(self.manifest.memory_mb, |m| m.memory_mb)
    }

    /// The stage in an environment (`None`: draft).
    pub fn stage(&self, environment: &str) -> Option<Stage> {
        self.stages.get(environment).copied()
    }
}

/// A model: a name and its versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    pub name: String,
    pub created_by: String,
    pub created_at_ms: u64,
    pub versions: BTreeMap<String, ModelVersion>,
}

impl State {
    /// A version, or the error that names what is missing.
    pub fn version(&self, model: &str, version: &str) -> Result<&ModelVersion> {
        self.models
            .get(model)
            .ok_or_else(|| Error::UnknownModel {
                model: model.to_string(),
            })?
            .versions
            .get(version)
            .ok_or_else(|| Error::UnknownVersion {
                model: model.to_string(),
                version: version.to_string(),
            })
    }

    /// A version that may be offered for approval or deployed: on the shelf and not deprecated.
    pub(crate) fn offerable_version(&self, model: &str, version: &str) -> Result<&ModelVersion> {
        let v = self.version(model, version)?;
        let (model, version) = (model.to_string(), version.to_string());
        if !v.on_shelf {
            return Err(Error::OffShelf { model, version });
        }
        if v.deprecated {
            return Err(Error::Deprecated { model, version });
        }
        Ok(v)
    }

    pub(crate) fn version_mut(&mut self, model: &str, version: &str) -> Result<&mut ModelVersion> {
        self.models
            .get_mut(model)
            .ok_or_else(|| Error::UnknownModel {
                model: model.to_string(),
            })?
            .versions
            .get_mut(version)
            .ok_or_else(|| Error::UnknownVersion {
                model: model.to_string(),
                version: version.to_string(),
            })
    }

    pub(crate) fn trust_key(&mut self, ctx: Ctx<'_>, key: &str, name: &str) -> Result<Change> {
        validate::hex64("publisher key", key)?;
        validate::id("key name", name)?;
        let record = TrustedKey {
            key: key.to_string(),
            name: name.to_string(),
            added_by: ctx.actor.name.clone(),
            added_at_ms: ctx.now,
        };
        self.trusted_keys.insert(key.to_string(), record);
        Ok(Change::new(
            format!("key {key}"),
            format!("trusted as {name}"),
        ))
    }

    pub(crate) fn distrust_key(&mut self, key: &str) -> Result<Change> {
        if self.trusted_keys.remove(key).is_none() {
            return Err(Error::UnknownKey {
                key: key.to_string(),
            });
        }
        Ok(Change::new(format!("key {key}"), "no longer trusted"))
    }

    pub(crate) fn register_version(
        &mut self,
        ctx: Ctx<'_>,
        model: &str,
        version: &str,
        digest: &str,
        manifest: &ManifestSummary,
        publisher_key: &str,
    ) -> Result<Change> {
        validate::id("model name", model)?;
        validate::id("version", version)?;
        validate::hex64("bundle digest", digest)?;
        validate::hex64("publisher key", publisher_key)?;
        manifest.validate()?;
        if !self.trusted_keys.contains_key(publisher_key) {
            return Err(Error::UntrustedKey {
                key: publisher_key.to_string(),
            });
        }
        if self
            .models
            .get(model)
            .is_some_and(|m| m.versions.contains_key(version))
        {
            return Err(Error::VersionExists {
                model: model.to_string(),
                version: version.to_string(),
            });
        }
        for m in self.models.values() {
            if let Some(v) = m.versions.values().find(|v| v.digest == digest) {
                return Err(Error::DuplicateDigest {
                    digest: digest.to_string(),
                    model: m.name.clone(),
                    version: v.version.clone(),
                });
            }
        }
        let entry = self
            .models
            .entry(model.to_string())
            .or_insert_with(|| Model {
                name: model.to_string(),
                created_by: ctx.actor.name.clone(),
                created_at_ms: ctx.now,
                versions: BTreeMap::new(),
            });
        entry.versions.insert(
            version.to_string(),
            ModelVersion {
                version: version.to_string(),
                digest: digest.to_string(),
                manifest: manifest.clone(),
                publisher_key: publisher_key.to_string(),
                created_by: ctx.actor.name.clone(),
                created_at_ms: ctx.now,
                on_shelf: true,
                deprecated: false,
                tags: BTreeSet::new(),
                stages: BTreeMap::new(),
                measured: None,
            },
        );
        Ok(Change::new(
            format!("model {model}@{version}"),
            format!(
                "registered draft: digest {digest}, {} MiB, hardware {:?}, key {publisher_key}",
                manifest.memory_mb, manifest.preferred
            ),
        ))
    }

    pub(crate) fn set_on_shelf(&mut self, model: &str, version: &str, on: bool) -> Result<Change> {
        let v = self.version_mut(model, version)?;
        if v.on_shelf == on {
            return Err(Error::VersionAlreadyInState {
                model: model.to_string(),
                version: version.to_string(),
                what: if on { "on the shelf" } else { "off the shelf" },
            });
        }
        v.on_shelf = on;
        let detail = if on {
            "put on the shelf"
        } else {
            "taken off the shelf"
        };
        Ok(Change::new(format!("model {model}@{version}"), detail))
    }

    pub(crate) fn deprecate(&mut self, model: &str, version: &str) -> Result<Change> {
        let v = self.version_mut(model, version)?;
        if v.deprecated {
            return Err(Error::VersionAlreadyInState {
                model: model.to_string(),
                version: version.to_string(),
                what: "deprecated",
            });
        }
        v.deprecated = true;
        Ok(Change::new(
            format!("model {model}@{version}"),
            "deprecated",
        ))
    }

    /// A node measured what `model@version` keeps in memory once loaded. The figure replaces
    /// the manifest's estimate in the scheduler, for the deployments that run the version (their
    /// placements are planned again: a node the figure no longer fits sheds a replica).
    pub(crate) fn record_model_memory(
        &mut self,
        ctx: Ctx<'_>,
        model: &str,
        version: &str,
        node: &str,
        memory_mb: u64,
    ) -> Result<Change> {
        if memory_mb == 0 || memory_mb > MAX_MEMORY_MB {
            return Err(invalid(
                "memory_mb",
                memory_mb.to_string(),
                format!("from 1 to {MAX_MEMORY_MB} MiB"),
            ));
        }
        if !self.nodes.contains_key(node) {
            return Err(Error::UnknownNode {
                id: node.to_string(),
            });
        }
        let v = self.version_mut(model, version)?;
        if let Some(m) = &v.measured
            && memory_mb * 10 <= m.memory_mb * 11
        {
            return Err(invalid(
                "memory_mb",
                memory_mb.to_string(),
                format!(
                    "{model}@{version} was measured at {} MiB already; only a larger figure (by more than a tenth) replaces it",
                    m.memory_mb
                ),
            ));
        }
        let before = v.memory_mb();
        v.measured = Some(Measured {
            memory_mb,
            node: node.to_string(),
            at_ms: ctx.now,
        });
        for d in self.deployments.values_mut() {
            if d.model != model {
                continue;
            }
            if d.version == version {
                d.memory_mb = memory_mb;
            }
            if let Some(u) = d.update.as_mut().filter(|u| u.version == version) {
                u.memory_mb = memory_mb;
            }
        }
        Ok(Change::new(
            format!("model {model}@{version}"),
            format!("node {node} measured {memory_mb} MiB once loaded (was {before} MiB)"),
        )
        .replan())
    }

    pub(crate) fn tag(&mut self, model: &str, version: &str, tag: &str) -> Result<Change> {
        validate::id("tag", tag)?;
        let v = self.version(model, version)?;
        if v.tags.contains(tag) {
            return Err(Error::VersionAlreadyInState {
                model: model.to_string(),
                version: version.to_string(),
                what: "tagged so",
            });
        }
        let mut detail = format!("tagged {tag}");
        if let Some(m) = self.models.get_mut(model) {
            for other in m.versions.values_mut() {
                if other.tags.remove(tag) {
                    detail.push_str(&format!(" (moved from {})", other.version));
                }
            }
        }
        self.version_mut(model, version)?
            .tags
            .insert(tag.to_string());
        Ok(Change::new(format!("model {model}@{version}"), detail))
    }

    pub(crate) fn untag(&mut self, model: &str, tag: &str) -> Result<Change> {
        let m = self
            .models
            .get_mut(model)
            .ok_or_else(|| Error::UnknownModel {
                model: model.to_string(),
            })?;
        let v = m
            .versions
            .values_mut()
            .find(|v| v.tags.contains(tag))
            .ok_or_else(|| Error::UnknownTag {
                model: model.to_string(),
                tag: tag.to_string(),
            })?;
        v.tags.remove(tag);
        Ok(Change::new(
            format!("model {model}@{}", v.version),
            format!("untagged {tag}"),
        ))
    }
}
