//! The warm-pool tuner: the same scenario under a grid of warm-pool settings, the Pareto front of
//! (addresses held, p99 ADD wait, EC2 calls), and the setting that meets a p99 bound (and, if given, a
//! bound on EC2 calls) with the fewest addresses held. Every point is a full simulator run, so the numbers are the engine's, not a model's.

use crate::{Cluster, Ended, Report, Scenario, Spent};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// The settings the tuner owns; a candidate replaces all of them, whatever the scenario had.
const WARM_POOL_KEYS: &[&str] = &[
    "WARM_ENI_TARGET",
    "WARM_IP_TARGET",
    "MINIMUM_IP_TARGET",
    "WARM_PREFIX_TARGET",
    "ENABLE_PREFIX_DELEGATION",
];

#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// The warm-pool settings of this run, as environment variables; empty for the scenario's own.
    pub settings: BTreeMap<String, String>,
    /// Addresses held by all nodes, averaged over the timeline's samples.
    pub mean_held: f64,
    pub mean_in_use: f64,
    pub p99_wait_ms: f64,
    pub ec2_calls: u64,
    /// Calls the account's buckets refused: the share of the budget this setting fights its
    /// neighbours (and itself) for.
    pub throttled_calls: u64,
    pub unschedulable_pods: u64,
    /// p99 over the nodes of the time from launch to ready, in seconds.
    pub p99_ready_secs: f64,
}

/// What a recommended setting must meet.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Bounds {
    pub max_p99_wait_ms: f64,
    /// At most this many EC2 calls in the whole run (throttled ones included), if set.
    pub max_ec2_calls: Option<u64>,
    /// At most this many EC2 calls per node and hour (throttled ones included), if set: the
    /// trade-off in the operator's own terms, whatever the scenario's size.
    pub max_ec2_calls_per_node_hour: Option<f64>,
}

impl Outcome {
    fn from_report(settings: BTreeMap<String, String>, r: &Report) -> Outcome {
        let mean = |f: fn(&crate::report::Sample) -> u64| {
            if r.timeline.is_empty() {
                0.0
            } else {
                r.timeline.iter().map(|s| f(s) as f64).sum::<f64>() / r.timeline.len() as f64
            }
        };
        let spent = r.spent();
        Outcome {
            settings,
            mean_held: mean(|s| s.held),
            mean_in_use: mean(|s| s.in_use),
            p99_wait_ms: r.add_wait.p99_ms,
            ec2_calls: spent.ec2_calls,
            throttled_calls: spent.throttled_calls,
            unschedulable_pods: spent.unschedulable_pods,
            p99_ready_secs: r.node_ready.p99_ms / 1000.0,
        }
    }

    pub fn label(&self) -> String {
        label_of(&self.settings)
    }

    /// At least as good on all three objectives and better on one.
    fn dominates(&self, other: &Outcome) -> bool {
        let le = self.mean_held <= other.mean_held
            && self.p99_wait_ms <= other.p99_wait_ms
            && self.ec2_calls <= other.ec2_calls;
        let lt = self.mean_held < other.mean_held
            || self.p99_wait_ms < other.p99_wait_ms
            || self.ec2_calls < other.ec2_calls;
        le && lt
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TuneReport {
    pub scenario: String,
    /// The scenario's node-hours (nodes times the hours each runs), for calls per node-hour.
    pub node_hours: f64,
    pub bounds: Bounds,
    /// The scenario run with the settings it was written with: what the cluster does today.
    pub baseline: Outcome,
    pub candidates: Vec<Outcome>,
    /// Indexes into `candidates` of the runs no other run dominates, by addresses held.
    pub pareto_front: Vec<usize>,
    /// Index into `candidates`: meets the bounds, schedules as many pods as the baseline, is throttled
    /// no more than the baseline (the account's budget is shared: a setting that saves addresses by
    /// flooding it slows every node's start and every other tool), and holds the fewest addresses
    /// (fewest EC2 calls among equals). None when no candidate does.
    pub recommended: Option<usize>,
    pub search: Search,
    /// With [`Search::Fast`], the settings stopped because they broke a bound; not in `candidates`.
    pub out_of_bounds: Vec<OutOfBounds>,
}

/// The grid searched: upstream's ENI-granular default, IP targets with and without a minimum sized
/// from the workload, and, where every node type can take /28 prefixes, prefix delegation by prefix
/// target and by IP target.
pub fn candidates(scenario: &Scenario) -> Vec<BTreeMap<String, String>> {
    let pods = scenario.workload.pods_per_node.round().max(1.0) as u32;
    let mut minimums = vec![0, pods.div_ceil(2), pods];
    minimums.dedup();
    let set = |pairs: &[(&str, String)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    };
    let mut grid = vec![set(&[("WARM_ENI_TARGET", "1".into())])];
    for warm in [1, 2, 3, 5, 8] {
        for &minimum in &minimums {
            grid.push(set(&[
                ("WARM_IP_TARGET", warm.to_string()),
                ("MINIMUM_IP_TARGET", minimum.to_string()),
            ]));
        }
    }
    let prefixes_everywhere = scenario
        .nodes
        .iter()
        .all(|g| ipam::limits::lookup(&g.instance_type).is_some_and(|l| l.supports_prefixes()));
    if prefixes_everywhere {
        for warm_prefixes in [1, 2] {
            grid.push(set(&[
                ("ENABLE_PREFIX_DELEGATION", "true".into()),
                ("WARM_PREFIX_TARGET", warm_prefixes.to_string()),
            ]));
        }
        for warm in [1, 4, 8] {
            for minimum in [0, pods] {
                grid.push(set(&[
                    ("ENABLE_PREFIX_DELEGATION", "true".into()),
                    ("WARM_IP_TARGET", warm.to_string()),
                    ("MINIMUM_IP_TARGET", minimum.to_string()),
                ]));
            }
        }
    }
    grid
}

/// The scenario with `settings` laid over its own; settings that name any warm-pool variable replace
/// all of the scenario's warm-pool variables, so that, say, a prefix target is not mixed with an IP
/// target the scenario had.
pub fn with_settings(scenario: &Scenario, settings: &BTreeMap<String, String>) -> Scenario {
    let mut s = scenario.clone();
    if settings
        .keys()
        .any(|k| WARM_POOL_KEYS.contains(&k.as_str()))
    {
        s.settings
            .retain(|k, _| !WARM_POOL_KEYS.contains(&k.as_str()));
    }
    s.settings
        .extend(settings.iter().map(|(k, v)| (k.clone(), v.clone())));
    s
}

/// How much of the grid the tuner runs to the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Search {
    /// Every setting to the end: the whole Pareto front, whatever the bounds.
    Exhaustive,
    /// A setting is stopped as soon as it breaks a bound on a figure that only grows (EC2 calls,
    /// throttled calls, unschedulable pods): it could never be recommended, and the settings that
    /// flood the account's bucket are the slowest to simulate. Same recommendation as exhaustive.
    Fast,
}

/// Runs the scenario under each of `grid` on `threads` threads, reports in the grid's order. `stop`
/// is asked now and then during run `i` whether to stop it; `done` is told each run that ends.
fn run_grid(
    scenario: &Scenario,
    grid: &[BTreeMap<String, String>],
    threads: usize,
    stop: &(dyn Fn(usize, &Cluster) -> Option<String> + Sync),
    done: &(dyn Fn(usize, &Ended) + Sync),
) -> Result<Vec<Ended>, String> {
    let total = grid.len();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Ended, String>>>> =
        Mutex::new((0..total).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, total.max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(settings) = grid.get(i) else { break };
                let ended = Cluster::new(with_settings(scenario, settings))
                    .and_then(|c| c.run_unless(&mut |c| stop(i, c)))
                    .map_err(|e| format!("{}: {e}", label_of(settings)));
                if let Ok(ended) = &ended {
                    done(i, ended);
                }
                results.lock().expect("no run panics holding the lock")[i] = Some(ended);
            });
        }
    });
    results
        .into_inner()
        .expect("no run panics holding the lock")
        .into_iter()
        .map(|r| r.expect("every index is run"))
        .collect()
}

/// A setting that broke a bound on a figure that only grows, with the bound it broke.
#[derive(Clone, Debug, Serialize)]
pub struct OutOfBounds {
    pub settings: BTreeMap<String, String>,
    pub reason: String,
}

impl OutOfBounds {
    pub fn label(&self) -> String {
        label_of(&self.settings)
    }
}

/// The bounds a run's running totals are held to; the baseline's own totals are known once it ends.
struct Limits {
    bounds: Bounds,
    node_hours: f64,
    baseline: OnceLock<Spent>,
}

impl Limits {
    fn broken(&self, s: Spent) -> Option<String> {
        if let Some(b) = self.baseline.get() {
            if s.throttled_calls > b.throttled_calls {
                return Some(format!(
                    "throttled more than the scenario's settings ({})",
                    b.throttled_calls
                ));
            }
            if s.unschedulable_pods > b.unschedulable_pods {
                return Some(format!(
                    "more pods unschedulable than the scenario's settings ({})",
                    b.unschedulable_pods
                ));
            }
        }
        if let Some(max) = self.bounds.max_ec2_calls {
            if s.ec2_calls > max {
                return Some(format!("more than {max} EC2 calls"));
            }
        }
        if let Some(max) = self.bounds.max_ec2_calls_per_node_hour {
            if s.ec2_calls as f64 > max * self.node_hours {
                return Some(format!("more than {max} EC2 calls per node-hour"));
            }
        }
        None
    }
}

/// Runs the baseline and every candidate on `threads` threads, as far as `search` says; `progress`
/// is told each run that ends (done, total).
pub fn tune(
    scenario: &Scenario,
    bounds: Bounds,
    search: Search,
    threads: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<TuneReport, String> {
    let mut grid = vec![BTreeMap::new()];
    grid.extend(candidates(scenario));
    let node_hours = scenario
        .nodes
        .iter()
        .map(|g| {
            let hours = scenario.duration_secs.saturating_sub(g.start_secs) as f64 / 3600.0;
            f64::from(g.count) * hours
        })
        .sum();
    let limits = Limits {
        bounds,
        node_hours,
        baseline: OnceLock::new(),
    };
    let finished = AtomicUsize::new(0);
    let total = grid.len();
    let ended = run_grid(
        scenario,
        &grid,
        threads,
        &|i, cluster| {
            if i == 0 || search == Search::Exhaustive {
                return None;
            }
            limits.broken(cluster.spent())
        },
        &|i, ended| {
            if let (0, Ended::Finished(r)) = (i, ended) {
                let _ = limits.baseline.set(r.spent());
            }
            progress(finished.fetch_add(1, Ordering::Relaxed) + 1, total);
        },
    )?;
    let mut outcomes = Vec::new();
    let mut out_of_bounds = Vec::new();
    for (settings, ended) in grid.into_iter().zip(ended) {
        match ended {
            // A run that ended before the baseline's totals were known is held to them now, so which
            // settings are out of bounds does not depend on which thread was faster.
            Ended::Finished(r) => match limits.broken(r.spent()) {
                Some(reason) if search == Search::Fast && !outcomes.is_empty() => {
                    out_of_bounds.push(OutOfBounds { settings, reason })
                }
                _ => outcomes.push(Outcome::from_report(settings, &r)),
            },
            Ended::Stopped(reason) => out_of_bounds.push(OutOfBounds { settings, reason }),
        }
    }
    let baseline = outcomes.remove(0);
    let mut report = analyse(
        scenario.name.clone(),
        node_hours,
        bounds,
        baseline,
        outcomes,
    );
    report.search = search;
    report.out_of_bounds = out_of_bounds;
    Ok(report)
}

fn label_of(settings: &BTreeMap<String, String>) -> String {
    if settings.is_empty() {
        return "(the scenario's settings)".into();
    }
    settings
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The Pareto front and the recommendation, from finished runs.
pub fn analyse(
    scenario: String,
    node_hours: f64,
    bounds: Bounds,
    baseline: Outcome,
    candidates: Vec<Outcome>,
) -> TuneReport {
    let mut pareto_front: Vec<usize> = (0..candidates.len())
        .filter(|&i| !candidates.iter().any(|o| o.dominates(&candidates[i])))
        .collect();
    pareto_front.sort_by(|&a, &b| candidates[a].mean_held.total_cmp(&candidates[b].mean_held));
    let recommended = (0..candidates.len())
        .filter(|&i| {
            let c = &candidates[i];
            c.p99_wait_ms <= bounds.max_p99_wait_ms
                && bounds.max_ec2_calls.is_none_or(|max| c.ec2_calls <= max)
                && bounds
                    .max_ec2_calls_per_node_hour
                    .is_none_or(|max| c.ec2_calls as f64 <= max * node_hours)
                && c.unschedulable_pods <= baseline.unschedulable_pods
                && c.throttled_calls <= baseline.throttled_calls
        })
        .min_by(|&a, &b| {
            let (a, b) = (&candidates[a], &candidates[b]);
            a.mean_held
                .total_cmp(&b.mean_held)
                .then(a.ec2_calls.cmp(&b.ec2_calls))
        });
    TuneReport {
        scenario,
        node_hours,
        bounds,
        baseline,
        candidates,
        pareto_front,
        recommended,
        search: Search::Exhaustive,
        out_of_bounds: Vec::new(),
    }
}

impl TuneReport {
    pub fn recommendation(&self) -> Option<&Outcome> {
        self.recommended.map(|i| &self.candidates[i])
    }

    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let calls_bound = self
            .bounds
            .max_ec2_calls
            .map_or(String::new(), |n| format!(", at most {n} EC2 calls"))
            + &self
                .bounds
                .max_ec2_calls_per_node_hour
                .map_or(String::new(), |n| {
                    format!(", at most {n} EC2 calls per node-hour")
                });
        let per_node_hour = |calls: u64| calls as f64 / self.node_hours.max(f64::MIN_POSITIVE);
        let _ = writeln!(
            o,
            "scenario {}: {} settings searched, p99 ADD wait bound {:.0} ms{calls_bound}, no more throttled calls than the scenario's settings\n",
            self.scenario,
            self.candidates.len() + self.out_of_bounds.len(),
            self.bounds.max_p99_wait_ms
        );
        o.push_str(TABLE_HEADER);
        row(&mut o, "=", &self.baseline);
        let _ = writeln!(o, "Pareto front (no other setting is better on all three):");
        for &i in &self.pareto_front {
            let mark = if Some(i) == self.recommended {
                ">"
            } else {
                "*"
            };
            row(&mut o, mark, &self.candidates[i]);
        }
        if !self.out_of_bounds.is_empty() {
            let _ = writeln!(
                o,
                "Stopped as soon as they broke a bound (none of these can be recommended; --exhaustive runs them to the end):"
            );
            for x in &self.out_of_bounds {
                let _ = writeln!(o, "x   {}: {}", x.label(), x.reason);
            }
        }
        match self.recommendation() {
            Some(r) => {
                let b = &self.baseline;
                let _ = writeln!(
                    o,
                    "\nrecommended: {}\n  addresses held {:.1} -> {:.1} ({:+.0}%), p99 ADD wait {:.0} -> {:.0} ms, EC2 calls {} -> {} ({:.2} -> {:.2} per node-hour), p99 node ready {:.1} -> {:.1} s",
                    r.label(),
                    b.mean_held,
                    r.mean_held,
                    percent_change(b.mean_held, r.mean_held),
                    b.p99_wait_ms,
                    r.p99_wait_ms,
                    b.ec2_calls,
                    r.ec2_calls,
                    per_node_hour(b.ec2_calls),
                    per_node_hour(r.ec2_calls),
                    b.p99_ready_secs,
                    r.p99_ready_secs
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "\nno setting searched keeps the p99 ADD wait under {:.0} ms{calls_bound} without more throttling than the scenario's settings; the front above shows the trade-off",
                    self.bounds.max_p99_wait_ms
                );
            }
        }
        o
    }
}

const TABLE_HEADER: &str =
    "    mean held  mean used  p99 wait ms  EC2 calls throttled unsched  p99 ready s  settings\n";

fn row(o: &mut String, mark: &str, x: &Outcome) {
    use std::fmt::Write;
    let _ = writeln!(
        o,
        "{mark:<2}{:>10.1} {:>10.1} {:>12.0} {:>10} {:>9} {:>7} {:>12.1}  {}",
        x.mean_held,
        x.mean_in_use,
        x.p99_wait_ms,
        x.ec2_calls,
        x.throttled_calls,
        x.unschedulable_pods,
        x.p99_ready_secs,
        x.label()
    );
}

/// `vpcctl simulate --compare`: the scenario's own settings and each set given, side by side.
pub fn compare(
    scenario: &Scenario,
    sets: Vec<BTreeMap<String, String>>,
    threads: usize,
) -> Result<(Vec<Outcome>, Vec<Report>), String> {
    let mut grid = vec![BTreeMap::new()];
    grid.extend(sets);
    let reports = run_grid(scenario, &grid, threads, &|_, _| None, &|_, _| {})?
        .into_iter()
        .map(|ended| match ended {
            Ended::Finished(r) => Ok(*r),
            Ended::Stopped(reason) => Err(reason),
        })
        .collect::<Result<Vec<Report>, String>>()?;
    let outcomes = grid
        .into_iter()
        .zip(&reports)
        .map(|(settings, r)| Outcome::from_report(settings, r))
        .collect();
    Ok((outcomes, reports))
}

pub fn render_comparison(scenario: &str, outcomes: &[Outcome]) -> String {
    let mut o = format!("scenario {scenario}: {} runs compared\n\n", outcomes.len());
    o.push_str(TABLE_HEADER);
    for (i, x) in outcomes.iter().enumerate() {
        row(&mut o, &(i + 1).to_string(), x);
    }
    o
}

/// "WARM_IP_TARGET=2,MINIMUM_IP_TARGET=10" as settings; a name the engine does not read is an error.
pub fn parse_settings(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut settings = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?}: write NAME=VALUE"))?;
        if !ipam::Config::VARIABLES.contains(&k) {
            return Err(format!("{k:?} is not a setting the engine reads"));
        }
        settings.insert(k.to_string(), v.to_string());
    }
    if settings.is_empty() {
        return Err(format!(
            "{text:?}: no settings (write NAME=VALUE[,NAME=VALUE...])"
        ));
    }
    Ok(settings)
}

fn percent_change(from: f64, to: f64) -> f64 {
    if from == 0.0 {
        0.0
    } else {
        (to - from) / from * 100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(held: f64, p99: f64, calls: u64, unsched: u64) -> Outcome {
        Outcome {
            settings: BTreeMap::from([("WARM_IP_TARGET".to_string(), format!("{held}"))]),
            mean_held: held,
            mean_in_use: 0.0,
            p99_wait_ms: p99,
            ec2_calls: calls,
            throttled_calls: 0,
            unschedulable_pods: unsched,
            p99_ready_secs: 0.0,
        }
    }

    fn wait_bound(max_p99_wait_ms: f64) -> Bounds {
        Bounds {
            max_p99_wait_ms,
            max_ec2_calls: None,
            max_ec2_calls_per_node_hour: None,
        }
    }

    #[test]
    fn front_and_recommendation_by_hand() {
        let baseline = outcome(100.0, 0.0, 50, 0);
        let runs = vec![
            outcome(40.0, 3000.0, 80, 0), // 0: fewest held, too slow
            outcome(60.0, 500.0, 70, 0),  // 1: meets 1 s
            outcome(60.0, 500.0, 90, 0),  // 2: dominated by 1
            outcome(80.0, 0.0, 40, 0),    // 3: fastest, fewest calls
            outcome(50.0, 800.0, 60, 3),  // 4: meets 1 s but leaves pods unscheduled
            outcome(90.0, 100.0, 45, 0),  // 5: dominated by 3
        ];
        let r = analyse(
            "t".into(),
            10.0,
            wait_bound(1000.0),
            baseline.clone(),
            runs.clone(),
        );
        assert_eq!(r.pareto_front, vec![0, 4, 1, 3]);
        assert_eq!(r.recommended, Some(1));
        let text = r.render();
        assert!(text.contains("recommended: WARM_IP_TARGET=60"), "{text}");
        assert!(text.contains("100.0 -> 60.0 (-40%)"), "{text}");
        // At most 65 EC2 calls: 1 (70 calls) is out, 3 (40 calls, 80 held) is the fewest held left.
        let bounds = Bounds {
            max_ec2_calls: Some(65),
            ..wait_bound(1000.0)
        };
        let r = analyse("t".into(), 10.0, bounds, baseline.clone(), runs.clone());
        assert_eq!(r.recommended, Some(3));
        assert!(r.render().contains("at most 65 EC2 calls"));
        // The same bound per node-hour, over 10 node-hours: 6.5 a node-hour.
        let bounds = Bounds {
            max_ec2_calls_per_node_hour: Some(6.5),
            ..wait_bound(1000.0)
        };
        let r = analyse("t".into(), 10.0, bounds, baseline.clone(), runs.clone());
        assert_eq!(r.recommended, Some(3));
        let text = r.render();
        assert!(
            text.contains("at most 6.5 EC2 calls per node-hour"),
            "{text}"
        );
        assert!(
            text.contains("EC2 calls 50 -> 40 (5.00 -> 4.00 per node-hour)"),
            "{text}"
        );
        // A setting throttled more than the baseline is not recommended however few addresses it holds:
        // 2, as small but with more calls, is.
        let mut throttled = runs;
        throttled[1].throttled_calls = 1;
        let r = analyse("t".into(), 10.0, wait_bound(1000.0), baseline, throttled);
        assert_eq!(r.recommended, Some(2));
    }

    #[test]
    fn a_run_is_out_of_bounds_once_a_growing_figure_passes_its_bound() {
        let limits = Limits {
            bounds: Bounds {
                max_ec2_calls: Some(100),
                max_ec2_calls_per_node_hour: Some(5.0),
                ..wait_bound(1000.0)
            },
            node_hours: 10.0,
            baseline: OnceLock::new(),
        };
        let spent = |ec2_calls, throttled_calls, unschedulable_pods| Spent {
            ec2_calls,
            throttled_calls,
            unschedulable_pods,
        };
        // Before the baseline ends only the fixed bounds hold: 5 a node-hour over 10 node-hours is 50.
        assert_eq!(limits.broken(spent(50, 7, 3)), None);
        assert_eq!(
            limits.broken(spent(51, 0, 0)).as_deref(),
            Some("more than 5 EC2 calls per node-hour")
        );
        assert_eq!(
            limits.broken(spent(101, 0, 0)).as_deref(),
            Some("more than 100 EC2 calls")
        );
        limits.baseline.set(spent(40, 6, 2)).unwrap();
        assert_eq!(limits.broken(spent(40, 6, 2)), None);
        assert_eq!(
            limits.broken(spent(40, 7, 2)).as_deref(),
            Some("throttled more than the scenario's settings (6)")
        );
        assert_eq!(
            limits.broken(spent(40, 0, 3)).as_deref(),
            Some("more pods unschedulable than the scenario's settings (2)")
        );
    }

    #[test]
    fn no_recommendation_when_nothing_meets_the_bound() {
        let r = analyse(
            "t".into(),
            10.0,
            wait_bound(10.0),
            outcome(10.0, 50.0, 5, 0),
            vec![outcome(5.0, 20.0, 5, 0)],
        );
        assert_eq!(r.recommended, None);
        assert!(r.render().contains("no setting searched"));
    }

    #[test]
    fn settings_are_parsed_strictly_and_replace_the_warm_pool_as_a_whole() {
        let set = parse_settings("ENABLE_PREFIX_DELEGATION=true, WARM_PREFIX_TARGET=2").unwrap();
        assert_eq!(set.len(), 2);
        assert!(parse_settings("WARM_IP_TARGT=2")
            .unwrap_err()
            .contains("WARM_IP_TARGT"));
        assert!(parse_settings("WARM_IP_TARGET")
            .unwrap_err()
            .contains("NAME=VALUE"));
        assert!(parse_settings(" , ").is_err());

        let mut s = Scenario::built_in("steady").unwrap();
        s.settings.insert("WARM_IP_TARGET".into(), "5".into());
        s.settings.insert("IP_COOLDOWN_PERIOD".into(), "10".into());
        let merged = with_settings(&s, &set);
        assert_eq!(merged.settings.get("WARM_IP_TARGET"), None);
        assert_eq!(merged.settings["WARM_PREFIX_TARGET"], "2");
        assert_eq!(merged.settings["IP_COOLDOWN_PERIOD"], "10");
        let cooldown = parse_settings("IP_COOLDOWN_PERIOD=60").unwrap();
        assert_eq!(with_settings(&s, &cooldown).settings["WARM_IP_TARGET"], "5");
    }

    #[test]
    fn prefix_candidates_only_where_every_type_takes_prefixes() {
        let mut s = Scenario::built_in("steady").unwrap();
        assert!(candidates(&s)
            .iter()
            .any(|c| c.contains_key("ENABLE_PREFIX_DELEGATION")));
        s.nodes[0].instance_type = "m4.large".into();
        assert!(!candidates(&s)
            .iter()
            .any(|c| c.contains_key("ENABLE_PREFIX_DELEGATION")));
    }
}
