//! What must hold of every [`State`] reachable through `apply`, checked from scratch. The
//! proptests run it after every command; [`State::restore`] runs it on every snapshot.

use std::collections::BTreeMap;

use super::State;
use super::approvals::RequestStatus;
use super::deployments::RevisionStatus;
use super::shelf::Stage;
use crate::command::{ReplicaKey, Role};
use crate::scheduler::Plan;
use crate::scheduler::check_plan;

impl State {
    /// Checks the state's invariants; returns the first violation found.
    ///
    /// - placements satisfy [`check_plan`] (existing schedulable nodes, hardware, memory within
    ///   every pool, one replica of a deployment per node, every replica placed or reported,
    ///   nothing left unplaced that fits), and each node's `assigned` list matches them;
    /// - an approved (version, environment) has an approved request with enough distinct
    ///   approvals from the policy's role, none by the submitter or the version's publisher;
    ///   a pending one has an open request, and every open request is pending on its version;
    /// - deployments name existing versions, their rollout status matches the placements;
    /// - ids to come are above every id given; the audit log is numbered 0.. and never goes back
    ///   in time or past the clock;
    /// - the applied write ids are within their bounds, in order, each once;
    /// - no revoked coordinator is a member; every join token expires and counts its uses.
    pub fn check_invariants(&self) -> Result<(), String> {
        let plan = Plan {
            placements: self.tracked_placements(),
            unplaced: self.tracked_unplaced(),
        };
        if plan.placements.len() != self.placements.len() {
            return Err("a placement runs a revision its deployment does not".into());
        }
        check_plan(&self.node_views(), &self.deployment_views(), &plan)?;
        let mut assigned: BTreeMap<&str, Vec<ReplicaKey>> = BTreeMap::new();
        for w in self.placements.windows(2) {
            if (w[0].deployment, w[0].revision, w[0].replica)
                >= (w[1].deployment, w[1].revision, w[1].replica)
            {
                return Err("placements are not sorted".into());
            }
        }
        for p in &self.placements {
            assigned.entry(&p.node).or_default().push(ReplicaKey {
                deployment: p.deployment,
                revision: p.revision,
                replica: p.replica,
            });
        }
        for (id, node) in &self.nodes {
            let want = assigned.remove(id.as_str()).unwrap_or_default();
            if node.assigned != want || node.id != *id {
                return Err(format!("node {id}'s assigned replicas are out of date"));
            }
        }

        for (name, model) in &self.models {
            for (v, version) in &model.versions {
                for (env, stage) in &version.stages {
                    let (Stage::Pending { request }
                    | Stage::Approved { request }
                    | Stage::Rejected { request }) = *stage;
                    let r = self.requests.get(&request).ok_or_else(|| {
                        format!("{name}@{v} in {env} names missing request {request}")
                    })?;
                    if (&r.model, &r.version, &r.environment) != (name, v, env) {
                        return Err(format!(
                            "request {request} is not about {name}@{v} in {env}"
                        ));
                    }
                    let status = match stage {
                        Stage::Pending { .. } => RequestStatus::Open,
                        Stage::Approved { .. } => RequestStatus::Approved,
                        Stage::Rejected { .. } => RequestStatus::Rejected,
                    };
                    if r.status != status {
                        return Err(format!(
                            "request {request} is {:?}, stage {stage:?}",
                            r.status
                        ));
                    }
                    if let Stage::Approved { .. } = stage {
                        let needed = r.required_approvals.max(1) as usize;
                        if r.counted_approvals() < needed {
                            return Err(format!(
                                "request {request} approved without enough approvals"
                            ));
                        }
                        if r.decisions
                            .iter()
                            .any(|d| d.approver == r.submitter || d.approver == version.created_by)
                        {
                            return Err(format!(
                                "request {request} was decided by its submitter or publisher"
                            ));
                        }
                    }
                }
            }
        }
        for (id, r) in &self.requests {
            if *id >= self.next_request || r.id != *id {
                return Err(format!("request id {id} is out of sequence"));
            }
            if r.status == RequestStatus::Open {
                let stage = self
                    .version(&r.model, &r.version)
                    .map_err(|e| e.to_string())?
                    .stage(&r.environment);
                if stage != Some(Stage::Pending { request: *id }) {
                    return Err(format!("open request {id} is not pending on its version"));
                }
            }
        }

        for (id, d) in &self.deployments {
            let serving = d
                .history
                .iter()
                .filter(|r| r.status == RevisionStatus::Serving);
            let rolling = d
                .history
                .iter()
                .filter(|r| r.status == RevisionStatus::Rolling);
            let serving: Vec<_> = serving.map(|r| (r.revision, r.version.as_str())).collect();
            let rolling: Vec<_> = rolling.map(|r| (r.revision, r.version.as_str())).collect();
            // Deployments made before revisions were recorded have no history.
            if !d.history.is_empty() && serving != [(d.revision, d.version.as_str())] {
                return Err(format!(
                    "deployment {id}'s history does not match its revision"
                ));
            }
            let want: Vec<_> = d
                .update
                .iter()
                .map(|u| (u.revision, u.version.as_str()))
                .collect();
            if !d.history.is_empty() && rolling != want {
                return Err(format!(
                    "deployment {id}'s history does not match its update"
                ));
            }
            if let Some(a) = &d.autoscale
                && (a.check().is_err()
                    || d.replicas > a.max_replicas
                    || d.replicas < a.min_replicas)
            {
                return Err(format!("deployment {id} is outside its autoscaling bounds"));
            }
            if let Some(u) = &d.update {
                let v = self
                    .version(&d.model, &u.version)
                    .map_err(|e| e.to_string())?;
                if u.revision <= d.revision || v.memory_mb() != u.memory_mb {
                    return Err(format!("deployment {id}'s update is inconsistent"));
                }
                if let Some(c) = &u.canary
                    && (c.step as usize >= c.spec.steps.len() || c.spec.check().is_err())
                {
                    return Err(format!("deployment {id}'s canary is inconsistent"));
                }
            }
        }
        let mut counts: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
        for p in &self.placements {
            let c = counts.entry(p.deployment).or_default();
            c.0 += 1;
            c.1 += u32::from(p.ready);
        }
        let mut unplaced: BTreeMap<u64, u32> = BTreeMap::new();
        for u in &self.unplaced {
            *unplaced.entry(u.deployment).or_default() += u.replicas.len() as u32;
        }
        for (id, d) in &self.deployments {
            if *id >= self.next_deployment || d.id != *id {
                return Err(format!("deployment id {id} is out of sequence"));
            }
            let v = self
                .version(&d.model, &d.version)
                .map_err(|e| e.to_string())?;
            if v.memory_mb() != d.memory_mb {
                return Err(format!(
                    "deployment {id}'s memory differs from its version's"
                ));
            }
            let (placed, ready) = counts.get(id).copied().unwrap_or_default();
            let want = super::deployments::RolloutStatus::of(
                d,
                placed,
                ready,
                unplaced.get(id).copied().unwrap_or(0),
            );
            if d.rollout != want {
                return Err(format!(
                    "deployment {id}'s rollout {:?} should be {want:?}",
                    d.rollout
                ));
            }
        }

        for (principal, r) in &self.revoked {
            if r.principal != *principal {
                return Err(format!("revocation {principal} names {}", r.principal));
            }
        }
        for id in self.coordinators.keys() {
            if self
                .revoked
                .contains_key(&super::members::coordinator_principal(*id))
            {
                return Err(format!("coordinator {id} is a member and revoked"));
            }
        }
        for (id, t) in &self.tokens {
            if matches!(t.role, Role::Join | Role::NodeJoin)
                && (t.expires_at_ms.is_none() || t.uses_left.is_none())
            {
                return Err(format!("join token {id} has no expiry or no use count"));
            }
        }

        let mut last = 0;
        for (i, a) in self.audit.iter().enumerate() {
            if a.seq != i as u64 || a.at_ms < last || a.at_ms > self.clock_ms {
                return Err(format!("audit record {i} is out of order"));
            }
            last = a.at_ms;
        }
        self.writes.check()
    }
}
