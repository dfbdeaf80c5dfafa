//! Cluster tests on the simulated network ([`super::sim`]): elections, leader changes under
//! load, minority partitions, snapshot catch-up, membership changes, leader transfer and
//! ReadIndex.

use std::collections::BTreeSet;

use super::redb_store::RedbLogStore;
use super::sim::Cluster;
use super::store::LogStore;
use crate::{Command, Role};

fn policy(n: u64) -> Command {
    Command::SetPolicy {
        environment: format!("env-{n}"),
        required_approvals: 1,
        approver_role: Role::Approver,
    }
}

fn env(n: u64) -> String {
    format!("env-{n}")
}

fn ids<S: LogStore>(c: &Cluster<S>) -> BTreeSet<u64> {
    c.nodes.keys().copied().collect()
}

/// Whether every replica in `ids` applied the same index and holds byte-identical state.
fn converged<S: LogStore>(c: &Cluster<S>, ids: &BTreeSet<u64>) -> bool {
    let snaps = c.snapshots(ids);
    c.all_applied(ids) && snaps.windows(2).all(|w| w[0] == w[1])
}

fn has_policy<S: LogStore>(c: &Cluster<S>, id: u64, n: u64) -> bool {
    c.nodes[&id].state().policies().contains_key(&env(n))
}

fn partition(c: &mut Cluster, side: &[u64]) {
    let all = ids(c);
    for &a in side {
        for &b in all.iter().filter(|b| !side.contains(b)) {
            c.cut(a, b);
        }
    }
}

#[test]
fn three_replicas_elect_one_leader_and_a_new_one_after_isolation() {
    let mut c = Cluster::new(3, 1, 1000);
    let first = c.elect();
    let term = c.nodes[&first].term();
    let leaders = c.nodes.values().filter(|n| n.is_leader()).count();
    assert_eq!(leaders, 1, "exactly one leader");
    assert!(
        c.run_until(30, |c| c.nodes.values().all(|n| n.leader_id() == first)),
        "followers learn the leader"
    );

    c.isolate(first);
    assert!(
        c.run_until(300, |c| c
            .nodes
            .values()
            .any(|n| n.id() != first && n.is_leader())),
        "the majority elects a new leader"
    );
    let second = c
        .nodes
        .values()
        .find(|n| n.id() != first && n.is_leader())
        .map(|n| n.id())
        .expect("new leader");
    assert!(
        c.nodes[&second].term() > term,
        "the new leader has a higher term"
    );

    c.recover();
    assert!(
        c.run_until(300, |c| {
            let old = &c.nodes[&first];
            !old.is_leader() && c.leader().is_some() && old.leader_id() == c.leader().unwrap_or(0)
        }),
        "the old leader rejoins as a follower"
    );
    assert_eq!(c.nodes.values().filter(|n| n.is_leader()).count(), 1);
}

#[test]
fn leader_change_under_load_keeps_every_committed_entry() {
    let mut c = Cluster::new(3, 7, 1000);
    let first = c.elect();
    let first_term = c.nodes[&first].term();
    let mut committed: BTreeSet<String> = BTreeSet::new();
    let mut accepted_by_new = 0;
    let mut n = 0;
    // One proposal per tick to whoever leads: 20 to the first leader, then it is cut off
    // mid-stream and the stream goes on until a new leader accepted 30 more (raft-rs
    // randomises election timeouts, so how long that takes varies), then the link heals and
    // 20 more follow.
    for step in 0..600 {
        if step == 20 {
            c.isolate(first);
        }
        if accepted_by_new == 30 {
            c.recover();
        }
        if accepted_by_new >= 50 {
            break;
        }
        if let Some(leader) = c.leader()
            && c.propose(leader, policy(n)).is_ok()
            && leader != first
        {
            accepted_by_new += 1;
        }
        n += 1;
        c.tick();
        // What the current leader has applied is what a client was told is committed.
        if let Some(leader) = c.leader() {
            committed.extend(c.nodes[&leader].state().policies().keys().cloned());
        }
    }
    let all = ids(&c);
    assert!(
        c.run_until(500, |c| converged(c, &all)),
        "replicas converge"
    );
    let leader = c.leader().expect("a leader at the end");
    assert!(c.nodes[&leader].term() > first_term, "leadership changed");
    assert!(
        accepted_by_new >= 50,
        "new leaders accepted ({accepted_by_new})"
    );
    let before = (0..20).filter(|&n| committed.contains(&env(n))).count();
    let after = (20..n).filter(|&n| committed.contains(&env(n))).count();
    assert!(before >= 15, "the first leader committed ({before})");
    assert!(after >= 40, "later leaders committed ({after})");
    for id in &all {
        let policies = c.nodes[id].state().policies();
        for name in &committed {
            assert!(policies.contains_key(name), "replica {id} lost {name}");
        }
    }
}

#[test]
fn proposals_on_a_minority_leader_never_commit() {
    let mut c = Cluster::new(5, 3, 1000);
    let old = c.elect();
    let buddy = ids(&c).into_iter().find(|&id| id != old).expect("follower");
    partition(&mut c, &[old, buddy]);
    for n in 0..5 {
        c.propose(old, policy(n))
            .expect("still leader right after the cut");
    }
    assert!(
        c.run_until(300, |c| c
            .nodes
            .values()
            .any(|n| n.id() != old && n.id() != buddy && n.is_leader())),
        "the majority elects its own leader"
    );
    let new = c.leader().expect("majority leader");
    c.propose(new, policy(100))
        .expect("majority leader accepts");
    assert!(c.run_until(50, |c| has_policy(c, new, 100)));
    for _ in 0..50 {
        c.tick();
    }
    for id in ids(&c) {
        for n in 0..5 {
            assert!(
                !has_policy(&c, id, n),
                "minority entry {n} committed on {id}"
            );
        }
    }
    assert!(
        !c.nodes[&old].is_leader(),
        "the minority leader stepped down"
    );

    c.recover();
    let all = ids(&c);
    assert!(c.run_until(300, |c| converged(c, &all)));
    for id in all {
        assert!(has_policy(&c, id, 100));
        assert!((0..5).all(|n| !has_policy(&c, id, n)));
    }
}

#[test]
fn lagging_follower_catches_up_through_a_snapshot() {
    let mut c = Cluster::new(3, 11, 10);
    let leader = c.elect();
    let lagging = ids(&c)
        .into_iter()
        .find(|&id| id != leader)
        .expect("follower");
    c.isolate(lagging);
    let behind = c.nodes[&lagging].applied_index();
    for n in 0..40 {
        c.propose(leader, policy(n)).expect("leader accepts");
        c.tick();
    }
    let store = c.nodes[&leader].store();
    assert!(
        store.snapshot_index() > behind + 1,
        "the leader compacted its log"
    );
    assert!(
        raft::Storage::first_index(store).expect("first index") > behind + 1,
        "the entries the follower needs are gone"
    );

    c.recover();
    let all = ids(&c);
    assert!(
        c.run_until(300, |c| converged(c, &all)),
        "follower catches up"
    );
    assert!((0..40).all(|n| has_policy(&c, lagging, n)));
    let replayed = c.applied[&lagging].len();
    assert!(
        replayed < c.applied[&leader].len(),
        "the follower skipped entries through the snapshot ({replayed} replayed)"
    );
}

#[test]
fn membership_change_adds_then_removes_a_replica() {
    let mut c = Cluster::new(3, 5, 20);
    let leader = c.elect();
    for n in 0..5 {
        c.propose(leader, policy(n)).expect("leader accepts");
    }
    c.add_replica(4);
    c.nodes
        .get_mut(&leader)
        .expect("leader")
        .propose_add_node(4)
        .expect("add node");
    assert!(
        c.run_until(200, |c| c.nodes.values().all(|n| n.voters().contains(&4))),
        "every replica, the new one included, sees 4 as a voter"
    );
    for n in 5..10 {
        c.propose(leader, policy(n)).expect("leader accepts");
    }
    let all = ids(&c);
    assert!(
        c.run_until(200, |c| converged(c, &all)),
        "the new replica caught up"
    );
    assert!((0..10).all(|n| has_policy(&c, 4, n)));

    let removed = all
        .iter()
        .copied()
        .find(|&id| id != leader && id != 4)
        .expect("a follower to remove");
    c.nodes
        .get_mut(&leader)
        .expect("leader")
        .propose_remove_node(removed)
        .expect("remove node");
    let rest: BTreeSet<u64> = all.iter().copied().filter(|&id| id != removed).collect();
    assert!(
        c.run_until(200, |c| rest
            .iter()
            .all(|id| !c.nodes[id].voters().contains(&removed))),
        "the removal is applied"
    );
    c.isolate(removed);
    for n in 10..15 {
        c.propose(leader, policy(n)).expect("leader accepts");
    }
    assert!(
        c.run_until(200, |c| converged(c, &rest)),
        "the cluster keeps committing"
    );
    for id in &rest {
        assert!((0..15).all(|n| has_policy(&c, *id, n)));
    }
}

#[test]
fn leader_transfer_and_read_index() {
    let mut c = Cluster::new(3, 9, 1000);
    let leader = c.elect();
    let follower = ids(&c)
        .into_iter()
        .find(|&id| id != leader)
        .expect("follower");
    assert!(
        c.nodes
            .get_mut(&follower)
            .expect("node")
            .transfer_leader(leader)
            .is_err()
    );
    c.nodes
        .get_mut(&leader)
        .expect("leader")
        .transfer_leader(follower)
        .expect("transfer");
    assert!(
        c.run_until(100, |c| c.leader() == Some(follower)),
        "leadership moves to the transferee"
    );

    c.propose(follower, policy(1)).expect("new leader accepts");
    c.nodes
        .get_mut(&follower)
        .expect("leader")
        .read_index(b"read-1".to_vec());
    assert!(c.run_until(50, |c| {
        c.read_states[&follower]
            .iter()
            .any(|r| r.request_ctx == b"read-1")
    }));
    let read = c.read_states[&follower]
        .iter()
        .find(|r| r.request_ctx == b"read-1")
        .map(|r| r.index)
        .expect("read state");
    assert!(c.run_until(50, |c| c.nodes[&follower].applied_index() >= read));
    assert!(
        has_policy(&c, follower, 1),
        "the read sees the earlier write"
    );
}

#[test]
fn a_follower_refuses_proposals_and_names_the_leader() {
    let mut c = Cluster::new(3, 2, 1000);
    let leader = c.elect();
    assert!(c.run_until(30, |c| c.nodes.values().all(|n| n.leader_id() == leader)));
    let follower = ids(&c)
        .into_iter()
        .find(|&id| id != leader)
        .expect("follower");
    match c.propose(follower, policy(1)) {
        Err(crate::Error::NotLeader { id, leader: named }) => {
            assert_eq!((id, named), (follower, leader));
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }
}

#[test]
fn lossy_and_slow_links_still_converge() {
    let mut c = Cluster::new(3, 13, 15);
    let all = ids(&c);
    for &a in &all {
        for &b in all.iter().filter(|&&b| b != a) {
            c.drop(a, b, 0.2);
        }
    }
    c.delay(1, 2, 3);
    c.delay(3, 1, 2);
    let mut n = 0;
    for _ in 0..400 {
        if let Some(leader) = c.leader()
            && n < 30
            && c.propose(leader, policy(n)).is_ok()
        {
            n += 1;
        }
        c.tick();
    }
    c.recover();
    let ok = c.run_until(300, |c| converged(c, &all));
    let view: Vec<_> = c
        .nodes
        .values()
        .map(|n| (n.id(), n.term(), n.is_leader(), n.applied_index()))
        .collect();
    assert!(
        ok,
        "replicas converge: (id, term, leader, applied) {view:?}"
    );
    let leader = c.leader().expect("leader");
    let committed = c.nodes[&leader].state().policies().len();
    assert!(
        committed > 10,
        "entries commit over a lossy network ({committed})"
    );
}

/// Crashes `id`, restarts it cut off from its peers and checks that it rebuilt, from its own
/// store alone, exactly the state it had applied; then crashes it again and returns its store.
fn crash_and_restart_alone(c: &mut Cluster<RedbLogStore>, id: u64) -> std::path::PathBuf {
    let before = c.nodes[&id].state().snapshot().expect("snapshot");
    let applied = c.nodes[&id].applied_index();
    let path = c.crash(id);
    c.isolate(id);
    c.restart(id, &path);
    c.process();
    let node = &c.nodes[&id];
    assert_eq!(
        node.applied_index(),
        applied,
        "replica {id} replayed its log"
    );
    assert_eq!(
        node.state().snapshot().expect("snapshot"),
        before,
        "replica {id} restored its state from disk"
    );
    c.recover();
    c.crash(id)
}

/// A replica on a durable store is killed (dropped with no shutdown) and reopened from its
/// directory: first a follower, then the leader. Every acknowledged write survives and the
/// restarted replica converges to the same state as the others.
#[test]
fn crashed_replicas_restart_from_their_durable_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A snapshot every 5 entries, so restarts go through both the snapshot and the log replay.
    let mut c = Cluster::durable(3, 7, 5, dir.path());
    let mut acknowledged = Vec::new();
    let mut next = 0;
    let mut commit_some =
        |c: &mut Cluster<RedbLogStore>, acknowledged: &mut Vec<u64>, count: u64| {
            for _ in 0..count {
                let leader = c.elect();
                next += 1;
                c.propose(leader, policy(next))
                    .expect("proposal on the leader");
                assert!(
                    c.run_until(100, |c| has_policy(c, leader, next)),
                    "policy {next} applied on the leader"
                );
                // Applied on the leader: the write is acknowledged to the client.
                acknowledged.push(next);
            }
        };
    commit_some(&mut c, &mut acknowledged, 7);

    let follower = *ids(&c)
        .iter()
        .find(|&&id| Some(id) != c.leader())
        .expect("a follower");
    let path = crash_and_restart_alone(&mut c, follower);
    commit_some(&mut c, &mut acknowledged, 3);
    c.restart(follower, &path);

    let leader = c.elect();
    let path = crash_and_restart_alone(&mut c, leader);
    commit_some(&mut c, &mut acknowledged, 4);
    c.restart(leader, &path);
    commit_some(&mut c, &mut acknowledged, 2);

    let all = ids(&c);
    assert!(
        c.run_until(300, |c| converged(c, &all)),
        "the restarted replicas converge"
    );
    for id in &all {
        for n in &acknowledged {
            assert!(has_policy(&c, *id, *n), "replica {id} kept policy {n}");
        }
    }
}

/// How many audit records say `environment`'s policy was set: how many times that write took
/// effect.
fn times_applied<S: LogStore>(c: &Cluster<S>, id: u64, n: u64) -> usize {
    let target = format!("environment {}", env(n));
    c.nodes[&id]
        .state()
        .audit()
        .iter()
        .filter(|a| a.action == "set-policy" && a.target == target)
        .count()
}

/// The rule the driver used before write ids: a proposal whose index was applied without it
/// being seen was "overwritten, never to commit", so the write path proposed it again.
fn old_rule_proposes_again(index: u64, applied_index: u64) -> bool {
    index <= applied_index
}

/// The double apply, forced: a leader proposes two writes (one without a write id, one with),
/// its followers take them but their answers never reach it, so it never learns they
/// committed; it is cut off, a new leader commits both and compacts its log past them, and the
/// old leader comes back and installs the new leader's snapshot, its applied index jumping
/// past the writes without seeing them.
///
/// The old rule called both lost and proposed them again: the write without an id then takes
/// effect twice. Now their fate is `Unknown` (answered "may have committed", never retried),
/// and even a retry of the write with an id is a no-op.
#[test]
fn a_deposed_leader_that_catches_up_from_a_snapshot_does_not_apply_its_writes_twice() {
    use super::proposals::{Context, Fate, fate};
    use crate::WriteId;

    let mut c = Cluster::new(3, 17, 5);
    let old = c.elect();
    assert!(c.run_until(30, |c| c.nodes.values().all(|n| n.leader_id() == old)));
    let followers: Vec<u64> = ids(&c).into_iter().filter(|&id| id != old).collect();
    for &f in &followers {
        c.drop(f, old, 1.0);
    }
    let incarnation = 0x5eed;
    let ctx = |seq| {
        Context {
            replica: old,
            incarnation,
            seq,
        }
        .encode()
    };
    let write_id = WriteId {
        origin: old,
        incarnation,
        seq: 2,
    };
    let plain = c
        .propose_write(old, ctx(1), policy(1), None)
        .expect("the leader accepts");
    let with_id = c
        .propose_write(old, ctx(2), policy(2), Some(write_id))
        .expect("the leader accepts");
    c.process();
    for &f in &followers {
        assert!(
            c.nodes[&f].last_index() >= with_id,
            "follower {f} has both writes"
        );
    }
    assert!(
        c.nodes[&old].commit_index() < plain,
        "the old leader never learnt that they committed"
    );
    c.isolate(old);

    assert!(
        c.run_until(300, |c| followers.iter().any(|f| c.nodes[f].is_leader())),
        "the majority elects a new leader"
    );
    let new = c.leader().expect("the new leader");
    assert!(
        c.run_until(50, |c| has_policy(c, new, 1) && has_policy(c, new, 2)),
        "the new leader commits both writes"
    );
    for n in 10..30 {
        c.propose(new, policy(n)).expect("the new leader accepts");
        c.tick();
    }
    assert!(
        raft::Storage::first_index(c.nodes[&new].store()).expect("first index") > with_id,
        "the new leader compacted its log past the writes"
    );

    c.recover();
    let all = ids(&c);
    assert!(
        c.run_until(300, |c| converged(c, &all)),
        "the old leader catches up"
    );
    let applied_index = c.nodes[&old].applied_index();
    let seen = &c.seen[&old];
    for index in [plain, with_id] {
        assert!(
            !seen.iter().any(|(i, _)| *i == index),
            "the old leader skipped index {index} through a snapshot"
        );
    }

    // Before: both were "lost", so the write path proposed them again.
    assert!(old_rule_proposes_again(plain, applied_index));
    assert!(old_rule_proposes_again(with_id, applied_index));
    // Now: the old leader cannot tell, and says so.
    assert_eq!(fate(plain, &ctx(1), seen, applied_index), Fate::Unknown);
    assert_eq!(fate(with_id, &ctx(2), seen, applied_index), Fate::Unknown);

    // What proposing them again (on whichever coordinator leads now) does.
    let leader = c.elect();
    c.propose_write(leader, ctx(3), policy(1), None)
        .expect("the leader accepts");
    c.propose_write(leader, ctx(4), policy(2), Some(write_id))
        .expect("the leader accepts");
    assert!(c.run_until(100, |c| converged(c, &all)
        && times_applied(c, leader, 1) == 2));
    for id in &all {
        assert_eq!(
            times_applied(&c, *id, 1),
            2,
            "replica {id}: a write without an id, proposed again, applies twice"
        );
        assert_eq!(
            times_applied(&c, *id, 2),
            1,
            "replica {id}: a write with an id applies once however often it is proposed"
        );
    }
}

/// An entry overwritten by a new leader's entries is `Lost` (the write may be proposed again,
/// it never commits), not `Unknown`: the deposed leader sees what was applied at its index.
#[test]
fn a_proposal_overwritten_by_a_new_leader_is_lost() {
    use super::proposals::{Context, Fate, fate};

    let mut c = Cluster::new(3, 23, 1000);
    let old = c.elect();
    assert!(c.run_until(30, |c| c.nodes.values().all(|n| n.leader_id() == old)));
    c.isolate(old);
    let ctx = Context {
        replica: old,
        incarnation: 1,
        seq: 1,
    }
    .encode();
    let index = c
        .propose_write(old, ctx.clone(), policy(1), None)
        .expect("still leader right after the cut");
    assert!(
        c.run_until(300, |c| c
            .nodes
            .values()
            .any(|n| n.id() != old && n.is_leader())),
        "the majority elects a new leader"
    );
    let new = c.leader().expect("new leader");
    c.propose(new, policy(2)).expect("the new leader accepts");
    c.recover();
    let all = ids(&c);
    assert!(c.run_until(300, |c| converged(c, &all)));
    let seen = &c.seen[&old];
    assert!(seen.iter().any(|(i, _)| *i == index), "no snapshot: seen");
    assert_eq!(
        fate(index, &ctx, seen, c.nodes[&old].applied_index()),
        Fate::Lost
    );
    assert!(all.iter().all(|id| !has_policy(&c, *id, 1)));
}
