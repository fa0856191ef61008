use ipam::net::{Ipv4Cidr, Ipv6Cidr};
use ipam::ownership::InterfaceType;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniAttachment {
    pub id: String,
    pub instance_id: String,
    pub device_index: u32,
    pub network_card: u32,
    pub status: String,
    pub delete_on_termination: bool,
}

/// A network interface as EC2 describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Eni {
    pub id: String,
    pub mac: String,
    pub subnet_id: String,
    pub vpc_id: String,
    pub availability_zone: String,
    pub description: String,
    /// `available`, `in-use`, ...
    pub status: String,
    pub primary_ip: Option<Ipv4Addr>,
    pub secondary_ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Ipv4Cidr>,
    /// Delegated IPv6 /80s.
    pub ipv6_prefixes: Vec<Ipv6Cidr>,
    pub security_groups: Vec<String>,
    pub tags: BTreeMap<String, String>,
    pub interface_type: InterfaceType,
    pub attachment: Option<EniAttachment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateEni {
    pub subnet_id: String,
    pub description: String,
    pub security_groups: Vec<String>,
    pub secondary_ips: u32,
    pub prefixes: u32,
    pub tags: Vec<(String, String)>,
    /// EC2's idempotency token; repeat a creation whose outcome is unknown with the same token and
    /// EC2 returns the ENI the first call made instead of making another. Empty: a fresh one.
    pub client_token: String,
}

/// Which ENIs to describe: by id, by filter (`tag:<key>`, `attachment.instance-id`, `status`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EniQuery {
    pub ids: Vec<String>,
    pub filters: Vec<(String, Vec<String>)>,
    /// Page size; EC2 allows 5 to 1000.
    pub page_size: Option<u32>,
}

impl EniQuery {
    pub fn by_id(id: &str) -> EniQuery {
        EniQuery {
            ids: vec![id.to_string()],
            ..EniQuery::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetInfo {
    pub id: String,
    pub availability_zone: String,
    pub cidr: Option<Ipv4Cidr>,
    /// The subnet's associated IPv6 block, if it has one.
    pub ipv6_cidr: Option<Ipv6Cidr>,
    pub free_addresses: u32,
    pub tags: BTreeMap<String, String>,
}

/// An ENI as DescribeInstances lists it: enough to pick a free device index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceEni {
    pub id: String,
    pub mac: String,
    pub primary_ip: Option<Ipv4Addr>,
    pub device_index: u32,
    pub network_card: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub id: String,
    pub instance_type: String,
    pub availability_zone: String,
    pub subnet_id: String,
    pub primary_ip: Option<Ipv4Addr>,
    pub enis: Vec<InstanceEni>,
}
