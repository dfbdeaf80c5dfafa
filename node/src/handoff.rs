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
//!   request that makes one slow) holds a worker at most once, until its deadline;
//! - fewer than all but one of the runtime's workers are running guests already, so one worker
//!   always stays free for the node's other connections, whatever a guest does.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
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
}

impl Pace {
    /// Whether the model's recent calls were all quick.
    pub fn quick(&self) -> bool {
        self.hand_off.load(Ordering::Relaxed) == 0
    }

    /// Hand the worker off for the next [`COOL_DOWN`] calls.
    pub fn strike(&self) {
        self.hand_off.store(COOL_DOWN, Ordering::Relaxed);
    }

    fn observe(&self, took: Duration) {
        if took > QUICK {
            self.strike();
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
        if started.elapsed() > SLOW_MAKING {
            pace.strike();
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
/// `alone` says whether it is the node's only request in flight.
pub fn run<T>(pace: &Pace, alone: bool, call: impl FnOnce() -> T) -> (T, Ran) {
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

fn timed<T>(pace: &Pace, call: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = call();
    pace.observe(started.elapsed());
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
        pace.observe(QUICK * 2);
        assert!(!pace.quick());
        for _ in 0..COOL_DOWN - 1 {
            pace.observe(Duration::from_micros(1));
            assert!(!pace.quick());
        }
        pace.observe(Duration::from_micros(1));
        assert!(pace.quick());
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
        assert_eq!(run(&pace, true, || 1).1, Ran::Outside);
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert_eq!(
            current.block_on(async { run(&pace, true, || 1).1 }),
            Ran::Outside
        );
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        multi.block_on(async {
            let pace = Pace::default();
            let (crowded, first, second) = tokio::spawn(async move {
                let crowded = run(&pace, false, || ()).1;
                let (_, first) = run(&pace, true, || std::thread::sleep(QUICK * 2));
                (crowded, first, run(&pace, true, || ()).1)
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
