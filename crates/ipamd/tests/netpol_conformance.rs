//! Kubernetes' NetworkPolicy e2e cases (tests/data/netpol-conformance.yaml, transcribed from
//! kubernetes/kubernetes' test/e2e/network/netpol/network_policy.go) through the policy bench
//! (`testbed::policy_bench`, what `vpcctl demo --manifests` runs): upstream's pod model of 3
//! namespaces x 3 pods spread over two nodes, real vpc-ipamd enforcing what the test API server
//! holds, real traffic between every ordered pair of pods. Needs root.

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use testbed::policy_bench::{matrix, Bench, BenchPod, Manifests, Outcome, Probe, Protocol};
use testbed::Binaries;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

fn skip(why: &str) {
    let line = format!("SKIPPED netpol_conformance: {why}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}

/// Upstream's model: every pod labelled `pod: <name>`, serving 80 and 81 on TCP, UDP and SCTP
/// under the container port names serve-80-tcp and so on (SCTP through raw sockets: this kernel
/// has no SCTP sockets).
fn model() -> Manifests {
    let mut manifests = Manifests::default();
    let mut ports = Vec::new();
    for port in [80u16, 81] {
        for (protocol, upper, lower) in [
            (Protocol::Tcp, "TCP", "tcp"),
            (Protocol::Udp, "UDP", "udp"),
            (Protocol::Sctp, "SCTP", "sctp"),
        ] {
            ports.push((
                json!({"name": format!("serve-{port}-{lower}"), "containerPort": port, "protocol": upper}),
                Probe { protocol, port },
            ));
        }
    }
    for namespace in NAMESPACES {
        manifests
            .namespaces
            .insert(namespace.to_string(), Map::new());
        for pod in PODS {
            manifests.pods.push(BenchPod {
                namespace: namespace.into(),
                name: pod.into(),
                labels: default_labels(pod),
                node: None,
                containers: json!([{"name": "serve", "ports": ports.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>()}]),
                serves: ports.iter().map(|(_, probe)| *probe).collect(),
                service_account: None,
            });
        }
    }
    manifests
}

fn default_labels(pod: &str) -> Map<String, Value> {
    Map::from_iter([("pod".to_string(), json!(pod))])
}

/// Whether `pattern` (`ns/pod`, `ns/*`, `*/pod`, `*`) names `pod` (`ns/pod`).
fn matches(pattern: &str, pod: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let (pn, pp) = pattern.split_once('/').expect("a pattern ns/pod");
    let (n, p) = pod.split_once('/').expect("a pod ns/pod");
    (pn == "*" || pn == n) && (pp == "*" || pp == p)
}

/// What upstream expects of `from` to `to`: connected, unless a rule says otherwise (the last
/// rule that names both wins).
fn expected(rules: &[Value], from: &str, to: &str) -> bool {
    let mut connected = true;
    for rule in rules {
        let rule = rule.as_array().expect("[from, to, connected]");
        if matches(rule[0].as_str().unwrap(), from) && matches(rule[1].as_str().unwrap(), to) {
            connected = rule[2].as_bool().unwrap();
        }
    }
    connected
}

#[test]
fn kubernetes_network_policy_cases_hold_through_the_bench() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("needs root for network namespaces");
        return;
    }
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/netpol-conformance.yaml"),
    )
    .unwrap();
    let cases: Vec<Value> = serde_yaml::from_str(&text).expect("the cases are YAML");
    let mut binaries = Binaries::locate().unwrap_or_else(|e| {
        panic!("{e}: the test runs the plugin built by `cargo test --workspace`")
    });
    binaries.ipamd = env!("CARGO_BIN_EXE_vpc-ipamd").into();
    let model = model();
    let all: Vec<Probe> = ["tcp/80", "tcp/81", "udp/80", "udp/81"]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
    let mut bench = Bench::start(&model, &all, 2, None, Vec::new(), binaries).unwrap();
    let ids: Vec<String> = model.pods.iter().map(BenchPod::id).collect();
    let mut failures = Vec::new();
    let (mut steps, mut probes) = (0, 0);
    // NETPOL_CASE=<part of a name> runs only the matching cases.
    let only = std::env::var("NETPOL_CASE").ok();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        // Each case starts from upstream's model: no policy, the original labels.
        let mut policies: BTreeMap<(String, String), Value> = BTreeMap::new();
        bench.set_policies(&[]).unwrap();
        for (i, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            for id in step["delete"].as_array().into_iter().flatten() {
                let (namespace, name) = id.as_str().unwrap().split_once('/').unwrap();
                policies.remove(&(namespace.to_string(), name.to_string()));
            }
            for policy in step["apply"].as_array().into_iter().flatten() {
                // "{ns/pod}" in a policy stands for that pod's address.
                let mut text = policy.to_string();
                for (spec, pod) in bench.pods() {
                    text = text.replace(&format!("{{{}}}", spec.id()), &pod.ip.to_string());
                }
                let policy: Value = serde_json::from_str(&text).unwrap();
                let key = (
                    policy["metadata"]["namespace"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                    policy["metadata"]["name"].as_str().unwrap().to_string(),
                );
                policies.insert(key, policy);
            }
            if step.get("apply").is_some() || step.get("delete").is_some() {
                bench
                    .set_policies(&policies.values().cloned().collect::<Vec<_>>())
                    .unwrap();
            }
            if let Some(change) = step.get("label_namespace") {
                let labels = change["labels"].as_object().unwrap().clone();
                bench
                    .label_namespace(change["namespace"].as_str().unwrap(), labels)
                    .unwrap();
            }
            if let Some(change) = step.get("label_pod") {
                let labels = change["labels"].as_object().unwrap().clone();
                bench
                    .label_pod(change["pod"].as_str().unwrap(), labels)
                    .unwrap();
            }
            let probe: Probe = step["probe"].as_str().unwrap().parse().unwrap();
            let rules = step["expect"].as_array().unwrap();
            let outcomes = bench.probe(&[probe]);
            steps += 1;
            probes += outcomes.len();
            let wrong: Vec<&Outcome> = outcomes
                .iter()
                .filter(|o| o.connected != expected(rules, &o.from, &o.to))
                .collect();
            if !wrong.is_empty() {
                if only.is_some() {
                    for node in &bench.testbed.nodes {
                        let ns = node.netns.name.clone();
                        let out = std::process::Command::new("ip")
                            .args([
                                "netns",
                                "exec",
                                &ns,
                                "nft",
                                "list",
                                "table",
                                "inet",
                                "vpc-cni-netpol",
                            ])
                            .output()
                            .unwrap();
                        eprintln!("{}:\n{}", node.name, String::from_utf8_lossy(&out.stdout));
                    }
                    for (spec, pod) in bench.pods() {
                        eprintln!("{} {}", spec.id(), pod.ip);
                    }
                }
                failures.push(format!(
                    "{name}, step {}: {} of {} probes differ: {}\n{}",
                    i + 1,
                    wrong.len(),
                    outcomes.len(),
                    wrong
                        .iter()
                        .map(|o| format!(
                            "{} -> {} {} connected={}",
                            o.from, o.to, o.probe, o.connected
                        ))
                        .collect::<Vec<_>>()
                        .join("; "),
                    matrix(&outcomes, probe, &ids, &ids)
                ));
            }
        }
        // Labels back as upstream's model has them.
        for namespace in NAMESPACES {
            bench.label_namespace(namespace, Map::new()).unwrap();
        }
        for namespace in NAMESPACES {
            for pod in PODS {
                bench
                    .label_pod(&format!("{namespace}/{pod}"), default_labels(pod))
                    .unwrap();
            }
        }
    }
    eprintln!(
        "netpol_conformance: {} cases, {steps} steps, {probes} probes; {} steps differ from upstream's expectations",
        cases.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    bench.stop().unwrap();
}
