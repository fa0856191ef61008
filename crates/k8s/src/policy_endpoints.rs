//! EKS's PolicyEndpoint custom resource (`networking.k8s.aws/v1alpha1`, namespaced), which its
//! managed network policy controller writes: each NetworkPolicy resolved into the pods it selects
//! and its peers' CIDRs. Watched whole and published as `netpol::endpoints` after each batch of
//! changes, once the listing is complete.

use crate::policy_inputs::{Kind, Versions};
use crate::Cluster;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::NamespaceResourceScope;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct PolicyEndpoint {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Spec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub policy_ref: PolicyRef,
    #[serde(default)]
    pub pod_isolation: Vec<String>,
    #[serde(default)]
    pub pod_selector_endpoints: Vec<PodEndpoint>,
    #[serde(default)]
    pub ingress: Vec<EndpointInfo>,
    #[serde(default)]
    pub egress: Vec<EndpointInfo>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct PolicyRef {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEndpoint {
    // The controller writes `podIP`, which camelCase would spell `podIp`.
    #[serde(default, rename = "podIP")]
    pub pod_ip: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointInfo {
    #[serde(default)]
    pub cidr: String,
    #[serde(default)]
    pub except: Vec<String>,
    #[serde(default)]
    pub ports: Vec<Port>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    pub protocol: Option<String>,
    pub port: Option<i32>,
    pub end_port: Option<i32>,
}

impl Resource for PolicyEndpoint {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "PolicyEndpoint".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "networking.k8s.aws".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "policyendpoints".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The object in `netpol`'s terms. What does not parse is left out and said in `problems`: a
/// rule with a bad CIDR is dropped (its peers stay denied, never opened), a bad pod address skipped.
pub fn convert(
    pe: &PolicyEndpoint,
    problems: &mut Vec<String>,
) -> netpol::endpoints::PolicyEndpoint {
    let spec = &pe.spec;
    let name = format!(
        "{}/{}",
        pe.metadata.namespace.clone().unwrap_or_default(),
        pe.metadata.name.clone().unwrap_or_default()
    );
    let rules = |infos: &[EndpointInfo], problems: &mut Vec<String>| {
        infos
            .iter()
            .filter_map(|info| {
                let cidr = match info.cidr.parse() {
                    Ok(c) => c,
                    Err(e) => {
                        problems.push(format!("PolicyEndpoint {name}: {e}"));
                        return None;
                    }
                };
                // A hole that does not parse must not become an opening: the rule goes.
                let except = match info.except.iter().map(|e| e.parse()).collect() {
                    Ok(except) => except,
                    Err(e) => {
                        problems.push(format!("PolicyEndpoint {name}: except: {e}"));
                        return None;
                    }
                };
                let ports = info
                    .ports
                    .iter()
                    .map(|p| {
                        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                            "UDP" => netpol::Protocol::Udp,
                            "SCTP" => netpol::Protocol::Sctp,
                            _ => netpol::Protocol::Tcp,
                        };
                        let first = p.port.unwrap_or(0).clamp(0, 65535) as u16;
                        let last = p.end_port.map_or(first, |e| e.clamp(0, 65535) as u16);
                        (protocol, first, last)
                    })
                    .collect();
                Some(netpol::endpoints::EndpointRule {
                    cidr: Some(cidr),
                    except,
                    ports,
                })
            })
            .collect()
    };
    netpol::endpoints::PolicyEndpoint {
        policy: format!("{}/{}", spec.policy_ref.namespace, spec.policy_ref.name),
        isolation: spec
            .pod_isolation
            .iter()
            .filter_map(|d| match d.as_str() {
                "Ingress" => Some(netpol::Direction::Ingress),
                "Egress" => Some(netpol::Direction::Egress),
                _ => None,
            })
            .collect(),
        pods: spec
            .pod_selector_endpoints
            .iter()
            .filter_map(|p| Some((p.namespace.clone(), p.name.clone(), p.pod_ip.parse().ok()?)))
            .collect(),
        ingress: rules(&spec.ingress, problems),
        egress: rules(&spec.egress, problems),
    }
}

impl Cluster {
    /// Calls `on_change` with every PolicyEndpoint of the cluster once the listing is complete and
    /// after each batch of changes. Runs until the process ends; errors go to `on_error`.
    pub async fn follow_policy_endpoints(
        &self,
        mut on_change: impl FnMut(Vec<netpol::endpoints::PolicyEndpoint>, Versions),
        mut on_error: impl FnMut(String),
    ) {
        let api: Api<PolicyEndpoint> = Api::all(self.client.clone());
        let mut changes = std::pin::pin!(watcher(api, watcher::Config::default())
            .default_backoff()
            .ready_chunks(256));
        let mut kind = Kind::default();
        while let Some(batch) = changes.next().await {
            let mut problems = Vec::new();
            for change in batch {
                match change {
                    Ok(e) => kind.apply(e, |pe: &PolicyEndpoint| pe.clone()),
                    Err(e) => on_error(e.to_string()),
                }
            }
            if kind.listed {
                let endpoints = kind.values().map(|pe| convert(pe, &mut problems)).collect();
                for problem in problems {
                    on_error(problem);
                }
                on_change(
                    endpoints,
                    BTreeMap::from([("policyendpoints", kind.version)]),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_convert_as_the_controller_writes_them() {
        let pe: PolicyEndpoint = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "prod", "name": "db-x7k2p"},
            "spec": {
                "policyRef": {"name": "db", "namespace": "prod"},
                "podSelector": {"matchLabels": {"app": "db"}},
                "podIsolation": ["Ingress", "Egress"],
                "podSelectorEndpoints": [{"hostIP": "10.0.0.5", "podIP": "10.0.1.9", "name": "db-0", "namespace": "prod"}],
                "ingress": [
                    {"cidr": "10.0.2.0/24", "except": ["10.0.2.128/25"], "ports": [{"protocol": "TCP", "port": 5432, "endPort": 5433}]},
                    {"cidr": "10.0.3.0/24", "except": ["not a cidr"]}
                ],
                "egress": [{"cidr": "0.0.0.0/0", "ports": [{"protocol": "UDP", "port": 53}]}]
            }
        }))
        .unwrap();
        let mut problems = Vec::new();
        let e = convert(&pe, &mut problems);
        assert_eq!(e.policy, "prod/db");
        assert_eq!(
            e.pods,
            vec![("prod".into(), "db-0".into(), "10.0.1.9".parse().unwrap())]
        );
        assert_eq!(e.isolation.len(), 2);
        assert_eq!(
            e.ingress.len(),
            1,
            "the rule whose hole does not parse is dropped, not opened"
        );
        assert_eq!(
            e.ingress[0].ports,
            vec![(netpol::Protocol::Tcp, 5432, 5433)]
        );
        assert_eq!(e.egress[0].ports, vec![(netpol::Protocol::Udp, 53, 53)]);
        assert_eq!(problems.len(), 1, "{problems:?}");
    }
}
