//! The VPC fabric in a namespace of its own: a bridge per subnet holding the subnet's router
//! address, and for every ENI EC2 has attached to an instance a veth pair whose node end carries the
//! MAC EC2 gave the ENI (EC2 hot-plugs a NIC; here the link appears before the attach returns).
//! The fabric knows which ENI holds each secondary address and prefix, as the VPC does, through
//! permanent neighbour entries, and like the VPC it answers every ARP request in the subnet itself
//! (proxy ARP on the bridge, private-VLAN style): nothing on a node answers ARP for pod addresses,
//! so traffic between nodes always goes through the router, which knows where each address lives.
//!
//! A branch ENI associated with a trunk (security groups for pods) is a VLAN of the trunk's link:
//! the fabric demultiplexes the trunk's tagged frames to a port of the branch's own on the subnet's
//! bridge, and the node gets the branch's VLAN link for the plugin to adopt (this kernel cannot make
//! VLAN links: both ends are `crate::vlan`'s emulation, over real 802.1Q frames). The branch's
//! address is the branch's on the bridge, and its security groups hold as any ENI's.
//!
//! A subnet with an IPv6 block gets the VPC's IPv6 router on its bridge (`fe80:ec2::1`, and the
//! block's `::1`), and every /80 delegated to an ENI a route through that ENI's link-local address,
//! as the VPC routes a prefix to the ENI that holds it.

use crate::netns::{ip, ip_batch, nft, sysctl};
use crate::vlan::VlanPort;
use ipam::{Ipv4Cidr, Ipv6Cidr};
use simvpc::{AttachmentStatus, SimVpc};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;

/// What is wired now, to turn each EC2 change into the few commands it needs.
#[derive(Default)]
struct Wired {
    /// ENI id → (node namespace, fabric-side link, device index).
    links: BTreeMap<String, (String, String, u32)>,
    /// (address, MAC, bridge).
    neighbours: BTreeSet<(Ipv4Addr, String, String)>,
    /// (delegated /80, the ENI's link-local address, bridge).
    routes: BTreeSet<(Ipv6Cidr, Ipv6Addr, String)>,
    /// The security groups' table as last applied, if any group has rules.
    security: Option<String>,
    /// Branch ENI id → its VLAN's two ends.
    branches: BTreeMap<String, BranchPorts>,
}

/// A branch's VLAN on its trunk: its port on the fabric's bridge, and the node's VLAN link.
struct BranchPorts {
    vlan: u16,
    mac: String,
    node: String,
    /// The trunk's link on the node.
    parent: String,
    fabric: VlanPort,
    /// None once the plugin deleted it (a pod's DEL), until [`Fabric::restore_vlan_links`].
    on_node: Option<VlanPort>,
}

/// What a branch needs wired: (node namespace, the trunk's fabric port, the trunk's device index,
/// VLAN id, the branch's MAC, the branch's bridge).
type BranchWanted = (String, String, u32, u16, String, String);

/// The nftables table that enforces security group rules in the fabric.
pub const SECURITY_TABLE: &str = "vpc-security-groups";

/// An ENI's addresses as nftables elements: primary, secondaries and prefixes.
fn elements(eni: &simvpc::NetworkInterface) -> Vec<String> {
    std::iter::once(eni.primary_ip.to_string())
        .chain(eni.secondary_ips.iter().map(|ip| ip.to_string()))
        .chain(eni.prefixes.iter().map(|p| p.to_string()))
        .collect()
}

/// The security groups of the VPC as one nftables table for the fabric's forward path, or none
/// when no group has rules. As EC2: flows are tracked, so replies pass; a flow's first packet goes
/// through the sender's egress chain (by source address, through a verdict map) and the receiver's
/// ingress chain (by destination address), each returning on the first rule that allows it and
/// dropping otherwise; ENIs whose groups are not all modelled have no chain. One rule per peer
/// (a CIDR, or an address of an ENI holding one of the rule's groups), as peers may overlap and an
/// nftables set may not.
pub fn security_ruleset(vpc: &SimVpc) -> Option<String> {
    use std::fmt::Write;
    let enis: Vec<&simvpc::NetworkInterface> = vpc.interfaces().collect();
    if !enis.iter().any(|e| vpc.groups_modelled(&e.security_groups)) {
        return None;
    }
    let mut out = format!("table ip {SECURITY_TABLE} {{\n");
    let mut maps: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for eni in enis
        .iter()
        .filter(|e| vpc.groups_modelled(&e.security_groups))
    {
        for (direction, prefix, peer_field) in
            [("egress", "eg", "daddr"), ("ingress", "in", "saddr")]
        {
            let chain = format!("{prefix}-{}", eni.id);
            let _ = writeln!(out, "  chain {chain} {{");
            for group in eni
                .security_groups
                .iter()
                .filter_map(|g| vpc.security_group(g))
            {
                let rules = if direction == "egress" {
                    &group.egress
                } else {
                    &group.ingress
                };
                for rule in rules {
                    let what = match (rule.protocol.unwrap_or(simvpc::Protocol::All), rule.ports) {
                        (simvpc::Protocol::All, _) => String::new(),
                        (simvpc::Protocol::Icmp, _) => " meta l4proto icmp".into(),
                        (p, ports) => {
                            let name = if p == simvpc::Protocol::Tcp {
                                "tcp"
                            } else {
                                "udp"
                            };
                            match ports {
                                Some((first, last)) if first == last => {
                                    format!(" meta l4proto {name} th dport {first}")
                                }
                                Some((first, last)) => {
                                    format!(" meta l4proto {name} th dport {first}-{last}")
                                }
                                None => format!(" meta l4proto {name}"),
                            }
                        }
                    };
                    let members = enis
                        .iter()
                        .filter(|e| e.security_groups.iter().any(|g| rule.groups.contains(g)))
                        .flat_map(|e| elements(e));
                    let peers = rule.cidrs.iter().map(|c| c.to_string()).chain(members);
                    for peer in peers {
                        let _ = writeln!(out, "    ip {peer_field} {peer}{what} return");
                    }
                }
            }
            let _ = writeln!(out, "    drop\n  }}");
            let entries = maps.entry(direction).or_default();
            for element in elements(eni) {
                entries.push(format!("{element} : jump {chain}"));
            }
        }
    }
    for (map, entries) in &maps {
        let _ = writeln!(
            out,
            "  map {map} {{\n    type ipv4_addr : verdict\n    flags interval\n    elements = {{ {} }}\n  }}",
            entries.join(", ")
        );
    }
    out.push_str(
        "  chain forward {\n    type filter hook forward priority filter; policy accept;\n    \
         ct state established,related accept\n    ip saddr vmap @egress\n    ip daddr vmap @ingress\n  }\n}\n",
    );
    Some(out)
}

/// The VPC's IPv6 router as an instance sees it.
pub const ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0xec2, 0, 0, 0, 0, 0, 1);

/// The subnet's IPv6 router address: the block's `::1`.
pub fn gateway_v6(cidr: Ipv6Cidr) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(cidr.addr()) + 1)
}

/// The link-local address a NIC with `mac` takes (modified EUI-64, the kernel's default).
fn link_local(mac: &str) -> Option<Ipv6Addr> {
    let b: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).ok())
        .collect::<Option<_>>()?;
    let [m0, m1, m2, m3, m4, m5] = b[..] else {
        return None;
    };
    Some(Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([m0 ^ 0x02, m1]),
        u16::from_be_bytes([m2, 0xff]),
        u16::from_be_bytes([0xfe, m3]),
        u16::from_be_bytes([m4, m5]),
    ))
}

pub struct Fabric {
    pub netns: String,
    /// Subnet id → (bridge, CIDR).
    bridges: Mutex<BTreeMap<String, (String, Ipv4Cidr)>>,
    /// Instance id → node namespace.
    nodes: Mutex<BTreeMap<String, String>>,
    wired: Mutex<Wired>,
    errors: Mutex<Vec<String>>,
}

/// The subnet's router: its base address plus one, as in a VPC.
pub fn gateway(cidr: Ipv4Cidr) -> Ipv4Addr {
    Ipv4Addr::from(cidr.base() + 1)
}

impl Fabric {
    pub fn new(netns: &str) -> Fabric {
        Fabric {
            netns: netns.to_string(),
            bridges: Mutex::new(BTreeMap::new()),
            nodes: Mutex::new(BTreeMap::new()),
            wired: Mutex::new(Wired::default()),
            errors: Mutex::new(Vec::new()),
        }
    }

    /// ENIs attached to this instance get their links in `netns` from now on.
    pub fn add_node(&self, instance_id: &str, netns: &str) {
        self.nodes
            .lock()
            .expect("nodes lock")
            .insert(instance_id.to_string(), netns.to_string());
    }

    /// What failed while following EC2 (the observer cannot return errors to EC2's caller).
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("errors lock").clone()
    }

    fn bridge_for(
        &self,
        subnet_id: &str,
        (cidr, cidr_v6): (Ipv4Cidr, Option<Ipv6Cidr>),
        commands: &mut Vec<String>,
        new_bridges: &mut Vec<String>,
    ) -> String {
        let mut bridges = self.bridges.lock().expect("bridges lock");
        if let Some((name, _)) = bridges.get(subnet_id) {
            return name.clone();
        }
        let index = bridges.len();
        let name = format!("br{index}");
        // A fixed MAC: a bridge that takes its lowest port's MAC changes address when an ENI is
        // plugged in, and the kernel then flushes every neighbour entry on it, permanent ones too.
        commands.push(format!(
            "link add {name} address 02:fa:00:00:{:02x}:01 type bridge",
            index
        ));
        commands.push(format!(
            "addr add {}/{} dev {name}",
            gateway(cidr),
            cidr.prefix_len()
        ));
        if let Some(v6) = cidr_v6 {
            commands.push(format!("addr add {ROUTER_V6}/64 dev {name} nodad"));
            commands.push(format!(
                "addr add {}/{} dev {name} nodad",
                gateway_v6(v6),
                v6.prefix_len()
            ));
        }
        commands.push(format!("link set {name} up"));
        new_bridges.push(name.clone());
        bridges.insert(subnet_id.to_string(), (name.clone(), cidr));
        name
    }

    /// Brings the fabric in line with the VPC: links for attached ENIs of our instances, neighbour
    /// entries for their addresses.
    pub fn follow(&self, vpc: &SimVpc) {
        let mut commands = Vec::new();
        let mut new_bridges = Vec::new();
        let mut links = BTreeMap::new();
        let mut neighbours = BTreeSet::new();
        let mut routes = BTreeSet::new();
        let nodes = self.nodes.lock().expect("nodes lock").clone();
        for eni in vpc.interfaces() {
            let Some(attachment) = &eni.attachment else {
                continue;
            };
            if attachment.status != AttachmentStatus::Attached {
                continue;
            }
            let Some(node) = nodes.get(&attachment.instance_id) else {
                continue;
            };
            let cidr_v6 = vpc.subnet(&eni.subnet_id).and_then(|s| s.ipv6_cidr);
            let bridge = self.bridge_for(
                &eni.subnet_id,
                (eni.subnet_cidr, cidr_v6),
                &mut commands,
                &mut new_bridges,
            );
            if let Some(via) = link_local(&eni.mac) {
                for prefix in &eni.ipv6_prefixes {
                    routes.insert((*prefix, via, bridge.clone()));
                }
            }
            let port = format!("p{}", &eni.id[eni.id.len().saturating_sub(12)..]);
            links.insert(
                eni.id.clone(),
                (node.clone(), port.clone(), attachment.device_index),
            );
            let addresses = eni.secondary_ips.iter().copied().chain(
                eni.prefixes
                    .iter()
                    .flat_map(|p| (0..p.size() as u32).map(|i| p.nth(i))),
            );
            for address in addresses {
                neighbours.insert((address, eni.mac.clone(), bridge.clone()));
            }
            let mut wired = self.wired.lock().expect("wired lock");
            if !wired.links.contains_key(&eni.id) {
                commands.push(format!(
                    "link add {port} type veth peer name eth{} address {} netns {node}",
                    attachment.device_index, eni.mac
                ));
                commands.push(format!("link set {port} master {bridge} up"));
                wired.links.insert(
                    eni.id.clone(),
                    (node.clone(), port, attachment.device_index),
                );
            }
        }
        let mut branches: BTreeMap<String, BranchWanted> = BTreeMap::new();
        for a in vpc.associations() {
            let (Some((node, port, device)), Some(branch)) = (
                links.get(&a.trunk_id),
                vpc.interfaces().find(|e| e.id == a.branch_id),
            ) else {
                continue;
            };
            let cidr_v6 = vpc.subnet(&branch.subnet_id).and_then(|s| s.ipv6_cidr);
            let bridge = self.bridge_for(
                &branch.subnet_id,
                (branch.subnet_cidr, cidr_v6),
                &mut commands,
                &mut new_bridges,
            );
            neighbours.insert((branch.primary_ip, branch.mac.clone(), bridge.clone()));
            branches.insert(
                branch.id.clone(),
                (
                    node.clone(),
                    port.clone(),
                    *device,
                    a.vlan_id,
                    branch.mac.clone(),
                    bridge,
                ),
            );
        }
        let mut wired = self.wired.lock().expect("wired lock");
        let gone: Vec<String> = wired
            .links
            .keys()
            .filter(|id| !links.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some((_, port, _)) = wired.links.remove(&id) {
                commands.push(format!("link del {port}"));
            }
        }
        for (address, mac, bridge) in neighbours.difference(&wired.neighbours) {
            commands.push(format!(
                "neigh replace {address} lladdr {mac} dev {bridge} nud permanent"
            ));
        }
        for (address, _, bridge) in wired.neighbours.difference(&neighbours) {
            commands.push(format!("neigh del {address} dev {bridge}"));
        }
        wired.neighbours = neighbours;
        for (prefix, via, bridge) in routes.difference(&wired.routes) {
            commands.push(format!("route replace {prefix} via {via} dev {bridge}"));
        }
        for (prefix, _, _) in wired.routes.difference(&routes) {
            commands.push(format!("route del {prefix}"));
        }
        wired.routes = routes;
        let security = security_ruleset(vpc);
        let security_script = (security != wired.security).then(|| match &security {
            Some(table) => {
                format!("table ip {SECURITY_TABLE}\ndelete table ip {SECURITY_TABLE}\n{table}")
            }
            None => format!("delete table ip {SECURITY_TABLE}\n"),
        });
        wired.security = security;
        // Branches whose association ended: their ports go (their programs with them).
        let ended: Vec<String> = wired
            .branches
            .keys()
            .filter(|id| !branches.contains_key(*id))
            .cloned()
            .collect();
        let ended: Vec<BranchPorts> = ended
            .iter()
            .filter_map(|id| wired.branches.remove(id))
            .collect();
        let mut result = ip_batch(&self.netns, &commands);
        for ports in ended {
            result = result.and_then(|_| self.unwire_branch(ports));
        }
        if let Some(script) = security_script {
            result = result.and_then(|_| nft(&self.netns, &script));
        }
        result = result.and_then(|_| self.configure_bridges(&new_bridges));
        for (id, wanted) in branches {
            if result.is_err() {
                break;
            }
            if wired.branches.contains_key(&id) {
                continue;
            }
            match self.wire_branch(&id, wanted) {
                Ok(ports) => {
                    wired.branches.insert(id, ports);
                }
                Err(e) => result = Err(e),
            }
        }
        drop(wired);
        if let Err(e) = result {
            self.errors.lock().expect("errors lock").push(e);
        }
    }

    /// The branch's port on its bridge (VLAN `vlan` of the trunk's port, a MAC of the fabric's:
    /// a bridge port with the branch's own MAC would take its frames for the bridge) and its VLAN
    /// link on the node, `vlan.eth.<vlan>` on the trunk's link with the branch's MAC.
    fn wire_branch(&self, id: &str, wanted: BranchWanted) -> Result<BranchPorts, String> {
        let (node, trunk_port, device, vlan, mac, bridge) = wanted;
        let port = format!("b{}", &id[id.len().saturating_sub(12)..]);
        let fabric_mac = format!("02:fb{}", &mac[5..]);
        let fabric = crate::vlan::add(&self.netns, &trunk_port, vlan, &port, &fabric_mac)?;
        ip(&["-n", &self.netns, "link", "set", &port, "master", &bridge])?;
        let parent = format!("eth{device}");
        let on_node = crate::vlan::add(
            &node,
            &parent,
            vlan,
            &datapath::branch::vlan_link(vlan),
            &mac,
        )?;
        Ok(BranchPorts {
            vlan,
            mac,
            node,
            parent,
            fabric,
            on_node: Some(on_node),
        })
    }

    fn unwire_branch(&self, ports: BranchPorts) -> Result<(), String> {
        let link = datapath::branch::vlan_link(ports.vlan);
        if ports.on_node.is_some()
            && self.node_link_mac(&ports.node, &link).as_deref() == Some(&ports.mac)
        {
            ip(&["-n", &ports.node, "link", "del", &link])?;
        }
        ip(&["-n", &self.netns, "link", "del", &ports.fabric.name])?;
        Ok(())
    }

    /// The MAC of `link` in `netns`, if it exists.
    fn node_link_mac(&self, netns: &str, link: &str) -> Option<String> {
        let out = ip(&["-n", netns, "-o", "link", "show", link]).ok()?;
        let after = out.split("link/ether ").nth(1)?;
        after.split_whitespace().next().map(str::to_string)
    }

    /// VLAN links of associated branches that a pod's DEL removed, made again: on a node the plugin
    /// makes the link at ADD, which this kernel cannot, so the testbed keeps one per branch.
    pub fn restore_vlan_links(&self) -> Result<(), String> {
        let mut wired = self.wired.lock().expect("wired lock");
        for ports in wired.branches.values_mut() {
            let link = datapath::branch::vlan_link(ports.vlan);
            if self.node_link_mac(&ports.node, &link).is_some() {
                continue;
            }
            // The old programs first: the parent's would still take the VLAN's frames.
            ports.on_node = None;
            ports.on_node = Some(crate::vlan::add(
                &ports.node,
                &ports.parent,
                ports.vlan,
                &link,
                &ports.mac,
            )?);
        }
        Ok(())
    }

    /// A new bridge answers ARP for its whole subnet (private-VLAN style) and redirects nothing.
    fn configure_bridges(&self, bridges: &[String]) -> Result<(), String> {
        for bridge in bridges {
            for (key, value) in [
                ("proxy_arp", "1"),
                ("proxy_arp_pvlan", "1"),
                ("send_redirects", "0"),
            ] {
                sysctl(&self.netns, &format!("net.ipv4.conf.{bridge}.{key}"), value)?;
            }
        }
        Ok(())
    }

    /// Wires a host of the VPC that is not a node (an ENI of its own, never attached) into its
    /// subnet: a link whose far end is the host's `eth0`, with the ENI's MAC and address, routed
    /// through the subnet's router. Its traffic crosses the VPC's router like a node's, so its
    /// security groups hold. Returns its address.
    pub fn add_host(&self, vpc: &SimVpc, eni_id: &str, host: &str) -> Result<Ipv4Addr, String> {
        let eni = vpc
            .interfaces()
            .find(|e| e.id == eni_id)
            .ok_or_else(|| format!("no ENI {eni_id}"))?;
        let cidr_v6 = vpc.subnet(&eni.subnet_id).and_then(|s| s.ipv6_cidr);
        let (mut commands, mut new_bridges) = (Vec::new(), Vec::new());
        let bridge = self.bridge_for(
            &eni.subnet_id,
            (eni.subnet_cidr, cidr_v6),
            &mut commands,
            &mut new_bridges,
        );
        let port = format!("h{}", &eni.id[eni.id.len().saturating_sub(12)..]);
        commands.push(format!(
            "link add {port} type veth peer name eth0 address {} netns {host}",
            eni.mac
        ));
        commands.push(format!("link set {port} master {bridge} up"));
        commands.push(format!(
            "neigh replace {} lladdr {} dev {bridge} nud permanent",
            eni.primary_ip, eni.mac
        ));
        ip_batch(&self.netns, &commands)?;
        self.configure_bridges(&new_bridges)?;
        ip_batch(
            host,
            &[
                "link set lo up".to_string(),
                format!(
                    "addr add {}/{} dev eth0",
                    eni.primary_ip,
                    eni.subnet_cidr.prefix_len()
                ),
                "link set eth0 up".to_string(),
                format!("route add default via {}", gateway(eni.subnet_cidr)),
            ],
        )?;
        Ok(eni.primary_ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_security_table_has_chains_only_for_enis_whose_groups_have_rules() {
        let mut vpc = SimVpc::new("10.0.0.0/16".parse().unwrap(), simvpc::SimConfig::default());
        let subnet = vpc
            .add_subnet("10.0.0.0/20".parse().unwrap(), "us-west-2a", &[])
            .unwrap();
        let mut eni = |groups: &[&str]| {
            vpc.create_network_interface(
                ipam::Time::ZERO,
                simvpc::CreateEniRequest {
                    subnet_id: subnet.clone(),
                    security_groups: groups.iter().map(|g| g.to_string()).collect(),
                    ..simvpc::CreateEniRequest::default()
                },
            )
            .result
            .unwrap()
        };
        let (db, app, open) = (
            eni(&["sg-db"]),
            eni(&["sg-app"]),
            eni(&["sg-db", "sg-none"]),
        );
        assert_eq!(security_ruleset(&vpc), None, "no group has rules");
        vpc.define_security_group(simvpc::SecurityGroup {
            id: "sg-db".into(),
            ingress: vec![simvpc::Rule {
                protocol: Some(simvpc::Protocol::Tcp),
                ports: Some((5432, 5432)),
                groups: vec!["sg-app".into()],
                ..simvpc::Rule::default()
            }],
            egress: vec![],
        });
        let table = security_ruleset(&vpc).unwrap();
        assert!(table.contains(&format!("chain in-{} {{", db.id)), "{table}");
        assert!(
            table.contains(&format!(
                "ip saddr {} meta l4proto tcp th dport 5432 return",
                app.primary_ip
            )),
            "{table}"
        );
        // sg-app has no rules and sg-none neither: those ENIs are not restricted.
        assert!(!table.contains(&format!("chain in-{}", app.id)), "{table}");
        assert!(!table.contains(&format!("chain in-{}", open.id)), "{table}");
        assert!(
            table.contains(&format!("{} : jump eg-{}", db.primary_ip, db.id)),
            "{table}"
        );
    }

    #[test]
    fn a_nics_link_local_address_is_its_modified_eui64() {
        assert_eq!(
            link_local("02:fa:00:00:00:01"),
            Some("fe80::fa:ff:fe00:1".parse().unwrap())
        );
        assert_eq!(
            link_local("0a:1b:2c:3d:4e:5f"),
            Some("fe80::81b:2cff:fe3d:4e5f".parse().unwrap())
        );
        assert_eq!(link_local("not a mac"), None);
    }
}
