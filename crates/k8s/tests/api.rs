//! The Kubernetes side against the test API server (testbed::kube_api) over HTTP on loopback:
//! real kube-rs requests, real watches.

use k8s::PodRef;
use serde_json::json;
use std::time::Duration;
use testbed::kube_api::KubeApi;
use tokio::sync::mpsc;
use tokio::time::timeout;

mod common;

use common::{KEY, NODE};

fn node(labels: serde_json::Value) -> serde_json::Value {
    json!({"metadata": {"name": NODE, "labels": labels},
           "status": {"capacity": {"cpu": "2", "pods": "17"}}})
}

fn eni_config(name: &str, subnet: &str) -> serde_json::Value {
    json!({"metadata": {"name": name}, "spec": {"subnet": subnet, "securityGroups": ["sg-0a"]}})
}

fn pod(namespace: &str, name: &str, node: &str) -> serde_json::Value {
    json!({"metadata": {"namespace": namespace, "name": name}, "spec": {"nodeName": node}})
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no {what} in 10 s"))
        .expect("the sender lives")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_eniconfig_pods_and_events_through_a_real_client() {
    let api = KubeApi::start("127.0.0.1:0".parse().unwrap()).unwrap();
    api.apply("nodes", node(json!({KEY: "pods-a"})));
    api.apply("eniconfigs", eni_config("pods-a", "subnet-0aaa"));
    api.apply("pods", pod("default", "web-1", NODE));
    api.apply("pods", pod("default", "elsewhere", "another-node"));
    let cluster = common::connect(&api, "api").await;
    cluster
        .wait_reachable(Some(Duration::from_secs(5)))
        .await
        .expect("reachable");

    // The Node: selection and capacity.
    let view = cluster.node().await.expect("the Node");
    assert_eq!(view.eni_config_name, "pods-a");
    assert_eq!(view.max_pods, Some(17));
    let once = cluster.eni_config("pods-a").await.expect("a read");
    assert_eq!(once.spec.expect("a spec").subnet, "subnet-0aaa");
    let missing = cluster.eni_config("nope").await.expect("a read");
    assert!(missing.spec.unwrap_err().contains("no ENIConfig named"));

    // The ENIConfig follows the Node's label and the objects.
    let (selections, mut selected) = mpsc::unbounded_channel();
    let (pod_tx, mut snapshots) = mpsc::unbounded_channel();
    let (view_tx, mut views) = mpsc::unbounded_channel();
    let cluster = std::sync::Arc::new(cluster);
    {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            cluster
                .follow_node(
                    move |v| drop(view_tx.send(v.clone())),
                    |e| eprintln!("watch: {e}"),
                )
                .await
        });
    }
    {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            cluster
                .follow_eni_config(
                    move |s| drop(selections.send(s)),
                    |e| eprintln!("watch: {e}"),
                )
                .await
        });
    }
    {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            cluster
                .follow_pods(
                    Duration::from_secs(3600),
                    move |s| drop(pod_tx.send(s)),
                    |e| eprintln!("watch: {e}"),
                )
                .await
        });
    }
    let view = |name: &str, max_pods| k8s::NodeView {
        eni_config_name: name.into(),
        max_pods: Some(max_pods),
        unschedulable: false,
    };
    // Before the Node changes, so that the first view is of the Node as it was.
    assert_eq!(
        next(&mut views, "first Node view").await,
        view("pods-a", 17)
    );
    let first = next(&mut selected, "first selection").await;
    assert_eq!(
        (first.name.as_str(), first.spec.unwrap().subnet.as_str()),
        ("pods-a", "subnet-0aaa")
    );
    api.apply("nodes", node(json!({KEY: "pods-b"})));
    let switched = next(&mut selected, "selection after the relabel").await;
    assert_eq!(switched.name, "pods-b");
    assert!(switched.spec.is_err(), "pods-b does not exist yet");
    api.apply("eniconfigs", eni_config("pods-b", "subnet-0bbb"));
    let created = next(&mut selected, "selection after the create").await;
    assert_eq!(created.spec.unwrap().subnet, "subnet-0bbb");

    // The Node itself, view by view (the first is above): the relabel, then a kubelet restarted
    // with another --max-pods. The ENIConfig's creation is no change of the Node's.
    assert_eq!(
        next(&mut views, "view after the relabel").await,
        view("pods-b", 17)
    );
    let mut restarted = node(json!({KEY: "pods-b"}));
    restarted["status"]["capacity"]["pods"] = "29".into();
    api.apply("nodes", restarted.clone());
    assert_eq!(
        next(&mut views, "view after the restart").await,
        view("pods-b", 29)
    );
    // Cordoned, as kubectl cordon does it; then the taint the node controller adds is enough alone.
    restarted["spec"] = json!({"unschedulable": true});
    api.apply("nodes", restarted.clone());
    assert_eq!(
        next(&mut views, "view after a cordon").await,
        k8s::NodeView {
            unschedulable: true,
            ..view("pods-b", 29)
        }
    );
    restarted["spec"] = json!({});
    api.apply("nodes", restarted.clone());
    assert_eq!(
        next(&mut views, "view after the uncordon").await,
        view("pods-b", 29)
    );
    restarted["spec"] =
        json!({"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]});
    api.apply("nodes", restarted);
    assert!(
        next(&mut views, "view with the taint alone")
            .await
            .unschedulable,
        "the unschedulable taint alone cordons"
    );

    // The pods: only this node's, and deletions seen.
    let names = |s: k8s::PodSnapshot| {
        let mut v: Vec<PodRef> = s.pods.into_iter().collect();
        v.sort();
        v.into_iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(next(&mut snapshots, "first pod snapshot").await),
        ["default/web-1"]
    );
    api.apply("pods", pod("kube-system", "dns-1", NODE));
    assert_eq!(
        names(next(&mut snapshots, "snapshot after a create").await),
        ["default/web-1", "kube-system/dns-1"]
    );
    assert!(api.delete("pods", "default", "web-1"));
    assert_eq!(
        names(next(&mut snapshots, "snapshot after a delete").await),
        ["kube-system/dns-1"]
    );

    // Events: one per reason and message in the repeat window.
    let reporter = cluster.reporter(|e| panic!("event refused: {e}"));
    reporter.warning(
        "MissingIAMPermissions",
        "the node's IAM role lacks ec2:CreateNetworkInterface",
    );
    reporter.warning(
        "MissingIAMPermissions",
        "the node's IAM role lacks ec2:CreateNetworkInterface",
    );
    reporter.warning(
        "MissingIAMPermissions",
        "the node's IAM role lacks ec2:AssignPrivateIpAddresses",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while api.objects("events").len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = api.objects("events");
    assert_eq!(events.len(), 2, "{events:#?}");
    let event = &events[0];
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "MissingIAMPermissions");
    assert_eq!(event["involvedObject"]["kind"], "Pod");
    assert_eq!(event["involvedObject"]["name"], "aws-node-x1");
    assert_eq!(event["metadata"]["namespace"], "kube-system");
}
