//! The leader's canary analysis (the rules are [`crate::state::canary`]'s).
//!
//! Nodes report the performance of the versions under a canary with every heartbeat (1 s). For
//! each running canary the leader keeps a [`Window`]: both revisions' reports merged since the
//! step began here (counts and HDR histograms, merged exactly). Twice a second it judges each
//! window, and commits the verdict with its figures (`JudgeCanary`), which moves the canary on
//! or rolls it back on every coordinator, and writes the audit record. A new leader starts the
//! running step's window afresh: it judges only what it saw.

use std::sync::Arc;
use std::time::Instant;

use sophon_mesh::wire;

use super::Core;
use super::nodes::{CanaryPlan, Directory};
use super::perf::Merged;
use crate::command::{Actor, Command, Role};
use crate::state::canary::judge;

/// One canary step's figures, as this leader heard them.
pub struct Window {
    /// (revision, step, when the step started): a new step, or a held one started again, opens
    /// a new window.
    key: (u32, u32, u64),
    model: String,
    stable: String,
    version: String,
    opened: Instant,
    canary_figures: Merged,
    stable_figures: Merged,
    /// A verdict on this window is being committed.
    proposing: bool,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("key", &self.key)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

fn key(plan: &CanaryPlan) -> (u32, u32, u64) {
    (
        plan.revision,
        plan.canary.step,
        plan.canary.step_started_at_ms,
    )
}

impl Window {
    fn new(plan: &CanaryPlan, now: Instant) -> Window {
        Window {
            key: key(plan),
            model: plan.model.clone(),
            stable: plan.stable.clone(),
            version: plan.version.clone(),
            opened: now,
            canary_figures: Merged::new(),
            stable_figures: Merged::new(),
            proposing: false,
        }
    }

    /// A report from a node, if it is about either revision.
    pub fn add(&mut self, r: &wire::PerfReport) {
        if r.model != self.model {
            return;
        }
        if r.version == self.version {
            self.canary_figures.add(r);
        } else if r.version == self.stable {
            self.stable_figures.add(r);
        }
    }
}

/// Judge every running canary; commit the verdicts that are due (on the leader only).
pub(super) fn analyse(core: &Arc<Core>, dir: &Directory) {
    let now = Instant::now();
    let mut due = Vec::new();
    {
        let mut liveness = core.nodes.liveness.lock();
        if !liveness.leads() {
            return;
        }
        let windows = &mut liveness.canaries;
        windows.retain(|id, _| dir.canaries.iter().any(|p| p.deployment == *id));
        for plan in &dir.canaries {
            let w = windows
                .entry(plan.deployment)
                .or_insert_with(|| Window::new(plan, now));
            if w.key != key(plan) {
                *w = Window::new(plan, now);
            }
            if w.proposing {
                continue;
            }
            let (canary, stable) = (w.canary_figures.figures(), w.stable_figures.figures());
            let elapsed = now.saturating_duration_since(w.opened).as_millis() as u64;
            if let Some((verdict, reason)) = judge(&plan.canary, &canary, &stable, elapsed) {
                w.proposing = true;
                due.push((
                    plan.deployment,
                    Command::JudgeCanary {
                        deployment: plan.deployment,
                        revision: plan.revision,
                        step: plan.canary.step,
                        verdict,
                        canary,
                        stable,
                        reason,
                    },
                ));
            }
        }
    }
    for (deployment, command) in due {
        let core = core.clone();
        tokio::spawn(async move {
            let actor = Actor::system(format!("coordinator-{}", core.id), Role::Operator);
            match core.write(actor, command).await {
                Ok(_) => tracing::info!(deployment, "canary judged"),
                Err(e) => {
                    tracing::warn!(deployment, error = %e, "could not commit a canary verdict");
                    if let Some(w) = core.nodes.liveness.lock().canaries.get_mut(&deployment) {
                        w.proposing = false;
                    }
                }
            }
        });
    }
}
