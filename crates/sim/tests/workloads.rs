//! The workload models on scenarios small enough to work out by hand.

use sim::{Cluster, Report, Scenario};
use std::io::Write;

fn run(text: &str) -> Report {
    Cluster::new(Scenario::parse(text).unwrap())
        .unwrap()
        .run()
        .unwrap()
}

fn in_use_at(r: &Report, t_secs: f64) -> u64 {
    r.timeline
        .iter()
        .find(|s| s.t_secs == t_secs)
        .unwrap_or_else(|| panic!("no sample at {t_secs}"))
        .in_use
}

/// Two m5.large nodes (29 max pods), the second launched at 1000 s; pods from the trace only.
const TRACED: &str = r#"
name = "traced"
duration_secs = 2000
sample_every_secs = 50
[vpc]
cidr = "10.0.0.0/16"
subnets = [{ cidr = "10.0.0.0/20", az = "us-west-2a" }]
[[nodes]]
instance_type = "m5.large"
count = 1
[[nodes]]
instance_type = "m5.large"
count = 1
start_secs = 1000
[workload]
pods_per_node = 0
mean_lifetime_secs = 1
trace = "trace.csv"
"#;

#[test]
fn a_trace_creates_and_deletes_the_pods_it_names() {
    let dir = tempdir();
    std::fs::write(dir.join("scenario.toml"), TRACED).unwrap();
    let trace = "# node 1 is launched at 1000 s\n\
                 t_secs,node,action,pod\n\
                 100,0,create,a\n\
                 100,0,create,b\n\
                 200,0,delete,a\n\
                 300,1,create,early\n\
                 320,1,delete,early\n\
                 1500,1,create,c\n\
                 1600,0,delete,never-created\n";
    std::fs::File::create(dir.join("trace.csv"))
        .unwrap()
        .write_all(trace.as_bytes())
        .unwrap();
    let s = Scenario::load(&dir.join("scenario.toml")).unwrap();
    let r = Cluster::new(s).unwrap().run().unwrap();
    // Node 0 is warm long before 100 s: a and b get addresses at once; a goes at 200 s.
    assert_eq!(in_use_at(&r, 150.0), 2);
    assert_eq!(in_use_at(&r, 250.0), 1);
    // "early" names node 1 before it exists: not schedulable, and its delete is nothing to do. c runs
    // on node 1 from 1500 s; the delete of a pod never created is ignored.
    assert_eq!(in_use_at(&r, 1550.0), 2);
    assert_eq!(r.unschedulable_pods, 1);
    // Events that happened: creates of a, b, early (refused) and c; deletes of a.
    assert_eq!(r.pod_events, 5);
    assert_eq!(r.add_wait.adds, 3);
    assert_eq!(r.add_wait.immediate, 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_trace_is_refused_with_its_line() {
    let dir = tempdir();
    std::fs::write(dir.join("scenario.toml"), TRACED).unwrap();
    let cases = [
        ("t,node,action,pod\n", "header"),
        (
            "t_secs,node,action,pod\n10,0,start,a\n",
            "line 2: action \"start\"",
        ),
        (
            "t_secs,node,action,pod\n-1,0,create,a\n",
            "line 2: \"-1\" is not a time",
        ),
        (
            "t_secs,node,action,pod\n10,0,create\n",
            "line 2: 4 fields expected, found 3",
        ),
        (
            "t_secs,node,action,pod\n10,2,create,a\n",
            "node 2 does not exist",
        ),
    ];
    for (trace, error) in cases {
        std::fs::write(dir.join("trace.csv"), trace).unwrap();
        let e = Scenario::load(&dir.join("scenario.toml")).unwrap_err();
        assert!(
            e.contains(error) && e.contains("trace.csv"),
            "{trace:?}: {e}"
        );
    }
    // Parsed without its file, the scenario cannot run: the trace would silently be missing.
    let e = Cluster::new(Scenario::parse(TRACED).unwrap())
        .err()
        .unwrap();
    assert!(e.contains("trace.csv"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bursts_land_on_ready_nodes_and_repeat() {
    // Two nodes; 5 pods on each at 600 s and every 600 s after, living far longer than the run.
    let r = run(r#"
name = "bursts"
duration_secs = 1500
sample_every_secs = 50
[vpc]
cidr = "10.0.0.0/16"
subnets = [{ cidr = "10.0.0.0/20", az = "us-west-2a" }]
[[nodes]]
instance_type = "m5.large"
count = 2
[workload]
pods_per_node = 0
mean_lifetime_secs = 1
bursts = [{ at_secs = 600, pods_per_node = 5, every_secs = 600, mean_lifetime_secs = 1e9 }]
"#);
    assert_eq!(in_use_at(&r, 550.0), 0);
    assert_eq!(in_use_at(&r, 650.0), 10);
    assert_eq!(in_use_at(&r, 1250.0), 20);
    assert_eq!(r.pod_events, 20);
}

#[test]
fn the_daily_curve_peaks_at_its_hour_with_its_trough_ratio() {
    // Pods live 60 s on average, so the pods running follow the arrival rate closely. A trough 0.2 of
    // the peak gives a cosine of amplitude (1 - 0.2) / (1 + 0.2) = 2/3 around the mean: 20 nodes of 10
    // pods on average run 200 * 5/3 = 333 pods at noon and 200 * 1/3 = 67 at midnight.
    let r = run(r#"
name = "daily"
duration_secs = 86400
sample_every_secs = 60
[vpc]
cidr = "10.0.0.0/16"
subnets = [{ cidr = "10.0.0.0/18", az = "us-west-2a" }]
[[nodes]]
instance_type = "m5.xlarge"
count = 20
[workload]
pods_per_node = 10
mean_lifetime_secs = 60
daily = { peak_hour = 12, trough_ratio = 0.2 }
"#);
    let mean_over = |from_h: f64, to_h: f64| {
        let window: Vec<u64> = r
            .timeline
            .iter()
            .filter(|s| s.t_secs >= from_h * 3600.0 && s.t_secs < to_h * 3600.0)
            .map(|s| s.in_use)
            .collect();
        window.iter().sum::<u64>() as f64 / window.len() as f64
    };
    let noon = mean_over(11.5, 12.5);
    let midnight = mean_over(23.5, 24.0).min(mean_over(0.1, 0.5));
    assert!((300.0..366.0).contains(&noon), "noon {noon}");
    assert!((45.0..90.0).contains(&midnight), "midnight {midnight}");
    let day = mean_over(0.0, 24.0);
    assert!((185.0..215.0).contains(&day), "mean over the day {day}");
}

#[test]
fn an_account_bucket_paces_a_launch_storm_and_lighter_settings_ready_sooner() {
    // 20 m5.large nodes at once, 5 mutating calls of burst and 1 a second, no pods. WARM_ENI_TARGET=2
    // wants two ENIs' worth free: fill the primary ENI, then create, attach and configure a second with
    // its addresses, 4 mutating calls a node. 80 calls, 75 of them waiting for the refill: the last node
    // cannot be ready before 75 s. WARM_IP_TARGET=1 takes one call a node: 15 s at the least.
    let storm = |settings: &str| {
        run(&format!(
            r#"
name = "storm"
duration_secs = 1200
[vpc]
cidr = "10.0.0.0/16"
subnets = [{{ cidr = "10.0.0.0/20", az = "us-west-2a" }}]
[[nodes]]
instance_type = "m5.large"
count = 20
[workload]
pods_per_node = 0
mean_lifetime_secs = 1
[ec2]
mutating_bucket = [5, 1]
[settings]
{settings}
"#
        ))
    };
    let heavy = storm("WARM_ENI_TARGET = \"2\"");
    let light = storm("WARM_IP_TARGET = \"1\"");
    let ok = |r: &Report, op: &str| r.ec2_calls.get(op).map_or(0, |c| c.ok);
    for op in [
        "AssignPrivateIpAddresses",
        "CreateNetworkInterface",
        "AttachNetworkInterface",
        "ModifyNetworkInterfaceAttribute",
    ] {
        assert_eq!(ok(&heavy, op), 20, "{op}\n{}", heavy.render());
    }
    assert_eq!(ok(&light, "AssignPrivateIpAddresses"), 20);
    assert_eq!(ok(&light, "CreateNetworkInterface"), 0);
    for r in [&heavy, &light] {
        assert_eq!(
            (r.nodes, r.node_ready.nodes, r.nodes_never_ready),
            (20, 20, 0)
        );
    }
    assert!(heavy.node_ready.max_ms >= 75_000.0, "{}", heavy.render());
    assert!(light.node_ready.max_ms >= 15_000.0, "{}", light.render());
    assert!(
        light.node_ready.max_ms < heavy.node_ready.max_ms / 2.0,
        "{}\n{}",
        heavy.render(),
        light.render()
    );
}

/// A directory of the calling test's own (tests run on threads of one process).
fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sim-workloads-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_long_run_reports_its_progress_in_order_and_ends_at_one() {
    let mut seen = Vec::new();
    // Some hundred thousand events: progress is told every 65,536.
    let scenario = Scenario::built_in("launch-storm-500").unwrap();
    let events = Cluster::new(scenario.clone())
        .unwrap()
        .run()
        .unwrap()
        .pod_events;
    let report = Cluster::new(scenario)
        .unwrap()
        .run_with_progress(&mut |done| seen.push(done))
        .unwrap();
    assert_eq!(
        report.pod_events, events,
        "progress does not change the run"
    );
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(
        seen[..seen.len() - 1].iter().all(|d| *d > 0.0 && *d < 1.0),
        "{seen:?}"
    );
    assert_eq!(seen.last(), Some(&1.0));
}

/// An IPv6 cluster: 20 nodes launched together against a tight mutating bucket, pods churning.
const IPV6: &str = r#"
name = "ipv6"
duration_secs = 3600
sample_every_secs = 600
[vpc]
cidr = "10.0.0.0/16"
ipv6_cidr = "2600:1f14:abc:de00::/56"
subnets = [{ cidr = "10.0.0.0/20", az = "us-west-2a", ipv6_cidr = "2600:1f14:abc:de00::/64" }]
[[nodes]]
instance_type = "m5.large"
count = 20
[workload]
pods_per_node = 60
mean_lifetime_secs = 600
initial_burst = 30
[settings]
ENABLE_IPv6 = "true"
ENABLE_IPv4 = "false"
ENABLE_PREFIX_DELEGATION = "true"
[ec2]
mutating_bucket = [5, 2]
"#;

#[test]
fn ipv6_nodes_make_one_ec2_call_each_and_serve_every_pod_at_once() {
    let scenario = Scenario::parse(IPV6).unwrap();
    let mut cluster = Cluster::new(scenario).unwrap();
    while cluster.step().unwrap() {}
    let r = cluster.report();
    // One AssignIpv6Addresses per node, retried when the bucket is empty, and no other change.
    let mutating: Vec<(&String, u64)> = r
        .ec2_calls
        .iter()
        .filter(|(op, _)| !op.starts_with("Describe"))
        .map(|(op, c)| (op, c.ok))
        .filter(|(_, ok)| *ok > 0)
        .collect();
    assert_eq!(
        mutating,
        [(&"AssignIpv6Addresses".to_string(), 20)],
        "{:?}",
        r.ec2_calls
    );
    assert!(
        r.throttled_retries > 0,
        "the bucket of 5 throttles 20 launches"
    );
    assert_eq!(r.nodes_never_ready, 0);
    // Once a node has its /80, no ADD waits; m5.large takes 110 pods in IPv6 (prefix delegation).
    assert_eq!(r.add_wait.immediate, r.add_wait.adds);
    assert!(r.add_wait.adds > 20 * 60, "{}", r.add_wait.adds);
    assert_eq!(r.unschedulable_pods, 0);
    let prefixes: std::collections::HashSet<_> = cluster
        .nodes
        .iter()
        .map(|n| n.ipv6_prefix().unwrap())
        .collect();
    assert_eq!(prefixes.len(), 20, "one /80 each");
    // No IPv4 address of the subnet is held beyond the primaries; pods are counted in use.
    let last = r.timeline.last().unwrap();
    assert_eq!(last.held, 0);
    assert!(last.in_use > 0);

    let refused = |text: &str| Cluster::new(Scenario::parse(text).unwrap()).err().unwrap();
    let no_block = IPV6.replace(", ipv6_cidr = \"2600:1f14:abc:de00::/64\"", "");
    assert!(refused(&no_block).contains("no ipv6_cidr"));
    let xen = IPV6.replace("m5.large", "m4.large");
    assert!(refused(&xen).contains("m4.large"));
}
