//! EC2 actions: Query parameters in, the simulated VPC's call, XML out.

use crate::query::Params;
use crate::xml::Xml;
use ipam::net::{Ipv4Cidr, Ipv6Cidr};
use ipam::time::Time;
use simvpc::{codes, CreateEniRequest, Ec2Error, NetworkInterface, SimVpc, TrunkAssociation};
use std::net::Ipv4Addr;
use std::time::Duration;

pub const OWNER_ID: &str = "111122223333";
pub const INVALID_ACTION: &str = "InvalidAction";

/// What one request produced: the body of the reply document (or the error) and how long EC2 took.
pub struct Outcome {
    pub result: Result<Xml, Ec2Error>,
    pub latency: Duration,
}

impl Outcome {
    fn immediate(result: Result<Xml, Ec2Error>) -> Outcome {
        Outcome {
            result,
            latency: Duration::ZERO,
        }
    }
}

fn invalid(message: impl Into<String>) -> Ec2Error {
    Ec2Error {
        code: codes::INVALID_PARAMETER,
        message: message.into().into(),
    }
}

fn map<T>(reply: simvpc::Reply<T>, body: impl FnOnce(T, &mut Xml)) -> Outcome {
    Outcome {
        latency: reply.latency,
        result: reply.result.map(|value| {
            let mut x = Xml::new();
            body(value, &mut x);
            x
        }),
    }
}

fn returned_true(x: &mut Xml) {
    x.leaf("return", "true");
}

pub fn handle(vpc: &mut SimVpc, now: Time, action: &str, p: &Params) -> Outcome {
    match run(vpc, now, action, p) {
        Ok(outcome) => outcome,
        Err(e) => Outcome::immediate(Err(e)),
    }
}

fn run(vpc: &mut SimVpc, now: Time, action: &str, p: &Params) -> Result<Outcome, Ec2Error> {
    Ok(match action {
        "CreateNetworkInterface" => {
            let request = CreateEniRequest {
                subnet_id: p.required("SubnetId")?.to_string(),
                description: p.get("Description").unwrap_or_default().to_string(),
                security_groups: p.list("SecurityGroupId"),
                secondary_ip_count: p.number("SecondaryPrivateIpAddressCount")?.unwrap_or(0),
                prefix_count: p.number("Ipv4PrefixCount")?.unwrap_or(0),
                tags: p.tag_specifications().into_iter().collect(),
                client_token: p.get("ClientToken").map(str::to_string),
                interface_type: p.get("InterfaceType").map(str::to_string),
            };
            map(vpc.create_network_interface(now, request), |eni, x| {
                x.node("networkInterface", |x| interface(x, &eni));
            })
        }
        "AttachNetworkInterface" => {
            let eni = p.required("NetworkInterfaceId")?;
            let instance = p.required("InstanceId")?;
            let device = p.number("DeviceIndex")?.ok_or_else(|| Ec2Error {
                code: crate::query::MISSING_PARAMETER,
                message: "The request must contain the parameter DeviceIndex".into(),
            })?;
            let card = p.number("NetworkCardIndex")?.unwrap_or(0);
            map(
                vpc.attach_network_interface(now, eni, instance, device, card),
                |id, x| {
                    x.leaf("attachmentId", id).leaf("networkCardIndex", card);
                },
            )
        }
        "DetachNetworkInterface" => map(
            vpc.detach_network_interface(now, p.required("AttachmentId")?),
            |(), x| returned_true(x),
        ),
        "DeleteNetworkInterface" => map(
            vpc.delete_network_interface(now, p.required("NetworkInterfaceId")?),
            |(), x| returned_true(x),
        ),
        "ModifyNetworkInterfaceAttribute" => {
            let eni = p.required("NetworkInterfaceId")?;
            let groups = p.list("SecurityGroupId");
            if let Some(value) = p.flag("Attachment.DeleteOnTermination") {
                map(vpc.set_delete_on_termination(now, eni, value), |(), x| {
                    returned_true(x)
                })
            } else if !groups.is_empty() {
                map(vpc.set_security_groups(now, eni, &groups), |(), x| {
                    returned_true(x)
                })
            } else {
                return Err(Ec2Error {
                    code: codes::INVALID_COMBINATION,
                    message: "simvpc modifies Attachment.DeleteOnTermination or SecurityGroupId"
                        .into(),
                });
            }
        }
        "AssignPrivateIpAddresses" => {
            if !p.list("PrivateIpAddress").is_empty() {
                return Err(invalid(
                    "simvpc assigns addresses by count (SecondaryPrivateIpAddressCount), not by name",
                ));
            }
            let eni = p.required("NetworkInterfaceId")?.to_string();
            let ips = p.number("SecondaryPrivateIpAddressCount")?.unwrap_or(0);
            let prefixes = p.number("Ipv4PrefixCount")?.unwrap_or(0);
            map(
                vpc.assign_private_ip_addresses(now, &eni, ips, prefixes),
                |(ips, prefixes), x| {
                    x.leaf("networkInterfaceId", &eni)
                        .items("assignedPrivateIpAddressesSet", ips, |x, ip| {
                            x.leaf("privateIpAddress", ip);
                        })
                        .items("assignedIpv4PrefixSet", prefixes, |x, prefix| {
                            x.leaf("ipv4Prefix", prefix);
                        });
                    returned_true(x);
                },
            )
        }
        "UnassignPrivateIpAddresses" => {
            let eni = p.required("NetworkInterfaceId")?;
            let ips = p
                .list("PrivateIpAddress")
                .iter()
                .map(|ip| {
                    ip.parse::<Ipv4Addr>()
                        .map_err(|_| invalid(format!("Invalid IPv4 address: {ip}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let prefixes = p
                .list("Ipv4Prefix")
                .iter()
                .map(|cidr| {
                    cidr.parse::<Ipv4Cidr>()
                        .map_err(|_| invalid(format!("Invalid IPv4 prefix: {cidr}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            map(
                vpc.unassign_private_ip_addresses(now, eni, &ips, &prefixes),
                |(), x| returned_true(x),
            )
        }
        "AssignIpv6Addresses" => {
            if p.number("Ipv6AddressCount")?.is_some() || !p.list("Ipv6Addresses").is_empty() {
                return Err(invalid(
                    "simvpc delegates IPv6 as /80 prefixes (Ipv6PrefixCount), not single addresses",
                ));
            }
            if !p.list("Ipv6Prefix").is_empty() {
                return Err(invalid(
                    "simvpc assigns IPv6 prefixes by count (Ipv6PrefixCount), not by name",
                ));
            }
            let eni = p.required("NetworkInterfaceId")?.to_string();
            let count = p.number("Ipv6PrefixCount")?.unwrap_or(0);
            map(vpc.assign_ipv6_prefixes(now, &eni, count), |prefixes, x| {
                x.leaf("networkInterfaceId", &eni)
                    .strings("assignedIpv6Addresses", std::iter::empty::<&str>())
                    .strings("assignedIpv6PrefixSet", prefixes);
            })
        }
        "UnassignIpv6Addresses" => {
            if !p.list("Ipv6Addresses").is_empty() {
                return Err(invalid(
                    "simvpc delegates IPv6 as /80 prefixes: unassign them with Ipv6Prefix",
                ));
            }
            let eni = p.required("NetworkInterfaceId")?.to_string();
            let prefixes = p
                .list("Ipv6Prefix")
                .iter()
                .map(|cidr| {
                    cidr.parse::<Ipv6Cidr>()
                        .map_err(|_| invalid(format!("Invalid IPv6 prefix: {cidr}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            map(vpc.unassign_ipv6_prefixes(now, &eni, &prefixes), |(), x| {
                x.leaf("networkInterfaceId", &eni)
                    .strings("unassignedIpv6Addresses", std::iter::empty::<&str>())
                    .strings("unassignedIpv6PrefixSet", &prefixes);
            })
        }
        "CreateTags" => {
            let tags = p.tags("Tag");
            let resources = p.list("ResourceId");
            if resources.is_empty() {
                return Err(Ec2Error {
                    code: crate::query::MISSING_PARAMETER,
                    message: "The request must contain the parameter ResourceId.1".into(),
                });
            }
            let mut latency = Duration::ZERO;
            for resource in &resources {
                let reply = vpc.create_tags(now, resource, &tags);
                latency = latency.max(reply.latency);
                if let Err(e) = reply.result {
                    return Ok(Outcome {
                        result: Err(e),
                        latency,
                    });
                }
            }
            let mut x = Xml::new();
            returned_true(&mut x);
            Outcome {
                result: Ok(x),
                latency,
            }
        }
        "AssociateTrunkInterface" => {
            let branch = p.required("BranchInterfaceId")?;
            let trunk = p.required("TrunkInterfaceId")?;
            if p.get("GreKey").is_some() {
                return Err(invalid(
                    "simvpc associates branches by VLAN (VlanId), not GRE",
                ));
            }
            let vlan = p.number("VlanId")?.ok_or_else(|| Ec2Error {
                code: crate::query::MISSING_PARAMETER,
                message: "The request must contain the parameter VlanId".into(),
            })?;
            let vlan = u16::try_from(vlan).unwrap_or(0);
            let token = p.get("ClientToken").map(str::to_string);
            map(
                vpc.associate_trunk_interface(now, branch, trunk, vlan, token.as_deref()),
                |a, x| {
                    x.node("interfaceAssociation", |x| association(x, &a));
                    if let Some(token) = &token {
                        x.leaf("clientToken", token);
                    }
                },
            )
        }
        "DisassociateTrunkInterface" => map(
            vpc.disassociate_trunk_interface(now, p.required("AssociationId")?),
            |(), x| returned_true(x),
        ),
        "DescribeTrunkInterfaceAssociations" => {
            let ids = p.list("AssociationId");
            let mut trunk = None;
            for (name, values) in p.filters() {
                match (name.as_str(), values.as_slice()) {
                    ("trunk-interface-association.trunk-interface-id", [one]) => {
                        trunk = Some(one.clone())
                    }
                    _ => {
                        return Err(invalid(format!(
                            "simvpc filters trunk associations by trunk-interface-association.trunk-interface-id (one value), not {name}"
                        )))
                    }
                }
            }
            map(
                vpc.describe_trunk_interface_associations(now, &ids, trunk.as_deref()),
                |associations, x| {
                    x.items("interfaceAssociationSet", &associations, association);
                },
            )
        }
        "DescribeNetworkInterfaces" => {
            let ids = p.list("NetworkInterfaceId");
            let filters = p.filters();
            let page = match p.number("MaxResults")? {
                Some(size) => {
                    let start = match p.get("NextToken") {
                        Some(token) => token
                            .parse()
                            .map_err(|_| invalid(format!("Invalid NextToken {token}")))?,
                        None => 0,
                    };
                    Some((start, size as usize))
                }
                None => None,
            };
            map(
                vpc.describe_network_interfaces(now, &ids, &filters, page),
                |(enis, next), x| {
                    x.items("networkInterfaceSet", &enis, interface);
                    if let Some(next) = next {
                        x.leaf("nextToken", next);
                    }
                },
            )
        }
        "DescribeInstances" => {
            let ids = p.list("InstanceId");
            if ids.is_empty() {
                return Err(invalid("simvpc describes instances by InstanceId"));
            }
            let mut instances = Vec::new();
            let mut latency = Duration::ZERO;
            for id in &ids {
                let reply = vpc.describe_instance(now, id);
                latency = latency.max(reply.latency);
                match reply.result {
                    Ok((instance, _)) => instances.push(instance),
                    Err(e) => {
                        return Ok(Outcome {
                            result: Err(e),
                            latency,
                        })
                    }
                }
            }
            let mut x = Xml::new();
            x.items("reservationSet", &instances, |x, instance| {
                x.leaf("reservationId", format!("r-{}", &instance.id[2..]))
                    .leaf("ownerId", OWNER_ID)
                    .items("instancesSet", [instance], |x, instance| {
                        instance_item(x, vpc, instance)
                    });
            });
            Outcome {
                result: Ok(x),
                latency,
            }
        }
        "DescribeSubnets" => {
            let ids = p.list("SubnetId");
            let filters = p.filters();
            let vpc_id = vpc.vpc_id.clone();
            map(
                vpc.describe_subnets_where(now, |s| {
                    (ids.is_empty() || ids.contains(&s.id))
                        && filters
                            .iter()
                            .all(|(name, values)| s.matches(&vpc_id, name, values))
                }),
                |subnets, x| {
                    x.items("subnetSet", subnets, |x, (subnet, cidr, free)| {
                        x.leaf("subnetId", &subnet.id)
                            .leaf("state", "available")
                            .leaf("vpcId", &vpc_id)
                            .leaf("cidrBlock", cidr)
                            .leaf("availableIpAddressCount", free)
                            .leaf("availabilityZone", &subnet.az)
                            .leaf("ownerId", OWNER_ID)
                            .leaf("assignIpv6AddressOnCreation", "false")
                            .items(
                                "ipv6CidrBlockAssociationSet",
                                subnet.ipv6_cidr,
                                |x, block| {
                                    x.leaf(
                                        "associationId",
                                        format!(
                                            "subnet-cidr-assoc-{}",
                                            subnet.id.trim_start_matches("subnet-")
                                        ),
                                    )
                                    .leaf("ipv6CidrBlock", block)
                                    .node(
                                        "ipv6CidrBlockState",
                                        |x| {
                                            x.leaf("state", "associated");
                                        },
                                    );
                                },
                            );
                        tag_set(x, subnet.tags.iter());
                    });
                },
            )
        }
        "DescribeInstanceTypes" => {
            let mut x = Xml::new();
            let mut found = Vec::new();
            for name in p.list("InstanceType") {
                found.push(ipam::limits::lookup(&name).ok_or_else(|| {
                    Ec2Error {
                        code: "InvalidInstanceType",
                        message: format!(
                            "The following supplied instance types do not exist: [{name}]"
                        )
                        .into(),
                    }
                })?);
            }
            x.items("instanceTypeSet", found, |x, limits| {
                x.leaf("instanceType", &limits.instance_type)
                    .leaf("bareMetal", limits.bare_metal)
                    .node("vCpuInfo", |x| {
                        x.leaf("defaultVCpus", limits.vcpus);
                    })
                    .node("networkInfo", |x| {
                        x.leaf(
                            "maximumNetworkInterfaces",
                            limits.cards.iter().map(|c| c.1).sum::<u32>(),
                        )
                        .leaf("ipv4AddressesPerInterface", limits.ipv4_per_eni)
                        .leaf("ipv6AddressesPerInterface", limits.ipv6_per_eni)
                        .leaf("maximumNetworkCards", limits.cards.len())
                        .leaf("defaultNetworkCardIndex", limits.default_card)
                        .items(
                            "networkCards",
                            &limits.cards,
                            |x, (card, max)| {
                                x.leaf("networkCardIndex", card)
                                    .leaf("maximumNetworkInterfaces", max);
                            },
                        );
                    });
                if !limits.hypervisor.is_empty() {
                    x.leaf("hypervisor", &limits.hypervisor);
                }
            });
            Outcome::immediate(Ok(x))
        }
        other => {
            return Err(Ec2Error {
                code: INVALID_ACTION,
                message: format!("The action {other} is not valid for this web service.").into(),
            })
        }
    })
}

fn tag_set<'a>(x: &mut Xml, tags: impl Iterator<Item = (&'a String, &'a String)>) {
    x.items("tagSet", tags, |x, (k, v)| {
        x.leaf("key", k).leaf("value", v);
    });
}

fn association(x: &mut Xml, a: &TrunkAssociation) {
    x.leaf("associationId", &a.id)
        .leaf("branchInterfaceId", &a.branch_id)
        .leaf("trunkInterfaceId", &a.trunk_id)
        .leaf("interfaceProtocol", "VLAN")
        .leaf("vlanId", a.vlan_id);
}

fn interface(x: &mut Xml, eni: &NetworkInterface) {
    x.leaf("networkInterfaceId", &eni.id)
        .leaf("subnetId", &eni.subnet_id)
        .leaf("vpcId", &eni.vpc_id)
        .leaf("availabilityZone", &eni.az)
        .leaf("description", &eni.description)
        .leaf("ownerId", OWNER_ID)
        .leaf("requesterManaged", "false")
        .leaf("status", eni.status())
        .leaf("macAddress", &eni.mac)
        .leaf("privateIpAddress", eni.primary_ip)
        .leaf("sourceDestCheck", "true")
        .leaf("interfaceType", &eni.interface_type)
        .items("groupSet", &eni.security_groups, |x, group| {
            x.leaf("groupId", group).leaf("groupName", group);
        });
    if let Some(a) = &eni.attachment {
        x.node("attachment", |x| {
            x.leaf("attachmentId", &a.id)
                .leaf("instanceId", &a.instance_id)
                .leaf("instanceOwnerId", OWNER_ID)
                .leaf("deviceIndex", a.device_index)
                .leaf("networkCardIndex", a.network_card_index)
                .leaf("status", a.status.as_str())
                .leaf("deleteOnTermination", a.delete_on_termination);
        });
    }
    tag_set(x, eni.tags.iter());
    let addresses = std::iter::once((eni.primary_ip, true))
        .chain(eni.secondary_ips.iter().map(|ip| (*ip, false)));
    x.items("privateIpAddressesSet", addresses, |x, (ip, primary)| {
        x.leaf("privateIpAddress", ip).leaf("primary", primary);
    })
    .items("ipv4PrefixSet", &eni.prefixes, |x, prefix| {
        x.leaf("ipv4Prefix", prefix);
    })
    .items("ipv6PrefixSet", &eni.ipv6_prefixes, |x, prefix| {
        x.leaf("ipv6Prefix", prefix);
    });
}

fn instance_item(x: &mut Xml, vpc: &SimVpc, instance: &simvpc::Instance) {
    let enis: Vec<&NetworkInterface> = vpc
        .interfaces()
        .filter(|e| {
            e.attachment
                .as_ref()
                .is_some_and(|a| a.instance_id == instance.id)
        })
        .collect();
    let primary_ip = enis
        .iter()
        .find(|e| e.id == instance.primary_eni)
        .map(|e| e.primary_ip.to_string())
        .unwrap_or_default();
    x.leaf("instanceId", &instance.id)
        .leaf("instanceType", &instance.instance_type)
        .node("placement", |x| {
            x.leaf("availabilityZone", &instance.az);
        })
        .node("instanceState", |x| {
            x.leaf("code", 16).leaf("name", "running");
        })
        .leaf("subnetId", &instance.subnet_id)
        .leaf("vpcId", &vpc.vpc_id)
        .leaf("privateIpAddress", primary_ip)
        .items("networkInterfaceSet", enis, interface);
}
