//! The daemon's footprint and speed on the demo machinery (needs root):
//! * time from start to Ready on a fresh simulated node;
//! * ADD round trip through the daemon's socket with a warm pool, p50 and p99, against the reference
//!   measured in the same run: an ADD of the host-local IPAM plugin (the allocator most CNI plugins
//!   delegate to) for the same number of addresses;
//! * the daemon's RSS with 250 pods assigned, against the 20 MiB target and the 40 MiB at which
//!   upstream's aws-node starts (upstream cannot run here, so that figure is the documented one);
//! * EC2 calls per 100 pods scheduled on a fresh m5.large node (five waves of 20 ADDs then 20 DELs,
//!   start-up included), default settings against prefix delegation, through the real AWS client;
//! * EC2 calls and IMDS reads of an idle node, per hour at the default 60 s reconcile, measured
//!   over reconciles run every second.
//!
//! Run with `bench/daemon.sh`.

use proto::{Attachment, PodRef, Reply, Request};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testbed::{Binaries, Options, Testbed};

const PODS: usize = 250;
const UPSTREAM_RSS_MIB: f64 = 40.0;
const TARGET_RSS_MIB: f64 = 20.0;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn binaries() -> Binaries {
    Binaries {
        ipamd: env!("CARGO_BIN_EXE_vpc-ipamd").into(),
        plugin: PathBuf::new(),
    }
}

fn attachment(i: usize) -> Attachment {
    Attachment {
        network: "aws-cni".into(),
        container_id: format!("bench{i:06}"),
        ifname: "eth0".into(),
    }
}

fn del(socket: &std::path::Path, i: usize) {
    let request = Request::Del {
        attachment: attachment(i),
        pod: None,
        reason: proto::DelReason::PodDeleted,
    };
    let reply = proto::call(socket, &request, Duration::from_secs(60)).expect("the daemon answers");
    assert!(
        matches!(reply, Reply::Deleted { released: Some(_) }),
        "{reply:?}"
    );
}

/// Every call EC2 answered for the node since it started, by operation.
fn ec2_calls_per_100_pods(env: &[(&str, &str)]) -> (u64, String) {
    let mut daemon_env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    daemon_env.push(("AWS_VPC_K8S_CNI_LOGLEVEL".into(), "INFO".into()));
    // The hourly leaked-ENI scan starts at a random moment of the first minute: not per pod.
    daemon_env.push(("DISABLE_LEAKED_ENI_CLEANUP".into(), "true".into()));
    let options = Options {
        daemon_env,
        ..Options::default()
    };
    let mut tb = Testbed::start(&options, binaries()).expect("testbed");
    tb.start_daemon(0).expect("daemon starts");
    let socket = tb.nodes[0].socket();
    for wave in 0..5 {
        for i in 0..20 {
            add(&socket, wave * 20 + i);
        }
        tb.nodes[0].settle().expect("the daemon settles");
        for i in 0..20 {
            del(&socket, wave * 20 + i);
        }
        tb.nodes[0].settle().expect("the daemon settles");
    }
    let model = tb.vpc_model();
    let vpc = model.lock().expect("vpc lock");
    let total = vpc
        .calls
        .values()
        .map(|c| c.ok + c.throttled + c.failed)
        .sum();
    let by_operation = vpc
        .calls
        .iter()
        .map(|(op, c)| format!("{} {}", op.name(), c.ok + c.throttled + c.failed))
        .collect::<Vec<_>>()
        .join(", ");
    (total, by_operation)
}

fn add(socket: &std::path::Path, i: usize) -> Duration {
    let request = Request::Add {
        attachment: attachment(i),
        pod: PodRef {
            namespace: "bench".into(),
            name: format!("pod-{i}"),
            infra_container_id: String::new(),
            uid: String::new(),
        },
        netns: format!("/var/run/netns/bench-{i}"),
    };
    let started = Instant::now();
    let reply = proto::call(socket, &request, Duration::from_secs(60)).expect("the daemon answers");
    let took = started.elapsed();
    assert!(matches!(reply, Reply::Added { .. }), "{reply:?}");
    took
}

/// An idle node with pods: EC2 calls and IMDS requests over `window`, with a reconcile every
/// second; scaled to an hour of the default 60 s reconcile.
fn idle_node_hour(window: Duration) -> (f64, f64, u64) {
    let options = Options {
        daemon_env: vec![
            ("VPC_CNI_RECONCILE_SECONDS".into(), "1".into()),
            ("AWS_VPC_K8S_CNI_LOGLEVEL".into(), "INFO".into()),
            // Counted apart: one DescribeNetworkInterfaces page an hour, wherever the node is.
            ("DISABLE_LEAKED_ENI_CLEANUP".into(), "true".into()),
        ],
        ..Options::default()
    };
    let mut tb = Testbed::start(&options, binaries()).expect("testbed");
    tb.start_daemon(0).expect("daemon starts");
    let socket = tb.nodes[0].socket();
    for i in 0..5 {
        add(&socket, i);
    }
    tb.nodes[0].settle().expect("the daemon settles");
    // Two reconciles to see the pool as it is now.
    std::thread::sleep(Duration::from_secs(3));
    let calls = |tb: &Testbed| -> u64 {
        let model = tb.vpc_model();
        let vpc = model.lock().expect("vpc lock");
        vpc.calls
            .values()
            .map(|c| c.ok + c.throttled + c.failed)
            .sum()
    };
    let imds = |tb: &Testbed| -> u64 {
        let metrics = tb.nodes[0].metrics().expect("metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("vpccni_imds_requests_total "))
            .and_then(|v| v.trim().parse().ok())
            .expect("the IMDS counter")
    };
    let (calls_before, imds_before) = (calls(&tb), imds(&tb));
    std::thread::sleep(window);
    let (calls_after, imds_after) = (calls(&tb), imds(&tb));
    let reconciles = window.as_secs_f64();
    let per_hour = 3600.0 / 60.0 / reconciles;
    (
        (calls_after - calls_before) as f64 * per_hour,
        (imds_after - imds_before) as f64 * per_hour,
        reconciles as u64,
    )
}

/// host-local ADD for `count` containers from a /16, as a runtime would exec it.
fn host_local(count: usize) -> Option<Vec<Duration>> {
    let binary = ["/usr/lib/cni/host-local", "/opt/cni/bin/host-local"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())?;
    let data = std::env::temp_dir().join(format!("bench-host-local-{}", std::process::id()));
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "bench", "type": "bridge",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.200.0.0/16"}]], "dataDir": data},
    })
    .to_string();
    let mut samples = Vec::new();
    for i in 0..count {
        let started = Instant::now();
        let mut child = Command::new(&binary)
            .env_clear()
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("bench{i:06}"))
            .env("CNI_NETNS", "/var/run/netns/none")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        child.stdin.take()?.write_all(conf.as_bytes()).ok()?;
        if !child.wait().ok()?.success() {
            return None;
        }
        samples.push(started.elapsed());
    }
    let _ = std::fs::remove_dir_all(&data);
    Some(samples)
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED daemon benchmark: needs root for network namespaces");
        return;
    }
    let mut ready = Vec::new();
    for _ in 0..5 {
        let mut tb = Testbed::start(&Options::default(), binaries()).expect("testbed");
        ready.push(tb.start_daemon(0).expect("daemon starts"));
    }
    let mut ready_sorted = ready.clone();
    println!(
        "start to Ready on a fresh m5.large node (5 runs): p50 {:.0} ms, max {:.0} ms",
        ms(percentile(&mut ready_sorted, 0.5)),
        ms(*ready.iter().max().expect("five runs"))
    );

    // A node that can hold 250 pods, with the pool warmed past them.
    let options = Options {
        instance_type: "m5.16xlarge".into(),
        daemon_env: vec![
            ("MINIMUM_IP_TARGET".into(), "260".into()),
            ("WARM_IP_TARGET".into(), "10".into()),
            ("AWS_VPC_K8S_CNI_LOGLEVEL".into(), "INFO".into()),
        ],
        ..Options::default()
    };
    let mut tb = Testbed::start(&options, binaries()).expect("testbed");
    tb.start_daemon(0).expect("daemon starts");
    let socket = tb.nodes[0].socket();
    let pid = tb.nodes[0].daemon_pid().expect("running");
    let idle = rss_mib(pid);
    let mut rtt: Vec<Duration> = (0..PODS).map(|i| add(&socket, i)).collect();
    let loaded = rss_mib(pid);
    let p50 = percentile(&mut rtt, 0.5);
    let p99 = percentile(&mut rtt, 0.99);
    println!(
        "ADD round trip through the daemon, warm pool, {PODS} pods: p50 {:.3} ms, p99 {:.3} ms",
        ms(p50),
        ms(p99)
    );
    match host_local(PODS) {
        Some(mut reference) => {
            let r50 = percentile(&mut reference, 0.5);
            let r99 = percentile(&mut reference, 0.99);
            println!(
                "reference, host-local IPAM ADD (same run): p50 {:.3} ms, p99 {:.3} ms; ratio p50 {:.2}, p99 {:.2}",
                ms(r50),
                ms(r99),
                p50.as_secs_f64() / r50.as_secs_f64(),
                p99.as_secs_f64() / r99.as_secs_f64()
            );
        }
        None => println!(
            "reference: host-local not found (apt-get install containernetworking-plugins)"
        ),
    }
    drop(tb);

    // The same node in a cluster: the kube-rs client, the Node and ENIConfig watches, and a
    // metadata watch holding a Pod object per assigned address.
    let mut tb = Testbed::start(
        &Options {
            kubernetes: true,
            ..options
        },
        binaries(),
    )
    .expect("testbed");
    {
        let api = tb.kube.as_ref().expect("kubernetes");
        // In a cluster the kubelet's --max-pods caps the node; the testbed's Node says 110.
        let mut node = api.objects("nodes")[0].clone();
        node["status"]["capacity"]["pods"] = (PODS + 10).to_string().into();
        api.apply("nodes", node);
        for i in 0..PODS {
            api.apply(
                "pods",
                serde_json::json!({"metadata": {"namespace": "bench", "name": format!("pod-{i}")},
                                   "spec": {"nodeName": tb.nodes[0].name}}),
            );
        }
    }
    tb.start_daemon(0).expect("daemon starts");
    let socket = tb.nodes[0].socket();
    let pid = tb.nodes[0].daemon_pid().expect("running");
    for i in 0..PODS {
        add(&socket, i);
    }
    // A few pod snapshots through the control loop.
    std::thread::sleep(Duration::from_secs(3));
    let in_cluster = rss_mib(pid);
    drop(tb);

    let (idle_ec2, idle_imds, reconciles) = idle_node_hour(Duration::from_secs(20));
    println!(
        "idle node with 5 pods, per hour at the default 60 s reconcile (measured over {reconciles} reconciles): EC2 calls {idle_ec2:.0}, IMDS reads {idle_imds:.0} (plus the hourly leaked-ENI scan: 1 DescribeNetworkInterfaces page)"
    );
    let (default_calls, default_ops) = ec2_calls_per_100_pods(&[]);
    let (pd_calls, pd_ops) = ec2_calls_per_100_pods(&[("ENABLE_PREFIX_DELEGATION", "true")]);
    println!("EC2 calls per 100 pods on a fresh m5.large, default settings: {default_calls} ({default_ops})");
    println!(
        "EC2 calls per 100 pods on a fresh m5.large, prefix delegation: {pd_calls} ({pd_ops}); ratio {:.2}",
        pd_calls as f64 / default_calls as f64
    );
    println!(
        "daemon RSS: {idle:.1} MiB idle, {loaded:.1} MiB with {PODS} pods assigned; ratio to upstream's {UPSTREAM_RSS_MIB} MiB: {:.2}; target {TARGET_RSS_MIB} MiB {}",
        loaded / UPSTREAM_RSS_MIB,
        if loaded <= TARGET_RSS_MIB { "met" } else { "NOT met" }
    );
    println!(
        "daemon RSS in a cluster (API client, watches, {PODS} Pod objects): {in_cluster:.1} MiB; ratio to upstream's {UPSTREAM_RSS_MIB} MiB: {:.2}; target {TARGET_RSS_MIB} MiB {}",
        in_cluster / UPSTREAM_RSS_MIB,
        if in_cluster <= TARGET_RSS_MIB { "met" } else { "NOT met" }
    );
}
