//! Rolling updates, revisions and rollbacks.

use super::*;
use crate::command::ReplicaUpdate;
use crate::error::Error;
use crate::scheduler::ReplicaPhase;
use crate::state::deployments::{RevisionStatus, RolloutState};

fn operator() -> Actor {
    actor("olga", Role::Operator)
}
fn leader() -> Actor {
    actor("coordinator-1", Role::Operator)
}

fn join(w: &mut World, id: &str, zone: &str) {
    w.ok(
        operator(),
        Command::JoinNode {
            node: node_spec(id, zone, 8000, 0),
        },
    );
}

fn update(deployment: u64, version: &str, max_surge: Option<u32>) -> Command {
    Command::UpdateDeployment {
        deployment,
        version: version.into(),
        max_surge,
    }
}

fn rollback(deployment: u64, to: Option<u32>) -> Command {
    Command::RollbackDeployment { deployment, to }
}

/// (revision, replica, node, ready) of deployment 1's placements.
fn placed(w: &World) -> Vec<(u32, u32, String, bool)> {
    w.state
        .placements()
        .iter()
        .filter(|p| p.deployment == 1)
        .map(|p| (p.revision, p.replica, p.node.clone(), p.ready))
        .collect()
}

/// Every placement of deployment 1 at `revision` reports `phase` from its node.
fn report_all(w: &mut World, revision: u32, phase: ReplicaPhase) {
    let mine: Vec<_> = placed(w)
        .into_iter()
        .filter(|(r, _, _, ready)| *r == revision && !ready)
        .collect();
    for (revision, replica, node, _) in mine {
        w.ok(leader(), report(&node, revision, replica, phase));
    }
}

fn report(node: &str, revision: u32, replica: u32, phase: ReplicaPhase) -> Command {
    Command::ReportReplicas {
        node: node.into(),
        replicas: vec![ReplicaUpdate {
            deployment: 1,
            revision,
            replica,
            phase,
            reason: (phase == ReplicaPhase::Failed).then(|| "unsupported operator Foo".into()),
        }],
    }
}

/// Three nodes, `fraud@1` and `fraud@2` on the shelf, `fraud@1` on two ready replicas in
/// staging (deployment 1).
fn serving() -> World {
    let mut w = World::with_shelf();
    for (id, zone) in [("n1", "a"), ("n2", "b"), ("n3", "c")] {
        join(&mut w, id, zone);
    }
    w.ok(actor("pat", Role::Publisher), register("fraud", "2", 2));
    w.ok(operator(), deploy("fraud", "1", "staging", 2));
    report_all(&mut w, 1, ReplicaPhase::Ready);
    assert_eq!(
        w.state.deployments()[&1].rollout.state,
        RolloutState::Available
    );
    w
}

fn statuses(w: &World) -> Vec<(u32, String, RevisionStatus)> {
    w.state.deployments()[&1]
        .history
        .iter()
        .map(|r| (r.revision, r.version.clone(), r.status))
        .collect()
}

#[test]
fn a_rolling_update_adds_a_new_replica_before_each_old_one_goes() {
    let mut w = serving();
    let out = w.ok(operator(), update(1, "2", Some(1)));
    assert!(out.placements_changed);
    let d = &w.state.deployments()[&1];
    assert_eq!((d.revision, d.version.as_str()), (1, "1"));
    assert_eq!(d.update.as_ref().map(|u| u.revision), Some(2));
    assert_eq!(d.rollout.state, RolloutState::Progressing);
    // Surge 1: both old replicas stay, one new one is added.
    let count = |w: &World, rev| placed(w).iter().filter(|p| p.0 == rev).count();
    assert_eq!((count(&w, 1), count(&w, 2)), (2, 1));
    // The new replica becomes ready: one old replica goes, the next new one comes.
    report_all(&mut w, 2, ReplicaPhase::Ready);
    assert_eq!((count(&w, 1), count(&w, 2)), (1, 2));
    assert!(
        placed(&w).iter().all(|p| p.0 == 2 || p.3),
        "old replicas stay ready"
    );
    // All new replicas ready: revision 2 serves, revision 1 is gone.
    report_all(&mut w, 2, ReplicaPhase::Ready);
    let d = &w.state.deployments()[&1];
    assert_eq!((d.revision, d.version.as_str()), (2, "2"));
    assert!(d.update.is_none());
    assert_eq!(d.rollout.state, RolloutState::Available);
    assert_eq!((count(&w, 1), count(&w, 2)), (0, 2));
    assert_eq!(
        statuses(&w),
        [
            (1, "1".into(), RevisionStatus::Superseded),
            (2, "2".into(), RevisionStatus::Serving)
        ]
    );
    let last = w.state.audit().last().expect("audited");
    assert!(
        last.detail.contains("revision 2 (2) rolled out"),
        "{}",
        last.detail
    );
}

#[test]
fn a_surge_may_share_a_node_with_the_replica_it_replaces() {
    let mut w = World::with_shelf();
    join(&mut w, "n1", "a");
    w.ok(actor("pat", Role::Publisher), register("fraud", "2", 2));
    w.ok(operator(), deploy("fraud", "1", "staging", 1));
    report_all(&mut w, 1, ReplicaPhase::Ready);
    w.ok(operator(), update(1, "2", None));
    assert_eq!(
        placed(&w),
        [(1, 0, "n1".into(), true), (2, 0, "n1".into(), false)]
    );
    report_all(&mut w, 2, ReplicaPhase::Ready);
    assert_eq!(placed(&w), [(2, 0, "n1".into(), true)]);
}

#[test]
fn updates_follow_the_approval_rules_and_refuse_what_makes_no_sense() {
    let mut w = serving();
    let e = w.refused(operator(), update(1, "1", None));
    assert!(e.to_string().contains("already runs 1"), "{e}");
    let e = w.refused(operator(), update(1, "9", None));
    assert!(e.to_string().contains("9"), "{e}");
    let e = w.refused(operator(), update(7, "2", None));
    assert!(matches!(e, Error::UnknownDeployment { id: 7 }), "{e}");
    let e = w.refused(actor("vic", Role::Viewer), update(1, "2", None));
    assert!(matches!(e, Error::Forbidden { .. }), "{e}");
    let e = w.refused(operator(), update(1, "2", Some(0)));
    assert!(e.to_string().contains("max_surge"), "{e}");
    // Production needs two approvals: fraud@1 gets them, fraud@2 does not.
    w.ok(
        actor("pat", Role::Publisher),
        request("fraud", "1", "production"),
    );
    let r = w.state.requests().keys().max().copied().expect("a request");
    w.ok(actor("ann", Role::Approver), decide(r, true, "ok"));
    w.ok(actor("bob", Role::Approver), decide(r, true, "ok"));
    w.ok(operator(), deploy("fraud", "1", "production", 1));
    let e = w.refused(operator(), update(2, "2", None));
    assert!(matches!(e, Error::NotApproved { .. }), "{e}");
    assert_eq!(e.kind(), crate::error::ErrorKind::Conflict);
    // One update at a time.
    w.ok(operator(), update(1, "2", None));
    let e = w.refused(operator(), update(1, "2", None));
    assert!(
        matches!(e, Error::UpdateInProgress { id: 1, revision: 2 }),
        "{e}"
    );
    let e = w.refused(operator(), rollback(1, Some(2)));
    assert!(matches!(e, Error::UpdateInProgress { .. }), "{e}");
}

#[test]
fn a_rollback_abandons_a_running_update_or_rolls_out_an_earlier_revision() {
    let mut w = serving();
    // Nothing earlier to roll back to yet.
    let e = w.refused(operator(), rollback(1, None));
    assert!(e.to_string().contains("no earlier revision"), "{e}");
    // An update abandoned halfway: its replicas go, the old ones never stopped.
    w.ok(operator(), update(1, "2", Some(1)));
    report_all(&mut w, 2, ReplicaPhase::Ready);
    assert_eq!(placed(&w).len(), 3);
    w.ok(operator(), rollback(1, None));
    assert!(placed(&w).iter().all(|p| p.0 == 1));
    assert_eq!(placed(&w).len(), 2);
    assert_eq!(
        statuses(&w),
        [
            (1, "1".into(), RevisionStatus::Serving),
            (2, "2".into(), RevisionStatus::Aborted)
        ]
    );
    // Now all the way to revision 3, then back to revision 1's version as revision 4.
    w.ok(operator(), update(1, "2", None));
    report_all(&mut w, 3, ReplicaPhase::Ready);
    report_all(&mut w, 3, ReplicaPhase::Ready);
    assert_eq!(w.state.deployments()[&1].revision, 3);
    let e = w.refused(operator(), rollback(1, Some(9)));
    assert!(e.to_string().contains("no revision 9"), "{e}");
    w.ok(operator(), rollback(1, None));
    assert_eq!(
        w.state.deployments()[&1]
            .update
            .as_ref()
            .map(|u| (u.revision, u.version.as_str())),
        Some((4, "1"))
    );
    report_all(&mut w, 4, ReplicaPhase::Ready);
    report_all(&mut w, 4, ReplicaPhase::Ready);
    let d = &w.state.deployments()[&1];
    assert_eq!((d.revision, d.version.as_str()), (4, "1"));
    assert_eq!(d.history[3].cause, "rollback to revision 1");
    assert_eq!(statuses(&w)[2].2, RevisionStatus::Superseded);
}

#[test]
fn a_new_revision_that_fails_to_load_is_rolled_back_on_its_own() {
    let mut w = serving();
    w.ok(operator(), update(1, "2", None));
    let (_, replica, node, _) = placed(&w)
        .into_iter()
        .find(|p| p.0 == 2)
        .expect("a new replica");
    w.ok(leader(), report(&node, 2, replica, ReplicaPhase::Failed));
    let d = &w.state.deployments()[&1];
    assert!(d.update.is_none());
    assert!(d.failed_on.is_empty(), "the serving revision is not blamed");
    assert_eq!(d.history[1].status, RevisionStatus::Aborted);
    assert!(d.history[1].reason.contains("unsupported operator Foo"));
    assert!(placed(&w).iter().all(|p| p.0 == 1 && p.3));
    let last = w.state.audit().last().expect("audited");
    assert!(
        last.detail.contains("rolled back to revision 1"),
        "{}",
        last.detail
    );
}

#[test]
fn a_snapshot_with_an_update_running_restores_the_same_state() {
    let mut w = serving();
    w.ok(operator(), update(1, "2", Some(1)));
    report_all(&mut w, 2, ReplicaPhase::Ready);
    let bytes = w.state.snapshot().expect("snapshot");
    let back = State::restore(&bytes).expect("restore");
    assert_eq!(back, w.state);
}

mod canaries {
    use super::*;
    use crate::state::canary::{CanarySpec, Figures, Slo, Verdict};

    fn canary(deployment: u64, version: &str, steps: &[u32]) -> Command {
        Command::CanaryDeployment {
            deployment,
            version: version.into(),
            spec: CanarySpec {
                steps: steps.to_vec(),
                interval_ms: 10_000,
                slo: Slo::parse("p99<50ms,errors<1%").expect("present"),
                mirror: false,
                min_requests: 20,
                max_slowdown_pct: 200,
            },
        }
    }

    fn judge(revision: u32, step: u32, verdict: Verdict, errors: u64) -> Command {
        Command::JudgeCanary {
            deployment: 1,
            revision,
            step,
            verdict,
            canary: Figures {
                requests: 100,
                errors,
                p50_us: Some(900),
                p99_us: Some(2_000),
            },
            stable: Figures {
                requests: 1900,
                errors: 0,
                p50_us: Some(800),
                p99_us: Some(1_900),
            },
            reason: "judged".into(),
        }
    }

    fn count(w: &World, revision: u32) -> usize {
        placed(w).iter().filter(|p| p.0 == revision).count()
    }

    /// Three replicas of `fraud@1` (deployment 1), ready, one per node.
    fn three() -> World {
        let mut w = serving();
        w.ok(
            operator(),
            Command::ScaleDeployment {
                deployment: 1,
                replicas: 3,
            },
        );
        report_all(&mut w, 1, ReplicaPhase::Ready);
        w
    }

    #[test]
    fn a_canary_steps_up_its_share_and_is_promoted_after_the_last_step() {
        let mut w = three();
        w.ok(operator(), canary(1, "2", &[25, 50, 100]));
        // Every serving replica stays; the canary runs its share of new ones.
        assert_eq!((count(&w, 1), count(&w, 2)), (3, 1));
        report_all(&mut w, 2, ReplicaPhase::Ready);
        // Ready is not done: a canary waits for its judgement.
        let d = &w.state.deployments()[&1];
        assert_eq!(d.revision, 1);
        assert_eq!(
            d.update
                .as_ref()
                .expect("present")
                .canary
                .as_ref()
                .expect("present")
                .weight(),
            25
        );
        // A judgement of another step is stale, and changes nothing.
        let e = w.refused(leader(), judge(2, 1, Verdict::Advance, 0));
        assert!(e.to_string().contains("at step 1"), "{e}");
        w.ok(leader(), judge(2, 0, Verdict::Advance, 0));
        assert_eq!((count(&w, 1), count(&w, 2)), (3, 2));
        report_all(&mut w, 2, ReplicaPhase::Ready);
        w.ok(leader(), judge(2, 1, Verdict::Hold, 0));
        w.ok(leader(), judge(2, 1, Verdict::Hold, 0));
        w.ok(leader(), judge(2, 1, Verdict::Advance, 0));
        assert_eq!((count(&w, 1), count(&w, 2)), (3, 3));
        report_all(&mut w, 2, ReplicaPhase::Ready);
        w.ok(leader(), judge(2, 2, Verdict::Promote, 0));
        let d = &w.state.deployments()[&1];
        assert_eq!((d.revision, d.version.as_str()), (2, "2"));
        assert!(d.update.is_none());
        assert_eq!(count(&w, 1), 0);
        let r = d.history.iter().find(|r| r.revision == 2).expect("present");
        let verdicts: Vec<Verdict> = r.decisions.iter().map(|d| d.verdict).collect();
        // Two holds in a row keep only the latest.
        assert_eq!(
            verdicts,
            [
                Verdict::Advance,
                Verdict::Hold,
                Verdict::Advance,
                Verdict::Promote
            ]
        );
        let audit = w.state.audit().last().expect("present");
        assert_eq!(audit.action, "judge-canary");
        assert!(audit.detail.contains("promote"), "{}", audit.detail);
        assert!(audit.detail.contains("100 requests"), "{}", audit.detail);
    }

    #[test]
    fn a_rolled_back_canary_leaves_the_serving_revision_untouched() {
        let mut w = three();
        w.ok(operator(), canary(1, "2", &[5, 100]));
        report_all(&mut w, 2, ReplicaPhase::Ready);
        w.ok(leader(), judge(2, 0, Verdict::Rollback, 30));
        let d = &w.state.deployments()[&1];
        assert_eq!((d.revision, d.version.as_str()), (1, "1"));
        assert!(d.update.is_none());
        assert_eq!((count(&w, 1), count(&w, 2)), (3, 0));
        assert!(
            placed(&w).iter().all(|p| p.3),
            "serving replicas stay ready"
        );
        let r = d.history.iter().find(|r| r.revision == 2).expect("present");
        assert_eq!(r.status, RevisionStatus::Aborted);
        assert!(r.reason.starts_with("canary rolled back"), "{}", r.reason);
        assert_eq!(r.decisions[0].canary.errors, 30);
        let audit = w.state.audit().last().expect("present");
        assert!(audit.detail.contains("30% errors"), "{}", audit.detail);
        // Nothing runs now: a further judgement is refused.
        w.refused(leader(), judge(2, 0, Verdict::Advance, 0));
    }

    #[test]
    fn operators_may_promote_or_abandon_and_the_rules_of_updates_hold() {
        let mut w = three();
        // An invalid spec changes nothing.
        w.refused(operator(), canary(1, "2", &[50, 25]));
        // Only an operator starts one.
        w.refused(actor("pat", Role::Publisher), canary(1, "2", &[50]));
        w.ok(operator(), canary(1, "2", &[5, 50, 100]));
        // One update at a time.
        let e = w.refused(operator(), update(1, "2", None));
        assert!(matches!(e, Error::UpdateInProgress { .. }), "{e}");
        w.ok(operator(), Command::PromoteCanary { deployment: 1 });
        // A plain rolling update from here: it completes once all new replicas are ready.
        let d = &w.state.deployments()[&1];
        assert!(d.update.as_ref().is_some_and(|u| u.canary.is_none()));
        for _ in 0..3 {
            report_all(&mut w, 2, ReplicaPhase::Ready);
        }
        assert_eq!(w.state.deployments()[&1].revision, 2);
        w.refused(operator(), Command::PromoteCanary { deployment: 1 });
        // A canary back to 1, abandoned by an operator's rollback.
        w.ok(operator(), canary(1, "1", &[10]));
        w.ok(operator(), rollback(1, None));
        let d = &w.state.deployments()[&1];
        assert_eq!((d.revision, d.update.is_none()), (2, true));
    }

    #[test]
    fn a_canary_needs_the_version_approved_where_it_runs() {
        let mut w = serving();
        w.ok(
            actor("pat", Role::Publisher),
            request("fraud", "1", "production"),
        );
        let r = w.state.requests().keys().max().copied().expect("a request");
        w.ok(actor("ann", Role::Approver), decide(r, true, "ok"));
        w.ok(actor("bob", Role::Approver), decide(r, true, "ok"));
        w.ok(operator(), deploy("fraud", "1", "production", 1));
        let e = w.refused(operator(), canary(2, "2", &[5, 100]));
        assert!(matches!(e, Error::NotApproved { .. }), "{e}");
    }
}
