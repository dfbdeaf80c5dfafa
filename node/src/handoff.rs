//! Where a guest call runs: on the Tokio worker that holds the request, or on that worker's
//! thread after it handed the worker's other tasks to another thread (`block_in_place`).
//!
//! Handing the worker off costs thread wake-ups and a migration on every request (about 20 µs
//! of a small model's request on two cores), which a call of a few tens of microseconds does
//! not need: Tokio's guidance is that a task may run that long between awaits. A call runs on
//! the worker when three things hold:
//! - the caller says it may (`alone`): the node serves no other request, and the component
//!   imports nothing but wasi-nn (WASI's blocking calls need the hand-off). Under load, the
//!   worker's other tasks (some of which only it may run) would wait behind the guest, which
//!   costs more than the hand-off;
//! - its model's recent calls were all quick: a model whose call took longer than [`QUICK`]
//!   hands the worker off for its next [`COOL_DOWN`] calls, so a slow model (or a hostile
//!   request that makes one slow) holds a worker at most once, until its deadline. The host's
//!   upkeep inside a call (making its instance, dropping it) is judged apart, against the looser
//!   [`SLOW_MAKING`], as upkeep moved after the answer is: otherwise a model handed off would
//!   make its instances inside its calls, and a machine that slows instance making (page
//!   reclaim, a busy `madvise`) would keep it handed off for good;
//! - fewer than all but one of the runtime's workers are running guests already, so one worker
//!   always stays free for the node's other connections, whatever a guest does.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The longest call that keeps its model's next calls on the worker. Well above a small
/// model's call (tens of µs), so that a preemption on a busy machine does not count as slow.
pub const QUICK: Duration = Duration::from_millis(1);
/// How many of a model's calls after a slow one hand the worker off.
pub const COOL_DOWN: u32 = 256;

/// Guest calls running on Tokio workers now, across the process.
static ON_WORKERS: AtomicUsize = AtomicUsize::new(0);

/// One model's recent pace.
#[derive(Debug, Default)]
pub struct Pace {
    /// Calls left before this model's calls may run on the worker again.
    hand_off: AtomicU32,
    /// Strikes so far, and the length of the last one's slow part in µs: what a test or an
    /// operator reads to learn why a model runs handed off.
    strikes: AtomicU64,
    last_strike_us: AtomicU64,
}

/// Why a model was struck: which part of its work ran slow, and how long it took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slow {
    /// The guest's call, longer than [`QUICK`].
    Call(Duration),
    /// The host's upkeep (making or dropping an instance), longer than [`SLOW_MAKING`].
    Upkeep(Duration),
}

impl Pace {
    /// Whether the model's recent calls were all quick.
    pub fn quick(&self) -> bool {
        self.hand_off.load(Ordering::Relaxed) == 0
    }

    /// Hand the worker off for the next [`COOL_DOWN`] calls, because of `slow`.
    pub fn strike(&self, slow: Slow) {
        self.hand_off.store(COOL_DOWN, Ordering::Relaxed);
        let took = match slow {
            Slow::Call(t) | Slow::Upkeep(t) => t,
        };
        self.strikes.fetch_add(1, Ordering::Relaxed);
        self.last_strike_us
            .store(took.as_micros() as u64, Ordering::Relaxed);
        tracing::debug!(
            ?slow,
            "a slow model call: its next calls hand the worker off"
        );
    }

    /// How many times the model was struck, and how long the last strike's slow part took.
    pub fn strikes(&self) -> (u64, Duration) {
        (
            self.strikes.load(Ordering::Relaxed),
            Duration::from_micros(self.last_strike_us.load(Ordering::Relaxed)),
        )
    }

    /// Count one call whose guest part took `call` and the host's upkeep inside it `upkeep`.
    fn observe(&self, call: Duration, upkeep: Duration) {
        if call > QUICK {
            self.strike(Slow::Call(call));
        } else if upkeep > SLOW_MAKING {
            self.strike(Slow::Upkeep(upkeep));
        } else {
            // A lost update between racing calls only shortens or lengthens the cool-down by one.
            let left = self.hand_off.load(Ordering::Relaxed);
            if left > 0 {
                self.hand_off.store(left - 1, Ordering::Relaxed);
            }
        }
    }
}

/// An instance whose making took longer than this (a component's start function runs then)
/// makes its model hand the worker off as a slow call does. Looser than [`QUICK`]: the first
/// use of a pool slot costs more than a call, and a miss here only delays detection.
pub const SLOW_MAKING: Duration = Duration::from_millis(5);

/// Run `upkeep` (making a model's next instance) on this worker once the current task yields,
/// that is after the connection's task has written its response: a task spawned from a worker
/// lands in its LIFO slot. It runs only while the model is quick and a worker slot is free, as a
/// call would; otherwise it is dropped unrun. Upkeep over [`SLOW_MAKING`] makes the model slow.
pub fn after_answer(pace: std::sync::Arc<Pace>, upkeep: impl FnOnce() + Send + 'static) {
    tokio::spawn(async move {
        if !pace.quick() {
            return;
        }
        let Some(_slot) = workers().and_then(WorkerSlot::take) else {
            return;
        };
        let started = Instant::now();
        upkeep();
        let took = started.elapsed();
        if took > SLOW_MAKING {
            pace.strike(Slow::Upkeep(took));
        }
    });
}

/// The workers of the multi-threaded Tokio runtime this thread is in, if it is in one.
fn workers() -> Option<usize> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            Some(h.metrics().num_workers())
        }
        _ => None,
    }
}

/// Run `work`, a piece of the host's own work that may take long (milliseconds), handing the
/// worker's other tasks to another thread first where the runtime allows it.
pub fn long<T>(work: impl FnOnce() -> T) -> T {
    match workers() {
        Some(_) => tokio::task::block_in_place(work),
        None => work(),
    }
}

/// Where [`run`] ran a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ran {
    /// On the Tokio worker, without handing it off.
    OnWorker,
    /// After `block_in_place` handed the worker's other tasks to another thread.
    HandedOff,
    /// Outside a multi-threaded Tokio runtime, on the caller's thread.
    Outside,
}

/// Run a guest call `call` for a model with pace `pace`, on the worker or handing it off;
/// `alone` says whether it is the node's only request in flight. `call` adds to the duration it
/// is handed the time it spent on the host's upkeep (making and dropping its instance), which
/// is judged against [`SLOW_MAKING`] and the rest of the call against [`QUICK`].
pub fn run<T>(pace: &Pace, alone: bool, call: impl FnOnce(&mut Duration) -> T) -> (T, Ran) {
    // `block_in_place` is refused on a current-thread runtime, and outside any runtime there
    // is nothing to hand off.
    let Some(workers) = workers() else {
        return (timed(pace, call), Ran::Outside);
    };
    if alone
        && pace.quick()
        && let Some(_slot) = WorkerSlot::take(workers)
    {
        return (timed(pace, call), Ran::OnWorker);
    }
    (
        tokio::task::block_in_place(|| timed(pace, call)),
        Ran::HandedOff,
    )
}

fn timed<T>(pace: &Pace, call: impl FnOnce(&mut Duration) -> T) -> T {
    let started = Instant::now();
    let mut upkeep = Duration::ZERO;
    let out = call(&mut upkeep);
    let took = started.elapsed();
    let upkeep = upkeep.min(took);
    pace.observe(took - upkeep, upkeep);
    out
}

/// A guest call counted in [`ON_WORKERS`] while it lives.
struct WorkerSlot;

impl WorkerSlot {
    /// A slot, if fewer than `workers - 1` guest calls run on workers now.
    fn take(workers: usize) -> Option<WorkerSlot> {
        let allowed = workers.saturating_sub(1);
        ON_WORKERS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < allowed).then_some(n + 1)
            })
            .ok()
            .map(|_| WorkerSlot)
    }
}

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        ON_WORKERS.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_call_hands_off_the_next_ones_until_the_cool_down_ends() {
        let pace = Pace::default();
        assert!(pace.quick());
        pace.observe(QUICK * 2, Duration::ZERO);
        assert!(!pace.quick());
        assert_eq!(pace.strikes(), (1, QUICK * 2));
        for _ in 0..COOL_DOWN - 1 {
            pace.observe(Duration::from_micros(1), Duration::ZERO);
            assert!(!pace.quick());
        }
        pace.observe(Duration::from_micros(1), Duration::ZERO);
        assert!(pace.quick());
    }

    #[test]
    fn upkeep_inside_a_call_is_judged_apart_from_the_call() {
        let pace = Pace::default();
        // Making an instance inside the call (no spare was ready) may take longer than a quick
        // call: a model handed off makes its instances there, and must be able to come back.
        pace.observe(Duration::from_micros(10), QUICK * 3);
        assert!(
            pace.quick(),
            "upkeep under SLOW_MAKING keeps the model quick"
        );
        pace.observe(Duration::from_micros(10), SLOW_MAKING * 2);
        assert!(!pace.quick(), "upkeep over SLOW_MAKING strikes");
        assert_eq!(pace.strikes(), (1, SLOW_MAKING * 2));
        let pace = Pace::default();
        let (_, ran) = run(&pace, true, |upkeep| {
            std::thread::sleep(QUICK * 2);
            *upkeep += QUICK * 2;
        });
        assert_eq!(ran, Ran::Outside);
        assert!(pace.quick(), "a call that was all upkeep is quick");
        run(&pace, true, |upkeep| {
            std::thread::sleep(QUICK * 2);
            *upkeep += QUICK * 10;
        });
        assert!(
            pace.quick(),
            "upkeep reported past the call's length counts as the whole call"
        );
        run(&pace, true, |_| std::thread::sleep(QUICK * 2));
        assert!(!pace.quick(), "a slow guest call strikes");
    }

    #[test]
    fn one_worker_always_stays_free_of_guests() {
        let _guard = SERIAL.lock().expect("serial");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(3)
            .build()
            .expect("runtime");
        rt.block_on(async {
            let a = WorkerSlot::take(3).expect("first of three");
            let b = WorkerSlot::take(3).expect("second of three");
            assert!(WorkerSlot::take(3).is_none(), "the third worker stays free");
            drop(a);
            let c = WorkerSlot::take(3).expect("a slot came back");
            drop((b, c));
            assert!(
                WorkerSlot::take(1).is_none(),
                "a lone worker never runs guests"
            );
        });
    }

    #[test]
    fn calls_run_where_their_pace_and_the_runtime_allow() {
        let _guard = SERIAL.lock().expect("serial");
        let pace = Pace::default();
        assert_eq!(run(&pace, true, |_| 1).1, Ran::Outside);
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert_eq!(
            current.block_on(async { run(&pace, true, |_| 1).1 }),
            Ran::Outside
        );
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        multi.block_on(async {
            let pace = Pace::default();
            let (crowded, first, second) = tokio::spawn(async move {
                let crowded = run(&pace, false, |_| ()).1;
                let (_, first) = run(&pace, true, |_| std::thread::sleep(QUICK * 2));
                (crowded, first, run(&pace, true, |_| ()).1)
            })
            .await
            .expect("task");
            assert_eq!(
                crowded,
                Ran::HandedOff,
                "under load the worker is handed off"
            );
            assert_eq!(
                first,
                Ran::OnWorker,
                "a quick model's lone call stays on the worker"
            );
            assert_eq!(
                second,
                Ran::HandedOff,
                "after a slow call the worker is handed off"
            );
        });
    }

    /// The tests share the process-wide count.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
}
