use sim::{Cluster, Scenario};
use std::time::Duration;

/// One node of `instance_type` in a roomy VPC, no random workload, `settings` as upstream env variables.
pub fn one_node(instance_type: &str, settings: &[(&str, &str)]) -> Cluster {
    let settings: String = settings
        .iter()
        .map(|(k, v)| format!("{k} = \"{v}\"\n"))
        .collect();
    let text = format!(
        r#"
name = "table"
duration_secs = 1000000
[vpc]
cidr = "10.0.0.0/16"
subnets = [{{ cidr = "10.0.0.0/18", az = "us-west-2a" }}]
[[nodes]]
instance_type = "{instance_type}"
count = 1
[workload]
pods_per_node = 0
mean_lifetime_secs = 1
[settings]
{settings}
"#
    );
    let mut c = Cluster::new(Scenario::parse(&text).unwrap()).unwrap();
    c.run_for(Duration::from_secs(600), true).unwrap();
    c
}

/// Runs `pods` pods on node 0 (starting or stopping pods to get there) and lets the pool settle.
pub fn set_pods(c: &mut Cluster, running: &mut Vec<u64>, pods: usize) {
    while running.len() < pods {
        running.push(c.start_pod(0));
        c.run_for(Duration::from_secs(1), true).unwrap();
    }
    while running.len() > pods {
        let p = running.pop().unwrap();
        c.stop_pod(0, p);
    }
    c.run_for(Duration::from_secs(900), true).unwrap();
}
