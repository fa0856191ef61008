//! EKS's PolicyEndpoint objects (`networking.k8s.aws/v1alpha1`): the managed network policy
//! controller resolves each NetworkPolicy into the pods it selects (`podSelectorEndpoints`) and
//! its rules' peers as CIDRs with ports. Here they become the same verdicts as the evaluator's,
//! so that one datapath enforces either. A large policy may be split over several objects; a pod's
//! verdict is the union over every object that lists it.

use crate::model::{Cidr, Direction, Protocol};
use crate::{Grant, IpSet, PodPolicy, PortRange, Verdict};
use std::net::IpAddr;

/// One rule: these peers on these ports (none listed: every port).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointRule {
    pub cidr: Option<Cidr>,
    pub except: Vec<Cidr>,
    /// (protocol, first, last); a port of 0 means every port of the protocol.
    pub ports: Vec<(Protocol, u16, u16)>,
}

/// One PolicyEndpoint, as the controller writes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyEndpoint {
    /// The NetworkPolicy it resolves, as `namespace/name`.
    pub policy: String,
    /// `podIsolation`: the directions the policy isolates.
    pub isolation: Vec<Direction>,
    /// The selected pods: (namespace, name, address).
    pub pods: Vec<(String, String, IpAddr)>,
    pub ingress: Vec<EndpointRule>,
    pub egress: Vec<EndpointRule>,
}

fn grant(policy: &str, rule: &EndpointRule) -> Grant {
    Grant {
        peers: rule.cidr.as_ref().map(|c| IpSet::block(c, &rule.except)),
        ports: (!rule.ports.is_empty()).then(|| {
            rule.ports
                .iter()
                .map(|&(protocol, first, last)| PortRange {
                    protocol,
                    first: if first == 0 { 1 } else { first },
                    last: if first == 0 {
                        u16::MAX
                    } else {
                        last.max(first)
                    },
                })
                .collect()
        }),
        policy: policy.to_string(),
    }
}

/// Whether `pe` lists the pod `namespace/name` at `ip` (by name, or by address for an object
/// written before a rename the controller has not caught up with).
pub fn lists(pe: &PolicyEndpoint, namespace: &str, name: &str, ip: IpAddr) -> bool {
    pe.pods
        .iter()
        .any(|(n, p, a)| (n == namespace && p == name) || *a == ip)
}

/// The verdicts of the pod `namespace/name` at `ip` under `endpoints`: isolated in a direction when
/// an object listing it isolates that direction (or has rules for it), with the union of those
/// objects' rules; open otherwise.
pub fn pod(endpoints: &[PolicyEndpoint], namespace: &str, name: &str, ip: IpAddr) -> PodPolicy {
    let mut ingress: Option<Vec<Grant>> = None;
    let mut egress: Option<Vec<Grant>> = None;
    for pe in endpoints {
        if !lists(pe, namespace, name, ip) {
            continue;
        }
        for (direction, rules, verdict) in [
            (Direction::Ingress, &pe.ingress, &mut ingress),
            (Direction::Egress, &pe.egress, &mut egress),
        ] {
            if pe.isolation.contains(&direction) || !rules.is_empty() {
                verdict
                    .get_or_insert_with(Vec::new)
                    .extend(rules.iter().map(|r| grant(&pe.policy, r)));
            }
        }
    }
    let verdict = |grants: Option<Vec<Grant>>| grants.map_or(Verdict::Open, Verdict::Isolated);
    PodPolicy {
        ingress: verdict(ingress),
        egress: verdict(egress),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn listed_pods_are_isolated_with_the_union_of_their_objects_rules() {
        let db = ("prod".to_string(), "db".to_string(), ip("10.0.1.5"));
        let endpoints = [
            PolicyEndpoint {
                policy: "prod/db".into(),
                isolation: vec![Direction::Ingress],
                pods: vec![db.clone()],
                ingress: vec![EndpointRule {
                    cidr: Some("10.0.2.0/24".parse().unwrap()),
                    except: vec!["10.0.2.128/25".parse().unwrap()],
                    ports: vec![(Protocol::Tcp, 5432, 5432)],
                }],
                egress: vec![],
            },
            // The same policy's second object (the controller splits large ones).
            PolicyEndpoint {
                policy: "prod/db".into(),
                isolation: vec![Direction::Ingress],
                pods: vec![db.clone()],
                ingress: vec![EndpointRule {
                    cidr: Some("10.0.3.7/32".parse().unwrap()),
                    except: vec![],
                    ports: vec![(Protocol::Udp, 0, 0)],
                }],
                egress: vec![],
            },
            PolicyEndpoint {
                policy: "prod/other".into(),
                isolation: vec![Direction::Egress],
                pods: vec![("prod".into(), "web".into(), ip("10.0.1.6"))],
                ..PolicyEndpoint::default()
            },
        ];
        let v = pod(&endpoints, "prod", "db", ip("10.0.1.5"));
        assert_eq!(v.egress, Verdict::Open);
        assert!(v.ingress.allows(ip("10.0.2.9"), Protocol::Tcp, 5432));
        assert!(
            !v.ingress.allows(ip("10.0.2.200"), Protocol::Tcp, 5432),
            "except"
        );
        assert!(!v.ingress.allows(ip("10.0.2.9"), Protocol::Tcp, 80));
        assert!(
            v.ingress.allows(ip("10.0.3.7"), Protocol::Udp, 53),
            "every UDP port"
        );
        let web = pod(&endpoints, "prod", "web", ip("10.0.1.6"));
        assert_eq!(
            (web.ingress, web.egress),
            (Verdict::Open, Verdict::Isolated(vec![]))
        );
        let unlisted = pod(&endpoints, "dev", "x", ip("10.0.9.9"));
        assert_eq!(
            (unlisted.ingress, unlisted.egress),
            (Verdict::Open, Verdict::Open)
        );
    }
}
