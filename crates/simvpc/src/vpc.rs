use crate::addresses::{SubnetAddresses, IPV6_SUBNET_LEN};
use crate::throttle::{Category, TokenBucket};
use ipam::limits::{self, InstanceLimits};
use ipam::{Ipv4Cidr, Ipv6Cidr, Time};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

/// EC2's error codes, as EC2 spells them.
mod security;
mod trunk;
pub use security::{Flow, Protocol, Rule, SecurityGroup};
pub use trunk::{TrunkAssociation, VLAN_IDS};

pub mod codes {
    pub const INSUFFICIENT_ADDRESSES: &str = "InsufficientFreeAddressesInSubnet";
    pub const INSUFFICIENT_CIDR: &str = "InsufficientCidrBlocks";
    pub const ADDRESS_LIMIT: &str = "PrivateIpAddressLimitExceeded";
    pub const ATTACHMENT_LIMIT: &str = "AttachmentLimitExceeded";
    pub const ENI_IN_USE: &str = "InvalidNetworkInterface.InUse";
    pub const ENI_NOT_FOUND: &str = "InvalidNetworkInterfaceID.NotFound";
    pub const ATTACHMENT_NOT_FOUND: &str = "InvalidAttachmentID.NotFound";
    pub const INSTANCE_NOT_FOUND: &str = "InvalidInstanceID.NotFound";
    pub const SUBNET_NOT_FOUND: &str = "InvalidSubnetID.NotFound";
    pub const THROTTLED: &str = "RequestLimitExceeded";
    pub const INVALID_PARAMETER: &str = "InvalidParameterValue";
    pub const INVALID_COMBINATION: &str = "InvalidParameterCombination";
    pub const NOT_PERMITTED: &str = "OperationNotPermitted";
    pub const UNAVAILABLE: &str = "Unavailable";
    pub const UNAUTHORIZED: &str = "UnauthorizedOperation";
    pub const ASSOCIATION_NOT_FOUND: &str = "InvalidAssociationID.NotFound";
    /// Not an EC2 code: the client gave up waiting. The call may or may not have taken effect.
    pub const TIMEOUT: &str = "RequestTimeout";
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ec2Error {
    pub code: &'static str,
    /// Borrowed for the fixed messages: a throttled call, the commonest reply of a busy day, then
    /// costs no allocation.
    pub message: std::borrow::Cow<'static, str>,
}

impl Ec2Error {
    fn new(code: &'static str, message: impl Into<std::borrow::Cow<'static, str>>) -> Ec2Error {
        Ec2Error {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Ec2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Ec2Error {}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    DescribeInstances,
    DescribeNetworkInterfaces,
    DescribeSubnets,
    CreateNetworkInterface,
    AttachNetworkInterface,
    DetachNetworkInterface,
    DeleteNetworkInterface,
    ModifyNetworkInterfaceAttribute,
    AssignPrivateIpAddresses,
    UnassignPrivateIpAddresses,
    AssignIpv6Addresses,
    UnassignIpv6Addresses,
    CreateTags,
    AssociateTrunkInterface,
    DisassociateTrunkInterface,
    DescribeTrunkInterfaceAssociations,
}

impl Op {
    pub const ALL: [Op; 16] = [
        Op::DescribeInstances,
        Op::DescribeNetworkInterfaces,
        Op::DescribeSubnets,
        Op::CreateNetworkInterface,
        Op::AttachNetworkInterface,
        Op::DetachNetworkInterface,
        Op::DeleteNetworkInterface,
        Op::ModifyNetworkInterfaceAttribute,
        Op::AssignPrivateIpAddresses,
        Op::UnassignPrivateIpAddresses,
        Op::AssignIpv6Addresses,
        Op::UnassignIpv6Addresses,
        Op::CreateTags,
        Op::AssociateTrunkInterface,
        Op::DisassociateTrunkInterface,
        Op::DescribeTrunkInterfaceAssociations,
    ];

    pub fn category(self) -> Category {
        match self {
            Op::DescribeInstances
            | Op::DescribeNetworkInterfaces
            | Op::DescribeSubnets
            | Op::DescribeTrunkInterfaceAssociations => Category::NonMutating,
            _ => Category::Mutating,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::DescribeInstances => "DescribeInstances",
            Op::DescribeNetworkInterfaces => "DescribeNetworkInterfaces",
            Op::DescribeSubnets => "DescribeSubnets",
            Op::CreateNetworkInterface => "CreateNetworkInterface",
            Op::AttachNetworkInterface => "AttachNetworkInterface",
            Op::DetachNetworkInterface => "DetachNetworkInterface",
            Op::DeleteNetworkInterface => "DeleteNetworkInterface",
            Op::ModifyNetworkInterfaceAttribute => "ModifyNetworkInterfaceAttribute",
            Op::AssignPrivateIpAddresses => "AssignPrivateIpAddresses",
            Op::UnassignPrivateIpAddresses => "UnassignPrivateIpAddresses",
            Op::AssignIpv6Addresses => "AssignIpv6Addresses",
            Op::UnassignIpv6Addresses => "UnassignIpv6Addresses",
            Op::CreateTags => "CreateTags",
            Op::AssociateTrunkInterface => "AssociateTrunkInterface",
            Op::DisassociateTrunkInterface => "DisassociateTrunkInterface",
            Op::DescribeTrunkInterfaceAssociations => "DescribeTrunkInterfaceAssociations",
        }
    }
}

/// How the simulated EC2 behaves: latencies, the account's buckets, and injected faults.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Mean latency per call; each call gets ±25 % of uniform jitter.
    pub latency: HashMap<Op, Duration>,
    pub default_latency: Duration,
    /// (capacity, refill per second) per category, for the whole account.
    pub buckets: BTreeMap<Category, (f64, f64)>,
    /// Share of calls that fail with `Unavailable` and take no effect.
    pub error_rate: f64,
    /// Share of calls whose reply is lost after `timeout`: half of them took effect.
    pub timeout_rate: f64,
    pub timeout: Duration,
    /// How long a detaching ENI stays `detaching`.
    pub detach_delay: Duration,
    /// Operations the caller's IAM role does not allow: they fail with `UnauthorizedOperation`.
    pub denied: BTreeSet<Op>,
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        let ms = Duration::from_millis;
        SimConfig {
            latency: HashMap::from([
                (Op::CreateNetworkInterface, ms(400)),
                (Op::AttachNetworkInterface, ms(1500)),
                (Op::AssignPrivateIpAddresses, ms(250)),
                (Op::DetachNetworkInterface, ms(300)),
                (Op::DeleteNetworkInterface, ms(250)),
            ]),
            default_latency: ms(150),
            buckets: BTreeMap::from([
                (Category::NonMutating, (100.0, 20.0)),
                (Category::Mutating, (50.0, 5.0)),
            ]),
            error_rate: 0.0,
            timeout_rate: 0.0,
            timeout: Duration::from_secs(10),
            detach_delay: Duration::from_secs(2),
            denied: BTreeSet::new(),
            seed: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subnet {
    pub id: String,
    pub az: String,
    pub tags: BTreeMap<String, String>,
    /// The /64 associated with the subnet, out of one of the VPC's IPv6 blocks.
    pub ipv6_cidr: Option<Ipv6Cidr>,
}

impl Subnet {
    /// Whether a DescribeSubnets filter (`availability-zone`, `vpc-id`, `subnet-id`, `tag-key`,
    /// `tag:<key>`) selects this subnet of VPC `vpc_id`. Unknown filters match nothing, as EC2
    /// rejects them.
    pub fn matches(&self, vpc_id: &str, name: &str, values: &[String]) -> bool {
        let any = |v: &str| values.iter().any(|x| x == v);
        match name {
            "availability-zone" | "availabilityZone" => any(&self.az),
            "vpc-id" => any(vpc_id),
            "subnet-id" => any(&self.id),
            "tag-key" => self.tags.keys().any(|k| any(k)),
            _ => match name.strip_prefix("tag:") {
                Some(key) => self.tags.get(key).is_some_and(|v| any(v)),
                None => false,
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachmentStatus {
    Attached,
    Detaching { until: Time },
}

impl AttachmentStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            AttachmentStatus::Attached => "attached",
            AttachmentStatus::Detaching { .. } => "detaching",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub id: String,
    pub instance_id: String,
    pub device_index: u32,
    pub network_card_index: u32,
    pub status: AttachmentStatus,
    pub delete_on_termination: bool,
}

/// A network interface as DescribeNetworkInterfaces shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkInterface {
    pub id: String,
    pub subnet_id: String,
    pub subnet_cidr: Ipv4Cidr,
    pub vpc_id: String,
    pub az: String,
    pub mac: String,
    pub description: String,
    pub security_groups: Vec<String>,
    pub tags: BTreeMap<String, String>,
    pub interface_type: String,
    pub primary_ip: Ipv4Addr,
    pub secondary_ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Ipv4Cidr>,
    /// Delegated /80s. They count against the instance type's IPv6 addresses per interface, not
    /// against its IPv4 slots.
    pub ipv6_prefixes: Vec<Ipv6Cidr>,
    pub attachment: Option<Attachment>,
}

impl NetworkInterface {
    /// "in-use" while attached or detaching, "available" once detached (EC2's `status`).
    pub fn status(&self) -> &'static str {
        if self.attachment.is_some() {
            "in-use"
        } else {
            "available"
        }
    }

    /// Address slots used: EC2 counts the primary, each secondary IP and each prefix against the limit.
    pub fn slots(&self) -> u32 {
        1 + self.secondary_ips.len() as u32 + self.prefixes.len() as u32
    }

    /// The pool's view of this ENI, attached at `device` (0: the instance's primary ENI).
    pub fn eni_info(&self, device: u32) -> ipam::pool::EniInfo {
        ipam::pool::EniInfo {
            id: self.id.clone(),
            device_number: device,
            subnet_id: self.subnet_id.clone(),
            subnet_cidr: self.subnet_cidr,
            primary_ip: self.primary_ip,
            is_primary: device == 0,
            is_trunk: false,
            is_efa: false,
            excluded: false,
        }
    }

    /// As DescribeNetworkInterfaces puts it on the wire, in the shared types of the EC2 boundary.
    pub fn to_ec2(&self) -> ipam::ec2::Eni {
        ipam::ec2::Eni {
            id: self.id.clone(),
            mac: self.mac.clone(),
            subnet_id: self.subnet_id.clone(),
            vpc_id: self.vpc_id.clone(),
            availability_zone: self.az.clone(),
            description: self.description.clone(),
            status: self.status().into(),
            primary_ip: Some(self.primary_ip),
            secondary_ips: self.secondary_ips.clone(),
            prefixes: self.prefixes.clone(),
            ipv6_prefixes: self.ipv6_prefixes.clone(),
            security_groups: self.security_groups.clone(),
            tags: self.tags.clone(),
            interface_type: ipam::ownership::InterfaceType::parse(&self.interface_type),
            attachment: self.attachment.as_ref().map(|a| ipam::ec2::EniAttachment {
                id: a.id.clone(),
                instance_id: a.instance_id.clone(),
                device_index: a.device_index,
                network_card: a.network_card_index,
                status: a.status.as_str().into(),
                delete_on_termination: a.delete_on_termination,
            }),
        }
    }
}

/// An ENI attached to an instance from the start, as `preattach` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preattached {
    pub device_index: u32,
    pub network_card: u32,
    /// EC2's `InterfaceType`: interface, trunk, efa, efa-only.
    pub interface_type: String,
    pub secondary_addresses: u32,
    pub tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub struct Instance {
    pub id: String,
    pub instance_type: String,
    pub limits: InstanceLimits,
    pub az: String,
    pub subnet_id: String,
    pub primary_eni: String,
    pub security_groups: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct CreateEniRequest {
    pub subnet_id: String,
    pub description: String,
    pub security_groups: Vec<String>,
    pub secondary_ip_count: u32,
    pub prefix_count: u32,
    pub tags: BTreeMap<String, String>,
    /// EC2's idempotency token: a repeat with the same token returns the ENI the first call made.
    pub client_token: Option<String>,
    /// `interface` (the default), `trunk` or `branch`.
    pub interface_type: Option<String>,
}

impl From<&ipam::ec2::CreateEni> for CreateEniRequest {
    fn from(c: &ipam::ec2::CreateEni) -> CreateEniRequest {
        CreateEniRequest {
            subnet_id: c.subnet_id.clone(),
            description: c.description.clone(),
            security_groups: c.security_groups.clone(),
            secondary_ip_count: c.secondary_ips,
            prefix_count: c.prefixes,
            tags: c.tags.iter().cloned().collect(),
            client_token: Some(c.client_token.clone()),
            interface_type: c.interface_type.map(str::to_string),
        }
    }
}

/// A Describe filter: EC2's name (`attachment.instance-id`, `tag:<key>`, `tag-key`, `status`, ...) and values.
pub type Filter = (String, Vec<String>);

/// One call's outcome and how long the caller waits for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply<T> {
    pub result: Result<T, Ec2Error>,
    pub latency: Duration,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallCount {
    pub ok: u64,
    pub throttled: u64,
    pub failed: u64,
}

pub struct SimVpc {
    pub vpc_id: String,
    pub cidrs: Vec<Ipv4Cidr>,
    /// The VPC's IPv6 blocks (Amazon-provided ones are /56s); none unless set up.
    pub ipv6_cidrs: Vec<Ipv6Cidr>,
    subnets: BTreeMap<String, (Subnet, SubnetAddresses)>,
    enis: BTreeMap<String, NetworkInterface>,
    instances: BTreeMap<String, Instance>,
    /// ENIs attached (or detaching) per instance: attach and DescribeInstances must not scan the VPC.
    attached: HashMap<String, Vec<String>>,
    /// Attachment id to ENI id.
    attachment_enis: HashMap<String, String>,
    /// ENIs detaching, and when they become available, soonest first: every call settles those
    /// due, and a list scanned on each call made a 10,000-node day four times slower per event.
    detaching: BinaryHeap<Reverse<(Time, String)>>,
    /// Client token of each CreateNetworkInterface that took effect, to the ENI it made.
    client_tokens: HashMap<String, String>,
    /// Branch ENIs on trunk ENIs, by association id, and the client token of each that was given one.
    associations: BTreeMap<String, TrunkAssociation>,
    association_tokens: HashMap<String, String>,
    /// The groups given rules (`define_security_group`); others are not modelled.
    security_groups: BTreeMap<String, SecurityGroup>,
    buckets: BTreeMap<Category, TokenBucket>,
    config: SimConfig,
    rng: SmallRng,
    next_id: u64,
    pub calls: BTreeMap<Op, CallCount>,
}

/// What a call does before touching any state: throttle, inject faults, pick a latency.
enum Gate {
    Proceed(Duration),
    Refuse(Ec2Error, Duration),
    /// The reply is lost; `apply` says whether the call took effect anyway.
    TimedOut {
        apply: bool,
        after: Duration,
    },
}

impl SimVpc {
    pub fn new(cidr: Ipv4Cidr, config: SimConfig) -> SimVpc {
        let buckets = config
            .buckets
            .iter()
            .map(|(c, (cap, rate))| (*c, TokenBucket::new(*cap, *rate, Time::ZERO)))
            .collect();
        SimVpc {
            vpc_id: "vpc-00000001".into(),
            cidrs: vec![cidr],
            ipv6_cidrs: Vec::new(),
            subnets: BTreeMap::new(),
            enis: BTreeMap::new(),
            instances: BTreeMap::new(),
            attached: HashMap::new(),
            attachment_enis: HashMap::new(),
            detaching: BinaryHeap::new(),
            client_tokens: HashMap::new(),
            associations: BTreeMap::new(),
            association_tokens: HashMap::new(),
            security_groups: BTreeMap::new(),
            buckets,
            rng: SmallRng::seed_from_u64(config.seed),
            config,
            next_id: 1,
            calls: BTreeMap::new(),
        }
    }

    pub fn config_mut(&mut self) -> &mut SimConfig {
        &mut self.config
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{:017x}", self.next_id)
    }

    // ---- set-up, outside EC2's API: no latency, no throttling ----

    pub fn add_subnet(
        &mut self,
        cidr: Ipv4Cidr,
        az: &str,
        tags: &[(&str, &str)],
    ) -> Result<String, String> {
        if !self.cidrs.iter().any(|v| v.contains_cidr(&cidr)) {
            return Err(format!("{cidr} is outside the VPC's CIDRs"));
        }
        if let Some((s, _)) = self
            .subnets
            .values()
            .find(|(_, a)| a.cidr().overlaps(&cidr))
        {
            return Err(format!("{cidr} overlaps {}", s.id));
        }
        let id = self.id("subnet");
        let tags = tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.subnets.insert(
            id.clone(),
            (
                Subnet {
                    id: id.clone(),
                    az: az.into(),
                    tags,
                    ipv6_cidr: None,
                },
                SubnetAddresses::new(cidr),
            ),
        );
        Ok(id)
    }

    pub fn add_cidr(&mut self, cidr: Ipv4Cidr) {
        self.cidrs.push(cidr);
    }

    pub fn add_ipv6_cidr(&mut self, cidr: Ipv6Cidr) {
        self.ipv6_cidrs.push(cidr);
    }

    /// Associates a /64 out of the VPC's IPv6 blocks with a subnet.
    pub fn associate_subnet_ipv6(&mut self, subnet_id: &str, cidr: Ipv6Cidr) -> Result<(), String> {
        if cidr.prefix_len() != IPV6_SUBNET_LEN {
            return Err(format!("{cidr}: a subnet's IPv6 block is a /64"));
        }
        if !self.ipv6_cidrs.iter().any(|v| v.contains_cidr(&cidr)) {
            return Err(format!("{cidr} is outside the VPC's IPv6 CIDRs"));
        }
        if let Some((s, _)) = self
            .subnets
            .values()
            .find(|(s, _)| s.ipv6_cidr.is_some_and(|c| c.overlaps(&cidr)))
        {
            return Err(format!("{cidr} overlaps {}", s.id));
        }
        let (subnet, addrs) = self
            .subnets
            .get_mut(subnet_id)
            .ok_or_else(|| format!("no subnet {subnet_id}"))?;
        if let Some(had) = subnet.ipv6_cidr {
            return Err(format!("{subnet_id} already has {had}"));
        }
        subnet.ipv6_cidr = Some(cidr);
        addrs.set_ipv6(cidr);
        Ok(())
    }

    /// A subnet CIDR reservation of type prefix.
    pub fn reserve_for_prefixes(&mut self, subnet_id: &str, cidr: Ipv4Cidr) -> Result<(), String> {
        let (_, a) = self
            .subnets
            .get_mut(subnet_id)
            .ok_or_else(|| format!("no subnet {subnet_id}"))?;
        if !a.cidr().contains_cidr(&cidr) {
            return Err(format!("{cidr} is outside {subnet_id}"));
        }
        a.reserve_for_prefixes(cidr);
        Ok(())
    }

    /// Launches an instance with its primary ENI at device index 0.
    pub fn launch_instance(
        &mut self,
        instance_type: &str,
        subnet_id: &str,
        security_groups: &[&str],
    ) -> Result<String, String> {
        let limits = limits::lookup(instance_type)
            .ok_or_else(|| format!("unknown instance type {instance_type}"))?
            .clone();
        let (subnet, addrs) = self
            .subnets
            .get_mut(subnet_id)
            .ok_or_else(|| format!("no subnet {subnet_id}"))?;
        let az = subnet.az.clone();
        let ip = addrs
            .take_ips(1, &mut self.rng)
            .ok_or_else(|| format!("{subnet_id} is full"))?[0];
        let id = self.id("i");
        let eni_id = self.id("eni");
        let sgs: Vec<String> = security_groups.iter().map(|s| s.to_string()).collect();
        let eni = self.interface(
            &eni_id,
            subnet_id,
            ip,
            "primary network interface",
            &sgs,
            BTreeMap::new(),
        );
        self.enis.insert(eni_id.clone(), eni);
        self.instances.insert(
            id.clone(),
            Instance {
                id: id.clone(),
                instance_type: instance_type.into(),
                limits,
                az,
                subnet_id: subnet_id.into(),
                primary_eni: eni_id.clone(),
                security_groups: sgs,
            },
        );
        let attachment = self.id("eni-attach");
        self.attached
            .entry(id.clone())
            .or_default()
            .push(eni_id.clone());
        self.enis.get_mut(&eni_id).expect("just added").attachment = Some(Attachment {
            id: attachment,
            instance_id: id.clone(),
            device_index: 0,
            network_card_index: 0,
            status: AttachmentStatus::Attached,
            delete_on_termination: true,
        });
        Ok(id)
    }

    /// An ENI the instance had before any CNI ran (Multus, EFA, a trunk, a DPDK port), attached
    /// at set-up with EC2's rules on device indexes, cards and address limits.
    pub fn preattach(&mut self, instance_id: &str, eni: &Preattached) -> Result<String, String> {
        let inst = self
            .instances
            .get(instance_id)
            .ok_or_else(|| format!("no instance {instance_id}"))?;
        let (limits, subnet_id, sgs) = (
            inst.limits.clone(),
            inst.subnet_id.clone(),
            inst.security_groups.clone(),
        );
        let Some(&(_, card_max)) = limits.cards.iter().find(|(c, _)| *c == eni.network_card) else {
            return Err(format!(
                "{} has no network card {}",
                limits.instance_type, eni.network_card
            ));
        };
        let on_card: Vec<u32> = self
            .attachments_of(instance_id)
            .filter(|a| a.network_card_index == eni.network_card)
            .map(|a| a.device_index)
            .collect();
        if on_card.contains(&eni.device_index) {
            return Err(format!(
                "device index {} on card {} is taken",
                eni.device_index, eni.network_card
            ));
        }
        if on_card.len() as u32 >= card_max {
            return Err(format!(
                "{} allows {card_max} ENIs on card {}",
                limits.instance_type, eni.network_card
            ));
        }
        if 1 + eni.secondary_addresses > limits.ipv4_per_eni {
            return Err(format!(
                "{} allows {} addresses per ENI",
                limits.instance_type, limits.ipv4_per_eni
            ));
        }
        let (_, addrs) = self
            .subnets
            .get_mut(&subnet_id)
            .expect("the instance's subnet");
        let ips = addrs
            .take_ips(1 + eni.secondary_addresses, &mut self.rng)
            .ok_or_else(|| format!("{subnet_id} is full"))?;
        let id = self.id("eni");
        let mut interface = self.interface(
            &id,
            &subnet_id,
            ips[0],
            "attached before the CNI",
            &sgs,
            eni.tags.clone(),
        );
        interface.interface_type = eni.interface_type.clone();
        interface.secondary_ips = ips[1..].to_vec();
        let attachment = self.id("eni-attach");
        interface.attachment = Some(Attachment {
            id: attachment.clone(),
            instance_id: instance_id.into(),
            device_index: eni.device_index,
            network_card_index: eni.network_card,
            status: AttachmentStatus::Attached,
            delete_on_termination: true,
        });
        self.enis.insert(id.clone(), interface);
        self.attached
            .entry(instance_id.to_string())
            .or_default()
            .push(id.clone());
        self.attachment_enis.insert(attachment, id.clone());
        Ok(id)
    }

    /// Someone else (an operator, another tool) unassigns a secondary address of an ENI: set-up,
    /// outside the API, so that tests can change the VPC behind the CNI's back.
    pub fn take_address(&mut self, eni_id: &str, ip: Ipv4Addr) -> Result<(), String> {
        let eni = self
            .enis
            .get_mut(eni_id)
            .ok_or_else(|| format!("no ENI {eni_id}"))?;
        let before = eni.secondary_ips.len();
        eni.secondary_ips.retain(|a| *a != ip);
        if eni.secondary_ips.len() == before {
            return Err(format!("{eni_id} has no secondary address {ip}"));
        }
        let subnet = eni.subnet_id.clone();
        self.subnets
            .get_mut(&subnet)
            .expect("ENIs live in known subnets")
            .1
            .release(ip);
        Ok(())
    }

    /// Someone else detaches an ENI; the detach completes at once. Set-up, outside the API.
    pub fn detach_now(&mut self, eni_id: &str) -> Result<(), String> {
        let eni = self
            .enis
            .get_mut(eni_id)
            .ok_or_else(|| format!("no ENI {eni_id}"))?;
        let a = eni
            .attachment
            .take()
            .ok_or_else(|| format!("{eni_id} is not attached"))?;
        self.attachment_enis.remove(&a.id);
        if let Some(list) = self.attached.get_mut(&a.instance_id) {
            list.retain(|e| e != eni_id);
        }
        self.detaching.retain(|Reverse((_, id))| id != eni_id);
        Ok(())
    }

    /// Terminates an instance: ENIs with DeleteOnTermination go, the others are left `available` (leaked).
    pub fn terminate_instance(&mut self, instance_id: &str) {
        self.instances.remove(instance_id);
        let attached = self.attached.remove(instance_id).unwrap_or_default();
        self.drop_associations_of_instance(&attached);
        for id in attached {
            let eni = self.enis.get_mut(&id).expect("listed");
            if eni
                .attachment
                .take()
                .expect("attached")
                .delete_on_termination
            {
                self.remove_interface(&id);
            }
        }
    }

    fn interface(
        &mut self,
        id: &str,
        subnet_id: &str,
        primary_ip: Ipv4Addr,
        description: &str,
        sgs: &[String],
        tags: BTreeMap<String, String>,
    ) -> NetworkInterface {
        let (subnet, addrs) = &self.subnets[subnet_id];
        let n = self.next_id;
        NetworkInterface {
            id: id.into(),
            subnet_id: subnet_id.into(),
            subnet_cidr: addrs.cidr(),
            vpc_id: self.vpc_id.clone(),
            az: subnet.az.clone(),
            mac: format!(
                "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                (n >> 32) & 0xff,
                (n >> 24) & 0xff,
                (n >> 16) & 0xff,
                (n >> 8) & 0xff,
                n & 0xff
            ),
            description: description.into(),
            security_groups: sgs.to_vec(),
            tags,
            interface_type: "interface".into(),
            primary_ip,
            secondary_ips: vec![],
            prefixes: vec![],
            ipv6_prefixes: vec![],
            attachment: None,
        }
    }

    fn remove_interface(&mut self, id: &str) {
        if let Some(eni) = self.enis.remove(id) {
            let (_, addrs) = self
                .subnets
                .get_mut(&eni.subnet_id)
                .expect("ENIs live in known subnets");
            addrs.release(eni.primary_ip);
            for ip in eni.secondary_ips {
                addrs.release(ip);
            }
            for p in eni.prefixes {
                addrs.release_prefix(p);
            }
            for p in eni.ipv6_prefixes {
                addrs.release_ipv6_prefix(p);
            }
        }
    }

    // ---- inspection for tests and reports (no API cost) ----

    pub fn instance(&self, id: &str) -> Option<&Instance> {
        self.instances.get(id)
    }

    pub fn subnet(&self, id: &str) -> Option<&Subnet> {
        self.subnets.get(id).map(|(s, _)| s)
    }

    pub fn interfaces(&self) -> impl Iterator<Item = &NetworkInterface> {
        self.enis.values()
    }

    pub fn subnet_free(&self, subnet_id: &str) -> Option<(u32, u32)> {
        self.subnets
            .get(subnet_id)
            .map(|(_, a)| (a.free(), a.free_prefixes()))
    }

    /// Settles detachments that have finished by `now`.
    fn settle(&mut self, now: Time) {
        while self
            .detaching
            .peek()
            .is_some_and(|Reverse((t, _))| *t <= now)
        {
            let Reverse((_, id)) = self.detaching.pop().expect("just peeked");
            if let Some(a) = self.enis.get_mut(&id).and_then(|e| e.attachment.take()) {
                self.attachment_enis.remove(&a.id);
                if let Some(list) = self.attached.get_mut(&a.instance_id) {
                    list.retain(|e| *e != id);
                }
            }
        }
    }

    fn attachments_of(&self, instance_id: &str) -> impl Iterator<Item = &Attachment> {
        self.attached
            .get(instance_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.enis.get(id).and_then(|e| e.attachment.as_ref()))
    }

    fn gate(&mut self, op: Op, now: Time) -> Gate {
        let mean = self
            .config
            .latency
            .get(&op)
            .copied()
            .unwrap_or(self.config.default_latency);
        let latency = mean.mul_f64(self.rng.gen_range(0.75..1.25));
        let count = self.calls.entry(op).or_default();
        if self.config.denied.contains(&op) {
            count.failed += 1;
            return Gate::Refuse(
                Ec2Error::new(
                    codes::UNAUTHORIZED,
                    format!(
                        "You are not authorized to perform this operation: ec2:{}",
                        op.name()
                    ),
                ),
                latency / 4,
            );
        }
        if let Some(bucket) = self.buckets.get_mut(&op.category()) {
            if bucket.take(now).is_err() {
                count.throttled += 1;
                return Gate::Refuse(
                    Ec2Error::new(codes::THROTTLED, "Request limit exceeded."),
                    latency / 4,
                );
            }
        }
        if self.config.error_rate > 0.0 && self.rng.gen_bool(self.config.error_rate) {
            count.failed += 1;
            return Gate::Refuse(
                Ec2Error::new(codes::UNAVAILABLE, "The service is unavailable."),
                latency,
            );
        }
        if self.config.timeout_rate > 0.0 && self.rng.gen_bool(self.config.timeout_rate) {
            count.failed += 1;
            return Gate::TimedOut {
                apply: self.rng.gen_bool(0.5),
                after: self.config.timeout,
            };
        }
        Gate::Proceed(latency)
    }

    /// Runs one API call through the gate, and counts how it ended.
    fn call<T>(
        &mut self,
        op: Op,
        now: Time,
        f: impl FnOnce(&mut Self) -> Result<T, Ec2Error>,
    ) -> Reply<T> {
        self.settle(now);
        match self.gate(op, now) {
            Gate::Refuse(e, latency) => Reply {
                result: Err(e),
                latency,
            },
            Gate::TimedOut { apply, after } => {
                if apply {
                    let _ = f(self);
                }
                Reply {
                    result: Err(Ec2Error::new(
                        codes::TIMEOUT,
                        "no reply before the client's timeout",
                    )),
                    latency: after,
                }
            }
            Gate::Proceed(latency) => {
                let result = f(self);
                let count = self.calls.entry(op).or_default();
                if result.is_ok() {
                    count.ok += 1;
                } else {
                    count.failed += 1;
                }
                Reply { result, latency }
            }
        }
    }

    fn eni(&self, id: &str) -> Result<&NetworkInterface, Ec2Error> {
        self.enis.get(id).ok_or_else(|| {
            Ec2Error::new(
                codes::ENI_NOT_FOUND,
                format!("The networkInterface ID '{id}' does not exist"),
            )
        })
    }

    fn eni_mut(&mut self, id: &str) -> Result<&mut NetworkInterface, Ec2Error> {
        self.enis.get_mut(id).ok_or_else(|| {
            Ec2Error::new(
                codes::ENI_NOT_FOUND,
                format!("The networkInterface ID '{id}' does not exist"),
            )
        })
    }

    /// The attached instance's limits, if the ENI is attached.
    fn attached_limits(&self, eni: &NetworkInterface) -> Option<&InstanceLimits> {
        eni.attachment
            .as_ref()
            .and_then(|a| self.instances.get(&a.instance_id))
            .map(|i| &i.limits)
    }

    /// The most address slots an ENI may hold: the attached instance's limit, or the largest of any type.
    fn slot_limit(&self, eni: &NetworkInterface) -> u32 {
        self.attached_limits(eni).map_or(50, |l| l.ipv4_per_eni)
    }

    /// The most IPv6 addresses and prefixes an ENI may hold, on the same terms.
    fn ipv6_limit(&self, eni: &NetworkInterface) -> u32 {
        self.attached_limits(eni).map_or(50, |l| l.ipv6_per_eni)
    }

    // ---- the EC2 API ----

    /// `req` is built only once the call is let through: a throttled call costs no copy of it.
    pub fn create_network_interface(
        &mut self,
        now: Time,
        req: impl Into<CreateEniRequest>,
    ) -> Reply<NetworkInterface> {
        self.call(Op::CreateNetworkInterface, now, |vpc| {
            let req: CreateEniRequest = req.into();
            if let Some(made) = req
                .client_token
                .as_ref()
                .and_then(|t| vpc.client_tokens.get(t))
                .and_then(|id| vpc.enis.get(id))
            {
                return Ok(made.clone());
            }
            let interface_type = match req.interface_type.as_deref() {
                None | Some("interface") => "interface",
                Some(kind @ ("trunk" | "branch")) => kind,
                Some(other) => {
                    return Err(Ec2Error::new(
                        codes::INVALID_PARAMETER,
                        format!("simvpc makes interface, trunk and branch ENIs, not {other:?}"),
                    ))
                }
            };
            let Some((_, addrs)) = vpc.subnets.get_mut(&req.subnet_id) else {
                return Err(Ec2Error::new(
                    codes::SUBNET_NOT_FOUND,
                    format!("The subnet ID '{}' does not exist", req.subnet_id),
                ));
            };
            if req.secondary_ip_count > 0 && req.prefix_count > 0 {
                return Err(Ec2Error::new(
                    codes::INVALID_COMBINATION,
                    "secondary IP and prefix counts cannot be combined",
                ));
            }
            if 1 + req.secondary_ip_count + req.prefix_count > 50 {
                return Err(Ec2Error::new(
                    codes::ADDRESS_LIMIT,
                    "Number of private addresses exceeds limit.",
                ));
            }
            let rng = &mut vpc.rng;
            let Some(primary) = addrs.take_ips(1, rng) else {
                return Err(Ec2Error::new(
                    codes::INSUFFICIENT_ADDRESSES,
                    "insufficient free addresses in the subnet",
                ));
            };
            let Some(ips) = addrs.take_ips(req.secondary_ip_count, rng) else {
                addrs.release(primary[0]);
                return Err(Ec2Error::new(
                    codes::INSUFFICIENT_ADDRESSES,
                    "insufficient free addresses in the subnet",
                ));
            };
            let Some(prefixes) = addrs.take_prefixes(req.prefix_count, rng) else {
                addrs.release(primary[0]);
                return Err(Ec2Error::new(
                    codes::INSUFFICIENT_CIDR,
                    "There are not enough free cidr blocks in the specified subnet",
                ));
            };
            let id = vpc.id("eni");
            let mut eni = vpc.interface(
                &id,
                &req.subnet_id,
                primary[0],
                &req.description,
                &req.security_groups,
                req.tags,
            );
            eni.secondary_ips = ips;
            eni.prefixes = prefixes;
            eni.interface_type = interface_type.into();
            if let Some(token) = req.client_token {
                vpc.client_tokens.insert(token, id.clone());
            }
            vpc.enis.insert(id, eni.clone());
            Ok(eni)
        })
    }

    pub fn attach_network_interface(
        &mut self,
        now: Time,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
        network_card_index: u32,
    ) -> Reply<String> {
        self.call(Op::AttachNetworkInterface, now, |vpc| {
            let inst = vpc.instances.get(instance_id).ok_or_else(|| {
                Ec2Error::new(codes::INSTANCE_NOT_FOUND, format!("The instance ID '{instance_id}' does not exist"))
            })?;
            let eni = vpc.enis.get(eni_id).ok_or_else(|| {
                Ec2Error::new(codes::ENI_NOT_FOUND, format!("The networkInterface ID '{eni_id}' does not exist"))
            })?;
            if eni.attachment.is_some() {
                return Err(Ec2Error::new(codes::ENI_IN_USE, format!("Interface: [{eni_id}] in use.")));
            }
            if eni.az != inst.az {
                return Err(Ec2Error::new(codes::INVALID_COMBINATION, "the ENI and the instance are in different availability zones"));
            }
            let Some(&(_, card_max)) = inst.limits.cards.iter().find(|(c, _)| *c == network_card_index) else {
                return Err(Ec2Error::new(codes::INVALID_PARAMETER, format!("network card index {network_card_index} does not exist")));
            };
            vpc.check_trunk_attach(
                eni,
                &inst.instance_type,
                vpc.attached.get(instance_id).map_or(&[][..], Vec::as_slice),
            )?;
            let on_instance: Vec<&Attachment> = vpc.attachments_of(instance_id).collect();
            if on_instance.iter().any(|a| a.device_index == device_index && a.network_card_index == network_card_index) {
                return Err(Ec2Error::new(
                    codes::INVALID_PARAMETER,
                    format!("Instance '{instance_id}' already has an interface attached at device index '{device_index}'."),
                ));
            }
            if on_instance.iter().filter(|a| a.network_card_index == network_card_index).count() as u32 >= card_max {
                return Err(Ec2Error::new(
                    codes::ATTACHMENT_LIMIT,
                    format!("Interface count {} exceeds the limit for {}", card_max + 1, inst.instance_type),
                ));
            }
            if eni.slots() > inst.limits.ipv4_per_eni || eni.ipv6_prefixes.len() as u32 > inst.limits.ipv6_per_eni {
                return Err(Ec2Error::new(codes::ADDRESS_LIMIT, "the interface has more addresses than the instance type allows"));
            }
            let id = vpc.id("eni-attach");
            vpc.attached.entry(instance_id.to_string()).or_default().push(eni_id.to_string());
            vpc.attachment_enis.insert(id.clone(), eni_id.to_string());
            vpc.enis.get_mut(eni_id).expect("checked").attachment = Some(Attachment {
                id: id.clone(),
                instance_id: instance_id.into(),
                device_index,
                network_card_index,
                status: AttachmentStatus::Attached,
                delete_on_termination: false,
            });
            Ok(id)
        })
    }

    pub fn set_delete_on_termination(&mut self, now: Time, eni_id: &str, value: bool) -> Reply<()> {
        self.call(Op::ModifyNetworkInterfaceAttribute, now, |vpc| {
            let eni = vpc.eni_mut(eni_id)?;
            let a = eni.attachment.as_mut().ok_or_else(|| {
                Ec2Error::new(codes::INVALID_PARAMETER, "the interface is not attached")
            })?;
            a.delete_on_termination = value;
            Ok(())
        })
    }

    pub fn set_security_groups(&mut self, now: Time, eni_id: &str, groups: &[String]) -> Reply<()> {
        self.call(Op::ModifyNetworkInterfaceAttribute, now, |vpc| {
            vpc.eni_mut(eni_id)?.security_groups = groups.to_vec();
            Ok(())
        })
    }

    pub fn detach_network_interface(&mut self, now: Time, attachment_id: &str) -> Reply<()> {
        let delay = self.config.detach_delay;
        self.call(Op::DetachNetworkInterface, now, |vpc| {
            let eni_id = vpc.attachment_enis.get(attachment_id).cloned();
            let eni = eni_id.and_then(|id| vpc.enis.get_mut(&id)).ok_or_else(|| {
                Ec2Error::new(
                    codes::ATTACHMENT_NOT_FOUND,
                    format!("The attachment ID '{attachment_id}' does not exist"),
                )
            })?;
            let eni_id = eni.id.clone();
            if let Some(e) = vpc.trunk_in_use(&vpc.enis[&eni_id]) {
                return Err(e);
            }
            let eni = vpc.enis.get_mut(&eni_id).expect("just found");
            let a = eni.attachment.as_mut().expect("found by attachment");
            if a.device_index == 0 && a.network_card_index == 0 {
                return Err(Ec2Error::new(
                    codes::NOT_PERMITTED,
                    "The primary network interface cannot be detached",
                ));
            }
            if a.status == AttachmentStatus::Attached {
                a.status = AttachmentStatus::Detaching { until: now + delay };
                let id = eni.id.clone();
                vpc.detaching.push(Reverse((now + delay, id)));
            }
            Ok(())
        })
    }

    pub fn delete_network_interface(&mut self, now: Time, eni_id: &str) -> Reply<()> {
        self.call(Op::DeleteNetworkInterface, now, |vpc| {
            if let Some(e) = vpc.trunk_in_use(vpc.eni(eni_id)?) {
                return Err(e);
            }
            if vpc.eni_mut(eni_id)?.attachment.is_some() {
                return Err(Ec2Error::new(
                    codes::ENI_IN_USE,
                    format!("The network interface '{eni_id}' is currently in use."),
                ));
            }
            vpc.remove_interface(eni_id);
            Ok(())
        })
    }

    /// AssignPrivateIpAddresses with SecondaryPrivateIpAddressCount or Ipv4PrefixCount.
    pub fn assign_private_ip_addresses(
        &mut self,
        now: Time,
        eni_id: &str,
        ip_count: u32,
        prefix_count: u32,
    ) -> Reply<(Vec<Ipv4Addr>, Vec<Ipv4Cidr>)> {
        self.call(Op::AssignPrivateIpAddresses, now, |vpc| {
            if (ip_count == 0) == (prefix_count == 0) {
                return Err(Ec2Error::new(
                    codes::INVALID_PARAMETER,
                    "give exactly one of a secondary IP count and a prefix count",
                ));
            }
            let eni = vpc.enis.get(eni_id).ok_or_else(|| {
                Ec2Error::new(
                    codes::ENI_NOT_FOUND,
                    format!("The networkInterface ID '{eni_id}' does not exist"),
                )
            })?;
            if eni.slots() + ip_count + prefix_count > vpc.slot_limit(eni) {
                return Err(Ec2Error::new(
                    codes::ADDRESS_LIMIT,
                    "Number of private addresses will exceed limit.",
                ));
            }
            let subnet = eni.subnet_id.clone();
            let (_, addrs) = vpc.subnets.get_mut(&subnet).expect("known subnet");
            let ips = addrs.take_ips(ip_count, &mut vpc.rng).ok_or_else(|| {
                Ec2Error::new(
                    codes::INSUFFICIENT_ADDRESSES,
                    "insufficient free addresses in the subnet",
                )
            })?;
            let prefixes = addrs
                .take_prefixes(prefix_count, &mut vpc.rng)
                .ok_or_else(|| {
                    Ec2Error::new(
                        codes::INSUFFICIENT_CIDR,
                        "There are not enough free cidr blocks in the specified subnet",
                    )
                })?;
            let eni = vpc.enis.get_mut(eni_id).expect("checked");
            eni.secondary_ips.extend(&ips);
            eni.prefixes.extend(&prefixes);
            Ok((ips, prefixes))
        })
    }

    /// UnassignPrivateIpAddresses with PrivateIpAddresses and/or Ipv4Prefixes; unknown addresses are an error
    /// and nothing is released.
    pub fn unassign_private_ip_addresses(
        &mut self,
        now: Time,
        eni_id: &str,
        ips: &[Ipv4Addr],
        prefixes: &[Ipv4Cidr],
    ) -> Reply<()> {
        self.call(Op::UnassignPrivateIpAddresses, now, |vpc| {
            let eni = vpc.eni_mut(eni_id)?;
            if let Some(ip) = ips.iter().find(|ip| !eni.secondary_ips.contains(ip)) {
                return Err(Ec2Error::new(codes::INVALID_PARAMETER, format!("Some of the specified addresses are not assigned to interface {eni_id}: {ip}")));
            }
            if let Some(p) = prefixes.iter().find(|p| !eni.prefixes.contains(p)) {
                return Err(Ec2Error::new(codes::INVALID_PARAMETER, format!("Prefix {p} is not assigned to interface {eni_id}")));
            }
            eni.secondary_ips.retain(|ip| !ips.contains(ip));
            eni.prefixes.retain(|p| !prefixes.contains(p));
            let subnet = eni.subnet_id.clone();
            let (_, addrs) = vpc.subnets.get_mut(&subnet).expect("known subnet");
            for ip in ips {
                addrs.release(*ip);
            }
            for p in prefixes {
                addrs.release_prefix(*p);
            }
            Ok(())
        })
    }

    /// AssignIpv6Addresses with Ipv6PrefixCount: /80s out of the ENI's subnet's IPv6 block.
    pub fn assign_ipv6_prefixes(
        &mut self,
        now: Time,
        eni_id: &str,
        count: u32,
    ) -> Reply<Vec<Ipv6Cidr>> {
        self.call(Op::AssignIpv6Addresses, now, |vpc| {
            if count == 0 {
                return Err(Ec2Error::new(
                    codes::INVALID_PARAMETER,
                    "Ipv6PrefixCount must be at least 1",
                ));
            }
            let eni = vpc.enis.get(eni_id).ok_or_else(|| {
                Ec2Error::new(
                    codes::ENI_NOT_FOUND,
                    format!("The networkInterface ID '{eni_id}' does not exist"),
                )
            })?;
            // EC2 does not document its code for this case; the IPv4 one makes the engine react the
            // same way (resync the ENI from EC2).
            if eni.ipv6_prefixes.len() as u32 + count > vpc.ipv6_limit(eni) {
                return Err(Ec2Error::new(
                    codes::ADDRESS_LIMIT,
                    "Number of IPv6 addresses and prefixes will exceed limit.",
                ));
            }
            let subnet = eni.subnet_id.clone();
            let (_, addrs) = vpc.subnets.get_mut(&subnet).expect("known subnet");
            if addrs.ipv6_cidr().is_none() {
                return Err(Ec2Error::new(
                    codes::INVALID_PARAMETER,
                    format!("The subnet '{subnet}' has no IPv6 CIDR block"),
                ));
            }
            let prefixes = addrs
                .take_ipv6_prefixes(count, &mut vpc.rng)
                .ok_or_else(|| {
                    Ec2Error::new(
                        codes::INSUFFICIENT_CIDR,
                        "There are not enough free cidr blocks in the specified subnet",
                    )
                })?;
            vpc.enis
                .get_mut(eni_id)
                .expect("checked")
                .ipv6_prefixes
                .extend(&prefixes);
            Ok(prefixes)
        })
    }

    /// UnassignIpv6Addresses with Ipv6Prefixes; a prefix the ENI does not hold is an error and nothing
    /// is released.
    pub fn unassign_ipv6_prefixes(
        &mut self,
        now: Time,
        eni_id: &str,
        prefixes: &[Ipv6Cidr],
    ) -> Reply<()> {
        self.call(Op::UnassignIpv6Addresses, now, |vpc| {
            let eni = vpc.eni_mut(eni_id)?;
            if let Some(p) = prefixes.iter().find(|p| !eni.ipv6_prefixes.contains(p)) {
                return Err(Ec2Error::new(
                    codes::INVALID_PARAMETER,
                    format!("Prefix {p} is not assigned to interface {eni_id}"),
                ));
            }
            eni.ipv6_prefixes.retain(|p| !prefixes.contains(p));
            let subnet = eni.subnet_id.clone();
            let (_, addrs) = vpc.subnets.get_mut(&subnet).expect("known subnet");
            for p in prefixes {
                addrs.release_ipv6_prefix(*p);
            }
            Ok(())
        })
    }

    pub fn create_tags(&mut self, now: Time, eni_id: &str, tags: &[(String, String)]) -> Reply<()> {
        self.call(Op::CreateTags, now, |vpc| {
            let eni = vpc.eni_mut(eni_id)?;
            eni.tags.extend(tags.iter().cloned());
            Ok(())
        })
    }

    /// DescribeNetworkInterfaces by ids (an unknown id is NotFound, as in EC2) and filters, paginated.
    pub fn describe_network_interfaces(
        &mut self,
        now: Time,
        ids: &[String],
        filters: &[Filter],
        page: Option<(usize, usize)>,
    ) -> Reply<(Vec<NetworkInterface>, Option<usize>)> {
        self.call(Op::DescribeNetworkInterfaces, now, |vpc| {
            if let Some(id) = ids.iter().find(|id| !vpc.enis.contains_key(*id)) {
                return Err(Ec2Error::new(
                    codes::ENI_NOT_FOUND,
                    format!("The networkInterface ID '{id}' does not exist"),
                ));
            }
            let mut out: Vec<NetworkInterface> = vpc
                .enis
                .values()
                .filter(|e| ids.is_empty() || ids.contains(&e.id))
                .filter(|e| {
                    filters
                        .iter()
                        .all(|(name, values)| matches_filter(e, name, values))
                })
                .cloned()
                .collect();
            let next = match page {
                Some((start, max)) => {
                    let rest = out.split_off(start.min(out.len()));
                    out = rest;
                    (out.len() > max).then(|| {
                        out.truncate(max);
                        start + max
                    })
                }
                None => None,
            };
            Ok((out, next))
        })
    }

    pub fn describe_instance(
        &mut self,
        now: Time,
        instance_id: &str,
    ) -> Reply<(Instance, Vec<Attachment>)> {
        self.call(Op::DescribeInstances, now, |vpc| {
            let inst = vpc.instances.get(instance_id).cloned().ok_or_else(|| {
                Ec2Error::new(
                    codes::INSTANCE_NOT_FOUND,
                    format!("The instance ID '{instance_id}' does not exist"),
                )
            })?;
            let atts = vpc.attachments_of(instance_id).cloned().collect();
            Ok((inst, atts))
        })
    }

    /// DescribeSubnets of one AZ: (subnet, free addresses), as AvailableIpAddressCount reports them.
    pub fn describe_subnets(&mut self, now: Time, az: &str) -> Reply<Vec<(Subnet, Ipv4Cidr, u32)>> {
        self.describe_subnets_where(now, |s| s.az == az)
    }

    /// DescribeSubnets with EC2's filters (all must match), in the shared types of the EC2 boundary.
    pub fn describe_subnets_filtered(
        &mut self,
        now: Time,
        filters: &[Filter],
    ) -> Reply<Vec<ipam::ec2::SubnetInfo>> {
        let vpc_id = self.vpc_id.clone();
        let reply = self.describe_subnets_where(now, |s| {
            filters
                .iter()
                .all(|(name, values)| s.matches(&vpc_id, name, values))
        });
        Reply {
            result: reply.result.map(|found| {
                found
                    .into_iter()
                    .map(|(s, cidr, free)| ipam::ec2::SubnetInfo {
                        id: s.id,
                        availability_zone: s.az,
                        cidr: Some(cidr),
                        ipv6_cidr: s.ipv6_cidr,
                        free_addresses: free,
                        tags: s.tags,
                    })
                    .collect()
            }),
            latency: reply.latency,
        }
    }

    /// DescribeSubnets with the caller's filter (ids, tags, AZ): (subnet, CIDR, free addresses).
    pub fn describe_subnets_where(
        &mut self,
        now: Time,
        select: impl Fn(&Subnet) -> bool,
    ) -> Reply<Vec<(Subnet, Ipv4Cidr, u32)>> {
        self.call(Op::DescribeSubnets, now, |vpc| {
            Ok(vpc
                .subnets
                .values()
                .filter(|(s, _)| select(s))
                .map(|(s, a)| (s.clone(), a.cidr(), a.free()))
                .collect())
        })
    }
}

fn matches_filter(e: &NetworkInterface, name: &str, values: &[String]) -> bool {
    let any = |v: &str| values.iter().any(|x| x == v);
    match name {
        "network-interface-id" => any(&e.id),
        "attachment.instance-id" => e.attachment.as_ref().is_some_and(|a| any(&a.instance_id)),
        "attachment.status" => any(e
            .attachment
            .as_ref()
            .map_or("detached", |a| a.status.as_str())),
        "status" => any(e.status()),
        "vpc-id" => any(&e.vpc_id),
        "subnet-id" => any(&e.subnet_id),
        "description" => any(&e.description),
        "tag-key" => values.iter().any(|k| e.tags.contains_key(k)),
        _ => match name.strip_prefix("tag:") {
            Some(key) => e.tags.get(key).is_some_and(|v| any(v)),
            // EC2 rejects unknown filter names; matching nothing is the safe reading here.
            None => false,
        },
    }
}
