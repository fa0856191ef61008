//! What the tests against the test API server share: the node they run as, and a client for it.

use k8s::{Cluster, ClusterSettings};
use testbed::kube_api::KubeApi;

pub const NODE: &str = "ip-10-0-0-10.us-west-2.compute.internal";
pub const KEY: &str = "k8s.amazonaws.com/eniConfig";

/// A client of `api` through a kubeconfig file, as the daemon makes one. Each test binary has one
/// test, so nothing else reads the environment while `KUBECONFIG` is set.
pub async fn connect(api: &KubeApi, test: &str) -> Cluster {
    let dir = std::env::temp_dir().join(format!("k8s-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("kubeconfig");
    std::fs::write(&file, api.kubeconfig("127.0.0.1")).unwrap();
    std::env::set_var("KUBECONFIG", &file);
    Cluster::connect(ClusterSettings {
        node_name: NODE.into(),
        own_pod: Some("aws-node-x1".into()),
        endpoint: None,
        eni_config_annotation: KEY.into(),
        eni_config_label: KEY.into(),
    })
    .await
    .expect("a client")
}
