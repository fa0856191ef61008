//! Random pod churn against the simulated VPC, with the invariants checked after every event.

mod common;
use common::{one_node, set_pods};
use ipam::{decide, Demand};
use proptest::prelude::*;
use sim::{Cluster, Scenario};
use std::time::Duration;

fn churn(seed: u64, instance: &str, settings: &str, faults: bool, subnet: &str) -> Cluster {
    let text = format!(
        r#"
name = "churn"
duration_secs = 1000000
seed = {seed}
[vpc]
cidr = "10.0.0.0/16"
subnets = [{{ cidr = "{subnet}", az = "us-west-2a" }}]
[[nodes]]
instance_type = "{instance}"
count = 3
launch_spread_secs = 20
[workload]
pods_per_node = 12
mean_lifetime_secs = 120
initial_burst = 8
[settings]
{settings}
[ec2]
mutating_bucket = [10, 2]
error_rate = {err}
timeout_rate = {timeout}
"#,
        err = if faults { 0.05 } else { 0.0 },
        timeout = if faults { 0.02 } else { 0.0 },
    );
    Cluster::new(Scenario::parse(&text).unwrap()).unwrap()
}

const SETTINGS: [&str; 5] = [
    "",
    "WARM_IP_TARGET = \"2\"\nMINIMUM_IP_TARGET = \"4\"",
    "ENABLE_PREFIX_DELEGATION = \"true\"",
    "ENABLE_PREFIX_DELEGATION = \"true\"\nWARM_IP_TARGET = \"3\"",
    "WARM_ENI_TARGET = \"0\"\nWARM_IP_TARGET = \"1\"\nIP_COOLDOWN_PERIOD = \"60\"",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn churn_keeps_the_invariants(
        seed in 0u64..1000,
        setting in 0usize..SETTINGS.len(),
        instance in prop::sample::select(vec!["t3.medium", "m5.large", "c5.xlarge"]),
        faults in any::<bool>(),
        small_subnet in any::<bool>(),
    ) {
        // A /25 runs out of addresses and aligned /28s: the exhausted-subnet paths get exercised too.
        let subnet = if small_subnet { "10.0.0.0/25" } else { "10.0.0.0/20" };
        let mut c = churn(seed, instance, SETTINGS[setting], faults, subnet);
        c.run_for(Duration::from_secs(1800), true).map_err(TestCaseError::fail)?;
    }
}

/// With steady demand the pool settles where the policy wants nothing more: the targets hold.
#[test]
fn steady_demand_converges_to_the_targets() {
    for settings in [
        vec![],
        vec![("WARM_IP_TARGET", "3"), ("MINIMUM_IP_TARGET", "8")],
        vec![
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_PREFIX_TARGET", "2"),
        ],
    ] {
        let mut c = one_node("m5.xlarge", &settings);
        let mut running = Vec::new();
        for pods in [5, 30, 12, 40, 3] {
            set_pods(&mut c, &mut running, pods);
            let n = &c.nodes[0];
            let d = decide(&n.pool, &n.memory, &n.settings, c.now, &Demand::default());
            assert!(
                d.actions.is_empty(),
                "{settings:?} with {pods} pods still wants {:?}",
                d.actions
            );
            let st = n.pool.stats();
            assert_eq!(st.assigned as usize, pods);
            if n.settings.ip_targets_defined() {
                assert!(
                    st.available >= n.settings.warm_ip_target
                        && st.total >= n.settings.minimum_ip_target,
                    "{settings:?} {st:?}"
                );
            } else if n.settings.prefix_delegation {
                assert!(
                    st.available >= 16 * n.settings.warm_prefix_target,
                    "{settings:?} {st:?}"
                );
            } else {
                assert!(
                    st.available >= n.pool.node.slots_per_eni,
                    "{settings:?} {st:?}"
                );
            }
        }
    }
}
