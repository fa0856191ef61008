//! What the policy asks of EC2 and how it ended: the words shared by the policy (which decides
//! actions and learns from their outcomes), the pool (which accounts for them while they run) and the
//! choreography (which carries them out).

use crate::branches::{Branch, GroupSet};
use crate::net::Ipv4Cidr;
use crate::pool::EniInfo;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressKind {
    /// A secondary /32.
    Ip,
    /// A /28 prefix.
    Prefix,
}

impl AddressKind {
    pub fn size(self) -> u32 {
        match self {
            AddressKind::Ip => 1,
            AddressKind::Prefix => 16,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubnetTarget {
    /// This subnet (the ENIConfig's under custom networking).
    Subnet(String),
    /// Subnet discovery (upstream-ipamd.md §2.6): the tagged subnets of the node's AZ with the most free
    /// addresses, falling back to the primary subnet.
    Discover { primary: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// AssignPrivateIpAddresses on an attached ENI.
    AssignAddresses {
        eni: String,
        kind: AddressKind,
        count: u32,
    },
    /// CreateNetworkInterface carrying its addresses, then attach it at the lowest free device index.
    CreateEni {
        subnet: SubnetTarget,
        security_groups: Vec<String>,
        kind: AddressKind,
        count: u32,
    },
    /// UnassignPrivateIpAddresses of idle /32s and /28s of one ENI.
    ReleaseAddresses { eni: String, cidrs: Vec<Ipv4Cidr> },
    /// Detach and delete an ENI without pods.
    FreeEni { eni: String },
    /// DescribeNetworkInterfaces of one ENI whose state we got wrong.
    ResyncEni { eni: String },
    /// Security groups for pods: CreateNetworkInterface with `InterfaceType=trunk` (no addresses),
    /// attached like any other ENI; it carries the node's branch ENIs.
    CreateTrunk {
        subnet: String,
        security_groups: Vec<String>,
    },
    /// CreateNetworkInterface with `InterfaceType=branch` and the pod's groups in the trunk's subnet,
    /// then AssociateTrunkInterface under `vlan`.
    CreateBranch {
        groups: GroupSet,
        vlan: u16,
        trunk: String,
        subnet_id: String,
        subnet: Ipv4Cidr,
    },
    /// DisassociateTrunkInterface, then DeleteNetworkInterface.
    FreeBranch { branch: Branch },
}

impl Action {
    /// Whether it is about branch ENIs, which [`crate::branches::Branches`] accounts for (the pool
    /// and the policy have no part in them).
    pub fn is_branch(&self) -> bool {
        matches!(
            self,
            Action::CreateBranch { .. } | Action::FreeBranch { .. }
        )
    }

    pub fn eni(&self) -> Option<&str> {
        match self {
            Action::AssignAddresses { eni, .. }
            | Action::ReleaseAddresses { eni, .. }
            | Action::FreeEni { eni }
            | Action::ResyncEni { eni } => Some(eni),
            Action::CreateEni { .. }
            | Action::CreateTrunk { .. }
            | Action::CreateBranch { .. }
            | Action::FreeBranch { .. } => None,
        }
    }

    pub fn kind(&self) -> Option<AddressKind> {
        match self {
            Action::AssignAddresses { kind, .. } | Action::CreateEni { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// How an EC2 call the policy asked for ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// AssignAddresses: the /32s or /28s EC2 added to the ENI.
    Assigned(Vec<Ipv4Cidr>),
    /// CreateEni: the attached ENI and the addresses it was created with.
    EniCreated {
        eni: EniInfo,
        blocks: Vec<Ipv4Cidr>,
    },
    /// ReleaseAddresses or FreeEni succeeded.
    Done,
    /// ResyncEni: the addresses EC2 says the ENI has (None: the ENI no longer exists).
    Synced(Option<Vec<Ipv4Cidr>>),
    /// CreateBranch: the branch, associated with the trunk.
    BranchCreated(Branch),
    Failed(Failure),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// InsufficientFreeAddressesInSubnet.
    InsufficientAddresses,
    /// InsufficientCidrBlocks: no free aligned /28 in the subnet.
    InsufficientCidr,
    /// PrivateIpAddressLimitExceeded: our count of the ENI's addresses is wrong.
    AddressLimitExceeded,
    /// AttachmentLimitExceeded: the instance has more ENIs than we know of.
    AttachmentLimitExceeded,
    /// The ENI is gone.
    EniNotFound,
    /// Anything else after the caller's retries: try again later.
    Other,
}
