//! Runs the engine's actions: each one becomes the EC2 calls it is made of (and, for ENIs, the node's
//! link setup), and ends in the `Outcome` the pool expects. A bounded number run at once.

use crate::log;
use crate::metrics::Metrics;
use cloud::aws::AwsEc2;
use cloud::gc::{CLUSTER_TAG, CREATED_AT_TAG, DESCRIPTION_PREFIX, INSTANCE_TAG};
use cloud::{CloudError, CreateEni, Ec2, Eni, EniQuery, ErrorKind};
use datapath::node::{self, EniLink};
use ipam::ownership::route_table;
use ipam::pool::{EniInfo, Failure, Outcome};
use ipam::subnets::{self, Candidate};
use ipam::{Action, AddressKind, Ipv4Cidr, SubnetTarget};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;

/// EC2 actions running at once; more wait their turn (the client's buckets pace them further).
const CONCURRENCY: usize = 8;
/// A hot-plugged ENI's link shows up a moment after the attach returns.
const LINK_WAIT: Duration = Duration::from_secs(10);
/// A detaching ENI cannot be deleted until EC2 finishes the detach (2 to 3 s, sometimes more).
const DELETE_TRIES: u32 = 30;
/// A creation whose outcome is unknown is repeated with its token this many times.
const CREATE_TRIES: u32 = 3;

/// What the actions need to know about the node.
#[derive(Clone, Debug)]
pub struct NodeFacts {
    pub instance_id: String,
    pub availability_zone: String,
    pub vpc_id: String,
    pub cluster_name: Option<String>,
    pub extra_tags: BTreeMap<String, String>,
    pub eni_mtu: u32,
    /// Device indexes 1 to this minus one may be used for new ENIs.
    pub max_enis: u32,
}

/// An ENI as the node's links know it.
#[derive(Clone, Debug)]
struct Attached {
    link: EniLink,
    attachment_id: String,
    device: u32,
}

#[derive(Default)]
struct Known {
    /// Device indexes taken, or promised to an attach in flight.
    devices: BTreeSet<u32>,
    attached: HashMap<String, Attached>,
    subnet_cidrs: HashMap<String, Ipv4Cidr>,
}

/// How an action ended, and the EC2 error behind a failure.
pub struct Report {
    pub outcome: Outcome,
    pub error: Option<CloudError>,
}

impl Report {
    fn ok(outcome: Outcome) -> Report {
        Report {
            outcome,
            error: None,
        }
    }

    fn failed(error: CloudError) -> Report {
        Report {
            outcome: Outcome::Failed(failure_of(&error)),
            error: Some(error),
        }
    }
}

pub fn failure_of(error: &CloudError) -> Failure {
    match error.kind {
        ErrorKind::InsufficientAddresses => Failure::InsufficientAddresses,
        ErrorKind::InsufficientCidr => Failure::InsufficientCidr,
        ErrorKind::AddressLimitExceeded => Failure::AddressLimitExceeded,
        ErrorKind::AttachmentLimitExceeded => Failure::AttachmentLimitExceeded,
        ErrorKind::NotFound => Failure::EniNotFound,
        _ => Failure::Other,
    }
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn blocks_of(eni: &Eni) -> Vec<Ipv4Cidr> {
    eni.secondary_ips
        .iter()
        .map(|ip| Ipv4Cidr::host(*ip))
        .chain(eni.prefixes.iter().copied())
        .collect()
}

fn internal(operation: &'static str, message: String) -> CloudError {
    CloudError {
        kind: ErrorKind::Other,
        operation,
        code: "NodeSetup".into(),
        message,
    }
}

pub struct Executor {
    pub ec2: AwsEc2,
    node: NodeFacts,
    slots: Semaphore,
    known: Mutex<Known>,
    metrics: std::sync::Arc<Metrics>,
}

impl Executor {
    pub fn new(ec2: AwsEc2, node: NodeFacts, metrics: std::sync::Arc<Metrics>) -> Executor {
        Executor {
            ec2,
            node,
            slots: Semaphore::new(CONCURRENCY),
            known: Mutex::new(Known::default()),
            metrics,
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an ENI found attached at start: its device index is taken, and a secondary one's link
    /// can be torn down when it is freed.
    pub fn adopt(&self, eni: &Eni, subnet_cidr: Ipv4Cidr) {
        let mut known = self.known();
        known
            .subnet_cidrs
            .insert(eni.subnet_id.clone(), subnet_cidr);
        let Some(attachment) = &eni.attachment else {
            return;
        };
        known.devices.insert(attachment.device_index);
        if let (Some(mac), Some(primary_ip)) = (parse_mac(&eni.mac), eni.primary_ip) {
            known.attached.insert(
                eni.id.clone(),
                Attached {
                    link: EniLink {
                        mac,
                        primary_ip,
                        subnet: (subnet_cidr.addr(), subnet_cidr.prefix_len()),
                        route_table: route_table(attachment.device_index, attachment.network_card),
                        mtu: self.node.eni_mtu,
                    },
                    attachment_id: attachment.id.clone(),
                    device: attachment.device_index,
                },
            );
        }
    }

    /// A device index on card 0 held by an ENI that is not ours: new ENIs go elsewhere.
    pub fn avoid_device(&self, device: u32) {
        self.known().devices.insert(device);
    }

    /// That ENI is gone: its device index may be used again.
    pub fn stop_avoiding(&self, device: u32) {
        self.release_device(device);
    }

    fn subnet_cidr(&self, subnet_id: &str) -> Option<Ipv4Cidr> {
        self.known().subnet_cidrs.get(subnet_id).copied()
    }

    pub fn link_of(&self, eni_id: &str) -> Option<EniLink> {
        self.known().attached.get(eni_id).map(|a| a.link.clone())
    }

    /// Times the call and counts it by operation and error code.
    pub async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = cloud::Result<T>>,
    ) -> cloud::Result<T> {
        let started = Instant::now();
        let result = call.await;
        self.metrics.ec2_call(
            operation,
            started.elapsed(),
            result.as_ref().err().map(|e| e.code.as_str()),
        );
        result
    }

    pub async fn run(&self, action: &Action) -> Report {
        let _slot = self
            .slots
            .acquire()
            .await
            .expect("the semaphore is never closed");
        match action {
            Action::AssignAddresses { eni, kind, count } => self.assign(eni, *kind, *count).await,
            Action::CreateEni {
                subnet,
                security_groups,
                kind,
                count,
            } => {
                self.create_eni(subnet, security_groups, *kind, *count)
                    .await
            }
            Action::ReleaseAddresses { eni, cidrs } => {
                let ips: Vec<Ipv4Addr> = cidrs
                    .iter()
                    .filter(|c| c.prefix_len() == 32)
                    .map(|c| c.addr())
                    .collect();
                let prefixes: Vec<Ipv4Cidr> = cidrs
                    .iter()
                    .filter(|c| c.prefix_len() < 32)
                    .copied()
                    .collect();
                match self
                    .timed(
                        "UnassignPrivateIpAddresses",
                        self.ec2.unassign(eni, &ips, &prefixes),
                    )
                    .await
                {
                    Ok(()) => Report::ok(Outcome::Done),
                    Err(e) => Report::failed(e),
                }
            }
            Action::FreeEni { eni } => self.free_eni(eni).await,
            Action::ResyncEni { eni } => {
                match self
                    .timed(
                        "DescribeNetworkInterfaces",
                        self.ec2.describe_network_interfaces(&EniQuery::by_id(eni)),
                    )
                    .await
                {
                    Ok(found) => {
                        // Still ours only while attached to this instance.
                        let here = found.iter().find(|e| {
                            e.id == *eni
                                && e.attachment
                                    .as_ref()
                                    .is_some_and(|a| a.instance_id == self.node.instance_id)
                        });
                        if here.is_none() {
                            self.forget(eni).await;
                        }
                        Report::ok(Outcome::Synced(here.map(blocks_of)))
                    }
                    Err(e) if e.kind == ErrorKind::NotFound => {
                        self.forget(eni).await;
                        Report::ok(Outcome::Synced(None))
                    }
                    Err(e) => Report::failed(e),
                }
            }
        }
    }

    /// An ENI detached or deleted behind our back: its device index is free again and what is
    /// left of its host state (the rule for its primary address) goes.
    async fn forget(&self, eni_id: &str) {
        let Some(gone) = self.known().attached.remove(eni_id) else {
            return;
        };
        self.release_device(gone.device);
        let link = gone.link;
        if let Err(e) = tokio::task::spawn_blocking(move || node::teardown_eni(&link))
            .await
            .expect("teardown does not panic")
        {
            log::warn(
                "host state of a vanished ENI",
                &[("eni", &eni_id), ("error", &e)],
            );
        }
    }

    async fn assign(&self, eni: &str, kind: AddressKind, count: u32) -> Report {
        let result = match kind {
            AddressKind::Ip => self
                .timed(
                    "AssignPrivateIpAddresses",
                    self.ec2.assign_private_ips(eni, count),
                )
                .await
                .map(|ips| ips.into_iter().map(Ipv4Cidr::host).collect()),
            AddressKind::Prefix => {
                self.timed(
                    "AssignPrivateIpAddresses",
                    self.ec2.assign_prefixes(eni, count),
                )
                .await
            }
        };
        match result {
            Ok(blocks) => Report::ok(Outcome::Assigned(blocks)),
            Err(e) => Report::failed(e),
        }
    }

    /// The subnets a new ENI may go to, best first (upstream-ipamd.md §2.6). If the subnets cannot
    /// be listed, the primary subnet, as upstream does.
    async fn discover_subnets(&self, primary: &str) -> Vec<String> {
        let filters = vec![
            (
                "availability-zone".to_string(),
                vec![self.node.availability_zone.clone()],
            ),
            ("vpc-id".to_string(), vec![self.node.vpc_id.clone()]),
        ];
        match self
            .timed("DescribeSubnets", self.ec2.describe_subnets(&filters))
            .await
        {
            Ok(found) => {
                let mut known = self.known();
                for s in &found {
                    if let Some(cidr) = s.cidr {
                        known.subnet_cidrs.insert(s.id.clone(), cidr);
                    }
                }
                let candidates: Vec<Candidate> = found
                    .into_iter()
                    .map(|s| Candidate {
                        id: s.id,
                        free_addresses: s.free_addresses,
                        tags: s.tags,
                    })
                    .collect();
                // Empty when every subnet is excluded, the primary's too: the create then fails
                // saying so, rather than putting pods where the operator said not to.
                subnets::rank(&candidates, primary, self.node.cluster_name.as_deref())
            }
            Err(e) => {
                log::warn(
                    "subnet discovery failed; using the primary subnet",
                    &[("error", &e)],
                );
                vec![primary.to_string()]
            }
        }
    }

    fn tags(&self) -> Vec<(String, String)> {
        let mut tags = vec![
            (INSTANCE_TAG.to_string(), self.node.instance_id.clone()),
            (
                CREATED_AT_TAG.to_string(),
                cloud::gc::format_rfc3339(SystemTime::now()),
            ),
        ];
        if let Some(cluster) = &self.node.cluster_name {
            tags.push((CLUSTER_TAG.to_string(), cluster.clone()));
        }
        tags.extend(self.node.extra_tags.clone());
        tags
    }

    async fn create_eni(
        &self,
        subnet: &SubnetTarget,
        security_groups: &[String],
        kind: AddressKind,
        count: u32,
    ) -> Report {
        let candidates = match subnet {
            SubnetTarget::Subnet(id) => vec![id.clone()],
            SubnetTarget::Discover { primary } => self.discover_subnets(primary).await,
        };
        let mut last_error = None;
        for subnet_id in candidates {
            let request = CreateEni {
                subnet_id,
                description: format!("{DESCRIPTION_PREFIX}{}", self.node.instance_id),
                security_groups: security_groups.to_vec(),
                secondary_ips: if kind == AddressKind::Ip { count } else { 0 },
                prefixes: if kind == AddressKind::Prefix {
                    count
                } else {
                    0
                },
                tags: self.tags(),
                client_token: cloud::aws::client_token(),
            };
            let mut created = self
                .timed(
                    "CreateNetworkInterface",
                    self.ec2.create_network_interface(&request),
                )
                .await;
            // The ENI may exist although the reply was lost: the same token returns it rather than
            // leaving it for the leaked-ENI scan.
            for _ in 1..CREATE_TRIES {
                match &created {
                    Err(e) if e.kind == ErrorKind::Unavailable => {
                        created = self
                            .timed(
                                "CreateNetworkInterface",
                                self.ec2.create_network_interface(&request),
                            )
                            .await
                    }
                    _ => break,
                }
            }
            match created {
                Ok(eni) => return self.attach_new(eni).await,
                // Another subnet of the AZ may still have room.
                Err(e)
                    if matches!(
                        e.kind,
                        ErrorKind::InsufficientAddresses | ErrorKind::InsufficientCidr
                    ) =>
                {
                    last_error = Some(e)
                }
                Err(e) => return Report::failed(e),
            }
        }
        Report::failed(last_error.unwrap_or_else(|| {
            internal(
                "CreateNetworkInterface",
                "no subnet of the node's availability zone may be used for pods (all are tagged kubernetes.io/role/cni=0 or for other clusters)".into(),
            )
        }))
    }

    fn reserve_device(&self) -> Option<u32> {
        let mut known = self.known();
        let device = (1..self.node.max_enis.max(1)).find(|d| !known.devices.contains(d))?;
        known.devices.insert(device);
        Some(device)
    }

    fn release_device(&self, device: u32) {
        self.known().devices.remove(&device);
    }

    async fn subnet_cidr_of(&self, subnet_id: &str) -> cloud::Result<Ipv4Cidr> {
        if let Some(cidr) = self.subnet_cidr(subnet_id) {
            return Ok(cidr);
        }
        let filters = vec![("subnet-id".to_string(), vec![subnet_id.to_string()])];
        let found = self
            .timed("DescribeSubnets", self.ec2.describe_subnets(&filters))
            .await?;
        let cidr = found
            .iter()
            .find(|s| s.id == subnet_id)
            .and_then(|s| s.cidr)
            .ok_or_else(|| internal("DescribeSubnets", format!("{subnet_id} has no IPv4 CIDR")))?;
        self.known()
            .subnet_cidrs
            .insert(subnet_id.to_string(), cidr);
        Ok(cidr)
    }

    /// Attach at the lowest free device index, keep the ENI on termination, configure its link.
    /// Any failure deletes the ENI, so that a failed create leaks nothing.
    async fn attach_new(&self, eni: Eni) -> Report {
        let Some(device) = self.reserve_device() else {
            self.delete_eni(&eni.id).await;
            return Report::failed(CloudError {
                kind: ErrorKind::AttachmentLimitExceeded,
                operation: "AttachNetworkInterface",
                code: "NoFreeDeviceIndex".into(),
                message: format!("all {} device indexes are in use", self.node.max_enis),
            });
        };
        let attached = async {
            let attachment_id = match self
                .timed(
                    "AttachNetworkInterface",
                    self.ec2
                        .attach_network_interface(&eni.id, &self.node.instance_id, device, 0),
                )
                .await
            {
                Ok(id) => id,
                // The reply was lost: the ENI tells whether the attach happened.
                Err(e) if e.kind == ErrorKind::Unavailable => self
                    .timed(
                        "DescribeNetworkInterfaces",
                        self.ec2
                            .describe_network_interfaces(&EniQuery::by_id(&eni.id)),
                    )
                    .await?
                    .into_iter()
                    .find_map(|found| found.attachment)
                    .filter(|a| a.instance_id == self.node.instance_id)
                    .map(|a| a.id)
                    .ok_or(e)?,
                Err(e) => return Err(e),
            };
            if let Err(e) = self
                .timed(
                    "ModifyNetworkInterfaceAttribute",
                    self.ec2.set_delete_on_termination(&eni.id, &attachment_id),
                )
                .await
            {
                // The ENI works; only its clean-up on termination is left to the leaked-ENI scan.
                log::warn(
                    "could not set DeleteOnTermination",
                    &[("eni", &eni.id), ("error", &e)],
                );
            }
            let cidr = self.subnet_cidr_of(&eni.subnet_id).await?;
            let link = EniLink {
                mac: parse_mac(&eni.mac).ok_or_else(|| {
                    internal(
                        "CreateNetworkInterface",
                        format!("MAC {:?} does not parse", eni.mac),
                    )
                })?,
                primary_ip: eni.primary_ip.ok_or_else(|| {
                    internal(
                        "CreateNetworkInterface",
                        format!("{} has no primary address", eni.id),
                    )
                })?,
                subnet: (cidr.addr(), cidr.prefix_len()),
                route_table: route_table(device, 0),
                mtu: self.node.eni_mtu,
            };
            Ok::<_, CloudError>((attachment_id, cidr, link))
        }
        .await;
        let (attachment_id, cidr, link) = match attached {
            Ok(done) => done,
            Err(e) => {
                self.delete_eni(&eni.id).await;
                self.release_device(device);
                return Report::failed(e);
            }
        };
        if let Err(e) = configure_link(link.clone()).await {
            log::error(
                "the new ENI's link could not be configured; giving the ENI back",
                &[("eni", &eni.id), ("error", &e)],
            );
            let _ = self
                .timed(
                    "DetachNetworkInterface",
                    self.ec2.detach_network_interface(&attachment_id),
                )
                .await;
            self.delete_eni(&eni.id).await;
            self.release_device(device);
            return Report::failed(internal("AttachNetworkInterface", e));
        }
        self.known().attached.insert(
            eni.id.clone(),
            Attached {
                link: link.clone(),
                attachment_id,
                device,
            },
        );
        log::info(
            "ENI attached",
            &[
                ("eni", &eni.id),
                ("device", &device),
                ("subnet", &eni.subnet_id),
            ],
        );
        Report::ok(Outcome::EniCreated {
            blocks: blocks_of(&eni),
            eni: EniInfo {
                id: eni.id.clone(),
                device_number: device,
                subnet_id: eni.subnet_id.clone(),
                subnet_cidr: cidr,
                primary_ip: link.primary_ip,
                is_primary: false,
                is_trunk: false,
                is_efa: false,
                excluded: false,
            },
        })
    }

    /// Deletes an ENI that is detached or detaching, waiting out the detach.
    async fn delete_eni(&self, eni_id: &str) -> Option<CloudError> {
        let mut last = None;
        for attempt in 0..DELETE_TRIES {
            match self
                .timed(
                    "DeleteNetworkInterface",
                    self.ec2.delete_network_interface(eni_id),
                )
                .await
            {
                Ok(()) => return None,
                // Still detaching, or no answer: deleting again is safe (NotFound counts as done).
                Err(e) if matches!(e.kind, ErrorKind::InUse | ErrorKind::Unavailable) => {
                    last = Some(e);
                    tokio::time::sleep(
                        Duration::from_millis(500 * (attempt as u64 + 1))
                            .min(Duration::from_secs(3)),
                    )
                    .await;
                }
                Err(e) => {
                    log::warn("could not delete ENI", &[("eni", &eni_id), ("error", &e)]);
                    return Some(e);
                }
            }
        }
        log::warn(
            "ENI still attached; the leaked-ENI scan will collect it",
            &[("eni", &eni_id)],
        );
        last
    }

    async fn free_eni(&self, eni_id: &str) -> Report {
        let attached = self.known().attached.get(eni_id).cloned();
        let attachment_id = match &attached {
            Some(a) => a.attachment_id.clone(),
            None => {
                match self
                    .timed(
                        "DescribeNetworkInterfaces",
                        self.ec2
                            .describe_network_interfaces(&EniQuery::by_id(eni_id)),
                    )
                    .await
                {
                    Ok(found) => match found.into_iter().find_map(|e| e.attachment) {
                        Some(a) => a.id,
                        None => String::new(),
                    },
                    Err(e) if e.kind == ErrorKind::NotFound => return Report::ok(Outcome::Done),
                    Err(e) => return Report::failed(e),
                }
            }
        };
        if let Some(a) = &attached {
            let link = a.link.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || node::teardown_eni(&link))
                .await
                .expect("teardown does not panic")
            {
                log::warn("ENI link teardown", &[("eni", &eni_id), ("error", &e)]);
            }
        }
        if !attachment_id.is_empty() {
            if let Err(e) = self
                .timed(
                    "DetachNetworkInterface",
                    self.ec2.detach_network_interface(&attachment_id),
                )
                .await
            {
                return Report::failed(e);
            }
        }
        if let Some(e) = self.delete_eni(eni_id).await {
            return Report::failed(e);
        }
        let mut known = self.known();
        if let Some(a) = known.attached.remove(eni_id) {
            known.devices.remove(&a.device);
        }
        Report::ok(Outcome::Done)
    }
}

/// Configures a hot-plugged ENI's link once it shows up.
pub async fn configure_link(link: EniLink) -> Result<String, String> {
    let deadline = Instant::now() + LINK_WAIT;
    loop {
        let attempt = link.clone();
        let result = tokio::task::spawn_blocking(move || node::setup_eni(&attempt))
            .await
            .expect("link setup does not panic");
        match result {
            Ok(name) => return Ok(name),
            Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_only_when_whole() {
        assert_eq!(
            parse_mac("02:aa:00:00:01:ff"),
            Some([2, 0xaa, 0, 0, 1, 0xff])
        );
        assert_eq!(parse_mac("02:aa:00:00:01"), None);
        assert_eq!(parse_mac("02:aa:00:00:01:ff:00"), None);
        assert_eq!(parse_mac("zz:aa:00:00:01:ff"), None);
    }

    #[test]
    fn ec2_errors_map_to_what_the_pool_does_about_them() {
        let e = |kind| CloudError {
            kind,
            operation: "X",
            code: "c".into(),
            message: String::new(),
        };
        assert_eq!(
            failure_of(&e(ErrorKind::InsufficientCidr)),
            Failure::InsufficientCidr
        );
        assert_eq!(failure_of(&e(ErrorKind::NotFound)), Failure::EniNotFound);
        assert_eq!(failure_of(&e(ErrorKind::Unauthorized)), Failure::Other);
    }
}
