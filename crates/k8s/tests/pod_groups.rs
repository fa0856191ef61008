//! Where the node makes its branch ENIs (`POD_ENI_MANAGER=node`), a pod's security groups read from
//! the test API server: its namespace's SecurityGroupPolicies and its ServiceAccount. A test binary of
//! its own: the client is made through `KUBECONFIG`, which one test per binary may set.

use k8s::PodEniError;
use serde_json::json;
use testbed::kube_api::KubeApi;

mod common;

use common::NODE;

fn pod(name: &str) -> serde_json::Value {
    json!({"metadata": {"namespace": "shop", "name": name},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "x"}]}})
}

/// Where the node makes its branches: a pod's groups are the union of the SecurityGroupPolicies of
/// its namespace that select it by its labels and its service account's, read at each ADD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_groups_come_from_the_policies_that_select_it_and_its_service_account() {
    let api = KubeApi::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let cluster = common::connect(&api, "pod-groups").await;
    let labelled = |name: &str, labels: serde_json::Value, account: Option<&str>| {
        let mut p = pod(name);
        p["metadata"]["labels"] = labels;
        if let Some(a) = account {
            p["spec"]["serviceAccountName"] = json!(a);
        }
        p
    };
    api.apply("pods", labelled("db-0", json!({"app": "db"}), Some("db")));
    api.apply("pods", labelled("web-0", json!({"app": "web"}), None));
    assert_eq!(
        cluster.pod_groups("shop", "db-0").await.unwrap(),
        Vec::<String>::new(),
        "no policy: no groups"
    );

    let policy = |name: &str, spec: serde_json::Value| json!({"metadata": {"namespace": "shop", "name": name}, "spec": spec});
    api.apply(
        "securitygrouppolicies",
        policy(
            "a-db",
            json!({"podSelector": {"matchLabels": {"app": "db"}}, "securityGroups": {"groupIds": ["sg-db", "sg-all"]}}),
        ),
    );
    api.apply(
        "securitygrouppolicies",
        policy(
            "b-accounts",
            json!({"serviceAccountSelector": {"matchLabels": {"tier": "data"}}, "securityGroups": {"groupIds": ["sg-all", "sg-data"]}}),
        ),
    );
    // Another namespace's policy selects nothing here; one without groups is ignored.
    api.apply(
        "securitygrouppolicies",
        json!({"metadata": {"namespace": "other", "name": "c"}, "spec": {"podSelector": {}, "securityGroups": {"groupIds": ["sg-other"]}}}),
    );
    api.apply(
        "securitygrouppolicies",
        policy("d-empty", json!({"podSelector": {}})),
    );

    // The account does not exist yet: its labels are none.
    assert_eq!(
        cluster.pod_groups("shop", "db-0").await.unwrap(),
        vec!["sg-db", "sg-all"]
    );
    api.apply(
        "serviceaccounts",
        json!({"metadata": {"namespace": "shop", "name": "db", "labels": {"tier": "data"}}}),
    );
    assert_eq!(
        cluster.pod_groups("shop", "db-0").await.unwrap(),
        vec!["sg-db", "sg-all", "sg-data"],
        "the union, each group once, in the policies' order"
    );
    assert_eq!(
        cluster.pod_groups("shop", "web-0").await.unwrap(),
        Vec::<String>::new(),
        "web's default account has no labels"
    );
    let e = cluster.pod_groups("shop", "gone-0").await.unwrap_err();
    assert!(
        matches!(&e, PodEniError::Api(who, _) if who == "shop/gone-0"),
        "{e}"
    );
}
