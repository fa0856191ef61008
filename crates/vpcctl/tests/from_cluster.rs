//! `vpcctl simulate --from-cluster` and `vpcctl tune --from-cluster` against the project's test API
//! server: a cluster's shape read through a kubeconfig, as an operator's machine would.

use serde_json::{json, Value};
use std::process::{Command, Output};
use testbed::kube_api::KubeApi;

fn vpcctl(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vpcctl"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("vpcctl runs")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn node(name: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "labels": labels}})
}

/// `count` pods on `node`, created `age_secs` ago.
fn pods(api: &KubeApi, node: &str, count: usize, age_secs: i64, host_network: bool) {
    let created = (chrono::Utc::now() - chrono::Duration::seconds(age_secs))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for i in 0..count {
        api.apply(
            "pods",
            json!({
                "metadata": {"name": format!("{node}-{host_network}-{i}"), "namespace": "default",
                             "creationTimestamp": created},
                "spec": {"nodeName": node, "hostNetwork": host_network,
                         "containers": [{"name": "app", "image": "app"}]},
                "status": {"phase": "Running"},
            }),
        );
    }
}

#[test]
fn a_clusters_shape_becomes_a_scenario_the_tuner_answers_for() {
    let api = KubeApi::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig("127.0.0.1")).unwrap();

    let large = json!({"node.kubernetes.io/instance-type": "m5.large",
                       "topology.kubernetes.io/zone": "us-west-2a"});
    let xlarge = json!({"node.kubernetes.io/instance-type": "m5.xlarge",
                        "topology.kubernetes.io/zone": "us-west-2b"});
    for (name, labels) in [
        ("a1", &large),
        ("a2", &large),
        ("a3", &large),
        ("b1", &xlarge),
    ] {
        api.apply("nodes", node(name, labels.clone()));
    }
    api.apply(
        "nodes",
        node(
            "win1",
            json!({"kubernetes.io/os": "windows", "node.kubernetes.io/instance-type": "m5.large"}),
        ),
    );
    // 6 pods on each m5.large, half an hour old, and 14 on the m5.xlarge, an hour and a half old:
    // 8 a node, (18 x 1800 + 14 x 5400) / 32 = 3375 s old on average.
    for n in ["a1", "a2", "a3"] {
        pods(&api, n, 6, 1800, false);
        pods(&api, n, 2, 86_400, true);
    }
    pods(&api, "b1", 14, 5400, false);
    pods(&api, "win1", 3, 60, false);

    // No DaemonSet yet: the error names what was looked for.
    let out = vpcctl(&kubeconfig, &["simulate", "--from-cluster"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("kube-system/aws-node") && err.contains("--daemonset"),
        "{err}"
    );

    api.apply(
        "daemonsets",
        json!({"metadata": {"name": "aws-node", "namespace": "kube-system"},
               "spec": {"selector": {}, "template": {"spec": {"containers": [{
                   "name": "aws-node", "image": "aws-node",
                   "env": [{"name": "WARM_IP_TARGET", "value": "2"},
                           {"name": "MINIMUM_IP_TARGET", "value": "4"},
                           {"name": "AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "value": "DEBUG"}]}]}}}}),
    );
    api.apply(
        "configmaps",
        json!({"metadata": {"name": "amazon-vpc-cni", "namespace": "kube-system"},
               "data": {"warm-ip-target": "3"}}),
    );

    let out = vpcctl(
        &kubeconfig,
        &[
            "simulate",
            "--from-cluster",
            "--print-scenario",
            "--hours",
            "2",
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", text(&out.stderr));
    let scenario: toml::Table = toml::from_str(&stdout).unwrap();
    assert_eq!(scenario["duration_secs"].as_integer(), Some(7200));
    let groups: Vec<(String, i64, i64)> = scenario["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["instance_type"].as_str().unwrap().to_string(),
                g["count"].as_integer().unwrap(),
                g["subnet"].as_integer().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [("m5.large".into(), 3, 0), ("m5.xlarge".into(), 1, 1)]
    );
    let workload = &scenario["workload"];
    assert_eq!(workload["pods_per_node"].as_float(), Some(8.0));
    let lifetime = workload["mean_lifetime_secs"].as_float().unwrap();
    assert!((3375.0..=3435.0).contains(&lifetime), "{lifetime}");
    // The ConfigMap over the DaemonSet's environment.
    let settings = &scenario["settings"];
    assert_eq!(settings["WARM_IP_TARGET"].as_str(), Some("3"));
    assert_eq!(settings["MINIMUM_IP_TARGET"].as_str(), Some("4"));
    for note in [
        "# settings from the DaemonSet kube-system/aws-node",
        "# node win1: left out, a Windows node",
        "# AWS_VPC_K8S_PLUGIN_LOG_LEVEL: not a setting vpc-ipamd reads",
    ] {
        assert!(stdout.contains(note), "{note:?} in\n{stdout}");
    }

    // The tuner answers for that cluster, its settings the baseline.
    let out = vpcctl(
        &kubeconfig,
        &[
            "tune",
            "--from-cluster",
            "--hours",
            "2",
            "--max-p99-wait",
            "2s",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["scenario"], "from-cluster");
    assert_eq!(report["node_hours"], 8.0);
    assert!(report["recommended"].is_u64(), "{report}");
    let err = text(&out.stderr);
    assert!(
        err.contains("from the cluster: node win1: left out"),
        "{err}"
    );

    // A DaemonSet named explicitly; one that does not exist is an error naming it.
    let out = vpcctl(
        &kubeconfig,
        &[
            "simulate",
            "--from-cluster",
            "--daemonset",
            "kube-system/vpc-cni",
        ],
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("kube-system/vpc-cni"));
}
