//! What the daemon reads off its Node (upstream-ipamd.md §7.2, §2.1 step 14).

use k8s_openapi::api::core::v1::Node;
use std::collections::BTreeMap;

/// The label that tools outside the cluster (Karpenter, node bootstrap scripts) set; it wins over
/// the configurable keys.
pub const EXTERNAL_ENI_CONFIG_LABEL: &str = "vpc.amazonaws.com/externalEniConfig";
pub const DEFAULT_ENI_CONFIG: &str = "default";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// The ENIConfig custom networking puts this node's pod ENIs in.
    pub eni_config_name: String,
    /// `status.capacity.pods`: the kubelet's `--max-pods`.
    pub max_pods: Option<u32>,
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
        NodeView {
            eni_config_name,
            max_pods,
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
