//! The daemon's Kubernetes side (docs/kubernetes.md): the Node that selects the ENIConfig and
//! caps the pods, the ENIConfig custom resource, the pods scheduled on this node, and Warning
//! Events about the daemon's own pod. Without a cluster (no `KUBERNETES_SERVICE_HOST`, no
//! `KUBECONFIG`) none of this runs and the daemon takes the same settings from its environment.

#![forbid(unsafe_code)]

mod config_map;
mod eniconfig;
mod events;
mod node;
mod pod_eni;
mod pods;
mod policy_endpoints;
mod policy_inputs;
pub mod shape;
pub use policy_inputs::Versions;

pub use config_map::Data as ConfigMapData;
pub use eniconfig::{EniConfig, EniConfigBody, EniConfigSelection};
pub use events::Reporter;
pub use node::NodeView;
pub use pod_eni::{pod_eni_of, requests_pod_eni, PodEni, PodEniError, POD_ENI_RESOURCE};
pub use pods::{PodRef, PodSnapshot};

use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use std::time::Duration;

/// Who this daemon is and how it reaches the API server; upstream's variables.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// `MY_NODE_NAME`, from the downward API.
    pub node_name: String,
    /// `MY_POD_NAME` in `kube-system`: what Events are about.
    pub own_pod: Option<String>,
    /// `CLUSTER_ENDPOINT`: the API server's address, in place of the one the service account or
    /// kubeconfig gives.
    pub endpoint: Option<String>,
    /// `ENI_CONFIG_ANNOTATION_DEF` and `ENI_CONFIG_LABEL_DEF`.
    pub eni_config_annotation: String,
    pub eni_config_label: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    #[error("MY_NODE_NAME is not set: in a cluster the daemon needs its node's name (the DaemonSet sets it from spec.nodeName)")]
    NoNodeName,
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

fn api_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Api { what, source }
}

/// Whether the environment places this process in a cluster: a pod's service account, or a
/// kubeconfig given explicitly. A stray `~/.kube/config` on a host does not count.
pub fn in_cluster(env: impl Fn(&str) -> Option<String>) -> bool {
    env("KUBERNETES_SERVICE_HOST").is_some_and(|h| !h.is_empty())
        || env("KUBECONFIG").is_some_and(|k| !k.is_empty())
}

pub struct Cluster {
    client: Client,
    settings: ClusterSettings,
}

impl Cluster {
    pub async fn connect(settings: ClusterSettings) -> Result<Cluster, ClusterError> {
        if settings.node_name.is_empty() {
            return Err(ClusterError::NoNodeName);
        }
        let mut config = kube::Config::infer()
            .await
            .map_err(|e| ClusterError::Config(e.to_string()))?;
        if let Some(endpoint) = &settings.endpoint {
            config.cluster_url = endpoint
                .parse()
                .map_err(|e| ClusterError::Config(format!("CLUSTER_ENDPOINT {endpoint:?}: {e}")))?;
        }
        config.connect_timeout = Some(Duration::from_secs(5));
        let client = Client::try_from(config).map_err(|e| ClusterError::Config(e.to_string()))?;
        Ok(Cluster { client, settings })
    }

    /// Asks the API server for its version until it answers or `patience` runs out.
    pub async fn wait_reachable(&self, patience: Option<Duration>) -> Result<(), ClusterError> {
        let deadline = patience.map(|p| tokio::time::Instant::now() + p);
        loop {
            let attempt =
                tokio::time::timeout(Duration::from_secs(5), self.client.apiserver_version());
            let error = match attempt.await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer in 5 s".to_string(),
            };
            if deadline.is_some_and(|d| tokio::time::Instant::now() + Duration::from_secs(2) > d) {
                return Err(ClusterError::Config(format!(
                    "the API server is unreachable: {error}"
                )));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// This node: which ENIConfig it selects and how many pods the kubelet runs on it.
    pub async fn node(&self) -> Result<NodeView, ClusterError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = nodes
            .get(&self.settings.node_name)
            .await
            .map_err(api_error(format!(
                "reading the Node {}",
                self.settings.node_name
            )))?;
        Ok(NodeView::of(
            &node,
            &self.settings.eni_config_annotation,
            &self.settings.eni_config_label,
        ))
    }
}
