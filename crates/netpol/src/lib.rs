//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`) evaluated without I/O: for each pod and each
//! direction, whether it is isolated and, if it is, the traffic its policies allow, as grants of
//! (peer addresses, protocol and port ranges) that a datapath can turn into interval sets.
//!
//! The semantics, as the API defines them:
//! * a pod is isolated in a direction when some policy of its namespace selects it and has that
//!   direction among its `policyTypes` (defaulted: Ingress always, Egress when there are egress
//!   rules); otherwise everything is allowed that way;
//! * what an isolated pod allows is the union of the rules of every policy that isolates it;
//! * a rule's peers: none listed means every peer; `podSelector` alone selects pods of the policy's
//!   namespace, `namespaceSelector` alone every pod of the matching namespaces, both together pods
//!   matching the first in namespaces matching the second; `ipBlock` an address block minus its
//!   `except` blocks (pod addresses included);
//! * a rule's ports: none listed means every port of every protocol; a port without a number every
//!   port of its protocol; `endPort` a range; a named port resolves against the pod's own container
//!   ports for ingress and against the destination pod's for egress (an address no pod has matches
//!   no named port).
//!
//! Traffic from the node itself (kubelet probes) is the datapath's to allow; it is not a policy
//! matter here.
//!
//! `sgp` selects pods the same way for security groups for pods (`SecurityGroupPolicy`).

#![forbid(unsafe_code)]

pub mod endpoints;
pub mod ipset;
mod model;
pub mod sgp;

pub use ipset::IpSet;
pub use model::*;
use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

/// What one rule lets through: these peers (None: any address) on these ports (None: any protocol
/// and port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub peers: Option<IpSet>,
    pub ports: Option<Vec<PortRange>>,
    /// The policy the rule belongs to, as `namespace/name`.
    pub policy: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No policy isolates the pod in this direction.
    Open,
    /// Only what one of the grants allows (none: nothing).
    Isolated(Vec<Grant>),
}

impl Grant {
    /// Whether this grant lets through everything `other` does.
    pub fn covers(&self, other: &Grant) -> bool {
        let peers = match (&self.peers, &other.peers) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => mine.covers(theirs),
        };
        let ports = match (&self.ports, &other.ports) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => theirs.iter().all(|t| {
                mine.iter()
                    .any(|m| m.protocol == t.protocol && m.first <= t.first && t.last <= m.last)
            }),
        };
        peers && ports
    }
}

impl Verdict {
    /// Whether this verdict lets through everything `other` does: a change from `other` to this
    /// one denies no flow.
    pub fn covers(&self, other: &Verdict) -> bool {
        match (self, other) {
            (Verdict::Open, _) => true,
            (Verdict::Isolated(_), Verdict::Open) => false,
            (Verdict::Isolated(mine), Verdict::Isolated(theirs)) => {
                theirs.iter().all(|t| mine.iter().any(|m| m.covers(t)))
            }
        }
    }

    /// Whether a packet to or from `peer` on `protocol`/`port` is allowed (its pod's port for
    /// ingress, the peer's for egress).
    pub fn allows(&self, peer: IpAddr, protocol: Protocol, port: u16) -> bool {
        match self {
            Verdict::Open => true,
            Verdict::Isolated(grants) => grants.iter().any(|g| {
                g.peers.as_ref().is_none_or(|set| set.contains(peer))
                    && g.ports.as_ref().is_none_or(|ranges| {
                        ranges
                            .iter()
                            .any(|r| r.protocol == protocol && (r.first..=r.last).contains(&port))
                    })
            }),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPolicy {
    pub ingress: Verdict,
    pub egress: Verdict,
}

/// The cluster indexed for evaluation: namespace labels by name, and each rule's peers once
/// computed (they do not depend on the pod the rule is judged for, and a node evaluates all its
/// pods against the same policies).
pub struct Evaluator<'c> {
    cluster: &'c Cluster,
    namespace_labels: HashMap<&'c str, &'c Labels>,
    /// (policy, direction, rule) → the rule's peers (None: any).
    peers: std::cell::RefCell<HashMap<(usize, bool, usize), Option<IpSet>>>,
}

impl<'c> Evaluator<'c> {
    pub fn new(cluster: &'c Cluster) -> Evaluator<'c> {
        Evaluator {
            cluster,
            namespace_labels: cluster
                .namespaces
                .iter()
                .map(|n| (n.name.as_str(), &n.labels))
                .collect(),
            peers: std::cell::RefCell::new(HashMap::new()),
        }
    }

    /// What `pod`'s policies allow, both ways.
    pub fn pod(&self, pod: &Pod) -> PodPolicy {
        PodPolicy {
            ingress: self.direction(pod, Direction::Ingress),
            egress: self.direction(pod, Direction::Egress),
        }
    }

    pub fn direction(&self, pod: &Pod, direction: Direction) -> Verdict {
        let mut isolated = false;
        let mut grants = Vec::new();
        for (index, policy) in self.cluster.policies.iter().enumerate() {
            if policy.namespace != pod.namespace
                || !policy.applies(direction)
                || !policy.pod_selector.matches(&pod.labels)
            {
                continue;
            }
            isolated = true;
            for (r, rule) in policy.rules(direction).iter().enumerate() {
                let key = (index, direction == Direction::Ingress, r);
                let cached = self.peers.borrow().get(&key).cloned();
                let peers = match cached {
                    Some(peers) => peers,
                    None => {
                        let peers = self.rule_peers(policy, rule);
                        self.peers.borrow_mut().insert(key, peers.clone());
                        peers
                    }
                };
                self.rule(policy, rule, peers, pod, direction, &mut grants);
            }
        }
        if isolated {
            Verdict::Isolated(grants)
        } else {
            Verdict::Open
        }
    }

    fn labels_of_namespace(&self, name: &str) -> &Labels {
        static NONE: std::sync::OnceLock<Labels> = std::sync::OnceLock::new();
        self.namespace_labels
            .get(name)
            .copied()
            .unwrap_or_else(|| NONE.get_or_init(Labels::new))
    }

    /// Whether `peer` of `policy` selects `candidate` (a pod-selecting peer).
    fn selects(&self, policy: &Policy, peer: &Peer, candidate: &Pod) -> bool {
        match peer {
            Peer::Pods {
                pod_selector,
                namespace_selector,
            } => {
                let namespace = match namespace_selector {
                    Some(s) => s.matches(self.labels_of_namespace(&candidate.namespace)),
                    None => candidate.namespace == policy.namespace,
                };
                namespace
                    && pod_selector
                        .as_ref()
                        .is_none_or(|s| s.matches(&candidate.labels))
            }
            Peer::IpBlock { .. } => false,
        }
    }

    fn peer_set(&self, policy: &Policy, peer: &Peer) -> IpSet {
        match peer {
            Peer::IpBlock { cidr, except } => IpSet::block(cidr, except),
            Peer::Pods { .. } => IpSet::hosts(
                self.cluster
                    .pods
                    .iter()
                    .filter(|candidate| self.selects(policy, peer, candidate))
                    .flat_map(|candidate| candidate.ips.iter().copied()),
            ),
        }
    }

    /// The union of a rule's peers; None when it lists none (every peer).
    fn rule_peers(&self, policy: &Policy, rule: &Rule) -> Option<IpSet> {
        (!rule.peers.is_empty()).then(|| {
            rule.peers.iter().fold(IpSet::default(), |mut set, peer| {
                set.add(&self.peer_set(policy, peer));
                set
            })
        })
    }

    fn rule(
        &self,
        policy: &Policy,
        rule: &Rule,
        peers: Option<IpSet>,
        pod: &Pod,
        direction: Direction,
        grants: &mut Vec<Grant>,
    ) {
        let name = format!("{}/{}", policy.namespace, policy.name);
        if rule.ports.is_empty() {
            grants.push(Grant {
                peers,
                ports: None,
                policy: name,
            });
            return;
        }
        let mut numbered = Vec::new();
        let mut named_egress = Vec::new();
        for spec in &rule.ports {
            let protocol = spec.protocol;
            match &spec.port {
                None => numbered.push(PortRange {
                    protocol,
                    first: 0,
                    last: u16::MAX,
                }),
                Some(PortRef::Number(n)) => numbered.push(PortRange {
                    protocol,
                    first: *n,
                    last: spec.end_port.unwrap_or(*n).max(*n),
                }),
                Some(PortRef::Name(port_name)) => match direction {
                    Direction::Ingress => {
                        if let Some(n) = resolve(pod, port_name, protocol) {
                            numbered.push(PortRange {
                                protocol,
                                first: n,
                                last: n,
                            });
                        }
                    }
                    Direction::Egress => named_egress.push((port_name, protocol)),
                },
            }
        }
        if !numbered.is_empty() {
            grants.push(Grant {
                peers: peers.clone(),
                ports: Some(numbered),
                policy: name.clone(),
            });
        }
        // A named port resolves per destination pod: one grant for each pod that has it, limited
        // to the pod's addresses among the rule's peers.
        for (port_name, protocol) in named_egress {
            for candidate in &self.cluster.pods {
                let Some(n) = resolve(candidate, port_name, protocol) else {
                    continue;
                };
                let addresses = IpSet::hosts(
                    candidate
                        .ips
                        .iter()
                        .copied()
                        .filter(|ip| peers.as_ref().is_none_or(|set| set.contains(*ip))),
                );
                if !addresses.is_empty() {
                    grants.push(Grant {
                        peers: Some(addresses),
                        ports: Some(vec![PortRange {
                            protocol,
                            first: n,
                            last: n,
                        }]),
                        policy: name.clone(),
                    });
                }
            }
        }
    }
}

/// The number of `pod`'s container port called `name` for `protocol`.
fn resolve(pod: &Pod, name: &str, protocol: Protocol) -> Option<u16> {
    pod.ports
        .iter()
        .find(|p| p.name == name && p.protocol == protocol)
        .map(|p| p.port)
}

/// Labels from pairs, for the crate's tests.
#[cfg(test)]
pub(crate) fn test_labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_labels as labels;

    fn pod(namespace: &str, name: &str, app: &str, ip: &str) -> Pod {
        Pod {
            namespace: namespace.into(),
            name: name.into(),
            labels: labels(&[("app", app)]),
            ips: vec![ip.parse().unwrap()],
            ports: vec![ContainerPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The Kubernetes documentation's example policy, in spirit: db pods take TCP 6379 from frontend
    /// pods of their namespace, from any pod of namespaces labelled project=myproject, and from
    /// 172.17.0.0/16 except 172.17.1.0/24; they may reach 10.0.0.0/24 on TCP 5978.
    #[test]
    fn the_documentations_example() {
        let cluster = Cluster {
            namespaces: vec![
                Namespace {
                    name: "default".into(),
                    labels: Labels::new(),
                },
                Namespace {
                    name: "other".into(),
                    labels: labels(&[("project", "myproject")]),
                },
            ],
            pods: vec![
                pod("default", "db", "db", "10.1.0.1"),
                pod("default", "web", "frontend", "10.1.0.2"),
                pod("default", "batch", "batch", "10.1.0.3"),
                pod("other", "anything", "x", "10.1.0.4"),
            ],
            policies: vec![Policy {
                namespace: "default".into(),
                name: "test-network-policy".into(),
                pod_selector: Selector {
                    match_labels: labels(&[("app", "db")]),
                    ..Selector::default()
                },
                policy_types: Some(vec![Direction::Ingress, Direction::Egress]),
                ingress: vec![Rule {
                    peers: vec![
                        Peer::IpBlock {
                            cidr: "172.17.0.0/16".parse().unwrap(),
                            except: vec!["172.17.1.0/24".parse().unwrap()],
                        },
                        Peer::Pods {
                            pod_selector: None,
                            namespace_selector: Some(Selector {
                                match_labels: labels(&[("project", "myproject")]),
                                ..Selector::default()
                            }),
                        },
                        Peer::Pods {
                            pod_selector: Some(Selector {
                                match_labels: labels(&[("app", "frontend")]),
                                ..Selector::default()
                            }),
                            namespace_selector: None,
                        },
                    ],
                    ports: vec![PortSpec {
                        protocol: Protocol::Tcp,
                        port: Some(PortRef::Number(6379)),
                        end_port: None,
                    }],
                }],
                egress: vec![Rule {
                    peers: vec![Peer::IpBlock {
                        cidr: "10.0.0.0/24".parse().unwrap(),
                        except: vec![],
                    }],
                    ports: vec![PortSpec {
                        protocol: Protocol::Tcp,
                        port: Some(PortRef::Number(5978)),
                        end_port: None,
                    }],
                }],
            }],
        };
        let eval = Evaluator::new(&cluster);
        let db = eval.pod(&cluster.pods[0]);
        let tcp = Protocol::Tcp;
        assert!(db.ingress.allows(ip("10.1.0.2"), tcp, 6379), "frontend");
        assert!(!db.ingress.allows(ip("10.1.0.3"), tcp, 6379), "batch");
        assert!(db.ingress.allows(ip("10.1.0.4"), tcp, 6379), "myproject");
        assert!(db.ingress.allows(ip("172.17.2.9"), tcp, 6379));
        assert!(!db.ingress.allows(ip("172.17.1.9"), tcp, 6379), "except");
        assert!(!db.ingress.allows(ip("10.1.0.2"), tcp, 6380), "port");
        assert!(
            !db.ingress.allows(ip("10.1.0.2"), Protocol::Udp, 6379),
            "protocol"
        );
        assert!(db.egress.allows(ip("10.0.0.9"), tcp, 5978));
        assert!(!db.egress.allows(ip("10.0.1.9"), tcp, 5978));
        // Pods no policy selects are open both ways.
        let web = eval.pod(&cluster.pods[1]);
        assert_eq!((web.ingress, web.egress), (Verdict::Open, Verdict::Open));
    }

    #[test]
    fn named_ports_resolve_on_the_pod_for_ingress_and_on_the_peer_for_egress() {
        let mut server = pod("default", "server", "server", "10.1.0.1");
        server.ports[0].port = 9090;
        let client = pod("default", "client", "client", "10.1.0.2");
        let named = Rule {
            peers: vec![],
            ports: vec![PortSpec {
                port: Some(PortRef::Name("http".into())),
                ..PortSpec::default()
            }],
        };
        let cluster = Cluster {
            pods: vec![server, client],
            policies: vec![Policy {
                namespace: "default".into(),
                name: "named".into(),
                pod_selector: Selector::default(),
                policy_types: Some(vec![Direction::Ingress, Direction::Egress]),
                ingress: vec![named.clone()],
                egress: vec![named],
            }],
            ..Cluster::default()
        };
        let eval = Evaluator::new(&cluster);
        let server = eval.pod(&cluster.pods[0]);
        let client = eval.pod(&cluster.pods[1]);
        // Ingress: the receiving pod's own number.
        assert!(server.ingress.allows(ip("10.9.9.9"), Protocol::Tcp, 9090));
        assert!(!server.ingress.allows(ip("10.9.9.9"), Protocol::Tcp, 8080));
        assert!(client.ingress.allows(ip("10.9.9.9"), Protocol::Tcp, 8080));
        // Egress: the destination's number; an address no pod has matches no named port.
        assert!(client.egress.allows(ip("10.1.0.1"), Protocol::Tcp, 9090));
        assert!(!client.egress.allows(ip("10.1.0.1"), Protocol::Tcp, 8080));
        assert!(!client.egress.allows(ip("10.9.9.9"), Protocol::Tcp, 9090));
    }

    #[test]
    fn an_empty_rule_list_denies_and_an_empty_rule_allows_everything() {
        let only = |ingress: Vec<Rule>| Cluster {
            pods: vec![pod("default", "a", "a", "10.1.0.1")],
            policies: vec![Policy {
                namespace: "default".into(),
                name: "p".into(),
                ingress,
                ..Policy::default()
            }],
            ..Cluster::default()
        };
        let deny = only(vec![]);
        let verdict = Evaluator::new(&deny).pod(&deny.pods[0]);
        assert_eq!(verdict.ingress, Verdict::Isolated(vec![]));
        assert!(!verdict.ingress.allows(ip("10.1.0.9"), Protocol::Tcp, 80));
        assert_eq!(
            verdict.egress,
            Verdict::Open,
            "no egress rules: not isolated"
        );
        let allow = only(vec![Rule::default()]);
        let verdict = Evaluator::new(&allow).pod(&allow.pods[0]);
        assert!(verdict.ingress.allows(ip("192.0.2.1"), Protocol::Sctp, 1));
    }
}
