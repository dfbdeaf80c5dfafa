//! Cluster credentials in the state machine: limited tokens (expiry and use count, checked
//! against the entry's clock), the join role, and the coordinators' revocation list.

use super::*;
use crate::state::tokens::hash_secret;

fn limited(id: &str, role: Role, expires_in_ms: Option<u64>, uses: Option<u32>) -> Command {
    Command::CreateLimitedToken {
        id: id.into(),
        name: format!("holder-{id}"),
        role,
        secret_hash: hash_secret(&format!("secret-{id}")),
        expires_in_ms,
        uses,
    }
}

fn add(id: u64, serial: &str) -> Command {
    Command::AddCoordinator {
        id,
        address: format!("c{id}:7000"),
        api_address: String::new(),
        cert_serial: Some(serial.into()),
    }
}

fn holder(w: &World, id: &str) -> Actor {
    w.state.tokens()[id].actor()
}

#[test]
fn a_join_token_admits_one_coordinator_then_is_used_up() {
    let mut w = World::new();
    w.ok(admin(), add(1, "01"));
    w.ok(admin(), limited("j", Role::Join, Some(3_600_000), Some(1)));
    let token = &w.state.tokens()["j"];
    assert_eq!(token.uses_left, Some(1));
    assert_eq!(token.expires_at_ms, Some(w.now + 3_600_000));
    let joiner = holder(&w, "j");
    // Two entries racing with one token: the first applied wins, the second changes nothing.
    w.ok(joiner.clone(), add(2, "02"));
    let e = w.refused(joiner.clone(), add(3, "03"));
    assert!(matches!(e, Error::TokenUsedUp { .. }), "{e}");
    assert_eq!(w.state.tokens()["j"].uses_left, Some(0));
    assert_eq!(w.state.authenticate("secret-j"), None);
    // The use is audited with the token.
    let record = w
        .state
        .audit()
        .iter()
        .rev()
        .find(|a| a.action == "add-coordinator")
        .unwrap_or_else(|| panic!("no audit record"));
    assert_eq!(record.token_id.as_deref(), Some("j"));
    assert!(
        record.detail.contains("token j used, 0 use(s) left"),
        "{}",
        record.detail
    );
}

#[test]
fn a_join_token_expires_by_the_entry_clock() {
    let mut w = World::new();
    // World's clock moves 1 s per command: 1.5 s is past after two commands.
    w.ok(admin(), limited("j", Role::Join, Some(1_500), Some(1)));
    let joiner = holder(&w, "j");
    w.ok(admin(), policy("staging", 0, Role::Approver));
    let e = w.refused(joiner, add(2, "02"));
    assert!(matches!(e, Error::TokenExpired { .. }), "{e}");
    // Applying the same entry again gives the same answer (time comes from the entries).
    let mut again = w.state.clone();
    let entry = Entry {
        actor: holder(&w, "j"),
        now_ms: w.now,
        command: add(2, "02"),
        write_id: None,
    };
    assert!(matches!(
        again.apply(&entry),
        Err(Error::TokenExpired { .. })
    ));
    // An entry stamped before the expiry, applied after the clock passed it, is still late:
    // the state's clock never goes back.
    again
        .apply(&Entry {
            actor: admin(),
            now_ms: w.now,
            command: policy("later", 0, Role::Approver),
            write_id: None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let early = Entry {
        now_ms: w.now - 5_000,
        ..entry
    };
    assert!(matches!(
        again.apply(&early),
        Err(Error::TokenExpired { .. })
    ));
}

#[test]
fn a_join_token_does_nothing_but_join_and_only_it_joins() {
    let mut w = World::new();
    w.ok(admin(), limited("j", Role::Join, Some(60_000), Some(1)));
    let joiner = holder(&w, "j");
    for command in [
        policy("p", 1, Role::Approver),
        Command::RevokeToken { id: "j".into() },
        limited("x", Role::Join, Some(60_000), Some(1)),
        register("m", "1", 1),
    ] {
        let e = w.refused(joiner.clone(), command);
        assert!(
            matches!(
                e,
                Error::Forbidden {
                    role: Role::Join,
                    ..
                }
            ),
            "{e}"
        );
    }
    // The role is outside the hierarchy both ways.
    assert!(!Role::Join.allows(Role::Viewer));
    assert!(!Role::Admin.allows(Role::Join));
    assert!(Role::Join.allows(Role::Join));
    assert!(Role::Admin.allows(Role::Operator));
    // Nothing spent a use.
    assert_eq!(w.state.tokens()["j"].uses_left, Some(1));
}

#[test]
fn join_tokens_must_expire_and_be_single_use() {
    let mut w = World::new();
    for command in [
        Command::CreateToken {
            id: "j".into(),
            name: "j".into(),
            role: Role::Join,
            secret_hash: hash_secret("s"),
        },
        limited("j", Role::Join, None, Some(1)),
        limited("j", Role::Join, Some(60_000), None),
        limited("j", Role::Join, Some(60_000), Some(2)),
        limited("j", Role::Join, Some(8 * 24 * 3_600_000), Some(1)),
        limited("j", Role::Viewer, Some(0), None),
        limited("j", Role::Viewer, None, Some(0)),
    ] {
        let e = w.refused(admin(), command);
        assert!(matches!(e, Error::Invalid { .. }), "{e}");
    }
    let e = w.refused(
        actor("olga", Role::Operator),
        limited("j", Role::Join, Some(60_000), Some(1)),
    );
    assert!(
        matches!(
            e,
            Error::Forbidden {
                needed: Role::Admin,
                ..
            }
        ),
        "{e}"
    );
    // Limits are generic: an operator token good for two commands.
    w.ok(admin(), limited("v", Role::Operator, None, Some(2)));
    let op = holder(&w, "v");
    let join = |id: &str| Command::JoinNode {
        node: node_spec(id, "a", 1000, 0),
    };
    // A refused command spends no use.
    let e = w.refused(op.clone(), Command::SetHeartbeatGrace { grace_ms: 20_000 });
    assert!(matches!(e, Error::Forbidden { .. }), "{e}");
    w.ok(op.clone(), join("n1"));
    w.ok(op.clone(), join("n2"));
    let e = w.refused(op, join("n3"));
    assert!(matches!(e, Error::TokenUsedUp { .. }), "{e}");
}

#[test]
fn a_removed_coordinator_is_revoked_and_its_id_never_comes_back() {
    let mut w = World::new();
    w.ok(admin(), add(1, "01"));
    w.ok(admin(), add(2, "02"));
    w.ok(admin(), add(3, "03"));
    assert_eq!(w.state.next_coordinator_id(), 4);
    w.ok(admin(), Command::RemoveCoordinator { id: 3 });
    let revoked = &w.state.revoked()["coordinator/3"];
    assert_eq!(revoked.serial.as_deref(), Some("03"));
    assert_eq!(revoked.revoked_at_ms, w.now);
    // The highest id was removed: the next one is still above it.
    assert_eq!(w.state.next_coordinator_id(), 4);
    let e = w.refused(admin(), add(3, "33"));
    assert!(matches!(e, Error::CoordinatorRetired { id: 3 }), "{e}");
    let e = w.refused(admin(), add(4, "not hex"));
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    w.ok(admin(), add(4, "04"));
    // The revocation list survives a snapshot.
    let bytes = w.state.snapshot().unwrap_or_else(|e| panic!("{e}"));
    let restored = State::restore(&bytes).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(restored.revoked(), w.state.revoked());
}
