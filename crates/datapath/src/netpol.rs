//! NetworkPolicy enforcement as one nftables table, `inet vpc-cni-netpol`, rendered whole from the
//! evaluator's verdicts and replaced in one transaction, as the SNAT table is.
//!
//! In the forward hook, after the kernel's conntrack has accepted the packets of established flows
//! (so return traffic of an allowed flow is never judged again, and no conntrack of our own exists):
//! the packet's input interface selects, through a verdict map, the egress chain of the pod it
//! comes from, and its output interface the ingress chain of the pod it goes to. A chain returns
//! when one of its rules matches and drops otherwise, so that a packet between two isolated pods
//! passes the sender's egress and the receiver's ingress both. Each rule is one grant, one lookup
//! in an interval set of (address, protocol, port), address, or (protocol, port), so CIDRs with
//! holes and port ranges are one lookup. Pods no policy isolates have no chain and no map entry. Egress to the node itself goes through the input hook the same way;
//! traffic from the node to a pod (kubelet probes) is never judged, as the API requires.

use crate::Result;
use netpol::{Grant, Protocol, Verdict};
use std::collections::BTreeMap;
use std::fmt::Write;

pub const TABLE: &str = "vpc-cni-netpol";

/// One local pod: its host veth and what its policies allow each way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRules {
    pub host_veth: String,
    /// The pod's addresses: their flows are forgotten when its rules change.
    pub addresses: Vec<std::net::IpAddr>,
    pub ingress: Verdict,
    pub egress: Verdict,
}

fn protocol(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// `first-last`, or `first` alone: nftables' range, and how `vpcctl netpol` shows one.
pub fn range<T: std::fmt::Display + PartialEq>(first: T, last: T) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

/// A grant's ports as disjoint `protocol . port` elements: ranges of one protocol that overlap or
/// touch are merged (an interval set refuses overlapping elements).
fn port_elements(ranges: &[netpol::PortRange]) -> Vec<String> {
    let mut sorted: Vec<(Protocol, u16, u16)> = ranges
        .iter()
        .map(|r| (r.protocol, r.first, r.last))
        .collect();
    sorted.sort();
    let mut merged: Vec<(Protocol, u16, u16)> = Vec::new();
    for (protocol, first, last) in sorted {
        match merged.last_mut() {
            Some((p, _, end)) if *p == protocol && u32::from(first) <= u32::from(*end) + 1 => {
                *end = (*end).max(last)
            }
            _ => merged.push((protocol, first, last)),
        }
    }
    merged
        .into_iter()
        .map(|(p, first, last)| format!("{} . {}", protocol(p), range(first, last)))
        .collect()
}

/// One pod's rules for one direction: `addr` is `saddr` for ingress (the peer sends) and `daddr`
/// for egress (the peer receives); the port is always the destination's. One rule per grant, each
/// one lookup in an anonymous interval set whose elements are disjoint (the grant's peers are
/// disjoint ranges, its ports are merged); grants may overlap each other, which sets may not. The
/// last rule drops.
fn chain_rules(grants: &[Grant], addr: &str) -> Vec<String> {
    fn lookup(rules: &mut Vec<String>, matched: &str, elements: Vec<String>) {
        if !elements.is_empty() {
            rules.push(format!("{matched} {{ {} }} return", elements.join(", ")));
        }
    }
    let mut rules = Vec::new();
    for grant in &merged(grants) {
        let ports = grant.ports.as_deref().map(port_elements);
        match (&grant.peers, ports) {
            (None, None) => rules.push("return".into()),
            (None, Some(ports)) => lookup(&mut rules, "meta l4proto . th dport", ports),
            (Some(peers), None) => {
                let v4 = peers.v4_ranges().map(|(s, e)| range(s, e)).collect();
                lookup(&mut rules, &format!("ip {addr}"), v4);
                let v6 = peers.v6_ranges().map(|(s, e)| range(s, e)).collect();
                lookup(&mut rules, &format!("ip6 {addr}"), v6);
            }
            (Some(peers), Some(ports)) => {
                let product = |a: String| ports.iter().map(move |p| format!("{a} . {p}"));
                let v4 = peers
                    .v4_ranges()
                    .flat_map(|(s, e)| product(range(s, e)))
                    .collect();
                lookup(
                    &mut rules,
                    &format!("ip {addr} . meta l4proto . th dport"),
                    v4,
                );
                let v6 = peers
                    .v6_ranges()
                    .flat_map(|(s, e)| product(range(s, e)))
                    .collect();
                lookup(
                    &mut rules,
                    &format!("ip6 {addr} . meta l4proto . th dport"),
                    v6,
                );
            }
        }
    }
    rules.push("drop".into());
    rules
}

/// Grants on the same ports as one: their peers united (an `IpSet` union stays disjoint, so the
/// set still takes it). A pod that 500 policies each open to one address on one port gets one
/// lookup instead of 500 rules that every new connection would walk.
fn merged(grants: &[Grant]) -> Vec<Grant> {
    let mut out: Vec<Grant> = Vec::new();
    for grant in grants {
        match out.iter_mut().find(|g| g.ports == grant.ports) {
            Some(same) => {
                same.peers = match (same.peers.take(), &grant.peers) {
                    (Some(mut mine), Some(theirs)) => {
                        mine.add(theirs);
                        Some(mine)
                    }
                    _ => None,
                }
            }
            None => out.push(grant.clone()),
        }
    }
    out
}

/// The isolated directions of each pod: (map, host veth) → (chain, its rules).
fn chains(pods: &[PodRules]) -> BTreeMap<(&'static str, &str), (String, Vec<String>)> {
    let mut out = BTreeMap::new();
    for pod in pods {
        for (map, prefix, addr, verdict) in [
            ("ingress", "in", "saddr", &pod.ingress),
            ("egress", "eg", "daddr", &pod.egress),
        ] {
            if let Verdict::Isolated(grants) = verdict {
                let chain = format!("{prefix}-{}", pod.host_veth);
                let mut rules = chain_rules(grants, addr);
                // What the chain drops is counted by a named counter of the same name, which
                // outlives the chain's rules being replaced (`dropped`).
                if let Some(last) = rules.last_mut() {
                    *last = format!("counter name \"{chain}\" drop");
                }
                out.insert((map, pod.host_veth.as_str()), (chain, rules));
            }
        }
    }
    out
}

/// The whole table as nftables text.
pub fn ruleset(pods: &[PodRules]) -> String {
    let mut out = format!("table inet {TABLE} {{\n");
    let mut elements: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((map, veth), (chain, rules)) in chains(pods) {
        let _ = writeln!(out, "  counter {chain} {{\n  }}");
        let _ = writeln!(out, "  chain {chain} {{");
        for rule in rules {
            let _ = writeln!(out, "    {rule}");
        }
        let _ = writeln!(out, "  }}");
        elements
            .entry(map)
            .or_default()
            .push(format!("\"{veth}\" : jump {chain}"));
    }
    for map in ["ingress", "egress"] {
        let _ = writeln!(out, "  map {map} {{\n    type ifname : verdict");
        if let Some(elements) = elements.get(map) {
            let _ = writeln!(out, "    elements = {{ {} }}", elements.join(", "));
        }
        let _ = writeln!(out, "  }}");
    }
    out.push_str(
        "  chain forward {\n    type filter hook forward priority filter; policy accept;\n    \
         ct state established,related accept\n    iifname vmap @egress\n    oifname vmap @ingress\n  }\n",
    );
    out.push_str(
        "  chain input {\n    type filter hook input priority filter; policy accept;\n    \
         ct state established,related accept\n    iifname vmap @egress\n  }\n",
    );
    out.push_str("}\n");
    out
}

/// The transaction that turns the table of `before` into that of `now`, touching only the chains
/// and map elements that differ: a change to a few pods' policies costs a few rules, where the
/// whole table of a busy node is a large transaction.
pub fn update_script(before: &[PodRules], now: &[PodRules]) -> String {
    let (old, new) = (chains(before), chains(now));
    let mut out = String::new();
    for ((map, veth), (chain, _)) in &old {
        if !new.contains_key(&(*map, *veth)) {
            let _ = writeln!(out, "delete element inet {TABLE} {map} {{ \"{veth}\" }}");
            let _ = writeln!(out, "flush chain inet {TABLE} {chain}");
            let _ = writeln!(out, "delete chain inet {TABLE} {chain}");
            let _ = writeln!(out, "delete counter inet {TABLE} {chain}");
        }
    }
    for ((map, veth), (chain, rules)) in &new {
        match old.get(&(*map, *veth)) {
            Some((_, before)) if before == rules => continue,
            Some(_) => {
                let _ = writeln!(out, "flush chain inet {TABLE} {chain}");
            }
            None => {
                let _ = writeln!(out, "add counter inet {TABLE} {chain}");
                let _ = writeln!(out, "add chain inet {TABLE} {chain}");
            }
        }
        for rule in rules {
            let _ = writeln!(out, "add rule inet {TABLE} {chain} {rule}");
        }
        if !old.contains_key(&(*map, *veth)) {
            let _ = writeln!(
                out,
                "add element inet {TABLE} {map} {{ \"{veth}\" : jump {chain} }}"
            );
        }
    }
    out
}

/// Changes the table from `before` (as applied) to `now` in one transaction; nothing when they
/// render the same.
pub fn update(before: &[PodRules], now: &[PodRules]) -> Result<()> {
    let script = update_script(before, now);
    if script.is_empty() {
        return Ok(());
    }
    crate::snat::nft(&script)
}

/// The addresses of the pods whose rules in `now` may deny a flow that `before` allowed: newly
/// isolated, or narrowed. A pod whose rules only grew (a new peer pod, a port added) keeps its
/// flows, which spares a node the conntrack runs of every pod a new peer touches.
pub fn changed_addresses(before: &[PodRules], now: &[PodRules]) -> Vec<std::net::IpAddr> {
    now.iter()
        .filter(|pod| {
            // A pod absent before was open; one whose rules only grew loses no flow.
            let was = before.iter().find(|b| b.host_veth == pod.host_veth);
            !was.is_some_and(|b| {
                b.addresses == pod.addresses
                    && pod.ingress.covers(&b.ingress)
                    && pod.egress.covers(&b.egress)
            })
        })
        .flat_map(|pod| pod.addresses.iter().copied())
        .collect()
}

/// Replaces the table in one transaction.
pub fn apply(pods: &[PodRules]) -> Result<()> {
    crate::snat::nft(&format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\n{}",
        ruleset(pods)
    ))
}

/// Forgets the kernel's conntrack entries of flows to and from `addresses` (both directions, and
/// behind a Service's DNAT), so that the next packet of each flow is judged by the rules in force:
/// a flow a policy change denies is cut, an allowed one is picked up again (TCP's loose tracking).
///
/// One listing per family, then the deletes only for addresses that have flows, in one run of
/// the `conntrack` tool: each of its deletes walks the whole table (about 4 ms here, even empty),
/// so deleting by every address and direction blindly made a change that narrows 20 pods' rules
/// wait 200 ms for nothing.
pub fn forget_flows(addresses: &[std::net::IpAddr]) -> Result<()> {
    if addresses.is_empty() {
        return Ok(());
    }
    let wanted: std::collections::HashSet<String> =
        addresses.iter().map(|ip| ip.to_string()).collect();
    let mut families = Vec::new();
    if addresses.iter().any(|ip| ip.is_ipv4()) {
        families.push("ipv4");
    }
    if addresses.iter().any(|ip| ip.is_ipv6()) {
        families.push("ipv6");
    }
    let mut deletes = std::collections::BTreeSet::new();
    for family in families {
        let listing = conntrack(&["-L", "-f", family], None)?;
        deletes.extend(flows_of(&listing, &wanted));
    }
    if deletes.is_empty() {
        return Ok(());
    }
    let script: String = deletes
        .iter()
        .map(|(selector, ip)| format!("-D {selector} {ip}\n"))
        .collect();
    conntrack(&["-R", "-"], Some(&script)).map(|_| ())
}

/// The (selector, address) deletes that `conntrack -L` output shows flows for: an entry's original
/// source and destination, and its reply source (a Service's backend behind DNAT).
fn flows_of(
    listing: &str,
    wanted: &std::collections::HashSet<String>,
) -> std::collections::BTreeSet<(&'static str, String)> {
    let mut deletes = std::collections::BTreeSet::new();
    for line in listing.lines() {
        let field = |key: &str, nth: usize| {
            line.split_whitespace()
                .filter_map(|f| f.strip_prefix(key))
                .nth(nth)
                .map(str::to_string)
        };
        for (selector, key, nth) in [
            ("--orig-src", "src=", 0),
            ("--orig-dst", "dst=", 0),
            ("--reply-src", "src=", 1),
        ] {
            if let Some(ip) = field(key, nth).filter(|ip| wanted.contains(ip)) {
                deletes.insert((selector, ip));
            }
        }
    }
    deletes
}

/// Runs the `conntrack` tool (with `input` on its stdin), returning its output.
fn conntrack(args: &[&str], input: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = std::process::Command::new("conntrack")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| crate::Error::Io {
            what: "running conntrack (is the conntrack package installed?)".into(),
            source: e,
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| crate::Error::Io {
                what: "writing to conntrack".into(),
                source: e,
            })?;
    }
    let out = child.wait_with_output().map_err(|e| crate::Error::Io {
        what: "waiting for conntrack".into(),
        source: e,
    })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && !stderr.contains("0 flow entries") {
        return Err(crate::Error::Invalid(format!(
            "conntrack {}: {}",
            args.join(" "),
            stderr.trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The packets each isolated pod's chains dropped, by chain (`in-<host veth>` for what the pod
/// was sent, `eg-<host veth>` for what it sent), from the table's named counters. A chain's count
/// lives as long as the pod is isolated that way; replacing the whole table (a take-over, a refused
/// update) starts them again.
pub fn dropped() -> Result<BTreeMap<String, u64>> {
    let out = std::process::Command::new("nft")
        .args(["list", "counters", "table", "inet", TABLE])
        .output()
        .map_err(|e| crate::Error::Io {
            what: "running nft (is the nftables package installed?)".into(),
            source: e,
        })?;
    if !out.status.success() {
        // No table yet: nothing isolated, nothing dropped.
        return Ok(BTreeMap::new());
    }
    Ok(counts(&String::from_utf8_lossy(&out.stdout)))
}

/// `nft list counters` text as chain → packets.
fn counts(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("counter ") {
            current = rest.split_whitespace().next().map(str::to_string);
        } else if let (Some(chain), Some(rest)) = (&current, line.strip_prefix("packets ")) {
            if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok()) {
                out.insert(chain.clone(), n);
            }
            current = None;
        }
    }
    out
}

/// Removes the table: no pod is isolated any more.
pub fn remove() -> Result<()> {
    crate::snat::nft(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use netpol::{IpSet, PortRange};

    fn grant(peers: Option<&str>, ports: Option<Vec<PortRange>>) -> Grant {
        Grant {
            peers: peers
                .map(|c| IpSet::block(&c.parse().unwrap(), &["10.0.0.128/25".parse().unwrap()])),
            ports,
            policy: "default/p".into(),
        }
    }

    #[test]
    fn flows_are_found_by_either_end_and_behind_dnat() {
        let listing = "tcp      6 431999 ESTABLISHED src=10.0.1.1 dst=10.0.1.2 sport=40000 dport=80 src=10.0.1.2 dst=10.0.1.1 sport=80 dport=40000 [ASSURED] mark=0 use=1\n\
             udp      17 29 src=10.0.9.9 dst=172.20.0.10 sport=5000 dport=53 src=10.0.1.3 dst=10.0.9.9 sport=53 dport=5000 mark=0 use=1\n\
             tcp      6 100 ESTABLISHED src=10.0.7.7 dst=10.0.8.8 sport=1 dport=2 src=10.0.8.8 dst=10.0.7.7 sport=2 dport=1 mark=0 use=1\n";
        let wanted = ["10.0.1.1", "10.0.1.3"]
            .map(String::from)
            .into_iter()
            .collect();
        let found: Vec<(&str, String)> = flows_of(listing, &wanted).into_iter().collect();
        assert_eq!(
            found,
            vec![
                ("--orig-src", "10.0.1.1".to_string()),
                ("--reply-src", "10.0.1.3".to_string()),
            ]
        );
    }

    #[test]
    fn counters_are_read_by_chain() {
        let text = "table inet vpc-cni-netpol {\n\tcounter eg-enia {\n\t\tpackets 3 bytes 180\n\t}\n\tcounter in-enia {\n\t\tpackets 0 bytes 0\n\t}\n}\n";
        let counts = counts(text);
        assert_eq!(counts["eg-enia"], 3);
        assert_eq!(counts["in-enia"], 0);
    }

    #[test]
    fn grants_on_the_same_ports_share_one_lookup() {
        let tcp80 = PortRange {
            protocol: Protocol::Tcp,
            first: 80,
            last: 80,
        };
        let rules = chain_rules(
            &[
                grant(Some("10.0.1.0/26"), Some(vec![tcp80])),
                grant(Some("10.0.2.0/26"), Some(vec![tcp80])),
                grant(Some("10.0.1.0/24"), None),
            ],
            "saddr",
        );
        assert_eq!(rules.len(), 3, "{rules:?}");
        assert!(
            rules[0].contains("10.0.1.0-10.0.1.63 . tcp . 80"),
            "{rules:?}"
        );
        assert!(
            rules[0].contains("10.0.2.0-10.0.2.63 . tcp . 80"),
            "{rules:?}"
        );
        assert_eq!(rules[2], "drop");
        // Any peer on a port absorbs the peers of another grant on it.
        let open = chain_rules(
            &[
                grant(Some("10.0.1.0/26"), Some(vec![tcp80])),
                grant(None, Some(vec![tcp80])),
            ],
            "saddr",
        );
        assert_eq!(open[0], "meta l4proto . th dport { tcp . 80 } return");
    }

    #[test]
    fn only_newly_isolated_or_narrowed_pods_lose_their_flows() {
        let tcp = |first, last| PortRange {
            protocol: Protocol::Tcp,
            first,
            last,
        };
        let pod = |veth: &str, ip: &str, ingress: Verdict| PodRules {
            host_veth: veth.into(),
            addresses: vec![ip.parse().unwrap()],
            ingress,
            egress: Verdict::Open,
        };
        let before = [
            pod(
                "a",
                "10.0.1.1",
                Verdict::Isolated(vec![grant(Some("10.0.0.0/26"), Some(vec![tcp(80, 80)]))]),
            ),
            pod(
                "b",
                "10.0.1.2",
                Verdict::Isolated(vec![grant(None, Some(vec![tcp(80, 90)]))]),
            ),
        ];
        let now = [
            // Grown: a wider peer set, a wider port range.
            pod(
                "a",
                "10.0.1.1",
                Verdict::Isolated(vec![grant(Some("10.0.0.0/24"), Some(vec![tcp(79, 81)]))]),
            ),
            // Narrowed: fewer ports.
            pod(
                "b",
                "10.0.1.2",
                Verdict::Isolated(vec![grant(None, Some(vec![tcp(80, 85)]))]),
            ),
            // Newly isolated.
            pod("c", "10.0.1.3", Verdict::Isolated(vec![])),
        ];
        assert_eq!(
            changed_addresses(&before, &now),
            vec![
                "10.0.1.2".parse::<std::net::IpAddr>().unwrap(),
                "10.0.1.3".parse().unwrap()
            ]
        );
        assert!(changed_addresses(&now, &now).is_empty());
        // Back: a's peers and ports narrow again.
        assert_eq!(changed_addresses(&now[..1], &before[..1]).len(), 1);
    }

    #[test]
    fn grants_become_interval_sets_and_open_pods_get_no_chain() {
        let tcp80 = PortRange {
            protocol: Protocol::Tcp,
            first: 80,
            last: 80,
        };
        let udp = PortRange {
            protocol: Protocol::Udp,
            first: 5000,
            last: 5010,
        };
        let text = ruleset(&[
            PodRules {
                host_veth: "enia".into(),
                addresses: vec![],
                ingress: Verdict::Isolated(vec![
                    grant(Some("10.0.0.0/24"), Some(vec![tcp80, udp])),
                    grant(None, Some(vec![tcp80])),
                ]),
                egress: Verdict::Isolated(vec![]),
            },
            PodRules {
                host_veth: "enib".into(),
                addresses: vec![],
                ingress: Verdict::Open,
                egress: Verdict::Isolated(vec![grant(Some("2001:db8::/64"), None)]),
            },
        ]);
        assert!(
            text.contains("ip saddr . meta l4proto . th dport { 10.0.0.0-10.0.0.127 . tcp . 80, 10.0.0.0-10.0.0.127 . udp . 5000-5010 } return"),
            "{text}"
        );
        assert!(
            text.contains("meta l4proto . th dport { tcp . 80 } return"),
            "{text}"
        );
        assert!(
            text.contains("chain eg-enia {\n    counter name \"eg-enia\" drop\n  }"),
            "deny all: {text}"
        );
        assert!(
            text.contains("ip6 daddr { 2001:db8::-2001:db8::ffff:ffff:ffff:ffff } return"),
            "{text}"
        );
        assert!(
            !text.contains("in-enib"),
            "an open pod has no chain: {text}"
        );
        assert!(text.contains("\"enia\" : jump in-enia"), "{text}");
        assert!(
            text.contains("\"enia\" : jump eg-enia, \"enib\" : jump eg-enib"),
            "{text}"
        );
        // Grants may overlap each other (one rule each); a grant's own ports are merged.
        let overlapping = ruleset(&[PodRules {
            host_veth: "enic".into(),
            addresses: vec![],
            ingress: Verdict::Isolated(vec![
                grant(
                    Some("10.0.0.0/24"),
                    Some(vec![
                        PortRange {
                            protocol: Protocol::Tcp,
                            first: 1000,
                            last: 1000,
                        },
                        PortRange {
                            protocol: Protocol::Tcp,
                            first: 1000,
                            last: 1100,
                        },
                        PortRange {
                            protocol: Protocol::Tcp,
                            first: 1101,
                            last: 1200,
                        },
                    ]),
                ),
                grant(Some("10.0.0.5/32"), Some(vec![tcp80])),
            ]),
            egress: Verdict::Open,
        }]);
        assert!(
            overlapping.contains("{ 10.0.0.0-10.0.0.127 . tcp . 1000-1200 } return"),
            "{overlapping}"
        );
        assert!(
            overlapping.contains("{ 10.0.0.5 . tcp . 80 } return"),
            "{overlapping}"
        );
        let empty = ruleset(&[]);
        assert!(
            empty.contains("map ingress {\n    type ifname : verdict\n  }"),
            "{empty}"
        );
    }
}
