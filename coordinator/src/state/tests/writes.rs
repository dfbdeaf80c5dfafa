//! Write ids: an entry whose write id was applied changes nothing and answers the first
//! outcome; the table is replicated state (snapshots keep it) and bounded.

use super::*;
use crate::command::{Created, WriteId};
use crate::state::writes::{MAX_ORIGINS, WRITE_IDS_PER_ORIGIN};

fn id(origin: u64, seq: u64) -> WriteId {
    WriteId {
        origin,
        incarnation: 7,
        seq,
    }
}

impl World {
    /// Applies `command` as `actor` carrying `write_id`.
    fn write(&mut self, actor: Actor, command: Command, write_id: WriteId) -> Result<Outcome> {
        self.now += 1000;
        self.state.apply(&Entry {
            actor,
            now_ms: self.now,
            command,
            write_id: Some(write_id),
        })
    }

    fn bytes(&self) -> String {
        serde_json::to_string(&self.state).expect("the state serializes")
    }
}

fn operator() -> Actor {
    actor("olga", Role::Operator)
}

#[test]
fn a_write_applied_twice_changes_the_state_once_and_answers_its_first_outcome() {
    let mut w = World::with_shelf();
    let deploy = deploy("fraud", "1", "staging", 1);
    let first = w
        .write(operator(), deploy.clone(), id(1, 1))
        .expect("the deployment is created");
    assert_eq!(first.created, Some(Created::Deployment(1)));
    let once = w.bytes();

    // The same write again, later, as a retry would carry it: a no-op with the same answer.
    let again = w
        .write(operator(), deploy.clone(), id(1, 1))
        .expect("a duplicate succeeds");
    assert_eq!(again, first);
    assert_eq!(w.bytes(), once, "the duplicate changed the state");
    assert_eq!(w.state.deployments().len(), 1);

    // Under another id it is another write, judged on its own: refused, the deployment exists.
    let other = w
        .write(operator(), deploy, id(1, 2))
        .expect_err("a second deployment of the same version");
    assert!(matches!(other, Error::DeploymentExists { .. }), "{other}");

    // A write that is not idempotent by nature: the audit log shows each time it took effect.
    let audit = w.state.audit().len();
    let set = policy("staging", 1, Role::Approver);
    w.write(admin(), set.clone(), id(1, 3)).expect("applied");
    w.write(admin(), set.clone(), id(1, 3)).expect("duplicate");
    assert_eq!(
        w.state.audit().len(),
        audit + 1,
        "the same id took effect once"
    );
    w.write(admin(), set, id(1, 4)).expect("applied");
    assert_eq!(
        w.state.audit().len(),
        audit + 2,
        "another id is another write"
    );
    w.state.check_invariants().expect("invariants hold");
}

#[test]
fn a_duplicate_is_answered_even_after_its_actor_lost_the_right() {
    let mut w = World::with_shelf();
    let (token, secret) = ("t-1".to_string(), "sph_secret".to_string());
    w.ok(
        admin(),
        Command::CreateToken {
            id: token.clone(),
            name: "olga".into(),
            role: Role::Operator,
            secret_hash: crate::hash_secret(&secret),
        },
    );
    let olga = w.state.authenticate(&secret).expect("the token is valid");
    let first = w
        .write(olga.clone(), deploy("fraud", "1", "staging", 1), id(1, 1))
        .expect("created");
    w.ok(admin(), Command::RevokeToken { id: token });
    let before = w.bytes();
    let again = w
        .write(olga, deploy("fraud", "1", "staging", 1), id(1, 1))
        .expect("the write already took effect: its duplicate is answered, not refused");
    assert_eq!(again, first);
    assert_eq!(w.bytes(), before);
}

#[test]
fn a_failed_write_leaves_no_record_so_its_retry_is_judged_afresh() {
    let mut w = World::with_shelf();
    let deploy = deploy("fraud", "1", "qa", 1);
    let before = w.bytes();
    w.write(operator(), deploy.clone(), id(1, 1))
        .expect_err("no policy for qa yet");
    assert_eq!(w.bytes(), before, "a failed write changed the state");
    assert!(w.state.applied_writes().is_empty());
    w.ok(admin(), policy("qa", 0, Role::Approver));
    let outcome = w
        .write(operator(), deploy, id(1, 1))
        .expect("the first attempt had no effect: this one applies");
    assert_eq!(outcome.created, Some(Created::Deployment(1)));
    assert_eq!(w.state.applied_writes().len(), 1);
}

#[test]
fn snapshots_keep_the_applied_write_ids() {
    let mut w = World::with_shelf();
    let deploy = deploy("fraud", "1", "staging", 1);
    let first = w
        .write(operator(), deploy.clone(), id(2, 9))
        .expect("created");
    let bytes = w.state.snapshot().expect("snapshot");
    let restored = State::restore(&bytes).expect("restore");
    assert_eq!(restored, w.state);
    assert_eq!(restored.applied_writes().len(), 1);

    // The duplicate reaches a replica that caught up from the snapshot: still a no-op.
    let mut w2 = World {
        state: restored,
        now: w.now,
    };
    let before = w2.bytes();
    let again = w2.write(operator(), deploy, id(2, 9)).expect("duplicate");
    assert_eq!(again, first);
    assert_eq!(w2.bytes(), before);

    // A snapshot from before write ids restores with an empty table.
    let mut old: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    old.as_object_mut().expect("an object").remove("writes");
    let old = serde_json::to_vec(&old).expect("json");
    let restored = State::restore(&old).expect("an old snapshot restores");
    assert!(restored.applied_writes().is_empty());
}

#[test]
fn the_applied_write_ids_are_bounded_per_origin_and_in_origins() {
    let mut w = World::new();
    let n = WRITE_IDS_PER_ORIGIN as u64;
    for seq in 1..=n + 1 {
        w.write(
            admin(),
            policy(&format!("e{seq}"), 0, Role::Approver),
            id(1, seq),
        )
        .expect("applied");
    }
    assert_eq!(w.state.applied_writes().len(), WRITE_IDS_PER_ORIGIN);
    // The oldest id is forgotten: that write would take effect again.
    let audit = w.state.audit().len();
    w.write(admin(), policy("e1", 0, Role::Approver), id(1, 1))
        .expect("applied");
    assert_eq!(w.state.audit().len(), audit + 1, "id 1 was forgotten");
    // The next one is still known.
    // Recording it again pushed out id 2; id 3 is still known.
    w.write(admin(), policy("e3", 0, Role::Approver), id(1, 3))
        .expect("duplicate");
    assert_eq!(w.state.audit().len(), audit + 1, "id 3 is remembered");
    assert_eq!(w.state.applied_writes().len(), WRITE_IDS_PER_ORIGIN);

    // One write from each of more origins than are kept: the stalest origin goes.
    for origin in 2..=MAX_ORIGINS as u64 + 1 {
        w.write(admin(), policy("e0", 1, Role::Approver), id(origin, 1))
            .expect("applied");
    }
    assert!(
        w.state.applied_writes().get(&id(1, 3)).is_none(),
        "origin 1 went"
    );
    assert!(w.state.applied_writes().get(&id(2, 1)).is_some());
    assert_eq!(
        w.state.applied_writes().len(),
        MAX_ORIGINS,
        "one write per kept origin"
    );
    w.state.check_invariants().expect("invariants hold");
}
