//! `vpcctl demo` as a user runs it: a VPC file with someone else's ENI on the node, daemon settings,
//! the JSON report, and `--keep` leaving everything up until SIGTERM. The demo needs root.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn vpcctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vpcctl"))
}

fn root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        let line = format!("SKIPPED {test}: the demo needs root for network namespaces\n");
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    }
    root
}

fn namespaces() -> String {
    String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

const VPC: &str = r#"
[vpc]
cidr = "10.1.0.0/16"

[[subnets]]
name = "nodes"
cidr = "10.1.0.0/20"
az = "us-west-2a"
tags = { "kubernetes.io/role/cni" = "1" }

[[instances]]
name = "worker"
type = "m5.large"
subnet = "nodes"
security_groups = ["sg-0000000000000001"]

[[instances.enis]]
device_index = 1
secondary_addresses = 2
tags = { "node.k8s.amazonaws.com/no_manage" = "true", "owner" = "multus" }
"#;

#[test]
fn a_vpc_file_and_settings_give_a_json_report_of_what_ec2_holds() {
    if !root("a_vpc_file_and_settings_give_a_json_report_of_what_ec2_holds") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vpc.toml");
    std::fs::write(&file, VPC).unwrap();
    let output = vpcctl()
        .args(["demo", "--pods", "3", "--json", "--vpc"])
        .arg(&file)
        .args(["--set", "WARM_IP_TARGET=1", "--set", "MINIMUM_IP_TARGET=4"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    let node = &report["nodes"][0];
    assert_eq!(node["name"], "worker");
    assert!(
        node["netns"].as_str().unwrap().starts_with("worker-"),
        "{node}"
    );
    let enis = node["enis"].as_array().unwrap();
    let theirs = enis
        .iter()
        .find(|e| e["device_index"] == 1)
        .expect("the multus ENI is listed");
    assert_eq!(theirs["tags"]["owner"], "multus");
    assert_eq!(theirs["interface_type"], "interface");
    assert_eq!(theirs["network_card"], 0);
    assert_eq!(
        theirs["addresses"].as_array().unwrap().len(),
        2,
        "not ours: its addresses stay: {theirs}"
    );
    // MINIMUM_IP_TARGET=4 through --set: the primary ENI holds at least 4.
    let primary = enis.iter().find(|e| e["device_index"] == 0).unwrap();
    assert!(
        primary["addresses"].as_array().unwrap().len() >= 4,
        "{primary}"
    );
    let pods = report["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 3);
    for pod in pods {
        assert_eq!(pod["node"], "worker");
        assert!(
            !theirs["addresses"].as_array().unwrap().contains(&pod["ip"]),
            "{pod} got someone else's address"
        );
    }
    let c = &report["connectivity"];
    assert_eq!(c["pod_to_pod"]["ok"], c["pod_to_pod"]["tried"], "{c}");
    assert_eq!(c["pod_to_vpc"]["ok"], 3, "{c}");
    assert!(stderr.contains("from the file"), "{stderr}");
}

#[test]
fn keep_leaves_the_demo_up_until_sigterm_then_removes_it() {
    if !root("keep_leaves_the_demo_up_until_sigterm_then_removes_it") {
        return;
    }
    let mut child = vpcctl()
        .args(["demo", "--pods", "2", "--keep"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut kept = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    for line in lines.by_ref() {
        let line = line.unwrap();
        assert!(Instant::now() < deadline, "no end of report");
        // "  VPC (...): <ns>", "  node-1 (...): <ns>", "  pod-1 (10.0...): <ns>"
        if line.starts_with("  ") && line.contains("): ") {
            kept.push(line.rsplit(": ").next().unwrap().trim().to_string());
        }
        if line.contains("SIGINT or SIGTERM") {
            break;
        }
    }
    // The VPC, one node and two pods, all still there.
    assert_eq!(kept.len(), 4, "{kept:?}");
    std::thread::sleep(Duration::from_millis(500));
    let up = namespaces();
    for ns in &kept {
        assert!(up.contains(ns.as_str()), "{ns} is gone while kept:\n{up}");
    }
    // SAFETY: the pid is our child's, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    for _ in lines {}
    assert!(status.success(), "{status}");
    let after = namespaces();
    for ns in &kept {
        assert!(!after.contains(ns.as_str()), "{ns} left behind:\n{after}");
    }
}

#[test]
fn a_setting_the_daemon_refuses_is_refused_before_anything_is_built() {
    let output = vpcctl()
        .args(["demo", "--set", "ENABLE_POD_ENI=true"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ENABLE_POD_ENI"), "{stderr}");
    let output = vpcctl()
        .args(["demo", "--set", "WARM_IP_TARGET"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("KEY=VALUE"));
}

#[test]
fn the_ipv6_demo_proves_its_traffic_and_reports_each_pods_addresses() {
    if !root("the_ipv6_demo_proves_its_traffic_and_reports_each_pods_addresses") {
        return;
    }
    let output = vpcctl()
        .args(["demo", "--ipv6", "--nodes", "2", "--pods", "4", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    let connectivity = &report["connectivity"];
    for kind in ["pod_to_pod", "pod_to_vpc", "v4_egress"] {
        assert_eq!(connectivity[kind]["tried"], 4, "{kind}: {connectivity}");
        assert_eq!(connectivity[kind]["ok"], 4, "{kind}: {connectivity}");
    }
    assert_eq!(connectivity["across_nodes"], 4, "{connectivity}");
    for pod in report["pods"].as_array().unwrap() {
        let ip: std::net::IpAddr = pod["ip"].as_str().unwrap().parse().unwrap();
        assert!(ip.is_ipv6(), "{pod}");
        let egress: std::net::Ipv4Addr = pod["egress_v4"].as_str().unwrap().parse().unwrap();
        assert_eq!(egress.octets()[..3], [169, 254, 172], "{pod}");
    }
    for node in report["nodes"].as_array().unwrap() {
        let primary = &node["enis"][0];
        assert_eq!(
            primary["ipv6_prefixes"].as_array().unwrap().len(),
            1,
            "{node}"
        );
    }
    assert!(
        stderr.contains("IPv4 egress: pod to IPv4 VPC host 4/4"),
        "{stderr}"
    );
    // A setting that contradicts IPv6 is refused before anything is built.
    let refused = vpcctl()
        .args(["demo", "--ipv6", "--custom-networking"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG"),
        "{stderr}"
    );
}

/// The policy bench on a VPC file: the file's instances are the nodes, and its hosts are probed
/// too (`vpc/<name>`), behind the security groups the fabric enforces: the pod on the node whose
/// ENIs carry sg-app reaches the database host, the other does not.
#[test]
fn the_policy_bench_probes_the_vpc_files_hosts_behind_their_security_groups() {
    if !root("the_policy_bench_probes_the_vpc_files_hosts_behind_their_security_groups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vpc = dir.path().join("vpc.toml");
    std::fs::write(
        &vpc,
        r#"
[vpc]
cidr = "10.2.0.0/16"

[[subnets]]
name = "nodes"
cidr = "10.2.0.0/20"
az = "us-west-2a"
tags = { "kubernetes.io/role/cni" = "1" }

[[instances]]
name = "app"
type = "m5.large"
subnet = "nodes"
security_groups = ["sg-app"]

[[instances]]
name = "batch"
type = "m5.large"
subnet = "nodes"
security_groups = ["sg-batch"]

[[security_groups]]
id = "sg-app"
egress = [{ protocol = "all", cidrs = ["0.0.0.0/0"] }]

[[security_groups]]
id = "sg-batch"
egress = [{ protocol = "all", cidrs = ["0.0.0.0/0"] }]

[[security_groups]]
id = "sg-db"
ingress = [{ protocol = "tcp", ports = "5432", from_groups = ["sg-app"] }]

[[hosts]]
name = "db"
subnet = "nodes"
security_groups = ["sg-db"]
ports = ["tcp/5432"]
"#,
    )
    .unwrap();
    let manifests = dir.path().join("pods.yaml");
    std::fs::write(
        &manifests,
        "kind: Namespace\nmetadata: {name: shop}\n---\n\
         kind: Pod\nmetadata: {namespace: shop, name: web}\nspec: {nodeName: app}\n---\n\
         kind: Pod\nmetadata: {namespace: shop, name: job}\nspec: {nodeName: batch}\n",
    )
    .unwrap();
    let report = bench_on_vpc(&vpc, &manifests, "tcp/5432");
    let connected = |from: &str, to: &str| connected(&report, from, to);
    assert!(connected("shop/web", "vpc/db"), "{report}");
    assert!(!connected("shop/job", "vpc/db"), "{report}");
}

/// Security groups for pods in the bench: the node makes branch ENIs for the pods a
/// SecurityGroupPolicy selects (by its labels, or by its ServiceAccount's), with the policy's
/// groups, and the fabric holds them: on one node, the pod given sg-app reaches the database host
/// on 5432 and the pod without groups does not; strict mode sends even same-node traffic through
/// the VPC, where sg-app (no ingress rule) keeps the other pod out. A NetworkPolicy holds a branch
/// pod as any other: `admin` has web's groups, but its policy lets it reach only pods.
#[test]
fn security_group_policies_give_pods_branches_whose_groups_the_vpc_holds() {
    if !root("security_group_policies_give_pods_branches_whose_groups_the_vpc_holds") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vpc = dir.path().join("vpc.toml");
    std::fs::write(
        &vpc,
        r#"
[vpc]
cidr = "10.3.0.0/16"

[[subnets]]
name = "nodes"
cidr = "10.3.0.0/20"
az = "us-west-2a"

[[instances]]
name = "node"
type = "m5.large"
subnet = "nodes"
security_groups = ["sg-node"]

[[security_groups]]
id = "sg-node"
ingress = [{ protocol = "all", cidrs = ["10.3.0.0/16"] }]
egress = [{ protocol = "all", cidrs = ["0.0.0.0/0"] }]

[[security_groups]]
id = "sg-app"
egress = [{ protocol = "all", cidrs = ["0.0.0.0/0"] }]

[[security_groups]]
id = "sg-db"
ingress = [{ protocol = "tcp", ports = "5432", from_groups = ["sg-app"] }]

[[hosts]]
name = "db"
subnet = "nodes"
security_groups = ["sg-db"]
ports = ["tcp/5432"]
"#,
    )
    .unwrap();
    let manifests = dir.path().join("pods.yaml");
    std::fs::write(
        &manifests,
        "kind: Namespace\nmetadata: {name: shop}\n---\n\
         kind: ServiceAccount\nmetadata: {namespace: shop, name: api, labels: {tier: front}}\n---\n\
         kind: SecurityGroupPolicy\napiVersion: vpcresources.k8s.aws/v1beta1\n\
         metadata: {namespace: shop, name: front}\n\
         spec: {serviceAccountSelector: {matchLabels: {tier: front}}, securityGroups: {groupIds: [sg-app]}}\n---\n\
         kind: Pod\nmetadata: {namespace: shop, name: web}\nspec: {serviceAccountName: api}\n---\n\
         kind: Pod\nmetadata: {namespace: shop, name: admin, labels: {role: admin}}\n\
         spec: {serviceAccountName: api}\n---\n\
         kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\n\
         metadata: {namespace: shop, name: admin-pods-only}\n\
         spec: {podSelector: {matchLabels: {role: admin}}, policyTypes: [Egress], \
         egress: [{to: [{namespaceSelector: {}}]}]}\n---\n\
         kind: Pod\nmetadata: {namespace: shop, name: job}\n",
    )
    .unwrap();
    let report = bench_on_vpc(&vpc, &manifests, "tcp/5432");
    let connected = |from: &str, to: &str| connected(&report, from, to);
    assert!(connected("shop/web", "vpc/db"), "{report}");
    assert!(!connected("shop/job", "vpc/db"), "{report}");
    assert!(!connected("shop/job", "shop/web"), "strict: {report}");
    assert!(connected("shop/web", "shop/job"), "{report}");
    assert!(!connected("shop/admin", "vpc/db"), "the policy: {report}");
    assert!(connected("shop/admin", "shop/job"), "{report}");
}

/// `vpcctl demo --json --probe PROBE --vpc VPC --manifests MANIFESTS`'s report, the run asserted
/// to succeed.
fn bench_on_vpc(vpc: &std::path::Path, manifests: &std::path::Path, probe: &str) -> Value {
    let output = vpcctl()
        .args(["demo", "--json", "--probe", probe, "--vpc"])
        .arg(vpc)
        .arg("--manifests")
        .arg(manifests)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)))
}

/// Whether the report's probe from `from` to `to` connected.
fn connected(report: &Value, from: &str, to: &str) -> bool {
    report["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["from"] == from && p["to"] == to)
        .unwrap_or_else(|| panic!("{from} -> {to} not probed: {report}"))["connected"]
        .as_bool()
        .unwrap()
}
