//! vpc-cni-metrics-helper end to end: two nodes' real vpc-ipamd, their pods listed by the test API
//! server, CloudWatch played by moto; the helper runs in the VPC's namespace, where all three are.

use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, Statistic};
use serde_json::json;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};
use testbed::{Binaries, Options, Testbed};

fn skip(why: &str) {
    let line = format!("SKIPPED metrics helper against moto: {why}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The statistic of `metric` over the last minutes, as moto has it, asked from the VPC's namespace.
fn statistic(tb: &Testbed, endpoint: &str, metric: &str, statistic: Statistic) -> Option<f64> {
    let (endpoint, metric) = (endpoint.to_string(), metric.to_string());
    tb.vpc
        .run(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let config = aws_sdk_cloudwatch::config::Builder::new()
                    .behavior_version(aws_sdk_cloudwatch::config::BehaviorVersion::latest())
                    .region(aws_sdk_cloudwatch::config::Region::new("us-west-2"))
                    .credentials_provider(aws_sdk_cloudwatch::config::Credentials::new(
                        "t", "t", None, None, "static",
                    ))
                    .endpoint_url(&endpoint)
                    .build();
                let client = aws_sdk_cloudwatch::Client::from_conf(config);
                let now = SystemTime::now();
                let answer = client
                    .get_metric_statistics()
                    .namespace(metrics_helper::NAMESPACE)
                    .metric_name(&metric)
                    .dimensions(
                        Dimension::builder()
                            .name(metrics_helper::DIMENSION)
                            .value("test-cluster")
                            .build(),
                    )
                    .start_time(DateTime::from(now - Duration::from_secs(600)))
                    .end_time(DateTime::from(now + Duration::from_secs(600)))
                    .period(60)
                    .statistics(statistic.clone())
                    .send()
                    .await
                    .unwrap();
                let values = answer.datapoints().iter().filter_map(|p| match statistic {
                    Statistic::Sum => p.sum(),
                    _ => p.maximum(),
                });
                match statistic {
                    Statistic::Sum => values.reduce(|a, b| a + b),
                    _ => values.reduce(f64::max),
                }
            })
        })
        .unwrap()
}

#[test]
fn two_nodes_inventory_reaches_cloudwatch() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("needs root for network namespaces");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let moto = root.join(".venv/bin/moto_server");
    if !moto.is_file() {
        skip("no .venv/bin/moto_server (scripts/test.sh installs moto[server])");
        return;
    }
    let binaries = Binaries::locate().unwrap_or_else(|e| {
        panic!("{e}: the test runs the daemon and plugin built by `cargo test --workspace`")
    });
    let options = Options {
        nodes: 2,
        kubernetes: true,
        // The daemons' metrics on every address of the node, as in a cluster (the testbed's
        // default is loopback).
        daemon_env: vec![(
            "VPC_CNI_METRICS_BIND_ADDRESS".into(),
            "0.0.0.0:61678".into(),
        )],
        ..Options::default()
    };
    let mut tb = Testbed::start(&options, binaries).unwrap();
    tb.start_daemon(0).unwrap();
    tb.start_daemon(1).unwrap();
    let api = tb.kube.as_ref().expect("the test API server");
    // The DaemonSet's pods as the aws-node overlay labels them: host network, the node's address.
    for node in &tb.nodes {
        api.apply(
            "pods",
            json!({"metadata": {"namespace": "kube-system", "name": format!("aws-node-{}", node.name),
                                "labels": {"k8s-app": "aws-node"}},
                   "spec": {"nodeName": node.name, "hostNetwork": true},
                   "status": {"podIP": node.primary_ip.to_string()}}),
        );
    }
    let kubeconfig = tb.nodes[0].state.join("helper-kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig("127.0.0.1")).unwrap();
    let moto_port = free_port();
    let endpoint = format!("http://127.0.0.1:{moto_port}");
    let _moto = tb
        .vpc
        .run(|| {
            Command::new(&moto)
                .args(["-H", "127.0.0.1", "-p", &moto_port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map(Killed)
        })
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tb
        .vpc
        .run(move || std::net::TcpStream::connect(("127.0.0.1", moto_port)).is_err())
        .unwrap()
    {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Both pools settled before the helper starts, so that every round sees the same totals.
    let settled = |tb: &Testbed, n: usize| loop {
        let status = tb.nodes[n].introspect("/v1/status").unwrap();
        if status["ec2ActionsInFlight"] == 0 && status["phase"] == "ready" {
            std::thread::sleep(Duration::from_millis(300));
            let again = tb.nodes[n].introspect("/v1/status").unwrap();
            if again == status {
                return status["addresses"]["total"].as_f64().unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let pod = tb.add_pod(0).unwrap();
    let total = settled(&tb, 0) + settled(&tb, 1);
    let helper = env!("CARGO_BIN_EXE_vpc-cni-metrics-helper");
    let env = [
        ("KUBECONFIG", kubeconfig.display().to_string()),
        ("AWS_ENDPOINT_URL", endpoint.clone()),
        ("AWS_REGION", "us-west-2".into()),
        ("AWS_ACCESS_KEY_ID", "t".into()),
        ("AWS_SECRET_ACCESS_KEY", "t".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_CLUSTER_ID", "test-cluster".into()),
    ];
    let _helper = tb
        .vpc
        .run(|| {
            Command::new(helper)
                .args(["--interval-seconds", "1"])
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .map(Killed)
        })
        .unwrap()
        .unwrap();
    // Gauges are the sum over both nodes.
    let deadline = Instant::now() + Duration::from_secs(30);
    while statistic(&tb, &endpoint, "totalIPAddresses", Statistic::Maximum).is_none() {
        assert!(Instant::now() < deadline, "nothing published within 30 s");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        statistic(&tb, &endpoint, "totalIPAddresses", Statistic::Maximum),
        Some(total)
    );
    assert_eq!(
        statistic(&tb, &endpoint, "assignIPAddresses", Statistic::Maximum),
        Some(1.0)
    );
    assert_eq!(
        statistic(&tb, &endpoint, "eniMaxAvailable", Statistic::Maximum),
        Some(6.0),
        "two m5.large, 3 ENIs each"
    );
    // Counters: what grew between rounds. The ADDs before the helper started are its baseline.
    assert_eq!(
        statistic(&tb, &endpoint, "addReqCount", Statistic::Sum),
        Some(0.0)
    );
    let more = [tb.add_pod(1).unwrap(), tb.add_pod(1).unwrap()];
    let deadline = Instant::now() + Duration::from_secs(30);
    while statistic(&tb, &endpoint, "addReqCount", Statistic::Sum) != Some(2.0) {
        assert!(
            Instant::now() < deadline,
            "addReqCount: {:?}",
            statistic(&tb, &endpoint, "addReqCount", Statistic::Sum)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for p in more.into_iter().chain([pod]) {
        tb.del_pod(p).unwrap();
    }
}
