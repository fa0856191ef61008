//! The daemon end to end on the demo machinery: the simulated VPC over HTTP, node namespaces whose
//! ENIs are veth pairs, the real vpc-ipamd (the AWS SDK backend with the endpoint override) and pods
//! wired by the real plugin. Needs root; skipped loudly without it.

use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use testbed::probe::WhoAmI;
use testbed::{Binaries, Options, Pod, Stop, Testbed};

const PORT: u16 = 7000;

/// An IPv4 pod's address.
fn ipv4_of(allocation: &proto::Allocation) -> Ipv4Addr {
    match allocation.address {
        IpAddr::V4(ip) => ip,
        other => panic!("{other} is not an IPv4 address"),
    }
}

fn ipv4(pod: &Pod) -> Ipv4Addr {
    match pod.ip {
        IpAddr::V4(ip) => ip,
        other => panic!("{} has {other}, not an IPv4 address", pod.name),
    }
}

fn skip(test: &str, why: &str) {
    // Straight to stderr, past the harness's capture, so that a skip is never silent.
    let line = format!("SKIPPED {test}: {why}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}

fn testbed(test: &str, options: Options) -> Option<Testbed> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "needs root for network namespaces");
        return None;
    }
    let mut binaries = Binaries::locate().unwrap_or_else(|e| {
        panic!("{e}: the end-to-end tests run the plugin built by `cargo test --workspace`")
    });
    binaries.ipamd = env!("CARGO_BIN_EXE_vpc-ipamd").into();
    Some(Testbed::start(&options, binaries).unwrap())
}

fn options(env: &[(&str, &str)]) -> Options {
    Options {
        daemon_env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Options::default()
    }
}

/// Waits until the daemon has no EC2 action in flight and no ADD waiting, and returns /v1/status.
fn settled(tb: &Testbed, node: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = tb.nodes[node].introspect("/v1/status").unwrap();
        if status["ec2ActionsInFlight"] == 0 && status["pendingAdds"] == 0 {
            // A decision can follow the last result: look twice.
            std::thread::sleep(Duration::from_millis(300));
            let again = tb.nodes[node].introspect("/v1/status").unwrap();
            if again["ec2ActionsInFlight"] == 0 && again == status {
                return status;
            }
        }
        assert!(Instant::now() < deadline, "never settled: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The addresses EC2 says the node's ENIs hold (secondary /32s and /28s), and the ENIs it lists
/// as available (created and never attached, or detached and not deleted) with our tags.
fn ec2_view(tb: &Testbed, node: usize) -> (BTreeSet<String>, Vec<String>) {
    let model = tb.vpc_model();
    let vpc = model.lock().unwrap();
    let instance = &tb.nodes[node].instance_id;
    let mut held = BTreeSet::new();
    let mut loose = Vec::new();
    for eni in vpc.interfaces() {
        match &eni.attachment {
            Some(a) if &a.instance_id == instance => {
                held.extend(eni.secondary_ips.iter().map(|ip| format!("{ip}/32")));
                held.extend(eni.prefixes.iter().map(|p| p.to_string()));
            }
            None if eni.tags.get(cloud_instance_tag()) == Some(instance) => {
                loose.push(eni.id.clone())
            }
            _ => {}
        }
    }
    (held, loose)
}

fn cloud_instance_tag() -> &'static str {
    "node.k8s.amazonaws.com/instance_id"
}

/// Each pod reaches the VPC's router of `node`'s subnet and is seen there with its own address.
fn reach_the_vpc_from_their_own_address<'a>(
    tb: &Testbed,
    node: usize,
    pods: impl IntoIterator<Item = &'a Pod>,
) {
    let router = tb.nodes[node].gateway;
    let _listener = tb
        .vpc
        .run(move || WhoAmI::bind(SocketAddr::from((router, PORT))).unwrap())
        .unwrap();
    for pod in pods {
        assert_eq!(
            tb.seen_as(&pod.netns, router, PORT).unwrap(),
            pod.ip,
            "{} lost its connectivity",
            pod.name
        );
    }
}

/// No address twice, none leaked, the pool equal to EC2's view, the checkpoint equal to the pods,
/// and every running pod reachable from its own address.
fn check_invariants(tb: &Testbed, node: usize, running: &[Pod]) {
    settled(tb, node);
    let pods = tb.nodes[node].introspect("/v1/pods").unwrap();
    let assigned: Vec<String> = pods
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["ip"].as_str().unwrap().to_string())
        .collect();
    let unique: HashSet<&String> = assigned.iter().collect();
    assert_eq!(
        unique.len(),
        assigned.len(),
        "an address is assigned twice: {assigned:?}"
    );
    let mut expected: Vec<String> = running.iter().map(|p| p.ip.to_string()).collect();
    let mut got = assigned.clone();
    expected.sort();
    got.sort();
    assert_eq!(
        got, expected,
        "the daemon's assignments differ from the running pods"
    );

    let checkpoint: Value =
        serde_json::from_slice(&std::fs::read(tb.nodes[node].checkpoint()).unwrap()).unwrap();
    let mut recorded: Vec<String> = checkpoint["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ipv4"].as_str().unwrap().to_string())
        .collect();
    recorded.sort();
    assert_eq!(
        recorded, expected,
        "the checkpoint differs from the running pods"
    );

    let enis = tb.nodes[node].introspect("/v1/enis").unwrap();
    let pool: BTreeSet<String> = enis["0"]["ENIs"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|e| e["AvailableIPv4Cidrs"].as_object().unwrap().keys().cloned())
        .collect();
    let (held, loose) = ec2_view(tb, node);
    assert_eq!(
        pool, held,
        "the pool differs from what EC2 says the ENIs hold"
    );
    assert!(loose.is_empty(), "ENIs left unattached: {loose:?}");

    reach_the_vpc_from_their_own_address(tb, node, running);
}

/// ADDs racing a daemon kill: those that fail are deleted, as a runtime does.
fn adds_during(tb: &Testbed, node: usize, count: usize, while_doing: impl FnOnce()) -> Vec<Pod> {
    std::thread::scope(|scope| {
        let adders: Vec<_> = (0..count)
            .map(|_| scope.spawn(move || tb.add_pod(node)))
            .collect();
        while_doing();
        adders
            .into_iter()
            .filter_map(|a| a.join().unwrap().ok())
            .collect()
    })
}

#[test]
fn churn_of_100_pods_survives_sigterm_and_kill_restarts() {
    let test = "churn_of_100_pods_survives_sigterm_and_kill_restarts";
    let Some(mut tb) = testbed(test, options(&[("IP_COOLDOWN_PERIOD", "1")])) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut running: Vec<Pod> = Vec::new();
    let mut added = 0;
    while added < 100 {
        if added == 35 {
            // SIGTERM: DEL is still served while the daemon drains, ADD is refused.
            tb.terminate(0);
            std::thread::sleep(Duration::from_millis(100));
            let pod = running.swap_remove(rng.gen_range(0..running.len()));
            tb.del_pod(pod).unwrap();
            let refused = tb.add_pod(0);
            assert!(refused.is_err(), "ADD must be refused while draining");
            tb.stop_daemon(0, Stop::Term).unwrap();
            tb.start_daemon(0).unwrap();
            check_invariants(&tb, 0, &running);
        }
        if added == 70 {
            // kill -9 while ADDs are in flight, at a random moment.
            let delay = Duration::from_millis(rng.gen_range(0..40));
            let survivors = adds_during(&tb, 0, 4, || {
                std::thread::sleep(delay);
                tb.kill(0);
            });
            tb.stop_daemon(0, Stop::Kill).unwrap();
            added += 4;
            running.extend(survivors);
            tb.start_daemon(0).unwrap();
            // What the runtime's GC does with the attachments of ADDs that failed.
            tb.gc(0, &running.iter().collect::<Vec<_>>()).unwrap();
            check_invariants(&tb, 0, &running);
        }
        if running.len() < 12 || (running.len() < 25 && rng.gen_bool(0.6)) {
            running.push(tb.add_pod(0).unwrap());
            added += 1;
        } else {
            let pod = running.swap_remove(rng.gen_range(0..running.len()));
            tb.del_pod(pod).unwrap();
        }
    }
    check_invariants(&tb, 0, &running);
    for pod in running.drain(..) {
        tb.del_pod(pod).unwrap();
    }
    check_invariants(&tb, 0, &running);
}

#[test]
fn warm_eni_target_keeps_a_whole_eni_of_addresses_free() {
    let Some(tb) = testbed("warm_eni_target", options(&[])) else {
        return;
    };
    let mut tb = tb;
    tb.start_daemon(0).unwrap();
    let status = settled(&tb, 0);
    // m5.large: 9 addresses per ENI; WARM_ENI_TARGET=1 by default.
    assert_eq!(status["addresses"]["total"], 9, "{status}");
    let pods: Vec<Pod> = (0..4).map(|_| tb.add_pod(0).unwrap()).collect();
    let status = settled(&tb, 0);
    assert_eq!(status["enis"], 2, "{status}");
    assert_eq!(status["addresses"]["total"], 18, "{status}");
    assert_eq!(status["addresses"]["available"], 14, "{status}");
    check_invariants(&tb, 0, &pods);
}

#[test]
fn warm_ip_target_with_minimum_ip_target() {
    let env = [("WARM_IP_TARGET", "5"), ("MINIMUM_IP_TARGET", "10")];
    let Some(mut tb) = testbed("warm_ip_target", options(&env)) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let status = settled(&tb, 0);
    assert_eq!(status["addresses"]["total"], 10, "{status}");
    let pods: Vec<Pod> = (0..8).map(|_| tb.add_pod(0).unwrap()).collect();
    let status = settled(&tb, 0);
    // max(MINIMUM_IP_TARGET, assigned + WARM_IP_TARGET) = max(10, 8 + 5)
    assert_eq!(status["addresses"]["total"], 13, "{status}");
    assert_eq!(status["addresses"]["available"], 5, "{status}");
    check_invariants(&tb, 0, &pods);
}

#[test]
fn prefix_delegation_keeps_warm_prefix_target_free_prefixes() {
    let env = [
        ("ENABLE_PREFIX_DELEGATION", "true"),
        ("WARM_PREFIX_TARGET", "1"),
    ];
    let Some(mut tb) = testbed("prefix_delegation", options(&env)) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let status = settled(&tb, 0);
    assert_eq!(status["addresses"]["prefixes"], 1, "{status}");
    let pods: Vec<Pod> = (0..20).map(|_| tb.add_pod(0).unwrap()).collect();
    let status = settled(&tb, 0);
    // 20 pods fill two /28s (packed into the fullest first), plus one whole free /28.
    assert_eq!(status["addresses"]["prefixes"], 3, "{status}");
    assert_eq!(status["addresses"]["available"], 28, "{status}");
    for pod in &pods {
        assert!(ipv4(pod).octets()[0] == 10, "{}", pod.ip);
    }
    check_invariants(&tb, 0, &pods);
}

#[test]
fn custom_networking_puts_pods_in_the_eniconfig_subnet() {
    let mut options = options(&[("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true")]);
    options.custom_networking = true;
    let Some(mut tb) = testbed("custom_networking", options) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let pods: Vec<Pod> = (0..5).map(|_| tb.add_pod(0).unwrap()).collect();
    let pod_cidr: ipam::Ipv4Cidr = testbed::POD_CIDR.parse().unwrap();
    for pod in &pods {
        assert!(
            pod_cidr.contains(ipv4(pod)),
            "{} is not in {pod_cidr}",
            pod.ip
        );
    }
    let enis = tb.nodes[0].introspect("/v1/enis").unwrap();
    let pod_subnet = tb.pod_subnet.clone().unwrap();
    for (id, eni) in enis["0"]["ENIs"].as_object().unwrap() {
        if eni["IsPrimary"] == true {
            assert_eq!(eni["SubnetID"], tb.node_subnet.as_str(), "{id}");
            assert!(
                eni["AvailableIPv4Cidrs"].as_object().unwrap().is_empty(),
                "the primary ENI gives no pod addresses: {eni}"
            );
        } else {
            assert_eq!(eni["SubnetID"], pod_subnet.as_str(), "{id}");
        }
    }
    let a = &pods[0];
    let b = &pods[1];
    let address = SocketAddr::from((b.ip, PORT));
    let _listener = b.netns.run(move || WhoAmI::bind(address).unwrap()).unwrap();
    assert_eq!(tb.seen_as(&a.netns, b.ip, PORT).unwrap(), a.ip);
    check_invariants(&tb, 0, &pods);
}

#[test]
fn a_tight_ec2_bucket_slows_allocation_but_loses_nothing() {
    let mut options = options(&[("WARM_IP_TARGET", "1"), ("MINIMUM_IP_TARGET", "1")]);
    options.ec2.mutating_bucket = (1.0, 2.0);
    options.ec2.non_mutating_bucket = (2.0, 2.0);
    let Some(mut tb) = testbed("tight_bucket", options) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let pods: Vec<Pod> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let tb = &tb;
                scope.spawn(move || (0..5).map(|_| tb.add_pod(0).unwrap()).collect::<Vec<_>>())
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert_eq!(pods.len(), 20);
    let throttled: u64 = {
        let model = tb.vpc_model();
        let vpc = model.lock().unwrap();
        vpc.calls.values().map(|c| c.throttled).sum()
    };
    assert!(
        throttled > 0,
        "the bucket never throttled: the test proves nothing"
    );
    let seen: HashSet<Ipv4Addr> = pods.iter().map(ipv4).collect();
    assert_eq!(seen.len(), pods.len());
    check_invariants(&tb, 0, &pods);
}

/// After a restart that rebuilt assignments from the host: new pods never get the running pods'
/// addresses, a DEL of a rebuilt pod (found by its host veth) releases its address, and everyone
/// still reaches the VPC from its own address.
fn pods_restored_from_the_host_stay_whole(tb: &Testbed, mut running: Vec<Pod>) {
    let newcomers: Vec<Pod> = (0..6).map(|_| tb.add_pod(0).unwrap()).collect();
    for pod in &newcomers {
        assert!(
            running.iter().all(|r| r.ip != pod.ip),
            "{} given out twice",
            pod.ip
        );
    }
    let first = running.remove(0);
    let released = first.ip;
    tb.del_pod(first).unwrap();
    let pods = tb.nodes[0].introspect("/v1/pods").unwrap();
    assert!(
        pods.as_array()
            .unwrap()
            .iter()
            .all(|p| p["ip"] != released.to_string()),
        "{released} still assigned after DEL: {pods}"
    );
    reach_the_vpc_from_their_own_address(tb, 0, running.iter().chain(&newcomers));
}

#[test]
fn a_corrupt_checkpoint_is_kept_aside_and_wired_pods_keep_their_addresses() {
    let Some(mut tb) = testbed("corrupt_checkpoint", options(&[])) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let running: Vec<Pod> = (0..3).map(|_| tb.add_pod(0).unwrap()).collect();
    tb.stop_daemon(0, Stop::Term).unwrap();
    let checkpoint = tb.nodes[0].checkpoint();
    let whole = std::fs::read(&checkpoint).unwrap();
    std::fs::write(&checkpoint, &whole[..whole.len() / 2]).unwrap();
    tb.start_daemon(0).unwrap();
    let aside: Vec<_> = std::fs::read_dir(checkpoint.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("ipam.json.corrupt-")
        })
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "the unreadable checkpoint is kept for a human"
    );
    assert_eq!(
        std::fs::read(aside[0].path()).unwrap(),
        &whole[..whole.len() / 2]
    );
    pods_restored_from_the_host_stay_whole(&tb, running);
}

#[test]
fn ec2_failing_one_call_in_five_slows_allocation_but_leaks_nothing() {
    let mut options = options(&[("WARM_IP_TARGET", "1"), ("MINIMUM_IP_TARGET", "1")]);
    options.ec2.error_rate = 0.2;
    options.ec2.seed = 11;
    let Some(mut tb) = testbed("ec2_errors", options) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let pods: Vec<Pod> = (0..12).map(|_| tb.add_pod(0).unwrap()).collect();
    let failed: u64 = {
        let model = tb.vpc_model();
        let vpc = model.lock().unwrap();
        vpc.calls.values().map(|c| c.failed).sum()
    };
    assert!(failed > 0, "no call failed: the test proves nothing");
    check_invariants(&tb, 0, &pods);
}

fn kube(tb: &Testbed) -> &testbed::kube_api::KubeApi {
    tb.kube.as_ref().expect("Options::kubernetes")
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn warning_events(tb: &Testbed, reason: &str) -> Vec<Value> {
    kube(tb)
        .objects("events")
        .into_iter()
        .filter(|e| e["reason"] == reason && e["type"] == "Warning")
        .collect()
}

/// What the base's ClusterRole and Role grant, as (verb, group, resource).
/// What deploy/base/serviceaccount.yaml and `overlays` (their paths under deploy/) grant.
fn granted_by_rbac(overlays: &[&str]) -> Option<BTreeSet<(String, String, String)>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv/bin/python");
    if !python.is_file() {
        skip(
            "rbac",
            "PyYAML from .venv is needed to read the manifests (scripts/test.sh creates it)",
        );
        return None;
    }
    let mut yaml = std::fs::read_to_string(root.join("deploy/base/serviceaccount.yaml")).unwrap();
    for overlay in overlays {
        yaml.push_str("\n---\n");
        yaml.push_str(&std::fs::read_to_string(root.join("deploy").join(overlay)).unwrap());
    }
    let mut granted = BTreeSet::new();
    for doc in testbed::yaml_documents(&python, &yaml) {
        if doc["kind"] != "ClusterRole" && doc["kind"] != "Role" {
            continue;
        }
        for rule in doc["rules"].as_array().unwrap() {
            for group in rule["apiGroups"].as_array().unwrap() {
                for resource in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        granted.insert((
                            verb.as_str().unwrap().to_string(),
                            group.as_str().unwrap().to_string(),
                            resource.as_str().unwrap().to_string(),
                        ));
                    }
                }
            }
        }
    }
    Some(granted)
}

#[test]
fn kubernetes_custom_networking_follows_the_nodes_eniconfig_and_rbac_covers_exactly_the_calls() {
    let mut options = options(&[("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true")]);
    options.custom_networking = true;
    options.kubernetes = true;
    let Some(mut tb) = testbed("kubernetes_custom_networking", options) else {
        return;
    };
    // The kubelet's --max-pods, as the Node reports it, caps the node in place of the table.
    let mut node = kube(&tb).objects("nodes")[0].clone();
    node["status"]["capacity"]["pods"] = "9".into();
    kube(&tb).apply("nodes", node);
    tb.start_daemon(0).unwrap();
    let status = tb.nodes[0].introspect("/v1/status").unwrap();
    assert_eq!(status["maxPods"], 9, "{status}");
    let config = tb.nodes[0].introspect("/v1/eni-configs").unwrap();
    let pod_subnet = tb.pod_subnet.clone().unwrap();
    assert_eq!(
        config["source"],
        format!("ENIConfig/{}", testbed::ENI_CONFIG_NAME)
    );
    assert_eq!(config["subnet"], pod_subnet.as_str());

    let pods: Vec<Pod> = (0..3).map(|_| tb.add_pod(0).unwrap()).collect();
    let pod_cidr: ipam::Ipv4Cidr = testbed::POD_CIDR.parse().unwrap();
    for pod in &pods {
        assert!(
            pod_cidr.contains(ipv4(pod)),
            "{} is not in {pod_cidr}",
            pod.ip
        );
    }
    check_invariants(&tb, 0, &pods);

    // The ENIConfig deleted: no new ENIs, and a Warning says why; created again: back in use.
    kube(&tb).delete("eniconfigs", "", testbed::ENI_CONFIG_NAME);
    wait_for("the daemon drops the deleted ENIConfig", || {
        tb.nodes[0]
            .http_get(testbed::INTROSPECTION, "/v1/eni-configs")
            .unwrap()
            .0
            == 404
    });
    wait_for("a MissingENIConfig event", || {
        !warning_events(&tb, "MissingENIConfig").is_empty()
    });
    let event = &warning_events(&tb, "MissingENIConfig")[0];
    assert_eq!(
        event["involvedObject"]["name"], "aws-node-node-1",
        "{event}"
    );
    kube(&tb).apply(
        "eniconfigs",
        serde_json::json!({"metadata": {"name": testbed::ENI_CONFIG_NAME},
                           "spec": {"subnet": pod_subnet, "securityGroups": ["sg-0000000000000002"]}}),
    );
    wait_for("the daemon takes the ENIConfig again", || {
        tb.nodes[0].introspect("/v1/eni-configs").is_ok()
    });

    // The kubelet restarted with another --max-pods: the cap follows the Node.
    let mut node = kube(&tb).objects("nodes")[0].clone();
    node["status"]["capacity"]["pods"] = "17".into();
    kube(&tb).apply("nodes", node);
    wait_for("maxPods follows the Node", || {
        tb.nodes[0].introspect("/v1/status").unwrap()["maxPods"] == 17
    });

    // Every request the daemon made is granted by the manifests' RBAC, and every grant is used.
    let used: BTreeSet<(String, String, String)> = kube(&tb)
        .accesses()
        .into_iter()
        .map(|a| (a.verb, a.group, a.resource))
        .collect();
    if let Some(granted) = granted_by_rbac(&[]) {
        assert_eq!(
            used, granted,
            "RBAC (deploy/base/serviceaccount.yaml) differs from what the daemon asks"
        );
    }
    for pod in pods {
        tb.del_pod(pod).unwrap();
    }
    check_invariants(&tb, 0, &[]);
}

#[test]
fn a_pod_gone_from_the_api_server_without_del_loses_its_address() {
    let mut options = options(&[("VPC_CNI_VANISHED_POD_GRACE_SECONDS", "2")]);
    options.kubernetes = true;
    let Some(mut tb) = testbed("vanished_pod", options) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let mut pods: Vec<Pod> = (0..3).map(|_| tb.add_pod(0).unwrap()).collect();
    // Longer than the grace: pods the API server lists keep their addresses.
    std::thread::sleep(Duration::from_secs(4));
    check_invariants(&tb, 0, &pods);
    let gone = pods.remove(0);
    assert!(kube(&tb).delete("pods", testbed::POD_NAMESPACE, &gone.name));
    wait_for("the vanished pod's address is released", || {
        let listed = tb.nodes[0].introspect("/v1/pods").unwrap();
        !listed
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["ip"] == gone.ip.to_string())
    });
    let metrics = tb.nodes[0].metrics().unwrap();
    assert!(
        metrics.contains("vpccni_vanished_pod_releases_total 1"),
        "{metrics}"
    );
    // Its host side goes too: no route to its address remains on the node.
    let ip = gone.ip;
    wait_for("the vanished pod's host route is removed", || {
        let node = &tb.nodes[0].netns.name;
        let routes =
            testbed::netns::ip(&["-n", node, "-4", "route", "show", &format!("{ip}/32")]).unwrap();
        routes.trim().is_empty()
    });
    check_invariants(&tb, 0, &pods);
}

#[test]
fn missing_iam_permissions_become_a_warning_event_on_the_daemons_pod() {
    // More warm addresses than the primary ENI holds: a second ENI is needed at once.
    let mut options = options(&[("WARM_IP_TARGET", "15")]);
    options.kubernetes = true;
    options.ec2.denied_actions = vec!["CreateNetworkInterface".into()];
    let Some(mut tb) = testbed("missing_iam", options) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while warning_events(&tb, "MissingIAMPermissions").is_empty() {
        assert!(
            Instant::now() < deadline,
            "no MissingIAMPermissions event in 30 s:\n{}",
            tb.nodes[0].log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = warning_events(&tb, "MissingIAMPermissions");
    let event = &events[0];
    assert!(
        event["message"]
            .as_str()
            .unwrap()
            .contains("ec2:CreateNetworkInterface"),
        "{event}"
    );
    assert_eq!(event["involvedObject"]["kind"], "Pod");
    assert_eq!(event["involvedObject"]["name"], "aws-node-node-1");
    // Retries do not flood the API server with the same Event.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(warning_events(&tb, "MissingIAMPermissions").len(), 1);
    // Pods still get addresses from the primary ENI.
    let pod = tb.add_pod(0).unwrap();
    check_invariants(&tb, 0, std::slice::from_ref(&pod));
}

/// An ENI as EC2 holds it: (device index, interface type, secondary addresses, attached here).
fn eni_in_ec2(tb: &Testbed, eni: &str) -> (u32, String, usize, bool) {
    let model = tb.vpc_model();
    let vpc = model.lock().unwrap();
    let e = vpc
        .interfaces()
        .find(|e| e.id == eni)
        .unwrap_or_else(|| panic!("{eni} was deleted"));
    let a = e.attachment.as_ref();
    (
        a.map_or(u32::MAX, |a| a.device_index),
        e.interface_type.clone(),
        e.secondary_ips.len() + e.prefixes.len(),
        a.is_some_and(|a| a.instance_id == tb.nodes[0].instance_id),
    )
}

/// Node 0's ENIs at the device indexes `pick` takes, by device index: id and secondary addresses.
fn node0_enis(tb: &Testbed, pick: impl Fn(u32) -> bool) -> Vec<(String, Vec<Ipv4Addr>)> {
    let model = tb.vpc_model();
    let vpc = model.lock().unwrap();
    let mut found: Vec<(u32, String, Vec<Ipv4Addr>)> = vpc
        .interfaces()
        .filter_map(|e| {
            let a = e.attachment.as_ref()?;
            (a.instance_id == tb.nodes[0].instance_id && pick(a.device_index))
                .then(|| (a.device_index, e.id.clone(), e.secondary_ips.clone()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, id, ips)| (id, ips)).collect()
}

/// An ENI on card 0 the node has before its daemon first starts.
fn pre(
    device: u32,
    kind: &str,
    secondaries: u32,
    tags: &[(&str, &str)],
) -> testbed::PreattachedConfig {
    testbed::PreattachedConfig {
        device_index: device,
        network_card: 0,
        interface_type: kind.into(),
        secondary_addresses: secondaries,
        tags: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

#[test]
fn enis_that_are_not_ours_are_never_touched_and_trunk_and_efa_give_no_pod_addresses() {
    let test = "enis_that_are_not_ours";
    let options = Options {
        // m5.4xlarge: 8 ENIs, 29 address slots each.
        instance_type: "m5.4xlarge".into(),
        preattached: vec![
            pre(
                1,
                "interface",
                3,
                &[("node.k8s.amazonaws.com/no_manage", "true")],
            ),
            pre(2, "interface", 2, &[("owner", "multus")]),
            // Without our instance tag: managed only because no_manage says false.
            pre(
                3,
                "trunk",
                0,
                &[("node.k8s.amazonaws.com/no_manage", "false")],
            ),
            pre(
                4,
                "efa",
                2,
                &[("node.k8s.amazonaws.com/no_manage", "false")],
            ),
        ],
        ..options(&[
            ("MANAGE_UNTAGGED_ENI", "false"),
            // More than the primary ENI holds: a second ENI of ours is needed.
            ("MINIMUM_IP_TARGET", "35"),
            ("WARM_IP_TARGET", "2"),
            ("IP_COOLDOWN_PERIOD", "1"),
        ])
    };
    let Some(mut tb) = testbed(test, options) else {
        return;
    };
    let theirs: Vec<(String, (u32, String, usize, bool))> = node0_enis(&tb, |d| d > 0)
        .into_iter()
        .map(|(id, _)| (id.clone(), eni_in_ec2(&tb, &id)))
        .collect();
    assert_eq!(theirs.len(), 4);
    tb.start_daemon(0).unwrap();
    let status = settled(&tb, 0);
    // The primary and one ENI of ours, at the first free device index (5).
    assert_eq!(status["enis"], 4, "primary, trunk, EFA and ours: {status}");
    let enis = tb.nodes[0].introspect("/v1/enis").unwrap();
    let listed: BTreeSet<String> = enis["0"]["ENIs"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let ours: Vec<String> = {
        let model = tb.vpc_model();
        let vpc = model.lock().unwrap();
        vpc.interfaces()
            .filter(|e| {
                e.attachment
                    .as_ref()
                    .is_some_and(|a| a.instance_id == tb.nodes[0].instance_id)
                    && e.tags.contains_key(cloud_instance_tag())
            })
            .map(|e| (e.id.clone(), e.attachment.as_ref().unwrap().device_index))
            .inspect(|(_, device)| assert_eq!(*device, 5, "our ENI goes past the taken indexes"))
            .map(|(id, _)| id)
            .collect()
    };
    assert_eq!(ours.len(), 1, "{ours:?}");
    for (id, (device, kind, _, _)) in &theirs {
        let listed_here = listed.contains(id);
        match kind.as_str() {
            "trunk" | "efa" => assert!(listed_here, "the {kind} ENI is ours to know"),
            _ => assert!(
                !listed_here,
                "device {device}: an ENI that is not ours is listed"
            ),
        }
        if kind == "trunk" || kind == "efa" {
            assert_eq!(
                enis["0"]["ENIs"][id]["IsExcludedForPodIPs"], true,
                "{kind}: {enis}"
            );
        }
    }
    let metrics = tb.nodes[0].metrics().unwrap();
    assert!(
        metrics.lines().any(|l| l == "awscni_eni_max 6"),
        "8 ENIs less the two that are not ours:\n{metrics}"
    );

    // Pods come and go; shrink and free run. Nothing of theirs changes.
    let pods: Vec<Pod> = (0..40).map(|_| tb.add_pod(0).unwrap()).collect();
    for pod in &pods {
        assert!(
            !pods.iter().any(|p| p.name != pod.name && p.ip == pod.ip),
            "two pods share {}",
            pod.ip
        );
    }
    let theirs_ips: BTreeSet<String> = {
        let model = tb.vpc_model();
        let vpc = model.lock().unwrap();
        vpc.interfaces()
            .filter(|e| theirs.iter().any(|(id, _)| *id == e.id))
            .flat_map(|e| e.secondary_ips.iter().map(|ip| ip.to_string()))
            .collect()
    };
    for pod in &pods {
        assert!(
            !theirs_ips.contains(&pod.ip.to_string()),
            "{} is theirs",
            pod.ip
        );
    }
    for pod in pods {
        tb.del_pod(pod).unwrap();
    }
    std::thread::sleep(Duration::from_secs(3));
    settled(&tb, 0);
    for (id, before) in &theirs {
        assert_eq!(&eni_in_ec2(&tb, id), before, "{id} changed");
    }
    // Their links: no address, no rule, no route table of ours.
    let ns = tb.nodes[0].netns.name.clone();
    let rules = testbed::netns::ip(&["-n", &ns, "rule"]).unwrap();
    for (_, (device, kind, _, _)) in &theirs {
        if kind == "interface" {
            let link = format!("eth{device}");
            let addrs =
                testbed::netns::ip(&["-n", &ns, "-4", "addr", "show", "dev", &link]).unwrap();
            assert!(!addrs.contains("inet "), "{link} was configured:\n{addrs}");
            let table = format!("lookup {}", device + 1);
            assert!(
                !rules.contains(&table),
                "a rule for {link}'s table:\n{rules}"
            );
        }
    }
    // Restarted, the daemon still leaves them alone.
    tb.stop_daemon(0, Stop::Term).unwrap();
    tb.start_daemon(0).unwrap();
    settled(&tb, 0);
    for (id, before) in &theirs {
        assert_eq!(&eni_in_ec2(&tb, id), before, "{id} changed after a restart");
    }
}

/// A pod interface of someone else's on the node: a veth named as ours with a /32 route and our
/// rules for an address on none of our ENIs (upstream's branch-ENI pods in standard mode look so).
fn foreign_pod_interface(tb: &Testbed, address: &str) -> String {
    let ns = tb.nodes[0].netns.name.clone();
    let veth = "eni0f0f0f0f0f0";
    let ip = |args: &[&str]| {
        let mut all = vec!["-n", ns.as_str()];
        all.extend_from_slice(args);
        testbed::netns::ip(&all).unwrap();
    };
    ip(&[
        "link",
        "add",
        veth,
        "type",
        "veth",
        "peer",
        "name",
        "foreign-peer",
    ]);
    ip(&["link", "set", veth, "up"]);
    ip(&[
        "route",
        "add",
        &format!("{address}/32"),
        "dev",
        veth,
        "scope",
        "link",
    ]);
    ip(&[
        "rule", "add", "to", address, "lookup", "main", "priority", "512",
    ]);
    veth.to_string()
}

fn host_view(tb: &Testbed) -> (String, String) {
    let ns = tb.nodes[0].netns.name.clone();
    (
        testbed::netns::ip(&["-n", &ns, "-4", "route", "show", "table", "main"]).unwrap(),
        testbed::netns::ip(&["-n", &ns, "rule"]).unwrap(),
    )
}

#[test]
fn a_missing_checkpoint_is_rebuilt_from_the_host_and_foreign_pod_interfaces_stay() {
    let Some(mut tb) = testbed("missing_checkpoint", options(&[])) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let running: Vec<Pod> = (0..4).map(|_| tb.add_pod(0).unwrap()).collect();
    let foreign = foreign_pod_interface(&tb, "10.0.15.250");

    // Restarted with its checkpoint: the foreign interface is not ours to remove.
    tb.stop_daemon(0, Stop::Term).unwrap();
    tb.start_daemon(0).unwrap();
    let (routes, rules) = host_view(&tb);
    assert!(
        routes.contains(&format!("10.0.15.250 dev {foreign}")),
        "{routes}"
    );
    assert!(rules.contains("to 10.0.15.250 lookup main"), "{rules}");

    // The checkpoint deleted under running pods: their addresses come back from the host.
    tb.stop_daemon(0, Stop::Term).unwrap();
    std::fs::remove_file(tb.nodes[0].checkpoint()).unwrap();
    tb.start_daemon(0).unwrap();
    let log = std::fs::read_to_string(tb.nodes[0].daemon_log()).unwrap();
    assert!(log.contains("rebuilt from the host"), "{log}");
    let pods = tb.nodes[0].introspect("/v1/pods").unwrap();
    let assigned: BTreeSet<String> = pods
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["ip"].as_str().unwrap().to_string())
        .collect();
    for pod in &running {
        assert!(
            assigned.contains(&pod.ip.to_string()),
            "{} lost: {pods}",
            pod.ip
        );
    }
    assert!(
        !assigned.contains("10.0.15.250"),
        "a foreign address adopted: {pods}"
    );
    let (routes, rules) = host_view(&tb);
    for pod in &running {
        assert!(
            routes.contains(&format!("{} dev eni", pod.ip)),
            "{} unwired:\n{routes}",
            pod.ip
        );
    }
    assert!(
        routes.contains(&format!("10.0.15.250 dev {foreign}")),
        "{routes}"
    );
    assert!(rules.contains("to 10.0.15.250 lookup main"), "{rules}");
    pods_restored_from_the_host_stay_whole(&tb, running);
}

#[test]
fn a_terminating_aws_node_is_waited_for_before_its_checkpoint_is_restored() {
    use std::os::unix::net::UnixListener;
    // An ENI from before, with addresses aws-node was handing out.
    let mut options = options(&[]);
    options.preattached = vec![pre(1, "interface", 3, &[])];
    let Some(mut tb) = testbed("terminating_aws_node", options) else {
        return;
    };
    let socket = tb.nodes[0].state.join("aws-node.sock");
    tb.set_daemon_env(
        0,
        "VPC_CNI_PREDECESSOR_SOCKET",
        &socket.display().to_string(),
    );
    let last_address = node0_enis(&tb, |d| d == 1)[0].1[0].to_string();
    let unix = UnixListener::bind(&socket).unwrap();
    let grpc = tb.nodes[0]
        .netns
        .run(|| std::net::TcpListener::bind("127.0.0.1:50051").unwrap())
        .unwrap();
    // aws-node's grace period: it gives out one more address, writes its checkpoint, then exits.
    let checkpoint = tb.nodes[0].checkpoint();
    let predecessor = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        std::fs::write(
            &checkpoint,
            format!(
                r#"{{"version":"vpc-cni-ipam/1","allocations":[{{"networkName":"aws-cni","containerID":"last-sandbox","ifName":"eth0","ipv4":"{last_address}","allocationTimestamp":{now},"metadata":{{"k8sPodNamespace":"default","k8sPodName":"last","interfacesCount":1}}}}]}}"#
            ),
        )
        .unwrap();
        drop((unix, grpc));
        last_address
    });
    let took = tb.start_daemon(0).unwrap();
    let last_address = predecessor.join().unwrap();
    assert!(
        took >= Duration::from_millis(1500),
        "started after {took:?}"
    );
    let log = std::fs::read_to_string(tb.nodes[0].daemon_log()).unwrap();
    assert!(log.contains("waiting for the previous CNI daemon"), "{log}");
    let pods = tb.nodes[0].introspect("/v1/pods").unwrap();
    assert!(
        pods.as_array()
            .unwrap()
            .iter()
            .any(|p| p["ip"] == last_address),
        "aws-node's last assignment was not restored: {pods}"
    );
    let newcomers: Vec<Pod> = (0..3).map(|_| tb.add_pod(0).unwrap()).collect();
    assert!(newcomers.iter().all(|p| p.ip.to_string() != last_address));
}

/// Sum of a counter over its labels, from the daemon's metrics.
fn counter(tb: &Testbed, name: &str) -> u64 {
    tb.nodes[0]
        .metrics()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn pool_blocks(tb: &Testbed) -> BTreeSet<String> {
    let enis = tb.nodes[0].introspect("/v1/enis").unwrap();
    enis["0"]["ENIs"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|e| e["AvailableIPv4Cidrs"].as_object().unwrap().keys().cloned())
        .collect()
}

#[test]
fn changes_made_behind_the_daemons_back_are_noticed_through_imds() {
    let Some(mut tb) = testbed(
        "out_of_band",
        options(&[
            ("VPC_CNI_RECONCILE_SECONDS", "1"),
            ("IP_COOLDOWN_PERIOD", "1"),
        ]),
    ) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let pods: Vec<Pod> = (0..2).map(|_| tb.add_pod(0).unwrap()).collect();
    settled(&tb, 0);

    // Idle: IMDS is read every second, EC2 not at all.
    let (ec2_before, imds_before) = (
        counter(&tb, "awscni_ec2api_req_count"),
        counter(&tb, "vpccni_imds_requests_total"),
    );
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        counter(&tb, "awscni_ec2api_req_count"),
        ec2_before,
        "an idle node calls EC2"
    );
    assert!(counter(&tb, "vpccni_imds_requests_total") > imds_before);

    // An idle address taken away out of band: dropped from the pool after one read-back.
    let (primary, taken) = {
        let model = tb.vpc_model();
        let vpc = model.lock().unwrap();
        let instance = vpc
            .instance(&tb.nodes[0].instance_id)
            .unwrap()
            .primary_eni
            .clone();
        let eni = vpc.interfaces().find(|e| e.id == instance).unwrap();
        let taken = *eni
            .secondary_ips
            .iter()
            .find(|ip| pods.iter().all(|p| p.ip != **ip))
            .unwrap();
        (instance, taken)
    };
    tb.out_of_band(|vpc| vpc.take_address(&primary, taken))
        .unwrap();
    wait_for("the taken address leaves the pool", || {
        !pool_blocks(&tb).contains(&format!("{taken}/32"))
    });
    let log = std::fs::read_to_string(tb.nodes[0].daemon_log()).unwrap();
    assert!(log.contains("changed out of band"), "{log}");

    // A secondary ENI of ours detached out of band: dropped, and the pool grows back elsewhere.
    let secondary = node0_enis(&tb, |d| d > 0)
        .into_iter()
        .next()
        .expect("WARM_ENI_TARGET=1 attached a second ENI")
        .0;
    tb.out_of_band(|vpc| vpc.detach_now(&secondary)).unwrap();
    wait_for("the detached ENI leaves the pool", || {
        let enis = tb.nodes[0].introspect("/v1/enis").unwrap();
        enis["0"]["ENIs"].get(&secondary).is_none()
    });
    let status = settled(&tb, 0);
    assert!(
        status["addresses"]["available"].as_u64().unwrap() >= 9,
        "WARM_ENI_TARGET holds again: {status}"
    );
    let (held, _) = ec2_view(&tb, 0);
    assert_eq!(pool_blocks(&tb), held, "the pool equals EC2 again");

    // A CIDR added to the VPC is exempt from SNAT without a restart.
    tb.out_of_band(|vpc| vpc.add_cidr("100.64.0.0/16".parse().unwrap()));
    let ns = tb.nodes[0].netns.name.clone();
    wait_for("the new VPC CIDR in the SNAT exemptions", || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "nft",
                "list",
                "set",
                "ip",
                "vpc-cni",
                "snat-exempt",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("100.64.0.0/16")
    });
    // The pods still talk.
    reach_the_vpc_from_their_own_address(&tb, 0, &pods);
}

#[test]
fn custom_networking_without_an_eniconfig_keeps_the_node_not_ready_until_one_exists() {
    let mut options = options(&[("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true")]);
    options.custom_networking = true;
    options.kubernetes = true;
    let Some(mut tb) = testbed("custom_networking_not_ready", options) else {
        return;
    };
    let pod_subnet = tb.pod_subnet.clone().unwrap();
    assert!(kube(&tb).delete("eniconfigs", "", testbed::ENI_CONFIG_NAME));
    tb.spawn_daemon(0).unwrap();
    wait_for("the daemon answers STATUS", || tb.nodes[0].status().is_ok());
    wait_for("a MissingENIConfig event", || {
        !warning_events(&tb, "MissingENIConfig").is_empty()
    });
    // Settled and still not ready, saying why; the installer would not write the conflist.
    std::thread::sleep(Duration::from_secs(2));
    match tb.nodes[0].status().unwrap() {
        proto::Reply::Status { ready, detail, .. } => {
            assert!(!ready, "ready without an ENIConfig");
            assert!(detail.contains("no ENIConfig"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        tb.nodes[0].http_get(testbed::METRICS, "/readyz").unwrap().0,
        503
    );
    kube(&tb).apply(
        "eniconfigs",
        serde_json::json!({"metadata": {"name": testbed::ENI_CONFIG_NAME},
                           "spec": {"subnet": pod_subnet, "securityGroups": ["sg-0000000000000002"]}}),
    );
    tb.wait_ready(0, Duration::from_secs(30)).unwrap();
    let pod = tb.add_pod(0).unwrap();
    let pod_cidr: ipam::Ipv4Cidr = testbed::POD_CIDR.parse().unwrap();
    assert!(pod_cidr.contains(ipv4(&pod)), "{}", pod.ip);
}

#[test]
fn a_cordoned_node_keeps_its_pool_as_it_is() {
    let mut options = options(&[("WARM_IP_TARGET", "2"), ("IP_COOLDOWN_PERIOD", "1")]);
    options.kubernetes = true;
    let Some(mut tb) = testbed("cordoned", options) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let status = settled(&tb, 0);
    assert_eq!(status["addresses"]["available"], 2, "{status}");
    let mut node = kube(&tb).objects("nodes")[0].clone();
    node["spec"] = serde_json::json!({"unschedulable": true});
    kube(&tb).apply("nodes", node.clone());
    wait_for("the daemon sees the cordon", || {
        let log = std::fs::read_to_string(tb.nodes[0].daemon_log()).unwrap();
        log.contains("unschedulable=true") || log.contains("\"unschedulable\":true")
    });
    // DaemonSet pods still land on a cordoned node: they use what is warm, nothing is added.
    let pods: Vec<Pod> = (0..2).map(|_| tb.add_pod(0).unwrap()).collect();
    let status = settled(&tb, 0);
    assert_eq!(status["addresses"]["total"], 2, "{status}");
    assert!(
        status["stalled"].as_str().unwrap().contains("cordoned"),
        "{status}"
    );
    node["spec"] = serde_json::json!({});
    kube(&tb).apply("nodes", node);
    wait_for("the pool grows back to its target", || {
        let s = tb.nodes[0].introspect("/v1/status").unwrap();
        s["addresses"]["available"] == 2 && s["ec2ActionsInFlight"] == 0
    });
    check_invariants(&tb, 0, &pods);
}

/// A VPC file for the testbed: the node subnet, tagged as given, and maybe a second subnet of the
/// AZ for pods; the instance has an ENI of ours from before, in the node subnet.
fn vpc_with_node_subnet_tagged(role: &str, second: bool) -> testbed::ServeConfig {
    let second = if second {
        "[[subnets]]\nname = \"pods-ok\"\ncidr = \"10.0.16.0/20\"\naz = \"us-west-2a\"\ntags = { \"kubernetes.io/role/cni\" = \"1\" }\n"
    } else {
        ""
    };
    testbed::ServeConfig::parse(&format!(
        "[vpc]\ncidr = \"10.0.0.0/16\"\n\
         [[subnets]]\nname = \"nodes\"\ncidr = \"10.0.0.0/20\"\naz = \"us-west-2a\"\ntags = {{ \"kubernetes.io/role/cni\" = \"{role}\" }}\n\
         {second}\
         [[instances]]\nname = \"node-1\"\ntype = \"m5.large\"\nsubnet = \"nodes\"\nsecurity_groups = [\"sg-0000000000000001\"]\n\
         [[instances.enis]]\ndevice_index = 1\nsecondary_addresses = 3\n"
    ))
    .unwrap()
}

#[test]
fn an_excluded_subnet_gives_no_pod_addresses_even_from_enis_already_attached() {
    let mut options = options(&[("WARM_IP_TARGET", "2"), ("IP_COOLDOWN_PERIOD", "1")]);
    options.vpc = Some(vpc_with_node_subnet_tagged("0", true));
    let Some(mut tb) = testbed("excluded_subnet", options) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    settled(&tb, 0);
    let enis = tb.nodes[0].introspect("/v1/enis").unwrap();
    let enis = enis["0"]["ENIs"].as_object().unwrap();
    let node_subnet = tb.node_subnet.clone();
    for (id, eni) in enis {
        if eni["SubnetID"] == node_subnet.as_str() {
            assert_eq!(eni["IsExcludedForPodIPs"], true, "{id}: {eni}");
            // Its idle addresses went back to EC2, as upstream does at start.
            assert!(
                eni["AvailableIPv4Cidrs"].as_object().unwrap().is_empty(),
                "{id}: {eni}"
            );
        } else {
            assert_eq!(eni["IsExcludedForPodIPs"], false, "{id}: {eni}");
        }
    }
    let pods: Vec<Pod> = (0..3).map(|_| tb.add_pod(0).unwrap()).collect();
    let allowed: ipam::Ipv4Cidr = "10.0.16.0/20".parse().unwrap();
    for pod in &pods {
        assert!(
            allowed.contains(ipv4(pod)),
            "{} is in the excluded subnet",
            pod.ip
        );
    }
    check_invariants(&tb, 0, &pods);
}

#[test]
fn no_fallback_to_an_excluded_primary_subnet() {
    let mut options = options(&[("WARM_IP_TARGET", "2")]);
    options.vpc = Some(vpc_with_node_subnet_tagged("0", false));
    let Some(mut tb) = testbed("no_fallback", options) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let status = tb.nodes[0].introspect("/v1/status").unwrap();
    assert_eq!(status["addresses"]["total"], 0, "{status}");
    let model = tb.vpc_model();
    let vpc = model.lock().unwrap();
    let created = vpc
        .calls
        .iter()
        .filter(|(op, _)| op.name() == "CreateNetworkInterface")
        .map(|(_, c)| c.ok)
        .sum::<u64>();
    assert_eq!(created, 0, "an ENI was created in the excluded subnet");
    drop(vpc);
    let log = std::fs::read_to_string(tb.nodes[0].daemon_log()).unwrap();
    assert!(
        log.contains("no subnet of the node's availability zone"),
        "{log}"
    );
}

#[test]
fn without_provisioning_imds_alone_keeps_the_pool_true() {
    // Someone else provisions this node's addresses; the daemon makes no EC2 change.
    let mut options = options(&[
        ("DISABLE_NETWORK_RESOURCE_PROVISIONING", "true"),
        ("VPC_CNI_RECONCILE_SECONDS", "1"),
        ("IP_COOLDOWN_PERIOD", "1"),
    ]);
    options.preattached = vec![pre(1, "interface", 3, &[])];
    let Some(mut tb) = testbed("no_provisioning", options) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let pod = tb.add_pod(0).unwrap();
    let (eni, ips) = node0_enis(&tb, |d| d == 1).remove(0);
    let taken = *ips.iter().find(|ip| **ip != pod.ip).unwrap();
    let calls_before = counter(&tb, "awscni_ec2api_req_count");
    tb.out_of_band(|vpc| vpc.take_address(&eni, taken)).unwrap();
    wait_for("the taken address leaves the pool", || {
        !pool_blocks(&tb).contains(&format!("{taken}/32"))
    });
    // The ENI still serves pods, and nothing was asked of EC2.
    let other = tb.add_pod(0).unwrap();
    assert_ne!(other.ip, taken);
    assert_eq!(counter(&tb, "awscni_ec2api_req_count"), calls_before);
    reach_the_vpc_from_their_own_address(&tb, 0, [&pod, &other]);
}

#[test]
fn someone_elses_eni_detached_gives_its_slot_back() {
    let mut options = options(&[("VPC_CNI_RECONCILE_SECONDS", "1")]);
    options.preattached = vec![pre(
        1,
        "interface",
        1,
        &[("node.k8s.amazonaws.com/no_manage", "true")],
    )];
    let Some(mut tb) = testbed("foreign_detached", options) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let eni_max = |tb: &Testbed| counter(tb, "awscni_eni_max");
    // m5.large: 3 ENIs, one of them someone else's.
    assert_eq!(eni_max(&tb), 2);
    let theirs = node0_enis(&tb, |d| d == 1).remove(0).0;
    tb.out_of_band(|vpc| vpc.detach_now(&theirs)).unwrap();
    wait_for("the slot comes back", || eni_max(&tb) == 3);
    let log = std::fs::read_to_string(tb.nodes[0].daemon_log()).unwrap();
    assert!(!log.contains("attached by someone else"), "{log}");
}

/// EC2's count of successful calls of `operation` so far.
fn ec2_ok(tb: &Testbed, operation: &str) -> u64 {
    let model = tb.vpc_model();
    let vpc = model.lock().unwrap();
    vpc.calls
        .iter()
        .find(|(op, _)| op.name() == operation)
        .map_or(0, |(_, c)| c.ok)
}

/// The IPv6 prefixes EC2 has delegated to the node's primary ENI.
fn primary_v6_prefixes(tb: &Testbed, node: usize) -> Vec<String> {
    let model = tb.vpc_model();
    let vpc = model.lock().unwrap();
    let instance = vpc.instance(&tb.nodes[node].instance_id).unwrap();
    let primary = vpc
        .interfaces()
        .find(|e| e.id == instance.primary_eni)
        .unwrap();
    primary
        .ipv6_prefixes
        .iter()
        .map(|p| p.to_string())
        .collect()
}

/// The checkpoint's IPv6 entries as (address, egress address); panics on IPv4 entries.
fn v6_checkpoint(tb: &Testbed, node: usize) -> Vec<(String, String)> {
    let checkpoint: Value =
        serde_json::from_slice(&std::fs::read(tb.nodes[node].checkpoint()).unwrap()).unwrap();
    let mut entries: Vec<(String, String)> = checkpoint["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            assert!(
                a.get("ipv4").is_none(),
                "an IPv4 entry on an IPv6 node: {a}"
            );
            (
                a["ipv6"].as_str().unwrap().to_string(),
                a["egressIPv4"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    entries.sort();
    entries
}

#[test]
fn ipv6_nodes_give_pods_their_80_and_ipv4_egress_and_a_kill_loses_nothing() {
    let test = "ipv6_nodes_give_pods_their_80_and_ipv4_egress_and_a_kill_loses_nothing";
    let Some(mut tb) = testbed(
        test,
        Options {
            nodes: 2,
            ipv6: true,
            ..Options::default()
        },
    ) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    tb.start_daemon(1).unwrap();
    // One /80 per node, one call each, and no ENI, address or prefix call besides.
    let prefixes = primary_v6_prefixes(&tb, 0);
    assert_eq!(prefixes.len(), 1, "{prefixes:?}");
    assert!(prefixes[0].ends_with("/80"), "{prefixes:?}");
    assert_eq!(ec2_ok(&tb, "AssignIpv6Addresses"), 2);
    for op in ["CreateNetworkInterface", "AssignPrivateIpAddresses"] {
        assert_eq!(ec2_ok(&tb, op), 0, "{op}");
    }
    let prefix: ipam::Ipv6Cidr = prefixes[0].parse().unwrap();

    let mut on_0: Vec<Pod> = (0..3).map(|_| tb.add_pod(0).unwrap()).collect();
    let on_1 = tb.add_pod(1).unwrap();
    for pod in &on_0 {
        let IpAddr::V6(ip) = pod.ip else {
            panic!("{} got {}", pod.name, pod.ip)
        };
        assert!(
            prefix.contains_cidr(&ipam::Ipv6Cidr::new(ip, 128).unwrap()),
            "{ip}"
        );
        assert!(pod.egress_v4.is_some(), "{} has no v4if0 address", pod.name);
    }

    // Across nodes over IPv6, to the VPC over IPv6 from the pod's own address, and to an IPv4
    // VPC host by v4if0 from the node's address.
    let router_v6 = IpAddr::V6(testbed::fabric::gateway_v6(
        testbed::NODE_CIDR_V6.parse().unwrap(),
    ));
    let router_v4 = tb.nodes[0].gateway;
    let peer = on_1.ip;
    let listeners = (
        on_1.netns
            .run(move || WhoAmI::bind(SocketAddr::from((peer, PORT))).unwrap())
            .unwrap(),
        tb.vpc
            .run(move || WhoAmI::bind(SocketAddr::from((router_v6, PORT))).unwrap())
            .unwrap(),
        tb.vpc
            .run(move || WhoAmI::bind(SocketAddr::from((router_v4, PORT))).unwrap())
            .unwrap(),
    );
    let node_ip = IpAddr::V4(tb.nodes[0].primary_ip);
    for pod in &on_0 {
        assert_eq!(tb.seen_as(&pod.netns, peer, PORT).unwrap(), pod.ip);
        assert_eq!(tb.seen_as(&pod.netns, router_v6, PORT).unwrap(), pod.ip);
        assert_eq!(tb.seen_as(&pod.netns, router_v4, PORT).unwrap(), node_ip);
    }
    drop(listeners);

    // kill -9 while ADDs and a DEL are in flight, then a restart: no address lost, none given
    // twice, the same /80 (no second AssignIpv6Addresses), the checkpoint equal to the pods.
    let gone = on_0.remove(0);
    let raced = std::thread::scope(|scope| {
        let del = scope.spawn(|| tb.del_pod(gone));
        let delay = Duration::from_millis(rand::rngs::StdRng::seed_from_u64(6).gen_range(0..30));
        let added = adds_during(&tb, 0, 6, || {
            std::thread::sleep(delay);
            tb.kill(0);
        });
        let _ = del.join().unwrap();
        added
    });
    tb.stop_daemon(0, Stop::Kill).unwrap();
    tb.start_daemon(0).unwrap();
    on_0.extend(raced);
    // What the runtime's GC does with the attachments of ADDs that failed, and of the DEL the
    // daemon may not have heard.
    tb.gc(0, &on_0.iter().collect::<Vec<_>>()).unwrap();
    let more = tb.add_pod(0).unwrap();
    on_0.push(more);
    assert_eq!(primary_v6_prefixes(&tb, 0), prefixes, "the /80 is kept");
    assert_eq!(ec2_ok(&tb, "AssignIpv6Addresses"), 2);
    let recorded = v6_checkpoint(&tb, 0);
    let mut expected: Vec<String> = on_0.iter().map(|p| p.ip.to_string()).collect();
    expected.sort();
    let addresses: Vec<String> = recorded.iter().map(|(ip, _)| ip.clone()).collect();
    assert_eq!(
        addresses, expected,
        "the checkpoint differs from the running pods"
    );
    let egress: HashSet<&String> = recorded.iter().map(|(_, e)| e).collect();
    assert_eq!(
        egress.len(),
        recorded.len(),
        "an egress address given twice: {recorded:?}"
    );
    let status = tb.nodes[0].introspect("/v1/status").unwrap();
    assert_eq!(status["ipv6"]["prefix"], prefixes[0]);
    assert_eq!(status["addresses"]["assigned"], on_0.len());
    let metrics = tb.nodes[0].metrics().unwrap();
    let per_cidr = format!(
        "awscni_assigned_ip_per_cidr{{cidr=\"{}\"}} {}",
        prefixes[0],
        on_0.len()
    );
    assert!(
        metrics.lines().any(|l| l == per_cidr),
        "{per_cidr} not in\n{metrics}"
    );
    let router_v6_listener = tb
        .vpc
        .run(move || WhoAmI::bind(SocketAddr::from((router_v6, PORT))).unwrap())
        .unwrap();
    for pod in &on_0 {
        assert_eq!(
            tb.seen_as(&pod.netns, router_v6, PORT).unwrap(),
            pod.ip,
            "{} lost its connectivity",
            pod.name
        );
    }
    drop(router_v6_listener);
}

#[test]
fn ipv6_on_a_subnet_without_an_ipv6_block_stops_with_a_clear_error_and_an_event() {
    let mut options = options(&[
        ("ENABLE_IPv6", "true"),
        ("ENABLE_IPv4", "false"),
        ("ENABLE_PREFIX_DELEGATION", "true"),
    ]);
    options.kubernetes = true;
    let Some(mut tb) = testbed("ipv6_without_a_block", options) else {
        return;
    };
    let error = tb.start_daemon(0).unwrap_err();
    assert!(
        error.contains("has no IPv6 CIDR block"),
        "the daemon must say why: {error}"
    );
    let events = warning_events(&tb, "StartFailed");
    assert_eq!(events.len(), 1, "{events:?}");
    let message = events[0]["message"].as_str().unwrap();
    assert!(
        message.contains("ENABLE_IPv6=true") && message.contains("subnet"),
        "{message}"
    );
    assert_eq!(ec2_ok(&tb, "AssignIpv6Addresses"), 0);
    assert!(
        !tb.nodes[0].socket().exists(),
        "no socket: the node stays not ready"
    );

    // Settings refused before anything else (IPv6 beside IPv4, IPv6 without prefix delegation)
    // say so the same way.
    for (key, value, says) in [
        (
            "ENABLE_IPv4",
            "true",
            "exactly one of ENABLE_IPv4 and ENABLE_IPv6",
        ),
        (
            "ENABLE_PREFIX_DELEGATION",
            "false",
            "ENABLE_IPv6=true requires ENABLE_PREFIX_DELEGATION=true",
        ),
    ] {
        let before = warning_events(&tb, "StartFailed").len();
        tb.set_daemon_env(0, key, value);
        let error = tb.start_daemon(0).unwrap_err();
        assert!(error.contains(says), "{error}");
        let events = warning_events(&tb, "StartFailed");
        assert_eq!(events.len(), before + 1, "{events:?}");
        let message = events.last().unwrap()["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
        tb.set_daemon_env(
            0,
            key,
            if key == "ENABLE_IPv4" {
                "false"
            } else {
                "true"
            },
        );
    }
}

/// A NetworkPolicy that lets pods labelled app=`app` send nothing.
fn deny_egress_of(app: &str) -> Value {
    serde_json::json!({"metadata": {"namespace": "default", "name": app},
        "spec": {"podSelector": {"matchLabels": {"app": app}},
                 "policyTypes": ["Egress"], "egress": []}})
}

/// A UDP socket in `pod`'s namespace connected to `to`: a flow conntrack tracks once answered.
fn udp_flow(pod: &Pod, to: SocketAddr) -> std::net::UdpSocket {
    pod.netns
        .run(move || {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.connect(to).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            socket
        })
        .unwrap()
}

/// Whether a datagram on `flow` is echoed back (by a `UdpEcho`) within its read timeout.
fn answered(flow: &std::net::UdpSocket) -> bool {
    let mut buffer = [0u8; 8];
    flow.send(b"ping").is_ok() && matches!(flow.recv(&mut buffer), Ok(4))
}

/// Whether a connection from `pod` to `to` is answered, and how long it took either way.
fn reach(tb: &Testbed, pod: &Pod, to: IpAddr) -> (bool, Duration) {
    let started = Instant::now();
    let ok = tb.seen_as(&pod.netns, to, PORT).is_ok();
    (ok, started.elapsed())
}

#[test]
fn network_policies_from_the_api_server_hold_from_a_pods_first_packet() {
    let mut options = options(&[
        ("ENABLE_NETWORK_POLICY", "true"),
        ("NETWORK_POLICY_ENFORCING_MODE", "strict"),
    ]);
    options.kubernetes = true;
    let Some(mut tb) = testbed("network_policies", options) else {
        return;
    };
    kube(&tb).apply(
        "namespaces",
        serde_json::json!({"metadata": {"name": "default",
            "labels": {"kubernetes.io/metadata.name": "default"}}}),
    );
    // db takes the probe port from web only; locked pods may send nothing.
    kube(&tb).apply(
        "networkpolicies",
        serde_json::json!({"metadata": {"namespace": "default", "name": "db"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                  "ports": [{"port": PORT}]}]}}),
    );
    kube(&tb).apply("networkpolicies", deny_egress_of("locked"));
    tb.start_daemon(0).unwrap();
    let web = tb.add_pod_labelled(0, &[("app", "web")]).unwrap();
    let db = tb.add_pod_labelled(0, &[("app", "db")]).unwrap();
    let other = tb.add_pod_labelled(0, &[("app", "other")]).unwrap();
    let db_ip = db.ip;
    let _db_listens = db
        .netns
        .run(move || WhoAmI::bind(SocketAddr::from((db_ip, PORT))).unwrap())
        .unwrap();
    let router = IpAddr::V4(tb.nodes[0].gateway);
    let _router_listens = tb
        .vpc
        .run(move || WhoAmI::bind(SocketAddr::from((router, PORT))).unwrap())
        .unwrap();

    assert!(reach(&tb, &web, db.ip).0, "web may reach db");
    assert!(!reach(&tb, &other, db.ip).0, "other may not");
    assert!(reach(&tb, &other, router).0, "other's egress is open");
    // What the daemon says each pod's policies allow (vpcctl netpol reads this).
    let view = tb.nodes[0].introspect("/v1/network-policy").unwrap();
    assert_eq!(view["mode"], "strict");
    assert_eq!(view["clusterKnown"], true);
    let of = |name: &str| {
        view["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not in {view}"))
    };
    let db_view = of(&db.name);
    assert_eq!(db_view["ingress"][0]["policy"], "default/db", "{db_view}");
    assert_eq!(
        db_view["ingress"][0]["peers"],
        serde_json::json!([web.ip.to_string()])
    );
    assert_eq!(
        db_view["ingress"][0]["ports"],
        serde_json::json!([format!("Tcp/{PORT}")])
    );
    assert_eq!(db_view["egress"], "open");
    assert_eq!(of(&web.name)["ingress"], "open");

    // New pods under a deny-egress policy never send a packet; allowed ones succeed at once, on
    // their first SYN (a SYN lost to a late rule would be retried only after a second).
    for _ in 0..5 {
        let locked = tb.add_pod_labelled(0, &[("app", "locked")]).unwrap();
        let (ok, _) = reach(&tb, &locked, router);
        assert!(!ok, "{} sent a packet despite its policy", locked.name);
        let t0 = Instant::now();
        let free = tb.add_pod_labelled(0, &[("app", "free")]).unwrap();
        let add_took = t0.elapsed();
        let (ok, took) = reach(&tb, &free, router);
        assert!(
            ok && took < Duration::from_millis(900),
            "{}: {ok} after {took:?} (its ADD took {add_took:?})\n{}",
            free.name,
            tb.nodes[0].log_tail(60)
        );
    }

    // A change through the API server takes effect: db now takes other too.
    kube(&tb).apply(
        "networkpolicies",
        serde_json::json!({"metadata": {"namespace": "default", "name": "db"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                     "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                         {"key": "app", "operator": "In", "values": ["web", "other"]}]}}]}]}}),
    );
    wait_for("the updated policy", || reach(&tb, &other, db.ip).0);
    // The rules outlive the daemon (kill -9) and a restart: the new daemon leaves them as they are
    // until it knows the cluster, then takes them over.
    tb.stop_daemon(0, Stop::Kill).unwrap();
    assert!(reach(&tb, &web, db.ip).0 && reach(&tb, &other, db.ip).0);
    assert!(
        tb.nodes[0].introspect("/v1/pods").is_err(),
        "the daemon is down"
    );
    tb.start_daemon(0).unwrap();
    assert!(reach(&tb, &web, db.ip).0, "after the restart");
    let third = tb.add_pod_labelled(0, &[("app", "third")]).unwrap();
    assert!(
        !reach(&tb, &third, db.ip).0,
        "a new pod is judged by the same policies"
    );
    let metrics = tb.nodes[0].metrics().unwrap();
    assert!(
        metrics.contains("vpccni_network_policy_apply_seconds_count"),
        "{metrics}"
    );
    // What db's policies dropped (third's attempt, since the restart), per pod and direction.
    let prefix = format!(
        "vpccni_network_policy_dropped_packets_total{{namespace=\"default\",pod=\"{}\",direction=\"ingress\"}} ",
        db.name
    );
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in {metrics}"));
    assert!(dropped >= 1, "{metrics}");
    // What was asked of the API server for it: list and watch, of these kinds only.
    let asked: BTreeSet<(String, String)> = kube(&tb)
        .accesses()
        .into_iter()
        .filter(|a| ["networkpolicies", "namespaces"].contains(&a.resource.as_str()))
        .map(|a| (a.verb, a.resource))
        .collect();
    let expected: BTreeSet<(String, String)> = ["networkpolicies", "namespaces"]
        .iter()
        .flat_map(|r| ["list", "watch"].map(|v| (v.to_string(), r.to_string())))
        .collect();
    assert_eq!(asked, expected);

    // A flow the next change denies is cut, not left to live on in conntrack: web's UDP flow to
    // db is answered, the policy then drops web, and once the daemon says the denied flows are
    // cut (cutVersions), the flow's next datagram goes unanswered.
    let echo_at = SocketAddr::from((db_ip, PORT + 1));
    let _db_echoes = db
        .netns
        .run(move || testbed::probe::UdpEcho::bind(echo_at).unwrap())
        .unwrap();
    let flow = udp_flow(&web, echo_at);
    assert!(answered(&flow), "web's flow to db before the change");
    kube(&tb).apply(
        "networkpolicies",
        serde_json::json!({"metadata": {"namespace": "default", "name": "db"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "other"}}}]}]}}),
    );
    tb.wait_policy_in_force("networkpolicies", Duration::from_secs(30))
        .unwrap();
    let view = tb.nodes[0].introspect("/v1/network-policy").unwrap();
    assert_eq!(
        view["cutVersions"]["networkpolicies"], view["appliedVersions"]["networkpolicies"],
        "{view}"
    );
    assert!(
        !answered(&flow),
        "web's established flow lived on after the change"
    );
    tb.stop_daemon(0, Stop::Term).unwrap();
}

/// One TCP connection attempt from `pod` to `to`, in a thread of its own: whether it was answered
/// within `patience`, and how long it took.
fn attempt(pod: &Pod, to: IpAddr, patience: Duration) -> std::thread::JoinHandle<(bool, Duration)> {
    let path = pod.netns.path();
    std::thread::spawn(move || {
        let ns = datapath::netns::NetNs::open(&path).unwrap();
        ns.run(move || {
            let started = Instant::now();
            let ok = std::net::TcpStream::connect_timeout(&SocketAddr::from((to, PORT)), patience)
                .is_ok();
            (ok, started.elapsed())
        })
        .unwrap()
    })
}

#[test]
fn two_hundred_new_pods_under_a_deny_policy_never_get_a_packet_out() {
    let mut options = options(&[
        ("ENABLE_NETWORK_POLICY", "true"),
        ("NETWORK_POLICY_ENFORCING_MODE", "standard"),
        ("WARM_IP_TARGET", "25"),
        // The node holds 27 addresses: each batch reuses the last one's.
        ("IP_COOLDOWN_PERIOD", "1"),
    ]);
    options.kubernetes = true;
    let Some(mut tb) = testbed("netpol_race", options) else {
        return;
    };
    kube(&tb).apply("networkpolicies", deny_egress_of("locked"));
    tb.start_daemon(0).unwrap();
    let router = IpAddr::V4(tb.nodes[0].gateway);
    let _router_listens = tb
        .vpc
        .run(move || WhoAmI::bind(SocketAddr::from((router, PORT))).unwrap())
        .unwrap();
    // In batches of 20 (the node holds 29 pods): each pod's first packet leaves the instant its
    // ADD returns; the locked ones must never be answered, the free ones on their first SYN.
    let (mut locked_out, mut free_slow) = (Vec::new(), Vec::new());
    let (mut locked_total, mut free_total) = (0, 0);
    for _ in 0..10 {
        let mut batch = Vec::new();
        for i in 0..22 {
            let app = if i < 20 { "locked" } else { "free" };
            let pod = tb.add_pod_labelled(0, &[("app", app)]).unwrap();
            let probe = attempt(&pod, router, Duration::from_millis(800));
            batch.push((app, pod, probe));
        }
        for (app, pod, probe) in batch {
            let (ok, took) = probe.join().unwrap();
            match app {
                "locked" => {
                    locked_total += 1;
                    if ok {
                        locked_out.push(pod.name.clone());
                    }
                }
                _ => {
                    free_total += 1;
                    if !ok || took > Duration::from_millis(500) {
                        free_slow.push(format!("{} ({ok}, {took:?})", pod.name));
                    }
                }
            }
            tb.del_pod(pod).unwrap();
        }
    }
    assert_eq!(locked_total, 200);
    assert!(
        locked_out.is_empty(),
        "locked pods got packets out: {locked_out:?}"
    );
    assert!(
        free_slow.is_empty(),
        "of {free_total} free pods: {free_slow:?}"
    );
}

/// The seeds' runbook sets the CNI's settings in the `amazon-vpc-cni` ConfigMap: read at start,
/// followed while running (pool targets live, the rest waiting for a restart and said so), a bad
/// value keeping the previous one, every refusal a Warning Event.
#[test]
fn the_configmap_sets_the_pool_live_and_says_what_waits_for_a_restart() {
    let mut options = options(&[]);
    options.kubernetes = true;
    let Some(mut tb) = testbed("config_map", options) else {
        return;
    };
    let set = |tb: &Testbed, data: Value| {
        kube(tb).apply(
            "configmaps",
            serde_json::json!({"metadata": {"namespace": "kube-system", "name": "amazon-vpc-cni"},
                               "data": data}),
        )
    };
    let total = |tb: &Testbed| settled(tb, 0)["addresses"]["total"].as_u64().unwrap();
    set(
        &tb,
        serde_json::json!({"warm-ip-target": "2", "minimum-ip-target": "3",
                           "enable-network-policy-controller": "true"}),
    );
    tb.start_daemon(0).unwrap();
    // Without the ConfigMap the default WARM_ENI_TARGET=1 holds an ENI's worth (9 on an m5.large).
    assert_eq!(total(&tb), 3, "the ConfigMap's targets from the start");
    let config = tb.nodes[0].introspect("/v1/config").unwrap();
    assert_eq!(
        config["configMap"]["keys"]["warm-ip-target"],
        "WARM_IP_TARGET"
    );
    assert!(
        config["configMap"]["others"][0]
            .as_str()
            .unwrap()
            .starts_with("enable-network-policy-controller"),
        "{config}"
    );

    // Live: the pool follows a new target without a restart.
    set(
        &tb,
        serde_json::json!({"warm-ip-target": "6", "minimum-ip-target": "3"}),
    );
    wait_for("the new WARM_IP_TARGET", || {
        tb.nodes[0].introspect("/v1/ipamd-env-settings").unwrap()["WARM_IP_TARGET"] == 6
    });
    assert_eq!(total(&tb), 6);

    // What cannot change live waits for a restart and says so; a typo and a bad value are refused
    // by name and the previous value stands.
    set(
        &tb,
        serde_json::json!({"warm-ip-target": "lots", "minimum-ip-target": "3",
                           "warm-ip-targt": "9", "enable-prefix-delegation": "true"}),
    );
    wait_for("the refusals", || {
        let config = tb.nodes[0].introspect("/v1/config").unwrap();
        config["pendingRestart"] == serde_json::json!(["enable-prefix-delegation=\"true\""])
            && config["configMap"]["refused"].as_array().map(Vec::len) == Some(2)
    });
    let settings = tb.nodes[0].introspect("/v1/ipamd-env-settings").unwrap();
    assert_eq!(settings["WARM_IP_TARGET"], 6, "the previous value stands");
    assert_eq!(settings["ENABLE_PREFIX_DELEGATION"], false);
    wait_for("the Warning Events", || {
        !warning_events(&tb, "RestartNeeded").is_empty()
            && warning_events(&tb, "InvalidSetting").len() == 2
    });
    let invalid: Vec<String> = warning_events(&tb, "InvalidSetting")
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    assert!(
        invalid
            .iter()
            .any(|m| m.contains("warm-ip-target=\"lots\""))
            && invalid
                .iter()
                .any(|m| m.contains("warm-ip-targt: no such setting")),
        "{invalid:?}"
    );

    // Deleted: the environment's settings (here the defaults) again.
    assert!(kube(&tb).delete("configmaps", "kube-system", "amazon-vpc-cni"));
    wait_for("the environment's settings", || {
        let config = tb.nodes[0].introspect("/v1/config").unwrap();
        config["configMap"] == "absent" && config["live"]["WARM_IP_TARGET"] == 0
    });
    assert_eq!(total(&tb), 9, "WARM_ENI_TARGET=1 again");
    tb.stop_daemon(0, Stop::Term).unwrap();
}

/// Every `awscni_*` / `vpccni_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["awscni_", "vpccni_"] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    names
}

/// Upstream's metrics (docs/observability.md has them with their meaning here).
const UPSTREAM_METRICS: &[&str] = &[
    "awscni_add_ip_req_count",
    "awscni_assigned_ip_addresses",
    "awscni_assigned_ip_per_cidr",
    "awscni_assigned_ip_per_eni",
    "awscni_aws_api_error_count",
    "awscni_aws_api_latency_ms",
    "awscni_aws_utils_error_count",
    "awscni_build_info",
    "awscni_connmark_backend",
    "awscni_connmark_reconcile_total",
    "awscni_del_ip_req_count",
    "awscni_ec2api_error_count",
    "awscni_ec2api_req_count",
    "awscni_eni_allocated",
    "awscni_eni_max",
    "awscni_force_removed_enis",
    "awscni_force_removed_ips",
    "awscni_ip_max",
    "awscni_ipamd_action_inprogress",
    "awscni_ipamd_error_count",
    "awscni_ipamd_node_initialization_duration_seconds",
    "awscni_ipamd_startup_duration_seconds",
    "awscni_no_available_ip_addresses",
    "awscni_pod_eni_error_count",
    "awscni_reconcile_count",
    "awscni_total_ip_addresses",
    "awscni_total_ipv4_prefixes",
];

/// The dashboard in deploy/ and the seeds' PromQL query only what a running daemon exports, and
/// the daemon exports all of upstream's metrics.
#[test]
fn every_metric_the_dashboard_and_the_seeds_query_is_exported() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dashboard = std::fs::read_to_string(root.join("deploy/dashboards/vpc-cni.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut queries = String::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            queries += target["expr"].as_str().expect("a PromQL expression");
            queries += "\n";
        }
    }
    let seed_queries =
        std::fs::read_to_string(root.join("deploy/dashboards/seed-queries.promql")).unwrap();
    // The copy is the seeds' text where the seeds are at hand.
    let seeds = root.join("../shared/seeds/002_0257405eb05ab51d.txt");
    match std::fs::read_to_string(&seeds) {
        Ok(text) => {
            for line in seed_queries.lines().filter(|l| l.contains("awscni_")) {
                assert!(text.lines().any(|t| t == line), "not in the seeds: {line}");
            }
        }
        Err(_) => skip(
            "every_metric_..._is_exported (the copy's check only)",
            &format!("no seeds at {}", seeds.display()),
        ),
    }
    let Some(mut tb) = testbed("metrics_names", options(&[])) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let pod = tb.add_pod(0).unwrap();
    let text = tb.nodes[0].metrics().unwrap();
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let base = |name: &str| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| exported.contains(*b))
            .unwrap_or(name)
            .to_string()
    };
    let wanted: BTreeSet<String> = metric_names(&queries)
        .into_iter()
        .chain(metric_names(&seed_queries))
        .chain(UPSTREAM_METRICS.iter().map(|m| m.to_string()))
        .collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|m| !exported.contains(&base(m)))
        .collect();
    assert!(missing.is_empty(), "not exported: {missing:?}\n{text}");
    // What the ADD did shows in the seeds' allocation counter.
    assert!(
        text.lines().any(|l| l == "awscni_ip_allocation_total 1"),
        "{text}"
    );
    tb.del_pod(pod).unwrap();
}

/// The DaemonSet runs the daemon as upstream runs aws-node: not privileged, NET_ADMIN and NET_RAW
/// only, /proc/sys read-only, after a privileged init container set the node's sysctls. Measured:
/// netlink, nftables and conntrack need NET_ADMIN; NET_RAW is iptables-legacy's, to find upstream's
/// rules at take-over.
#[test]
fn the_daemon_runs_with_net_admin_and_net_raw_after_the_init_container() {
    let mut options = options(&[
        ("ENABLE_NETWORK_POLICY", "true"),
        ("NETWORK_POLICY_ENFORCING_MODE", "standard"),
    ]);
    options.kubernetes = true;
    options.unprivileged = true;
    let Some(mut tb) = testbed("unprivileged", options) else {
        return;
    };
    // Without the init container the node's forwarding is off and the daemon cannot turn it on.
    tb.spawn_daemon(0).unwrap();
    let refused = tb.wait_ready(0, Duration::from_secs(30)).unwrap_err();
    assert!(
        refused.contains("ip_forward") && refused.contains("--init-node"),
        "{refused}"
    );
    tb.init_node(0).unwrap();
    tb.start_daemon(0).unwrap();
    let pid = tb.nodes[0].daemon_pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        effective,
        (1 << 12) | (1 << 13),
        "NET_ADMIN and NET_RAW only"
    );

    kube(&tb).apply(
        "namespaces",
        serde_json::json!({"metadata": {"name": "default",
            "labels": {"kubernetes.io/metadata.name": "default"}}}),
    );
    kube(&tb).apply("networkpolicies", deny_egress_of("locked"));
    let router = IpAddr::V4(tb.nodes[0].gateway);
    let router_listens = tb
        .vpc
        .run(move || WhoAmI::bind(SocketAddr::from((router, PORT))).unwrap())
        .unwrap();
    // Past the primary ENI's nine addresses: ENIs are created, attached and their links set up,
    // SNAT and NetworkPolicy tables applied, all without privileges.
    let mut pods: Vec<Pod> = (0..11)
        .map(|_| tb.add_pod_labelled(0, &[("app", "free")]).unwrap())
        .collect();
    let locked = tb.add_pod_labelled(0, &[("app", "locked")]).unwrap();
    let status = settled(&tb, 0);
    assert!(status["enis"].as_u64().unwrap() >= 2, "{status}");
    for pod in &pods {
        assert!(reach(&tb, pod, router).0, "{} reaches the VPC", pod.name);
    }
    assert!(!reach(&tb, &locked, router).0, "its policy holds");
    pods.push(locked);
    drop(router_listens);
    for pod in pods {
        tb.del_pod(pod).unwrap();
    }
    check_invariants(&tb, 0, &[]);
    tb.stop_daemon(0, Stop::Term).unwrap();
}

/// With `VPC_CNI_NETWORK_POLICY_INPUT=policyendpoints` the daemon enforces EKS's PolicyEndpoints as
/// the managed controller writes them (each policy resolved into the selected pods and its peers'
/// CIDRs), and reads nothing else for it.
#[test]
fn policy_endpoints_as_eks_writes_them_are_enforced() {
    let mut options = options(&[
        ("ENABLE_NETWORK_POLICY", "true"),
        ("VPC_CNI_NETWORK_POLICY_INPUT", "policyendpoints"),
    ]);
    options.kubernetes = true;
    let Some(mut tb) = testbed("policy_endpoints", options) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    let web = tb.add_pod_labelled(0, &[("app", "web")]).unwrap();
    let db = tb.add_pod_labelled(0, &[("app", "db")]).unwrap();
    let other = tb.add_pod_labelled(0, &[("app", "other")]).unwrap();
    let db_ip = db.ip;
    let _db_listens = db
        .netns
        .run(move || WhoAmI::bind(SocketAddr::from((db_ip, PORT))).unwrap())
        .unwrap();
    assert!(
        reach(&tb, &other, db.ip).0,
        "open before any PolicyEndpoint"
    );

    let in_force = |tb: &Testbed| {
        tb.wait_policy_in_force("policyendpoints", Duration::from_secs(30))
            .unwrap()
    };
    let endpoint = |peers: &[&Pod]| {
        serde_json::json!({
            "metadata": {"namespace": "default", "name": "db-x7k2p"},
            "spec": {
                "policyRef": {"name": "db", "namespace": "default"},
                "podSelector": {"matchLabels": {"app": "db"}},
                "podIsolation": ["Ingress"],
                "podSelectorEndpoints": [{"hostIP": tb.nodes[0].primary_ip.to_string(),
                    "podIP": db.ip.to_string(), "name": db.name, "namespace": "default"}],
                "ingress": peers.iter().map(|p| serde_json::json!({
                    "cidr": format!("{}/32", p.ip), "ports": [{"protocol": "TCP", "port": PORT}]})).collect::<Vec<_>>(),
            }
        })
    };
    kube(&tb).apply("policyendpoints", endpoint(&[&web]));
    in_force(&tb);
    assert!(reach(&tb, &web, db.ip).0, "web is the resolved peer");
    assert!(
        !reach(&tb, &other, db.ip).0,
        "other is not: {}\n{}",
        tb.nodes[0].introspect("/v1/network-policy").unwrap(),
        tb.nodes[0].log_tail(20)
    );
    let view = tb.nodes[0].introspect("/v1/network-policy").unwrap();
    let db_view = view["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == db.name.as_str())
        .cloned()
        .unwrap();
    assert_eq!(db_view["ingress"][0]["policy"], "default/db", "{db_view}");

    // The controller resolves a new peer: the object is updated.
    kube(&tb).apply("policyendpoints", endpoint(&[&web, &other]));
    in_force(&tb);
    assert!(reach(&tb, &other, db.ip).0, "other added");
    kube(&tb).apply("policyendpoints", endpoint(&[&web]));
    in_force(&tb);
    assert!(!reach(&tb, &other, db.ip).0, "other taken out again");
    // The policy deleted: its objects go, and db is open.
    assert!(kube(&tb).delete("policyendpoints", "default", "db-x7k2p"));
    in_force(&tb);
    assert!(reach(&tb, &other, db.ip).0, "open once the policy is gone");

    // What was asked of the API server for it: PolicyEndpoints only.
    let asked: BTreeSet<(String, String)> = kube(&tb)
        .accesses()
        .into_iter()
        .filter(|a| {
            ["policyendpoints", "networkpolicies", "namespaces"].contains(&a.resource.as_str())
        })
        .map(|a| (a.verb, a.resource))
        .collect();
    let expected: BTreeSet<(String, String)> = ["list", "watch"]
        .iter()
        .map(|v| (v.to_string(), "policyendpoints".to_string()))
        .collect();
    assert_eq!(asked, expected);
    tb.stop_daemon(0, Stop::Term).unwrap();
}

/// A TCP connection from `pod` to `to:port`: whether it was accepted within 3 s.
fn connects(pod: &Pod, to: IpAddr, port: u16) -> bool {
    pod.netns
        .run(move || {
            std::net::TcpStream::connect_timeout(
                &SocketAddr::from((to, port)),
                Duration::from_secs(3),
            )
            .is_ok()
        })
        .unwrap()
}

/// Security group rules of the VPC file hold in the fabric, statefully, for pods whose addresses
/// are their node ENIs' (EC2 judges a pod's traffic by its ENI's groups): app's pods reach db's on
/// 5432 and on nothing else, db's reach app's on nothing, and replies always come back; the VPC
/// host `store` (sg-db too) takes app's pods on 5432 and nobody else.
#[test]
fn security_group_rules_hold_between_nodes_in_the_fabric() {
    let config = testbed::ServeConfig::parse(
        r#"
[vpc]
cidr = "10.0.0.0/16"

[[subnets]]
name = "nodes"
cidr = "10.0.0.0/20"
az = "us-west-2a"
tags = { "kubernetes.io/role/cni" = "1" }

[[instances]]
name = "app"
type = "m5.large"
subnet = "nodes"
security_groups = ["sg-app"]

[[instances]]
name = "db"
type = "m5.large"
subnet = "nodes"
security_groups = ["sg-db"]

[[security_groups]]
id = "sg-app"
egress = [{ protocol = "all", cidrs = ["0.0.0.0/0"] }]

[[security_groups]]
id = "sg-db"
ingress = [{ protocol = "tcp", ports = "5432", from_groups = ["sg-app"] }]
egress = [{ protocol = "all", cidrs = ["0.0.0.0/0"] }]

[[hosts]]
name = "store"
subnet = "nodes"
security_groups = ["sg-db"]
ports = ["tcp/5432", "tcp/80"]
"#,
    )
    .unwrap();
    let mut options = options(&[]);
    options.vpc = Some(config);
    let Some(mut tb) = testbed("security_groups_in_the_fabric", options) else {
        return;
    };
    tb.start_daemon(0).unwrap();
    tb.start_daemon(1).unwrap();
    let app = tb.add_pod(0).unwrap();
    let db = tb.add_pod(1).unwrap();
    let mut listeners = Vec::new();
    for (pod, port) in [(&db, 5432), (&db, 80), (&app, 80)] {
        let at = SocketAddr::from((pod.ip, port));
        listeners.push(pod.netns.run(move || WhoAmI::bind(at).unwrap()).unwrap());
    }
    let table = || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &tb.fabric.netns,
                "nft",
                "list",
                "table",
                "ip",
            ])
            .arg(testbed::fabric::SECURITY_TABLE)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert!(
        connects(&app, db.ip, 5432),
        "app {} reaches db {} on 5432\n{}\n{:?}",
        app.ip,
        db.ip,
        table(),
        tb.fabric.errors()
    );
    // WhoAmI answers with the client's address: the reply came back through the fabric.
    assert_eq!(tb.seen_as(&app.netns, db.ip, 5432).unwrap(), app.ip);
    assert!(!connects(&app, db.ip, 80), "db takes 5432 only");
    assert!(!connects(&db, app.ip, 80), "app takes nothing in");
    assert!(table().contains("chain in-"), "{}", table());
    let store = &tb.hosts[0];
    assert_eq!(store.name, "store");
    assert_eq!(
        tb.seen_as(&app.netns, IpAddr::V4(store.ip), 5432).unwrap(),
        app.ip
    );
    assert!(
        !connects(&app, IpAddr::V4(store.ip), 80),
        "store takes 5432 only"
    );
    assert!(
        !connects(&db, IpAddr::V4(store.ip), 5432),
        "store takes sg-app only"
    );
    drop(listeners);
    for pod in [app, db] {
        tb.del_pod(pod).unwrap();
    }
    tb.stop_daemon(0, Stop::Term).unwrap();
    tb.stop_daemon(1, Stop::Term).unwrap();
}

/// A flow cut that fails (the conntrack tool refusing its first batch of deletes) is tried again
/// rather than left until the next change: the denied flow is cut all the same, and the failure
/// is counted.
#[test]
fn a_failed_flow_cut_is_tried_again() {
    let real = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| std::path::Path::new(dir).join("conntrack"))
        .find(|p| p.is_file());
    let Some(real) = real else {
        skip(
            "a_failed_flow_cut_is_tried_again",
            "no conntrack tool (scripts/test.sh installs it)",
        );
        return;
    };
    let tools = tempfile::tempdir().unwrap();
    let marker = tools.path().join("refused-once");
    let script = tools.path().join("conntrack");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$1\" = -R ] && [ ! -e {marker} ]; then touch {marker}; echo 'refused by the test' >&2; exit 1; fi\nexec {real} \"$@\"\n",
            marker = marker.display(),
            real = real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        tools.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut options = options(&[("ENABLE_NETWORK_POLICY", "true"), ("PATH", &path)]);
    options.kubernetes = true;
    let Some(mut tb) = testbed("a_failed_flow_cut_is_tried_again", options) else {
        return;
    };
    kube(&tb).apply(
        "namespaces",
        serde_json::json!({"metadata": {"name": "default",
            "labels": {"kubernetes.io/metadata.name": "default"}}}),
    );
    tb.start_daemon(0).unwrap();
    let web = tb.add_pod_labelled(0, &[("app", "web")]).unwrap();
    let db = tb.add_pod_labelled(0, &[("app", "db")]).unwrap();
    let echo_at = SocketAddr::from((db.ip, PORT));
    let _echo = db
        .netns
        .run(move || testbed::probe::UdpEcho::bind(echo_at).unwrap())
        .unwrap();
    let flow = udp_flow(&web, echo_at);
    assert!(answered(&flow), "web's flow to db before any policy");
    kube(&tb).apply(
        "networkpolicies",
        serde_json::json!({"metadata": {"namespace": "default", "name": "db"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}}),
    );
    tb.wait_policy_in_force("networkpolicies", Duration::from_secs(30))
        .unwrap();
    assert!(
        marker.exists(),
        "the first batch of deletes was never asked for"
    );
    assert!(
        !answered(&flow),
        "the denied flow lived on after a failed cut"
    );
    let metrics = tb.nodes[0].metrics().unwrap();
    assert!(
        metrics.contains("awscni_ipamd_error_count{fn=\"networkPolicyFlows\"} 1"),
        "{metrics}"
    );
    for pod in [web, db] {
        tb.del_pod(pod).unwrap();
    }
    tb.stop_daemon(0, Stop::Term).unwrap();
}

/// Security groups for pods on EKS: the daemon asks for a trunk through the node's CNINode, and
/// answers a pod the controller annotated with its branch (the trunk's MAC from EC2), at ADD and at
/// DEL, through its real socket; other pods still take the pool's addresses.
#[test]
fn a_branch_pod_is_answered_from_its_annotation_and_the_cninode_asks_for_a_trunk() {
    let mut options = Options {
        instance_type: "m5.xlarge".into(),
        preattached: vec![pre(
            1,
            "trunk",
            0,
            &[("node.k8s.amazonaws.com/no_manage", "false")],
        )],
        ..options(&[
            ("ENABLE_POD_ENI", "true"),
            ("POD_SECURITY_GROUP_ENFORCING_MODE", "standard"),
            ("ENABLE_NETWORK_POLICY", "true"),
            ("VPC_CNI_VANISHED_POD_GRACE_SECONDS", "2"),
        ])
    };
    options.kubernetes = true;
    let Some(mut tb) = testbed("a_branch_pod_is_answered_from_its_annotation", options) else {
        return;
    };
    let node = tb.nodes[0].name.clone();
    kube(&tb).apply(
        "cninodes",
        serde_json::json!({"metadata": {"name": node}, "spec": {"features": []}}),
    );
    let trunk = node0_enis(&tb, |d| d == 1)[0].0.clone();
    let trunk_mac: [u8; 6] = {
        let model = tb.vpc_model();
        let vpc = model.lock().unwrap();
        let mac = &vpc.interfaces().find(|e| e.id == trunk).unwrap().mac;
        ipam::choreography::parse_mac(mac).unwrap()
    };
    tb.start_daemon(0).unwrap();
    wait_for("SecurityGroupsForPods on the CNINode", || {
        kube(&tb).objects("cninodes")[0]["spec"]["features"]
            == serde_json::json!([{"name": "SecurityGroupsForPods"}])
    });

    kube(&tb).apply(
        "pods",
        serde_json::json!({"metadata": {"namespace": "shop", "name": "db-0", "annotations": {
            "vpc.amazonaws.com/pod-eni": r#"[{"eniId":"eni-0b1","ifAddress":"02:00:00:00:00:0b","privateIp":"10.0.3.77","vlanId":4,"subnetCidr":"10.0.0.0/16","associationID":"trunk-assoc-1"}]"#}},
            "spec": {"nodeName": node, "containers": [{"name": "db", "image": "x",
                "resources": {"limits": {"vpc.amazonaws.com/pod-eni": "1"}}}]}}),
    );
    let attachment = proto::Attachment {
        container_id: "sandbox-db-0".into(),
        ifname: "eth0".into(),
        network: "aws-cni".into(),
    };
    let pod = proto::PodRef {
        namespace: "shop".into(),
        name: "db-0".into(),
        infra_container_id: String::new(),
        uid: String::new(),
    };
    let socket = tb.nodes[0].socket();
    let log = tb.nodes[0].daemon_log();
    let call = |request: &proto::Request| {
        proto::call(&socket, request, Duration::from_secs(15)).unwrap_or_else(|e| {
            panic!(
                "{e}; the daemon's log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
    };
    let proto::Reply::Added { allocation } = call(&proto::Request::Add {
        attachment: attachment.clone(),
        pod: pod.clone(),
        netns: "/var/run/netns/none".into(),
    }) else {
        panic!("a branch pod's ADD")
    };
    assert_eq!(allocation.address.to_string(), "10.0.3.77");
    let branch = allocation.branch.expect("the branch");
    assert_eq!((branch.vlan, branch.trunk_mac), (4, trunk_mac));
    assert_eq!(allocation.route_table, 104);
    assert_eq!(
        call(&proto::Request::Lookup {
            attachment: attachment.clone(),
            pod: Some(pod.clone()),
        }),
        proto::Reply::Found {
            allocation: Some(allocation)
        },
        "CHECK finds the branch in the annotation"
    );
    // NetworkPolicy holds the branch pod as any pod: told at its ADD, and after a restart from the
    // annotation the pods watch shows.
    let policy_pods = |tb: &Testbed| {
        let view = tb.nodes[0].introspect("/v1/network-policy").unwrap();
        view["pods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                format!(
                    "{}/{} {}",
                    p["namespace"].as_str().unwrap(),
                    p["name"].as_str().unwrap(),
                    p["address"].as_str().unwrap()
                )
            })
            .collect::<Vec<_>>()
    };
    assert!(
        policy_pods(&tb).contains(&"shop/db-0 10.0.3.77".to_string()),
        "{:?}",
        policy_pods(&tb)
    );
    tb.stop_daemon(0, Stop::Kill).unwrap();
    tb.start_daemon(0).unwrap();
    wait_for(
        "the branch pod known to NetworkPolicy after a restart",
        || policy_pods(&tb).contains(&"shop/db-0 10.0.3.77".to_string()),
    );
    let proto::Reply::Deleted { released } = call(&proto::Request::Del {
        attachment,
        pod: Some(pod),
        reason: proto::DelReason::PodDeleted,
    }) else {
        panic!("a branch pod's DEL")
    };
    assert_eq!(released, Some(allocation));
    assert!(kube(&tb).delete("pods", "shop", "db-0"));
    wait_for("the deleted branch pod gone from NetworkPolicy", || {
        !policy_pods(&tb).iter().any(|p| p.starts_with("shop/db-0"))
    });

    // A pod without security groups: an address of the pool, wired and reachable as ever.
    let web = tb.add_pod(0).unwrap();
    let pool: ipam::Ipv4Cidr = "10.0.0.0/16".parse().unwrap();
    assert!(pool.contains(ipv4(&web)));
    tb.del_pod(web).unwrap();
    tb.stop_daemon(0, Stop::Term).unwrap();
}

/// Where the node makes its branches (`POD_ENI_MANAGER=node`), through the real daemon, its socket,
/// the simulated VPC over HTTP and the test API server: the daemon makes its trunk; a pod that a
/// SecurityGroupPolicy selects gets a branch with the policy's groups; after a kill -9 the pod's
/// branch is still its own, and a branch the killed run made without recording it serves the next
/// pod with its groups instead of a new one.
#[test]
fn the_node_makes_branches_from_security_group_policies_and_keeps_them_across_a_kill() {
    let mut options = Options {
        instance_type: "m5.xlarge".into(),
        ..options(&[
            ("ENABLE_POD_ENI", "true"),
            ("POD_ENI_MANAGER", "node"),
            ("POD_SECURITY_GROUP_ENFORCING_MODE", "standard"),
        ])
    };
    options.kubernetes = true;
    let Some(mut tb) = testbed("the_node_makes_branches", options) else {
        return;
    };
    let node = tb.nodes[0].name.clone();
    let policy = |tb: &Testbed, name: &str, app: &str, group: &str| {
        kube(tb).apply(
            "securitygrouppolicies",
            serde_json::json!({"metadata": {"namespace": "shop", "name": name}, "spec": {
                "podSelector": {"matchLabels": {"app": app}},
                "securityGroups": {"groupIds": [group]}}}),
        )
    };
    let pod_object = |tb: &Testbed, name: &str, app: &str| {
        kube(tb).apply(
            "pods",
            serde_json::json!({"metadata": {"namespace": "shop", "name": name, "labels": {"app": app}},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]}}),
        )
    };
    policy(&tb, "db", "db", "sg-db");
    pod_object(&tb, "db-0", "db");
    tb.start_daemon(0).unwrap();

    let socket = tb.nodes[0].socket();
    let log = tb.nodes[0].daemon_log();
    let call = |request: &proto::Request| {
        proto::call(&socket, request, Duration::from_secs(30)).unwrap_or_else(|e| {
            panic!(
                "{e}; the daemon's log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
    };
    let sandbox = |name: &str| proto::Attachment {
        container_id: format!("sandbox-{name}"),
        ifname: "eth0".into(),
        network: "aws-cni".into(),
    };
    let add = |name: &str| {
        let reply = call(&proto::Request::Add {
            attachment: sandbox(name),
            pod: proto::PodRef {
                namespace: "shop".into(),
                name: name.into(),
                infra_container_id: String::new(),
                uid: String::new(),
            },
            netns: "/var/run/netns/none".into(),
        });
        match reply {
            proto::Reply::Added { allocation } => allocation,
            other => panic!("ADD of {name}: {other:?}"),
        }
    };
    let db = add("db-0");
    let branch = db.branch.expect("a branch for the policy's pod");
    // The node's branch capacity (m5.xlarge: 18), as EKS's controller advertises it.
    wait_for("pod-eni capacity on the Node", || {
        kube(&tb)
            .objects("nodes")
            .iter()
            .any(|n| n["status"]["capacity"]["vpc.amazonaws.com/pod-eni"] == "18")
    });
    // Annotated as EKS's controller does, for the tools that read it.
    wait_for("db-0 annotated with its branch", || {
        kube(&tb)
            .objects("pods")
            .iter()
            .find(|p| p["metadata"]["name"] == "db-0")
            .and_then(|p| {
                p["metadata"]["annotations"]["vpc.amazonaws.com/pod-eni"]
                    .as_str()
                    .map(str::to_string)
            })
            .and_then(|a| ipam::branch::parse_pod_eni(&a).ok())
            .is_some_and(|b| b[0].vlan_id == branch.vlan && b[0].ipv4 == Some(ipv4_of(&db)))
    });
    let (trunk, made) = {
        let model = tb.vpc_model();
        let vpc = model.lock().unwrap();
        let trunk = vpc
            .interfaces()
            .find(|e| e.interface_type == "trunk")
            .expect("the daemon made a trunk")
            .clone();
        let made: Vec<_> = vpc
            .interfaces()
            .filter(|e| e.interface_type == "branch")
            .cloned()
            .collect();
        (trunk, made)
    };
    assert_eq!(
        trunk.attachment.as_ref().map(|a| a.instance_id.as_str()),
        Some(tb.nodes[0].instance_id.as_str())
    );
    assert_eq!(made.len(), 1);
    assert_eq!(made[0].security_groups, ["sg-db"]);
    assert_eq!(db.address, IpAddr::V4(made[0].primary_ip));
    assert_eq!(
        branch.trunk_mac,
        ipam::choreography::parse_mac(&trunk.mac).unwrap()
    );

    // The daemon killed; meanwhile (as if it had died between EC2's answer and its file) a branch
    // with sg-web on VLAN 7.
    tb.stop_daemon(0, Stop::Kill).unwrap();
    let unrecorded = tb.out_of_band(|vpc| {
        let now = ipam::Time::ZERO;
        let eni = vpc
            .create_network_interface(
                now,
                simvpc::CreateEniRequest {
                    subnet_id: trunk.subnet_id.clone(),
                    description: "aws-k8s-branch-eni".into(),
                    security_groups: vec!["sg-web".into()],
                    secondary_ip_count: 0,
                    prefix_count: 0,
                    tags: Default::default(),
                    client_token: None,
                    interface_type: Some("branch".into()),
                },
            )
            .result
            .unwrap();
        vpc.associate_trunk_interface(now, &eni.id, &trunk.id, 7, None)
            .result
            .unwrap();
        eni
    });
    tb.start_daemon(0).unwrap();
    let lookup = call(&proto::Request::Lookup {
        attachment: sandbox("db-0"),
        pod: None,
    });
    assert_eq!(
        lookup,
        proto::Reply::Found {
            allocation: Some(db)
        },
        "the pod's branch is still its own"
    );
    assert_eq!(add("db-0"), db, "a repeated ADD");

    policy(&tb, "web", "web", "sg-web");
    pod_object(&tb, "web-0", "web");
    let web = add("web-0");
    assert_eq!(web.branch.map(|b| b.vlan), Some(7));
    assert_eq!(web.address, IpAddr::V4(unrecorded.primary_ip));
    let branches = tb
        .vpc_model()
        .lock()
        .unwrap()
        .interfaces()
        .filter(|e| e.interface_type == "branch")
        .count();
    assert_eq!(branches, 2, "no branch made for web-0");
    let view = tb.nodes[0].introspect("/v1/branches").unwrap();
    assert_eq!(view["trunk"], trunk.id.as_str(), "{view}");
    let given: BTreeSet<(String, u64)> = view["given"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["pod"].as_str().unwrap().to_string(),
                b["vlan"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        given,
        BTreeSet::from([
            ("shop/db-0".to_string(), u64::from(branch.vlan)),
            ("shop/web-0".to_string(), 7)
        ]),
        "{view}"
    );
    let pods = tb.nodes[0].introspect("/v1/pods").unwrap();
    let web_pod = pods
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "web-0")
        .unwrap_or_else(|| panic!("{pods}"));
    assert_eq!(web_pod["securityGroups"], serde_json::json!(["sg-web"]));

    // A pod that no policy selects: the pool's address.
    pod_object(&tb, "plain-0", "plain");
    assert!(add("plain-0").branch.is_none());
    let del = call(&proto::Request::Del {
        attachment: sandbox("db-0"),
        pod: None,
        reason: proto::DelReason::PodDeleted,
    });
    assert_eq!(
        del,
        proto::Reply::Deleted { released: Some(db) },
        "a DEL without the pod's name still finds its branch"
    );
    tb.stop_daemon(0, Stop::Term).unwrap();
    let used: BTreeSet<(String, String, String)> = kube(&tb)
        .accesses()
        .into_iter()
        .map(|a| (a.verb, a.group, a.resource))
        .collect();
    if let Some(granted) = granted_by_rbac(&["overlays/security-groups-for-pods-node/rbac.yaml"]) {
        let missing: Vec<_> = used.difference(&granted).collect();
        assert!(
            missing.is_empty(),
            "not granted by the overlay's RBAC: {missing:?}"
        );
    }
}
