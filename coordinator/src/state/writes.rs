//! The write ids already applied, so that a write committed twice (a retry after its first
//! attempt's fate was misjudged, a forward that raced a leader change) changes the state once.
//!
//! # What is kept, and for how long
//! For each origin coordinator (the one that took the write from its client), the last
//! [`WRITE_IDS_PER_ORIGIN`] write ids it got applied, with the outcome each one had, oldest
//! first; at most [`MAX_ORIGINS`] origins, the one whose newest write is the oldest going first.
//! Eviction depends only on the order entries are applied in, so every replica keeps the same
//! table, and the table is part of the snapshot.
//!
//! An origin proposes a write again only while the write's first attempt is still in flight
//! (its client waits at most a few seconds), so the window only has to cover the writes the
//! same origin gets applied meanwhile. A write that fails to apply leaves no record (a failed
//! apply changes nothing at all), so a second attempt is judged afresh: it cannot apply twice,
//! because the first attempt had no effect.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::command::{Outcome, WriteId};

/// How many applied write ids are kept per origin coordinator.
pub const WRITE_IDS_PER_ORIGIN: usize = 1024;

/// How many origin coordinators' write ids are kept.
pub const MAX_ORIGINS: usize = 64;

/// One applied write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedWrite {
    pub incarnation: u64,
    pub seq: u64,
    /// The table's counter when it was recorded (orders the origins for eviction).
    pub at: u64,
    /// What the write's apply returned; a duplicate answers it again.
    pub outcome: Outcome,
}

/// The write ids applied, by origin coordinator; see the module page.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedWrites {
    /// Writes recorded so far (never decreases).
    count: u64,
    /// By origin: its latest writes, oldest first.
    origins: BTreeMap<u64, VecDeque<AppliedWrite>>,
}

impl AppliedWrites {
    /// The outcome `id` had, if it was applied (and not forgotten since).
    pub fn get(&self, id: &WriteId) -> Option<&Outcome> {
        self.origins
            .get(&id.origin)?
            .iter()
            .rev()
            .find(|w| w.incarnation == id.incarnation && w.seq == id.seq)
            .map(|w| &w.outcome)
    }

    /// Records that `id` was applied with `outcome`, forgetting the oldest ids past the bounds.
    pub fn record(&mut self, id: WriteId, outcome: Outcome) {
        self.count += 1;
        let writes = self.origins.entry(id.origin).or_default();
        writes.push_back(AppliedWrite {
            incarnation: id.incarnation,
            seq: id.seq,
            at: self.count,
            outcome,
        });
        while writes.len() > WRITE_IDS_PER_ORIGIN {
            writes.pop_front();
        }
        while self.origins.len() > MAX_ORIGINS {
            let stalest = self
                .origins
                .iter()
                .min_by_key(|(_, w)| w.back().map_or(0, |w| w.at))
                .map(|(origin, _)| *origin);
            match stalest {
                Some(origin) => self.origins.remove(&origin),
                None => break,
            };
        }
    }

    /// How many write ids are remembered.
    pub fn len(&self) -> usize {
        self.origins.values().map(VecDeque::len).sum()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.origins.values().all(VecDeque::is_empty)
    }

    /// The table's invariants: within the bounds, each origin's writes in recording order and
    /// never ahead of the counter, no write id twice.
    pub fn check(&self) -> Result<(), String> {
        if self.origins.len() > MAX_ORIGINS {
            return Err(format!(
                "{} origins' write ids are kept, more than {MAX_ORIGINS}",
                self.origins.len()
            ));
        }
        for (origin, writes) in &self.origins {
            if writes.is_empty() || writes.len() > WRITE_IDS_PER_ORIGIN {
                return Err(format!(
                    "origin {origin} keeps {} write ids (1 to {WRITE_IDS_PER_ORIGIN})",
                    writes.len()
                ));
            }
            let mut ids = std::collections::BTreeSet::new();
            let mut previous = 0;
            for w in writes {
                if w.at <= previous || w.at > self.count {
                    return Err(format!("origin {origin}'s write ids are out of order"));
                }
                previous = w.at;
                if !ids.insert((w.incarnation, w.seq)) {
                    return Err(format!(
                        "origin {origin}'s write {}/{} is recorded twice",
                        w.incarnation, w.seq
                    ));
                }
            }
        }
        Ok(())
    }
}
