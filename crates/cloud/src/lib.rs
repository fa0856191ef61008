//! The boundary to EC2: the calls the daemon makes as a trait ([`Ec2`]), their implementation on the
//! official AWS SDK ([`aws::AwsEc2`]), what each error means for the engine ([`error`]), and
//! client-side pacing ([`throttle`]).

#![forbid(unsafe_code)]

pub mod aws;
pub mod gc;
pub mod identity;
pub mod throttle;
mod types;

pub use ipam::ec2::{classify, CloudError, CreateEni, Eni, EniAttachment, ErrorKind, SubnetInfo};
pub use types::*;

use ipam::limits::InstanceLimits;
use ipam::net::{Ipv4Cidr, Ipv6Cidr};
use std::future::Future;
use std::net::Ipv4Addr;

pub type Result<T, E = CloudError> = std::result::Result<T, E>;

/// The EC2 calls of a node. Throttled calls are retried inside (they did not happen); every other
/// error is returned classified. Deleting or detaching what is already gone succeeds.
pub trait Ec2: Send + Sync {
    /// Calls EC2 throttled so far (and retried inside), by operation, for the metrics.
    fn throttled(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    fn describe_instance(
        &self,
        instance_id: &str,
    ) -> impl Future<Output = Result<InstanceInfo>> + Send;
    /// All pages.
    fn describe_network_interfaces(
        &self,
        query: &EniQuery,
    ) -> impl Future<Output = Result<Vec<Eni>>> + Send;
    fn create_network_interface(
        &self,
        request: &CreateEni,
    ) -> impl Future<Output = Result<Eni>> + Send;
    /// Returns the attachment id.
    fn attach_network_interface(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
        network_card: u32,
    ) -> impl Future<Output = Result<String>> + Send;
    fn set_delete_on_termination(
        &self,
        eni_id: &str,
        attachment_id: &str,
    ) -> impl Future<Output = Result<()>> + Send;
    fn set_security_groups(
        &self,
        eni_id: &str,
        groups: &[String],
    ) -> impl Future<Output = Result<()>> + Send;
    fn assign_private_ips(
        &self,
        eni_id: &str,
        count: u32,
    ) -> impl Future<Output = Result<Vec<Ipv4Addr>>> + Send;
    fn assign_prefixes(
        &self,
        eni_id: &str,
        count: u32,
    ) -> impl Future<Output = Result<Vec<Ipv4Cidr>>> + Send;
    fn unassign(
        &self,
        eni_id: &str,
        ips: &[Ipv4Addr],
        prefixes: &[Ipv4Cidr],
    ) -> impl Future<Output = Result<()>> + Send;
    /// AssignIpv6Addresses with Ipv6PrefixCount: `count` /80s out of the subnet's IPv6 block, the ones
    /// EC2 picked in its reply.
    fn assign_ipv6_prefixes(
        &self,
        eni_id: &str,
        count: u32,
    ) -> impl Future<Output = Result<Vec<Ipv6Cidr>>> + Send;
    fn unassign_ipv6_prefixes(
        &self,
        eni_id: &str,
        prefixes: &[Ipv6Cidr],
    ) -> impl Future<Output = Result<()>> + Send;
    fn detach_network_interface(
        &self,
        attachment_id: &str,
    ) -> impl Future<Output = Result<()>> + Send;
    fn delete_network_interface(&self, eni_id: &str) -> impl Future<Output = Result<()>> + Send;
    /// AssociateTrunkInterface (security groups for pods): `branch_id` on `trunk_id` under `vlan`.
    /// Returns the association id; a repeat with the same token returns the first association.
    fn associate_trunk_interface(
        &self,
        branch_id: &str,
        trunk_id: &str,
        vlan: u16,
        client_token: &str,
    ) -> impl Future<Output = Result<String>> + Send;
    fn disassociate_trunk_interface(
        &self,
        association_id: &str,
    ) -> impl Future<Output = Result<()>> + Send;
    /// DescribeTrunkInterfaceAssociations of one trunk, every page.
    fn describe_trunk_interface_associations(
        &self,
        trunk_id: &str,
    ) -> impl Future<Output = Result<Vec<TrunkAssociation>>> + Send;
    fn create_tags(
        &self,
        resource_id: &str,
        tags: &[(String, String)],
    ) -> impl Future<Output = Result<()>> + Send;
    /// Limits for an instance type missing from the built-in table.
    fn describe_instance_type(
        &self,
        instance_type: &str,
    ) -> impl Future<Output = Result<InstanceLimits>> + Send;
    fn describe_subnets(
        &self,
        filters: &[(String, Vec<String>)],
    ) -> impl Future<Output = Result<Vec<SubnetInfo>>> + Send;
}
