//! What `vpcctl simvpc serve` builds: the VPC, its subnets and the instances, and how EC2 behaves.

use ipam::net::{Ipv4Cidr, Ipv6Cidr};
use ipam::time::Time;
use serde::Deserialize;
use simvpc::{Category, CreateEniRequest, Op, Preattached, SimConfig, SimVpc};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    pub vpc: VpcConfig,
    #[serde(default)]
    pub subnets: Vec<SubnetConfig>,
    #[serde(default)]
    pub instances: Vec<InstanceConfig>,
    #[serde(default)]
    pub ec2: Ec2Behaviour,
    /// Groups with rules, enforced where traffic crosses the VPC (the demo's fabric); groups not
    /// listed here are not modelled and allow everything.
    #[serde(default)]
    pub security_groups: Vec<SecurityGroupConfig>,
    /// Hosts of the VPC that are not nodes (a database, a service): each an ENI of its own with
    /// its groups, serving its ports (the demo wires and serves them).
    #[serde(default)]
    pub hosts: Vec<HostConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    pub name: String,
    pub subnet: String,
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// `tcp/5432`, `udp/53`.
    #[serde(default)]
    pub ports: Vec<String>,
}

impl HostConfig {
    /// The ports it serves, as (udp, port).
    pub fn served(&self) -> Result<Vec<(bool, u16)>, String> {
        self.ports
            .iter()
            .map(|p| {
                let bad = || format!("host {}: port {p:?}: write tcp/PORT or udp/PORT", self.name);
                let (protocol, port) = p.split_once('/').ok_or_else(bad)?;
                let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
                match protocol {
                    "tcp" => Ok((false, port)),
                    "udp" => Ok((true, port)),
                    _ => Err(bad()),
                }
            })
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupConfig {
    pub id: String,
    #[serde(default)]
    pub ingress: Vec<RuleConfig>,
    #[serde(default)]
    pub egress: Vec<RuleConfig>,
}

/// `{ protocol = "tcp", ports = "5432", from_groups = ["sg-app"] }`; or `cidrs = [...]`;
/// `to_groups` in egress rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub protocol: String,
    /// `5432` or `1024-65535`; every port when absent.
    #[serde(default)]
    pub ports: Option<String>,
    #[serde(default)]
    pub cidrs: Vec<Ipv4Cidr>,
    #[serde(default)]
    pub from_groups: Vec<String>,
    #[serde(default)]
    pub to_groups: Vec<String>,
}

impl RuleConfig {
    /// The rule, in `group`'s `direction` (`ingress` takes `from_groups`, `egress` `to_groups`).
    fn rule(&self, group: &str, direction: &str) -> Result<simvpc::Rule, String> {
        let at = format!("security group {group}, {direction} rule");
        let protocol: simvpc::Protocol = self.protocol.parse().map_err(|e| format!("{at}: {e}"))?;
        let ports = match self.ports.as_deref() {
            None => None,
            Some(text) => {
                let (first, last) = text.split_once('-').unwrap_or((text, text));
                let port = |p: &str| p.trim().parse::<u16>().ok();
                match (port(first), port(last)) {
                    (Some(first), Some(last)) if first <= last => Some((first, last)),
                    _ => return Err(format!("{at}: ports {text:?} is not a port or a range")),
                }
            }
        };
        if ports.is_some() && !matches!(protocol, simvpc::Protocol::Tcp | simvpc::Protocol::Udp) {
            return Err(format!("{at}: ports apply to tcp and udp only"));
        }
        let (groups, wrong) = match direction {
            "ingress" => (
                &self.from_groups,
                (!self.to_groups.is_empty()).then_some("to_groups"),
            ),
            _ => (
                &self.to_groups,
                (!self.from_groups.is_empty()).then_some("from_groups"),
            ),
        };
        if let Some(wrong) = wrong {
            return Err(format!("{at}: {wrong} belongs to the other direction"));
        }
        if self.cidrs.is_empty() && groups.is_empty() {
            return Err(format!("{at}: names no peer (cidrs or groups)"));
        }
        Ok(simvpc::Rule {
            protocol: Some(protocol),
            ports,
            cidrs: self.cidrs.clone(),
            groups: groups.clone(),
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VpcConfig {
    pub cidr: Ipv4Cidr,
    #[serde(default)]
    pub secondary_cidrs: Vec<Ipv4Cidr>,
    /// The VPC's IPv6 blocks (EC2 gives a VPC a /56); subnets take their /64 from one of them.
    #[serde(default)]
    pub ipv6_cidrs: Vec<Ipv6Cidr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetConfig {
    /// How instances refer to the subnet in this file; EC2 gives it an id of its own.
    pub name: String,
    pub cidr: Ipv4Cidr,
    pub az: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Subnet CIDR reservations of type prefix.
    #[serde(default)]
    pub prefix_reservations: Vec<Ipv4Cidr>,
    /// The subnet's IPv6 /64, out of the VPC's `ipv6_cidrs`; ENIs in it can be delegated /80s.
    pub ipv6_cidr: Option<Ipv6Cidr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub instance_type: String,
    pub subnet: String,
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// ENIs attached before any CNI runs on the node (`[[instances.enis]]`).
    #[serde(default)]
    pub enis: Vec<PreattachedConfig>,
}

/// An ENI a node has from the start: someone else's (Multus, DPDK, EFA), a trunk, or ours from a
/// CNI that ran before.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreattachedConfig {
    pub device_index: u32,
    #[serde(default)]
    pub network_card: u32,
    #[serde(default = "plain_interface")]
    pub interface_type: String,
    #[serde(default)]
    pub secondary_addresses: u32,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

fn plain_interface() -> String {
    "interface".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ec2Behaviour {
    /// Multiplies the simulated latencies (400 ms for CreateNetworkInterface, 1.5 s for attach...);
    /// 0 answers at once.
    pub latency_scale: f64,
    /// (capacity, refill per second) of the account's buckets.
    pub mutating_bucket: (f64, f64),
    pub non_mutating_bucket: (f64, f64),
    /// Share of calls that fail with `Unavailable`.
    pub error_rate: f64,
    /// EC2 actions the node's role may not call (`CreateNetworkInterface`, ...): they answer
    /// `UnauthorizedOperation`.
    pub denied_actions: Vec<String>,
    pub seed: u64,
}

impl Default for Ec2Behaviour {
    fn default() -> Self {
        let sim = SimConfig::default();
        Ec2Behaviour {
            latency_scale: 0.0,
            mutating_bucket: sim.buckets[&Category::Mutating],
            non_mutating_bucket: sim.buckets[&Category::NonMutating],
            error_rate: 0.0,
            denied_actions: Vec::new(),
            seed: 1,
        }
    }
}

/// The ids EC2 gave to what the file names.
#[derive(Debug, Clone, Default)]
pub struct Names {
    pub subnets: BTreeMap<String, String>,
    pub instances: BTreeMap<String, String>,
    /// Host name → its ENI's id.
    pub hosts: BTreeMap<String, String>,
}

impl ServeConfig {
    pub fn parse(text: &str) -> Result<ServeConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// One VPC, one subnet per AZ pair, one m5.large node: what the demo needs by default.
    pub fn example() -> ServeConfig {
        Self::parse(
            r#"
[vpc]
cidr = "10.0.0.0/16"
ipv6_cidrs = ["2600:1f14:abc:de00::/56"]

[[subnets]]
name = "node-a"
cidr = "10.0.0.0/20"
az = "us-west-2a"
tags = { "kubernetes.io/role/cni" = "1" }
ipv6_cidr = "2600:1f14:abc:de00::/64"

[[instances]]
name = "node-1"
type = "m5.large"
subnet = "node-a"
security_groups = ["sg-0000000000000001"]
"#,
        )
        .expect("the example parses")
    }

    pub fn build(&self) -> Result<(SimVpc, Names), String> {
        for (name, (cap, rate)) in [
            ("ec2.mutating_bucket", self.ec2.mutating_bucket),
            ("ec2.non_mutating_bucket", self.ec2.non_mutating_bucket),
        ] {
            ipam::pacing::check_bucket(cap, rate).map_err(|e| format!("{name}: {e}"))?;
        }
        let sim = SimConfig {
            buckets: BTreeMap::from([
                (Category::Mutating, self.ec2.mutating_bucket),
                (Category::NonMutating, self.ec2.non_mutating_bucket),
            ]),
            error_rate: self.ec2.error_rate,
            denied: self
                .ec2
                .denied_actions
                .iter()
                .map(|name| {
                    Op::ALL
                        .iter()
                        .copied()
                        .find(|op| op.name() == name)
                        .ok_or_else(|| format!("ec2.denied_actions: no EC2 action {name:?}"))
                })
                .collect::<Result<_, _>>()?,
            seed: self.ec2.seed,
            ..SimConfig::default()
        };
        let mut vpc = SimVpc::new(self.vpc.cidr, sim);
        for group in &self.security_groups {
            if vpc.security_group(&group.id).is_some() {
                return Err(format!("security group {} is defined twice", group.id));
            }
            let rules = |direction: &str, rules: &[RuleConfig]| {
                rules
                    .iter()
                    .map(|r| r.rule(&group.id, direction))
                    .collect::<Result<Vec<_>, String>>()
            };
            vpc.define_security_group(simvpc::SecurityGroup {
                id: group.id.clone(),
                ingress: rules("ingress", &group.ingress)?,
                egress: rules("egress", &group.egress)?,
            });
        }
        for cidr in &self.vpc.secondary_cidrs {
            vpc.add_cidr(*cidr);
        }
        for cidr in &self.vpc.ipv6_cidrs {
            vpc.add_ipv6_cidr(*cidr);
        }
        let mut names = Names::default();
        for subnet in &self.subnets {
            let tags: Vec<(&str, &str)> = subnet
                .tags
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let id = vpc
                .add_subnet(subnet.cidr, &subnet.az, &tags)
                .map_err(|e| format!("subnet {}: {e}", subnet.name))?;
            if let Some(block) = subnet.ipv6_cidr {
                vpc.associate_subnet_ipv6(&id, block)
                    .map_err(|e| format!("subnet {}: {e}", subnet.name))?;
            }
            for reservation in &subnet.prefix_reservations {
                vpc.reserve_for_prefixes(&id, *reservation)
                    .map_err(|e| format!("subnet {}: {e}", subnet.name))?;
            }
            if names.subnets.insert(subnet.name.clone(), id).is_some() {
                return Err(format!("two subnets are named {}", subnet.name));
            }
        }
        for instance in &self.instances {
            let subnet = names.subnets.get(&instance.subnet).ok_or_else(|| {
                format!(
                    "instance {}: no subnet named {}",
                    instance.name, instance.subnet
                )
            })?;
            let groups: Vec<&str> = instance
                .security_groups
                .iter()
                .map(String::as_str)
                .collect();
            let id = vpc
                .launch_instance(&instance.instance_type, subnet, &groups)
                .map_err(|e| format!("instance {}: {e}", instance.name))?;
            for eni in &instance.enis {
                if !["interface", "trunk", "efa", "efa-only"].contains(&eni.interface_type.as_str())
                {
                    return Err(format!(
                        "instance {}: interface_type {:?}: expected interface, trunk, efa or efa-only",
                        instance.name, eni.interface_type
                    ));
                }
                vpc.preattach(
                    &id,
                    &Preattached {
                        device_index: eni.device_index,
                        network_card: eni.network_card,
                        interface_type: eni.interface_type.clone(),
                        secondary_addresses: eni.secondary_addresses,
                        tags: eni.tags.clone(),
                    },
                )
                .map_err(|e| {
                    format!(
                        "instance {}: ENI at device index {}: {e}",
                        instance.name, eni.device_index
                    )
                })?;
            }
            if names.instances.insert(instance.name.clone(), id).is_some() {
                return Err(format!("two instances are named {}", instance.name));
            }
        }
        for host in &self.hosts {
            host.served()?;
            let subnet = names
                .subnets
                .get(&host.subnet)
                .ok_or_else(|| format!("host {}: no subnet named {}", host.name, host.subnet))?;
            let eni = vpc
                .create_network_interface(
                    Time::ZERO,
                    CreateEniRequest {
                        subnet_id: subnet.clone(),
                        description: format!("VPC host {}", host.name),
                        security_groups: host.security_groups.clone(),
                        ..CreateEniRequest::default()
                    },
                )
                .result
                .map_err(|e| format!("host {}: {e}", host.name))?;
            if names.hosts.insert(host.name.clone(), eni.id).is_some() {
                return Err(format!("two hosts are named {}", host.name));
            }
        }
        Ok((vpc, names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_builds_a_node() {
        let (vpc, names) = ServeConfig::example().build().unwrap();
        let id = &names.instances["node-1"];
        assert_eq!(vpc.instance(id).unwrap().instance_type, "m5.large");
    }

    #[test]
    fn mistakes_name_what_is_wrong() {
        let unknown_key = ServeConfig::parse("[vpc]\ncidr = \"10.0.0.0/16\"\ncolour = 1\n");
        assert!(unknown_key.unwrap_err().contains("colour"));
        let bad_subnet = ServeConfig::parse(
            "[vpc]\ncidr = \"10.0.0.0/16\"\n[[instances]]\nname = \"n\"\ntype = \"m5.large\"\nsubnet = \"nowhere\"\n",
        )
        .unwrap()
        .build()
        .err()
        .unwrap();
        assert!(bad_subnet.contains("nowhere"), "{bad_subnet}");
        let bad_type = ServeConfig::parse(
            "[vpc]\ncidr = \"10.0.0.0/16\"\n[[subnets]]\nname = \"a\"\ncidr = \"10.0.0.0/24\"\naz = \"z\"\n[[instances]]\nname = \"n\"\ntype = \"m5.huge\"\nsubnet = \"a\"\n",
        )
        .unwrap()
        .build()
        .err()
        .unwrap();
        assert!(bad_type.contains("m5.huge"), "{bad_type}");
    }

    #[test]
    fn security_groups_are_read_with_their_rules_and_mistakes_named() {
        let config = |groups: &str| {
            ServeConfig::parse(&format!("[vpc]\ncidr = \"10.0.0.0/16\"\n{groups}"))
                .and_then(|c| c.build().map(|(vpc, _)| vpc))
        };
        let vpc = config(
            r#"
[[security_groups]]
id = "sg-db"
ingress = [{ protocol = "tcp", ports = "5432", from_groups = ["sg-app"] },
           { protocol = "udp", ports = "1000-2000", cidrs = ["10.0.0.0/16"] }]
egress = [{ protocol = "all", cidrs = ["0.0.0.0/0"] }]
"#,
        )
        .unwrap();
        let db = vpc.security_group("sg-db").unwrap();
        assert_eq!(db.ingress[0].ports, Some((5432, 5432)));
        assert_eq!(db.ingress[0].groups, ["sg-app"]);
        assert_eq!(db.ingress[1].ports, Some((1000, 2000)));
        assert_eq!(db.egress[0].protocol, Some(simvpc::Protocol::All));
        for (group, expected) in [
            (
                r#"id = "g"
ingress = [{ protocol = "gre", cidrs = ["10.0.0.0/8"] }]"#,
                "protocol \"gre\"",
            ),
            (
                r#"id = "g"
ingress = [{ protocol = "tcp", ports = "90-80", cidrs = ["10.0.0.0/8"] }]"#,
                "not a port or a range",
            ),
            (
                r#"id = "g"
ingress = [{ protocol = "icmp", ports = "1", cidrs = ["10.0.0.0/8"] }]"#,
                "tcp and udp only",
            ),
            (
                r#"id = "g"
ingress = [{ protocol = "tcp", to_groups = ["sg-x"] }]"#,
                "to_groups belongs to the other direction",
            ),
            (
                r#"id = "g"
egress = [{ protocol = "tcp" }]"#,
                "names no peer",
            ),
        ] {
            let error = config(&format!("[[security_groups]]\n{group}\n"))
                .err()
                .expect("refused");
            assert!(error.contains(expected), "{group}: {error}");
        }
        let twice = config("[[security_groups]]\nid = \"g\"\n[[security_groups]]\nid = \"g\"\n");
        assert!(twice.err().expect("refused").contains("defined twice"));
    }

    #[test]
    fn hosts_get_an_eni_with_their_groups_and_mistakes_are_named() {
        let config = |hosts: &str| {
            ServeConfig::parse(&format!(
                "[vpc]\ncidr = \"10.0.0.0/16\"\n[[subnets]]\nname = \"a\"\ncidr = \"10.0.0.0/24\"\naz = \"z\"\n{hosts}"
            ))
            .and_then(|c| c.build())
        };
        let (vpc, names) = config(
            "[[hosts]]\nname = \"db\"\nsubnet = \"a\"\nsecurity_groups = [\"sg-db\"]\nports = [\"tcp/5432\", \"udp/53\"]\n",
        )
        .unwrap();
        let eni = vpc
            .interfaces()
            .find(|e| e.id == names.hosts["db"])
            .unwrap();
        assert_eq!(eni.security_groups, ["sg-db"]);
        assert!(eni.attachment.is_none());
        for (hosts, expected) in [
            ("[[hosts]]\nname = \"db\"\nsubnet = \"b\"\n", "no subnet named b"),
            ("[[hosts]]\nname = \"db\"\nsubnet = \"a\"\nports = [\"sctp/1\"]\n", "write tcp/PORT or udp/PORT"),
            ("[[hosts]]\nname = \"db\"\nsubnet = \"a\"\nports = [\"tcp/0\"]\n", "write tcp/PORT"),
            ("[[hosts]]\nname = \"db\"\nsubnet = \"a\"\n[[hosts]]\nname = \"db\"\nsubnet = \"a\"\n", "two hosts are named db"),
        ] {
            let error = config(hosts).err().expect("refused");
            assert!(error.contains(expected), "{hosts}: {error}");
        }
    }

    #[test]
    fn instances_can_have_enis_from_the_start() {
        let config = |enis: &str| {
            ServeConfig::parse(&format!(
                "[vpc]\ncidr = \"10.0.0.0/16\"\n\
                 [[subnets]]\nname = \"a\"\ncidr = \"10.0.0.0/24\"\naz = \"z\"\n\
                 [[instances]]\nname = \"n\"\ntype = \"m5.large\"\nsubnet = \"a\"\n{enis}"
            ))
            .unwrap()
            .build()
            .map(|(vpc, names)| (vpc, names.instances["n"].clone()))
        };
        let (vpc, id) = config(
            "[[instances.enis]]\ndevice_index = 1\nsecondary_addresses = 3\n\
             tags = { \"node.k8s.amazonaws.com/no_manage\" = \"true\" }\n\
             [[instances.enis]]\ndevice_index = 2\ninterface_type = \"trunk\"\n",
        )
        .ok()
        .unwrap();
        let mut enis: Vec<_> = vpc
            .interfaces()
            .filter(|e| e.attachment.as_ref().is_some_and(|a| a.instance_id == id))
            .map(|e| {
                let a = e.attachment.as_ref().unwrap();
                (
                    a.device_index,
                    e.interface_type.clone(),
                    e.secondary_ips.len(),
                    e.tags.len(),
                )
            })
            .collect();
        enis.sort();
        assert_eq!(
            enis,
            [
                (0, "interface".to_string(), 0, 0),
                (1, "interface".to_string(), 3, 1),
                (2, "trunk".to_string(), 0, 0)
            ]
        );
        // EC2's rules hold: a taken index, a card the type lacks, too many addresses, a fourth ENI.
        let taken = config("[[instances.enis]]\ndevice_index = 0\n")
            .err()
            .unwrap();
        assert!(
            taken.contains("device index 0") && taken.contains("taken"),
            "{taken}"
        );
        let card = config("[[instances.enis]]\ndevice_index = 0\nnetwork_card = 1\n")
            .err()
            .unwrap();
        assert!(card.contains("network card 1"), "{card}");
        let full = config("[[instances.enis]]\ndevice_index = 1\nsecondary_addresses = 10\n")
            .err()
            .unwrap();
        assert!(full.contains("10 addresses per ENI"), "{full}");
        let four = config(
            "[[instances.enis]]\ndevice_index = 1\n[[instances.enis]]\ndevice_index = 2\n[[instances.enis]]\ndevice_index = 3\n",
        )
        .err().unwrap();
        assert!(four.contains("allows 3 ENIs"), "{four}");
        let kind = config("[[instances.enis]]\ndevice_index = 1\ninterface_type = \"branch\"\n")
            .err()
            .unwrap();
        assert!(kind.contains("branch"), "{kind}");
    }

    #[test]
    fn an_ipv6_block_must_be_a_64_of_the_vpc_and_not_shared() {
        let build = |vpc_v6: &str, a: &str, b: &str| {
            ServeConfig::parse(&format!(
                "[vpc]\ncidr = \"10.0.0.0/16\"\nipv6_cidrs = [{vpc_v6}]\n\
                 [[subnets]]\nname = \"a\"\ncidr = \"10.0.0.0/24\"\naz = \"z\"\nipv6_cidr = \"{a}\"\n\
                 [[subnets]]\nname = \"b\"\ncidr = \"10.0.1.0/24\"\naz = \"z\"\nipv6_cidr = \"{b}\"\n"
            ))
            .unwrap()
            .build()
            .map(|(vpc, names)| vpc.subnet(&names.subnets["b"]).unwrap().ipv6_cidr)
        };
        let vpc = "\"2600:1f14:1:100::/56\"";
        assert_eq!(
            build(vpc, "2600:1f14:1:100::/64", "2600:1f14:1:1ff::/64").unwrap(),
            Some("2600:1f14:1:1ff::/64".parse().unwrap())
        );
        let outside = build(vpc, "2600:1f14:1:100::/64", "2600:1f14:1:200::/64").unwrap_err();
        assert!(
            outside.contains("subnet b") && outside.contains("outside"),
            "{outside}"
        );
        let shared = build(vpc, "2600:1f14:1:100::/64", "2600:1f14:1:100::/64").unwrap_err();
        assert!(shared.contains("overlaps"), "{shared}");
        let too_big = build(vpc, "2600:1f14:1:100::/64", "2600:1f14:1:100::/60").unwrap_err();
        assert!(too_big.contains("/64"), "{too_big}");
        let no_vpc_block = build("", "2600:1f14:1:100::/64", "2600:1f14:1:101::/64").unwrap_err();
        assert!(no_vpc_block.contains("subnet a"), "{no_vpc_block}");
    }
}
