//! Security groups for pods where the node makes its branches (`POD_ENI_MANAGER=node`), through the
//! real daemon, its socket, the simulated VPC over HTTP and the test API server (needs root):
//! * a pod's ADD when a warm branch with its groups is there, p50 and p99, against the 5 ms target
//!   and against the ADD of a pod without groups (an address of the warm pool) in the same run;
//! * a pod's ADD when its branch must be made: the round trip less what the daemon spent waiting
//!   for CreateNetworkInterface and AssociateTrunkInterface (its own latency metrics), against the
//!   issue's "the EC2 calls' latency plus 10 ms";
//! * the EC2 calls of a rolling update of 20 pods (one new pod, then one old one gone, in turn),
//!   counted until the last spare branch is deleted after the cooldown, against the 4 a pod that
//!   the VPC resource controller gives its own branch costs (create, associate, disassociate,
//!   delete).
//!
//! Run with `bench/branches.sh`.

use proto::{Attachment, PodRef, Reply, Request};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};
use testbed::{Binaries, Options, Testbed};

const WARM_ADDS: usize = 60;
/// Pods without groups, each served from the warm pool: an address released goes into its cooldown,
/// so every one of them needs an address of its own, all there before the first; fewer than the
/// spare ENI's 14 (WARM_ENI_TARGET=1), so that the pool's growth (whose EC2 calls would also delay
/// the cold branch) is not measured.
const PLAIN_ADDS: usize = 12;
const ROLLING: usize = 20;
const TARGET_WARM_MS: f64 = 5.0;
const TARGET_COLD_OVERHEAD_MS: f64 = 10.0;
/// Create, associate, disassociate and delete: a branch per pod, as EKS's controller does.
const CALLS_PER_POD_UPSTREAM: u64 = 4;
const BRANCH_OPS: [&str; 4] = [
    "CreateNetworkInterface",
    "AssociateTrunkInterface",
    "DisassociateTrunkInterface",
    "DeleteNetworkInterface",
];

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn attachment(name: &str) -> Attachment {
    Attachment {
        network: "aws-cni".into(),
        container_id: format!("sandbox-{name}"),
        ifname: "eth0".into(),
    }
}

/// The pod's ADD round trip, and its answer.
fn add(socket: &Path, name: &str) -> (Duration, proto::Allocation) {
    let request = Request::Add {
        attachment: attachment(name),
        pod: PodRef {
            namespace: "shop".into(),
            name: name.into(),
            infra_container_id: String::new(),
            uid: String::new(),
        },
        netns: format!("/var/run/netns/{name}"),
    };
    let started = Instant::now();
    let reply = proto::call(socket, &request, Duration::from_secs(60)).expect("the daemon answers");
    let took = started.elapsed();
    match reply {
        Reply::Added { allocation } => (took, allocation),
        other => panic!("ADD of {name}: {other:?}"),
    }
}

fn del(socket: &Path, name: &str) {
    let request = Request::Del {
        attachment: attachment(name),
        pod: None,
        reason: proto::DelReason::PodDeleted,
    };
    let reply = proto::call(socket, &request, Duration::from_secs(60)).expect("the daemon answers");
    assert!(
        matches!(reply, Reply::Deleted { released: Some(_) }),
        "{reply:?}"
    );
}

/// A Pod object on the node, labelled `app`.
fn pod(tb: &Testbed, name: &str, app: &str) {
    tb.kube.as_ref().expect("an API server").apply(
        "pods",
        json!({"metadata": {"namespace": "shop", "name": name, "labels": {"app": app}},
            "spec": {"nodeName": tb.nodes[0].name, "containers": [{"name": "c", "image": "x"}]}}),
    );
}

/// What the daemon's metrics say it spent waiting for `operation`, in ms, so far.
fn ec2_ms(tb: &Testbed, operation: &str) -> f64 {
    let metrics = tb.nodes[0].metrics().expect("metrics");
    metrics
        .lines()
        .filter(|l| l.starts_with("awscni_aws_api_latency_ms_sum"))
        .filter(|l| l.contains(&format!("api=\"{operation}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// EC2's count of the branch calls so far.
fn branch_calls(tb: &Testbed) -> u64 {
    let model = tb.vpc_model();
    let vpc = model.lock().expect("vpc lock");
    vpc.calls
        .iter()
        .filter(|(op, _)| BRANCH_OPS.contains(&op.name()))
        .map(|(_, c)| c.ok + c.throttled + c.failed)
        .sum()
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED branches benchmark: needs root for network namespaces");
        return;
    }
    let options = Options {
        // 38 branches: the rolling update's 20 pods and its surge.
        instance_type: "m5.2xlarge".into(),
        kubernetes: true,
        daemon_env: [
            ("ENABLE_POD_ENI", "true"),
            ("POD_ENI_MANAGER", "node"),
            ("AWS_VPC_K8S_CNI_LOGLEVEL", "INFO"),
            ("DISABLE_LEAKED_ENI_CLEANUP", "true"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec(),
        ..Options::default()
    };
    let binaries = Binaries {
        ipamd: env!("CARGO_BIN_EXE_vpc-ipamd").into(),
        plugin: std::path::PathBuf::new(),
    };
    let mut tb = Testbed::start(&options, binaries).expect("testbed");
    let api = tb.kube.as_ref().expect("an API server");
    for (name, app, group) in [("web", "web", "sg-web"), ("api", "api", "sg-api")] {
        api.apply(
            "securitygrouppolicies",
            json!({"metadata": {"namespace": "shop", "name": name}, "spec": {
                "podSelector": {"matchLabels": {"app": app}},
                "securityGroups": {"groupIds": [group]}}}),
        );
    }
    tb.start_daemon(0).expect("the daemon starts");
    let socket = tb.nodes[0].socket();

    // The trunk and a first branch; then a branch for another set of groups, cold.
    pod(&tb, "web-first", "web");
    add(&socket, "web-first");
    tb.nodes[0].settle().expect("the daemon settles");
    let before = ec2_ms(&tb, "CreateNetworkInterface") + ec2_ms(&tb, "AssociateTrunkInterface");
    pod(&tb, "api-cold", "api");
    let (cold, _) = add(&socket, "api-cold");
    let ec2 =
        ec2_ms(&tb, "CreateNetworkInterface") + ec2_ms(&tb, "AssociateTrunkInterface") - before;
    let overhead = ms(cold) - ec2;
    println!(
        "branch ADD, cold (a branch made for the pod): {:.1} ms, of which EC2 {ec2:.1} ms; the daemon's own {overhead:.1} ms against the {TARGET_COLD_OVERHEAD_MS} ms target: ratio {:.2}",
        ms(cold),
        overhead / TARGET_COLD_OVERHEAD_MS
    );

    // Warm: each pod ends, the next with the same groups takes its branch; and pods without groups.
    let mut warm = Vec::new();
    let mut previous = "web-first".to_string();
    for i in 0..WARM_ADDS {
        let name = format!("web-{i}");
        pod(&tb, &name, "web");
        del(&socket, &previous);
        warm.push(add(&socket, &name).0);
        previous = name;
    }
    tb.nodes[0]
        .wait_status("the warm pool", |s| {
            s["addresses"]["available"].as_u64() >= Some(PLAIN_ADDS as u64)
        })
        .expect("the pool holds the plain pods' addresses");
    let mut plain = Vec::new();
    for i in 0..PLAIN_ADDS {
        let name = format!("plain-{i}");
        pod(&tb, &name, "plain");
        plain.push(add(&socket, &name).0);
        del(&socket, &name);
    }
    let (w50, w99) = (
        ms(percentile(&mut warm, 0.5)),
        ms(percentile(&mut warm, 0.99)),
    );
    let (p50, p99) = (
        ms(percentile(&mut plain, 0.5)),
        ms(percentile(&mut plain, 0.99)),
    );
    println!(
        "branch ADD, warm branch with the pod's groups: p50 {w50:.2} ms, p99 {w99:.2} ms; target p50 {TARGET_WARM_MS} ms: ratio {:.2}",
        w50 / TARGET_WARM_MS
    );
    println!(
        "reference, ADD of a pod without groups (warm pool, same run): p50 {p50:.2} ms, p99 {p99:.2} ms; ratio p50 {:.2}",
        w50 / p50
    );
    del(&socket, &previous);
    del(&socket, "api-cold");

    // A rolling update of 20 pods, after every spare from above is gone.
    std::thread::sleep(ipam::branches::BRANCH_COOLDOWN + Duration::from_secs(5));
    tb.nodes[0].settle().expect("the daemon settles");
    let old: Vec<String> = (0..ROLLING).map(|i| format!("web-old-{i}")).collect();
    for name in &old {
        pod(&tb, name, "web");
        add(&socket, name);
    }
    tb.nodes[0].settle().expect("the daemon settles");
    let start = branch_calls(&tb);
    for (i, name) in old.iter().enumerate() {
        let new = format!("web-new-{i}");
        pod(&tb, &new, "web");
        add(&socket, &new);
        del(&socket, name);
    }
    std::thread::sleep(ipam::branches::BRANCH_COOLDOWN + Duration::from_secs(5));
    tb.nodes[0].settle().expect("the daemon settles");
    let calls = branch_calls(&tb) - start;
    let upstream = ROLLING as u64 * CALLS_PER_POD_UPSTREAM;
    println!(
        "EC2 branch calls of a {ROLLING}-pod rolling update, to the last spare's deletion: {calls}; a branch per pod: {upstream}; ratio {:.2} (target 0.20)",
        calls as f64 / upstream as f64
    );
    tb.stop_daemon(0, testbed::Stop::Term).expect("stops");
}
