//! Node initialisation: identity from IMDS, limits, the ENIs EC2 says are attached, the node's links
//! and host rules, the checkpoint restored against what EC2 and the host show, and a control loop
//! ready to warm the pool.

use crate::control::{self, Control, Deps, Event, HostFacts};
use crate::executor::{self, blocks_of, Executor, HostLinks, Links};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use cloud::aws::AwsEc2;
use cloud::identity::{self, Identity};
use cloud::throttle::Pacing;
use cloud::{Ec2, EniQuery};
use datapath::node::{self, HostRouting};
use datapath::snat::{self, SnatPolicy};
use ipam::checkpoint::{Allocation, Checkpoint, Metadata, VERSION};
use ipam::choreography::NodeFacts;
use ipam::config::Config;
use ipam::maxpods::{max_pods, MaxPodsOptions};
use ipam::ownership::{self, EniFacts, Role};
use ipam::pacing::Backoff;
use ipam::pool::{EniConfigSpec, EniInfo};
use ipam::{NodeSpec, Pool, PoolSettings};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// An assignment this young is kept on restart even without host state: its ADD may still be wiring
/// (a leak that CNI GC or the pod list repairs is better than an address given out twice).
const YOUNG: Duration = Duration::from_secs(10);
const IMDS_TRIES: u32 = 5;
/// Waits between IMDS tries at start: 1, 2, 4, 8 s.
const IMDS_BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(8));
/// Waits between start-up describes EC2 did not answer: 0.2 s doubling to 6.4 s.
const DESCRIBE_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(100), Duration::from_millis(6400));
/// The longest a terminating predecessor is waited for: aws-node's grace period is 10 s in its
/// manifest, Kubernetes' default 30 s.
const PREDECESSOR_PATIENCE: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("IMDS: {0}")]
    Identity(cloud::CloudError),
    #[error("EC2: {0}")]
    Ec2(cloud::CloudError),
    #[error("instance type {0} is not in the limits table and DescribeInstanceTypes failed: {1}")]
    Limits(String, cloud::CloudError),
    #[error("node network setup: {0}")]
    Datapath(String),
    #[error("{0}")]
    Store(StoreError),
    #[error("{0}")]
    Config(String),
}

pub struct Started {
    pub control: Control,
    /// The IMDS client start-up used, kept for the periodic reconcile.
    pub imds: cloud::identity::ImdsClient,
    pub events: mpsc::UnboundedSender<Event>,
    pub receiver: mpsc::UnboundedReceiver<Event>,
    pub executor: Arc<Executor>,
    pub identity: Identity,
    pub vpc_id: String,
    /// The trunk ENI's MAC (security groups for pods), when one was attached at start.
    pub trunk_mac: Option<[u8; 6]>,
}

/// What the privileged init container does before the daemon's container starts without privileges:
/// the node's sysctls (/proc/sys is read-only in a container that is not privileged), on the link
/// that has the primary ENI's MAC. Returns that link's name.
/// With `strict_branches` (ENABLE_POD_ENI in strict mode), the node's part of wiring branch pods:
/// the `local` rule moved below theirs and TCP's early demultiplexing off.
pub async fn init_node(ipv6: bool, strict_branches: bool) -> Result<String, StartError> {
    let (identity, _) = fetch_identity().await?;
    let mac = executor::parse_mac(&identity.primary_mac).ok_or_else(|| {
        StartError::Config(format!(
            "primary MAC {:?} does not parse",
            identity.primary_mac
        ))
    })?;
    let primary = blocking(move || node::link_name_by_mac(mac))
        .await?
        .ok_or_else(|| {
            StartError::Datapath(format!(
                "no link has the primary ENI's MAC {}",
                identity.primary_mac
            ))
        })?;
    let link = primary.clone();
    blocking(move || node::host_sysctls(&link)).await?;
    if ipv6 {
        let link = primary.clone();
        blocking(move || node::setup_host_v6(&link)).await?;
    }
    if strict_branches {
        blocking(datapath::branch::setup_strict_node).await?;
    }
    Ok(primary)
}

async fn fetch_identity() -> Result<(Identity, cloud::identity::ImdsClient), StartError> {
    let client = identity::client(None).map_err(StartError::Identity)?;
    let mut attempt = 0;
    loop {
        match Identity::fetch(&client).await {
            Ok(identity) => return Ok((identity, client)),
            Err(e) if attempt + 1 >= IMDS_TRIES => return Err(StartError::Identity(e)),
            Err(e) => {
                tracing::warn!(error = %e, "IMDS not answering yet");
                attempt += 1;
                tokio::time::sleep(IMDS_BACKOFF.ceiling(attempt)).await;
            }
        }
    }
}

/// Start-up's describes are safe to repeat: a transient failure is retried rather than failing the
/// node (Kubernetes would restart the pod, later and noisier).
async fn patiently<T, Fut>(
    what: &str,
    mut call: impl FnMut() -> Fut,
) -> Result<T, cloud::CloudError>
where
    Fut: std::future::Future<Output = cloud::Result<T>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Err(e) if e.kind == cloud::ErrorKind::Unavailable && attempt < 6 => {
                attempt += 1;
                tracing::warn!(call = %what, error = %e, "EC2 did not answer; retrying");
                tokio::time::sleep(DESCRIBE_BACKOFF.ceiling(attempt)).await;
            }
            result => return result,
        }
    }
}

fn snat_policy(config: &Config, identity: &Identity, primary_interface: &str) -> SnatPolicy {
    SnatPolicy {
        primary_interface: primary_interface.to_string(),
        primary_ip: identity.primary_ip,
        veth_prefix: config.veth_prefix.clone(),
        exempt: identity
            .vpc_cidrs
            .iter()
            .chain(&config.exclude_snat_cidrs)
            .map(|c| (c.addr(), c.prefix_len()))
            .collect(),
        external_snat: config.external_snat,
        randomize: match config.randomize_snat {
            ipam::config::RandomizeSnat::Prng => snat::RandomizeSnat::FullyRandom,
            ipam::config::RandomizeSnat::HashRandom => snat::RandomizeSnat::Random,
            ipam::config::RandomizeSnat::None => snat::RandomizeSnat::None,
        },
        node_port_support: config.node_port_support,
        connmark: config.connmark,
        v4_egress: config.ipv6 && config.v4_egress,
    }
}

/// The primary ENI's /80 for IPv6 pods: the one it has (upstream's, or ours from an earlier start),
/// or one assigned now. A subnet without an IPv6 block cannot give one, and says so.
async fn v6_prefix(
    ec2: &impl Ec2,
    config: &Config,
    primary: &cloud::Eni,
    subnets: &[cloud::SubnetInfo],
) -> Result<ipam::Ipv6Cidr, StartError> {
    let subnet = subnets.iter().find(|s| s.id == primary.subnet_id);
    if subnet.and_then(|s| s.ipv6_cidr).is_none() {
        return Err(StartError::Config(format!(
            "ENABLE_IPv6=true, but the primary ENI's subnet {} has no IPv6 CIDR block: \
             associate one with the subnet (and its VPC), or run this node with ENABLE_IPv6=false",
            primary.subnet_id
        )));
    }
    let existing = primary
        .ipv6_prefixes
        .iter()
        .find(|p| p.prefix_len() == ipam::v6::PREFIX_LEN);
    if let Some(prefix) = existing {
        tracing::info!(prefix = %prefix, eni = %primary.id, "IPv6 pods: the primary ENI's /80");
        return Ok(*prefix);
    }
    if config.disable_provisioning {
        return Err(StartError::Config(format!(
            "ENABLE_IPv6=true, but the primary ENI {} has no /80 prefix and \
             DISABLE_NETWORK_RESOURCE_PROVISIONING=true forbids assigning one",
            primary.id
        )));
    }
    let assigned = ec2
        .assign_ipv6_prefixes(&primary.id, 1)
        .await
        .map_err(StartError::Ec2)?;
    let prefix = assigned.into_iter().next().ok_or_else(|| {
        StartError::Config(format!(
            "AssignIpv6Addresses on {} answered without a prefix",
            primary.id
        ))
    })?;
    tracing::info!(prefix = %prefix, eni = %primary.id, "IPv6 pods: assigned a /80 to the primary ENI");
    Ok(prefix)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> datapath::Result<T> + Send + 'static,
) -> Result<T, StartError> {
    tokio::task::spawn_blocking(work)
        .await
        .expect("datapath work does not panic")
        .map_err(|e| StartError::Datapath(e.to_string()))
}

/// Where the daemon we take over from (upstream's aws-node) answers while it runs: its plugin
/// socket and its gRPC port. None: not checked.
#[derive(Clone, Debug)]
pub struct Predecessor {
    pub socket: Option<PathBuf>,
    pub grpc: Option<SocketAddr>,
}

impl Predecessor {
    /// What still answers, in words; empty once it is gone.
    async fn answering(&self) -> Vec<String> {
        let mut alive = Vec::new();
        if let Some(socket) = &self.socket {
            if tokio::net::UnixStream::connect(socket).await.is_ok() {
                alive.push(socket.display().to_string());
            }
        }
        if let Some(grpc) = self.grpc {
            let connect = tokio::net::TcpStream::connect(grpc);
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), connect).await {
                alive.push(grpc.to_string());
            }
        }
        alive
    }

    /// A terminating aws-node keeps serving ADDs through its grace period: restoring its
    /// checkpoint before it has stopped could give an address it is still handing out to a
    /// second pod. Waits while it answers, saying so every 10 s, for at most `PREDECESSOR_PATIENCE`:
    /// Kubernetes ends a pod's grace period well before, so something still answering then is not a
    /// terminating aws-node (50051 is also gRPC's example port), and the node must come up.
    async fn wait_until_gone(&self) {
        let since = Instant::now();
        let mut said: Option<Instant> = None;
        loop {
            let alive = self.answering().await;
            if !alive.is_empty() && since.elapsed() >= PREDECESSOR_PATIENCE {
                tracing::error!(answering = %alive.join(", "), waited_ms = %since.elapsed().as_millis(), "still answering where aws-node would; not aws-node after this long: taking over");
                return;
            }
            if alive.is_empty() {
                if said.is_some() {
                    tracing::info!(waited_ms = %since.elapsed().as_millis(), "the previous CNI daemon has stopped; taking over");
                }
                return;
            }
            if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!(answering = %alive.join(", "), waited_ms = %since.elapsed().as_millis(), "waiting for the previous CNI daemon (aws-node) to stop before restoring its checkpoint");
                said = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

pub async fn start(
    config: &Config,
    eni_config: Option<EniConfigSpec>,
    kubelet: Option<k8s::NodeView>,
    predecessor: &Predecessor,
    store: Store,
    metrics: Arc<Metrics>,
) -> Result<Started, StartError> {
    let clock = control::Clock::starting_at(control::now());
    predecessor.wait_until_gone().await;
    let (identity, imds) = fetch_identity().await?;
    tracing::info!(instance = %identity.instance_id, instance_type = %identity.instance_type, az = %identity.availability_zone, "identity");
    let ec2 = AwsEc2::from_environment(
        Pacing::default(),
        config.ec2_endpoint.clone(),
        config.http_timeout,
    )
    .await;
    let limits = match ipam::limits::lookup(&identity.instance_type) {
        Some(l) => l.clone(),
        None => patiently("DescribeInstanceTypes", || {
            ec2.describe_instance_type(&identity.instance_type)
        })
        .await
        .map_err(|e| StartError::Limits(identity.instance_type.clone(), e))?,
    };
    let query = EniQuery {
        filters: vec![(
            "attachment.instance-id".into(),
            vec![identity.instance_id.clone()],
        )],
        ..EniQuery::default()
    };
    let attached = patiently("DescribeNetworkInterfaces", || {
        ec2.describe_network_interfaces(&query)
    })
    .await
    .map_err(StartError::Ec2)?;
    let primary = attached
        .iter()
        .find(|e| e.id == identity.primary_eni)
        .ok_or_else(|| {
            StartError::Config(format!(
                "EC2 does not list the primary ENI {} as attached to {}",
                identity.primary_eni, identity.instance_id
            ))
        })?
        .clone();
    let trunk_mac = attached
        .iter()
        .find(|e| e.interface_type == ipam::ownership::InterfaceType::Trunk)
        .and_then(|e| executor::parse_mac(&e.mac));
    // Which attached ENIs are ours: the others are never configured, assigned from, released or
    // freed, only counted against the instance's ENI limit (and their device index avoided).
    let roles: HashMap<String, Role> = attached
        .iter()
        .map(|e| {
            let facts = EniFacts {
                is_primary: e.id == primary.id,
                interface_type: e.interface_type.clone(),
                network_card: e.attachment.as_ref().map_or(0, |a| a.network_card),
                tags: &e.tags,
            };
            let role =
                ownership::classify(&facts, &identity.instance_id, config.manage_untagged_eni);
            (e.id.clone(), role)
        })
        .collect();
    let mut unmanaged_on_card0 = 0;
    let mut executor_devices_avoided = Vec::new();
    for eni in &attached {
        if let Role::Unmanaged(why) = &roles[&eni.id] {
            tracing::info!(eni = %eni.id, why = %why, "ENI left alone: not ours");
            if let Some(a) = eni.attachment.as_ref().filter(|a| a.network_card == 0) {
                unmanaged_on_card0 += 1;
                executor_devices_avoided.push(a.device_index);
            }
        }
    }
    let managed: Vec<&cloud::Eni> = attached
        .iter()
        .filter(|e| !matches!(roles[&e.id], Role::Unmanaged(_)))
        .collect();
    let subnet_ids: BTreeSet<String> = managed.iter().map(|e| e.subnet_id.clone()).collect();
    let subnet_filter = [("subnet-id".to_string(), subnet_ids.into_iter().collect())];
    let subnets = patiently("DescribeSubnets", || ec2.describe_subnets(&subnet_filter))
        .await
        .map_err(StartError::Ec2)?;
    let subnet_cidrs: HashMap<String, ipam::Ipv4Cidr> = subnets
        .iter()
        .filter_map(|s| Some((s.id.clone(), s.cidr?)))
        .collect();
    // An ENI we cannot configure (its subnet has no IPv4 CIDR, it has no primary address) is left
    // alone and counted as the others we do not manage.
    let mut usable = Vec::new();
    for eni in managed {
        match (
            &eni.attachment,
            subnet_cidrs.get(&eni.subnet_id),
            eni.primary_ip,
        ) {
            (Some(attachment), Some(cidr), Some(primary_ip)) => {
                usable.push((eni, attachment, *cidr, primary_ip))
            }
            (attachment, _, _) => {
                tracing::warn!(eni = %eni.id, "ENI without subnet CIDR or primary address left alone");
                if let Some(a) = attachment {
                    unmanaged_on_card0 += 1;
                    executor_devices_avoided.push(a.device_index);
                }
            }
        }
    }
    let cluster_name = Some(config.cluster_name.as_str()).filter(|c| !c.is_empty());
    let excluded_subnets: HashSet<String> = subnets
        .iter()
        .filter(|s| ipam::subnets::excluded(&s.tags, cluster_name))
        .map(|s| s.id.clone())
        .collect();

    let refusal = ipam::maxpods::ipv6_refusal(
        &identity.instance_type,
        &limits,
        MaxPodsOptions {
            ipv6: config.ipv6,
            ..MaxPodsOptions::default()
        },
    );
    if let Some(why) = refusal {
        return Err(StartError::Config(format!("ENABLE_IPv6=true: {why}")));
    }
    // An IPv6 node's one /80, before the executor takes EC2: the only EC2 change IPv6 pods need.
    let v6_prefix = if config.ipv6 {
        Some(v6_prefix(&ec2, config, &primary, &subnets).await?)
    } else {
        None
    };

    let settings = PoolSettings::from_config(config);
    let node_spec = NodeSpec {
        instance_type: identity.instance_type.clone(),
        slots_per_eni: limits.slots_per_eni(),
        max_enis: limits.enis(),
        max_pods: kubelet
            .as_ref()
            .and_then(|n| n.max_pods)
            .unwrap_or_else(|| {
                max_pods(
                    &limits,
                    MaxPodsOptions {
                        prefix_delegation: config.prefix_delegation,
                        custom_networking: config.custom_networking,
                        max_eni: config.max_eni,
                        uncapped: false,
                        ipv6: config.ipv6,
                    },
                )
            }),
        supports_prefixes: limits.supports_prefixes(),
        primary_subnet: primary.subnet_id.clone(),
        security_groups: primary.security_groups.clone(),
        eni_config: eni_config.clone(),
        unmanaged_enis: unmanaged_on_card0,
        unschedulable: kubelet.as_ref().is_some_and(|n| n.unschedulable),
    };
    let executor = Arc::new(Executor::new(
        ec2,
        HostLinks,
        NodeFacts {
            instance_id: identity.instance_id.clone(),
            availability_zone: identity.availability_zone.clone(),
            vpc_id: primary.vpc_id.clone(),
            cluster_name: Some(config.cluster_name.clone()).filter(|c| !c.is_empty()),
            extra_tags: config.additional_eni_tags.clone(),
            eni_mtu: config.eni_mtu,
            max_enis: limits.enis(),
        },
        metrics.clone(),
    ));
    let mut pool = Pool::new(node_spec, &settings);
    let now = control::now();
    for device in executor_devices_avoided {
        executor.avoid_device(device);
    }
    for &(eni, attachment, cidr, primary_ip) in &usable {
        executor.adopt(eni, cidr);
        let role = &roles[&eni.id];
        pool.add_eni(
            EniInfo {
                id: eni.id.clone(),
                device_number: attachment.device_index,
                subnet_id: eni.subnet_id.clone(),
                subnet_cidr: cidr,
                primary_ip,
                is_primary: eni.id == primary.id,
                is_trunk: *role == Role::Trunk,
                is_efa: *role == Role::Efa,
                excluded: excluded_subnets.contains(&eni.subnet_id),
            },
            // Counted as old enough to free: it was attached before this start.
            now - Duration::from_secs(3600),
        );
        // An IPv6 node gives no IPv4 pod addresses, whatever its ENIs hold.
        if v6_prefix.is_none() {
            pool.add_blocks(&eni.id, &blocks_of(eni));
        }
    }

    // The host side: rules, SNAT, and a link per secondary ENI.
    let primary_mac = executor::parse_mac(&primary.mac).ok_or_else(|| {
        StartError::Config(format!("primary MAC {:?} does not parse", primary.mac))
    })?;
    let primary_interface = blocking(move || node::link_name_by_mac(primary_mac))
        .await?
        .ok_or_else(|| {
            StartError::Datapath(format!("no link has the primary ENI's MAC {}", primary.mac))
        })?;
    let host = HostRouting {
        primary_interface: primary_interface.clone(),
        fwmark_rule: config.node_port_support || !config.external_snat,
        connmark: config.connmark,
    };
    blocking(move || node::setup_host(&host)).await?;
    if v6_prefix.is_some() {
        let primary = primary_interface.clone();
        blocking(move || node::setup_host_v6(&primary)).await?;
    }
    // Upstream's SNAT and connmark rules would keep matching beside our table.
    let upstream = blocking(|| Ok(datapath::upstream::remove_rules())).await?;
    if !upstream.failed.is_empty() {
        tracing::error!(errors = %upstream.failed.join("; "), "could not remove the Amazon VPC CNI's host rules; they may still SNAT and mark beside ours");
        metrics.count("awscni_ipamd_error_count", &[("fn", "removeUpstreamRules")]);
    }
    if !upstream.removed.is_empty() {
        tracing::info!(what = %upstream.removed.join("; "), "removed the Amazon VPC CNI's host rules");
    }
    if !upstream.unavailable.is_empty() {
        tracing::warn!(tools = %upstream.unavailable.join(", "), "could not look for the Amazon VPC CNI's host rules: not installed");
    }
    let policy = snat_policy(config, &identity, &primary_interface);
    let applied = policy.clone();
    let result = blocking(move || applied.apply()).await;
    let outcome = if result.is_ok() { "success" } else { "failure" };
    metrics.count("awscni_connmark_reconcile_total", &[("result", outcome)]);
    result?;
    for &(eni, ..) in &usable {
        if eni.id == primary.id {
            continue;
        }
        if let Some(link) = executor.link_of(&eni.id) {
            executor
                .links
                .setup(&link)
                .await
                .map_err(|e| StartError::Datapath(format!("ENI {}: {e}", eni.id)))?;
        }
    }

    // The checkpoint, against what EC2 (the pool) and the host (routes to pod veths) show.
    let prefix = config.veth_prefix.clone();
    let wired: HashMap<std::net::IpAddr, String> =
        blocking(move || datapath::pod::wired_addresses(&prefix))
            .await?
            .into_iter()
            .collect();
    // The pods wired on this host, as a checkpoint: what a missing or unreadable file is
    // rebuilt from, so that running pods keep their addresses and their host networking.
    let from_host = || Checkpoint {
        version: VERSION.into(),
        allocations: wired
            .iter()
            .map(|(ip, veth)| Allocation {
                network_name: control::RECOVERED_NETWORK.into(),
                container_id: veth.clone(),
                if_name: "eth0".into(),
                ipv4: match ip {
                    std::net::IpAddr::V4(ip) => Some(*ip),
                    std::net::IpAddr::V6(_) => None,
                },
                ipv6: match ip {
                    std::net::IpAddr::V4(_) => None,
                    std::net::IpAddr::V6(ip) => Some(*ip),
                },
                egress_ipv4: None,
                allocation_timestamp: now.as_nanos() as i64,
                metadata: Metadata::default(),
            })
            .collect(),
    };
    let (checkpoint, from_file) = match store.load() {
        Ok(Some(checkpoint)) => (checkpoint, true),
        Ok(None) => {
            if !wired.is_empty() {
                tracing::warn!(checkpoint = %store.path().display(), pods = %wired.len(), "no checkpoint, but pods are wired on this host: their addresses are rebuilt from the host");
            }
            (from_host(), false)
        }
        Err(StoreError::Corrupt { path, source }) => {
            let aside = store.quarantine().map_err(StartError::Store)?;
            tracing::error!(checkpoint = %path.display(), error = %source, kept_at = %aside.display(), "the checkpoint is unreadable: moved aside; the addresses of pods wired on this host stay reserved");
            metrics.count("awscni_ipamd_error_count", &[("fn", "checkpoint")]);
            (from_host(), false)
        }
        Err(e) => return Err(StartError::Store(e)),
    };
    let young = (now - YOUNG).as_nanos() as i64;
    let alive = |a: &Allocation| {
        let wired_ip = |ip: std::net::IpAddr| wired.contains_key(&ip);
        a.ipv4.is_some_and(|ip| wired_ip(ip.into()))
            || a.ipv6.is_some_and(|ip| wired_ip(ip.into()))
            || a.allocation_timestamp > young
    };
    let mut v6 = v6_prefix.map(|prefix| ipam::v6::V6Pool::new(prefix, config.v4_egress));
    let report = match &mut v6 {
        Some(v6) => v6.restore(&checkpoint, alive),
        None => pool.restore(&checkpoint, alive),
    }
    .map_err(|e| {
        StartError::Store(StoreError::Corrupt {
            path: store.path().to_path_buf(),
            source: e,
        })
    })?;
    tracing::info!(from = %if from_file { "file" } else { "host" }, restored = %report.restored, pods_gone = %report.dead.len(), addresses_gone = %report.stale.len(), "checkpoint restored");
    for a in &report.stale {
        let ip = match (a.ipv4, a.ipv6) {
            (Some(ip), _) => ip.to_string(),
            (None, Some(ip)) => ip.to_string(),
            (None, None) => "none".to_string(),
        };
        if from_file {
            metrics.count("awscni_force_removed_ips", &[]);
            tracing::warn!(pod = %a.metadata.k8s_pod_name, ip = %ip, "a pod's address is no longer on this node's ENIs");
        } else {
            tracing::warn!(veth = %a.container_id, ip = %ip, "a pod interface whose address is on none of our ENIs is left alone (another CNI's, or a branch-ENI pod)");
        }
    }
    // Host state is removed only for what our checkpoint named and the restore dropped: anything
    // else wired here is not ours to account for.
    let dropped: HashSet<std::net::IpAddr> = if from_file {
        report
            .dead
            .iter()
            .chain(&report.stale)
            .flat_map(|a| {
                let v4 = a.ipv4.map(std::net::IpAddr::from);
                v4.into_iter().chain(a.ipv6.map(std::net::IpAddr::from))
            })
            .collect()
    } else {
        HashSet::new()
    };
    let prefix = config.veth_prefix.clone();
    let removed =
        blocking(move || datapath::pod::remove_pods_host_state(&prefix, &dropped)).await?;
    if !removed.is_empty() {
        tracing::info!(what = %removed.join(", "), "removed host state of pods that are gone");
    }
    let checkpoint = match &v6 {
        Some(v6) => v6.checkpoint(),
        None => pool.checkpoint(),
    };
    store.save(&checkpoint).map_err(StartError::Store)?;

    let (events, receiver) = mpsc::unbounded_channel();
    let pool_ids: HashSet<String> = pool.enis().iter().map(|e| e.info.id.clone()).collect();
    let provisioning = !config.disable_provisioning && v6.is_none();
    let control = Control::new(Deps {
        pool,
        v6,
        settings,
        veth_prefix: config.veth_prefix.clone(),
        provisioning,
        store,
        executor: executor.clone(),
        events: events.clone(),
        metrics,
        clock,
    })
    .with_host(HostFacts {
        foreign_enis: attached
            .iter()
            .filter(|e| !pool_ids.contains(&e.id))
            .filter_map(|e| {
                let a = e.attachment.as_ref()?;
                Some((e.id.clone(), (a.device_index, a.network_card)))
            })
            .collect(),
        snat: policy,
        vpc_cidrs: identity.vpc_cidrs.clone(),
        snat_excluded: config.exclude_snat_cidrs.clone(),
    });
    Ok(Started {
        control,
        imds,
        events,
        receiver,
        executor,
        identity,
        vpc_id: primary.vpc_id.clone(),
        trunk_mac,
    })
}
