//! Deployments: a version running as N replicas in an environment, on the hardware it wishes
//! for.
//!
//! A version may be deployed only while it is on the shelf and not deprecated, and, where the
//! environment's policy needs approvals, only once it is approved for that environment. One
//! deployment per (model, version, environment): scale it rather than adding another. Running
//! deployments are left alone when their version later leaves the shelf or is deprecated.
//!
//! The rollout status follows the placements: `degraded` while some replicas have no node,
//! `available` once every replica is placed and its node reports it ready, `progressing` between.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::autoscale::Autoscale;
use super::canary::{Canary, CanarySpec, Decision, Figures, Verdict};
use super::shelf::{Stage, validate_hardware};
use super::validate;
use super::{Change, Ctx, State};
use crate::command::Created;
use crate::error::{Error, Result, invalid};
use crate::scheduler::first_revision;
use crate::scheduler::{DeploymentView, Device};

/// The most replicas one deployment may ask for.
pub const MAX_REPLICAS: u32 = 100_000;

/// Where a deployment's rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    Progressing,
    Available,
    Degraded,
}

/// A deployment's replicas, counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub state: RolloutState,
    pub placed: u32,
    pub ready: u32,
    pub unplaced: u32,
}

impl RolloutStatus {
    pub(crate) fn new(replicas: u32, placed: u32, ready: u32, unplaced: u32) -> RolloutStatus {
        let state = if unplaced > 0 {
            RolloutState::Degraded
        } else if ready >= replicas {
            RolloutState::Available
        } else {
            RolloutState::Progressing
        };
        RolloutStatus {
            state,
            placed,
            ready,
            unplaced,
        }
    }
}

impl RolloutStatus {
    /// A deployment's status from its counted replicas (both revisions during an update, which
    /// is `progressing` until it ends).
    pub(crate) fn of(d: &Deployment, placed: u32, ready: u32, unplaced: u32) -> RolloutStatus {
        let mut status = RolloutStatus::new(d.replicas, placed, ready, unplaced);
        if d.update.is_some() && status.state == RolloutState::Available {
            status.state = RolloutState::Progressing;
        }
        status
    }
}

/// A version running in an environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: u64,
    pub model: String,
    pub version: String,
    pub environment: String,
    pub replicas: u32,
    /// Devices, best first.
    pub hardware: Vec<Device>,
    /// Per replica, from the version's manifest.
    pub memory_mb: u64,
    pub created_by: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub rollout: RolloutStatus,
    /// Nodes that failed to load it, with their reasons: the scheduler places it elsewhere.
    /// Cleared when the deployment is scaled.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failed_on: BTreeMap<String, String>,
    /// The revision serving: it runs `version`. Every update or rollback makes a new one.
    #[serde(default = "first_revision")]
    pub revision: u32,
    /// Every revision made, oldest first (`sophon deploy history`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Revision>,
    /// A rolling update in progress, to a new revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<Update>,
    /// Autoscaling bounds: the leader sets `replicas` within them ([`super::autoscale`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<Autoscale>,
    /// Its nodes load it at once and evict it last; otherwise a node loads it on its first
    /// request and evicts it first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hot: bool,
}

/// One revision of a deployment: a version, and how it came to be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    pub revision: u32,
    pub version: String,
    pub created_by: String,
    pub created_at_ms: u64,
    /// `create`, `update` or `rollback`.
    pub cause: String,
    /// `rolling` while its update runs, `serving`, `superseded` once another took over,
    /// `aborted` if its update was rolled back before it finished.
    pub status: RevisionStatus,
    /// Why it ended (an abort's reason).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// A canary's decisions, oldest first, with the figures behind each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<Decision>,
}

/// Where a revision stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RevisionStatus {
    Rolling,
    Serving,
    Superseded,
    Aborted,
}

/// A rolling update in progress: replicas of `revision` (running `version`) are added, at
/// most `max_surge` beyond the deployment's replica count, and each one that becomes ready
/// takes the place of one replica of the serving revision. When all are ready the update
/// completes: `revision` serves, and the old replicas are gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub revision: u32,
    pub version: String,
    /// Per replica, from the new version's manifest.
    pub memory_mb: u64,
    pub max_surge: u32,
    pub started_at_ms: u64,
    /// Nodes that failed to load the new version (the update is then rolled back).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failed_on: BTreeMap<String, String>,
    /// A canary: the update holds at a share of the traffic until judged ([`super::canary`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
}

impl Update {
    /// How many replicas each revision wants, given how many of the new one are ready:
    /// (serving revision, new revision). A canary keeps every serving replica and runs its
    /// step's share of new ones.
    pub fn wanted(&self, replicas: u32, new_ready: u32) -> (u32, u32) {
        if let Some(c) = &self.canary {
            return (replicas, c.replicas(replicas));
        }
        let new_ready = new_ready.min(replicas);
        (
            replicas - new_ready,
            replicas.min(new_ready.saturating_add(self.max_surge.max(1))),
        )
    }
}

/// Kubernetes' default surge: a quarter of the replicas, rounded up, at least one.
pub fn default_surge(replicas: u32) -> u32 {
    replicas.div_ceil(4).max(1)
}

impl Deployment {
    /// The version revision `revision` runs (`None`: neither serving nor rolling out).
    pub fn version_of(&self, revision: u32) -> Option<&str> {
        if revision == self.revision {
            return Some(&self.version);
        }
        self.update
            .as_ref()
            .filter(|u| u.revision == revision)
            .map(|u| u.version.as_str())
    }

    fn revision_mut(&mut self, revision: u32) -> Option<&mut Revision> {
        self.history.iter_mut().find(|r| r.revision == revision)
    }

    /// The update's new revision serves; the old one is superseded.
    pub(crate) fn complete_update(&mut self, now: u64) {
        let Some(u) = self.update.take() else { return };
        let old = self.revision;
        if let Some(r) = self.revision_mut(old) {
            r.status = RevisionStatus::Superseded;
        }
        if let Some(r) = self.revision_mut(u.revision) {
            r.status = RevisionStatus::Serving;
        }
        self.revision = u.revision;
        self.version = u.version;
        self.memory_mb = u.memory_mb;
        self.updated_at_ms = now;
    }

    /// The update ends unfinished: its new revision's replicas go, the serving one stays.
    pub(crate) fn abort_update(&mut self, now: u64, reason: String) {
        let Some(u) = self.update.take() else { return };
        if let Some(r) = self.revision_mut(u.revision) {
            r.status = RevisionStatus::Aborted;
            r.reason = reason;
        }
        self.updated_at_ms = now;
    }

    fn next_revision(&self) -> u32 {
        let newest = self.history.iter().map(|r| r.revision).max();
        newest
            .unwrap_or(self.revision)
            .max(self.revision)
            .max(self.update.as_ref().map_or(0, |u| u.revision))
            + 1
    }
}

/// The scheduler sees each revision a deployment runs as a deployment of its own, keyed
/// `2 × id` (the serving revision) and `2 × id + 1` (a rolling update's new revision), so the
/// two may share a node and each keeps its own replica numbers.
pub(crate) fn track_key(deployment: u64, new: bool) -> u64 {
    deployment * 2 + u64::from(new)
}

/// The deployment and whether it is the new revision, from a scheduler key.
pub(crate) fn track_of(key: u64) -> (u64, bool) {
    (key / 2, key % 2 == 1)
}

/// The scheduler's views of a deployment: its serving revision, and a rolling update's new
/// one; `new_ready` counts the new revision's ready replicas.
pub(crate) fn track_views(
    d: &Deployment,
    excluded: Vec<String>,
    new_excluded: Vec<String>,
    new_ready: u32,
) -> Vec<DeploymentView> {
    let mut views = Vec::with_capacity(2);
    let (serving, new) = match &d.update {
        Some(u) => u.wanted(d.replicas, new_ready),
        None => (d.replicas, 0),
    };
    views.push(DeploymentView {
        id: track_key(d.id, false),
        replicas: serving,
        memory_mb: d.memory_mb,
        hardware: d.hardware.clone(),
        excluded,
    });
    if let Some(u) = &d.update {
        views.push(DeploymentView {
            id: track_key(d.id, true),
            replicas: new,
            memory_mb: u.memory_mb,
            hardware: d.hardware.clone(),
            excluded: new_excluded,
        });
    }
    views
}

fn check_replicas(replicas: u32) -> Result<()> {
    if replicas > MAX_REPLICAS {
        return Err(invalid(
            "replicas",
            replicas.to_string(),
            format!("ask for at most {MAX_REPLICAS}"),
        ));
    }
    Ok(())
}

impl State {
    pub(crate) fn create_deployment(
        &mut self,
        ctx: Ctx<'_>,
        (model, version, environment): (&str, &str, &str),
        replicas: u32,
        hardware: Option<&[Device]>,
        hot: bool,
        autoscale: Option<&Autoscale>,
    ) -> Result<Change> {
        validate::id("environment", environment)?;
        check_replicas(replicas)?;
        if let Some(a) = autoscale {
            a.check()?;
        }
        let v = self.deployable(model, version, environment)?;
        let named = || (model.to_string(), version.to_string());
        let hardware = hardware.unwrap_or(&v.manifest.preferred).to_vec();
        validate_hardware(&hardware)?;
        let memory_mb = v.memory_mb();
        // Autoscaled from the start: the replicas asked for, within the bounds.
        let replicas = match autoscale {
            Some(a) if replicas > 0 || a.min_replicas > 0 => {
                replicas.clamp(a.min_replicas.max(1), a.max_replicas)
            }
            _ => replicas,
        };
        if let Some(d) = self
            .deployments
            .values()
            .find(|d| d.model == model && d.version == version && d.environment == environment)
        {
            let (model, version) = named();
            return Err(Error::DeploymentExists {
                id: d.id,
                model,
                version,
                environment: environment.to_string(),
            });
        }
        let id = self.next_deployment;
        self.next_deployment += 1;
        let mut detail = format!(
            "{model}@{version} to {environment}: {replicas} replicas on {hardware:?}, {memory_mb} MiB each"
        );
        if hot {
            detail.push_str(", hot");
        }
        if let Some(a) = autoscale {
            detail.push_str(&format!(
                ", autoscaled {}..{}",
                a.min_replicas, a.max_replicas
            ));
        }
        self.deployments.insert(
            id,
            Deployment {
                id,
                model: model.to_string(),
                version: version.to_string(),
                environment: environment.to_string(),
                replicas,
                hardware,
                memory_mb,
                created_by: ctx.actor.name.clone(),
                created_at_ms: ctx.now,
                updated_at_ms: ctx.now,
                rollout: RolloutStatus::new(replicas, 0, 0, 0),
                failed_on: BTreeMap::new(),
                revision: first_revision(),
                history: vec![Revision {
                    revision: first_revision(),
                    version: version.to_string(),
                    created_by: ctx.actor.name.clone(),
                    created_at_ms: ctx.now,
                    cause: "create".into(),
                    status: RevisionStatus::Serving,
                    reason: String::new(),
                    decisions: Vec::new(),
                }],
                update: None,
                autoscale: autoscale.cloned(),
                hot,
            },
        );
        let mut change = Change::new(format!("deployment {id}"), detail).replan();
        change.created = Some(Created::Deployment(id));
        Ok(change)
    }

    /// A version that may run in `environment`: on the shelf, not deprecated, and approved
    /// there when the environment's policy needs approvals.
    fn deployable(
        &self,
        model: &str,
        version: &str,
        environment: &str,
    ) -> Result<&super::shelf::ModelVersion> {
        let needs_approval = self.policy(environment)?.required_approvals > 0;
        let v = self.offerable_version(model, version)?;
        if needs_approval && !matches!(v.stage(environment), Some(Stage::Approved { .. })) {
            return Err(Error::NotApproved {
                model: model.to_string(),
                version: version.to_string(),
                environment: environment.to_string(),
            });
        }
        Ok(v)
    }

    /// A rolling update of deployment `id` to `version` (see [`Update`]).
    pub(crate) fn update_deployment(
        &mut self,
        ctx: Ctx<'_>,
        id: u64,
        version: &str,
        max_surge: Option<u32>,
    ) -> Result<Change> {
        self.start_update(ctx, id, version, max_surge, "update".into(), None)
    }

    /// A canary of deployment `id` at `version` (see [`super::canary`]).
    pub(crate) fn canary_deployment(
        &mut self,
        ctx: Ctx<'_>,
        id: u64,
        version: &str,
        spec: &CanarySpec,
    ) -> Result<Change> {
        spec.check()?;
        let canary = Canary::new(spec.clone(), ctx.now);
        let mut change =
            self.start_update(ctx, id, version, None, "canary".into(), Some(canary))?;
        change.detail.push_str(&format!(
            "; canary steps {:?}% every {} s, SLO {}{}",
            spec.steps,
            spec.interval_ms / 1000,
            spec.slo,
            if spec.mirror { ", mirrored" } else { "" }
        ));
        Ok(change)
    }

    /// An operator promotes deployment `id`'s canary without waiting for its steps.
    pub(crate) fn promote_canary(&mut self, ctx: Ctx<'_>, id: u64) -> Result<Change> {
        let d = self.deployment(id)?;
        let Some((revision, step)) = d
            .update
            .as_ref()
            .and_then(|u| u.canary.as_ref().map(|c| (u.revision, c.step)))
        else {
            return Err(invalid(
                "deployment",
                id.to_string(),
                format!("deployment {id} runs no canary"),
            ));
        };
        let reason = format!("promoted by {}", ctx.actor.name);
        let none = Figures::default();
        self.judge_canary(
            ctx,
            id,
            revision,
            step,
            Verdict::Promote,
            (&none, &none),
            &reason,
        )
    }

    /// A decision on deployment `id`'s canary, for its revision `revision` at step `step` (a
    /// decision about a step the canary already left is refused).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn judge_canary(
        &mut self,
        ctx: Ctx<'_>,
        id: u64,
        revision: u32,
        step: u32,
        verdict: Verdict,
        figures: (&Figures, &Figures),
        reason: &str,
    ) -> Result<Change> {
        let d = self.deployment(id)?;
        let current = d
            .update
            .as_ref()
            .and_then(|u| u.canary.as_ref().map(|c| (u.revision, c.step)));
        if current != Some((revision, step)) {
            return Err(invalid(
                "step",
                format!("revision {revision} step {}", step + 1),
                match current {
                    Some((r, s)) => {
                        format!("deployment {id}'s canary is revision {r} at step {}", s + 1)
                    }
                    None => format!("deployment {id} runs no canary"),
                },
            ));
        }
        let d = self.deployments.get_mut(&id).expect("looked up above");
        let u = d.update.as_mut().expect("checked above");
        let c = u.canary.as_mut().expect("checked above");
        let decision = Decision {
            at_ms: ctx.now,
            step,
            weight: c.weight(),
            verdict,
            by: ctx.actor.name.clone(),
            canary: figures.0.clone(),
            stable: figures.1.clone(),
            reason: reason.to_string(),
        };
        let (new_revision, new_version) = (u.revision, u.version.clone());
        let mut detail = format!(
            "canary revision {new_revision} ({new_version}) step {} ({}%): {}: {reason}; canary: {}; serving: {}",
            step + 1,
            c.weight(),
            verdict.as_str(),
            figures.0,
            figures.1
        );
        match verdict {
            Verdict::Advance => {
                c.step += 1;
                c.step_started_at_ms = ctx.now;
                detail.push_str(&format!("; now {}%", c.weight()));
            }
            Verdict::Hold => c.step_started_at_ms = ctx.now,
            Verdict::Promote => {
                // A plain rolling update from here: it completes once every new replica is
                // ready.
                u.canary = None;
                detail.push_str("; promoted: the new revision takes all the traffic");
            }
            Verdict::Rollback => {}
        }
        d.updated_at_ms = ctx.now;
        if let Some(r) = d.revision_mut(new_revision) {
            // Holds repeat while traffic is thin: keep the latest of a run of them.
            if verdict == Verdict::Hold
                && r.decisions
                    .last()
                    .is_some_and(|l| l.verdict == Verdict::Hold && l.step == step)
            {
                r.decisions.pop();
            }
            r.decisions.push(decision);
        }
        if verdict == Verdict::Rollback {
            d.abort_update(ctx.now, format!("canary rolled back: {reason}"));
            detail.push_str(&format!(
                "; rolled back to revision {} ({})",
                d.revision, d.version
            ));
        }
        Ok(Change::new(format!("deployment {id}"), detail).replan())
    }

    /// Roll deployment `id` back: a running update is abandoned (its new replicas go, the
    /// serving revision never stopped); otherwise a rolling update to the version of revision
    /// `to`, by default the one that served before the current one.
    pub(crate) fn rollback_deployment(
        &mut self,
        ctx: Ctx<'_>,
        id: u64,
        to: Option<u32>,
    ) -> Result<Change> {
        let d = self.deployment(id)?;
        if let Some(u) = &d.update {
            if to.is_some_and(|to| to != d.revision) {
                return Err(Error::UpdateInProgress {
                    id,
                    revision: u.revision,
                });
            }
            let detail = format!(
                "update to revision {} ({}) abandoned by {}; revision {} ({}) serves",
                u.revision, u.version, ctx.actor.name, d.revision, d.version
            );
            let reason = format!("rolled back by {}", ctx.actor.name);
            let d = self.deployments.get_mut(&id).expect("looked up above");
            d.abort_update(ctx.now, reason);
            return Ok(Change::new(format!("deployment {id}"), detail).replan());
        }
        let target = match to {
            Some(to) => d.history.iter().find(|r| r.revision == to).ok_or_else(|| {
                invalid(
                    "to",
                    to.to_string(),
                    format!("deployment {id} has no revision {to}; see its history"),
                )
            })?,
            None => d
                .history
                .iter()
                .rev()
                .find(|r| r.revision < d.revision && r.status == RevisionStatus::Superseded)
                .ok_or_else(|| {
                    invalid(
                        "to",
                        "",
                        format!("deployment {id} has no earlier revision to roll back to"),
                    )
                })?,
        };
        let (revision, version) = (target.revision, target.version.clone());
        self.start_update(
            ctx,
            id,
            &version,
            None,
            format!("rollback to revision {revision}"),
            None,
        )
    }

    fn start_update(
        &mut self,
        ctx: Ctx<'_>,
        id: u64,
        version: &str,
        max_surge: Option<u32>,
        cause: String,
        canary: Option<Canary>,
    ) -> Result<Change> {
        let d = self.deployment(id)?;
        if let Some(u) = &d.update {
            return Err(Error::UpdateInProgress {
                id,
                revision: u.revision,
            });
        }
        if d.version == version {
            return Err(invalid(
                "version",
                version,
                format!("deployment {id} already runs {version}"),
            ));
        }
        if let Some(surge) = max_surge
            && !(1..=MAX_REPLICAS).contains(&surge)
        {
            return Err(invalid(
                "max_surge",
                surge.to_string(),
                format!("between 1 and {MAX_REPLICAS}"),
            ));
        }
        let v = self.deployable(&d.model, version, &d.environment)?;
        let memory_mb = v.memory_mb();
        if let Some(other) = self.deployments.values().find(|o| {
            o.id != id
                && o.model == d.model
                && o.version == version
                && o.environment == d.environment
        }) {
            return Err(Error::DeploymentExists {
                id: other.id,
                model: d.model.clone(),
                version: version.to_string(),
                environment: d.environment.clone(),
            });
        }
        let revision = d.next_revision();
        let max_surge = max_surge.unwrap_or_else(|| default_surge(d.replicas));
        let detail = format!(
            "{cause}: revision {revision} runs {}@{version} (was revision {}, {}); {} replicas, surge {max_surge}",
            d.model, d.revision, d.version, d.replicas
        );
        let d = self.deployments.get_mut(&id).expect("looked up above");
        d.history.push(Revision {
            revision,
            version: version.to_string(),
            created_by: ctx.actor.name.clone(),
            created_at_ms: ctx.now,
            cause,
            status: RevisionStatus::Rolling,
            reason: String::new(),
            decisions: Vec::new(),
        });
        d.update = Some(Update {
            revision,
            version: version.to_string(),
            memory_mb,
            max_surge,
            started_at_ms: ctx.now,
            failed_on: BTreeMap::new(),
            canary,
        });
        d.updated_at_ms = ctx.now;
        Ok(Change::new(format!("deployment {id}"), detail).replan())
    }

    pub(crate) fn scale_deployment(
        &mut self,
        ctx: Ctx<'_>,
        id: u64,
        replicas: u32,
    ) -> Result<Change> {
        check_replicas(replicas)?;
        let d = self
            .deployments
            .get_mut(&id)
            .ok_or(Error::UnknownDeployment { id })?;
        if let Some(a) = &d.autoscale {
            return Err(invalid(
                "replicas",
                replicas.to_string(),
                format!(
                    "deployment {id} is autoscaled between {} and {} replicas: change its bounds with `sophon deploy autoscale`, or turn it off",
                    a.min_replicas, a.max_replicas
                ),
            ));
        }
        if d.replicas == replicas {
            return Err(invalid(
                "replicas",
                replicas.to_string(),
                format!("deployment {id} already has {replicas} replicas"),
            ));
        }
        let old = std::mem::replace(&mut d.replicas, replicas);
        d.updated_at_ms = ctx.now;
        // A scale is a fresh start: nodes that failed it may try again.
        d.failed_on.clear();
        Ok(Change::new(
            format!("deployment {id}"),
            format!("scaled from {old} to {replicas} replicas"),
        )
        .replan())
    }

    /// Set or clear deployment `id`'s autoscaling; its replicas are brought within the bounds.
    pub(crate) fn set_autoscale(
        &mut self,
        ctx: Ctx<'_>,
        id: u64,
        autoscale: Option<&Autoscale>,
    ) -> Result<Change> {
        if let Some(a) = autoscale {
            a.check()?;
        }
        let d = self
            .deployments
            .get_mut(&id)
            .ok_or(Error::UnknownDeployment { id })?;
        let old = d.replicas;
        let detail = match autoscale {
            Some(a) => {
                // At zero it stays at zero (a request activates it); else within the bounds.
                if d.replicas > 0 || a.min_replicas > 0 {
                    d.replicas = d.replicas.clamp(a.min_replicas.max(1), a.max_replicas);
                }
                format!(
                    "autoscaled between {} and {} replicas, target {} in flight per replica, windows {} s / {} s{}; {old} → {} replicas",
                    a.min_replicas,
                    a.max_replicas,
                    f64::from(a.target_concurrency_milli) / 1000.0,
                    a.stable_window_ms / 1000,
                    a.panic_window_ms / 1000,
                    a.zero_after_ms()
                        .map(|ms| format!(", to zero after {} s idle", ms / 1000))
                        .unwrap_or_default(),
                    d.replicas
                )
            }
            None => format!("autoscaling off; {} replicas", d.replicas),
        };
        d.autoscale = autoscale.cloned();
        d.updated_at_ms = ctx.now;
        Ok(Change::new(format!("deployment {id}"), detail).replan())
    }

    /// Mark deployment `id` hot or cold (what its nodes load at once, and evict last).
    pub(crate) fn set_hot(&mut self, ctx: Ctx<'_>, id: u64, hot: bool) -> Result<Change> {
        let d = self
            .deployments
            .get_mut(&id)
            .ok_or(Error::UnknownDeployment { id })?;
        if d.hot == hot {
            return Err(invalid(
                "hot",
                hot.to_string(),
                format!(
                    "deployment {id} is {} already",
                    if hot { "hot" } else { "cold" }
                ),
            ));
        }
        d.hot = hot;
        d.updated_at_ms = ctx.now;
        Ok(Change::new(
            format!("deployment {id}"),
            if hot {
                "hot: its nodes load it at once and evict it last"
            } else {
                "cold: its nodes load it on its first request and evict it first"
            },
        ))
    }

    /// The autoscaler (or an activation) resizes deployment `id` within its bounds.
    pub(crate) fn autoscale_deployment(
        &mut self,
        ctx: Ctx<'_>,
        id: u64,
        replicas: u32,
        reason: &str,
    ) -> Result<Change> {
        let d = self
            .deployments
            .get_mut(&id)
            .ok_or(Error::UnknownDeployment { id })?;
        let Some(a) = &d.autoscale else {
            return Err(invalid(
                "deployment",
                id.to_string(),
                format!("deployment {id} is not autoscaled"),
            ));
        };
        if replicas > a.max_replicas || replicas < a.min_replicas || replicas == d.replicas {
            return Err(invalid(
                "replicas",
                replicas.to_string(),
                format!(
                    "deployment {id} has {} replicas, within {}..={}",
                    d.replicas, a.min_replicas, a.max_replicas
                ),
            ));
        }
        let old = std::mem::replace(&mut d.replicas, replicas);
        d.updated_at_ms = ctx.now;
        Ok(Change::new(
            format!("deployment {id}"),
            format!("autoscaled from {old} to {replicas} replicas: {reason}"),
        )
        .replan())
    }

    pub(crate) fn delete_deployment(&mut self, id: u64) -> Result<Change> {
        let d = self
            .deployments
            .remove(&id)
            .ok_or(Error::UnknownDeployment { id })?;
        Ok(Change::new(
            format!("deployment {id}"),
            format!("deleted {}@{} from {}", d.model, d.version, d.environment),
        )
        .replan())
    }
}
