//! The daemon's control loop without root and without a host: the real `Control` and `Executor`
//! against the in-process simulated VPC behind `cloud::Ec2`, ENI links recorded instead of
//! configured, the checkpoint in a temporary directory, tokio's clock paused (a wait of seconds
//! takes none).

use cloud::{CloudError, CreateEni, Ec2, Eni, EniQuery, ErrorKind, InstanceInfo, SubnetInfo};
use ipam::choreography::{LinkSpec, NodeFacts};
use ipam::limits::InstanceLimits;
use ipam::pool::EniConfigSpec;
use ipam::{Config, Ipv4Cidr, Ipv6Cidr, NodeSpec, Pool, PoolSettings, Time};
use ipamd::control::{Clock, Control, Deps, Event};
use ipamd::executor::{Executor, Links};
use ipamd::metrics::Metrics;
use ipamd::store::Store;
use proto::{Attachment, DelReason, PodRef, Reply, Request};
use simvpc::{SimConfig, SimVpc};
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Far from any address a test machine's host uses: the vanished-pod test removes host state for
/// the addresses it releases (nothing of which exists on the host).
const VPC: &str = "198.18.0.0/16";

/// The simulated VPC behind the daemon's EC2 trait, on the loop's clock. Replies arrive after the
/// simulated latency; `lose_next` loses the reply of the next call of an operation after EC2 acted.
#[derive(Clone)]
struct SimEc2(Arc<Shared>);

struct Shared {
    vpc: Mutex<SimVpc>,
    clock: Clock,
    calls: Mutex<Vec<&'static str>>,
    lose_next: Mutex<Vec<&'static str>>,
    /// After this many calls EC2 acts on the next ones but their replies never come: the daemon
    /// dies there, as far as the loop can tell.
    halt_after: Mutex<Option<usize>>,
}

impl SimEc2 {
    fn vpc(&self) -> std::sync::MutexGuard<'_, SimVpc> {
        self.0.vpc.lock().unwrap()
    }

    fn calls(&self) -> Vec<&'static str> {
        self.0.calls.lock().unwrap().clone()
    }

    fn lose_next(&self, operation: &'static str) {
        self.0.lose_next.lock().unwrap().push(operation);
    }

    async fn answer<T>(
        &self,
        operation: &'static str,
        call: impl FnOnce(&mut SimVpc, Time) -> simvpc::Reply<T>,
    ) -> cloud::Result<T> {
        let halted = |made: usize| self.0.halt_after.lock().unwrap().is_some_and(|n| made > n);
        if halted(self.calls().len()) {
            // Dead: nothing more reaches EC2.
            return std::future::pending().await;
        }
        let reply = call(&mut self.vpc(), self.0.clock.now());
        tokio::time::sleep(reply.latency).await;
        let made = {
            let mut calls = self.0.calls.lock().unwrap();
            calls.push(operation);
            calls.len()
        };
        if halted(made) {
            return std::future::pending().await;
        }
        let mut lose = self.0.lose_next.lock().unwrap();
        if let Some(i) = lose.iter().position(|o| *o == operation) {
            lose.remove(i);
            return Err(CloudError {
                kind: ErrorKind::Unavailable,
                operation,
                code: "RequestTimeout".into(),
                message: "the reply was lost".into(),
            });
        }
        reply
            .result
            .map_err(|e| CloudError::new(operation, e.code, &e.message))
    }

    fn not_simulated<T>(operation: &'static str) -> cloud::Result<T> {
        Err(CloudError::new(
            operation,
            "InvalidAction",
            "not part of the control loop's tests",
        ))
    }
}

impl Ec2 for SimEc2 {
    async fn describe_instance(&self, _: &str) -> cloud::Result<InstanceInfo> {
        Self::not_simulated("DescribeInstances")
    }

    async fn describe_network_interfaces(&self, query: &EniQuery) -> cloud::Result<Vec<Eni>> {
        self.answer("DescribeNetworkInterfaces", |vpc, now| {
            vpc.describe_network_interfaces(now, &query.ids, &query.filters, None)
        })
        .await
        .map(|(found, _)| found.iter().map(|e| e.to_ec2()).collect())
    }

    async fn create_network_interface(&self, request: &CreateEni) -> cloud::Result<Eni> {
        self.answer("CreateNetworkInterface", |vpc, now| {
            vpc.create_network_interface(now, request)
        })
        .await
        .map(|e| e.to_ec2())
    }

    async fn attach_network_interface(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
        network_card: u32,
    ) -> cloud::Result<String> {
        self.answer("AttachNetworkInterface", |vpc, now| {
            vpc.attach_network_interface(now, eni_id, instance_id, device_index, network_card)
        })
        .await
    }

    async fn set_delete_on_termination(&self, eni_id: &str, _: &str) -> cloud::Result<()> {
        self.answer("ModifyNetworkInterfaceAttribute", |vpc, now| {
            vpc.set_delete_on_termination(now, eni_id, true)
        })
        .await
    }

    async fn set_security_groups(&self, _: &str, _: &[String]) -> cloud::Result<()> {
        Self::not_simulated("ModifyNetworkInterfaceAttribute")
    }

    async fn assign_private_ips(&self, eni_id: &str, count: u32) -> cloud::Result<Vec<Ipv4Addr>> {
        self.answer("AssignPrivateIpAddresses", |vpc, now| {
            vpc.assign_private_ip_addresses(now, eni_id, count, 0)
        })
        .await
        .map(|(ips, _)| ips)
    }

    async fn assign_prefixes(&self, eni_id: &str, count: u32) -> cloud::Result<Vec<Ipv4Cidr>> {
        self.answer("AssignPrivateIpAddresses", |vpc, now| {
            vpc.assign_private_ip_addresses(now, eni_id, 0, count)
        })
        .await
        .map(|(_, prefixes)| prefixes)
    }

    async fn unassign(
        &self,
        eni_id: &str,
        ips: &[Ipv4Addr],
        prefixes: &[Ipv4Cidr],
    ) -> cloud::Result<()> {
        self.answer("UnassignPrivateIpAddresses", |vpc, now| {
            vpc.unassign_private_ip_addresses(now, eni_id, ips, prefixes)
        })
        .await
    }

    async fn assign_ipv6_prefixes(&self, _: &str, _: u32) -> cloud::Result<Vec<Ipv6Cidr>> {
        Self::not_simulated("AssignIpv6Addresses")
    }

    async fn unassign_ipv6_prefixes(&self, _: &str, _: &[Ipv6Cidr]) -> cloud::Result<()> {
        Self::not_simulated("UnassignIpv6Addresses")
    }

    async fn detach_network_interface(&self, attachment_id: &str) -> cloud::Result<()> {
        self.answer("DetachNetworkInterface", |vpc, now| {
            vpc.detach_network_interface(now, attachment_id)
        })
        .await
    }

    async fn delete_network_interface(&self, eni_id: &str) -> cloud::Result<()> {
        self.answer("DeleteNetworkInterface", |vpc, now| {
            vpc.delete_network_interface(now, eni_id)
        })
        .await
    }

    async fn associate_trunk_interface(
        &self,
        branch_id: &str,
        trunk_id: &str,
        vlan: u16,
        client_token: &str,
    ) -> cloud::Result<String> {
        self.answer("AssociateTrunkInterface", |vpc, now| {
            vpc.associate_trunk_interface(now, branch_id, trunk_id, vlan, Some(client_token))
        })
        .await
        .map(|a| a.id)
    }

    async fn disassociate_trunk_interface(&self, association_id: &str) -> cloud::Result<()> {
        self.answer("DisassociateTrunkInterface", |vpc, now| {
            vpc.disassociate_trunk_interface(now, association_id)
        })
        .await
    }

    async fn describe_trunk_interface_associations(
        &self,
        trunk_id: &str,
    ) -> cloud::Result<Vec<cloud::TrunkAssociation>> {
        self.answer("DescribeTrunkInterfaceAssociations", |vpc, now| {
            vpc.describe_trunk_interface_associations(now, &[], Some(trunk_id))
        })
        .await
        .map(|found| {
            found
                .into_iter()
                .map(|a| cloud::TrunkAssociation {
                    association_id: a.id,
                    branch_id: a.branch_id,
                    vlan: a.vlan_id,
                })
                .collect()
        })
    }

    async fn create_tags(&self, _: &str, _: &[(String, String)]) -> cloud::Result<()> {
        Self::not_simulated("CreateTags")
    }

    async fn describe_instance_type(&self, _: &str) -> cloud::Result<InstanceLimits> {
        Self::not_simulated("DescribeInstanceTypes")
    }

    async fn describe_subnets(
        &self,
        filters: &[(String, Vec<String>)],
    ) -> cloud::Result<Vec<SubnetInfo>> {
        self.answer("DescribeSubnets", |vpc, now| {
            vpc.describe_subnets_filtered(now, filters)
        })
        .await
    }
}

/// ENI links as the executor asked for them.
#[derive(Clone, Default)]
struct RecordedLinks(Arc<Mutex<Vec<LinkSpec>>>);

impl Links for RecordedLinks {
    async fn setup(&self, link: &LinkSpec) -> Result<(), String> {
        self.0.lock().unwrap().push(link.clone());
        Ok(())
    }

    async fn teardown(&self, link: &LinkSpec) -> Result<(), String> {
        self.0.lock().unwrap().retain(|l| l != link);
        Ok(())
    }
}

/// One node: the loop running, its EC2, its links and its checkpoint.
struct Node {
    events: mpsc::UnboundedSender<Event>,
    ec2: SimEc2,
    links: RecordedLinks,
    instance_id: String,
    pods_subnet: String,
    checkpoint: PathBuf,
    stopped: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

struct Setup {
    settings: Vec<(&'static str, &'static str)>,
    /// Where the checkpoint goes, under the temporary directory.
    checkpoint: &'static str,
    vanished_pod_grace: Option<Duration>,
    /// An IPv6 node's /80 (ENABLE_IPv6), with IPv4 egress.
    v6_prefix: Option<&'static str>,
    /// The node makes its own branch ENIs (POD_ENI_MANAGER=node) with this WARM_BRANCH_TARGET.
    node_branches: Option<u32>,
    /// Its branch limit, when not the instance type's (0: a type that cannot carry a trunk).
    branch_limit: Option<u32>,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            // Custom networking: the primary ENI gives no pod addresses, so the first ADD needs a
            // new ENI.
            settings: vec![
                ("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true"),
                ("WARM_IP_TARGET", "1"),
            ],
            checkpoint: "state/ipam.json",
            vanished_pod_grace: None,
            v6_prefix: None,
            node_branches: None,
            branch_limit: None,
        }
    }
}

fn start(setup: Setup) -> Node {
    let clock = Clock::starting_at(Time::from_secs(1_800_000_000));
    let mut vpc = SimVpc::new(VPC.parse().unwrap(), SimConfig::default());
    let nodes_subnet = vpc
        .add_subnet("198.18.0.0/24".parse().unwrap(), "az-a", &[])
        .unwrap();
    let pods_subnet = vpc
        .add_subnet("198.18.64.0/20".parse().unwrap(), "az-a", &[])
        .unwrap();
    let instance_id = vpc
        .launch_instance("m5.large", &nodes_subnet, &["sg-nodes"])
        .unwrap();
    let ec2 = SimEc2(Arc::new(Shared {
        vpc: Mutex::new(vpc),
        clock,
        calls: Mutex::default(),
        lose_next: Mutex::default(),
        halt_after: Mutex::default(),
    }));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a-file"), "").unwrap();
    launch(setup, ec2, instance_id, pods_subnet, dir, None)
}

/// The node's daemon killed (its loop dropped wherever it was) and started again on the same EC2
/// and state directory, as start-up does: the ENIs EC2 shows attached, the branches of the file
/// read against the trunk's associations.
async fn restart(node: Node, setup: Setup) -> Node {
    node.stopped.abort();
    let _ = node.stopped.await;
    *node.ec2.0.halt_after.lock().unwrap() = None;
    let store = Store::new(&node.checkpoint);
    let saved = store.load_branches().unwrap();
    let trunk = node
        .ec2
        .vpc()
        .interfaces()
        .find(|e| e.interface_type == "trunk" && attached_to(e, &node.instance_id))
        .map(|e| ipam::pool::EniInfo {
            is_trunk: true,
            ..e.eni_info(e.attachment.as_ref().unwrap().device_index)
        });
    let restored = ipamd::branches::restore(&node.ec2, trunk.as_ref(), &saved)
        .await
        .unwrap();
    launch(
        setup,
        node.ec2,
        node.instance_id,
        node.pods_subnet,
        node._dir,
        Some(restored),
    )
}

fn attached_to(eni: &simvpc::NetworkInterface, instance_id: &str) -> bool {
    eni.attachment
        .as_ref()
        .is_some_and(|a| a.instance_id == instance_id)
}

fn launch(
    setup: Setup,
    ec2: SimEc2,
    instance_id: String,
    pods_subnet: String,
    dir: tempfile::TempDir,
    restored: Option<ipam::branches::Reconciled>,
) -> Node {
    let clock = ec2.0.clock;
    let (instance, attached) = {
        let vpc = ec2.vpc();
        let instance = vpc.instance(&instance_id).unwrap().clone();
        let attached: Vec<simvpc::NetworkInterface> = vpc
            .interfaces()
            .filter(|e| attached_to(e, &instance_id))
            .cloned()
            .collect();
        (instance, attached)
    };
    let nodes_subnet = instance.subnet_id.clone();

    let mut lookup: BTreeMap<&str, &str> = setup.settings.iter().copied().collect();
    let warm_branches = setup.node_branches.map(|n| n.to_string());
    if let Some(n) = &warm_branches {
        lookup.extend([
            ("ENABLE_POD_ENI", "true"),
            ("POD_ENI_MANAGER", "node"),
            ("WARM_BRANCH_TARGET", n.as_str()),
        ]);
    }
    let config = Config::from_lookup(|k| lookup.get(k).map(|v| v.to_string())).unwrap();
    let settings = PoolSettings::from_config(&config);
    let spec = NodeSpec {
        instance_type: "m5.large".into(),
        slots_per_eni: instance.limits.slots_per_eni(),
        max_enis: instance.limits.enis(),
        max_pods: 29,
        supports_prefixes: true,
        primary_subnet: nodes_subnet.clone(),
        security_groups: vec!["sg-nodes".into()],
        eni_config: Some(EniConfigSpec {
            subnet: pods_subnet.clone(),
            security_groups: vec!["sg-pods".into()],
        }),
        unmanaged_enis: 0,
        unschedulable: false,
    };
    let mut pool = Pool::new(spec, &settings);

    let links = RecordedLinks::default();
    let metrics = Arc::new(Metrics::default());
    let executor = Executor::new(
        ec2.clone(),
        links.clone(),
        NodeFacts {
            instance_id: instance_id.clone(),
            availability_zone: "az-a".into(),
            vpc_id: ec2.vpc().vpc_id.clone(),
            cluster_name: Some("test".into()),
            extra_tags: BTreeMap::new(),
            eni_mtu: 9001,
            max_enis: instance.limits.enis(),
        },
        metrics.clone(),
    );
    executor.avoid_device(0);
    for eni in &attached {
        let device = eni.attachment.as_ref().unwrap().device_index;
        let info = ipam::pool::EniInfo {
            is_trunk: eni.interface_type == "trunk",
            ..eni.eni_info(device)
        };
        pool.add_eni(info, clock.now());
        pool.sync_eni(&eni.id, &ipamd::executor::blocks_of(&eni.to_ec2()));
        if device > 0 {
            executor.adopt(&eni.to_ec2(), eni.subnet_cidr);
        }
    }

    let checkpoint = dir.path().join(setup.checkpoint);
    let (events, receiver) = mpsc::unbounded_channel();
    let v6 = setup
        .v6_prefix
        .map(|p| ipam::v6::V6Pool::new(p.parse().unwrap(), true));
    let mut control = Control::new(Deps {
        pool,
        provisioning: v6.is_none(),
        v6,
        settings,
        veth_prefix: "tstx".into(),
        store: Store::new(&checkpoint),
        executor: Arc::new(executor),
        events: events.clone(),
        metrics,
        clock,
    });
    if let Some(grace) = setup.vanished_pod_grace {
        control = control.in_cluster(k8s::Reporter::disabled(), grace);
    }
    if config.node_makes_branches {
        let mut engine = ipam::branches::Branches::new(ipam::branches::BranchSettings {
            limit: setup
                .branch_limit
                .unwrap_or_else(|| ipam::limits::branch_interfaces("m5.large")),
            warm_target: config.warm_branch_target,
            cooldown: ipam::branches::BRANCH_COOLDOWN,
        });
        let mut pods = std::collections::HashMap::new();
        if let Some(r) = restored {
            for (key, meta, branch) in r.assigned {
                engine.restore(key.clone(), branch);
                pods.insert(key, meta);
            }
            for branch in r.warm {
                engine.adopt(branch, clock.now());
            }
        }
        control = control.with_node_branches(ipamd::control::NodeBranches::new(engine, pods));
    }
    let stopped = tokio::spawn(control.run(receiver));
    Node {
        events,
        ec2,
        links,
        instance_id,
        pods_subnet,
        checkpoint,
        stopped,
        _dir: dir,
    }
}

fn attachment(container: &str) -> Attachment {
    Attachment {
        network: "aws-cni".into(),
        container_id: container.into(),
        ifname: "eth0".into(),
    }
}

fn pod(name: &str) -> PodRef {
    PodRef {
        namespace: "default".into(),
        name: name.into(),
        infra_container_id: String::new(),
        uid: String::new(),
    }
}

impl Node {
    /// Sends a plugin request; the reply arrives on the receiver.
    fn send(&self, request: Request) -> oneshot::Receiver<Reply> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(Event::Plugin {
                request,
                reply,
                groups: None,
            })
            .expect("the loop runs");
        answer
    }

    /// An ADD of a pod whose SecurityGroupPolicies give it `groups` (the plugin socket read them).
    fn add_with_groups(
        &self,
        container: &str,
        name: &str,
        groups: &[&str],
    ) -> oneshot::Receiver<Reply> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(Event::Plugin {
                request: Request::Add {
                    attachment: attachment(container),
                    pod: pod(name),
                    netns: "/var/run/netns/x".into(),
                },
                reply,
                groups: Some(ipam::branches::GroupSet::new(groups.iter().copied())),
            })
            .expect("the loop runs");
        answer
    }

    async fn del(&self, container: &str, name: &str) -> Reply {
        self.ask(Request::Del {
            attachment: attachment(container),
            pod: Some(pod(name)),
            reason: DelReason::PodDeleted,
        })
        .await
    }

    async fn ask(&self, request: Request) -> Reply {
        self.send(request).await.expect("the loop answers")
    }

    fn add(&self, container: &str, name: &str) -> oneshot::Receiver<Reply> {
        self.send(Request::Add {
            attachment: attachment(container),
            pod: pod(name),
            netns: "/var/run/netns/x".into(),
        })
    }

    /// A value read from the loop's own state, between two batches of events.
    async fn inspect<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Control) -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = oneshot::channel();
        self.events
            .send(Event::Inspect(Box::new(move |c| {
                let _ = tx.send(read(c));
            })))
            .expect("the loop runs");
        rx.await.expect("the loop answers")
    }

    /// The ENIs EC2 shows attached to this node, by device index: (id, addresses).
    fn enis_in_ec2(&self) -> BTreeMap<u32, (String, Vec<Ipv4Addr>)> {
        self.ec2
            .vpc()
            .interfaces()
            .filter_map(|e| {
                let a = e.attachment.as_ref()?;
                (a.instance_id == self.instance_id)
                    .then(|| (a.device_index, (e.id.clone(), e.secondary_ips.clone())))
            })
            .collect()
    }
}

fn added(reply: &Reply) -> proto::Allocation {
    match reply {
        Reply::Added { allocation } => *allocation,
        other => panic!("expected an address, got {other:?}"),
    }
}

fn v4(allocation: &proto::Allocation) -> Ipv4Addr {
    match allocation.address {
        IpAddr::V4(ip) => ip,
        other => panic!("expected an IPv4 address, got {other}"),
    }
}

fn checkpointed(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn a_cold_add_is_served_once_ec2_created_and_attached_an_eni() {
    let node = start(Setup::default());
    let reply = node.add("c1", "web-1").await.unwrap();
    let allocation = added(&reply);

    let enis = node.enis_in_ec2();
    let (eni, addresses) = &enis[&1];
    assert_eq!(allocation.device_number, 1);
    assert!(
        addresses.contains(&v4(&allocation)),
        "{} is not on {eni} in EC2: {addresses:?}",
        allocation.address
    );
    let pods_cidr: Ipv4Cidr = "198.18.64.0/20".parse().unwrap();
    assert!(
        pods_cidr.contains(v4(&allocation)),
        "custom networking's subnet"
    );
    let calls = node.ec2.calls();
    let at = |op| calls.iter().position(|c| *c == op).unwrap_or(usize::MAX);
    assert!(
        at("CreateNetworkInterface") < at("AttachNetworkInterface")
            && at("AttachNetworkInterface") < at("ModifyNetworkInterfaceAttribute"),
        "{calls:?}"
    );
    let vpc = node.ec2.vpc();
    let created = vpc.interfaces().find(|e| e.id == *eni).unwrap();
    assert_eq!(created.subnet_id, node.pods_subnet);
    assert_eq!(created.security_groups, ["sg-pods"]);
    assert_eq!(
        created.tags.get("node.k8s.amazonaws.com/instance_id"),
        Some(&node.instance_id)
    );
    assert_eq!(
        created
            .tags
            .get("cluster.k8s.amazonaws.com/name")
            .map(String::as_str),
        Some("test")
    );
    drop(vpc);
    let links = node.links.0.lock().unwrap().clone();
    assert_eq!(links.len(), 1, "the new ENI's link was set up: {links:?}");
    assert!(checkpointed(&node.checkpoint).contains("c1"));
}

#[tokio::test(start_paused = true)]
async fn a_retried_add_takes_the_place_of_the_one_it_retries() {
    let node = start(Setup::default());
    // Both reach the loop before the first ENI exists, so the first waits.
    let first = node.add("c1", "web-1");
    let retry = node.add("c1", "web-1");
    match first.await.unwrap() {
        Reply::Error { message, .. } => assert!(message.contains("superseded"), "{message}"),
        other => panic!("the first ADD should have been superseded: {other:?}"),
    }
    let allocation = added(&retry.await.unwrap());
    let again = added(&node.add("c1", "web-1").await.unwrap());
    assert_eq!(
        again, allocation,
        "ADD is idempotent for the same attachment"
    );
    let held = node.inspect(|c| c.pool().assignments().count()).await;
    assert_eq!(held, 1);
}

#[tokio::test(start_paused = true)]
async fn a_checkpoint_that_cannot_be_written_undoes_the_assignment_and_says_so() {
    let node = start(Setup {
        // A regular file where the checkpoint's directory should be.
        checkpoint: "a-file/ipam.json",
        ..Setup::default()
    });
    match node.add("c1", "web-1").await.unwrap() {
        Reply::Error { kind, message } => {
            assert_eq!(kind, proto::ErrorKind::Internal);
            assert!(message.contains("checkpoint"), "{message}");
        }
        other => panic!("an address that is not on disk must not be given: {other:?}"),
    }
    let held = node.inspect(|c| c.pool().assignments().count()).await;
    assert_eq!(held, 0, "the assignment was undone");
}

#[tokio::test(start_paused = true)]
async fn a_lost_reply_is_read_back_from_ec2_before_the_pool_trusts_its_count() {
    let node = start(Setup::default());
    added(&node.add("c1", "web-1").await.unwrap());
    // The next assign happens in EC2 but its reply is lost.
    node.ec2.lose_next("AssignPrivateIpAddresses");
    let mut replies = Vec::new();
    for i in 2..8 {
        replies.push(node.add(&format!("c{i}"), &format!("web-{i}")));
    }
    for reply in replies {
        added(&reply.await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    let calls = node.ec2.calls();
    let lost = calls
        .iter()
        .rposition(|c| *c == "AssignPrivateIpAddresses")
        .expect("an assign was made");
    assert!(
        calls.contains(&"DescribeNetworkInterfaces"),
        "the ENI was read back: {calls:?} (lost at {lost})"
    );
    let in_pool = node
        .inspect(|c| {
            c.pool()
                .enis()
                .iter()
                .filter(|e| !e.info.is_primary)
                .map(|e| (e.info.id.clone(), e.blocks().len()))
                .collect::<Vec<_>>()
        })
        .await;
    let in_ec2 = node.enis_in_ec2();
    for (id, blocks) in in_pool {
        let (_, addresses) = in_ec2.values().find(|(e, _)| *e == id).unwrap();
        assert_eq!(
            blocks,
            addresses.len(),
            "{id}: the pool's count is EC2's after the read-back"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn sigterm_drains_del_still_served_new_adds_refused_then_the_loop_ends() {
    let node = start(Setup::default());
    added(&node.add("c1", "web-1").await.unwrap());
    node.events.send(Event::Stop { immediate: false }).unwrap();
    match node.add("c2", "web-2").await.unwrap() {
        Reply::Error { kind, message } => {
            assert_eq!(kind, proto::ErrorKind::Unavailable);
            assert!(message.contains("stopping"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let deleted = node
        .ask(Request::Del {
            attachment: attachment("c1"),
            pod: None,
            reason: DelReason::PodDeleted,
        })
        .await;
    assert!(
        matches!(deleted, Reply::Deleted { released: Some(_) }),
        "{deleted:?}"
    );
    assert!(!node.stopped.is_finished(), "the drain lasts");
    tokio::time::timeout(Duration::from_secs(30), node.stopped)
        .await
        .expect("the loop ends after the drain")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_pod_the_api_server_no_longer_lists_loses_its_address_after_the_grace() {
    let node = start(Setup {
        vanished_pod_grace: Some(Duration::from_secs(60)),
        ..Setup::default()
    });
    added(&node.add("c1", "web-1").await.unwrap());
    added(&node.add("c2", "web-2").await.unwrap());
    let listed = |names: &[&str]| {
        Event::PodsOnNode(k8s::PodSnapshot {
            pods: names
                .iter()
                .map(|n| k8s::PodRef {
                    namespace: "default".into(),
                    name: n.to_string(),
                })
                .collect::<HashSet<_>>(),
            branches: Default::default(),
        })
    };
    node.events.send(listed(&["web-2"])).unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    node.events.send(listed(&["web-2"])).unwrap();
    assert_eq!(
        pods_held(&node).await,
        ["web-1", "web-2"],
        "within the grace"
    );
    tokio::time::sleep(Duration::from_secs(31)).await;
    node.events.send(listed(&["web-2"])).unwrap();
    assert_eq!(pods_held(&node).await, ["web-2"], "after the grace");
    // Listed again before the grace ends: kept.
    node.events.send(listed(&[])).unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    node.events.send(listed(&["web-2"])).unwrap();
    tokio::time::sleep(Duration::from_secs(40)).await;
    node.events.send(listed(&["web-2"])).unwrap();
    assert_eq!(pods_held(&node).await, ["web-2"]);
    assert!(!checkpointed(&node.checkpoint).contains("c1"));
}

async fn pods_held(node: &Node) -> Vec<String> {
    node.inspect(|c| {
        let mut pods: Vec<String> = c
            .pool()
            .assignments()
            .map(|(_, a)| a.meta.name.clone())
            .collect();
        pods.sort();
        pods
    })
    .await
}

/// The plugin's socket as the daemon serves it: a root peer's request reaches the loop and comes
/// back answered; anyone else is refused without reaching it. Whichever this test runs as, it
/// checks the behaviour for that user.
#[tokio::test(start_paused = true)]
async fn the_plugin_socket_serves_root_and_refuses_anyone_else() {
    use std::os::unix::fs::MetadataExt;
    let node = start(Setup::default());
    let socket = node._dir.path().join("run/ipamd.sock");
    let listener = proto::Listener::bind(&socket).unwrap();
    ipamd::plugin_socket::spawn(listener, node.events.clone(), None).unwrap();
    let root = std::fs::metadata(node._dir.path().join("a-file"))
        .unwrap()
        .uid()
        == 0;
    let reply = tokio::task::spawn_blocking(move || {
        proto::call(&socket, &Request::Status, Duration::from_secs(10))
    })
    .await
    .unwrap()
    .expect("the socket answers");
    match (root, reply) {
        (true, Reply::Status { .. }) => {}
        (false, Reply::Error { message, .. }) => {
            assert!(message.contains("only root"), "{message}")
        }
        (root, other) => panic!("as root={root}: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn an_ipv6_add_takes_a_128_and_an_egress_address_without_ec2_and_del_returns_them() {
    let node = start(Setup {
        v6_prefix: Some("2600:1f14:abc:de00:1234::/80"),
        ..Setup::default()
    });
    let first = added(&node.add("c1", "web-1").await.unwrap());
    let second = added(&node.add("c2", "web-2").await.unwrap());
    let prefix: Ipv6Cidr = "2600:1f14:abc:de00:1234::/80".parse().unwrap();
    for a in [&first, &second] {
        let IpAddr::V6(ip) = a.address else {
            panic!("expected IPv6, got {}", a.address)
        };
        assert!(
            prefix.contains_cidr(&Ipv6Cidr::new(ip, 128).unwrap()),
            "{ip}"
        );
        assert_eq!((a.device_number, a.route_table), (0, 254));
        let egress = a.egress_v4.expect("an egress address");
        assert_eq!(egress.octets()[..2], [169, 254], "{egress}");
    }
    assert_ne!(first.address, second.address);
    assert_ne!(first.egress_v4, second.egress_v4);
    assert!(node.ec2.calls().is_empty(), "{:?}", node.ec2.calls());
    let saved = checkpointed(&node.checkpoint);
    assert!(
        saved.contains(&format!("\"ipv6\":\"{}\"", first.address)),
        "{saved}"
    );
    assert!(!saved.contains("\"ipv4\""), "{saved}");

    let again = added(&node.add("c1", "web-1").await.unwrap());
    assert_eq!(again, first, "a retried ADD gets the same addresses");
    let deleted = node
        .ask(Request::Del {
            attachment: attachment("c1"),
            pod: None,
            reason: DelReason::PodDeleted,
        })
        .await;
    assert_eq!(
        deleted,
        Reply::Deleted {
            released: Some(first)
        }
    );
    let saved = checkpointed(&node.checkpoint);
    assert!(!saved.contains(&first.address.to_string()), "{saved}");
    let status = node.ask(Request::Status).await;
    assert!(
        matches!(
            status,
            Reply::Status {
                ready: true,
                available_addresses: 28,
                ..
            }
        ),
        "{status:?}"
    );
}

/// Where the node makes its branch ENIs: a pod with groups waits while the node makes its trunk and
/// a branch with the pod's groups, associated under a VLAN id; its DEL leaves the branch warm, and
/// the next pod with the same groups takes it without an EC2 call; a branch of groups no pod uses
/// goes after the cooldown; a pod without groups takes the pool's address as ever.
#[tokio::test(start_paused = true)]
async fn the_node_makes_a_trunk_and_branches_and_reuses_a_branch_for_the_same_groups() {
    let node = start(Setup {
        node_branches: Some(0),
        ..Setup::default()
    });
    let first = added(
        &node
            .add_with_groups("c1", "db-0", &["sg-db"])
            .await
            .unwrap(),
    );
    let trunk = node
        .ec2
        .vpc()
        .interfaces()
        .find(|e| e.interface_type == "trunk")
        .map(|e| (e.id.clone(), e.mac.clone()))
        .expect("a trunk ENI");
    let branch = first.branch.expect("a branch pod");
    assert_eq!(
        (branch.vlan, first.route_table),
        (1, 101),
        "the first VLAN id"
    );
    assert_eq!(
        branch.trunk_mac,
        ipam::choreography::parse_mac(&trunk.1).unwrap()
    );
    let (branch_eni, associated) = {
        let vpc = node.ec2.vpc();
        let b = vpc
            .interfaces()
            .find(|e| e.interface_type == "branch")
            .expect("a branch ENI")
            .clone();
        let associated = vpc.is_associated_branch(&b.id);
        (b, associated)
    };
    assert!(associated, "associated with the trunk");
    assert_eq!(branch_eni.security_groups, ["sg-db"]);
    assert_eq!(v4(&first), branch_eni.primary_ip);
    let saved = std::fs::read_to_string(node.checkpoint.with_file_name("vpc-cni-rs-branches.json"))
        .unwrap();
    assert!(
        saved.contains("db-0") && saved.contains(&branch_eni.id),
        "{saved}"
    );
    assert_eq!(
        node.ask(Request::Lookup {
            attachment: attachment("c1"),
            pod: None,
        })
        .await,
        Reply::Found {
            allocation: Some(first)
        },
        "CHECK finds the branch"
    );

    // A rolling update: the pod goes, its successor with the same groups takes the warm branch.
    let creations = |node: &Node| {
        node.ec2
            .calls()
            .iter()
            .filter(|c| **c == "CreateNetworkInterface")
            .count()
    };
    let made = creations(&node);
    assert_eq!(
        node.del("c1", "db-0").await,
        Reply::Deleted {
            released: Some(first)
        },
        "DEL gives the branch back for the plugin to unwire"
    );
    let second = added(
        &node
            .add_with_groups("c2", "db-1", &["sg-db"])
            .await
            .unwrap(),
    );
    assert_eq!(second, first, "the same branch");
    assert_eq!(creations(&node), made, "no EC2 call");

    // Other groups: another branch, another VLAN id.
    let web = added(
        &node
            .add_with_groups("c3", "web-0", &["sg-web", "sg-db"])
            .await
            .unwrap(),
    );
    assert_eq!(web.branch.unwrap().vlan, 2);
    assert_ne!(v4(&web), v4(&first));

    // Without groups: the pool's address.
    let plain = added(&node.add("c4", "plain-0").await.unwrap());
    assert!(plain.branch.is_none());

    // web-0 goes; its branch is warm for the cooldown, then deleted; db-1's stays.
    assert!(matches!(
        node.del("c3", "web-0").await,
        Reply::Deleted { released: Some(_) }
    ));
    tokio::time::sleep(ipam::branches::BRANCH_COOLDOWN + Duration::from_secs(5)).await;
    let branches = node
        .inspect(|c| {
            let b = c.node_branches().unwrap().engine();
            (b.assigned(), b.warm())
        })
        .await;
    assert_eq!(branches, (1, 0), "db-1's branch, none warm");
    let left: Vec<String> = node
        .ec2
        .vpc()
        .interfaces()
        .filter(|e| e.interface_type == "branch")
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(left, [branch_eni.id], "web's branch deleted in EC2");
    let calls = node.ec2.calls();
    assert!(
        calls.contains(&"DisassociateTrunkInterface") && calls.contains(&"DeleteNetworkInterface"),
        "{calls:?}"
    );
}

/// CNI GC where the node makes its branches: a branch pod the runtime still lists keeps its branch,
/// and its address is in `keep` (else the plugin removes its host side); one it no longer lists
/// gives its branch back, warm. A repeated ADD keeps what the pod was given whichever way it comes.
#[tokio::test(start_paused = true)]
async fn gc_keeps_the_branches_of_valid_attachments_and_takes_back_the_others() {
    let node = start(Setup {
        node_branches: Some(0),
        ..Setup::default()
    });
    let db = added(
        &node
            .add_with_groups("c1", "db-0", &["sg-db"])
            .await
            .unwrap(),
    );
    let web = added(
        &node
            .add_with_groups("c2", "web-0", &["sg-web"])
            .await
            .unwrap(),
    );
    let plain = added(&node.add("c3", "plain-0").await.unwrap());
    let reply = node
        .ask(Request::Gc {
            network: "aws-cni".into(),
            valid: vec![attachment("c1"), attachment("c3")],
        })
        .await;
    let Reply::Collected { keep, released } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(released, 1);
    assert!(
        keep.contains(&db.address) && keep.contains(&plain.address),
        "{keep:?}"
    );
    assert!(!keep.contains(&web.address), "{keep:?}");
    let branches = node
        .inspect(|c| {
            let b = c.node_branches().unwrap().engine();
            (b.assigned(), b.warm())
        })
        .await;
    assert_eq!(branches, (1, 1), "db-0's given, web-0's warm");

    // db-0's policy went since its ADD: a repeated ADD still gets its branch.
    assert_eq!(added(&node.add("c1", "db-0").await.unwrap()), db);
    // A policy selected plain-0 since its ADD: it keeps the pool's address.
    assert_eq!(
        added(
            &node
                .add_with_groups("c3", "plain-0", &["sg-db"])
                .await
                .unwrap()
        ),
        plain
    );
}

/// On an instance type that cannot carry a trunk, a pod with groups is refused at once, saying
/// why, rather than waiting for a branch that cannot come.
#[tokio::test(start_paused = true)]
async fn a_pod_with_groups_is_refused_at_once_where_no_trunk_can_be() {
    let node = start(Setup {
        node_branches: Some(0),
        branch_limit: Some(0),
        ..Setup::default()
    });
    let started = tokio::time::Instant::now();
    let reply = node
        .add_with_groups("c1", "db-0", &["sg-db"])
        .await
        .unwrap();
    let Reply::Error { kind, message } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(kind, proto::ErrorKind::NoAddressAvailable);
    assert!(message.contains("cannot carry a trunk"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(1), "at once");
}

/// How far the lives of two branch pods got: db-0 (sg-db) starts, web-0 (sg-web) starts while
/// db-0 runs, both end; then their branches are deleted after the cooldown.
#[derive(Clone, Copy, Debug, Default)]
struct Life {
    /// Each pod's ADD answered (with its branch), and its DEL answered.
    added: [Option<proto::Allocation>; 2],
    deleted: [bool; 2],
    gone: bool,
}

const PODS: [(&str, &str, &str); 2] = [("c1", "db-0", "sg-db"), ("c2", "web-0", "sg-web")];

/// Goes on with the pods' lives as the kubelet would: what was not answered is asked again. Each
/// step gives up when no answer comes (the daemon died).
async fn live(node: &Node, mut life: Life) -> Life {
    let patience = Duration::from_secs(60);
    for (i, (container, name, group)) in PODS.iter().enumerate() {
        if life.added[i].is_none() {
            let add = node.add_with_groups(container, name, &[group]);
            match tokio::time::timeout(patience, add).await {
                Ok(Ok(Reply::Added { allocation })) => life.added[i] = Some(allocation),
                _ => return life,
            }
        }
    }
    for (i, (container, name, _)) in PODS.iter().enumerate() {
        if !life.deleted[i] {
            match tokio::time::timeout(patience, node.del(container, name)).await {
                Ok(Reply::Deleted { released }) if released == life.added[i] => {
                    life.deleted[i] = true
                }
                Ok(other) => panic!("DEL of a branch pod: {other:?}"),
                Err(_) => return life,
            }
        }
    }
    tokio::time::sleep(ipam::branches::BRANCH_COOLDOWN + Duration::from_secs(30)).await;
    let (warm, in_flight) = node
        .inspect(|c| {
            let b = c.node_branches().unwrap().engine();
            (b.warm(), b.in_flight())
        })
        .await;
    life.gone = warm == 0 && in_flight == 0;
    life
}

/// kill -9 after each EC2 step of a branch pod's life (the trunk's creation, the branch's creation
/// and association, its disassociation and deletion after the pod left, and the pool's own calls
/// around them): the daemon started again and the kubelet's retries finish the life; then no branch
/// is associated with the trunk, the leaked-ENI collector finds every branch and trunk the dead
/// run left unattached, one trunk remains, and a pod that had its branch when the daemon died
/// still has it, in EC2 too.
#[tokio::test(start_paused = true)]
async fn a_kill_after_any_ec2_step_of_a_branch_pods_life_leaks_nothing_and_keeps_branches_in_use() {
    let setup = || Setup {
        settings: vec![("WARM_IP_TARGET", "1")],
        node_branches: Some(0),
        ..Setup::default()
    };
    let steps = {
        let node = start(setup());
        let life = live(&node, Life::default()).await;
        assert!(life.gone, "{life:?}");
        node.ec2.calls()
    };
    for op in [
        "CreateNetworkInterface",
        "AttachNetworkInterface",
        "AssociateTrunkInterface",
        "DisassociateTrunkInterface",
        "DeleteNetworkInterface",
    ] {
        assert!(steps.contains(&op), "{op} in {steps:?}");
    }
    // Kills that left a pod running with its branch, and leftovers the collector deleted.
    let (mut running, mut collected) = (0, 0);
    for (k, step) in steps.iter().enumerate() {
        let node = start(setup());
        *node.ec2.0.halt_after.lock().unwrap() = Some(k);
        let before = live(&node, Life::default()).await;
        assert!(!before.gone, "killed after {k} calls: {before:?}");
        let node = restart(node, setup()).await;
        for (i, (container, ..)) in PODS.iter().enumerate() {
            let (Some(given), false) = (before.added[i], before.deleted[i]) else {
                continue;
            };
            running += 1;
            let found = node
                .ask(Request::Lookup {
                    attachment: attachment(container),
                    pod: None,
                })
                .await;
            assert_eq!(
                found,
                Reply::Found {
                    allocation: Some(given)
                },
                "killed after {k} calls ({}): the running pod's branch",
                step
            );
            let address = v4(&given);
            assert!(
                node.ec2
                    .vpc()
                    .interfaces()
                    .any(|e| e.primary_ip == address && e.interface_type == "branch"),
                "killed after {k} calls: the running pod's branch is in EC2"
            );
        }
        let after = live(&node, before).await;
        assert!(after.gone, "killed after {k} calls ({}): {after:?}", step);
        let (assigned, warm) = node
            .inspect(|c| {
                let b = c.node_branches().unwrap().engine();
                (b.assigned(), b.warm())
            })
            .await;
        assert_eq!((assigned, warm), (0, 0));

        let vpc_id = node.ec2.vpc().vpc_id.clone();
        let report = cloud::gc::collect_leaked_enis(
            &node.ec2,
            &cloud::gc::LeakScan {
                vpc_id,
                cluster_name: Some("test".into()),
            },
            std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + 86_400),
        )
        .await
        .unwrap();
        collected += report.deleted.len();
        let vpc = node.ec2.vpc();
        let left: Vec<(String, bool)> = vpc
            .interfaces()
            .filter(|e| e.interface_type == "branch" || e.interface_type == "trunk")
            .map(|e| (e.interface_type.clone(), attached_to(e, &node.instance_id)))
            .collect();
        assert_eq!(
            left,
            [("trunk".to_string(), true)],
            "killed after {k} calls ({}); the collector deleted {:?}",
            step,
            report.deleted
        );
    }
    eprintln!(
        "{} steps: {steps:?}; {running} kills left a pod running, {collected} ENIs collected",
        steps.len()
    );
    assert!(running > 0 && collected > 0, "{running} {collected}");
}

/// 250 branch pods come and go over three sets of groups, a few running at once: every ADD is
/// answered with a branch of its pod's groups, no two running pods share one, the branches are
/// reused (far fewer made than pods), and once the cooldown is over EC2 holds no branch.
#[tokio::test(start_paused = true)]
async fn two_hundred_and_fifty_branch_pods_reuse_branches_and_leave_none_behind() {
    use rand::{Rng, SeedableRng};
    let node = start(Setup {
        settings: vec![("WARM_IP_TARGET", "1")],
        node_branches: Some(0),
        ..Setup::default()
    });
    let sets = [&["sg-a"][..], &["sg-b"], &["sg-a", "sg-c"]];
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let mut running: Vec<(String, usize, proto::Allocation)> = Vec::new();
    for n in 0..250 {
        if running.len() >= 6 || (!running.is_empty() && rng.gen_bool(0.4)) {
            let (container, _, given) = running.swap_remove(rng.gen_range(0..running.len()));
            let reply = node.del(&container, &container).await;
            assert_eq!(
                reply,
                Reply::Deleted {
                    released: Some(given)
                }
            );
        }
        let set = rng.gen_range(0..sets.len());
        let container = format!("c{n}");
        let given = added(
            &node
                .add_with_groups(&container, &container, sets[set])
                .await
                .unwrap(),
        );
        let vlan = given.branch.expect("a branch").vlan;
        assert!(
            running
                .iter()
                .all(|(_, _, a)| a.branch.unwrap().vlan != vlan),
            "VLAN {vlan} given twice"
        );
        let address = v4(&given);
        let groups = node
            .ec2
            .vpc()
            .interfaces()
            .find(|e| e.primary_ip == address && e.interface_type == "branch")
            .map(|e| e.security_groups.clone())
            .expect("the branch in EC2");
        let mut wanted: Vec<String> = sets[set].iter().map(|g| g.to_string()).collect();
        wanted.sort();
        assert_eq!(groups, wanted, "pod {n}'s branch has its groups");
        running.push((container, set, given));
        // Sometimes the next pod comes after a pause longer than the cooldown.
        if rng.gen_bool(0.05) {
            tokio::time::sleep(ipam::branches::BRANCH_COOLDOWN * 2).await;
        }
    }
    for (container, _, given) in running.drain(..) {
        assert_eq!(
            node.del(&container, &container).await,
            Reply::Deleted {
                released: Some(given)
            }
        );
    }
    tokio::time::sleep(ipam::branches::BRANCH_COOLDOWN + Duration::from_secs(30)).await;
    let made = node
        .ec2
        .calls()
        .iter()
        .filter(|c| **c == "AssociateTrunkInterface")
        .count();
    // A branch per pod would make 250; twelve pauses past the cooldown each start over.
    assert!(made * 2 < 250, "{made} branches made for 250 pods");
    let left = node
        .ec2
        .vpc()
        .interfaces()
        .filter(|e| e.interface_type == "branch")
        .count();
    assert_eq!(left, 0, "branches left in EC2");
    eprintln!("250 branch pods: {made} branches made");
}
