//! What the daemon reads off its Node (upstream-ipamd.md §7.2, §2.1 step 14).

use crate::Cluster;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::Api;
use std::collections::BTreeMap;

/// The label that tools outside the cluster (Karpenter, node bootstrap scripts) set; it wins over
/// the configurable keys.
pub const EXTERNAL_ENI_CONFIG_LABEL: &str = "vpc.amazonaws.com/externalEniConfig";
pub const DEFAULT_ENI_CONFIG: &str = "default";

const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// The ENIConfig custom networking puts this node's pod ENIs in.
    pub eni_config_name: String,
    /// `status.capacity.pods`: the kubelet's `--max-pods`.
    pub max_pods: Option<u32>,
    /// Cordoned: `spec.unschedulable`, or the taint `node.kubernetes.io/unschedulable:NoSchedule`
    /// the node lifecycle controller mirrors it with (upstream reads the taint).
    pub unschedulable: bool,
}

impl NodeView {
    pub fn of(node: &Node, annotation_key: &str, label_key: &str) -> NodeView {
        let empty = BTreeMap::new();
        let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
        let annotations = node.metadata.annotations.as_ref().unwrap_or(&empty);
        let eni_config_name = [
            labels.get(EXTERNAL_ENI_CONFIG_LABEL),
            annotations.get(annotation_key),
            labels.get(label_key),
        ]
        .into_iter()
        .flatten()
        .find(|name| !name.is_empty())
        .cloned()
        .unwrap_or_else(|| DEFAULT_ENI_CONFIG.to_string());
        let max_pods = node
            .status
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get("pods"))
            .and_then(|q| q.0.parse().ok());
        let spec = node.spec.as_ref();
        let unschedulable = spec.and_then(|s| s.unschedulable).unwrap_or(false)
            || spec
                .and_then(|s| s.taints.as_ref())
                .into_iter()
                .flatten()
                .any(|t| t.key == UNSCHEDULABLE_TAINT && t.effect == "NoSchedule");
        NodeView {
            eni_config_name,
            max_pods,
            unschedulable,
        }
    }
}

impl Cluster {
    /// This node's Node object, a view per version the API server reports. The watch resumes
    /// with backoff after errors, which come through as items.
    pub(crate) fn node_views(
        &self,
    ) -> impl Stream<Item = Result<NodeView, watcher::Error>> + Send + 'static {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let (annotation, label) = (
            self.settings.eni_config_annotation.clone(),
            self.settings.eni_config_label.clone(),
        );
        watcher(
            nodes,
            watcher::Config::default()
                .fields(&format!("metadata.name={}", self.settings.node_name)),
        )
        .default_backoff()
        .applied_objects()
        .map(move |n| n.map(|n| NodeView::of(&n, &annotation, &label)))
    }

    /// Follows this node's Node: calls `on_change` with the first view and with every one that
    /// differs from the last (a kubelet restarted with another `--max-pods`, a relabel). Runs
    /// until the process ends; API errors are retried and passed to `on_error`.
    pub async fn follow_node(
        &self,
        mut on_change: impl FnMut(&NodeView),
        mut on_error: impl FnMut(String),
    ) {
        let mut views = std::pin::pin!(self.node_views());
        let mut last = None;
        while let Some(view) = views.next().await {
            match view {
                Ok(view) if last.as_ref() != Some(&view) => {
                    on_change(&view);
                    last = Some(view);
                }
                Ok(_) => {}
                Err(e) => on_error(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "k8s.amazonaws.com/eniConfig";

    fn node(value: serde_json::Value) -> Node {
        serde_json::from_value(value).expect("a Node")
    }

    fn selected(n: &Node, label_key: &str) -> String {
        NodeView::of(n, KEY, label_key).eni_config_name
    }

    #[test]
    fn the_external_label_wins_then_the_annotation_then_the_label_then_default() {
        let all = node(json!({"metadata": {
            "name": "n",
            "labels": {EXTERNAL_ENI_CONFIG_LABEL: "external", "topology.kubernetes.io/zone": "us-west-2a"},
            "annotations": {KEY: "annotated"}}}));
        assert_eq!(selected(&all, "topology.kubernetes.io/zone"), "external");
        let no_external = node(json!({"metadata": {
            "name": "n",
            "labels": {"topology.kubernetes.io/zone": "us-west-2a"},
            "annotations": {KEY: "annotated"}}}));
        assert_eq!(
            selected(&no_external, "topology.kubernetes.io/zone"),
            "annotated"
        );
        let label_only = node(json!({"metadata": {
            "name": "n", "labels": {"topology.kubernetes.io/zone": "us-west-2a"}}}));
        assert_eq!(
            selected(&label_only, "topology.kubernetes.io/zone"),
            "us-west-2a"
        );
        assert_eq!(selected(&label_only, KEY), DEFAULT_ENI_CONFIG);
        let blank = node(json!({"metadata": {"name": "n", "annotations": {KEY: ""}}}));
        assert_eq!(selected(&blank, KEY), DEFAULT_ENI_CONFIG);
    }

    #[test]
    fn max_pods_is_the_capacity_the_kubelet_reports() {
        let n = node(json!({"metadata": {"name": "n"},
            "status": {"capacity": {"cpu": "2", "pods": "29"}}}));
        assert_eq!(NodeView::of(&n, KEY, KEY).max_pods, Some(29));
        let none = node(json!({"metadata": {"name": "n"}}));
        assert_eq!(NodeView::of(&none, KEY, KEY).max_pods, None);
    }
}
