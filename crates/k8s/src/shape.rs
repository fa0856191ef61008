//! A running cluster's shape, for `vpcctl simulate --from-cluster`: its nodes (instance type and
//! zone from their labels, pods on each), how long its pods live, and the CNI's settings as the
//! DaemonSet and the `amazon-vpc-cni` ConfigMap give them. Read with the user's kubeconfig.

use crate::{api_error, ClusterError};
use ipam::config_map::ClusterSettings;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::ListParams;
use kube::{Api, Client};
use std::collections::{BTreeMap, HashMap};

/// The DaemonSets tried when none is named: upstream's, then ours.
pub const DAEMONSETS: &[(&str, &str)] = &[("kube-system", "aws-node"), ("kube-system", "vpc-cni")];
/// The containers whose environment holds the settings: upstream's, then ours.
const CONTAINERS: &[&str] = &["aws-node", "vpc-ipamd"];

#[derive(Clone, Debug, PartialEq)]
pub struct NodeShape {
    pub name: String,
    pub instance_type: String,
    pub zone: String,
    /// Pods on the node with an address of the pod network: running or pending, not host network.
    pub pods: u32,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterShape {
    /// Nodes the VPC CNI runs on, by name.
    pub nodes: Vec<NodeShape>,
    /// The age in seconds of each pod counted in `nodes`.
    pub pod_ages_secs: Vec<f64>,
    /// The CNI's settings: the container's environment with the ConfigMap over it.
    pub settings: BTreeMap<String, String>,
    /// "namespace/name" of the DaemonSet read.
    pub daemonset: String,
    /// What was read but left out, and why: nodes, environment variables, ConfigMap keys.
    pub notes: Vec<String>,
}

fn label<'a>(node: &'a Node, keys: &[&str]) -> Option<&'a str> {
    let labels = node.metadata.labels.as_ref()?;
    keys.iter().find_map(|k| labels.get(*k).map(String::as_str))
}

/// The shape of these objects at `now` (seconds since the epoch). Nodes the VPC CNI does not run
/// on (Windows, Fargate) or cannot be sized (no instance type label) are left out and noted.
pub fn shape_of(
    nodes: &[Node],
    pods: &[Pod],
    daemonset: (&str, &DaemonSet),
    config_map: Option<&ConfigMap>,
    now: i64,
) -> ClusterShape {
    let mut shape = ClusterShape {
        daemonset: daemonset.0.to_string(),
        ..ClusterShape::default()
    };
    let mut index = HashMap::new();
    for node in nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        let skip = if label(node, &["kubernetes.io/os"]) == Some("windows") {
            Some("a Windows node")
        } else if label(node, &["eks.amazonaws.com/compute-type"]) == Some("fargate") {
            Some("a Fargate node")
        } else {
            None
        };
        if let Some(why) = skip {
            shape.notes.push(format!("node {name}: left out, {why}"));
            continue;
        }
        let Some(instance_type) = label(
            node,
            &[
                "node.kubernetes.io/instance-type",
                "beta.kubernetes.io/instance-type",
            ],
        ) else {
            shape.notes.push(format!(
                "node {name}: left out, no node.kubernetes.io/instance-type label"
            ));
            continue;
        };
        let zone = label(
            node,
            &[
                "topology.kubernetes.io/zone",
                "failure-domain.beta.kubernetes.io/zone",
            ],
        )
        .unwrap_or("unknown");
        index.insert(name.clone(), shape.nodes.len());
        shape.nodes.push(NodeShape {
            name,
            instance_type: instance_type.to_string(),
            zone: zone.to_string(),
            pods: 0,
        });
    }
    for pod in pods {
        let spec = pod.spec.as_ref();
        let on = spec.and_then(|s| s.node_name.as_ref());
        let host_network = spec.and_then(|s| s.host_network) == Some(true);
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let done = matches!(phase, Some("Succeeded" | "Failed"));
        let Some(&i) = on.and_then(|n| index.get(n)) else {
            continue;
        };
        if host_network || done {
            continue;
        }
        shape.nodes[i].pods += 1;
        if let Some(created) = &pod.metadata.creation_timestamp {
            shape
                .pod_ages_secs
                .push((now - created.0.timestamp()).max(0) as f64);
        }
    }
    let containers = daemonset
        .1
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let container = CONTAINERS
        .iter()
        .find_map(|c| containers.iter().find(|x| x.name == *c))
        .or(containers.first());
    let known = ipam::Config::VARIABLES;
    for var in container.and_then(|c| c.env.as_ref()).into_iter().flatten() {
        match &var.value {
            Some(value) if known.contains(&var.name.as_str()) => {
                shape.settings.insert(var.name.clone(), value.clone());
            }
            Some(_) => shape.notes.push(format!(
                "{}: not a setting vpc-ipamd reads, not simulated",
                var.name
            )),
            None if var.value_from.is_some() && known.contains(&var.name.as_str()) => {
                shape.notes.push(format!(
                    "{}: set from a reference (valueFrom), not followed; the default is simulated",
                    var.name
                ))
            }
            None => {}
        }
    }
    if let Some(data) = config_map.and_then(|c| c.data.as_ref()) {
        let data: BTreeMap<String, String> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let from_map = ClusterSettings::from_data(&data);
        for (variable, value) in from_map.variables {
            if known.contains(&variable.as_str()) {
                shape.settings.insert(variable, value);
            }
        }
        for refused in from_map.refused {
            shape
                .notes
                .push(format!("ConfigMap amazon-vpc-cni: {refused}"));
        }
    }
    shape
}

/// Reads the cluster's shape with the kubeconfig the environment names (`KUBECONFIG`, else
/// `~/.kube/config`), from `daemonset` ("namespace/name") or the first of [`DAEMONSETS`] found.
pub async fn read_shape(daemonset: Option<&str>) -> Result<ClusterShape, ClusterError> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| ClusterError::Config(e.to_string()))?;
    let client = Client::try_from(config).map_err(|e| ClusterError::Config(e.to_string()))?;
    let named: Vec<(String, String)> = match daemonset {
        Some(d) => {
            let (ns, name) = d.split_once('/').ok_or_else(|| {
                ClusterError::Config(format!("--daemonset {d:?}: write NAMESPACE/NAME"))
            })?;
            vec![(ns.to_string(), name.to_string())]
        }
        None => DAEMONSETS
            .iter()
            .map(|(ns, n)| (ns.to_string(), n.to_string()))
            .collect(),
    };
    let mut found = None;
    for (ns, name) in &named {
        let api: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
        if let Some(ds) = api
            .get_opt(name)
            .await
            .map_err(api_error(format!("reading the DaemonSet {ns}/{name}")))?
        {
            found = Some((format!("{ns}/{name}"), ns.clone(), ds));
            break;
        }
    }
    let Some((label, namespace, ds)) = found else {
        let tried: Vec<String> = named.iter().map(|(ns, n)| format!("{ns}/{n}")).collect();
        return Err(ClusterError::Config(format!(
            "no DaemonSet {} in the cluster: name the VPC CNI's with --daemonset NAMESPACE/NAME",
            tried.join(" or ")
        )));
    };
    let config_map = Api::<ConfigMap>::namespaced(client.clone(), &namespace)
        .get_opt("amazon-vpc-cni")
        .await
        .map_err(api_error("reading the ConfigMap amazon-vpc-cni"))?;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_error("listing the Nodes"))?
        .items;
    let pods = Api::<Pod>::all(client)
        .list(&ListParams::default())
        .await
        .map_err(api_error("listing the Pods"))?
        .items;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    Ok(shape_of(
        &nodes,
        &pods,
        (&label, &ds),
        config_map.as_ref(),
        now,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, labels: serde_json::Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
    }

    fn pod(node: &str, created: &str, host_network: bool, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "creationTimestamp": created},
            "spec": {"nodeName": node, "hostNetwork": host_network, "containers": []},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn nodes_pods_and_settings_as_the_cni_sees_them() {
        let nodes = [
            node(
                "a",
                json!({"node.kubernetes.io/instance-type": "m5.large", "topology.kubernetes.io/zone": "us-west-2a"}),
            ),
            node(
                "b",
                json!({"beta.kubernetes.io/instance-type": "m5.xlarge"}),
            ),
            node(
                "win",
                json!({"kubernetes.io/os": "windows", "node.kubernetes.io/instance-type": "m5.large"}),
            ),
            node("bare", json!({})),
        ];
        // 2026-12-04T00:00:00Z
        let now = 1_796_342_400;
        let pods = [
            pod("a", "2026-12-03T23:00:00Z", false, "Running"),
            pod("a", "2026-12-03T22:00:00Z", false, "Pending"),
            pod("a", "2026-12-01T00:00:00Z", true, "Running"),
            pod("a", "2026-12-01T00:00:00Z", false, "Succeeded"),
            pod("b", "2026-12-03T23:30:00Z", false, "Running"),
            pod("win", "2026-12-03T23:30:00Z", false, "Running"),
        ];
        let ds: DaemonSet = serde_json::from_value(json!({"spec": {
            "selector": {},
            "template": {"spec": {"containers": [
                {"name": "sidecar", "env": [{"name": "WARM_IP_TARGET", "value": "9"}]},
                {"name": "aws-node", "env": [
                    {"name": "WARM_IP_TARGET", "value": "3"},
                    {"name": "WARM_ENI_TARGET", "value": "0"},
                    {"name": "MINIMUM_IP_TARGET", "valueFrom": {"configMapKeyRef": {"name": "x", "key": "y"}}},
                    {"name": "AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "value": "DEBUG"},
                ]},
            ]}},
        }}))
        .unwrap();
        let cm: ConfigMap = serde_json::from_value(json!({"data": {
            "warm-ip-target": "5", "warm-ip-targt": "1",
        }}))
        .unwrap();
        let shape = shape_of(&nodes, &pods, ("kube-system/aws-node", &ds), Some(&cm), now);
        let summary: Vec<(&str, &str, &str, u32)> = shape
            .nodes
            .iter()
            .map(|n| {
                (
                    n.name.as_str(),
                    n.instance_type.as_str(),
                    n.zone.as_str(),
                    n.pods,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("a", "m5.large", "us-west-2a", 2),
                ("b", "m5.xlarge", "unknown", 1)
            ]
        );
        assert_eq!(shape.pod_ages_secs, [3600.0, 7200.0, 1800.0]);
        // The ConfigMap over the container's own environment; the sidecar's is not read.
        assert_eq!(shape.settings["WARM_IP_TARGET"], "5");
        assert_eq!(shape.settings["WARM_ENI_TARGET"], "0");
        assert!(!shape.settings.contains_key("MINIMUM_IP_TARGET"));
        let notes = shape.notes.join("\n");
        for expected in [
            "node win: left out, a Windows node",
            "node bare: left out, no node.kubernetes.io/instance-type label",
            "MINIMUM_IP_TARGET: set from a reference (valueFrom), not followed",
            "AWS_VPC_K8S_PLUGIN_LOG_LEVEL: not a setting vpc-ipamd reads",
            "ConfigMap amazon-vpc-cni: warm-ip-targt: no such setting",
        ] {
            assert!(notes.contains(expected), "{expected:?} in\n{notes}");
        }
    }
}
