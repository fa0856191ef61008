//! Security groups for pods in the simulator: nodes make their trunk and their pods' branch ENIs
//! through the daemon's choreography, against the simulated VPC's trunk rules.

use sim::{Cluster, Scenario};
use std::time::Duration;

fn cluster(instance_type: &str, count: u32, workload: &str, settings: &str) -> Cluster {
    try_cluster(instance_type, count, workload, settings).unwrap()
}

fn try_cluster(
    instance_type: &str,
    count: u32,
    workload: &str,
    settings: &str,
) -> Result<Cluster, String> {
    let text = format!(
        r#"
name = "sgp"
duration_secs = 86400
seed = 11
[vpc]
cidr = "10.0.0.0/16"
subnets = [{{ cidr = "10.0.0.0/18", az = "us-west-2a" }}]
[[nodes]]
instance_type = "{instance_type}"
count = {count}
[workload]
{workload}
[settings]
ENABLE_POD_ENI = "true"
{settings}
"#
    );
    Cluster::new(Scenario::parse(&text).unwrap())
}

fn calls(c: &Cluster, op: &str) -> u64 {
    c.report().ec2_calls.get(op).map_or(0, |n| n.ok)
}

fn step(c: &mut Cluster, secs: u64) {
    c.run_for(Duration::from_secs(secs), true).unwrap();
}

const BRANCH_CALLS: [&str; 4] = [
    "CreateNetworkInterface",
    "AssociateTrunkInterface",
    "DisassociateTrunkInterface",
    "DeleteNetworkInterface",
];

fn branch_calls(c: &Cluster) -> [u64; 4] {
    BRANCH_CALLS.map(|op| calls(c, op))
}

#[test]
fn a_rolling_update_hands_branches_on_instead_of_making_new_ones() {
    let mut c = cluster(
        "m5.large",
        1,
        "pods_per_node = 0\nmean_lifetime_secs = 1\nsecurity_group_sets = [[\"sg-app\"]]",
        "",
    );
    step(&mut c, 60);
    let trunks: Vec<_> = c
        .vpc
        .interfaces()
        .filter(|e| e.interface_type == "trunk")
        .collect();
    assert_eq!(trunks.len(), 1, "one trunk, made by the node");
    assert!(c.nodes[0].pool.enis().iter().any(|e| e.info.is_trunk));

    let old: Vec<u64> = (0..4).map(|_| c.start_pod(0)).collect();
    step(&mut c, 30);
    let b = c.nodes[0].branches().unwrap();
    assert_eq!((b.assigned(), b.waiting()), (4, 0));
    let before = branch_calls(&c);
    let waits_before = c.report().add_wait.adds;

    // maxSurge 1: each new pod starts, then an old one ends.
    for pod in old {
        c.start_pod(0);
        step(&mut c, 5);
        c.stop_pod(0, pod);
        step(&mut c, 5);
    }
    // The branch left over after the last old pod is deleted once its cooldown is over.
    step(&mut c, 120);
    let after = branch_calls(&c);
    let delta: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    // A controller that makes a branch per pod: 4 creations and associations, 4 of each on the
    // way out. Here the surge pod's branch is the only one made, and one is deleted.
    assert_eq!(delta, [1, 1, 1, 1], "{BRANCH_CALLS:?}");
    let b = c.nodes[0].branches().unwrap();
    assert_eq!((b.assigned(), b.warm(), b.in_flight()), (4, 0, 0));
    let r = c.report();
    assert_eq!(r.add_wait.adds - waits_before, 4);
    assert_eq!(r.leaked_enis, 0);
}

#[test]
fn pods_with_groups_get_branches_within_the_limit_and_nothing_leaks_over_a_day() {
    let mut c = cluster(
        "m5.xlarge",
        3,
        "pods_per_node = 10\nmean_lifetime_secs = 600\n\
         security_group_sets = [[\"sg-app\"], [\"sg-db\", \"sg-app\"]]\nsecurity_group_share = 0.5",
        "WARM_BRANCH_TARGET = \"1\"",
    );
    // Invariants after every event: VLAN ids unique per node, the branch limit, no ENI unattached
    // and unassociated while nothing is in flight.
    step(&mut c, 6 * 3600);
    let r = c.report();
    assert_eq!(r.leaked_enis, 0);
    let [created, associated, disassociated, deleted] = branch_calls(&c);
    // Three trunks are created too, and never associated.
    assert!(associated > 50, "{associated} branches over six hours");
    assert!(created >= associated + 3, "{created} {associated}");
    assert!(
        deleted >= disassociated && disassociated > 0,
        "{deleted} {disassociated}"
    );
    for n in &c.nodes {
        let b = n.branches().unwrap();
        assert!(b.assigned() > 0 && b.trunk().is_some());
        assert!(b.assigned() + b.warm() <= 18);
    }
    // Pods without groups still take the pool's addresses.
    assert!(c.nodes.iter().all(|n| !n.running.is_empty()));
}

#[test]
fn without_spares_the_surge_pod_waits_for_ec2_and_with_one_it_does_not() {
    let rollout = |settings: &str| {
        let mut c = cluster(
            "m5.large",
            1,
            "pods_per_node = 0\nmean_lifetime_secs = 1\nsecurity_group_sets = [[\"sg-app\"]]",
            settings,
        );
        step(&mut c, 60);
        let old = c.start_pod(0);
        step(&mut c, 30);
        let waited = c.report().add_wait.immediate;
        c.start_pod(0);
        step(&mut c, 5);
        c.stop_pod(0, old);
        step(&mut c, 5);
        c.report().add_wait.immediate - waited
    };
    assert_eq!(rollout(""), 0, "the surge pod waited for its branch");
    assert_eq!(
        rollout("WARM_BRANCH_TARGET = \"1\""),
        1,
        "a spare was ready"
    );
}

#[test]
fn a_scenario_with_groups_but_without_pod_enis_is_refused() {
    let text = r#"
name = "bad"
duration_secs = 60
[vpc]
cidr = "10.0.0.0/16"
subnets = [{ cidr = "10.0.0.0/18", az = "us-west-2a" }]
[[nodes]]
instance_type = "m5.large"
count = 1
[workload]
pods_per_node = 1
mean_lifetime_secs = 60
security_group_sets = [["sg-app"]]
"#;
    let e = Scenario::parse(text).unwrap_err().to_string();
    assert!(e.contains("ENABLE_POD_ENI"), "{e}");
    let with_pod_eni = text.replace(
        "[workload]",
        "[settings]\nENABLE_POD_ENI = \"true\"\n[workload]",
    );
    assert!(Scenario::parse(&with_pod_eni).is_ok());
    let e = Scenario::parse(&format!("{with_pod_eni}security_group_share = 1.5\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("security_group_share"), "{e}");
}

/// The simulated nodes make their own branches: the scenario need not say POD_ENI_MANAGER=node,
/// and one that says controller is told there is none.
#[test]
fn the_simulated_nodes_make_their_branches_and_a_controller_is_refused() {
    let workload = "pods_per_node = 0\nmean_lifetime_secs = 1\nsecurity_group_sets = [[\"sg-a\"]]";
    assert!(try_cluster("m5.large", 1, workload, "WARM_BRANCH_TARGET = \"1\"").is_ok());
    let e = try_cluster("m5.large", 1, workload, "POD_ENI_MANAGER = \"controller\"")
        .err()
        .expect("refused");
    assert!(e.contains("no resource controller"), "{e}");
}
