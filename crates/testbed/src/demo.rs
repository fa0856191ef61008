//! `vpcctl demo`: the whole system on one machine. Nodes come up against the simulated VPC, pods
//! are wired by the plugin, traffic proves the wiring, and everything is removed at the end.

use crate::probe::WhoAmI;
use crate::{Binaries, Options, Pod, Stop, Testbed};
use serde_json::{json, Value};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Where every pod and the VPC router listen for the connectivity checks.
pub const PROBE_PORT: u16 = 7000;

#[derive(Clone, Debug, Default)]
pub struct DemoOptions {
    pub nodes: usize,
    pub pods: usize,
    pub instance_type: String,
    pub prefix_delegation: bool,
    pub custom_networking: bool,
    /// The simulated VPC from a file (`--vpc`); its instances are the nodes.
    pub vpc: Option<simvpc_http::ServeConfig>,
    /// Daemon settings, as in the DaemonSet's environment (`--set KEY=VALUE`), after the flags'.
    pub settings: Vec<(String, String)>,
    /// Leave everything running after the report until SIGINT or SIGTERM (`--keep`).
    pub keep: bool,
    /// IPv6 nodes and pods (`--ipv6`), with IPv4 egress.
    pub ipv6: bool,
}

#[derive(Clone, Debug, Default)]
pub struct DemoReport {
    pub ready_after: Vec<Duration>,
    pub add_times: Vec<Duration>,
    pub pod_to_pod: (usize, usize),
    pub across_nodes: usize,
    pub pod_to_vpc: (usize, usize),
    /// IPv6 pods to an IPv4 VPC host by `v4if0`, seen from their node's address: (ok, tried).
    pub v4_egress: (usize, usize),
    pub ec2_calls: u64,
    /// The VPC's namespace, and each node and pod with its namespace (the JSON report).
    pub vpc_netns: String,
    pub nodes: Vec<Value>,
    pub pods: Vec<Value>,
}

impl DemoReport {
    pub fn connected(&self) -> bool {
        self.pod_to_pod.0 == self.pod_to_pod.1
            && self.pod_to_vpc.0 == self.pod_to_vpc.1
            && self.v4_egress.0 == self.v4_egress.1
    }

    /// The report as one JSON document (`--json`).
    pub fn to_json(&self) -> Value {
        json!({
            "vpc_netns": self.vpc_netns,
            "nodes": self.nodes,
            "pods": self.pods,
            "connectivity": {
                "pod_to_pod": {"tried": self.pod_to_pod.1, "ok": self.pod_to_pod.0},
                "across_nodes": self.across_nodes,
                "pod_to_vpc": {"tried": self.pod_to_vpc.1, "ok": self.pod_to_vpc.0},
                "v4_egress": {"tried": self.v4_egress.1, "ok": self.v4_egress.0},
            },
            "ready_after_ms": self.ready_after.iter().map(|d| d.as_millis() as u64).collect::<Vec<_>>(),
            "add_ms": self.add_times.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
            "ec2_calls": self.ec2_calls,
        })
    }
}

/// Each node's ENIs as EC2 holds them now.
fn nodes_as_ec2_holds_them(testbed: &Testbed) -> Result<Vec<Value>, String> {
    let model = testbed.vpc_model();
    let vpc = model.lock().map_err(|_| "the VPC model is poisoned")?;
    Ok(testbed
        .nodes
        .iter()
        .map(|node| {
            let mut enis: Vec<(u32, u32, Value)> = vpc
                .interfaces()
                .filter_map(|e| {
                    let a = e.attachment.as_ref()?;
                    (a.instance_id == node.instance_id).then(|| {
                        (
                            a.network_card_index,
                            a.device_index,
                            json!({
                                "id": e.id,
                                "device_index": a.device_index,
                                "network_card": a.network_card_index,
                                "interface_type": e.interface_type,
                                "tags": e.tags,
                                "primary_address": e.primary_ip.to_string(),
                                "addresses": e.secondary_ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                                "prefixes": e.prefixes.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                                "ipv6_prefixes": e.ipv6_prefixes.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                            }),
                        )
                    })
                })
                .collect();
            enis.sort_by_key(|(card, device, _)| (*card, *device));
            json!({
                "name": node.name,
                "instance_id": node.instance_id,
                "netns": node.netns.name,
                "enis": enis.into_iter().map(|(_, _, e)| e).collect::<Vec<_>>(),
            })
        })
        .collect())
}

fn ec2_calls(testbed: &Testbed) -> Result<u64, String> {
    let model = testbed.vpc_model();
    let v = model.lock().map_err(|_| "the VPC model is poisoned")?;
    Ok(v.calls
        .values()
        .map(|c| c.ok + c.throttled + c.failed)
        .sum())
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Blocks until SIGINT or SIGTERM; the handler only sets a flag, the clean-up runs here after.
fn wait_for_stop_signal() {
    STOP.store(false, Ordering::SeqCst);
    let handler = on_stop_signal as extern "C" fn(libc::c_int);
    // SAFETY: the handler is async-signal-safe (one atomic store).
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs the demo, narrating to `out`; `on_report` gets the report as soon as it is complete (before
/// a `keep` waits, and before the clean-up).
pub fn run(
    options: &DemoOptions,
    binaries: Binaries,
    out: &mut dyn Write,
    on_report: &mut dyn FnMut(&DemoReport),
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
    env.extend(options.settings.iter().cloned());
    let say = |out: &mut dyn Write, text: String| {
        let _ = writeln!(out, "{text}");
    };
    let mut testbed = Testbed::start(
        &Options {
            nodes: options.nodes,
            instance_type: options.instance_type.clone(),
            daemon_env: env,
            custom_networking: options.custom_networking,
            vpc: options.vpc.clone(),
            ipv6: options.ipv6,
            ..Options::default()
        },
        binaries,
    )?;
    match &options.vpc {
        Some(vpc) => say(
            out,
            format!(
                "simulated VPC {} (from the file) serving EC2 and IMDS in namespace {}; {} node(s)",
                vpc.vpc.cidr,
                testbed.vpc.name,
                testbed.nodes.len()
            ),
        ),
        None => say(
            out,
            format!(
                "simulated VPC 10.0.0.0/16{} serving EC2 and IMDS in namespace {}; {} node(s) of type {}",
                if options.ipv6 {
                    format!(" and {}", crate::VPC_CIDR_V6)
                } else {
                    String::new()
                },
                testbed.vpc.name,
                options.nodes,
                options.instance_type
            ),
        ),
    }
    let mut report = DemoReport {
        vpc_netns: testbed.vpc.name.clone(),
        ..DemoReport::default()
    };
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
        let egress = pod
            .egress_v4
            .map(|e| format!(" (IPv4 egress {e})"))
            .unwrap_or_default();
        say(
            out,
            format!(
                "  {:8} on {:7} {}{egress}",
                pod.name, testbed.nodes[pod.node].name, pod.ip
            ),
        );
    }

    // Every pod listens; so does the VPC router of the node subnet (on both families for IPv6).
    let mut listeners = Vec::new();
    for pod in &pods {
        let address = SocketAddr::from((pod.ip, PROBE_PORT));
        listeners.push(
            pod.netns
                .run(move || WhoAmI::bind(address))?
                .map_err(|e| e.to_string())?,
        );
    }
    let router_v4 = testbed.nodes[0].gateway;
    let router = if options.ipv6 {
        IpAddr::V6(crate::fabric::gateway_v6(
            crate::NODE_CIDR_V6.parse().expect("a CIDR"),
        ))
    } else {
        IpAddr::V4(router_v4)
    };
    let mut routers = vec![router];
    if options.ipv6 {
        routers.push(IpAddr::V4(router_v4));
    }
    for address in routers {
        listeners.push(
            testbed
                .vpc
                .run(move || WhoAmI::bind(SocketAddr::from((address, PROBE_PORT))))?
                .map_err(|e| e.to_string())?,
        );
    }
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
        if pod.ip.is_ipv6() {
            report.v4_egress.1 += 1;
            let node_ip = IpAddr::V4(testbed.nodes[pod.node].primary_ip);
            match testbed.seen_as(&pod.netns, router_v4, PROBE_PORT) {
                Ok(seen) if seen == node_ip => report.v4_egress.0 += 1,
                Ok(seen) => failures.push(format!(
                    "{} → IPv4 VPC router by v4if0: seen as {seen}, not the node's {node_ip}",
                    pod.name
                )),
                Err(e) => failures.push(format!("{} → IPv4 VPC router by v4if0: {e}", pod.name)),
            }
        }
    }
    drop(listeners);
    say(out, format!(
        "connectivity: pod to pod {}/{} ({} across nodes), pod to VPC {}/{}; every connection arrived from the pod's own address",
        report.pod_to_pod.0, report.pod_to_pod.1, report.across_nodes, report.pod_to_vpc.0, report.pod_to_vpc.1
    ));
    if options.ipv6 {
        say(
            out,
            format!(
                "IPv4 egress: pod to IPv4 VPC host {}/{}, each seen from its node's address",
                report.v4_egress.0, report.v4_egress.1
            ),
        );
    }
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
                let cidrs: Vec<&String> = ["AvailableIPv4Cidrs", "IPv6Cidrs"]
                    .iter()
                    .filter_map(|family| eni[family].as_object())
                    .flat_map(|c| c.keys())
                    .collect();
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

    report.nodes = nodes_as_ec2_holds_them(&testbed)?;
    report.pods = pods
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "node": testbed.nodes[p.node].name,
                "netns": p.netns.name,
                "ip": p.ip.to_string(),
                "egress_v4": p.egress_v4.map(|e| e.to_string()),
            })
        })
        .collect();
    report.ec2_calls = ec2_calls(&testbed)?;
    on_report(&report);
    if options.keep {
        say(
            out,
            "kept running; look around with `ip netns exec <namespace> ...`:".to_string(),
        );
        say(
            out,
            format!(
                "  VPC (EC2, IMDS, the subnets' router): {}",
                testbed.vpc.name
            ),
        );
        for node in &testbed.nodes {
            say(
                out,
                format!(
                    "  {} (vpc-ipamd, introspection {}): {}",
                    node.name,
                    crate::INTROSPECTION,
                    node.netns.name
                ),
            );
        }
        for pod in &pods {
            say(
                out,
                format!("  {} ({}): {}", pod.name, pod.ip, pod.netns.name),
            );
        }
        say(out, "SIGINT or SIGTERM removes everything".to_string());
        let _ = out.flush();
        wait_for_stop_signal();
    }

    for pod in pods {
        testbed.del_pod(pod)?;
    }
    for i in 0..testbed.nodes.len() {
        testbed.stop_daemon(i, Stop::Term)?;
    }
    report.ec2_calls = ec2_calls(&testbed)?;
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
