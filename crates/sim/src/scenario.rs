//! The scenario file format (TOML), documented in docs/simulate.md.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub duration_secs: u64,
    #[serde(default = "one")]
    pub seed: u64,
    /// How often the report samples addresses held and in use.
    #[serde(default = "sixty")]
    pub sample_every_secs: u64,
    pub vpc: VpcSpec,
    pub nodes: Vec<NodeGroup>,
    pub workload: Workload,
    /// CNI settings under their upstream environment variable names.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    #[serde(default)]
    pub ec2: Ec2Spec,
    /// The creates and deletes of `workload.trace`, read by `Scenario::load`.
    #[serde(skip)]
    pub trace: Option<Vec<TraceEvent>>,
}

fn one() -> u64 {
    1
}

fn sixty() -> u64 {
    60
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VpcSpec {
    pub cidr: String,
    /// The VPC's IPv6 block (a /56), for IPv6 clusters.
    #[serde(default)]
    pub ipv6_cidr: Option<String>,
    pub subnets: Vec<SubnetSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetSpec {
    pub cidr: String,
    pub az: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Subnet CIDR reservations of type prefix.
    #[serde(default)]
    pub prefix_reservations: Vec<String>,
    /// The subnet's IPv6 /64, out of `vpc.ipv6_cidr`: nodes in it can have a /80 delegated.
    #[serde(default)]
    pub ipv6_cidr: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeGroup {
    pub instance_type: String,
    pub count: u32,
    /// Index into `vpc.subnets` of the nodes' primary subnet.
    #[serde(default)]
    pub subnet: usize,
    /// Index into `vpc.subnets` of the ENIConfig subnet (custom networking).
    #[serde(default)]
    pub eni_config_subnet: Option<usize>,
    /// Nodes launch spread evenly over [start_secs, start_secs + launch_spread_secs).
    #[serde(default)]
    pub start_secs: u64,
    #[serde(default)]
    pub launch_spread_secs: u64,
}

/// Pods arrive on each node once it is ready, as a Poisson process, and live an exponentially
/// distributed time, so that a node runs `pods_per_node` pods on average once warm (over a day, with a
/// daily curve). Bursts and a trace add pods on top. Pods beyond what the node can hold are not scheduled.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub pods_per_node: f64,
    pub mean_lifetime_secs: f64,
    /// Pods created on every node the moment it is ready, as a deployment scaling out would.
    #[serde(default)]
    pub initial_burst: u32,
    /// Arrivals follow the time of day instead of a constant rate.
    #[serde(default)]
    pub daily: Option<DailyCurve>,
    #[serde(default)]
    pub bursts: Vec<Burst>,
    /// A CSV file of pod creates and deletes (`t_secs,node,action,pod`), relative to the scenario file.
    #[serde(default)]
    pub trace: Option<String>,
    /// Security groups for pods (with `ENABLE_POD_ENI=true`): the sets of groups pods are given, one
    /// after another; each such pod gets a branch ENI instead of an address from the pool.
    #[serde(default)]
    pub security_group_sets: Vec<Vec<String>>,
    /// The share of pods, 0 to 1, that a SecurityGroupPolicy selects (1 when unset).
    #[serde(default)]
    pub security_group_share: Option<f64>,
}

/// The arrival rate peaks at `peak_hour` and is `trough_ratio` of the peak twelve hours later, along a
/// cosine whose mean over a day is the constant rate; the simulated clock starts at midnight.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DailyCurve {
    pub peak_hour: f64,
    pub trough_ratio: f64,
}

impl DailyCurve {
    fn amplitude(&self) -> f64 {
        (1.0 - self.trough_ratio) / (1.0 + self.trough_ratio)
    }

    /// The rate at `t_secs` relative to the day's mean.
    pub fn factor(&self, t_secs: f64) -> f64 {
        let hours = t_secs / 3600.0 - self.peak_hour;
        1.0 + self.amplitude() * (2.0 * std::f64::consts::PI * hours / 24.0).cos()
    }

    /// The largest `factor`, at the peak hour.
    pub fn peak(&self) -> f64 {
        1.0 + self.amplitude()
    }
}

/// `pods_per_node` pods created on every ready node at `at_secs`, and again every `every_secs` if set
/// (a deployment rolled out, a batch of jobs).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Burst {
    pub at_secs: u64,
    pub pods_per_node: u32,
    /// How long the burst's pods live on average (default: the workload's mean lifetime).
    #[serde(default)]
    pub mean_lifetime_secs: Option<f64>,
    #[serde(default)]
    pub every_secs: Option<u64>,
}

/// One line of a trace: a pod created on, or deleted from, node `node` (nodes are numbered from 0 in the
/// order of the node groups, and within a group in launch order).
#[derive(Clone, Debug, PartialEq)]
pub struct TraceEvent {
    pub t_secs: f64,
    pub node: usize,
    pub create: bool,
    pub pod: String,
}

/// Reads a trace: a header line `t_secs,node,action,pod`, then one event per line, action `create` or
/// `delete`; blank lines and lines starting with `#` are skipped. Events are returned in time order.
pub fn parse_trace(text: &str) -> Result<Vec<TraceEvent>, ScenarioError> {
    let bad = |n: usize, why: String| ScenarioError::Invalid(format!("trace line {n}: {why}"));
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
    match lines.next() {
        Some((_, "t_secs,node,action,pod")) => {}
        Some((n, other)) => {
            return Err(bad(
                n,
                format!("the header must be t_secs,node,action,pod, not {other:?}"),
            ))
        }
        None => return Err(ScenarioError::Invalid("the trace is empty".into())),
    }
    let mut events = Vec::new();
    for (n, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [t, node, action, pod] = fields[..] else {
            return Err(bad(n, format!("4 fields expected, found {}", fields.len())));
        };
        let t_secs: f64 = t
            .parse()
            .ok()
            .filter(|t: &f64| t.is_finite() && *t >= 0.0)
            .ok_or_else(|| bad(n, format!("{t:?} is not a time in seconds")))?;
        let node = node
            .parse()
            .map_err(|_| bad(n, format!("{node:?} is not a node number")))?;
        let create = match action {
            "create" => true,
            "delete" => false,
            other => {
                return Err(bad(
                    n,
                    format!("action {other:?} is neither create nor delete"),
                ))
            }
        };
        if pod.is_empty() {
            return Err(bad(n, "the pod has no name".into()));
        }
        events.push(TraceEvent {
            t_secs,
            node,
            create,
            pod: pod.to_string(),
        });
    }
    events.sort_by(|a, b| a.t_secs.total_cmp(&b.t_secs));
    Ok(events)
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2Spec {
    /// Mean latency per call, by EC2 operation name.
    #[serde(default)]
    pub latency_ms: BTreeMap<String, u64>,
    /// [capacity, refill per second] of the account's bucket for mutating calls (default [50, 5]).
    #[serde(default)]
    pub mutating_bucket: Option<[f64; 2]>,
    /// Same for Describe* calls (default [100, 20]).
    #[serde(default)]
    pub non_mutating_bucket: Option<[f64; 2]>,
    #[serde(default)]
    pub error_rate: f64,
    #[serde(default)]
    pub timeout_rate: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("scenario file: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("scenario: {0}")]
    Invalid(String),
}

const BUILT_IN: &[(&str, &str)] = &[
    ("steady", include_str!("../scenarios/steady.toml")),
    (
        "prefix-fragmented",
        include_str!("../scenarios/prefix-fragmented.toml"),
    ),
    (
        "launch-storm-500",
        include_str!("../scenarios/launch-storm-500.toml"),
    ),
    (
        "churn-day-1000",
        include_str!("../scenarios/churn-day-1000.toml"),
    ),
];

impl Scenario {
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text)?;
        if s.nodes.is_empty() || s.vpc.subnets.is_empty() {
            return Err(ScenarioError::Invalid(
                "needs at least one node group and one subnet".into(),
            ));
        }
        for g in &s.nodes {
            if g.subnet >= s.vpc.subnets.len()
                || g.eni_config_subnet
                    .is_some_and(|i| i >= s.vpc.subnets.len())
            {
                return Err(ScenarioError::Invalid(format!(
                    "node group {} names a subnet index that does not exist",
                    g.instance_type
                )));
            }
            if ipam::limits::lookup(&g.instance_type).is_none() {
                return Err(ScenarioError::Invalid(format!(
                    "unknown instance type {:?}",
                    g.instance_type
                )));
            }
        }
        let w = &s.workload;
        if w.mean_lifetime_secs <= 0.0 || w.pods_per_node < 0.0 {
            return Err(ScenarioError::Invalid(
                "workload needs a positive mean_lifetime_secs and pods_per_node >= 0".into(),
            ));
        }
        if let Some(d) = &w.daily {
            if !(0.0..=1.0).contains(&d.trough_ratio) || !(0.0..24.0).contains(&d.peak_hour) {
                return Err(ScenarioError::Invalid(
                    "workload.daily needs 0 <= trough_ratio <= 1 and 0 <= peak_hour < 24".into(),
                ));
            }
        }
        let pod_eni = s.settings.get("ENABLE_POD_ENI").map(String::as_str) == Some("true");
        if !w.security_group_sets.is_empty() && !pod_eni {
            return Err(ScenarioError::Invalid(
                "workload.security_group_sets needs ENABLE_POD_ENI=\"true\" in [settings]".into(),
            ));
        }
        if w.security_group_sets.iter().any(Vec::is_empty) {
            return Err(ScenarioError::Invalid(
                "workload.security_group_sets: a set needs at least one group".into(),
            ));
        }
        match w.security_group_share {
            Some(share) if !(0.0..=1.0).contains(&share) => {
                return Err(ScenarioError::Invalid(
                    "workload.security_group_share must be between 0 and 1".into(),
                ))
            }
            Some(_) if w.security_group_sets.is_empty() => {
                return Err(ScenarioError::Invalid(
                    "workload.security_group_share needs security_group_sets".into(),
                ))
            }
            _ => {}
        }
        for b in &w.bursts {
            if b.mean_lifetime_secs.is_some_and(|l| l <= 0.0) || b.every_secs == Some(0) {
                return Err(ScenarioError::Invalid(
                    "a burst needs a positive mean_lifetime_secs and every_secs".into(),
                ));
            }
        }
        Ok(s)
    }

    /// Reads a scenario file and the trace it names.
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut s = Scenario::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(trace) = &s.workload.trace {
            let trace_path = path.parent().unwrap_or(Path::new(".")).join(trace);
            let text = std::fs::read_to_string(&trace_path)
                .map_err(|e| format!("{}: {e}", trace_path.display()))?;
            let trace = parse_trace(&text).map_err(|e| format!("{}: {e}", trace_path.display()))?;
            let nodes: usize = s.nodes.iter().map(|g| g.count as usize).sum();
            if let Some(e) = trace.iter().find(|e| e.node >= nodes) {
                return Err(format!(
                    "{}: node {} does not exist (the scenario has {nodes} nodes)",
                    trace_path.display(),
                    e.node
                ));
            }
            s.trace = Some(trace);
        }
        Ok(s)
    }

    pub fn built_in(name: &str) -> Option<Scenario> {
        BUILT_IN
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| Scenario::parse(t).expect("built-in scenarios parse"))
    }

    pub fn built_in_names() -> impl Iterator<Item = &'static str> {
        BUILT_IN.iter().map(|(n, _)| *n)
    }
}

/// One node of a running cluster, as `vpcctl simulate --from-cluster` reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct SeenNode {
    pub instance_type: String,
    pub zone: String,
    /// Pods on the pod network.
    pub pods: u32,
}

/// A day of a running cluster as a scenario, in the file format (so it can be printed, edited and
/// read back): its nodes grouped by instance type and zone, launched over half an hour; one subnet
/// per zone; its pods per node, all placed when a node is ready and replaced as they leave; their
/// mean lifetime, taken as the mean age of the pods alive now (for lifetimes drawn as the
/// simulator draws them, exponentially, the two are the same); its settings. The API server knows
/// nothing of subnets, so each zone gets a /14 and exhaustion is not modelled. Returns the text and
/// notes on what was left out.
pub fn from_cluster(
    nodes: &[SeenNode],
    pod_ages_secs: &[f64],
    settings: &BTreeMap<String, String>,
    hours: u64,
) -> Result<(String, Vec<String>), ScenarioError> {
    use toml::{Table, Value};
    let mut notes = Vec::new();
    let mut groups: BTreeMap<(&str, &str), (u32, u64)> = BTreeMap::new();
    for n in nodes {
        if ipam::limits::lookup(&n.instance_type).is_none() {
            notes.push(format!(
                "a node of instance type {:?} left out: not in the limits table",
                n.instance_type
            ));
            continue;
        }
        let g = groups.entry((&n.zone, &n.instance_type)).or_default();
        g.0 += 1;
        g.1 += u64::from(n.pods);
    }
    if groups.is_empty() {
        return Err(ScenarioError::Invalid(
            "the cluster has no node the VPC CNI runs on with a known instance type".into(),
        ));
    }
    let zones: Vec<&str> = {
        let mut z: Vec<&str> = groups.keys().map(|(z, _)| *z).collect();
        z.dedup();
        z
    };
    if zones.len() > 64 {
        return Err(ScenarioError::Invalid(format!(
            "{} zones: at most 64 fit a /14 each in 10.0.0.0/8",
            zones.len()
        )));
    }
    let table = |pairs: Vec<(&str, Value)>| -> Value {
        Value::Table(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    };
    let subnets = zones
        .iter()
        .enumerate()
        .map(|(i, z)| {
            table(vec![
                ("cidr", Value::from(format!("10.{}.0.0/14", i * 4))),
                ("az", Value::from(*z)),
            ])
        })
        .collect::<Vec<_>>();
    let (count, pods): (u32, u64) = groups.values().fold((0, 0), |(c, p), g| (c + g.0, p + g.1));
    let node_groups = groups
        .iter()
        .map(|((zone, instance_type), (n, _))| {
            let subnet = zones.iter().position(|z| z == zone).expect("listed");
            table(vec![
                ("instance_type", Value::from(*instance_type)),
                ("count", Value::from(i64::from(*n))),
                ("subnet", Value::from(subnet as i64)),
                ("launch_spread_secs", Value::from(1800)),
            ])
        })
        .collect::<Vec<_>>();
    let pods_per_node = pods as f64 / f64::from(count);
    let lifetime = if pod_ages_secs.is_empty() {
        notes.push("no pods: a mean pod lifetime of an hour assumed".into());
        3600.0
    } else {
        (pod_ages_secs.iter().sum::<f64>() / pod_ages_secs.len() as f64).max(60.0)
    };
    let workload = table(vec![
        (
            "pods_per_node",
            Value::from((pods_per_node * 100.0).round() / 100.0),
        ),
        ("mean_lifetime_secs", Value::from(lifetime.round())),
        ("initial_burst", Value::from(pods_per_node.round() as i64)),
    ]);
    let mut doc = Table::new();
    doc.insert("name".into(), Value::from("from-cluster"));
    doc.insert(
        "description".into(),
        Value::from(format!(
            "{count} nodes and {pods} pods read from a cluster; subnets are not in the API server (a /14 per zone): write yours under [vpc] to model their exhaustion"
        )),
    );
    doc.insert(
        "duration_secs".into(),
        Value::from((hours * 3600).min(i64::MAX as u64) as i64),
    );
    doc.insert("sample_every_secs".into(), Value::from(300));
    doc.insert(
        "vpc".into(),
        table(vec![
            ("cidr", Value::from("10.0.0.0/8")),
            ("subnets", Value::Array(subnets)),
        ]),
    );
    doc.insert("nodes".into(), Value::Array(node_groups));
    doc.insert("workload".into(), workload);
    doc.insert(
        "settings".into(),
        Value::Table(
            settings
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                .collect(),
        ),
    );
    let text = toml::to_string(&doc).map_err(|e| ScenarioError::Invalid(e.to_string()))?;
    Scenario::parse(&text)?;
    Ok((text, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_becomes_a_scenario_by_type_and_zone() {
        let node = |t: &str, z: &str, pods| SeenNode {
            instance_type: t.into(),
            zone: z.into(),
            pods,
        };
        let nodes = [
            node("m5.large", "us-west-2a", 10),
            node("m5.large", "us-west-2a", 20),
            node("m5.xlarge", "us-west-2b", 30),
            node("m5.large", "us-west-2b", 0),
            node("x9.huge", "us-west-2b", 5),
        ];
        let settings = BTreeMap::from([("WARM_IP_TARGET".to_string(), "3".to_string())]);
        let (text, notes) = from_cluster(&nodes, &[600.0, 1800.0], &settings, 2).unwrap();
        let s = Scenario::parse(&text).unwrap();
        assert_eq!(s.duration_secs, 7200);
        let zones: Vec<&str> = s.vpc.subnets.iter().map(|x| x.az.as_str()).collect();
        assert_eq!(zones, ["us-west-2a", "us-west-2b"]);
        let groups: Vec<(&str, u32, usize)> = s
            .nodes
            .iter()
            .map(|g| (g.instance_type.as_str(), g.count, g.subnet))
            .collect();
        assert_eq!(
            groups,
            [("m5.large", 2, 0), ("m5.large", 1, 1), ("m5.xlarge", 1, 1)]
        );
        // 60 pods on the 4 nodes kept; the unknown type's node and pods are left out, and said so.
        assert_eq!(s.workload.pods_per_node, 15.0);
        assert_eq!(s.workload.initial_burst, 15);
        assert_eq!(s.workload.mean_lifetime_secs, 1200.0);
        assert_eq!(s.settings, settings);
        assert!(notes.iter().any(|n| n.contains("x9.huge")), "{notes:?}");
        assert!(from_cluster(&nodes[4..], &[], &settings, 1).is_err());
    }

    #[test]
    fn built_ins_parse() {
        for n in Scenario::built_in_names() {
            assert!(Scenario::built_in(n).is_some(), "{n}");
        }
    }

    #[test]
    fn unknown_keys_and_types_are_errors() {
        let base = include_str!("../scenarios/steady.toml");
        let bad = base.replace("duration_secs", "duration_sec");
        assert!(Scenario::parse(&bad).is_err());
        let bad = base.replace("m5.large", "m5.lrage");
        assert!(Scenario::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("m5.lrage"));
    }
}
