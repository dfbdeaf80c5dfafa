//! Who made a proposal or a ReadIndex request ([`Context`]), and what became of a proposal once
//! the applied index reached its log index ([`fate`]): pure, so that the driver's decision is
//! tested on its own and in the simulated cluster.
//!
//! # Why the fate of a proposal matters
//! The write path proposes a write again when its first attempt is certain never to commit.
//! A proposal whose index was applied holding *another* entry is such a case: an entry lives at
//! one index only, so it can never commit anywhere. A proposal whose index was passed while
//! this replica installed a snapshot is not: the snapshot may well contain it (a deposed leader
//! that was cut off before it learnt the commit, then caught up from the new leader's
//! snapshot). Proposing that one again would apply the write twice, so it is answered like a
//! timeout: it may have committed.

/// The context a coordinator attaches to its proposals and ReadIndex requests, to recognise
/// them when they come back: the replica, the process (an incarnation drawn at each start, so
/// that an answer to a previous process never reaches a waiter of this one) and a sequence
/// number that restarts with each process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Context {
    pub replica: u64,
    pub incarnation: u64,
    pub seq: u64,
}

impl Context {
    /// The bytes raft carries: the three numbers, big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut ctx = Vec::with_capacity(24);
        ctx.extend_from_slice(&self.replica.to_be_bytes());
        ctx.extend_from_slice(&self.incarnation.to_be_bytes());
        ctx.extend_from_slice(&self.seq.to_be_bytes());
        ctx
    }

    /// Reads [`Context::encode`]'s bytes back (`None` for anything else, like the empty
    /// context of the bootstrap's entries or an older process's 16-byte one).
    pub fn decode(bytes: &[u8]) -> Option<Context> {
        let bytes: &[u8; 24] = bytes.try_into().ok()?;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_be_bytes(w)
        };
        Some(Context {
            replica: word(0),
            incarnation: word(1),
            seq: word(2),
        })
    }
}

impl Context {
    /// The sequence number in `bytes` if replica `replica` made it in process `incarnation`
    /// (an entry or ReadIndex answer meant for a previous process matches nothing).
    pub fn seq_if_ours(bytes: &[u8], replica: u64, incarnation: u64) -> Option<u64> {
        let ctx = Context::decode(bytes)?;
        (ctx.replica == replica && ctx.incarnation == incarnation).then_some(ctx.seq)
    }
}

/// What became of a proposal, as far as the replica that made it can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Its index is not applied yet.
    Pending,
    /// It was applied here (its result came with the applied entry).
    Applied,
    /// Another entry was applied at its index: it will never commit, anywhere, so the write
    /// may be proposed again.
    Lost,
    /// Its index was applied without this replica seeing the entry there (a snapshot from the
    /// leader skipped it): it may or may not have committed. Never propose it again blindly.
    Unknown,
}

/// The fate of a proposal appended at `index` with context `ctx`, after a ready turn that
/// applied `entries` (every entry of the turn, normal, empty or membership change, as
/// `(index, context)`, see [`ReadyOutput::entries`](super::ReadyOutput::entries)) and left
/// the applied index at `applied_index`.
///
/// Called after every turn for every proposal still waiting, so an index passed in an earlier
/// turn cannot be missed: the proposal was decided then.
pub fn fate(index: u64, ctx: &[u8], entries: &[(u64, Vec<u8>)], applied_index: u64) -> Fate {
    if let Some((_, seen)) = entries.iter().find(|(i, _)| *i == index) {
        return if seen.as_slice() == ctx {
            Fate::Applied
        } else {
            Fate::Lost
        };
    }
    if index > applied_index {
        Fate::Pending
    } else {
        Fate::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(seq: u64) -> Vec<u8> {
        Context {
            replica: 1,
            incarnation: 9,
            seq,
        }
        .encode()
    }

    #[test]
    fn a_context_round_trips_and_nothing_else_decodes() {
        let c = Context {
            replica: 3,
            incarnation: u64::MAX,
            seq: 42,
        };
        assert_eq!(Context::decode(&c.encode()), Some(c));
        assert_eq!(Context::decode(&[]), None);
        assert_eq!(Context::decode(&[0; 16]), None, "the old (id, seq) layout");
        assert_eq!(Context::decode(&[0; 25]), None);
    }

    #[test]
    fn only_this_process_s_contexts_are_ours() {
        let c = Context {
            replica: 3,
            incarnation: 77,
            seq: 5,
        }
        .encode();
        assert_eq!(Context::seq_if_ours(&c, 3, 77), Some(5));
        assert_eq!(Context::seq_if_ours(&c, 3, 76), None, "a previous process");
        assert_eq!(Context::seq_if_ours(&c, 2, 77), None, "another replica");
        let mut old = 3u64.to_be_bytes().to_vec();
        old.extend_from_slice(&5u64.to_be_bytes());
        assert_eq!(
            Context::seq_if_ours(&old, 3, 77),
            None,
            "the old (id, seq) layout"
        );
    }

    #[test]
    fn the_fate_of_a_proposal_follows_what_was_applied_at_its_index() {
        let mine = ctx(1);
        // Nothing applied up to it yet.
        assert_eq!(fate(5, &mine, &[(4, ctx(7))], 4), Fate::Pending);
        // Applied with its own context.
        assert_eq!(fate(5, &mine, &[(5, mine.clone())], 5), Fate::Applied);
        // Another proposal of ours, another replica's, or a new leader's empty entry there.
        assert_eq!(fate(5, &mine, &[(5, ctx(2))], 5), Fate::Lost);
        let other = Context {
            replica: 2,
            incarnation: 9,
            seq: 1,
        }
        .encode();
        assert_eq!(fate(5, &mine, &[(5, other)], 6), Fate::Lost);
        assert_eq!(fate(5, &mine, &[(5, Vec::new())], 5), Fate::Lost);
        // The same sequence number from a previous process is not ours.
        let previous = Context {
            replica: 1,
            incarnation: 8,
            seq: 1,
        }
        .encode();
        assert_eq!(fate(5, &mine, &[(5, previous)], 5), Fate::Lost);
        // Passed by a snapshot: the entries applied start after it.
        assert_eq!(fate(5, &mine, &[(9, ctx(3))], 9), Fate::Unknown);
        assert_eq!(fate(5, &mine, &[], 8), Fate::Unknown);
    }
}
