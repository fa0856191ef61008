//! NetworkPolicy's inputs, watched: every NetworkPolicy, Namespace and Pod of the cluster (pods on
//! other nodes are peers too), converted to `netpol`'s model and published whole after each batch of
//! changes, and only once all three listings are complete (a policy judged against half the pods
//! would let through or drop what it must not).

use crate::Cluster;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource, ResourceExt};
use std::collections::BTreeMap;

pub(crate) fn selector(s: &LabelSelector) -> netpol::Selector {
    netpol::Selector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: s
            .match_expressions
            .iter()
            .flatten()
            .map(|r| {
                let operator = match r.operator.as_str() {
                    "In" => Some(netpol::Operator::In),
                    "NotIn" => Some(netpol::Operator::NotIn),
                    "Exists" => Some(netpol::Operator::Exists),
                    "DoesNotExist" => Some(netpol::Operator::DoesNotExist),
                    _ => None,
                };
                match operator {
                    Some(operator) => netpol::Requirement {
                        key: r.key.clone(),
                        operator,
                        values: r.values.clone().unwrap_or_default(),
                    },
                    // The API server validates operators; one it let through is a requirement
                    // that never holds (In nothing), so it selects nothing.
                    None => netpol::Requirement {
                        key: r.key.clone(),
                        operator: netpol::Operator::In,
                        values: Vec::new(),
                    },
                }
            })
            .collect(),
    }
}

fn protocol(p: Option<&String>) -> netpol::Protocol {
    match p.map(String::as_str) {
        Some("UDP") => netpol::Protocol::Udp,
        Some("SCTP") => netpol::Protocol::Sctp,
        _ => netpol::Protocol::Tcp,
    }
}

fn peer(p: &NetworkPolicyPeer) -> Option<netpol::Peer> {
    if let Some(block) = &p.ip_block {
        return Some(netpol::Peer::IpBlock {
            cidr: block.cidr.parse().ok()?,
            except: block
                .except
                .iter()
                .flatten()
                .filter_map(|c| c.parse().ok())
                .collect(),
        });
    }
    Some(netpol::Peer::Pods {
        pod_selector: p.pod_selector.as_ref().map(selector),
        namespace_selector: p.namespace_selector.as_ref().map(selector),
    })
}

fn port(p: &NetworkPolicyPort) -> netpol::PortSpec {
    netpol::PortSpec {
        protocol: protocol(p.protocol.as_ref()),
        port: p.port.as_ref().map(|port| match port {
            IntOrString::Int(n) => netpol::PortRef::Number(u16::try_from(*n).unwrap_or(0)),
            IntOrString::String(name) => netpol::PortRef::Name(name.clone()),
        }),
        end_port: p.end_port.and_then(|e| u16::try_from(e).ok()),
    }
}

/// A NetworkPolicy as `netpol` reads it.
fn policy(np: &NetworkPolicy) -> netpol::Policy {
    let spec = np.spec.clone().unwrap_or_default();
    let rules = |peers: Option<Vec<NetworkPolicyPeer>>, ports: Option<Vec<NetworkPolicyPort>>| {
        netpol::Rule {
            peers: peers.iter().flatten().filter_map(peer).collect(),
            ports: ports.iter().flatten().map(port).collect(),
        }
    };
    netpol::Policy {
        namespace: np.namespace().unwrap_or_default(),
        name: np.name_any(),
        pod_selector: spec.pod_selector.as_ref().map(selector).unwrap_or_default(),
        policy_types: spec.policy_types.map(|types| {
            types
                .iter()
                .filter_map(|t| match t.as_str() {
                    "Ingress" => Some(netpol::Direction::Ingress),
                    "Egress" => Some(netpol::Direction::Egress),
                    _ => None,
                })
                .collect()
        }),
        ingress: spec
            .ingress
            .into_iter()
            .flatten()
            .map(|r| rules(r.from, r.ports))
            .collect(),
        egress: spec
            .egress
            .into_iter()
            .flatten()
            .map(|r| rules(r.to, r.ports))
            .collect(),
    }
}

/// A Pod as `netpol` reads it: labels, addresses, named container ports.
fn pod(p: &Pod) -> netpol::Pod {
    let status = p.status.as_ref();
    let ips = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .chain(
            status
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|ip| ip.parse().ok()),
        )
        .fold(Vec::new(), |mut ips, ip| {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
            ips
        });
    // Host-network pods have the node's address: they are not pods to a policy.
    let host_network = p
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    netpol::Pod {
        namespace: p.namespace().unwrap_or_default(),
        name: p.name_any(),
        labels: p.labels().clone(),
        ips: if host_network { Vec::new() } else { ips },
        ports: p
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|cp| {
                Some(netpol::ContainerPort {
                    name: cp.name.clone()?,
                    port: u16::try_from(cp.container_port).ok()?,
                    protocol: protocol(cp.protocol.as_ref()),
                })
            })
            .collect(),
    }
}

fn namespace(n: &Namespace) -> netpol::Namespace {
    netpol::Namespace {
        name: n.name_any(),
        labels: n.labels().clone(),
    }
}

/// One kind's objects, by namespace and name, and whether its first listing is complete.
pub(crate) struct Kind<T> {
    objects: BTreeMap<(String, String), T>,
    listing: Option<BTreeMap<(String, String), T>>,
    pub(crate) listed: bool,
    /// The highest resourceVersion seen: every change of this kind up to it is in `objects` (a
    /// watch delivers one kind's changes in order).
    pub(crate) version: u64,
}

impl<T> Default for Kind<T> {
    fn default() -> Self {
        Kind {
            objects: BTreeMap::new(),
            listing: None,
            listed: false,
            version: 0,
        }
    }
}

impl<T> Kind<T> {
    pub(crate) fn apply<K: Resource>(&mut self, event: Event<K>, convert: impl Fn(&K) -> T) {
        let key = |k: &K| {
            (
                k.meta().namespace.clone().unwrap_or_default(),
                k.meta().name.clone().unwrap_or_default(),
            )
        };
        let seen = |k: &K| {
            k.meta()
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match &event {
            Event::InitApply(k) | Event::Apply(k) | Event::Delete(k) => {
                self.version = self.version.max(seen(k))
            }
            Event::Init | Event::InitDone => {}
        }
        match event {
            Event::Init => self.listing = Some(BTreeMap::new()),
            Event::InitApply(k) => {
                if let Some(listing) = &mut self.listing {
                    listing.insert(key(&k), convert(&k));
                }
            }
            Event::InitDone => {
                if let Some(listing) = self.listing.take() {
                    self.objects = listing;
                    self.listed = true;
                }
            }
            Event::Apply(k) => {
                self.objects.insert(key(&k), convert(&k));
            }
            Event::Delete(k) => {
                self.objects.remove(&key(&k));
            }
        }
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &T> {
        self.objects.values()
    }
}

/// The highest resourceVersion of each kind a view of the cluster was built from (for the
/// enforcer's introspection: a test or a bench waits on it to know a change is in force).
pub type Versions = BTreeMap<&'static str, u64>;

enum Change {
    Policy(Event<NetworkPolicy>),
    Namespace(Event<Namespace>),
    Pod(Box<Event<Pod>>),
}

impl Cluster {
    /// Calls `on_change` with the whole cluster as `netpol` reads it, once every listing is
    /// complete and after each batch of changes from then on. Runs until the process ends; API
    /// errors go to `on_error` and the watches retry.
    pub async fn follow_network_policies(
        &self,
        mut on_change: impl FnMut(netpol::Cluster, Versions),
        mut on_error: impl FnMut(String),
    ) {
        let config = watcher::Config::default;
        let policies = watcher(Api::<NetworkPolicy>::all(self.client.clone()), config())
            .default_backoff()
            .map(|e| e.map(Change::Policy));
        let namespaces = watcher(Api::<Namespace>::all(self.client.clone()), config())
            .default_backoff()
            .map(|e| e.map(Change::Namespace));
        let pods = watcher(Api::<Pod>::all(self.client.clone()), config())
            .default_backoff()
            .map(|e| e.map(|event| Change::Pod(Box::new(event))));
        let mut changes = std::pin::pin!(futures::stream::select(
            futures::stream::select(policies, namespaces),
            pods
        )
        .ready_chunks(256));
        let (mut p, mut n, mut q) = (Kind::default(), Kind::default(), Kind::default());
        while let Some(batch) = changes.next().await {
            for change in batch {
                match change {
                    Ok(Change::Policy(e)) => p.apply(e, policy),
                    Ok(Change::Namespace(e)) => n.apply(e, namespace),
                    Ok(Change::Pod(e)) => q.apply(*e, pod),
                    Err(e) => on_error(e.to_string()),
                }
            }
            if p.listed && n.listed && q.listed {
                on_change(
                    netpol::Cluster {
                        namespaces: n.values().cloned().collect(),
                        pods: q.values().cloned().collect(),
                        policies: p.values().cloned().collect(),
                    },
                    BTreeMap::from([
                        ("networkpolicies", p.version),
                        ("namespaces", n.version),
                        ("pods", q.version),
                    ]),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_convert_as_the_api_serves_them() {
        let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "prod", "name": "db"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "db"}},
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [
                        {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["batch"]}]},
                         "namespaceSelector": {}},
                        {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}}
                    ],
                    "ports": [{"port": 5432}, {"protocol": "UDP", "port": "dns"}, {"port": 8000, "endPort": 8010}]
                }]
            }
        }))
        .unwrap();
        let p = policy(&np);
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("prod", "db"));
        assert_eq!(p.policy_types, Some(vec![netpol::Direction::Ingress]));
        let rule = &p.ingress[0];
        assert!(matches!(
            &rule.peers[0],
            netpol::Peer::Pods { pod_selector: Some(s), namespace_selector: Some(ns) }
                if s.match_expressions[0].operator == netpol::Operator::NotIn && *ns == netpol::Selector::default()
        ));
        assert!(
            matches!(&rule.peers[1], netpol::Peer::IpBlock { except, .. } if except.len() == 1)
        );
        assert_eq!(rule.ports[0].protocol, netpol::Protocol::Tcp);
        assert_eq!(
            rule.ports[1].port,
            Some(netpol::PortRef::Name("dns".into()))
        );
        assert_eq!(rule.ports[2].end_port, Some(8010));

        let pod_object: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "prod", "name": "db-0", "labels": {"app": "db"}},
            "spec": {"containers": [{"name": "pg", "ports": [
                {"name": "pg", "containerPort": 5432},
                {"containerPort": 9187}
            ]}]},
            "status": {"podIP": "10.0.0.9", "podIPs": [{"ip": "10.0.0.9"}, {"ip": "2001:db8::9"}]}
        }))
        .unwrap();
        let q = pod(&pod_object);
        assert_eq!(q.ips.len(), 2);
        assert_eq!(q.ports.len(), 1, "only named ports matter");
        assert_eq!(q.labels["app"], "db");
        let mut host: Pod = pod_object.clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(pod(&host).ips.is_empty(), "a host-network pod is the node");
    }

    #[test]
    fn nothing_is_published_before_every_listing_is_complete() {
        let mut kind: Kind<netpol::Namespace> = Kind::default();
        let ns = |name: &str| Namespace {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        kind.apply(Event::Init, namespace);
        kind.apply(Event::InitApply(ns("a")), namespace);
        assert!(!kind.listed);
        kind.apply(Event::InitDone, namespace);
        assert!(kind.listed);
        kind.apply(Event::Apply(ns("b")), namespace);
        kind.apply(Event::Delete(ns("a")), namespace);
        let names: Vec<_> = kind.values().map(|n| n.name.clone()).collect();
        assert_eq!(names, ["b"]);
    }
}
