//! The scenario file format (TOML), documented in docs/simulate.md.

use serde::Deserialize;
use std::collections::BTreeMap;

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

/// Pods arrive on each node as a Poisson process and live an exponentially distributed time, so that a node
/// runs `pods_per_node` pods on average once warm. Pods beyond what the node can hold are not scheduled.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub pods_per_node: f64,
    pub mean_lifetime_secs: f64,
    /// Pods created on every node the moment it is ready, as a deployment scaling out would.
    #[serde(default)]
    pub initial_burst: u32,
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
        "bench-1000-nodes",
        include_str!("../scenarios/bench-1000-nodes.toml"),
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
        if s.workload.mean_lifetime_secs <= 0.0 || s.workload.pods_per_node < 0.0 {
            return Err(ScenarioError::Invalid(
                "workload needs a positive mean_lifetime_secs and pods_per_node >= 0".into(),
            ));
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

#[cfg(test)]
mod tests {
    use super::*;

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
