//! The replicated state machine: everything the coordinators agree on, changed only by
//! [`State::apply`] with one committed [`Entry`] at a time.
//!
//! # How an entry is applied
//! 0. **Once.** An entry whose write id was already applied changes nothing and answers the
//!    outcome it had then ([`writes`]: a write committed twice, by a retry, applies once).
//! 1. **Who.** A token-bearing actor's token must exist, be unrevoked and name the same actor and
//!    role; the role must be at least the command's [`required_role`](Command::required_role).
//! 2. **Validate, then change.** Each handler checks everything (ids exist, input is well formed,
//!    the approval rules hold) before it touches the state, so an error leaves the state exactly
//!    as it was, byte for byte.
//! 3. **Place.** A change that can move replicas (nodes joining, going down, draining, leaving,
//!    coming back; deployments created, scaled, deleted) runs the [`crate::scheduler`]
//!    over the whole state and stores its plan, so placements are replicated state too. A change
//!    that only adds capacity (a node joins, resumes or comes back) keeps every placement valid,
//!    so it runs the scheduler only when some replicas are waiting for a node.
//! 4. **Record.** Every successful command appends an [`AuditRecord`]: who, when, what. The one
//!    exception is a heartbeat that changes nothing but the node's liveness and load; recording
//!    those would fill the log with thousands of lines a minute. A heartbeat that brings a node
//!    back or changes which replicas are ready is recorded.
//!
//! Time is the entry's `now_ms`, never allowed to go backwards ([`State::clock_ms`]). Every map is
//! a `BTreeMap`, so iteration order, the scheduler's input and the serialized snapshot are the
//! same on every replica.

pub mod approvals;
pub mod audit;
pub mod autoscale;
pub mod canary;
pub mod deployments;
mod invariants;
pub mod members;
pub mod shelf;
pub mod tokens;
pub(crate) mod validate;
pub mod writes;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::{Actor, Command, Created, Entry, Outcome, Role};
use crate::error::{Error, Result};
use crate::scheduler::{self, DeploymentView, NodeView, Placement, Unplaced};
use approvals::{ApprovalRequest, Policy};
use audit::AuditRecord;
use deployments::Deployment;
use members::{Coordinator, Node, Revoked};
use shelf::{Model, TrustedKey};
use tokens::Token;
use writes::AppliedWrites;

/// The default for [`State::heartbeat_grace_ms`].
pub const DEFAULT_HEARTBEAT_GRACE_MS: u64 = 15_000;

/// Everything the coordinators replicate. Serialize it to take a snapshot ([`State::snapshot`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    clock_ms: u64,
    heartbeat_grace_ms: u64,
    nodes: BTreeMap<String, Node>,
    coordinators: BTreeMap<u64, Coordinator>,
    models: BTreeMap<String, Model>,
    policies: BTreeMap<String, Policy>,
    requests: BTreeMap<u64, ApprovalRequest>,
    next_request: u64,
    deployments: BTreeMap<u64, Deployment>,
    next_deployment: u64,
    /// Sorted by (deployment, revision, replica).
    placements: Vec<Placement>,
    unplaced: Vec<Unplaced>,
    tokens: BTreeMap<String, Token>,
    audit: Vec<AuditRecord>,
    /// Publisher keys whose bundles may go on the shelf, by key.
    #[serde(default)]
    trusted_keys: BTreeMap<String, TrustedKey>,
    /// The client writes applied lately, so that one committed twice applies once.
    #[serde(default)]
    writes: AppliedWrites,
    /// Certificates the mesh refuses, by principal (`coordinator/3`): removed coordinators.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    revoked: BTreeMap<String, Revoked>,
    /// How much host memory the scheduler may promise a node, in percent of what it has
    /// (nodes evict the least recently used models past their model memory).
    #[serde(default = "default_overcommit")]
    memory_overcommit_pct: u32,
}

fn default_overcommit() -> u32 {
    100
}

impl Default for State {
    fn default() -> Self {
        State {
            clock_ms: 0,
            heartbeat_grace_ms: DEFAULT_HEARTBEAT_GRACE_MS,
            nodes: BTreeMap::new(),
            coordinators: BTreeMap::new(),
            models: BTreeMap::new(),
            policies: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_request: 1,
            deployments: BTreeMap::new(),
            next_deployment: 1,
            placements: Vec::new(),
            unplaced: Vec::new(),
            tokens: BTreeMap::new(),
            audit: Vec::new(),
            trusted_keys: BTreeMap::new(),
            writes: AppliedWrites::default(),
            revoked: BTreeMap::new(),
            memory_overcommit_pct: default_overcommit(),
        }
    }
}

/// Who and when, for the handlers.
#[derive(Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub actor: &'a Actor,
    pub now: u64,
}

/// What a handler did, for the audit record and the follow-up steps.
pub(crate) struct Change {
    /// What was changed, like `node n1` or `model fraud@1.2`.
    pub target: String,
    pub detail: String,
    /// Whether to run the scheduler afterwards.
    pub replan: Replan,
    /// Recompute the deployments' rollout status (readiness changed).
    pub rollout: bool,
    /// Leave it out of the audit log (a heartbeat that changed only liveness and load).
    pub quiet: bool,
    pub created: Option<Created>,
}

impl Change {
    pub fn new(target: impl Into<String>, detail: impl Into<String>) -> Change {
        Change {
            target: target.into(),
            detail: detail.into(),
            replan: Replan::No,
            rollout: false,
            quiet: false,
            created: None,
        }
    }

    /// Run the scheduler afterwards.
    pub fn replan(mut self) -> Change {
        self.replan = Replan::Always;
        self
    }
}

/// Whether a change needs the scheduler.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replan {
    No,
    /// The change only added capacity (a node joined, resumed or came back): current placements
    /// all stay valid, so the plan can change only if some replicas are waiting for a node.
    IfUnplaced,
    Always,
}

impl State {
    /// An empty state (no nodes, no policies, no tokens).
    pub fn new() -> State {
        State::default()
    }

    /// Applies one committed entry; see the module page. On error nothing has changed.
    ///
    /// An entry whose [`write_id`](Entry::write_id) was already applied changes nothing and
    /// answers the outcome of its first apply ([`writes`]).
    pub fn apply(&mut self, entry: &Entry) -> Result<Outcome> {
        if let Some(id) = &entry.write_id
            && let Some(outcome) = self.writes.get(id)
        {
            return Ok(outcome.clone());
        }
        let outcome = self.apply_command(entry)?;
        if let Some(id) = entry.write_id {
            self.writes.record(id, outcome.clone());
        }
        Ok(outcome)
    }

    fn apply_command(&mut self, entry: &Entry) -> Result<Outcome> {
        self.authorize(entry)?;
        let ctx = Ctx {
            actor: &entry.actor,
            now: self.clock_ms.max(entry.now_ms),
        };
        let change = self.dispatch(ctx, &entry.command)?;
        // Nothing below can fail: the command is accepted.
        self.clock_ms = ctx.now;
        let mut detail = change.detail;
        // A limited token (a join token) gives one use to each command it issues.
        if let Some((id, left)) = self.use_token(&entry.actor) {
            detail.push_str(&format!("; token {id} used, {left} use(s) left"));
        }
        let mut placements_changed = false;
        let mut replan = match change.replan {
            Replan::No => false,
            Replan::IfUnplaced => !self.unplaced.is_empty(),
            Replan::Always => true,
        };
        // Readiness moves rolling updates on, and each step changes what they want placed.
        if (replan || change.rollout) && self.advance_updates(ctx.now, &mut detail) {
            replan = true;
        }
        if replan {
            placements_changed = self.replan(&mut detail);
        }
        if replan || change.rollout {
            self.refresh_rollouts();
        }
        let audit_seq = (!change.quiet)
            .then(|| self.record(ctx, entry.command.action(), change.target, detail));
        Ok(Outcome {
            audit_seq,
            created: change.created,
            placements_changed,
        })
    }

    fn authorize(&self, entry: &Entry) -> Result<()> {
        let actor = &entry.actor;
        if let Some(id) = &actor.token_id {
            let token = self
                .tokens
                .get(id)
                .ok_or_else(|| Error::UnknownToken { id: id.clone() })?;
            // Revoked, expired at this entry's time, or used up.
            if let Some(e) = token.unusable(self.clock_ms.max(entry.now_ms)) {
                return Err(e);
            }
            if token.name != actor.name || token.role != actor.role {
                return Err(Error::ActorMismatch {
                    id: id.clone(),
                    name: actor.name.clone(),
                    role: actor.role,
                });
            }
        }
        let needed = entry.command.required_role();
        // A join token admits a coordinator and does nothing else; a node join token, a node.
        let joining = (actor.role == Role::Join
            && matches!(entry.command, Command::AddCoordinator { .. }))
            || (actor.role == Role::NodeJoin && matches!(entry.command, Command::JoinNode { .. }));
        if !joining && !actor.role.allows(needed) {
            return Err(Error::Forbidden {
                action: entry.command.action(),
                role: actor.role,
                needed,
            });
        }
        Ok(())
    }

    fn dispatch(&mut self, ctx: Ctx<'_>, command: &Command) -> Result<Change> {
        use Command::*;
        match command {
            JoinNode { node } => self.join_node(ctx, node),
            Heartbeat { node, load, ready } => self.heartbeat(ctx, node, load, ready),
            ReportReplicas { node, replicas } => self.report_replicas(ctx, node, replicas),
            DrainNode { node } => self.drain_node(node),
            ResumeNode { node } => self.resume_node(node),
            LeaveNode { node } => self.leave_node(node),
            MarkNodeDown { node } => self.mark_node_down(ctx, node),
            SetHeartbeatGrace { grace_ms } => self.set_heartbeat_grace(*grace_ms),
            SetMemoryOvercommit { percent } => self.set_memory_overcommit(*percent),
            AddCoordinator {
                id,
                address,
                api_address,
                cert_serial,
            } => self.add_coordinator(ctx, *id, address, api_address, cert_serial.as_deref()),
            RemoveCoordinator { id } => self.remove_coordinator(ctx, *id),
            RegisterModelVersion {
                model,
                version,
                digest,
                manifest,
                publisher_key,
            } => self.register_version(ctx, model, version, digest, manifest, publisher_key),
            PutOnShelf { model, version } => self.set_on_shelf(model, version, true),
            TakeOffShelf { model, version } => self.set_on_shelf(model, version, false),
            Deprecate { model, version } => self.deprecate(model, version),
            Tag {
                model,
                version,
                tag,
            } => self.tag(model, version, tag),
            Untag { model, tag } => self.untag(model, tag),
            TrustKey { key, name } => self.trust_key(ctx, key, name),
            DistrustKey { key } => self.distrust_key(key),
            SetPolicy {
                environment,
                required_approvals,
                approver_role,
            } => self.set_policy(ctx, environment, *required_approvals, *approver_role),
            RequestApproval {
                model,
                version,
                environment,
            } => self.request_approval(ctx, model, version, environment),
            Decide {
                request,
                approve,
                comment,
            } => self.decide(ctx, *request, *approve, comment),
            Withdraw { request } => self.withdraw(ctx, *request),
            CreateDeployment {
                model,
                version,
                environment,
                replicas,
                hardware,
                hot,
                autoscale,
            } => self.create_deployment(
                ctx,
                (model, version, environment),
                *replicas,
                hardware.as_deref(),
                *hot,
                autoscale.as_ref(),
            ),
            SetDeploymentHot { deployment, hot } => self.set_hot(ctx, *deployment, *hot),
            RecordModelMemory {
                model,
                version,
                node,
                memory_mb,
            } => self.record_model_memory(ctx, model, version, node, *memory_mb),
            RecordRefusal {
                action,
                target,
                reason,
            } => Ok(Change::new(
                target.clone(),
                format!("{action} refused: {reason}"),
            )),
            ScaleDeployment {
                deployment,
                replicas,
            } => self.scale_deployment(ctx, *deployment, *replicas),
            DeleteDeployment { deployment } => self.delete_deployment(*deployment),
            UpdateDeployment {
                deployment,
                version,
                max_surge,
            } => self.update_deployment(ctx, *deployment, version, *max_surge),
            RollbackDeployment { deployment, to } => {
                self.rollback_deployment(ctx, *deployment, *to)
            }
            CanaryDeployment {
                deployment,
                version,
                spec,
            } => self.canary_deployment(ctx, *deployment, version, spec),
            JudgeCanary {
                deployment,
                revision,
                step,
                verdict,
                canary,
                stable,
                reason,
            } => self.judge_canary(
                ctx,
                *deployment,
                *revision,
                *step,
                *verdict,
                (canary, stable),
                reason,
            ),
            PromoteCanary { deployment } => self.promote_canary(ctx, *deployment),
            SetAutoscale {
                deployment,
                autoscale,
            } => self.set_autoscale(ctx, *deployment, autoscale.as_ref()),
            Autoscale {
                deployment,
                replicas,
                reason,
            } => self.autoscale_deployment(ctx, *deployment, *replicas, reason),
            CreateToken {
                id,
                name,
                role,
                secret_hash,
            } => self.create_token(ctx, id, name, *role, secret_hash, None, None),
            CreateLimitedToken {
                id,
                name,
                role,
                secret_hash,
                expires_in_ms,
                uses,
            } => self.create_token(ctx, id, name, *role, secret_hash, *expires_in_ms, *uses),
            RevokeToken { id } => self.revoke_token(ctx, id),
        }
    }

    /// The scheduler's view of the nodes, in id order; host memory scaled by the overcommit.
    pub fn node_views(&self) -> Vec<NodeView> {
        let pct = u64::from(self.memory_overcommit_pct);
        self.nodes
            .values()
            .map(|n| {
                let mut v = n.view();
                v.capacity.cpu_mb = v.capacity.cpu_mb.saturating_mul(pct) / 100;
                v
            })
            .collect()
    }

    /// Host memory the scheduler may promise nodes, in percent of what they have.
    pub fn memory_overcommit_pct(&self) -> u32 {
        self.memory_overcommit_pct
    }

    fn set_memory_overcommit(&mut self, percent: u32) -> Result<Change> {
        if !(100..=10_000).contains(&percent) {
            return Err(crate::error::invalid(
                "percent",
                percent.to_string(),
                "from 100 (no overcommit) to 10000",
            ));
        }
        let old = std::mem::replace(&mut self.memory_overcommit_pct, percent);
        Ok(Change::new(
            "memory overcommit",
            format!("{old}% -> {percent}% of each node's host memory"),
        )
        .replan())
    }

    /// The scheduler's view of the deployments, in id order: one per revision a deployment
    /// runs (see [`deployments::track_key`]). A revision excludes the nodes that serve only
    /// other environments, those whose backends cannot load its version, and those that
    /// failed to load it.
    pub fn deployment_views(&self) -> Vec<DeploymentView> {
        let dedicated: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| !n.environments.is_empty())
            .collect();
        let excluded = |d: &Deployment, version: &str, failed: &BTreeMap<String, String>| {
            // A model checked at pack time goes only to nodes with a backend that loaded it
            // (a node that reports none has tract, as every node does).
            let loads_on = self
                .version(&d.model, version)
                .map(|v| v.manifest.loads_on.as_slice())
                .unwrap_or_default();
            let lacking = self.nodes.values().filter(|n| {
                !loads_on.is_empty()
                    && !loads_on.iter().any(|b| {
                        n.inventory.backends.contains(b)
                            || (n.inventory.backends.is_empty() && b == "tract")
                    })
            });
            let mut out: Vec<String> = dedicated
                .iter()
                .copied()
                .filter(|n| !n.environments.contains(&d.environment))
                .chain(lacking)
                .map(|n| n.id.clone())
                .chain(failed.keys().cloned())
                .collect();
            out.sort();
            out.dedup();
            out
        };
        let new_ready = self.new_revision_ready();
        self.deployments
            .values()
            .flat_map(|d| {
                let new_excluded = d
                    .update
                    .as_ref()
                    .map(|u| excluded(d, &u.version, &u.failed_on))
                    .unwrap_or_default();
                deployments::track_views(
                    d,
                    excluded(d, &d.version, &d.failed_on),
                    new_excluded,
                    new_ready.get(&d.id).copied().unwrap_or(0),
                )
            })
            .collect()
    }

    /// Ready replicas of each rolling update's new revision, by deployment.
    fn new_revision_ready(&self) -> BTreeMap<u64, u32> {
        let mut out = BTreeMap::new();
        for p in &self.placements {
            if p.ready
                && let Some(d) = self.deployments.get(&p.deployment)
                && d.update.as_ref().is_some_and(|u| u.revision == p.revision)
            {
                *out.entry(p.deployment).or_default() += 1;
            }
        }
        out
    }

    /// The placements as the scheduler sees them (keyed by revision track); a placement of a
    /// revision its deployment no longer runs is left out.
    fn tracked_placements(&self) -> Vec<Placement> {
        self.placements
            .iter()
            .filter_map(|p| {
                let d = self.deployments.get(&p.deployment)?;
                let new = if p.revision == d.revision {
                    false
                } else if d.update.as_ref().is_some_and(|u| u.revision == p.revision) {
                    true
                } else {
                    return None;
                };
                Some(Placement {
                    deployment: deployments::track_key(p.deployment, new),
                    ..p.clone()
                })
            })
            .collect()
    }

    /// The unplaced replicas as the scheduler sees them (keyed by revision track).
    fn tracked_unplaced(&self) -> Vec<Unplaced> {
        self.unplaced
            .iter()
            .filter_map(|u| {
                let d = self.deployments.get(&u.deployment)?;
                let new = u.revision != d.revision;
                Some(Unplaced {
                    deployment: deployments::track_key(u.deployment, new),
                    ..u.clone()
                })
            })
            .collect()
    }

    /// The revision a scheduler key stands for, as (deployment, revision).
    fn untrack(&self, key: u64) -> (u64, u32) {
        let (id, new) = deployments::track_of(key);
        let d = self.deployments.get(&id);
        let revision = match (d, new) {
            (Some(d), false) => d.revision,
            (Some(d), true) => d.update.as_ref().map_or(d.revision, |u| u.revision),
            (None, _) => scheduler::first_revision(),
        };
        (id, revision)
    }

    /// Moves rolling updates on: one whose new revision failed on a node is rolled back, one
    /// whose new replicas are all ready completes. Says in `detail` what happened; returns
    /// whether any update is running or ended (the plan depends on them).
    fn advance_updates(&mut self, now: u64, detail: &mut String) -> bool {
        if !self.deployments.values().any(|d| d.update.is_some()) {
            return false;
        }
        let new_ready = self.new_revision_ready();
        let mut any = false;
        for d in self.deployments.values_mut() {
            let Some(u) = &d.update else { continue };
            any = true;
            if let Some((node, reason)) = u.failed_on.iter().next() {
                let reason = format!("failed on node {node}: {reason}");
                detail.push_str(&format!(
                    "; deployment {}: revision {} ({}) {reason}; rolled back to revision {} ({})",
                    d.id, u.revision, u.version, d.revision, d.version
                ));
                d.abort_update(now, reason);
            } else if u.canary.is_none() && new_ready.get(&d.id).copied().unwrap_or(0) >= d.replicas
            {
                detail.push_str(&format!(
                    "; deployment {}: revision {} ({}) rolled out, revision {} ({}) retired",
                    d.id, u.revision, u.version, d.revision, d.version
                ));
                d.complete_update(now);
            }
        }
        any
    }

    /// Runs the scheduler and stores its plan; says in `detail` what moved. Returns whether any
    /// placement changed.
    fn replan(&mut self, detail: &mut String) -> bool {
        let mut plan = scheduler::place(
            &self.node_views(),
            &self.deployment_views(),
            &self.tracked_placements(),
        );
        for p in &mut plan.placements {
            (p.deployment, p.revision) = self.untrack(p.deployment);
        }
        for u in &mut plan.unplaced {
            (u.deployment, u.revision) = self.untrack(u.deployment);
        }
        plan.placements
            .sort_by_key(|p| (p.deployment, p.revision, p.replica));
        // Both lists are sorted by (deployment, revision, replica): walk them together.
        let key = |p: &Placement| (p.deployment, p.revision, p.replica);
        let (mut added, mut moved, mut removed) = (0, 0, 0);
        let (mut old, mut new) = (
            self.placements.iter().peekable(),
            plan.placements.iter().peekable(),
        );
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => (removed, _) = (removed + 1, old.next()),
                (None, Some(_)) => (added, _) = (added + 1, new.next()),
                (Some(o), Some(n)) => match key(o).cmp(&key(n)) {
                    std::cmp::Ordering::Less => (removed, _) = (removed + 1, old.next()),
                    std::cmp::Ordering::Greater => (added, _) = (added + 1, new.next()),
                    std::cmp::Ordering::Equal => {
                        moved += usize::from(o.node != n.node);
                        old.next();
                        new.next();
                    }
                },
            }
        }
        let unplaced: usize = plan.unplaced.iter().map(|u| u.replicas.len()).sum();
        let changed = plan.placements != self.placements || plan.unplaced != self.unplaced;
        if added + moved + removed > 0 || unplaced > 0 {
            detail.push_str(&format!(
                "; placements: {added} added, {moved} moved, {removed} removed, {unplaced} unplaced"
            ));
        }
        if !changed {
            return false;
        }
        self.placements = plan.placements;
        self.unplaced = plan.unplaced;
        let mut assigned: BTreeMap<&str, Vec<crate::command::ReplicaKey>> = BTreeMap::new();
        for p in &self.placements {
            assigned
                .entry(&p.node)
                .or_default()
                .push(crate::command::ReplicaKey {
                    deployment: p.deployment,
                    revision: p.revision,
                    replica: p.replica,
                });
        }
        for (id, node) in &mut self.nodes {
            node.assigned = assigned.remove(id.as_str()).unwrap_or_default();
        }
        changed
    }

    fn refresh_rollouts(&mut self) {
        let mut counts: BTreeMap<u64, (u32, u32, u32)> = BTreeMap::new();
        for p in &self.placements {
            let c = counts.entry(p.deployment).or_default();
            c.0 += 1;
            c.1 += u32::from(p.ready);
        }
        for u in &self.unplaced {
            counts.entry(u.deployment).or_default().2 += u.replicas.len() as u32;
        }
        for (id, d) in &mut self.deployments {
            let (placed, ready, unplaced) = counts.get(id).copied().unwrap_or_default();
            d.rollout = deployments::RolloutStatus::of(d, placed, ready, unplaced);
        }
    }

    /// Serializes the state for a Raft snapshot.
    pub fn snapshot(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::Snapshot {
            reason: e.to_string(),
        })
    }

    /// SHA-256 of the snapshot encoding, hex: replicas that applied the same entries have the
    /// same digest (the state is deterministic and its maps are ordered).
    pub fn digest(&self) -> Result<String> {
        use sha2::Digest;
        Ok(hex::encode(sha2::Sha256::digest(self.snapshot()?)))
    }

    /// Reads a snapshot back, checking its invariants.
    pub fn restore(bytes: &[u8]) -> Result<State> {
        let state: State = serde_json::from_slice(bytes).map_err(|e| Error::Snapshot {
            reason: e.to_string(),
        })?;
        state
            .check_invariants()
            .map_err(|reason| Error::Snapshot { reason })?;
        Ok(state)
    }

    // --- reads ---

    /// The latest time applied (entries' `now_ms`, never going backwards).
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }
    /// How long a node may stay silent before it may be marked down.
    pub fn heartbeat_grace_ms(&self) -> u64 {
        self.heartbeat_grace_ms
    }
    pub fn nodes(&self) -> &BTreeMap<String, Node> {
        &self.nodes
    }
    pub fn coordinators(&self) -> &BTreeMap<u64, Coordinator> {
        &self.coordinators
    }
    /// The revocation list: certificates the mesh refuses, by principal.
    pub fn revoked(&self) -> &BTreeMap<String, Revoked> {
        &self.revoked
    }
    pub fn models(&self) -> &BTreeMap<String, Model> {
        &self.models
    }
    pub fn policies(&self) -> &BTreeMap<String, Policy> {
        &self.policies
    }
    pub fn requests(&self) -> &BTreeMap<u64, ApprovalRequest> {
        &self.requests
    }
    pub fn deployments(&self) -> &BTreeMap<u64, Deployment> {
        &self.deployments
    }
    /// One deployment, or [`Error::UnknownDeployment`].
    pub fn deployment(&self, id: u64) -> Result<&Deployment> {
        self.deployments
            .get(&id)
            .ok_or(Error::UnknownDeployment { id })
    }
    /// Every placed replica, sorted by (deployment, revision, replica).
    pub fn placements(&self) -> &[Placement] {
        &self.placements
    }
    /// Replicas the scheduler could not place, and why.
    pub fn unplaced(&self) -> &[Unplaced] {
        &self.unplaced
    }
    pub fn trusted_keys(&self) -> &BTreeMap<String, TrustedKey> {
        &self.trusted_keys
    }
    /// The client writes applied lately (the dedupe table).
    pub fn applied_writes(&self) -> &AppliedWrites {
        &self.writes
    }
    pub fn tokens(&self) -> &BTreeMap<String, Token> {
        &self.tokens
    }
    /// The audit log, oldest first; `audit()[i].seq == i`.
    pub fn audit(&self) -> &[AuditRecord] {
        &self.audit
    }
}
