//! [`Ec2`] on the official AWS SDK.

use crate::throttle::{Category, Pacer, Pacing};
use crate::{
    CloudError, CreateEni, Ec2, Eni, EniAttachment, EniQuery, ErrorKind, InstanceEni, InstanceInfo,
    Result, SubnetInfo, TrunkAssociation,
};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    self as sdk, Filter, NetworkInterfaceAttachmentChanges, NetworkInterfaceCreationType,
    ResourceType, Tag, TagSpecification,
};
use ipam::limits::InstanceLimits;
use ipam::net::{Ipv4Cidr, Ipv6Cidr};
use ipam::ownership::InterfaceType;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Mutex;

/// Calls per operation: answered, throttled (and retried), failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallStats {
    pub ok: u64,
    pub throttled: u64,
    pub failed: u64,
}

pub struct AwsEc2 {
    client: aws_sdk_ec2::Client,
    pacer: Pacer,
    stats: Mutex<BTreeMap<&'static str, CallStats>>,
}

/// Names the project in every request, so that CloudTrail shows who called.
pub const APP_NAME: &str = "vpc-cni-rs";

impl AwsEc2 {
    /// The standard credential chain (environment, web identity / IRSA, EKS Pod Identity, instance
    /// profile) and region (AWS_REGION or IMDS). `endpoint` (AWS_EC2_ENDPOINT) overrides the EC2
    /// endpoint, and only EC2's (upstream applies it to another client); `attempt_timeout`
    /// (HTTP_TIMEOUT) bounds each attempt, after which the call's outcome is unknown.
    pub async fn from_environment(
        pacing: Pacing,
        endpoint: Option<String>,
        attempt_timeout: std::time::Duration,
    ) -> AwsEc2 {
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .app_name(aws_config::AppName::new(APP_NAME).expect("a valid app name"))
            .load()
            .await;
        let config = aws_sdk_ec2::config::Builder::from(&shared).timeout_config(
            aws_sdk_ec2::config::timeout::TimeoutConfig::builder()
                .operation_attempt_timeout(attempt_timeout)
                .build(),
        );
        Self::with_config(config, endpoint.filter(|e| !e.is_empty()), pacing)
    }

    /// A fixed endpoint, region and static credentials: the simulated VPC, moto, tests.
    pub fn for_endpoint(endpoint: &str, region: &str, pacing: Pacing) -> AwsEc2 {
        let config = aws_sdk_ec2::config::Builder::new()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new(region.to_string()))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "simulated",
                "simulated",
                None,
                None,
                "static",
            ))
            .app_name(aws_sdk_ec2::config::AppName::new(APP_NAME).expect("a valid app name"));
        Self::with_config(config, Some(endpoint.to_string()), pacing)
    }

    fn with_config(
        mut config: aws_sdk_ec2::config::Builder,
        endpoint: Option<String>,
        pacing: Pacing,
    ) -> AwsEc2 {
        if let Some(endpoint) = endpoint {
            config = config.endpoint_url(endpoint);
        }
        // Our own pacing and backoff decide retries: the SDK's would hide throttling from the
        // buckets and could repeat a call whose outcome is unknown.
        config = config.retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled());
        AwsEc2 {
            client: aws_sdk_ec2::Client::from_conf(config.build()),
            pacer: Pacer::new(pacing),
            stats: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn stats(&self) -> BTreeMap<&'static str, CallStats> {
        self.stats.lock().expect("stats lock").clone()
    }

    fn count(&self, operation: &'static str, update: impl FnOnce(&mut CallStats)) {
        update(
            self.stats
                .lock()
                .expect("stats lock")
                .entry(operation)
                .or_default(),
        );
    }

    /// Paces, sends, and retries while EC2 throttles (a throttled call did not happen, so retrying
    /// cannot do it twice). Any other error is returned classified.
    async fn call<T, E, R, Fut>(
        &self,
        operation: &'static str,
        category: Category,
        send: impl Fn() -> Fut,
    ) -> Result<T>
    where
        Fut: Future<Output = std::result::Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug,
    {
        let mut attempt = 0;
        loop {
            self.pacer.acquire(category).await;
            let error = match send().await {
                Ok(value) => {
                    self.count(operation, |s| s.ok += 1);
                    return Ok(value);
                }
                Err(e) => match e.code() {
                    Some(code) => CloudError::new(operation, code, e.message().unwrap_or_default()),
                    None => CloudError {
                        kind: ErrorKind::Unavailable,
                        operation,
                        code: "transport".into(),
                        message: DisplayErrorContext(&e).to_string().into(),
                    },
                },
            };
            if error.kind == ErrorKind::Throttled && attempt < self.pacer.pacing.max_retries {
                self.count(operation, |s| s.throttled += 1);
                tokio::time::sleep(self.pacer.backoff(attempt)).await;
                attempt += 1;
                continue;
            }
            self.count(operation, |s| s.failed += 1);
            return Err(error);
        }
    }
}

/// What one AssignPrivateIpAddresses asks for: EC2 takes addresses or prefixes, never both.
enum Assign {
    Ips(u32),
    Prefixes(u32),
}

impl AwsEc2 {
    async fn assign(
        &self,
        eni_id: &str,
        what: Assign,
    ) -> Result<aws_sdk_ec2::operation::assign_private_ip_addresses::AssignPrivateIpAddressesOutput>
    {
        self.call("AssignPrivateIpAddresses", Category::Mutating, || {
            let call = self
                .client
                .assign_private_ip_addresses()
                .network_interface_id(eni_id);
            match what {
                Assign::Ips(n) => call.secondary_private_ip_address_count(n as i32),
                Assign::Prefixes(n) => call.ipv4_prefix_count(n as i32),
            }
            .send()
        })
        .await
    }
}

fn parse_ip(text: Option<&str>) -> Option<Ipv4Addr> {
    text.and_then(|t| t.parse().ok())
}

fn parse_prefix(text: Option<&str>) -> Option<Ipv4Cidr> {
    text.and_then(|t| t.parse().ok())
}

fn parse_ipv6_prefix(text: Option<&str>) -> Option<Ipv6Cidr> {
    text.and_then(|t| t.parse().ok())
}

fn tags(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_string(),
                t.value().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

fn number(value: Option<i32>) -> u32 {
    value.and_then(|v| u32::try_from(v).ok()).unwrap_or(0)
}

fn eni_from(e: &sdk::NetworkInterface) -> Eni {
    Eni {
        id: e.network_interface_id().unwrap_or_default().to_string(),
        mac: e.mac_address().unwrap_or_default().to_string(),
        subnet_id: e.subnet_id().unwrap_or_default().to_string(),
        vpc_id: e.vpc_id().unwrap_or_default().to_string(),
        availability_zone: e.availability_zone().unwrap_or_default().to_string(),
        description: e.description().unwrap_or_default().to_string(),
        status: e
            .status()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        primary_ip: parse_ip(e.private_ip_address()),
        secondary_ips: e
            .private_ip_addresses()
            .iter()
            .filter(|a| a.primary() != Some(true))
            .filter_map(|a| parse_ip(a.private_ip_address()))
            .collect(),
        prefixes: e
            .ipv4_prefixes()
            .iter()
            .filter_map(|p| parse_prefix(p.ipv4_prefix()))
            .collect(),
        ipv6_prefixes: e
            .ipv6_prefixes()
            .iter()
            .filter_map(|p| parse_ipv6_prefix(p.ipv6_prefix()))
            .collect(),
        security_groups: e
            .groups()
            .iter()
            .filter_map(|g| g.group_id().map(str::to_string))
            .collect(),
        tags: tags(e.tag_set()),
        interface_type: InterfaceType::parse(
            e.interface_type().map(|t| t.as_str()).unwrap_or_default(),
        ),
        attachment: e.attachment().map(|a| EniAttachment {
            id: a.attachment_id().unwrap_or_default().to_string(),
            instance_id: a.instance_id().unwrap_or_default().to_string(),
            device_index: number(a.device_index()),
            network_card: number(a.network_card_index()),
            status: a
                .status()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            delete_on_termination: a.delete_on_termination().unwrap_or(false),
        }),
    }
}

fn instance_eni_from(e: &sdk::InstanceNetworkInterface) -> InstanceEni {
    let attachment = e.attachment();
    InstanceEni {
        id: e.network_interface_id().unwrap_or_default().to_string(),
        mac: e.mac_address().unwrap_or_default().to_string(),
        primary_ip: parse_ip(e.private_ip_address()),
        device_index: number(attachment.and_then(|a| a.device_index())),
        network_card: number(attachment.and_then(|a| a.network_card_index())),
    }
}

fn filters(filters: &[(String, Vec<String>)]) -> Vec<Filter> {
    filters
        .iter()
        .map(|(name, values)| {
            Filter::builder()
                .name(name)
                .set_values(Some(values.clone()))
                .build()
        })
        .collect()
}

fn not_found_is_done(result: Result<()>) -> Result<()> {
    match result {
        Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

pub fn client_token() -> String {
    format!("vpc-cni-rs-{:032x}", rand::random::<u128>())
}

impl Ec2 for AwsEc2 {
    fn throttled(&self) -> Vec<(&'static str, u64)> {
        self.stats()
            .into_iter()
            .filter(|(_, s)| s.throttled > 0)
            .map(|(op, s)| (op, s.throttled))
            .collect()
    }

    async fn describe_instance(&self, instance_id: &str) -> Result<InstanceInfo> {
        let output = self
            .call("DescribeInstances", Category::NonMutating, || {
                self.client
                    .describe_instances()
                    .instance_ids(instance_id)
                    .send()
            })
            .await?;
        let instance = output
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .next()
            .ok_or_else(|| {
                CloudError::new(
                    "DescribeInstances",
                    "InvalidInstanceID.NotFound",
                    instance_id,
                )
            })?;
        let az = instance
            .placement()
            .and_then(|p| p.availability_zone())
            .unwrap_or_default()
            .to_string();
        Ok(InstanceInfo {
            id: instance.instance_id().unwrap_or_default().to_string(),
            instance_type: instance
                .instance_type()
                .map(|t| t.as_str().to_string())
                .unwrap_or_default(),
            subnet_id: instance.subnet_id().unwrap_or_default().to_string(),
            primary_ip: parse_ip(instance.private_ip_address()),
            enis: instance
                .network_interfaces()
                .iter()
                .map(instance_eni_from)
                .collect(),
            availability_zone: az,
        })
    }

    async fn describe_network_interfaces(&self, query: &EniQuery) -> Result<Vec<Eni>> {
        let mut enis = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .call("DescribeNetworkInterfaces", Category::NonMutating, || {
                    let mut request = self
                        .client
                        .describe_network_interfaces()
                        .set_filters(Some(filters(&query.filters)))
                        .set_next_token(token.clone());
                    if !query.ids.is_empty() {
                        request = request.set_network_interface_ids(Some(query.ids.clone()));
                    } else if let Some(size) = query.page_size {
                        // EC2 refuses MaxResults together with ids.
                        request = request.max_results(size as i32);
                    }
                    request.send()
                })
                .await?;
            enis.extend(page.network_interfaces().iter().map(eni_from));
            token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            if token.is_none() {
                return Ok(enis);
            }
        }
    }

    async fn create_network_interface(&self, request: &CreateEni) -> Result<Eni> {
        // One token for every retry of this creation: EC2 makes one ENI per token.
        let token = if request.client_token.is_empty() {
            client_token()
        } else {
            request.client_token.clone()
        };
        let tag_spec = TagSpecification::builder()
            .resource_type(ResourceType::NetworkInterface)
            .set_tags(Some(
                request
                    .tags
                    .iter()
                    .map(|(k, v)| Tag::builder().key(k).value(v).build())
                    .collect(),
            ))
            .build();
        let output = self
            .call("CreateNetworkInterface", Category::Mutating, || {
                let mut call = self
                    .client
                    .create_network_interface()
                    .subnet_id(&request.subnet_id)
                    .description(&request.description)
                    .set_groups(Some(request.security_groups.clone()))
                    .client_token(&token);
                if !request.tags.is_empty() {
                    call = call.tag_specifications(tag_spec.clone());
                }
                if request.secondary_ips > 0 {
                    call = call.secondary_private_ip_address_count(request.secondary_ips as i32);
                }
                if request.prefixes > 0 {
                    call = call.ipv4_prefix_count(request.prefixes as i32);
                }
                if let Some(kind) = request.interface_type {
                    call = call.interface_type(NetworkInterfaceCreationType::from(kind));
                }
                call.send()
            })
            .await?;
        output.network_interface().map(eni_from).ok_or_else(|| {
            CloudError::new(
                "CreateNetworkInterface",
                "EmptyReply",
                "no networkInterface in the reply",
            )
        })
    }

    async fn attach_network_interface(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
        network_card: u32,
    ) -> Result<String> {
        let output = self
            .call("AttachNetworkInterface", Category::Mutating, || {
                let mut call = self
                    .client
                    .attach_network_interface()
                    .network_interface_id(eni_id)
                    .instance_id(instance_id)
                    .device_index(device_index as i32);
                if network_card > 0 {
                    call = call.network_card_index(network_card as i32);
                }
                call.send()
            })
            .await?;
        output.attachment_id().map(str::to_string).ok_or_else(|| {
            CloudError::new(
                "AttachNetworkInterface",
                "EmptyReply",
                "no attachmentId in the reply",
            )
        })
    }

    async fn set_delete_on_termination(&self, eni_id: &str, attachment_id: &str) -> Result<()> {
        self.call(
            "ModifyNetworkInterfaceAttribute",
            Category::Mutating,
            || {
                self.client
                    .modify_network_interface_attribute()
                    .network_interface_id(eni_id)
                    .attachment(
                        NetworkInterfaceAttachmentChanges::builder()
                            .attachment_id(attachment_id)
                            .delete_on_termination(true)
                            .build(),
                    )
                    .send()
            },
        )
        .await
        .map(drop)
    }

    async fn set_security_groups(&self, eni_id: &str, groups: &[String]) -> Result<()> {
        self.call(
            "ModifyNetworkInterfaceAttribute",
            Category::Mutating,
            || {
                self.client
                    .modify_network_interface_attribute()
                    .network_interface_id(eni_id)
                    .set_groups(Some(groups.to_vec()))
                    .send()
            },
        )
        .await
        .map(drop)
    }

    async fn assign_private_ips(&self, eni_id: &str, count: u32) -> Result<Vec<Ipv4Addr>> {
        let output = self.assign(eni_id, Assign::Ips(count)).await?;
        Ok(output
            .assigned_private_ip_addresses()
            .iter()
            .filter_map(|a| parse_ip(a.private_ip_address()))
            .collect())
    }

    async fn assign_prefixes(&self, eni_id: &str, count: u32) -> Result<Vec<Ipv4Cidr>> {
        let output = self.assign(eni_id, Assign::Prefixes(count)).await?;
        Ok(output
            .assigned_ipv4_prefixes()
            .iter()
            .filter_map(|p| parse_prefix(p.ipv4_prefix()))
            .collect())
    }

    async fn unassign(&self, eni_id: &str, ips: &[Ipv4Addr], prefixes: &[Ipv4Cidr]) -> Result<()> {
        let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
        let prefixes: Vec<String> = prefixes.iter().map(ToString::to_string).collect();
        self.call("UnassignPrivateIpAddresses", Category::Mutating, || {
            self.client
                .unassign_private_ip_addresses()
                .network_interface_id(eni_id)
                .set_private_ip_addresses((!ips.is_empty()).then(|| ips.clone()))
                .set_ipv4_prefixes((!prefixes.is_empty()).then(|| prefixes.clone()))
                .send()
        })
        .await
        .map(drop)
    }

    async fn assign_ipv6_prefixes(&self, eni_id: &str, count: u32) -> Result<Vec<Ipv6Cidr>> {
        let output = self
            .call("AssignIpv6Addresses", Category::Mutating, || {
                self.client
                    .assign_ipv6_addresses()
                    .network_interface_id(eni_id)
                    .ipv6_prefix_count(count as i32)
                    .send()
            })
            .await?;
        Ok(output
            .assigned_ipv6_prefixes()
            .iter()
            .filter_map(|p| parse_ipv6_prefix(Some(p)))
            .collect())
    }

    async fn unassign_ipv6_prefixes(&self, eni_id: &str, prefixes: &[Ipv6Cidr]) -> Result<()> {
        let prefixes: Vec<String> = prefixes.iter().map(ToString::to_string).collect();
        self.call("UnassignIpv6Addresses", Category::Mutating, || {
            self.client
                .unassign_ipv6_addresses()
                .network_interface_id(eni_id)
                .set_ipv6_prefixes(Some(prefixes.clone()))
                .send()
        })
        .await
        .map(drop)
    }

    async fn detach_network_interface(&self, attachment_id: &str) -> Result<()> {
        not_found_is_done(
            self.call("DetachNetworkInterface", Category::Mutating, || {
                self.client
                    .detach_network_interface()
                    .attachment_id(attachment_id)
                    .send()
            })
            .await
            .map(drop),
        )
    }

    async fn delete_network_interface(&self, eni_id: &str) -> Result<()> {
        not_found_is_done(
            self.call("DeleteNetworkInterface", Category::Mutating, || {
                self.client
                    .delete_network_interface()
                    .network_interface_id(eni_id)
                    .send()
            })
            .await
            .map(drop),
        )
    }

    async fn associate_trunk_interface(
        &self,
        branch_id: &str,
        trunk_id: &str,
        vlan: u16,
        client_token: &str,
    ) -> Result<String> {
        let output = self
            .call("AssociateTrunkInterface", Category::Mutating, || {
                self.client
                    .associate_trunk_interface()
                    .branch_interface_id(branch_id)
                    .trunk_interface_id(trunk_id)
                    .vlan_id(i32::from(vlan))
                    .client_token(client_token)
                    .send()
            })
            .await?;
        output
            .interface_association()
            .and_then(|a| a.association_id())
            .map(str::to_string)
            .ok_or_else(|| {
                CloudError::new(
                    "AssociateTrunkInterface",
                    "EmptyReply",
                    "no interfaceAssociation in the reply",
                )
            })
    }

    async fn disassociate_trunk_interface(&self, association_id: &str) -> Result<()> {
        not_found_is_done(
            self.call("DisassociateTrunkInterface", Category::Mutating, || {
                self.client
                    .disassociate_trunk_interface()
                    .association_id(association_id)
                    .send()
            })
            .await
            .map(drop),
        )
    }

    async fn describe_trunk_interface_associations(
        &self,
        trunk_id: &str,
    ) -> Result<Vec<TrunkAssociation>> {
        let filter = [(
            "trunk-interface-association.trunk-interface-id".to_string(),
            vec![trunk_id.to_string()],
        )];
        let mut found = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .call(
                    "DescribeTrunkInterfaceAssociations",
                    Category::NonMutating,
                    || {
                        self.client
                            .describe_trunk_interface_associations()
                            .set_filters(Some(filters(&filter)))
                            .set_next_token(token.clone())
                            .send()
                    },
                )
                .await?;
            found.extend(page.interface_associations().iter().filter_map(|a| {
                Some(TrunkAssociation {
                    association_id: a.association_id()?.to_string(),
                    branch_id: a.branch_interface_id()?.to_string(),
                    vlan: u16::try_from(a.vlan_id()?).ok()?,
                })
            }));
            token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            if token.is_none() {
                return Ok(found);
            }
        }
    }

    async fn create_tags(&self, resource_id: &str, tags: &[(String, String)]) -> Result<()> {
        let tags: Vec<Tag> = tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        self.call("CreateTags", Category::Mutating, || {
            self.client
                .create_tags()
                .resources(resource_id)
                .set_tags(Some(tags.clone()))
                .send()
        })
        .await
        .map(drop)
    }

    async fn describe_instance_type(&self, instance_type: &str) -> Result<InstanceLimits> {
        let output = self
            .call("DescribeInstanceTypes", Category::NonMutating, || {
                self.client
                    .describe_instance_types()
                    .instance_types(sdk::InstanceType::from(instance_type))
                    .send()
            })
            .await?;
        let info = output.instance_types().first().ok_or_else(|| {
            CloudError::new(
                "DescribeInstanceTypes",
                "InvalidInstanceType",
                instance_type,
            )
        })?;
        let network = info.network_info();
        let mut cards: Vec<(u32, u32)> = network
            .map(|n| n.network_cards())
            .unwrap_or_default()
            .iter()
            .map(|c| {
                (
                    number(c.network_card_index()),
                    number(c.maximum_network_interfaces()),
                )
            })
            .collect();
        if cards.is_empty() {
            cards.push((
                0,
                number(network.and_then(|n| n.maximum_network_interfaces())),
            ));
        }
        cards.sort_unstable();
        Ok(InstanceLimits {
            instance_type: instance_type.to_string(),
            vcpus: number(info.v_cpu_info().and_then(|v| v.default_v_cpus())),
            hypervisor: info
                .hypervisor()
                .map(|h| h.as_str().to_string())
                .unwrap_or_default(),
            bare_metal: info.bare_metal().unwrap_or(false),
            ipv4_per_eni: number(network.and_then(|n| n.ipv4_addresses_per_interface())),
            ipv6_per_eni: number(network.and_then(|n| n.ipv6_addresses_per_interface())),
            default_card: number(network.and_then(|n| n.default_network_card_index())),
            cards,
        })
    }

    async fn describe_subnets(
        &self,
        subnet_filters: &[(String, Vec<String>)],
    ) -> Result<Vec<SubnetInfo>> {
        let output = self
            .call("DescribeSubnets", Category::NonMutating, || {
                self.client
                    .describe_subnets()
                    .set_filters(Some(filters(subnet_filters)))
                    .send()
            })
            .await?;
        Ok(output
            .subnets()
            .iter()
            .map(|s| SubnetInfo {
                id: s.subnet_id().unwrap_or_default().to_string(),
                availability_zone: s.availability_zone().unwrap_or_default().to_string(),
                cidr: parse_prefix(s.cidr_block()),
                ipv6_cidr: s
                    .ipv6_cidr_block_association_set()
                    .iter()
                    .filter(|a| {
                        a.ipv6_cidr_block_state().and_then(|st| st.state())
                            == Some(&sdk::SubnetCidrBlockStateCode::Associated)
                    })
                    .find_map(|a| parse_ipv6_prefix(a.ipv6_cidr_block())),
                free_addresses: number(s.available_ip_address_count()),
                tags: tags(s.tags()),
            })
            .collect())
    }
}
