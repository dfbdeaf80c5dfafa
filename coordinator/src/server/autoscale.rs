//! The leader's autoscaler (the rules are [`crate::state::autoscale`]'s) and activation.
//!
//! Nodes report an autoscaled deployment's versions every heartbeat, each report with the time
//! its requests spent at the node (`busy_us`): over the report's period, that is the average
//! number in flight there (Little's law). Twice a second the leader sums the latest report of
//! every node into one sample per deployment, averages the samples over the stable and the panic
//! windows, and commits `Autoscale` when [`decide`] wants another size. A node holding a request
//! for a deployment at zero asks for an activation (`ACTIVATE`): the leader commits one replica
//! (or `min_replicas`) at once, without waiting for the averages.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sophon_mesh::wire;

use super::nodes::{Directory, ScalePlan};
use super::{Core, io};
use crate::command::{Actor, Command, Role};
use crate::state::autoscale::{Observed, decide};
use crate::{Error, Result};

/// A report older than this is not counted in a sample.
const SAMPLE_FRESH: Duration = Duration::from_secs(3);

/// At most one resize proposal per deployment this often.
const MIN_GAP: Duration = Duration::from_secs(1);

/// One autoscaled deployment's samples, as this leader took them.
#[derive(Debug)]
pub struct ScaleWindow {
    since: Instant,
    samples: VecDeque<(Instant, f64)>,
    last_active: Instant,
    panic_until: Option<Instant>,
    proposing: bool,
    last_proposal: Option<Instant>,
}

impl ScaleWindow {
    fn new(now: Instant) -> ScaleWindow {
        ScaleWindow {
            since: now,
            samples: VecDeque::new(),
            last_active: now,
            panic_until: None,
            proposing: false,
            last_proposal: None,
        }
    }

    fn mean(&self, now: Instant, window: Duration) -> f64 {
        let within: Vec<f64> = self
            .samples
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) <= window)
            .map(|(_, v)| *v)
            .collect();
        if within.is_empty() {
            0.0
        } else {
            within.iter().sum::<f64>() / within.len() as f64
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Sample, decide and commit for every autoscaled deployment (on the leader only).
pub(super) fn autoscale(core: &Arc<Core>, dir: &Directory) {
    let now = Instant::now();
    let mut due = Vec::new();
    {
        let mut liveness = core.nodes.liveness.lock();
        if !liveness.leads() {
            return;
        }
        // The sum, over nodes, of the latest fresh report of each of the plan's versions.
        let samples: Vec<(f64, Option<Instant>)> = dir
            .autoscaled
            .iter()
            .map(|plan| {
                let mut busy = 0.0;
                let mut active = None;
                for (at, r) in liveness.reports() {
                    if now.saturating_duration_since(*at) > SAMPLE_FRESH
                        || r.model != plan.model
                        || !plan.versions.contains(&r.version)
                    {
                        continue;
                    }
                    busy += r.busy_us as f64 / (r.period_ms.max(1) as f64 * 1000.0);
                    if r.count > 0 {
                        active = active.max(Some(*at));
                    }
                }
                (busy, active)
            })
            .collect();
        let windows = &mut liveness.scales;
        windows.retain(|id, _| dir.autoscaled.iter().any(|p| p.deployment == *id));
        for (plan, (busy, active)) in dir.autoscaled.iter().zip(samples) {
            let a = &plan.autoscale;
            let w = windows
                .entry(plan.deployment)
                .or_insert_with(|| ScaleWindow::new(now));
            let stable = Duration::from_millis(a.stable_window_ms);
            w.samples.push_back((now, busy));
            while w
                .samples
                .front()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) > stable)
            {
                w.samples.pop_front();
            }
            if let Some(at) = active {
                w.last_active = w.last_active.max(at);
            }
            let panic_avg = w.mean(now, Duration::from_millis(a.panic_window_ms));
            let target = f64::from(a.target_concurrency_milli) / 1000.0;
            if plan.replicas > 0
                && panic_avg / target
                    >= f64::from(plan.replicas) * f64::from(a.panic_threshold_pct) / 100.0
            {
                w.panic_until = Some(now + stable);
            }
            let seen = Observed {
                stable: w.mean(now, stable),
                panic: panic_avg,
                history_ms: ms(now.saturating_duration_since(w.since)),
                idle_ms: ms(now.saturating_duration_since(w.last_active)),
                panicking: w.panic_until.is_some_and(|until| until > now),
            };
            if w.proposing
                || w.last_proposal
                    .is_some_and(|at| now.saturating_duration_since(at) < MIN_GAP)
            {
                continue;
            }
            if let Some((replicas, reason)) = decide(a, plan.replicas, &seen) {
                w.proposing = true;
                w.last_proposal = Some(now);
                due.push((plan.deployment, replicas, reason));
            }
        }
    }
    for (deployment, replicas, reason) in due {
        let core = core.clone();
        tokio::spawn(async move {
            let result = commit(&core, deployment, replicas, reason).await;
            if let Err(e) = result {
                tracing::debug!(deployment, error = %e, "could not commit an autoscale");
            }
            if let Some(w) = core.nodes.liveness.lock().scales.get_mut(&deployment) {
                w.proposing = false;
            }
        });
    }
}

async fn commit(core: &Arc<Core>, deployment: u64, replicas: u32, reason: String) -> Result<()> {
    let actor = Actor::system(format!("coordinator-{}", core.id), Role::Operator);
    core.write(
        actor,
        Command::Autoscale {
            deployment,
            replicas,
            reason,
        },
    )
    .await?;
    tracing::info!(deployment, replicas, "autoscaled");
    Ok(())
}

impl Core {
    /// A node holds a request for a deployment with no ready replica: give it its activation
    /// size now, if it is at zero. Answered once committed (or at once if it has replicas).
    pub(super) async fn serve_activate(
        self: &Arc<Self>,
        node: &str,
        body: &[u8],
    ) -> Result<serde_json::Value> {
        let request: wire::Activate =
            serde_json::from_slice(body).map_err(|e| io("decode an activation", e))?;
        let dir = self.nodes.directory();
        let status = self.driver.status();
        if !status.is_leader {
            return Err(Error::NotLeader {
                id: self.id,
                leader: status.leader,
            });
        }
        let plan: Option<ScalePlan> = dir
            .autoscaled
            .iter()
            .find(|p| p.deployment == request.deployment)
            .cloned();
        let Some(plan) = plan else {
            return Err(Error::UnknownDeployment {
                id: request.deployment,
            });
        };
        let now = Instant::now();
        let claimed = {
            let mut liveness = self.nodes.liveness.lock();
            let w = liveness
                .scales
                .entry(plan.deployment)
                .or_insert_with(|| ScaleWindow::new(now));
            w.last_active = now;
            let claimed = plan.replicas == 0 && !w.proposing;
            if claimed {
                w.proposing = true;
                w.last_proposal = Some(now);
            }
            claimed
        };
        if claimed {
            let replicas = plan.autoscale.activation();
            let reason = format!("activated by a request at node {node}");
            let result = commit(self, plan.deployment, replicas, reason).await;
            if let Some(w) = self.nodes.liveness.lock().scales.get_mut(&plan.deployment) {
                w.proposing = false;
            }
            result?;
        }
        Ok(serde_json::json!({"deployment": plan.deployment, "activating": claimed}))
    }
}
