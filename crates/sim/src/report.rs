use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    pub t_secs: f64,
    /// Addresses the nodes hold (on ENIs that give pods addresses).
    pub held: u64,
    pub in_use: u64,
    pub pending_adds: u64,
    /// Mutating EC2 calls made since the start, throttled ones included.
    pub mutating_calls: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Calls {
    pub ok: u64,
    pub throttled: u64,
    pub failed: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Waits {
    pub adds: u64,
    /// ADDs that found an address at once.
    pub immediate: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub histogram: Vec<WaitBucket>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct WaitBucket {
    /// "0" for ADDs that found an address at once, "<1s" for the others under a second, and so on.
    pub label: String,
    pub adds: u64,
}

/// Upper bounds of the histogram's buckets after the first (no wait at all), in milliseconds.
const BUCKET_BOUNDS_MS: &[(u64, &str)] = &[
    (100, "<100ms"),
    (500, "<500ms"),
    (1000, "<1s"),
    (2000, "<2s"),
    (5000, "<5s"),
    (10_000, "<10s"),
    (30_000, "<30s"),
];

/// The `q` quantile of sorted durations, in milliseconds; 0 when there are none.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

/// How long the nodes took from launch to ready, over those that got there.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeReady {
    pub nodes: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl NodeReady {
    pub fn from(mut times: Vec<Duration>) -> NodeReady {
        times.sort();
        NodeReady {
            nodes: times.len() as u64,
            p50_ms: quantile_ms(&times, 0.50),
            p99_ms: quantile_ms(&times, 0.99),
            max_ms: quantile_ms(&times, 1.0),
        }
    }
}

impl Waits {
    pub fn from(mut waits: Vec<Duration>) -> Waits {
        waits.sort();
        let pick = |q: f64| quantile_ms(&waits, q);
        let labels = std::iter::once("0")
            .chain(BUCKET_BOUNDS_MS.iter().map(|(_, label)| *label))
            .chain([">=30s"]);
        let mut histogram: Vec<WaitBucket> = labels
            .map(|label| WaitBucket {
                label: label.into(),
                adds: 0,
            })
            .collect();
        for w in &waits {
            let i = if w.is_zero() {
                0
            } else {
                1 + BUCKET_BOUNDS_MS
                    .iter()
                    .position(|&(bound, _)| w.as_millis() < u128::from(bound))
                    .unwrap_or(BUCKET_BOUNDS_MS.len())
            };
            histogram[i].adds += 1;
        }
        Waits {
            histogram,
            adds: waits.len() as u64,
            immediate: waits.iter().filter(|w| w.is_zero()).count() as u64,
            p50_ms: pick(0.50),
            p99_ms: pick(0.99),
            max_ms: pick(1.0),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub nodes: u64,
    pub simulated_secs: u64,
    /// Pod creations and deletions processed.
    pub pod_events: u64,
    pub unschedulable_pods: u64,
    pub add_wait: Waits,
    /// From launch to ready (pool at its targets, no EC2 call in flight), over the nodes that got there.
    pub node_ready: NodeReady,
    pub nodes_never_ready: u64,
    pub ec2_calls: BTreeMap<String, Calls>,
    pub throttled_retries: u64,
    /// ENIs left `available` with our tags at the end (created, but never attached to a live node).
    pub leaked_enis: u64,
    pub forced_removals: u64,
    /// The refill rate of the account's bucket for mutating calls.
    pub mutating_refill_per_sec: f64,
    pub timeline: Vec<Sample>,
}

impl Report {
    /// The run's totals, as [`crate::Cluster::spent`] counts them while it runs.
    pub fn spent(&self) -> crate::Spent {
        crate::Spent {
            ec2_calls: self.total_calls(),
            throttled_calls: self.ec2_calls.values().map(|c| c.throttled).sum(),
            unschedulable_pods: self.unschedulable_pods,
        }
    }

    pub fn total_calls(&self) -> u64 {
        self.ec2_calls
            .values()
            .map(|c| c.ok + c.throttled + c.failed)
            .sum()
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "scenario {}: {} nodes, {} simulated seconds, {} pod events ({} not schedulable)",
            self.scenario,
            self.nodes,
            self.simulated_secs,
            self.pod_events,
            self.unschedulable_pods
        );
        let w = &self.add_wait;
        let _ = writeln!(o, "\nADD wait for an address: {} ADDs, {} at once; p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            w.adds, w.immediate, w.p50_ms, w.p99_ms, w.max_ms);
        let r = &self.node_ready;
        let _ = writeln!(
            o,
            "node launch to ready: p50 {:.1} s, p99 {:.1} s, max {:.1} s ({} nodes never ready)",
            r.p50_ms / 1000.0,
            r.p99_ms / 1000.0,
            r.max_ms / 1000.0,
            self.nodes_never_ready
        );
        let _ = writeln!(
            o,
            "\nEC2 calls                           ok  throttled  failed"
        );
        for (op, c) in &self.ec2_calls {
            let _ = writeln!(
                o,
                "  {op:<31} {:>6} {:>10} {:>7}",
                c.ok, c.throttled, c.failed
            );
        }
        let _ = writeln!(o, "  {:<31} {:>6}", "total", self.total_calls());
        let _ = writeln!(
            o,
            "throttled calls retried: {}; leaked ENIs: {}; assignments lost to EC2 resync: {}",
            self.throttled_retries, self.leaked_enis, self.forced_removals
        );
        let _ = writeln!(o, "\naddresses held vs in use (all nodes)");
        let peak = self
            .timeline
            .iter()
            .map(|s| s.held)
            .max()
            .unwrap_or(0)
            .max(1);
        let rows = self.timeline.len().div_ceil(24).max(1);
        for s in self.timeline.iter().step_by(rows) {
            let bar = |n: u64| (n * 40 / peak) as usize;
            let _ = writeln!(
                o,
                "  {:>7.0}s held {:>7} in use {:>7} pending {:>4} |{}{}",
                s.t_secs,
                s.held,
                s.in_use,
                s.pending_adds,
                "#".repeat(bar(s.in_use)),
                ".".repeat(bar(s.held).saturating_sub(bar(s.in_use)))
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_fall_in_the_buckets_a_reader_expects() {
        let ms = Duration::from_millis;
        let w = Waits::from(vec![
            ms(0),
            ms(0),
            ms(99),
            ms(100),
            ms(1999),
            ms(2000),
            ms(45_000),
        ]);
        let counts: Vec<(&str, u64)> = w
            .histogram
            .iter()
            .map(|b| (b.label.as_str(), b.adds))
            .collect();
        assert_eq!(
            counts,
            [
                ("0", 2),
                ("<100ms", 1),
                ("<500ms", 1),
                ("<1s", 0),
                ("<2s", 1),
                ("<5s", 1),
                ("<10s", 0),
                ("<30s", 0),
                (">=30s", 1)
            ]
        );
        assert_eq!((w.adds, w.immediate, w.max_ms), (7, 2, 45_000.0));
    }
}
