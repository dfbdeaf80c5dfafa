//! Per-model performance windows for the mesh's reports: counts and HDR histograms of the
//! queue, compute and total latency of the requests finished since the last report.
//!
//! Recording takes a short lock per phase; a report takes the window and starts a new one.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use sophon_mesh::wire;

use wire::{MAX_LATENCY_US as MAX_US, latency_histogram as histogram};

struct Window {
    started: Instant,
    count: u64,
    errors: u64,
    busy_us: u64,
    queue: Histogram<u64>,
    compute: Histogram<u64>,
    total: Histogram<u64>,
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_US)
}

impl Window {
    fn new() -> Window {
        Window {
            started: Instant::now(),
            count: 0,
            errors: 0,
            busy_us: 0,
            queue: histogram(),
            compute: histogram(),
            total: histogram(),
        }
    }
}

/// One model version's window.
pub struct PerfWindow(Mutex<Window>);

impl Default for PerfWindow {
    fn default() -> Self {
        PerfWindow(Mutex::new(Window::new()))
    }
}

impl PerfWindow {
    pub fn queue(&self, d: Duration) {
        let _ = self.0.lock().queue.record(micros(d));
    }

    pub fn compute(&self, d: Duration) {
        let _ = self.0.lock().compute.record(micros(d));
    }

    /// A request finished after `d`, successfully or not.
    pub fn done(&self, d: Duration, ok: bool) {
        let mut w = self.0.lock();
        w.count += 1;
        if !ok {
            w.errors += 1;
        }
        w.busy_us += d.as_micros() as u64;
        let _ = w.total.record(micros(d));
    }

    /// The window so far, as a report; a new window starts.
    pub fn take(&self, model: &str, version: &str) -> wire::PerfReport {
        let w = std::mem::replace(&mut *self.0.lock(), Window::new());
        wire::PerfReport {
            model: model.to_string(),
            version: version.to_string(),
            count: w.count,
            errors: w.errors,
            period_ms: w.started.elapsed().as_millis() as u64,
            queue_us: wire::histogram_pairs(&w.queue),
            compute_us: wire::histogram_pairs(&w.compute),
            total_us: wire::histogram_pairs(&w.total),
            busy_us: w.busy_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_carries_counts_and_histograms_that_merge_back() {
        let w = PerfWindow::default();
        for ms in 1..=100u64 {
            w.queue(Duration::from_micros(10));
            w.compute(Duration::from_millis(ms));
            w.done(Duration::from_millis(ms + 1), ms % 10 != 0);
        }
        let r = w.take("m", "1");
        assert_eq!((r.count, r.errors), (100, 10));
        let mut total = histogram();
        wire::merge_pairs(&mut total, &r.total_us);
        assert_eq!(total.len(), 100);
        let p50 = total.value_at_quantile(0.5);
        assert!((50_000..=52_000).contains(&p50), "{p50}");
        let p99 = total.value_at_quantile(0.99);
        assert!((99_000..=102_000).contains(&p99), "{p99}");
        // The window restarted.
        assert_eq!(w.take("m", "1").count, 0);
    }
}
