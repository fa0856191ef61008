//! Security groups with rules, as EC2 evaluates them: an ENI's traffic passes when some rule of one
//! of its groups allows it (ingress rules for what arrives, egress rules for what leaves), by CIDR
//! or by source or destination group, protocol and port range; replies of an allowed flow always
//! pass (groups are stateful: the fabric that enforces them tracks flows). A group the VPC has no
//! rules for is not modelled and allows everything, so that a VPC written without groups behaves
//! as before they existed.

use super::SimVpc;
use ipam::net::Ipv4Cidr;
use std::net::Ipv4Addr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    /// EC2's `-1`: every protocol and port.
    All,
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Protocol, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" | "6" => Ok(Protocol::Tcp),
            "udp" | "17" => Ok(Protocol::Udp),
            "icmp" | "1" => Ok(Protocol::Icmp),
            "all" | "-1" => Ok(Protocol::All),
            other => Err(format!("protocol {other:?} is not tcp, udp, icmp or all")),
        }
    }
}

/// One rule: who (CIDRs, or members of groups) on what (protocol, port range).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub protocol: Option<Protocol>,
    /// Inclusive; none for every port (and for ICMP and `all`).
    pub ports: Option<(u16, u16)>,
    pub cidrs: Vec<Ipv4Cidr>,
    /// Group ids: the peer is an ENI holding one of them.
    pub groups: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecurityGroup {
    pub id: String,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

/// One packet that opens a flow, as the rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
    pub protocol: Protocol,
    /// The destination port (TCP, UDP); ignored for ICMP.
    pub port: u16,
}

impl Rule {
    /// Whether the rule lets `flow` through, `peer` being the other end and `peer_groups` the
    /// groups of the ENI that holds the peer's address, if any does.
    fn allows(&self, flow: &Flow, peer: Ipv4Addr, peer_groups: &[String]) -> bool {
        let protocol = self.protocol.unwrap_or(Protocol::All);
        let protocol_ok = protocol == Protocol::All || protocol == flow.protocol;
        let port_ok = match (protocol, self.ports) {
            (Protocol::Tcp | Protocol::Udp, Some((first, last))) => {
                (first..=last).contains(&flow.port)
            }
            _ => true,
        };
        let peer_ok = self.cidrs.iter().any(|c| c.contains(peer))
            || self.groups.iter().any(|g| peer_groups.contains(g));
        protocol_ok && port_ok && peer_ok
    }
}

impl SimVpc {
    /// Gives `group` its rules (set-up, outside EC2's API); a group defined again is replaced.
    pub fn define_security_group(&mut self, group: SecurityGroup) {
        self.security_groups.insert(group.id.clone(), group);
    }

    pub fn security_group(&self, id: &str) -> Option<&SecurityGroup> {
        self.security_groups.get(id)
    }

    /// Whether every one of `groups` has rules (and there is one): only then do they restrict an
    /// ENI's traffic, as a group not modelled allows everything.
    pub fn groups_modelled(&self, groups: &[String]) -> bool {
        !groups.is_empty() && groups.iter().all(|g| self.security_groups.contains_key(g))
    }

    /// The groups of the ENI that holds `address` (primary or secondary, or in one of its
    /// prefixes), if one does.
    pub fn groups_of_address(&self, address: Ipv4Addr) -> Option<&[String]> {
        self.enis
            .values()
            .find(|e| {
                e.primary_ip == address
                    || e.secondary_ips.contains(&address)
                    || e.prefixes.iter().any(|p| p.contains(address))
            })
            .map(|e| e.security_groups.as_slice())
    }

    /// Whether `groups` let `flow` through in one direction: `outbound` for the sender's egress,
    /// else the receiver's ingress. No modelled group among them: everything passes.
    fn groups_allow(&self, groups: &[String], flow: &Flow, outbound: bool) -> bool {
        if !self.groups_modelled(groups) {
            return true;
        }
        let modelled: Vec<&SecurityGroup> = groups
            .iter()
            .filter_map(|g| self.security_groups.get(g))
            .collect();
        let peer = if outbound {
            flow.destination
        } else {
            flow.source
        };
        let peer_groups = self.groups_of_address(peer).unwrap_or(&[]);
        modelled.iter().any(|g| {
            let rules = if outbound { &g.egress } else { &g.ingress };
            rules.iter().any(|r| r.allows(flow, peer, peer_groups))
        })
    }

    /// Whether a flow's first packet passes the security groups at both ends: the sender's egress
    /// (if an ENI of the VPC sends it) and the receiver's ingress (if one receives it).
    pub fn security_groups_allow(&self, flow: &Flow) -> bool {
        let sender = self.groups_of_address(flow.source).unwrap_or(&[]);
        let receiver = self.groups_of_address(flow.destination).unwrap_or(&[]);
        self.groups_allow(sender, flow, true) && self.groups_allow(receiver, flow, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateEniRequest, SimConfig};
    use ipam::time::Time;

    fn eni(vpc: &mut SimVpc, subnet: &str, groups: &[&str]) -> Ipv4Addr {
        vpc.create_network_interface(
            Time::ZERO,
            CreateEniRequest {
                subnet_id: subnet.into(),
                security_groups: groups.iter().map(|g| g.to_string()).collect(),
                ..CreateEniRequest::default()
            },
        )
        .result
        .unwrap()
        .primary_ip
    }

    fn flow(source: Ipv4Addr, destination: Ipv4Addr, protocol: Protocol, port: u16) -> Flow {
        Flow {
            source,
            destination,
            protocol,
            port,
        }
    }

    #[test]
    fn rules_by_group_and_cidr_protocol_and_port_at_both_ends() {
        let mut vpc = SimVpc::new("10.0.0.0/16".parse().unwrap(), SimConfig::default());
        let subnet = vpc
            .add_subnet("10.0.0.0/20".parse().unwrap(), "us-west-2a", &[])
            .unwrap();
        let all_out = Rule {
            protocol: Some(Protocol::All),
            cidrs: vec!["0.0.0.0/0".parse().unwrap()],
            ..Rule::default()
        };
        vpc.define_security_group(SecurityGroup {
            id: "sg-db".into(),
            ingress: vec![Rule {
                protocol: Some(Protocol::Tcp),
                ports: Some((5432, 5432)),
                groups: vec!["sg-app".into()],
                ..Rule::default()
            }],
            egress: vec![all_out.clone()],
        });
        vpc.define_security_group(SecurityGroup {
            id: "sg-app".into(),
            ingress: vec![],
            egress: vec![all_out],
        });
        vpc.define_security_group(SecurityGroup {
            id: "sg-locked".into(),
            ingress: vec![Rule {
                protocol: Some(Protocol::Udp),
                ports: Some((53, 53)),
                cidrs: vec!["10.0.0.0/16".parse().unwrap()],
                ..Rule::default()
            }],
            egress: vec![],
        });
        let db = eni(&mut vpc, &subnet, &["sg-db"]);
        let app = eni(&mut vpc, &subnet, &["sg-app"]);
        let other = eni(&mut vpc, &subnet, &["sg-other"]);
        let locked = eni(&mut vpc, &subnet, &["sg-locked"]);
        let both = eni(&mut vpc, &subnet, &["sg-app", "sg-locked"]);
        let outside: Ipv4Addr = "192.0.2.1".parse().unwrap();
        use Protocol::*;
        // By source group: app reaches db on 5432 only; a group without rules is not modelled, so
        // other sends freely but is not in sg-app.
        assert!(vpc.security_groups_allow(&flow(app, db, Tcp, 5432)));
        assert!(!vpc.security_groups_allow(&flow(app, db, Tcp, 5433)));
        assert!(!vpc.security_groups_allow(&flow(app, db, Udp, 5432)));
        assert!(!vpc.security_groups_allow(&flow(other, db, Tcp, 5432)));
        // An ENI with several groups takes the union: sg-app's egress lets both out.
        assert!(vpc.security_groups_allow(&flow(both, db, Tcp, 5432)));
        // By CIDR, and egress checked at the sender: locked may receive DNS from inside the VPC
        // only, and may send nothing.
        assert!(vpc.security_groups_allow(&flow(app, locked, Udp, 53)));
        assert!(!vpc.security_groups_allow(&flow(outside, locked, Udp, 53)));
        assert!(!vpc.security_groups_allow(&flow(locked, app, Tcp, 80)));
        // Unmodelled at both ends: everything.
        assert!(vpc.security_groups_allow(&flow(other, outside, Icmp, 0)));
        assert_eq!("-1".parse::<Protocol>(), Ok(All));
        assert!("gre".parse::<Protocol>().is_err());
    }
}
