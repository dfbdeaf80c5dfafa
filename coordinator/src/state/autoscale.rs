//! Autoscaling, as Knative's KPA does it: each deployment may carry bounds and a target
//! concurrency per replica, and the leader sizes it from the concurrency the nodes measure
//! (Little's law over each report: the time requests spent at the node over the period).
//!
//! The replicated part is here: the bounds ([`Autoscale`]) and the [`Scaling`] decision, a
//! pure function of the averages over a stable window and a panic window. The leader
//! (`server/autoscale.rs`) keeps the samples and commits each change as `Autoscale`, with the
//! figures behind it, so every resize is audited.
//!
//! **Scale to zero**: with `min_replicas = 0` a deployment that served no request for
//! `scale_to_zero_after_ms` goes to zero replicas. A request for it is held at the node that
//! receives it while the node asks the leader to activate it (one replica, or `min_replicas`).

use serde::{Deserialize, Serialize};

use super::deployments::MAX_REPLICAS;
use crate::error::{Result, invalid};

/// A deployment's autoscaling bounds and targets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Autoscale {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Requests in flight per replica the autoscaler aims at, in thousandths.
    pub target_concurrency_milli: u32,
    /// The average that decides in steady state (Knative: 60 s).
    pub stable_window_ms: u64,
    /// The short average that scales up at once in a burst (Knative: 6 s).
    pub panic_window_ms: u64,
    /// The panic window's wish, in percent of the replicas, that starts panic mode (200).
    pub panic_threshold_pct: u32,
    /// With `min_replicas = 0`: go to zero after this long without a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero_after_ms: Option<u64>,
}

pub const DEFAULT_STABLE_WINDOW_MS: u64 = 60_000;
pub const DEFAULT_PANIC_WINDOW_MS: u64 = 6_000;
pub const DEFAULT_PANIC_THRESHOLD_PCT: u32 = 200;
pub const DEFAULT_SCALE_TO_ZERO_AFTER_MS: u64 = 300_000;

impl Autoscale {
    pub fn check(&self) -> Result<()> {
        if self.max_replicas == 0 || self.max_replicas > MAX_REPLICAS {
            return Err(invalid(
                "max_replicas",
                self.max_replicas.to_string(),
                format!("between 1 and {MAX_REPLICAS}"),
            ));
        }
        if self.min_replicas > self.max_replicas {
            return Err(invalid(
                "min_replicas",
                self.min_replicas.to_string(),
                format!("at most max_replicas ({})", self.max_replicas),
            ));
        }
        if self.target_concurrency_milli == 0 || self.target_concurrency_milli > 10_000_000 {
            return Err(invalid(
                "target_concurrency",
                format!("{}", f64::from(self.target_concurrency_milli) / 1000.0),
                "above 0 and at most 10000 requests in flight per replica",
            ));
        }
        if !(1_000..=3_600_000).contains(&self.stable_window_ms) {
            return Err(invalid(
                "stable_window_ms",
                self.stable_window_ms.to_string(),
                "from 1 s to 1 h",
            ));
        }
        if self.panic_window_ms == 0 || self.panic_window_ms > self.stable_window_ms {
            return Err(invalid(
                "panic_window_ms",
                self.panic_window_ms.to_string(),
                "above 0 and at most the stable window",
            ));
        }
        if self.panic_threshold_pct < 110 {
            return Err(invalid(
                "panic_threshold_pct",
                self.panic_threshold_pct.to_string(),
                "at least 110 (%)",
            ));
        }
        match self.scale_to_zero_after_ms {
            Some(ms) if self.min_replicas > 0 => Err(invalid(
                "scale_to_zero_after_ms",
                ms.to_string(),
                "only with min_replicas 0",
            )),
            Some(ms) if !(1_000..=7 * 86_400_000).contains(&ms) => Err(invalid(
                "scale_to_zero_after_ms",
                ms.to_string(),
                "from 1 s to 7 days",
            )),
            _ => Ok(()),
        }
    }

    /// The replicas an activation starts: `min_replicas`, at least one.
    pub fn activation(&self) -> u32 {
        self.min_replicas.max(1)
    }

    /// The idle time that scales to zero (`None`: never).
    pub fn zero_after_ms(&self) -> Option<u64> {
        (self.min_replicas == 0).then_some(
            self.scale_to_zero_after_ms
                .unwrap_or(DEFAULT_SCALE_TO_ZERO_AFTER_MS),
        )
    }
}

/// What the leader observed for one deployment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// Average requests in flight over the stable window and over the panic window.
    pub stable: f64,
    pub panic: f64,
    /// How long the samples reach back (a new leader has less than a window).
    pub history_ms: u64,
    /// Since the last request was seen (`None`: not within what this leader saw).
    pub idle_ms: u64,
    /// Panic mode is on (since a burst, for a stable window).
    pub panicking: bool,
}

/// The autoscaler's wish for a deployment now, and why; `None` to stay.
pub fn decide(a: &Autoscale, replicas: u32, seen: &Observed) -> Option<(u32, String)> {
    let target = f64::from(a.target_concurrency_milli) / 1000.0;
    let want = |avg: f64| (avg / target).ceil().min(f64::from(MAX_REPLICAS)) as u32;
    let (stable, panic) = (want(seen.stable), want(seen.panic));
    let floor = a.min_replicas;
    let mut desired;
    let mut why;
    if seen.panicking {
        desired = replicas.max(panic);
        why = format!(
            "panic mode: {:.2} in flight over the panic window, target {target} per replica",
            seen.panic
        );
    } else {
        desired = stable;
        why = format!(
            "{:.2} in flight over the stable window, target {target} per replica",
            seen.stable
        );
    }
    desired = desired.clamp(floor, a.max_replicas);
    // A deployment that served a request lately keeps a replica even at min 0.
    if desired == 0 {
        if replicas == 0 {
            // At zero, a request activates it (through its node), not the averages.
            return None;
        }
        match a.zero_after_ms() {
            Some(after) if seen.idle_ms >= after && seen.history_ms >= after => {
                why = format!("no request for {} s: scaled to zero", seen.idle_ms / 1000);
            }
            _ => desired = 1,
        }
    }
    // Scale down only on a full stable window (a new leader waits for one).
    if desired < replicas && seen.history_ms < a.stable_window_ms {
        return None;
    }
    (desired != replicas).then_some((desired, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kpa(min: u32, max: u32, target: f64) -> Autoscale {
        Autoscale {
            min_replicas: min,
            max_replicas: max,
            target_concurrency_milli: (target * 1000.0) as u32,
            stable_window_ms: 60_000,
            panic_window_ms: 6_000,
            panic_threshold_pct: 200,
            scale_to_zero_after_ms: None,
        }
    }

    fn seen(stable: f64, panic: f64, idle_ms: u64) -> Observed {
        Observed {
            stable,
            panic,
            history_ms: 600_000,
            idle_ms,
            panicking: false,
        }
    }

    #[test]
    fn the_stable_average_sizes_the_deployment_within_its_bounds() {
        let a = kpa(1, 10, 2.0);
        assert_eq!(decide(&a, 1, &seen(7.0, 7.0, 0)).map(|d| d.0), Some(4));
        assert_eq!(decide(&a, 4, &seen(7.0, 7.0, 0)), None);
        assert_eq!(decide(&a, 4, &seen(1.0, 1.0, 0)).map(|d| d.0), Some(1));
        assert_eq!(decide(&a, 4, &seen(100.0, 100.0, 0)).map(|d| d.0), Some(10));
        // A new leader does not scale down before it saw a whole stable window.
        let young = Observed {
            history_ms: 5_000,
            ..seen(1.0, 1.0, 0)
        };
        assert_eq!(decide(&a, 4, &young), None);
        assert_eq!(decide(&a, 1, &young.clone()), None);
    }

    #[test]
    fn panic_mode_scales_up_on_the_short_window_and_never_down() {
        let a = kpa(1, 20, 1.0);
        let burst = Observed {
            panicking: true,
            ..seen(2.0, 12.0, 0)
        };
        let (n, why) = decide(&a, 3, &burst).expect("up");
        assert_eq!(n, 12);
        assert!(why.contains("panic"), "{why}");
        let calm = Observed {
            panicking: true,
            ..seen(2.0, 1.0, 0)
        };
        assert_eq!(decide(&a, 12, &calm), None);
    }

    #[test]
    fn min_zero_scales_to_zero_only_after_the_idle_time() {
        let mut a = kpa(0, 5, 1.0);
        a.scale_to_zero_after_ms = Some(60_000);
        a.check().expect("valid");
        assert_eq!(decide(&a, 2, &seen(0.0, 0.0, 10_000)).map(|d| d.0), Some(1));
        let (n, why) = decide(&a, 1, &seen(0.0, 0.0, 61_000)).expect("to zero");
        assert_eq!(n, 0);
        assert!(why.contains("scaled to zero"), "{why}");
        assert_eq!(decide(&a, 0, &seen(0.0, 0.0, 61_000)), None);
        // Traffic while at zero comes through an activation; the autoscaler then keeps it.
        assert_eq!(decide(&a, 1, &seen(0.3, 0.3, 0)), None);
        assert_eq!(a.activation(), 1);
    }

    #[test]
    fn bounds_are_checked() {
        assert!(kpa(0, 0, 1.0).check().is_err());
        assert!(kpa(3, 2, 1.0).check().is_err());
        assert!(kpa(1, 2, 0.0).check().is_err());
        let mut a = kpa(1, 2, 1.0);
        a.scale_to_zero_after_ms = Some(60_000);
        assert!(a.check().is_err(), "scale to zero needs min 0");
        let mut a = kpa(0, 2, 1.0);
        a.panic_window_ms = 120_000;
        assert!(a.check().is_err());
    }
}
