//! Canary releases with automatic analysis.
//!
//! A canary is a rolling update that stops on the way: the new revision gets a share of the
//! traffic (a step's weight, in percent), decided at the router, while the serving revision keeps
//! all its replicas. The new revision runs `⌈replicas × weight / 100⌉` replicas (at least one).
//! At each step the leader merges the performance reports of both revisions since the step
//! began and [`judge`]s them against the SLO and against each other; its verdict is committed
//! as a command ([`Verdict`]), with the figures behind it, so every decision is replicated and
//! audited. After the last step the canary is promoted: it becomes a plain rolling update, which
//! completes once the new revision has all its replicas ready.
//!
//! With `mirror`, the weight is the share of requests *copied* to the canary; clients always get
//! the serving revision's answer (a shadow), and the promotion moves the traffic at the end.
//!
//! The judgement is a pure function of the figures, so the rules are tested here, and the leader
//! that applies them only gathers the figures and proposes.

use serde::{Deserialize, Serialize};

use crate::error::{Result, invalid};

/// The most steps a canary may take.
pub const MAX_STEPS: usize = 20;

/// Service-level objectives a canary must meet, each a strict upper bound.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slo {
    /// Median latency at the node (queue and compute), in µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<u64>,
    /// 99th percentile latency at the node, in µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<u64>,
    /// Failed requests, in basis points of all requests (1 % = 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors_bp: Option<u32>,
}

/// The SLO when none is given: fewer than 1 % of requests fail.
pub const DEFAULT_SLO: &str = "errors<1%";

fn parse_duration_us(text: &str) -> Option<u64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("µs") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    let v: f64 = number.trim().parse().ok()?;
    (v.is_finite() && v > 0.0 && v * scale <= 3.6e9).then(|| (v * scale).round() as u64)
}

impl Slo {
    /// Parses `p99<50ms,p50<10ms,errors<1%`: latencies in `us`, `ms` or `s`, errors in percent.
    pub fn parse(text: &str) -> Result<Slo> {
        let bad = |why: String| invalid("slo", text, why);
        let mut slo = Slo::default();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((metric, bound)) = item.split_once('<') else {
                return Err(bad(format!(
                    "`{item}`: write each objective as metric<bound, like p99<50ms or errors<1%"
                )));
            };
            let (metric, bound) = (metric.trim(), bound.trim());
            match metric {
                "p50" | "p99" => {
                    let us = parse_duration_us(bound).ok_or_else(|| {
                        bad(format!(
                            "`{bound}`: a latency bound is a positive duration like 50ms, 800us or 1s"
                        ))
                    })?;
                    if metric == "p50" {
                        slo.p50_us = Some(us);
                    } else {
                        slo.p99_us = Some(us);
                    }
                }
                "errors" => {
                    let pct: f64 = bound
                        .strip_suffix('%')
                        .and_then(|p| p.trim().parse().ok())
                        .filter(|p: &f64| p.is_finite() && *p > 0.0 && *p <= 100.0)
                        .ok_or_else(|| {
                            bad(format!(
                                "`{bound}`: an error bound is a percentage above 0, like 1% or 0.5%"
                            ))
                        })?;
                    slo.errors_bp = Some((pct * 100.0).round().max(1.0) as u32);
                }
                other => {
                    return Err(bad(format!(
                        "`{other}` is not a metric; use p50, p99 or errors"
                    )));
                }
            }
        }
        if slo == Slo::default() {
            return Err(bad("give at least one objective, like errors<1%".into()));
        }
        Ok(slo)
    }
}

impl std::fmt::Display for Slo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(us) = self.p50_us {
            parts.push(format!("p50<{}", micros(us)));
        }
        if let Some(us) = self.p99_us {
            parts.push(format!("p99<{}", micros(us)));
        }
        if let Some(bp) = self.errors_bp {
            parts.push(format!("errors<{}", percent(bp)));
        }
        f.write_str(&parts.join(","))
    }
}

/// `1.2 ms`, `850 µs`.
fn micros(us: u64) -> String {
    if us >= 1000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{us}us")
    }
}

fn percent(bp: u32) -> String {
    format!("{}%", f64::from(bp) / 100.0)
}

/// What a canary asks for, as given (validated by [`CanarySpec::check`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanarySpec {
    /// Traffic weights in percent, rising, each 1–100.
    pub steps: Vec<u32>,
    /// How long each step runs before it is judged.
    pub interval_ms: u64,
    pub slo: Slo,
    /// Copy the weight's share of requests to the canary instead of answering with it.
    #[serde(default)]
    pub mirror: bool,
    /// The fewest canary requests a step needs to be judged.
    pub min_requests: u64,
    /// How much slower than the serving revision the canary's median may be, in percent
    /// (200: twice as slow).
    pub max_slowdown_pct: u32,
}

/// Defaults for [`CanarySpec`].
pub const DEFAULT_STEPS: [u32; 4] = [5, 25, 50, 100];
pub const DEFAULT_INTERVAL_MS: u64 = 30_000;
pub const DEFAULT_MIN_REQUESTS: u64 = 20;
pub const DEFAULT_MAX_SLOWDOWN_PCT: u32 = 200;

impl CanarySpec {
    pub fn check(&self) -> Result<()> {
        let steps = self
            .steps
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            return Err(invalid(
                "steps",
                steps,
                format!("give 1 to {MAX_STEPS} traffic weights, like 5,25,50,100"),
            ));
        }
        if self.steps.iter().any(|w| !(1..=100).contains(w))
            || self.steps.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(invalid(
                "steps",
                steps,
                "weights are percentages from 1 to 100, each above the one before",
            ));
        }
        if !(1_000..=86_400_000).contains(&self.interval_ms) {
            return Err(invalid(
                "interval_ms",
                self.interval_ms.to_string(),
                "a step lasts from 1 s to 24 h",
            ));
        }
        if self.min_requests == 0 || self.min_requests > 1_000_000 {
            return Err(invalid(
                "min_requests",
                self.min_requests.to_string(),
                "between 1 and 1000000",
            ));
        }
        if !(100..=10_000).contains(&self.max_slowdown_pct) {
            return Err(invalid(
                "max_slowdown",
                format!("{}", f64::from(self.max_slowdown_pct) / 100.0),
                "a factor from 1 to 100",
            ));
        }
        Ok(())
    }
}

/// A canary in progress (part of its rolling [`Update`](super::deployments::Update)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    #[serde(flatten)]
    pub spec: CanarySpec,
    /// The step running, an index into `steps`.
    pub step: u32,
    pub step_started_at_ms: u64,
}

impl Canary {
    pub fn new(spec: CanarySpec, now: u64) -> Canary {
        Canary {
            spec,
            step: 0,
            step_started_at_ms: now,
        }
    }

    /// The running step's weight, in percent.
    pub fn weight(&self) -> u32 {
        self.spec
            .steps
            .get(self.step as usize)
            .copied()
            .unwrap_or(100)
    }

    pub fn last_step(&self) -> bool {
        self.step as usize + 1 >= self.spec.steps.len()
    }

    /// How many replicas the canary runs for `replicas` of the serving revision.
    pub fn replicas(&self, replicas: u32) -> u32 {
        let share = u64::from(replicas) * u64::from(self.weight());
        (share.div_ceil(100) as u32).clamp(1, replicas.max(1))
    }
}

/// One revision's performance over a step, merged across the nodes that serve it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    pub requests: u64,
    pub errors: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<u64>,
}

impl Figures {
    /// Failed requests in basis points (`None`: no request).
    pub fn errors_bp(&self) -> Option<u32> {
        (self.requests > 0).then(|| (self.errors * 10_000 / self.requests) as u32)
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} requests", self.requests)?;
        if let Some(bp) = self.errors_bp() {
            write!(f, ", {} errors", percent(bp))?;
        }
        if let (Some(p50), Some(p99)) = (self.p50_us, self.p99_us) {
            write!(f, ", p50 {} p99 {}", micros(p50), micros(p99))?;
        }
        Ok(())
    }
}

/// What a step's judgement decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The step passed: the next weight.
    Advance,
    /// The last step passed (or an operator said so): the canary takes all the traffic.
    Promote,
    /// The canary breached the SLO or fell behind the serving revision: it goes.
    Rollback,
    /// Too few requests to judge: the step starts again.
    Hold,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Advance => "advance",
            Verdict::Promote => "promote",
            Verdict::Rollback => "rollback",
            Verdict::Hold => "hold",
        }
    }
}

/// One decision on a canary, kept in its revision's history and written to the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub at_ms: u64,
    /// The step judged (an index) and its weight.
    pub step: u32,
    pub weight: u32,
    pub verdict: Verdict,
    /// Who decided: the leader's analysis (`coordinator-N`) or an operator.
    pub by: String,
    pub canary: Figures,
    pub stable: Figures,
    pub reason: String,
}

/// Judges a step: `None` while it runs on, else the verdict and why.
///
/// - A **breach** rolls back at once, without waiting for the interval's end, as soon as the
///   canary has served `min_requests`: an SLO bound reached (errors, p50 or p99), or a median
///   above `max_slowdown` times the serving revision's and at least [`SLOWDOWN_FLOOR_US`] above
///   it (when that one has served `min_requests` in the same time).
/// - At the interval's end a step with fewer than `min_requests` canary requests **holds** (it
///   starts again); otherwise it **advances**, or **promotes** after the last step.
pub fn judge(
    c: &Canary,
    canary: &Figures,
    stable: &Figures,
    elapsed_ms: u64,
) -> Option<(Verdict, String)> {
    let enough = canary.requests >= c.spec.min_requests;
    if enough && let Some(why) = breach(c, canary, stable) {
        return Some((Verdict::Rollback, why));
    }
    if elapsed_ms < c.spec.interval_ms {
        return None;
    }
    if !enough {
        return Some((
            Verdict::Hold,
            format!(
                "{} canary requests in {} s, fewer than the {} a judgement needs; the step starts again",
                canary.requests,
                elapsed_ms / 1000,
                c.spec.min_requests
            ),
        ));
    }
    let verdict = if c.last_step() {
        Verdict::Promote
    } else {
        Verdict::Advance
    };
    Some((
        verdict,
        format!(
            "step {} ({}%) met {} and kept within {}× the serving revision's median",
            c.step + 1,
            c.weight(),
            c.spec.slo,
            f64::from(c.spec.max_slowdown_pct) / 100.0
        ),
    ))
}

/// A canary's median counts as slower than the serving revision's only when it is also this
/// much slower in absolute terms: scheduling jitter on a busy host moves sub-millisecond medians
/// by more than their own size.
pub const SLOWDOWN_FLOOR_US: u64 = 200;

fn breach(c: &Canary, canary: &Figures, stable: &Figures) -> Option<String> {
    let slo = &c.spec.slo;
    let mut why = Vec::new();
    if let (Some(max), Some(bp)) = (slo.errors_bp, canary.errors_bp())
        && bp >= max
    {
        why.push(format!("errors {} ≥ {}", percent(bp), percent(max)));
    }
    for (name, bound, got) in [
        ("p50", slo.p50_us, canary.p50_us),
        ("p99", slo.p99_us, canary.p99_us),
    ] {
        if let (Some(max), Some(us)) = (bound, got)
            && us >= max
        {
            why.push(format!("{name} {} ≥ {}", micros(us), micros(max)));
        }
    }
    if stable.requests >= c.spec.min_requests
        && let (Some(mine), Some(theirs)) = (canary.p50_us, stable.p50_us)
        && u128::from(mine) * 100 > u128::from(theirs) * u128::from(c.spec.max_slowdown_pct)
        && mine.saturating_sub(theirs) >= SLOWDOWN_FLOOR_US
    {
        why.push(format!(
            "p50 {} is {:.1}× the serving revision's {} (at most {}×)",
            micros(mine),
            mine as f64 / theirs.max(1) as f64,
            micros(theirs),
            f64::from(c.spec.max_slowdown_pct) / 100.0
        ));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canary(steps: &[u32]) -> Canary {
        Canary::new(
            CanarySpec {
                steps: steps.to_vec(),
                interval_ms: 10_000,
                slo: Slo::parse("p99<50ms,errors<1%").expect("a valid SLO"),
                mirror: false,
                min_requests: 20,
                max_slowdown_pct: 200,
            },
            0,
        )
    }

    fn figures(requests: u64, errors: u64, p50: u64, p99: u64) -> Figures {
        Figures {
            requests,
            errors,
            p50_us: Some(p50),
            p99_us: Some(p99),
        }
    }

    #[test]
    fn slo_parses_and_prints_back() {
        let slo = Slo::parse(" p99<50ms, p50 < 800us ,errors<0.5%").expect("a valid SLO");
        assert_eq!(slo.p99_us, Some(50_000));
        assert_eq!(slo.p50_us, Some(800));
        assert_eq!(slo.errors_bp, Some(50));
        assert_eq!(slo.to_string(), "p50<800us,p99<50.0ms,errors<0.5%");
        assert_eq!(
            Slo::parse("p99<1s").expect("a valid SLO").p99_us,
            Some(1_000_000)
        );
        for bad in [
            "",
            "p99>5ms",
            "p98<5ms",
            "p99<5",
            "p99<-5ms",
            "errors<1",
            "errors<0%",
            "errors<101%",
        ] {
            let e = Slo::parse(bad).expect_err("refused").to_string();
            assert!(e.contains("slo"), "{bad}: {e}");
        }
    }

    #[test]
    fn spec_checks_steps_interval_and_factors() {
        let good = canary(&[5, 25, 50, 100]).spec;
        good.check().expect("a valid spec");
        for steps in [vec![], vec![0, 50], vec![50, 25], vec![5, 5], vec![101]] {
            let spec = CanarySpec {
                steps: steps.clone(),
                ..good.clone()
            };
            assert!(spec.check().is_err(), "{steps:?}");
        }
        let spec = CanarySpec {
            interval_ms: 10,
            ..good.clone()
        };
        assert!(spec.check().is_err());
        let spec = CanarySpec {
            max_slowdown_pct: 50,
            ..good
        };
        assert!(spec.check().is_err());
    }

    #[test]
    fn replicas_follow_the_weight_and_at_least_one_runs() {
        let mut c = canary(&[5, 25, 50, 100]);
        assert_eq!(c.replicas(4), 1);
        c.step = 1;
        assert_eq!(c.replicas(4), 1);
        c.step = 2;
        assert_eq!(c.replicas(4), 2);
        assert_eq!(c.replicas(3), 2);
        c.step = 3;
        assert_eq!(c.replicas(4), 4);
        assert_eq!(c.replicas(0), 1);
    }

    #[test]
    fn a_healthy_step_waits_for_its_interval_then_advances_and_the_last_promotes() {
        let mut c = canary(&[10, 100]);
        let good = figures(500, 0, 1_000, 3_000);
        let stable = figures(5_000, 1, 1_000, 2_500);
        assert_eq!(judge(&c, &good, &stable, 5_000), None);
        let (v, why) = judge(&c, &good, &stable, 10_000).expect("judged");
        assert_eq!(v, Verdict::Advance, "{why}");
        c.step = 1;
        assert_eq!(
            judge(&c, &good, &stable, 10_000).expect("judged").0,
            Verdict::Promote
        );
    }

    #[test]
    fn errors_or_latency_beyond_the_slo_roll_back_before_the_interval_ends() {
        let c = canary(&[5, 100]);
        let stable = figures(5_000, 0, 1_000, 2_000);
        let failing = figures(40, 12, 1_000, 2_000);
        let (v, why) = judge(&c, &failing, &stable, 1_000).expect("judged");
        assert_eq!(v, Verdict::Rollback);
        assert!(why.contains("errors 30% ≥ 1%"), "{why}");
        let (v, why) = judge(&c, &figures(40, 0, 1_000, 60_000), &stable, 1_000).expect("judged");
        assert_eq!(v, Verdict::Rollback);
        assert!(why.contains("p99 60.0ms ≥ 50.0ms"), "{why}");
        // Too few requests to trust: no early judgement.
        assert_eq!(
            judge(&c, &figures(5, 5, 1_000, 2_000), &stable, 1_000),
            None
        );
    }

    #[test]
    fn a_canary_slower_than_the_serving_revision_rolls_back_even_within_the_slo() {
        let c = canary(&[5, 100]);
        let stable = figures(5_000, 0, 1_000, 2_000);
        let slow = figures(100, 0, 5_000, 9_000);
        let (v, why) = judge(&c, &slow, &stable, 1_000).expect("judged");
        assert_eq!(v, Verdict::Rollback);
        assert!(why.contains("5.0× the serving revision's"), "{why}");
        // Twice as slow by a few microseconds is jitter, not a regression.
        assert_eq!(
            judge(
                &c,
                &figures(100, 0, 150, 300),
                &figures(5_000, 0, 50, 100),
                1_000
            ),
            None
        );
        // With too little stable traffic to compare, only the SLO counts.
        let (v, _) = judge(&c, &slow, &figures(3, 0, 1_000, 1_000), 10_000).expect("judged");
        assert_eq!(v, Verdict::Advance);
    }

    #[test]
    fn a_step_without_enough_requests_holds() {
        let c = canary(&[5, 100]);
        let (v, why) =
            judge(&c, &figures(3, 0, 1, 1), &Figures::default(), 10_000).expect("judged");
        assert_eq!(v, Verdict::Hold);
        assert!(why.contains("fewer than the 20"), "{why}");
    }
}
