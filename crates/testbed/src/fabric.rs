//! The VPC fabric in a namespace of its own: a bridge per subnet holding the subnet's router
//! address, and for every ENI EC2 has attached to an instance a veth pair whose node end carries the
//! MAC EC2 gave the ENI (EC2 hot-plugs a NIC; here the link appears before the attach returns).
//! The fabric knows which ENI holds each secondary address and prefix, as the VPC does, through
//! permanent neighbour entries, and like the VPC it answers every ARP request in the subnet itself
//! (proxy ARP on the bridge, private-VLAN style): nothing on a node answers ARP for pod addresses,
//! so traffic between nodes always goes through the router, which knows where each address lives.

use crate::netns::{ip_batch, sysctl};
use ipam::Ipv4Cidr;
use simvpc::{AttachmentStatus, SimVpc};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Mutex;

/// What is wired now, to turn each EC2 change into the few commands it needs.
#[derive(Default)]
struct Wired {
    /// ENI id → (node namespace, fabric-side link, device index).
    links: BTreeMap<String, (String, String, u32)>,
    /// (address, MAC, bridge).
    neighbours: BTreeSet<(Ipv4Addr, String, String)>,
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
        cidr: Ipv4Cidr,
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
            let bridge = self.bridge_for(
                &eni.subnet_id,
                eni.subnet_cidr,
                &mut commands,
                &mut new_bridges,
            );
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
        drop(wired);
        let mut result = ip_batch(&self.netns, &commands);
        for bridge in new_bridges {
            for (key, value) in [
                ("proxy_arp", "1"),
                ("proxy_arp_pvlan", "1"),
                ("send_redirects", "0"),
            ] {
                result = result.and_then(|_| {
                    sysctl(&self.netns, &format!("net.ipv4.conf.{bridge}.{key}"), value)
                });
            }
        }
        if let Err(e) = result {
            self.errors.lock().expect("errors lock").push(e);
        }
    }
}
