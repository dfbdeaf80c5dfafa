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

use super::shelf::{Stage, validate_hardware};
use super::validate;
use super::{Change, Ctx, State};
use crate::command::Created;
use crate::error::{Error, Result, invalid};
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
}

impl Deployment {
    /// The scheduler's view; `excluded` lists the nodes that may not run it, sorted.
    pub(crate) fn view(&self, excluded: Vec<String>) -> DeploymentView {
        DeploymentView {
            id: self.id,
            replicas: self.replicas,
            memory_mb: self.memory_mb,
            hardware: self.hardware.clone(),
            excluded,
        }
    }
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
        model: &str,
        version: &str,
        environment: &str,
        replicas: u32,
        hardware: Option<&[Device]>,
    ) -> Result<Change> {
        validate::id("environment", environment)?;
        check_replicas(replicas)?;
        let needs_approval = self.policy(environment)?.required_approvals > 0;
        let v = self.offerable_version(model, version)?;
        let named = || (model.to_string(), version.to_string());
        if needs_approval && !matches!(v.stage(environment), Some(Stage::Approved { .. })) {
            let (model, version) = named();
            return Err(Error::NotApproved {
                model,
                version,
                environment: environment.to_string(),
            });
        }
        let hardware = hardware.unwrap_or(&v.manifest.preferred).to_vec();
        validate_hardware(&hardware)?;
        let memory_mb = v.manifest.memory_mb;
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
        let detail = format!(
            "{model}@{version} to {environment}: {replicas} replicas on {hardware:?}, {memory_mb} MiB each"
        );
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
            },
        );
        let mut change = Change::new(format!("deployment {id}"), detail).replan();
        change.created = Some(Created::Deployment(id));
        Ok(change)
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
