//! The evaluator against a naive one that judges a single packet by walking the policies as the
//! API documentation words them, sharing no code with it: random namespaces, pods (both families,
//! named ports) and policies (selectors with every operator, empty and absent parts, ipBlocks with
//! excepts, numbered, ranged and named ports of every protocol), and packets to and from pod and
//! outside addresses.

use netpol::*;
use proptest::prelude::*;
use std::net::IpAddr;

fn naive_selects(selector: &Selector, labels: &Labels) -> bool {
    for (k, v) in &selector.match_labels {
        if labels.get(k) != Some(v) {
            return false;
        }
    }
    for r in &selector.match_expressions {
        let has = labels.get(&r.key);
        let ok = match r.operator {
            Operator::In => matches!(has, Some(v) if r.values.contains(v)),
            Operator::NotIn => !matches!(has, Some(v) if r.values.contains(v)),
            Operator::Exists => has.is_some(),
            Operator::DoesNotExist => has.is_none(),
        };
        if !ok {
            return false;
        }
    }
    true
}

fn naive_in(ip: IpAddr, cidr: &Cidr) -> bool {
    match (ip, cidr.addr) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            cidr.len == 0 || (u32::from(a) ^ u32::from(b)) >> (32 - u32::from(cidr.len)) == 0
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            cidr.len == 0 || (u128::from(a) ^ u128::from(b)) >> (128 - u32::from(cidr.len)) == 0
        }
        _ => false,
    }
}

fn namespace_labels(cluster: &Cluster, name: &str) -> Labels {
    cluster
        .namespaces
        .iter()
        .find(|n| n.name == name)
        .map(|n| n.labels.clone())
        .unwrap_or_default()
}

/// One packet between `target` and `peer`, in `direction` as seen from `target`; `port` is the
/// destination port (the target's for ingress, the peer's for egress).
fn naive_allows(
    cluster: &Cluster,
    target: &Pod,
    direction: Direction,
    peer: IpAddr,
    protocol: Protocol,
    port: u16,
) -> bool {
    let mut isolated = false;
    for policy in &cluster.policies {
        let types_include = match &policy.policy_types {
            Some(types) => types.contains(&direction),
            None => direction == Direction::Ingress || !policy.egress.is_empty(),
        };
        if policy.namespace != target.namespace
            || !types_include
            || !naive_selects(&policy.pod_selector, &target.labels)
        {
            continue;
        }
        isolated = true;
        let rules = match direction {
            Direction::Ingress => &policy.ingress,
            Direction::Egress => &policy.egress,
        };
        for rule in rules {
            let peer_ok = rule.peers.is_empty()
                || rule.peers.iter().any(|p| match p {
                    Peer::IpBlock { cidr, except } => {
                        naive_in(peer, cidr) && !except.iter().any(|e| naive_in(peer, e))
                    }
                    Peer::Pods {
                        pod_selector,
                        namespace_selector,
                    } => cluster.pods.iter().any(|q| {
                        q.ips.contains(&peer)
                            && match namespace_selector {
                                Some(s) => {
                                    naive_selects(s, &namespace_labels(cluster, &q.namespace))
                                }
                                None => q.namespace == policy.namespace,
                            }
                            && pod_selector
                                .as_ref()
                                .is_none_or(|s| naive_selects(s, &q.labels))
                    }),
                });
            let port_ok = rule.ports.is_empty()
                || rule.ports.iter().any(|spec| {
                    spec.protocol == protocol
                        && match &spec.port {
                            None => true,
                            Some(PortRef::Number(n)) => {
                                port >= *n && port <= (*n).max(spec.end_port.unwrap_or(*n))
                            }
                            Some(PortRef::Name(name)) => {
                                let owner = match direction {
                                    Direction::Ingress => Some(target),
                                    Direction::Egress => {
                                        cluster.pods.iter().find(|q| q.ips.contains(&peer))
                                    }
                                };
                                owner
                                    .and_then(|o| {
                                        o.ports
                                            .iter()
                                            .find(|c| &c.name == name && c.protocol == protocol)
                                    })
                                    .is_some_and(|c| c.port == port)
                            }
                        }
                });
            if peer_ok && port_ok {
                return true;
            }
        }
    }
    !isolated
}

const KEYS: &[&str] = &["app", "tier"];
const VALUES: &[&str] = &["a", "b", "c"];
const PORTS: &[u16] = &[53, 80, 81, 443, 8080, 9090, 9091];
const PORT_NAMES: &[&str] = &["http", "dns", "metrics", "nope"];
const OUTSIDE: &[&str] = &[
    "10.0.1.200",
    "192.168.3.3",
    "8.8.8.8",
    "2001:db8::99",
    "2001:db8:1::5",
];
const CIDRS: &[&str] = &[
    "10.0.0.0/16",
    "10.0.1.0/24",
    "10.0.0.0/30",
    "10.0.2.0/31",
    "0.0.0.0/0",
    "192.168.0.0/16",
    "2001:db8::/64",
    "2001:db8::/126",
    "::/0",
];

fn labels() -> impl Strategy<Value = Labels> {
    prop::collection::btree_map(
        prop::sample::select(KEYS).prop_map(String::from),
        prop::sample::select(VALUES).prop_map(String::from),
        0..=2,
    )
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![
        4 => Just(Protocol::Tcp),
        2 => Just(Protocol::Udp),
        1 => Just(Protocol::Sctp)
    ]
}

fn selector() -> impl Strategy<Value = Selector> {
    let requirement = (
        prop::sample::select(KEYS),
        prop_oneof![
            Just(Operator::In),
            Just(Operator::NotIn),
            Just(Operator::Exists),
            Just(Operator::DoesNotExist)
        ],
        prop::collection::vec(prop::sample::select(VALUES), 1..=2),
    )
        .prop_map(|(key, operator, values)| Requirement {
            key: key.into(),
            operator,
            values: match operator {
                Operator::In | Operator::NotIn => values.into_iter().map(String::from).collect(),
                Operator::Exists | Operator::DoesNotExist => Vec::new(),
            },
        });
    (labels(), prop::collection::vec(requirement, 0..=1)).prop_map(
        |(match_labels, match_expressions)| Selector {
            match_labels,
            match_expressions,
        },
    )
}

fn cidr() -> impl Strategy<Value = Cidr> {
    prop::sample::select(CIDRS).prop_map(|c| c.parse().unwrap())
}

fn peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        3 => (prop::option::of(selector()), prop::option::of(selector())).prop_map(
            |(pod_selector, namespace_selector)| Peer::Pods {
                pod_selector,
                namespace_selector,
            }
        ),
        2 => (cidr(), prop::collection::vec(cidr(), 0..=2))
            .prop_map(|(cidr, except)| Peer::IpBlock { cidr, except }),
    ]
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    let port = prop_oneof![
        1 => Just(None),
        3 => prop::sample::select(PORTS).prop_map(|p| Some(PortRef::Number(p))),
        2 => prop::sample::select(PORT_NAMES).prop_map(|n| Some(PortRef::Name(n.into()))),
    ];
    (protocol(), port, prop::option::of(0u16..20)).prop_map(|(protocol, port, span)| {
        let end_port = match (&port, span) {
            (Some(PortRef::Number(n)), Some(span)) => Some(n.saturating_add(span)),
            _ => None,
        };
        PortSpec {
            protocol,
            port,
            end_port,
        }
    })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(peer(), 0..=2),
        prop::collection::vec(port_spec(), 0..=2),
    )
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

fn policy() -> impl Strategy<Value = Policy> {
    let types = prop_oneof![
        2 => Just(None),
        1 => Just(Some(vec![Direction::Ingress])),
        1 => Just(Some(vec![Direction::Egress])),
        1 => Just(Some(vec![Direction::Ingress, Direction::Egress])),
        1 => Just(Some(vec![])),
    ];
    (
        0usize..3,
        selector(),
        types,
        prop::collection::vec(rule(), 0..=2),
        prop::collection::vec(rule(), 0..=2),
    )
        .prop_map(|(ns, pod_selector, policy_types, ingress, egress)| Policy {
            namespace: format!("ns{ns}"),
            name: "p".into(),
            pod_selector,
            policy_types,
            ingress,
            egress,
        })
}

fn pod() -> impl Strategy<Value = (usize, Labels, Vec<ContainerPort>, bool)> {
    let port = (
        prop::sample::select(&["http", "dns", "metrics"][..]),
        prop::sample::select(PORTS),
        protocol(),
    )
        .prop_map(|(name, port, protocol)| ContainerPort {
            name: name.into(),
            port,
            protocol,
        });
    (
        0usize..3,
        labels(),
        prop::collection::vec(port, 0..=2),
        any::<bool>(),
    )
}

fn cluster() -> impl Strategy<Value = Cluster> {
    (
        prop::collection::vec(labels(), 3),
        prop::collection::vec(pod(), 1..=6),
        prop::collection::vec(policy(), 0..=4),
    )
        .prop_map(|(namespace_labels, pods, policies)| Cluster {
            // The third namespace has no Namespace object: its labels are none.
            namespaces: namespace_labels
                .into_iter()
                .take(2)
                .enumerate()
                .map(|(i, labels)| Namespace {
                    name: format!("ns{i}"),
                    labels,
                })
                .collect(),
            pods: pods
                .into_iter()
                .enumerate()
                .map(|(i, (ns, labels, ports, dual))| {
                    let mut ips = vec![format!("10.0.{ns}.{}", i + 1).parse().unwrap()];
                    if dual {
                        ips.push(format!("2001:db8::{}", i + 1).parse().unwrap());
                    }
                    Pod {
                        namespace: format!("ns{ns}"),
                        name: format!("pod{i}"),
                        labels,
                        ips,
                        ports,
                    }
                })
                .collect(),
            policies,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_evaluator_agrees_with_a_packet_at_a_time(
        cluster in cluster(),
        packets in prop::collection::vec((any::<prop::sample::Index>(), protocol(), prop::sample::select(PORTS)), 24),
    ) {
        let evaluator = Evaluator::new(&cluster);
        let mut peers: Vec<IpAddr> = cluster.pods.iter().flat_map(|p| p.ips.clone()).collect();
        peers.extend(OUTSIDE.iter().map(|a| a.parse::<IpAddr>().unwrap()));
        for target in &cluster.pods {
            let verdicts = evaluator.pod(target);
            for (direction, verdict) in [
                (Direction::Ingress, &verdicts.ingress),
                (Direction::Egress, &verdicts.egress),
            ] {
                // Random packets, and every container port of the target (ingress) or of each pod
                // (egress) from or to every address: where named ports resolve.
                let mut tried: Vec<(IpAddr, Protocol, u16)> = packets
                    .iter()
                    .map(|(pick, protocol, port)| (*pick.get(&peers), *protocol, *port))
                    .collect();
                for owner in &cluster.pods {
                    if direction == Direction::Ingress && owner.name != target.name {
                        continue;
                    }
                    for c in &owner.ports {
                        let addresses: Vec<IpAddr> = match direction {
                            Direction::Ingress => peers.clone(),
                            Direction::Egress => owner.ips.clone(),
                        };
                        tried.extend(addresses.into_iter().map(|a| (a, c.protocol, c.port)));
                    }
                }
                for (peer, protocol, port) in &tried {
                    let (peer, protocol, port) = (*peer, protocol, port);
                    let expected = naive_allows(&cluster, target, direction, peer, *protocol, *port);
                    prop_assert_eq!(
                        verdict.allows(peer, *protocol, *port),
                        expected,
                        "{:?} {} {:?} peer {} {:?}/{}",
                        direction, target.name, verdict, peer, protocol, port
                    );
                }
            }
        }
    }
}
