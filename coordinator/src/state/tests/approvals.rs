//! The approval rules: who may decide, when a version counts as approved, what may deploy.

use super::*;
use crate::command::Created;
use crate::state::approvals::RequestStatus;
use crate::state::shelf::Stage;

fn publisher() -> Actor {
    actor("pat", Role::Publisher)
}
fn submitter() -> Actor {
    actor("sam", Role::Publisher)
}
fn approver(name: &str) -> Actor {
    actor(name, Role::Approver)
}
fn operator() -> Actor {
    actor("olga", Role::Operator)
}

/// Submits `fraud@1` for production; returns the request id.
fn submit(w: &mut World) -> u64 {
    match w
        .ok(submitter(), request("fraud", "1", "production"))
        .created
    {
        Some(Created::ApprovalRequest(id)) => id,
        other => panic!("no request id: {other:?}"),
    }
}

fn stage(w: &World, environment: &str) -> Option<Stage> {
    w.state
        .version("fraud", "1")
        .map(|v| v.stage(environment))
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn two_distinct_approvers_approve_and_only_then_production_deploys() {
    let mut w = World::with_shelf();
    w.ok(
        operator(),
        Command::JoinNode {
            node: node_spec("n1", "a", 8000, 0),
        },
    );
    let id = submit(&mut w);
    assert_eq!(
        stage(&w, "production"),
        Some(Stage::Pending { request: id })
    );
    let e = w.refused(operator(), deploy("fraud", "1", "production", 1));
    assert!(matches!(e, Error::NotApproved { .. }), "{e}");

    w.ok(approver("ann"), decide(id, true, "looks good"));
    assert_eq!(w.state.requests()[&id].status, RequestStatus::Open);
    let e = w.refused(operator(), deploy("fraud", "1", "production", 1));
    assert!(
        matches!(e, Error::NotApproved { .. }),
        "one of two approvals is not enough: {e}"
    );
    // The same approver twice does not count twice.
    let e = w.refused(approver("ann"), decide(id, true, "again"));
    assert!(matches!(e, Error::AlreadyDecided { .. }), "{e}");

    w.ok(approver("bob"), decide(id, true, ""));
    assert_eq!(w.state.requests()[&id].status, RequestStatus::Approved);
    assert_eq!(
        stage(&w, "production"),
        Some(Stage::Approved { request: id })
    );
    w.ok(operator(), deploy("fraud", "1", "production", 1));
    // Approval is per environment: another approval-guarded environment still refuses.
    w.ok(admin(), policy("eu-prod", 1, Role::Approver));
    let e = w.refused(operator(), deploy("fraud", "1", "eu-prod", 1));
    assert!(matches!(e, Error::NotApproved { .. }), "{e}");
    // A closed request takes no more decisions.
    let e = w.refused(approver("cid"), decide(id, true, ""));
    assert!(matches!(e, Error::RequestClosed { .. }), "{e}");
}

#[test]
fn self_approval_is_refused() {
    let mut w = World::with_shelf();
    // The submitter may not approve, even holding the approver role.
    let id = match w
        .ok(approver("sue"), request("fraud", "1", "production"))
        .created
    {
        Some(Created::ApprovalRequest(id)) => id,
        other => panic!("{other:?}"),
    };
    let e = w.refused(approver("sue"), decide(id, true, "mine, fine"));
    assert!(matches!(e, Error::SelfApproval { .. }), "{e}");
    // Nor may whoever registered the version, whatever their role.
    let e = w.refused(actor("pat", Role::Admin), decide(id, true, ""));
    assert!(matches!(e, Error::SelfApproval { .. }), "{e}");
    assert!(w.state.requests()[&id].decisions.is_empty());
}

#[test]
fn approval_from_the_wrong_role_is_refused() {
    let mut w = World::with_shelf();
    let id = submit(&mut w);
    // Publishers and viewers may not decide at all.
    for role in [Role::Viewer, Role::Publisher] {
        let e = w.refused(actor("pete", role), decide(id, true, ""));
        assert!(
            matches!(
                e,
                Error::Forbidden {
                    needed: Role::Approver,
                    ..
                }
            ),
            "{e}"
        );
    }
    // An environment whose policy names admins refuses plain approvers.
    w.ok(admin(), policy("vault", 1, Role::Admin));
    let id = match w.ok(submitter(), request("fraud", "1", "vault")).created {
        Some(Created::ApprovalRequest(id)) => id,
        other => panic!("{other:?}"),
    };
    let e = w.refused(approver("ann"), decide(id, true, ""));
    assert!(
        matches!(
            e,
            Error::WrongRole {
                needed: Role::Admin,
                ..
            }
        ),
        "{e}"
    );
    w.ok(actor("ada", Role::Admin), decide(id, true, "ok"));
    assert_eq!(w.state.requests()[&id].status, RequestStatus::Approved);
    // A policy may not let publishers approve.
    let e = w.refused(admin(), policy("lax", 1, Role::Publisher));
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
}

#[test]
fn raising_the_bar_holds_up_open_requests() {
    let mut w = World::with_shelf();
    let id = submit(&mut w);
    w.ok(approver("ann"), decide(id, true, ""));
    // The policy now wants operators: ann's approval no longer counts, bob's does not either.
    w.ok(admin(), policy("production", 2, Role::Operator));
    let e = w.refused(approver("bob"), decide(id, true, ""));
    assert!(matches!(e, Error::WrongRole { .. }), "{e}");
    w.ok(actor("oli", Role::Operator), decide(id, true, ""));
    assert_eq!(w.state.requests()[&id].status, RequestStatus::Open);
    w.ok(actor("ops2", Role::Operator), decide(id, true, ""));
    assert_eq!(w.state.requests()[&id].status, RequestStatus::Approved);
}

#[test]
fn one_rejection_rejects_and_needs_a_reason() {
    let mut w = World::with_shelf();
    let id = submit(&mut w);
    w.ok(approver("ann"), decide(id, true, ""));
    let e = w.refused(approver("bob"), decide(id, false, " "));
    assert!(
        matches!(
            e,
            Error::Invalid {
                what: "comment",
                ..
            }
        ),
        "{e}"
    );
    w.ok(approver("bob"), decide(id, false, "fails the bias review"));
    assert_eq!(w.state.requests()[&id].status, RequestStatus::Rejected);
    assert_eq!(
        stage(&w, "production"),
        Some(Stage::Rejected { request: id })
    );
    let e = w.refused(operator(), deploy("fraud", "1", "production", 1));
    assert!(matches!(e, Error::NotApproved { .. }), "{e}");
    // It may be submitted again, as a fresh request.
    let again = submit(&mut w);
    assert_ne!(again, id);
    assert!(w.state.requests()[&again].decisions.is_empty());
}

#[test]
fn withdrawal_returns_to_draft() {
    let mut w = World::with_shelf();
    let id = submit(&mut w);
    let e = w.refused(publisher(), Command::Withdraw { request: id });
    assert!(matches!(e, Error::NotSubmitter { .. }), "{e}");
    w.ok(submitter(), Command::Withdraw { request: id });
    assert_eq!(w.state.requests()[&id].status, RequestStatus::Withdrawn);
    assert_eq!(stage(&w, "production"), None);
    let e = w.refused(approver("ann"), decide(id, true, ""));
    assert!(matches!(e, Error::RequestClosed { .. }), "{e}");
    let e = w.refused(submitter(), Command::Withdraw { request: id });
    assert!(matches!(e, Error::RequestClosed { .. }), "{e}");
    // An admin may withdraw anyone's request.
    let id = submit(&mut w);
    w.ok(admin(), Command::Withdraw { request: id });
    assert_eq!(stage(&w, "production"), None);
}

#[test]
fn requests_are_checked() {
    let mut w = World::with_shelf();
    type Expect = fn(&Error) -> bool;
    let cases: Vec<(Command, Expect)> = vec![
        (request("fraud", "1", "staging"), |e| {
            matches!(e, Error::NoApprovalNeeded { .. })
        }),
        (request("fraud", "1", "mars"), |e| {
            matches!(e, Error::UnknownEnvironment { .. })
        }),
        (request("fraud", "9", "production"), |e| {
            matches!(e, Error::UnknownVersion { .. })
        }),
        (request("nope", "1", "production"), |e| {
            matches!(e, Error::UnknownModel { .. })
        }),
        (decide(77, true, ""), |e| {
            matches!(e, Error::UnknownRequest { id: 77 })
        }),
        (Command::Withdraw { request: 77 }, |e| {
            matches!(e, Error::UnknownRequest { .. })
        }),
    ];
    for (command, expected) in cases {
        let what = format!("{command:?}");
        let e = w.refused(actor("ada", Role::Admin), command);
        assert!(expected(&e), "{what}: {e}");
    }
    let id = submit(&mut w);
    let e = w.refused(submitter(), request("fraud", "1", "production"));
    assert!(
        matches!(e, Error::AlreadyPending { request, .. } if request == id),
        "{e}"
    );
    w.ok(approver("ann"), decide(id, true, ""));
    w.ok(approver("bob"), decide(id, true, ""));
    let e = w.refused(submitter(), request("fraud", "1", "production"));
    assert!(matches!(e, Error::AlreadyApproved { .. }), "{e}");
}

#[test]
fn staging_needs_no_approval_but_the_shelf_still_counts() {
    let mut w = World::with_shelf();
    w.ok(operator(), deploy("fraud", "1", "staging", 1));
    let e = w.refused(operator(), deploy("fraud", "1", "staging", 2));
    assert!(matches!(e, Error::DeploymentExists { id: 1, .. }), "{e}");
    let e = w.refused(operator(), deploy("fraud", "1", "qa", 1));
    assert!(matches!(e, Error::UnknownEnvironment { .. }), "{e}");
    w.ok(publisher(), register("fraud", "2", 2));
    w.ok(
        publisher(),
        Command::TakeOffShelf {
            model: "fraud".into(),
            version: "2".into(),
        },
    );
    let e = w.refused(operator(), deploy("fraud", "2", "staging", 1));
    assert!(matches!(e, Error::OffShelf { .. }), "{e}");
    let e = w.refused(submitter(), request("fraud", "2", "production"));
    assert!(matches!(e, Error::OffShelf { .. }), "{e}");
    w.ok(
        publisher(),
        Command::PutOnShelf {
            model: "fraud".into(),
            version: "2".into(),
        },
    );
    w.ok(
        publisher(),
        Command::Deprecate {
            model: "fraud".into(),
            version: "2".into(),
        },
    );
    let e = w.refused(operator(), deploy("fraud", "2", "staging", 1));
    assert!(matches!(e, Error::Deprecated { .. }), "{e}");
    // Publishers may not deploy.
    let e = w.refused(publisher(), deploy("fraud", "1", "staging", 1));
    assert!(
        matches!(
            e,
            Error::Forbidden {
                needed: Role::Operator,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn every_decision_is_in_the_audit_log() {
    let mut w = World::with_shelf();
    let id = submit(&mut w);
    w.ok(approver("ann"), decide(id, true, "checked the eval report"));
    let refused = w.refused(approver("sam"), decide(id, true, "")); // the submitter
    assert!(matches!(refused, Error::SelfApproval { .. }));
    w.ok(approver("bob"), decide(id, false, "latency regression"));
    let decisions: Vec<_> = w
        .state
        .audit()
        .iter()
        .filter(|a| a.action == "decide")
        .collect();
    assert_eq!(decisions.len(), 2, "refused commands are not recorded");
    assert_eq!(decisions[0].actor, "ann");
    assert_eq!(decisions[0].target, format!("request {id}"));
    assert!(
        decisions[0]
            .detail
            .contains("approved fraud@1 for production (1 of 2 approvals)")
    );
    assert!(decisions[0].detail.contains("checked the eval report"));
    assert_eq!(decisions[1].actor, "bob");
    assert!(decisions[1].detail.contains("request rejected"));
    assert!(decisions[1].detail.contains("latency regression"));
    let actions: Vec<&str> = w.state.audit().iter().map(|a| a.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "trust-key",
            "set-policy",
            "set-policy",
            "register-model-version",
            "request-approval",
            "decide",
            "decide"
        ]
    );
    assert!(w.state.audit().windows(2).all(|p| p[0].at_ms < p[1].at_ms));
}
