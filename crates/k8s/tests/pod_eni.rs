//! Security groups for pods on EKS against the test API server: the CNINode feature that makes the
//! VPC resource controller give the node a trunk, and the pod annotation read at ADD, waited for
//! while the controller has not written it.

use k8s::{PodEni, PodEniError};
use serde_json::json;
use std::time::{Duration, Instant};
use testbed::kube_api::KubeApi;

mod common;

use common::NODE;
const ANNOTATION: &str = r#"[{"eniId":"eni-0b1","ifAddress":"02:00:00:00:00:0b","privateIp":"10.0.0.77","vlanId":4,"subnetCidr":"10.0.0.0/24","associationID":"trunk-assoc-1"}]"#;

fn pod(name: &str, asks: bool, annotation: Option<&str>) -> serde_json::Value {
    let resources = if asks {
        json!({"limits": {"vpc.amazonaws.com/pod-eni": "1"}, "requests": {"vpc.amazonaws.com/pod-eni": "1"}})
    } else {
        json!({})
    };
    let mut pod = json!({"metadata": {"namespace": "shop", "name": name},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "x", "resources": resources}]}});
    if let Some(a) = annotation {
        pod["metadata"]["annotations"] = json!({"vpc.amazonaws.com/pod-eni": a});
    }
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cninode_feature_and_the_pod_annotation() {
    let api = KubeApi::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let cluster = common::connect(&api, "pod-eni").await;

    // No CNINode yet (the controller makes it when the node joins): a clear error.
    let e = cluster
        .enable_security_groups_for_pods()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("CNINode"), "{e}");
    api.apply(
        "cninodes",
        json!({"metadata": {"name": NODE}, "spec": {"features": [{"name": "CustomNetworking", "value": "pods-a"}]}}),
    );
    assert!(cluster.enable_security_groups_for_pods().await.unwrap());
    let features = api.objects("cninodes")[0]["spec"]["features"].clone();
    assert_eq!(
        features,
        json!([{"name": "CustomNetworking", "value": "pods-a"}, {"name": "SecurityGroupsForPods"}]),
        "the features already there are kept"
    );
    assert!(
        !cluster.enable_security_groups_for_pods().await.unwrap(),
        "once"
    );

    // A pod that asks for nothing takes the node's addresses; an annotated one its branch.
    api.apply("pods", pod("web", false, None));
    api.apply("pods", pod("db", true, Some(ANNOTATION)));
    let patience = Duration::from_secs(2);
    assert_eq!(
        cluster.pod_eni("shop", "web", patience).await,
        Ok(PodEni::NotRequested)
    );
    let Ok(PodEni::Branches(b)) = cluster.pod_eni("shop", "db", patience).await else {
        panic!()
    };
    assert_eq!((b[0].vlan_id, b[0].eni_id.as_str()), (4, "eni-0b1"));

    // Asked for, not annotated yet: waited for, and served once the controller writes it.
    api.apply("pods", pod("cache", true, None));
    let late = pod("cache", true, Some(ANNOTATION));
    let started = Instant::now();
    let waiting = cluster.pod_eni("shop", "cache", patience);
    let (answer, ()) = tokio::join!(waiting, async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        api.apply("pods", late);
    });
    assert!(matches!(answer, Ok(PodEni::Branches(_))), "{answer:?}");
    assert!(started.elapsed() >= Duration::from_millis(600));

    // Never annotated: a bounded wait and an error that says what is missing.
    api.apply("pods", pod("orphan", true, None));
    let started = Instant::now();
    let e = cluster
        .pod_eni("shop", "orphan", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, PodEniError::NotYetAnnotated(..)), "{e}");
    assert!(e.to_string().contains("VPC resource controller"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // A malformed annotation is refused, not waited for.
    api.apply("pods", pod("bad", true, Some("[{\"vlanId\": 99999}]")));
    let e = cluster.pod_eni("shop", "bad", patience).await.unwrap_err();
    assert!(matches!(e, PodEniError::Malformed(..)), "{e}");
}
