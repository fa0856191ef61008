//! `vpcctl demo`: the whole system on one machine. Nodes come up against the simulated VPC, pods
//! are wired by the plugin, traffic proves the wiring, and everything is removed at the end.

use crate::probe::WhoAmI;
use crate::{Binaries, Options, Pod, Stop, Testbed};
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Where every pod and the VPC router listen for the connectivity checks.
pub const PROBE_PORT: u16 = 7000;

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub nodes: usize,
    pub pods: usize,
    pub instance_type: String,
    pub prefix_delegation: bool,
    pub custom_networking: bool,
}

#[derive(Clone, Debug, Default)]
pub struct DemoReport {
    pub ready_after: Vec<Duration>,
    pub add_times: Vec<Duration>,
    pub pod_to_pod: (usize, usize),
    pub across_nodes: usize,
    pub pod_to_vpc: (usize, usize),
    pub ec2_calls: u64,
}

impl DemoReport {
    pub fn connected(&self) -> bool {
        self.pod_to_pod.0 == self.pod_to_pod.1 && self.pod_to_vpc.0 == self.pod_to_vpc.1
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs the demo, narrating to `out`.
pub fn run(
    options: &DemoOptions,
    binaries: Binaries,
    out: &mut dyn Write,
) -> Result<DemoReport, String> {
    let mut env = Vec::new();
    if options.prefix_delegation {
        env.push(("ENABLE_PREFIX_DELEGATION".to_string(), "true".to_string()));
    }
    if options.custom_networking {
        env.push((
            "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG".to_string(),
            "true".to_string(),
        ));
    }
    let say = |out: &mut dyn Write, text: String| {
        let _ = writeln!(out, "{text}");
    };
    let mut testbed = Testbed::start(
        &Options {
            nodes: options.nodes,
            instance_type: options.instance_type.clone(),
            daemon_env: env,
            custom_networking: options.custom_networking,
            ..Options::default()
        },
        binaries,
    )?;
    say(
        out,
        format!(
            "simulated VPC 10.0.0.0/16 serving EC2 and IMDS in namespace {}; {} node(s) of type {}",
            testbed.vpc.name, options.nodes, options.instance_type
        ),
    );
    let mut report = DemoReport::default();
    for i in 0..testbed.nodes.len() {
        let took = testbed.start_daemon(i)?;
        let n = &testbed.nodes[i];
        say(
            out,
            format!(
                "{}: {} primary {} — vpc-ipamd ready in {} ms",
                n.name,
                n.instance_id,
                n.primary_ip,
                took.as_millis()
            ),
        );
        report.ready_after.push(took);
    }

    let mut pods: Vec<Pod> = Vec::new();
    for i in 0..options.pods {
        let node = i % testbed.nodes.len();
        let started = Instant::now();
        let pod = testbed.add_pod(node)?;
        report.add_times.push(started.elapsed());
        pods.push(pod);
    }
    let mut sorted = report.add_times.clone();
    sorted.sort();
    say(
        out,
        format!(
            "{} pods added through the plugin: ADD p50 {:.1} ms, p99 {:.1} ms",
            pods.len(),
            percentile(&sorted, 0.5).as_secs_f64() * 1e3,
            percentile(&sorted, 0.99).as_secs_f64() * 1e3
        ),
    );
    for pod in &pods {
        say(
            out,
            format!(
                "  {:8} on {:7} {}",
                pod.name, testbed.nodes[pod.node].name, pod.ip
            ),
        );
    }

    // Every pod listens; so does the VPC router of the node subnet.
    let mut listeners = Vec::new();
    for pod in &pods {
        let address = SocketAddr::from((pod.ip, PROBE_PORT));
        listeners.push(
            pod.netns
                .run(move || WhoAmI::bind(address))?
                .map_err(|e| e.to_string())?,
        );
    }
    let router = testbed.nodes[0].gateway;
    listeners.push(
        testbed
            .vpc
            .run(move || WhoAmI::bind(SocketAddr::from((router, PROBE_PORT))))?
            .map_err(|e| e.to_string())?,
    );
    let mut failures = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        if pods.len() > 1 {
            let peer = &pods[(i + 1) % pods.len()];
            report.pod_to_pod.1 += 1;
            match testbed.seen_as(&pod.netns, peer.ip, PROBE_PORT) {
                Ok(seen) if seen == pod.ip => {
                    report.pod_to_pod.0 += 1;
                    if peer.node != pod.node {
                        report.across_nodes += 1;
                    }
                }
                Ok(seen) => failures.push(format!("{} → {}: seen as {seen}", pod.name, peer.name)),
                Err(e) => failures.push(format!("{} → {}: {e}", pod.name, peer.name)),
            }
        }
        report.pod_to_vpc.1 += 1;
        match testbed.seen_as(&pod.netns, router, PROBE_PORT) {
            Ok(seen) if seen == pod.ip => report.pod_to_vpc.0 += 1,
            Ok(seen) => failures.push(format!("{} → VPC router: seen as {seen}", pod.name)),
            Err(e) => failures.push(format!("{} → VPC router: {e}", pod.name)),
        }
    }
    drop(listeners);
    say(out, format!(
        "connectivity: pod to pod {}/{} ({} across nodes), pod to VPC {}/{}; every connection arrived from the pod's own address",
        report.pod_to_pod.0, report.pod_to_pod.1, report.across_nodes, report.pod_to_vpc.0, report.pod_to_vpc.1
    ));
    for failure in &failures {
        say(out, format!("  FAILED {failure}"));
    }

    for node in &testbed.nodes {
        let status = node.introspect("/v1/status")?;
        say(
            out,
            format!(
                "{} pool: {} ENIs, {} addresses ({} assigned, {} available), max pods {}",
                node.name,
                status["enis"],
                status["addresses"]["total"],
                status["addresses"]["assigned"],
                status["addresses"]["available"],
                status["maxPods"]
            ),
        );
        let enis = node.introspect("/v1/enis")?;
        if let Some(map) = enis["0"]["ENIs"].as_object() {
            for (id, eni) in map {
                let cidrs: Vec<&String> = eni["AvailableIPv4Cidrs"]
                    .as_object()
                    .map(|c| c.keys().collect())
                    .unwrap_or_default();
                say(
                    out,
                    format!(
                        "  {id} device {} subnet {} table {}: {}",
                        eni["DeviceNumber"],
                        eni["SubnetID"].as_str().unwrap_or(""),
                        eni["RouteTableID"],
                        cidrs
                            .iter()
                            .map(|c| c.as_str())
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                );
            }
        }
        let metrics = node.metrics()?;
        let shown: Vec<&str> = metrics
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                [
                    "awscni_eni_allocated",
                    "awscni_total_ip_addresses",
                    "awscni_assigned_ip_addresses",
                    "awscni_ec2api_req_count",
                    "vpccni_add_wait_seconds_count",
                ]
                .iter()
                .any(|m| l.starts_with(m))
            })
            .collect();
        say(out, format!("  metrics: {}", shown.join(" | ")));
    }

    for pod in pods {
        testbed.del_pod(pod)?;
    }
    for i in 0..testbed.nodes.len() {
        testbed.stop_daemon(i, Stop::Term)?;
    }
    report.ec2_calls = {
        let model = testbed.vpc_model();
        let v = model.lock().map_err(|_| "the VPC model is poisoned")?;
        v.calls
            .values()
            .map(|c| c.ok + c.throttled + c.failed)
            .sum()
    };
    let errors = testbed.fabric.errors();
    if !errors.is_empty() {
        return Err(format!(
            "the fabric failed to follow EC2: {}",
            errors.join("; ")
        ));
    }
    say(out, format!(
        "pods deleted through the plugin, daemons stopped with SIGTERM; EC2 answered {} calls in all; removing namespaces",
        report.ec2_calls
    ));
    drop(testbed);
    Ok(report)
}
