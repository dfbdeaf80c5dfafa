//! A linearizability checker for histories of reads and writes on independent registers.
//!
//! Tests record every register operation their clients perform as an [`Op`]: who did it, on
//! which key, what was written or observed, and the interval `[call, ret]` in which it ran (any
//! monotonic clock, one unit for the whole history). [`check`] then decides whether some order
//! of the operations explains every observation while respecting real time: each operation
//! takes effect atomically at one instant inside its interval, and a read returns the value of
//! the latest write before it (`None` before the first write).
//!
//! # Outcomes
//!
//! A client does not always learn whether its write took effect (a timeout, a lost connection,
//! a leader that died mid-request). Such a write is recorded with [`Outcome::Unknown`]: it may
//! take effect at any instant after its call, however late, or never; its `ret` is ignored.
//! Reads with an unknown outcome tell nothing and are simply not recorded (if one is, it is
//! ignored).
//!
//! # Algorithm
//!
//! Keys are independent registers, and a history is linearizable exactly when the history of
//! each key is (Herlihy & Wing's locality, "P-compositionality" in Porcupine), so each key is
//! checked on its own. Per key this is the search of Wing & Gong with Lowe's memoization, as
//! in Porcupine: the calls and returns are laid out in time order in a doubly linked list; the
//! search repeatedly linearizes one operation whose call has been seen before the first pending
//! return, lifting its events out of the list, and backtracks when it reaches the return of an
//! operation it has not linearized. A cache of visited configurations (the set of linearized
//! operations and the register value) keeps it from exploring the same configuration twice.
//!
//! Four register-specific reductions keep the search small:
//! - a read that observes the register's current value is linearized at once, without
//!   trying alternatives: placing it later could not help any other op;
//! - an unknown write whose value no read observed is dropped: had it taken effect, no read
//!   would have seen it, so leaving it out changes nothing;
//! - an unknown write is only ever linearized immediately before a read that observes its
//!   value. Any linearization can be brought into that form (move the write later, to just
//!   before the first read that sees it, or drop it if none does), so no order is lost, and
//!   the search is spared from trying every optional write at every step;
//! - of several pending unknown writes of the same value only the first is tried: all have
//!   been called and none is ever due, so they are interchangeable.
//!
//! The cache stores a linearized set compactly: every operation whose return lies before the
//! first pending return is necessarily linearized, so only that position and the few
//! linearized operations beyond it are kept.
//!
//! The search is exponential in the worst case; [`check`] gives up with `Err` once its time
//! budget is spent, which callers report as inconclusive rather than as a failure of the
//! system under test.

// Each test binary includes this file with `#[path]` and uses only part of its API.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// What an operation did to its register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// Wrote this value.
    Write(u64),
    /// Observed this value; `None` means the register had never been written.
    Read(Option<u64>),
}

/// Whether the client learned the result of its operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The operation completed (a read returned, a write was acknowledged).
    Ok,
    /// The client never learned whether the write took effect. It may take effect at any time
    /// after `call`, or never; `ret` is ignored.
    Unknown,
}

/// One operation of one client on one register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub client: u64,
    pub key: String,
    pub kind: OpKind,
    /// When the client issued the operation.
    pub call: u64,
    /// When the client saw its result (ignored for [`Outcome::Unknown`]).
    pub ret: u64,
    pub outcome: Outcome,
}

/// The operations of a test run, in any order.
#[derive(Clone, Debug, Default)]
pub struct History {
    ops: Vec<Op>,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }
}

/// The answer of [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// The operations on `key` cannot be ordered; `explanation` lists the operations involved
    /// (numbered by their position in the history) and where every order gets stuck.
    NotLinearizable {
        key: String,
        explanation: String,
    },
}

/// Checks that `history` is linearizable, one key at a time.
///
/// Returns `Err` when an operation is malformed (returns before its call) or when the search
/// has not finished within `budget`: the result is then inconclusive.
pub fn check(history: &History, budget: Duration) -> Result<Verdict, String> {
    let deadline = Instant::now() + budget;
    let mut keys: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, op) in history.ops.iter().enumerate() {
        if op.outcome == Outcome::Ok && op.ret < op.call {
            return Err(format!(
                "op #{index} on key {:?} returns at {} before its call at {}: record call and ret \
                 from one monotonic clock",
                op.key, op.ret, op.call
            ));
        }
        keys.entry(op.key.as_str()).or_default().push(index);
    }
    for (key, indices) in keys {
        let register = Register::new(history, key, &indices);
        if let Some(explanation) = register.check(deadline, budget)? {
            return Ok(Verdict::NotLinearizable {
                key: key.to_string(),
                explanation,
            });
        }
    }
    Ok(Verdict::Linearizable)
}

/// End of a linked list, and "no event".
const NIL: u32 = u32::MAX;
/// How many search steps run between two looks at the clock.
const CLOCK_EVERY: u64 = 1024;
/// How many operations of the longest linearization an explanation shows.
const EXPLAIN_TAIL: usize = 10;

/// One operation of the key under check, numbered by its rank: the completed operations in
/// the order of their returns (so the first return left in the event list is always the
/// lowest-ranked operation not yet linearized), then the unknown writes.
struct RegisterOp {
    /// Position in the [`History`], for explanations.
    index: usize,
    client: u64,
    kind: OpKind,
    call: u64,
    /// `None` for an unknown write.
    ret: Option<u64>,
}

impl RegisterOp {
    fn describe(&self) -> String {
        let what = match self.kind {
            OpKind::Write(v) => format!("write {v}"),
            OpKind::Read(Some(v)) => format!("read -> {v}"),
            OpKind::Read(None) => "read -> none".to_string(),
        };
        let ret = match self.ret {
            Some(ret) => ret.to_string(),
            None => "unknown outcome".to_string(),
        };
        format!(
            "#{} client {}: {what} [{}, {ret}]",
            self.index, self.client, self.call
        )
    }
}

/// A step of the search: linearize one completed operation, or an unknown write immediately
/// followed by a read that observes it.
#[derive(Clone, Copy)]
enum Move {
    One(u32),
    Pair { write: u32, read: u32 },
}

/// A configuration on the search stack.
struct Frame {
    /// The moves available from it, in the order the search tries them.
    moves: Vec<Move>,
    next: usize,
    /// The move that led here, and the register value before it (`None` at the root).
    via: Option<(Move, Option<u64>)>,
}

/// A visited configuration: every operation ranked below `frontier` is linearized, `ahead`
/// lists the linearized ones from it on, and the register holds `value`.
#[derive(PartialEq, Eq, Hash)]
struct Visited {
    frontier: u32,
    ahead: Box<[u32]>,
    value: Option<u64>,
}

/// The furthest the search got, for the explanation.
struct Furthest {
    linearized: usize,
    /// The last moves of that linearization.
    tail: Vec<Move>,
    value: Option<u64>,
    /// The operation whose return could not be passed (`None` if stuck with no return left).
    blocked_by: Option<u32>,
    /// The operations called but not linearized at that point.
    pending: Vec<u32>,
}

/// The history of one key, with the event list the search walks.
struct Register<'h> {
    key: &'h str,
    ops: Vec<RegisterOp>,
    /// Operations dropped before the search (unknown writes no read observed), for the record.
    dropped: usize,
    /// How many operations have [`Outcome::Ok`] (ranks `0..completed`).
    completed: usize,
    /// Event list: entry 0 is the head; entries `1..` are calls and returns in time order.
    event_op: Vec<u32>,
    event_is_return: Vec<bool>,
    next: Vec<u32>,
    prev: Vec<u32>,
    call_event: Vec<u32>,
    /// `NIL` for unknown writes.
    return_event: Vec<u32>,
}

impl<'h> Register<'h> {
    fn new(history: &'h History, key: &'h str, indices: &[usize]) -> Register<'h> {
        let observed: HashSet<u64> = indices
            .iter()
            .filter_map(|&i| match history.ops[i].kind {
                OpKind::Read(Some(v)) if history.ops[i].outcome == Outcome::Ok => Some(v),
                _ => None,
            })
            .collect();
        let mut completed = Vec::new();
        let mut unknown = Vec::new();
        let mut dropped = 0;
        for &index in indices {
            let op = &history.ops[index];
            let register_op = |ret| RegisterOp {
                index,
                client: op.client,
                kind: op.kind,
                call: op.call,
                ret,
            };
            match (op.outcome, op.kind) {
                (Outcome::Ok, _) => completed.push(register_op(Some(op.ret))),
                (Outcome::Unknown, OpKind::Write(v)) if observed.contains(&v) => {
                    unknown.push(register_op(None))
                }
                (Outcome::Unknown, _) => dropped += 1,
            }
        }
        completed.sort_by_key(|op| (op.ret, op.call, op.index));
        unknown.sort_by_key(|op| (op.call, op.index));
        let completed_count = completed.len();
        let mut ops = completed;
        ops.extend(unknown);

        // Events in time order; at equal times calls come first, so operations that touch are
        // concurrent (the permissive reading, as in Porcupine). Returns keep rank order.
        let mut events: Vec<(u64, bool, u32)> = Vec::with_capacity(2 * ops.len());
        for (id, op) in ops.iter().enumerate() {
            events.push((op.call, false, id as u32));
            if let Some(ret) = op.ret {
                events.push((ret, true, id as u32));
            }
        }
        events.sort_unstable();
        let count = events.len() + 1;
        let ops_count = ops.len();
        let mut register = Register {
            key,
            ops,
            dropped,
            completed: completed_count,
            event_op: vec![NIL; count],
            event_is_return: vec![false; count],
            next: (1..=count as u32)
                .map(|n| if n as usize == count { NIL } else { n })
                .collect(),
            prev: (0..count as u32).map(|n| n.wrapping_sub(1)).collect(),
            call_event: vec![NIL; ops_count],
            return_event: vec![NIL; ops_count],
        };
        register.prev[0] = NIL;
        for (position, &(_, is_return, id)) in events.iter().enumerate() {
            let event = position as u32 + 1;
            register.event_op[event as usize] = id;
            register.event_is_return[event as usize] = is_return;
            if is_return {
                register.return_event[id as usize] = event;
            } else {
                register.call_event[id as usize] = event;
            }
        }
        register
    }

    /// `Ok(None)` when linearizable, `Ok(Some(explanation))` when not.
    fn check(mut self, deadline: Instant, budget: Duration) -> Result<Option<String>, String> {
        if let Some(explanation) = self.value_never_written() {
            return Ok(Some(explanation));
        }
        let mut linearized = vec![0u64; self.ops.len().div_ceil(64)];
        let mut linearized_count = 0usize;
        let mut completed_linearized = 0usize;
        let mut value: Option<u64> = None;
        let mut visited: HashSet<Visited> = HashSet::new();
        let (pending, blocked_by) = self.frontier();
        let mut furthest = Furthest {
            linearized: 0,
            tail: Vec::new(),
            value,
            blocked_by,
            pending: pending.clone(),
        };
        let mut stack = vec![Frame {
            moves: self.moves(&pending, value),
            next: 0,
            via: None,
        }];
        let mut steps = 0u64;

        while completed_linearized < self.completed {
            steps += 1;
            if steps.is_multiple_of(CLOCK_EVERY) && Instant::now() > deadline {
                return Err(format!(
                    "inconclusive: the search on key {:?} ({} ops) ran out of its {budget:?} budget after {steps} \
                     steps and {} visited configurations",
                    self.key,
                    self.ops.len(),
                    visited.len()
                ));
            }
            let Some(top) = stack.last_mut() else { break };
            if let Some(&step) = top.moves.get(top.next) {
                top.next += 1;
                let before = value;
                let after = match step {
                    Move::One(id) | Move::Pair { write: id, .. } => {
                        match self.ops[id as usize].kind {
                            OpKind::Write(v) => Some(v),
                            OpKind::Read(_) => value,
                        }
                    }
                };
                self.apply(step, &mut linearized);
                let (pending, blocked_by) = self.frontier();
                let frontier = blocked_by.unwrap_or(self.completed as u32);
                let configuration = Visited {
                    frontier,
                    ahead: ahead_of(
                        &linearized,
                        frontier,
                        linearized_count + step.len() - frontier as usize,
                    ),
                    value: after,
                };
                if visited.insert(configuration) {
                    value = after;
                    linearized_count += step.len();
                    completed_linearized += self.completed_in(step);
                    stack.push(Frame {
                        moves: self.moves(&pending, value),
                        next: 0,
                        via: Some((step, before)),
                    });
                    if linearized_count > furthest.linearized {
                        furthest = Furthest {
                            linearized: linearized_count,
                            tail: last_moves(&stack),
                            value,
                            blocked_by,
                            pending,
                        };
                    }
                } else {
                    self.undo(step, &mut linearized);
                }
            } else {
                let Some(frame) = stack.pop() else { break };
                let Some((step, before)) = frame.via else {
                    break;
                };
                self.undo(step, &mut linearized);
                value = before;
                linearized_count -= step.len();
                completed_linearized -= self.completed_in(step);
            }
        }
        if completed_linearized == self.completed {
            return Ok(None);
        }
        Ok(Some(self.explain(furthest)))
    }

    /// A read that observes a value no write on this key ever wrote can never be explained.
    fn value_never_written(&self) -> Option<String> {
        let written: HashSet<u64> = self
            .ops
            .iter()
            .filter_map(|op| match op.kind {
                OpKind::Write(v) => Some(v),
                OpKind::Read(_) => None,
            })
            .collect();
        let op = self
            .ops
            .iter()
            .find(|op| matches!(op.kind, OpKind::Read(Some(v)) if !written.contains(&v)))?;
        let OpKind::Read(Some(v)) = op.kind else {
            return None;
        };
        Some(format!(
            "key {:?}: a read observed {v}, which no write on this key ever wrote:\n  {}\n",
            self.key,
            op.describe()
        ))
    }

    /// Walks the event list from its head up to the first return: the operations called so
    /// far and not linearized, and the operation whose return comes first (if any).
    fn frontier(&self) -> (Vec<u32>, Option<u32>) {
        let mut pending = Vec::new();
        let mut event = self.next[0];
        while event != NIL {
            let id = self.event_op[event as usize];
            if self.event_is_return[event as usize] {
                return (pending, Some(id));
            }
            pending.push(id);
            event = self.next[event as usize];
        }
        (pending, None)
    }

    /// The moves available with `pending` called and the register holding `value`, in the
    /// order of the calls.
    ///
    /// A pending read that observes the current value is the only move worth trying: taking
    /// it now leaves the register as it is and every other op free, so any order that takes
    /// it later can take it now instead.
    fn moves(&self, pending: &[u32], value: Option<u64>) -> Vec<Move> {
        let forced = pending.iter().find(|&&id| {
            let op = &self.ops[id as usize];
            op.ret.is_some() && op.kind == OpKind::Read(value)
        });
        if let Some(&read) = forced {
            return vec![Move::One(read)];
        }
        let mut moves = Vec::new();
        for &id in pending {
            let op = &self.ops[id as usize];
            match op.kind {
                // An unknown write only goes in front of a read that observes it (below).
                OpKind::Write(_) if op.ret.is_none() => {}
                OpKind::Write(_) => moves.push(Move::One(id)),
                OpKind::Read(None) => {}
                // Pending unknown writes of one value are interchangeable (all called, none
                // ever due), so trying the first of them is enough.
                OpKind::Read(Some(observed)) => {
                    let unknown_write = pending.iter().find(|&&write| {
                        let candidate = &self.ops[write as usize];
                        candidate.ret.is_none() && candidate.kind == OpKind::Write(observed)
                    });
                    if let Some(&write) = unknown_write {
                        moves.push(Move::Pair { write, read: id });
                    }
                }
            }
        }
        moves
    }

    fn apply(&mut self, step: Move, linearized: &mut [u64]) {
        match step {
            Move::One(id) => self.lift(id, linearized),
            Move::Pair { write, read } => {
                self.lift(write, linearized);
                self.lift(read, linearized);
            }
        }
    }

    /// Exactly reverses [`Register::apply`]: the linked list is restored in reverse order.
    fn undo(&mut self, step: Move, linearized: &mut [u64]) {
        match step {
            Move::One(id) => self.unlift(id, linearized),
            Move::Pair { write, read } => {
                self.unlift(read, linearized);
                self.unlift(write, linearized);
            }
        }
    }

    fn completed_in(&self, step: Move) -> usize {
        let completed = |id: u32| usize::from((id as usize) < self.completed);
        match step {
            Move::One(id) => completed(id),
            Move::Pair { write, read } => completed(write) + completed(read),
        }
    }

    fn lift(&mut self, id: u32, linearized: &mut [u64]) {
        linearized[id as usize / 64] |= 1 << (id % 64);
        self.unlink(self.call_event[id as usize]);
        let ret = self.return_event[id as usize];
        if ret != NIL {
            self.unlink(ret);
        }
    }

    fn unlift(&mut self, id: u32, linearized: &mut [u64]) {
        linearized[id as usize / 64] &= !(1 << (id % 64));
        let ret = self.return_event[id as usize];
        if ret != NIL {
            self.relink(ret);
        }
        self.relink(self.call_event[id as usize]);
    }

    fn unlink(&mut self, event: u32) {
        let (prev, next) = (self.prev[event as usize], self.next[event as usize]);
        self.next[prev as usize] = next;
        if next != NIL {
            self.prev[next as usize] = prev;
        }
    }

    fn relink(&mut self, event: u32) {
        let (prev, next) = (self.prev[event as usize], self.next[event as usize]);
        self.next[prev as usize] = event;
        if next != NIL {
            self.prev[next as usize] = event;
        }
    }

    fn explain(&self, furthest: Furthest) -> String {
        let mut out = String::new();
        let describe = |id: u32| self.ops[id as usize].describe();
        let _ = writeln!(
            out,
            "key {:?}: no order of its {} ops explains every observation (ops are numbered by their \
             position in the history; [call, ret]).",
            self.key,
            self.ops.len() + self.dropped
        );
        if self.dropped > 0 {
            let _ = writeln!(
                out,
                "({} unknown-outcome ops whose values no read observed are left out: they change nothing.)",
                self.dropped
            );
        }
        match furthest.blocked_by {
            Some(id) => {
                let _ = writeln!(
                    out,
                    "Every order gets stuck before this op returns:\n  {}",
                    describe(id)
                );
            }
            None => {
                let _ = writeln!(out, "Every order gets stuck with these ops still to place.");
            }
        }
        let _ = writeln!(
            out,
            "The longest order found places {} ops; its last ones:",
            furthest.linearized
        );
        for &step in &furthest.tail {
            match step {
                Move::One(id) => {
                    let _ = writeln!(out, "  {}", describe(id));
                }
                Move::Pair { write, read } => {
                    let _ = writeln!(out, "  {}\n  {}", describe(write), describe(read));
                }
            }
        }
        let shown = match furthest.value {
            Some(v) => v.to_string(),
            None => "none".to_string(),
        };
        let _ = writeln!(
            out,
            "after which the register holds {shown}, and none of the ops running then can go next:"
        );
        for &id in &furthest.pending {
            let _ = writeln!(out, "  {}", describe(id));
        }
        if let Some(OpKind::Read(Some(v))) =
            furthest.blocked_by.map(|id| self.ops[id as usize].kind)
        {
            let writes: Vec<String> = self
                .ops
                .iter()
                .filter(|op| op.kind == OpKind::Write(v))
                .map(RegisterOp::describe)
                .collect();
            let _ = writeln!(out, "Writes of {v} on this key:");
            for write in writes {
                let _ = writeln!(out, "  {write}");
            }
        }
        out
    }
}

impl Move {
    /// How many operations the move linearizes.
    fn len(self) -> usize {
        match self {
            Move::One(_) => 1,
            Move::Pair { .. } => 2,
        }
    }
}

/// The last moves on the search stack, oldest first.
fn last_moves(stack: &[Frame]) -> Vec<Move> {
    let mut moves: Vec<Move> = stack
        .iter()
        .rev()
        .filter_map(|frame| frame.via.map(|(step, _)| step))
        .take(EXPLAIN_TAIL)
        .collect();
    moves.reverse();
    moves
}

/// The set bits of `linearized` from `frontier` on; there are exactly `count` of them, as all
/// the bits below `frontier` are set.
fn ahead_of(linearized: &[u64], frontier: u32, count: usize) -> Box<[u32]> {
    let mut ahead = Vec::with_capacity(count);
    let mut word = frontier as usize / 64;
    while ahead.len() < count && word < linearized.len() {
        let mut bits = linearized[word];
        if word == frontier as usize / 64 {
            bits &= !0u64 << (frontier % 64);
        }
        while bits != 0 {
            ahead.push((word * 64) as u32 + bits.trailing_zeros());
            bits &= bits - 1;
        }
        word += 1;
    }
    ahead.into_boxed_slice()
}

#[cfg(test)]
#[path = "linearizability_tests.rs"]
mod tests;
