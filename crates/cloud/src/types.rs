use std::net::Ipv4Addr;

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

/// A branch ENI's association with a trunk, as DescribeTrunkInterfaceAssociations lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrunkAssociation {
    pub association_id: String,
    pub branch_id: String,
    pub vlan: u16,
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
