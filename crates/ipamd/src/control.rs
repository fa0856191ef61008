//! The control loop: one task owns the pool. Plugin requests, finished EC2 actions, introspection
//! queries and stop signals arrive as events; after each batch of events the loop serves waiting
//! ADDs, runs the policy, writes the checkpoint if an assignment changed, and only then sends the
//! replies. The only timer is the policy's own `wake_at` (and waiting ADDs' deadlines): a quiet node
//! makes no EC2 calls.

use crate::executor::{Actions, Report};
use crate::metrics::{Metrics, PoolGauges};
use crate::store::Store;
use cloud::ErrorKind as CloudErrorKind;
use datapath::snat::SnatPolicy;
use ipam::action::Outcome;
use ipam::pool::{Assignment, EniConfigSpec};
use ipam::reconcile::{self, Finding, Reconciler, Seen};
use ipam::v6::{V6Assignment, V6Pool};
use ipam::Ipv4Cidr;
use ipam::{
    decide, Action, Demand, IpamKey, PodMeta, PolicyMemory, Pool, PoolSettings, Stall, Time,
};
use proto::{Allocation, Attachment, DelReason, ErrorKind, Reply, Request};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// How long an ADD waits for an address before it is told to try again (the plugin gives up at 60 s).
pub const ADD_WAIT: Duration = Duration::from_secs(45);
/// After SIGTERM: DEL is still served this long, so that pods deleted during a rollout are cleaned.
pub const DRAIN: Duration = Duration::from_secs(5);
/// The network name under which the addresses of pods found wired on the host are kept when the
/// checkpoint was unreadable; their container id is the pod's host veth name.
pub const RECOVERED_NETWORK: &str = "recovered";

#[path = "control_branches.rs"]
mod branches;
pub use branches::{BranchAnnotation, NodeBranches};

pub type Inspector = Box<dyn FnOnce(&Control) + Send>;

pub enum Event {
    Plugin {
        request: Request,
        reply: oneshot::Sender<Reply>,
        /// An ADD's security groups where the node makes branches and a SecurityGroupPolicy
        /// selects the pod: it gets a branch ENI, not an address of the pool.
        groups: Option<ipam::branches::GroupSet>,
    },
    Finished {
        action: Action,
        report: Report,
    },
    Inspect(Inspector),
    /// Custom networking's ENIConfig, from the Node and the ENIConfig objects (or the file).
    EniConfig {
        source: String,
        spec: Result<EniConfigSpec, String>,
    },
    /// Every pod the API server has on this node, sent on each change and periodically.
    PodsOnNode(k8s::PodSnapshot),
    /// On EKS, a branch pod's ADD answered from the VPC resource controller's annotation
    /// (`message`): the loop tells NetworkPolicy of the pod and sends the answer once its rules are
    /// in.
    ControllerBranchAdded {
        pod: k8s::PodRef,
        ip: std::net::IpAddr,
        reply: oneshot::Sender<Reply>,
        message: Reply,
    },
    /// This node's Node object, at each change: the kubelet's `--max-pods`, cordoned or not.
    Node(k8s::NodeView),
    /// The instance's ENIs, their addresses and the VPC's CIDRs, as IMDS shows them now.
    Imds(cloud::identity::Network),
    /// The settings with the `amazon-vpc-cni` ConfigMap over the environment, at each change of
    /// the ConfigMap: the pool takes the live ones (`ipam::config_map::LIVE`).
    Settings {
        pool: PoolSettings,
        view: SettingsView,
    },
    /// `immediate`: a second signal, stop as soon as EC2 calls in flight are done.
    Stop {
        immediate: bool,
    },
}

/// Where the settings come from, for `/v1/config`.
#[derive(Clone, Debug, Default)]
pub struct SettingsView {
    /// The ConfigMap's name (VPC_CNI_CONFIG_MAP).
    pub name: String,
    /// Whether the ConfigMap exists (`None`: not read: no API server, or none named).
    pub config_map: Option<bool>,
    /// ConfigMap key → the variable it sets, for the keys taken.
    pub keys: std::collections::BTreeMap<String, String>,
    /// Keys refused, with why.
    pub refused: Vec<String>,
    /// Keys other components read.
    pub others: Vec<String>,
    /// Keys whose value differs from what the daemon started with and that wait for a restart.
    pub pending_restart: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Initialised; the pool is being filled to its targets.
    Warming,
    Ready,
    /// No new allocations; DEL is served until `until`.
    Draining {
        until: Instant,
    },
}

struct Waiting {
    key: IpamKey,
    meta: PodMeta,
    reply: oneshot::Sender<Reply>,
    since: Instant,
}

/// A reply held until the checkpoint is on disk; `assigned` (or `branch`) is undone if the write
/// fails.
struct Outgoing {
    reply: oneshot::Sender<Reply>,
    message: Reply,
    assigned: Option<IpamKey>,
    branch: Option<IpamKey>,
}

/// The wall clock, for start-up (the control loop reads its [`Clock`]).
pub fn now() -> Time {
    Time(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64,
    )
}

/// The control loop's one clock: wall time read once, then advanced by tokio's monotonic clock. A
/// test that pauses tokio's time moves the loop's deadlines, cooldowns and grace periods with it.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    wall: Time,
    at: Instant,
}

impl Clock {
    pub fn starting_at(wall: Time) -> Clock {
        Clock {
            wall,
            at: Instant::now(),
        }
    }

    pub fn now(&self) -> Time {
        self.wall + self.at.elapsed()
    }

    /// How long since the clock started (the daemon's start).
    pub fn elapsed(&self) -> Duration {
        self.at.elapsed()
    }
}

fn cidrs(list: &[Ipv4Cidr]) -> String {
    list.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn key_of(a: &Attachment) -> IpamKey {
    IpamKey::new(&a.network, &a.container_id, &a.ifname)
}

fn allocation(a: &Assignment) -> Allocation {
    Allocation {
        address: a.ip.into(),
        device_number: a.device_number,
        route_table: a.route_table,
        egress_v4: None,
        branch: None,
    }
}

/// Every IPv6 pod is on the primary ENI, in main.
fn v6_allocation(a: &V6Assignment) -> Allocation {
    Allocation {
        address: a.ip.into(),
        device_number: 0,
        route_table: datapath::MAIN_TABLE,
        egress_v4: a.egress_v4,
        branch: None,
    }
}

pub struct Control {
    pool: Pool,
    /// IPv6 pods' addresses (ENABLE_IPv6): then `pool` holds the ENIs but gives no pod addresses,
    /// and provisioning is off.
    v6: Option<V6Pool>,
    memory: PolicyMemory,
    settings: PoolSettings,
    veth_prefix: String,
    provisioning: bool,
    phase: Phase,
    waiting: VecDeque<Waiting>,
    store: Store,
    dirty: bool,
    outbox: Vec<Outgoing>,
    executor: Arc<dyn Actions>,
    events: mpsc::UnboundedSender<Event>,
    metrics: Arc<Metrics>,
    clock: Clock,
    wake_at: Option<Time>,
    stalls: Vec<Stall>,
    actions_in_flight: usize,
    /// The same, by upstream's name for the work (`awscni_ipamd_action_inprogress`).
    in_progress: std::collections::BTreeMap<&'static str, u32>,
    reporter: k8s::Reporter,
    eni_config_source: Option<String>,
    /// Assignments whose pod the API server did not list, since when.
    absent_since: HashMap<IpamKey, Time>,
    vanished_pod_grace: Duration,
    host: Option<HostFacts>,
    reconciler: Reconciler,
    /// NetworkPolicy enforcement, when on, and the assignments it has been told of.
    netpol: Option<mpsc::UnboundedSender<crate::netpol::Input>>,
    told_netpol: HashSet<IpamKey>,
    settings_view: SettingsView,
    /// The node's own branch ENIs (`POD_ENI_MANAGER=node`).
    branches: Option<NodeBranches>,
    /// On EKS, the pods the VPC resource controller gave a branch.
    controller_branches: Option<HashMap<IpamKey, branches::ControllerPod>>,
    annotate_branches: Option<mpsc::UnboundedSender<BranchAnnotation>>,
}

/// What the loop is made of: the pool and settings start-up built, and its effects on the world (the
/// checkpoint file, the executor of EC2 actions, the metrics, the clock), so that a test can give it
/// others.
pub struct Deps {
    pub pool: Pool,
    pub v6: Option<V6Pool>,
    pub settings: PoolSettings,
    /// The host veth prefix (AWS_VPC_K8S_CNI_VETHPREFIX), to find a vanished pod's host side.
    pub veth_prefix: String,
    /// False with DISABLE_NETWORK_RESOURCE_PROVISIONING=true: the pool is never grown or shrunk.
    pub provisioning: bool,
    pub store: Store,
    pub executor: Arc<dyn Actions>,
    /// The loop's own queue, for the actions it spawns to report back on.
    pub events: mpsc::UnboundedSender<Event>,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
}

/// What start-up learned of the host that the periodic IMDS read is compared with.
pub struct HostFacts {
    /// ENIs attached that are not in the pool (someone else's, or unusable), with their device
    /// index and network card: no news while IMDS lists them, their slot free again once not.
    pub foreign_enis: HashMap<String, (u32, u32)>,
    /// The SNAT table as applied, and what its exemptions were made of.
    pub snat: SnatPolicy,
    pub vpc_cidrs: Vec<Ipv4Cidr>,
    pub snat_excluded: Vec<Ipv4Cidr>,
}

impl HostFacts {
    /// The SNAT table for the VPC's CIDRs now, if they changed (a secondary CIDR added, the usual
    /// first step of custom networking, must stop being SNATed without a restart).
    pub fn snat_for(&self, vpc_cidrs: &[Ipv4Cidr]) -> Option<SnatPolicy> {
        if vpc_cidrs == self.vpc_cidrs.as_slice() {
            return None;
        }
        Some(SnatPolicy {
            exempt: vpc_cidrs
                .iter()
                .chain(&self.snat_excluded)
                .map(|c| (c.addr(), c.prefix_len()))
                .collect(),
            ..self.snat.clone()
        })
    }
}

/// Upstream's name for the work an action does, as `awscni_ipamd_action_inprogress` labels it.
fn function_of(action: &Action) -> &'static str {
    match action {
        Action::AssignAddresses { .. } | Action::CreateEni { .. } => "increaseDatastorePool",
        Action::ReleaseAddresses { .. } | Action::FreeEni { .. } => "decreaseDatastorePool",
        Action::ResyncEni { .. } => "nodeIPPoolReconcile",
        // Upstream's controller names: the branch ENI provider's work.
        Action::CreateTrunk { .. } => "createTrunk",
        Action::CreateBranch { .. } => "createBranch",
        Action::FreeBranch { .. } => "deleteBranch",
    }
}

impl Control {
    pub fn new(deps: Deps) -> Control {
        let Deps {
            pool,
            v6,
            settings,
            veth_prefix,
            provisioning,
            store,
            executor,
            events,
            metrics,
            clock,
        } = deps;
        Control {
            pool,
            v6,
            memory: PolicyMemory::default(),
            settings,
            veth_prefix,
            provisioning,
            phase: Phase::Warming,
            waiting: VecDeque::new(),
            store,
            dirty: false,
            outbox: Vec::new(),
            executor,
            events,
            metrics,
            clock,
            wake_at: None,
            stalls: Vec::new(),
            actions_in_flight: 0,
            in_progress: [
                "increaseDatastorePool",
                "decreaseDatastorePool",
                "nodeIPPoolReconcile",
            ]
            .into_iter()
            .map(|f| (f, 0))
            .collect(),
            reporter: k8s::Reporter::disabled(),
            eni_config_source: None,
            absent_since: HashMap::new(),
            vanished_pod_grace: Duration::from_secs(60),
            host: None,
            reconciler: Reconciler::default(),
            netpol: None,
            told_netpol: HashSet::new(),
            settings_view: SettingsView::default(),
            branches: None,
            controller_branches: None,
            annotate_branches: None,
        }
    }

    /// NetworkPolicy enforced by the task behind `enforcer`: told of every pod's address, and
    /// handed each new pod's ADD reply to send once the pod's rules are in force.
    pub fn with_network_policy(
        mut self,
        enforcer: mpsc::UnboundedSender<crate::netpol::Input>,
    ) -> Control {
        self.netpol = Some(enforcer);
        self
    }

    /// Every pod's address in whichever family the node runs, so that what follows is written
    /// once for both.
    fn assigned(&self) -> Vec<(&IpamKey, &PodMeta, std::net::IpAddr)> {
        match &self.v6 {
            Some(v6) => v6
                .assignments()
                .map(|(k, a)| (k, &a.meta, a.ip.into()))
                .collect(),
            None => self
                .pool
                .assignments()
                .map(|(k, a)| (k, &a.meta, a.ip.into()))
                .collect(),
        }
    }

    /// Frees `key`'s address in whichever family the node runs.
    fn release(&mut self, key: &IpamKey, now: Time) -> Option<(Allocation, PodMeta)> {
        match &mut self.v6 {
            Some(v6) => v6.unassign(key).map(|a| (v6_allocation(&a), a.meta)),
            None => self
                .pool
                .unassign(key, now)
                .ok()
                .map(|a| (allocation(&a), a.meta)),
        }
    }

    /// Every assignment as NetworkPolicy sees it, branch pods' too: (namespace, pod, address).
    fn pod_addresses(&self) -> HashMap<IpamKey, (String, String, std::net::IpAddr)> {
        self.assigned()
            .into_iter()
            .map(|(k, meta, ip)| (k.clone(), (meta.namespace.clone(), meta.name.clone(), ip)))
            .chain(self.branch_pods())
            .chain(self.controller_branch_pods())
            .collect()
    }

    /// Tells the enforcer what changed since the last flush; new pods' replies go through it.
    fn tell_netpol(&mut self) {
        let Some(enforcer) = self.netpol.clone() else {
            return;
        };
        let current = self.pod_addresses();
        for key in self
            .told_netpol
            .iter()
            .filter(|k| !current.contains_key(*k))
        {
            let _ = enforcer.send(crate::netpol::Input::Down { key: key.clone() });
        }
        let mut direct = Vec::new();
        for out in self.outbox.drain(..) {
            let new_pod = out
                .assigned
                .as_ref()
                .or(out.branch.as_ref())
                .filter(|_| matches!(out.message, Reply::Added { .. }))
                .and_then(|key| Some((key.clone(), current.get(key)?.clone())));
            match new_pod {
                Some((key, (namespace, name, ip))) => {
                    self.told_netpol.insert(key.clone());
                    let _ = enforcer.send(crate::netpol::Input::Up {
                        key,
                        namespace,
                        name,
                        ip,
                        reply: Some((out.reply, out.message)),
                    });
                }
                None => direct.push(out),
            }
        }
        self.outbox = direct;
        for (key, (namespace, name, ip)) in &current {
            if !self.told_netpol.contains(key) {
                let _ = enforcer.send(crate::netpol::Input::Up {
                    key: key.clone(),
                    namespace: namespace.clone(),
                    name: name.clone(),
                    ip: *ip,
                    reply: None,
                });
            }
        }
        self.told_netpol = current.into_keys().collect();
    }

    /// The host as start-up left it, for the periodic IMDS reconcile.
    pub fn with_host(mut self, host: HostFacts) -> Control {
        self.host = Some(host);
        self
    }

    /// In a cluster: Warning Events go through `reporter`, and the address of a pod the API server
    /// has not listed for `vanished_pod_grace` is released.
    pub fn in_cluster(mut self, reporter: k8s::Reporter, vanished_pod_grace: Duration) -> Control {
        self.reporter = reporter;
        self.vanished_pod_grace = vanished_pod_grace;
        self
    }

    /// Where the ENIConfig in use came from (a file, or `ENIConfig/<name>`), and what it says.
    pub fn eni_config(&self) -> Option<(&str, &EniConfigSpec)> {
        Some((
            self.eni_config_source.as_deref()?,
            self.pool.node.eni_config.as_ref()?,
        ))
    }

    /// The pool's settings now, and where they came from.
    pub fn settings(&self) -> (&PoolSettings, &SettingsView) {
        (&self.settings, &self.settings_view)
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn v6(&self) -> Option<&V6Pool> {
        self.v6.as_ref()
    }

    /// The addresses STATUS says can be given now: an IPv6 node's are bounded by max-pods only.
    fn available(&self) -> u32 {
        match &self.v6 {
            Some(v6) => self.pool.node.max_pods.saturating_sub(v6.assigned() as u32),
            None => self.pool.stats().available,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn actions_in_flight(&self) -> usize {
        self.actions_in_flight
    }

    pub fn gauges(&self) -> PoolGauges {
        let mut stats = self.pool.stats();
        if let Some(v6) = &self.v6 {
            stats.assigned = v6.assigned() as u32;
            stats.total = self.pool.node.max_pods.max(stats.assigned);
        }
        let node = &self.pool.node;
        let eni_max = node.max_enis.saturating_sub(node.unmanaged_enis);
        PoolGauges {
            enis: self.pool.enis().len() as u32,
            total_addresses: stats.total,
            assigned_addresses: stats.assigned,
            prefixes: stats.prefixes,
            eni_max,
            ip_max: eni_max * node.slots_per_eni,
            assigned_per_eni: self
                .pool
                .enis()
                .iter()
                .map(|e| {
                    let v6 = self.v6.as_ref().filter(|_| e.info.is_primary);
                    let assigned = v6.map_or(e.assigned(), |v6| v6.assigned() as u32);
                    (e.info.id.clone(), assigned)
                })
                .collect(),
            assigned_per_cidr: match &self.v6 {
                Some(v6) => vec![(v6.prefix().to_string(), v6.assigned() as u32)],
                None => self
                    .pool
                    .enis()
                    .iter()
                    .flat_map(|e| e.blocks())
                    .map(|b| (b.cidr.to_string(), b.assigned()))
                    .collect(),
            },
            pending_adds: self.waiting.len() as u32,
            cooling: stats.cooling,
            in_progress: self.in_progress.iter().map(|(f, n)| (*f, *n)).collect(),
            ready: self.phase == Phase::Ready,
            throttled: self.executor.throttled(),
        }
    }

    /// Why the pool is not growing, in words, for STATUS and for ADDs that time out.
    pub fn stall_detail(&self) -> String {
        self.stalls
            .iter()
            .map(|s| match s {
                Stall::MaxPodsReached => "the node is at max-pods".to_string(),
                Stall::NoRoomForEni => "no ENI slot is left on the instance".to_string(),
                Stall::NodeUnschedulable => {
                    "the Node is cordoned (AWS_MANAGE_ENIS_NON_SCHEDULABLE=false)".to_string()
                }
                Stall::NoEniConfig => {
                    "custom networking is on but the node has no ENIConfig".to_string()
                }
                Stall::SubnetFullUntil(t) => format!(
                    "the subnet is out of addresses; retrying in {}s",
                    t.since(self.clock.now()).as_secs()
                ),
                Stall::BackingOffUntil(t) => format!(
                    "EC2 calls failed; retrying in {}s",
                    t.since(self.clock.now()).as_secs()
                ),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub async fn run(mut self, mut events: mpsc::UnboundedReceiver<Event>) {
        self.after_events();
        loop {
            let timer = self.next_timer();
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { return };
                    self.handle(event);
                    while let Ok(event) = events.try_recv() {
                        self.handle(event);
                    }
                }
                _ = sleep_until(timer) => {}
            }
            self.after_events();
            if let Phase::Draining { until } = self.phase {
                if Instant::now() >= until && self.actions_in_flight == 0 {
                    tracing::info!("stopped");
                    return;
                }
            }
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        let wall = self.clock.now();
        let wake = self
            .wake_at
            .map(|t| Instant::now() + t.since(wall).max(Duration::from_millis(1)));
        let deadline = self
            .waiting
            .front()
            .map(|w| w.since + ADD_WAIT)
            .into_iter()
            .chain(self.branches.as_ref().and_then(NodeBranches::deadline))
            .min();
        let drain = match self.phase {
            Phase::Draining { until } => Some(until),
            _ => None,
        };
        [wake, deadline, drain].into_iter().flatten().min()
    }

    fn after_events(&mut self) {
        self.expire_waiting();
        self.serve_waiting();
        self.serve_branch_waiters();
        self.plan();
        self.flush();
        if self.phase == Phase::Warming
            && self.actions_in_flight == 0
            && self.kept_from_ready().is_none()
        {
            self.phase = Phase::Ready;
            self.metrics.started(self.clock.elapsed());
            let stats = self.pool.stats();
            tracing::info!(after_ms = %self.clock.elapsed().as_millis(), addresses = %stats.total, available = %stats.available, enis = %self.pool.enis().len(), "ready");
        }
    }

    /// Why the node must not be Ready yet although start-up is done. Custom networking without an
    /// ENIConfig has no address to give: Ready would let the kubelet schedule pods that all fail
    /// (upstream's node stays NotReady too). Once it has addresses, a lost ENIConfig only stops
    /// growth.
    fn kept_from_ready(&self) -> Option<&'static str> {
        (self.settings.custom_networking
            && self.pool.stats().total == 0
            && self.stalls.contains(&Stall::NoEniConfig))
        .then_some("custom networking is on but the node has no ENIConfig (see the MissingENIConfig event)")
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Plugin {
                request: Request::Add {
                    attachment, pod, ..
                },
                reply,
                groups: Some(groups),
            } => self.branch_add(attachment, pod, groups, reply),
            Event::Plugin { request, reply, .. } => self.request(request, reply),
            Event::Finished { action, report } => self.finished(action, report),
            Event::Inspect(inspect) => inspect(self),
            Event::EniConfig { source, spec } => self.eni_config_changed(source, spec),
            Event::PodsOnNode(snapshot) => {
                self.release_vanished_pods(&snapshot.pods);
                self.release_vanished_branch_pods(&snapshot.pods);
                self.follow_controller_branches(&snapshot);
            }
            Event::ControllerBranchAdded {
                pod,
                ip,
                reply,
                message,
            } => self.controller_branch_added(pod, ip, reply, message),
            Event::Node(view) => self.node_changed(&view),
            Event::Imds(network) => self.reconcile(network),
            Event::Settings { pool, view } => {
                for change in self.settings.take_live(&pool) {
                    tracing::info!(%change, "setting changed by the ConfigMap");
                }
                self.settings_view = view;
            }
            Event::Stop { immediate } => {
                let until = if immediate {
                    Instant::now()
                } else {
                    Instant::now() + DRAIN
                };
                if !matches!(self.phase, Phase::Draining { .. }) {
                    tracing::info!(drain_s = %(until - Instant::now()).as_secs(), "stopping: no new allocations, DEL still served");
                }
                self.phase = Phase::Draining { until };
                if let Some(b) = &mut self.branches {
                    b.refuse_waiting("vpc-ipamd is stopping");
                }
                for w in self.waiting.drain(..) {
                    let _ = w.reply.send(Reply::Error {
                        kind: ErrorKind::Unavailable,
                        message: "vpc-ipamd is stopping".into(),
                    });
                }
            }
        }
    }

    fn send(&mut self, reply: oneshot::Sender<Reply>, message: Reply) {
        self.outbox.push(Outgoing {
            reply,
            message,
            assigned: None,
            branch: None,
        });
    }

    fn request(&mut self, request: Request, reply: oneshot::Sender<Reply>) {
        let now = self.clock.now();
        match request {
            Request::Add {
                attachment, pod, ..
            } => {
                self.metrics.count("awscni_add_ip_req_count", &[]);
                let key = key_of(&attachment);
                if let Some(a) = self.v6.as_ref().and_then(|v6| v6.assignment(&key)) {
                    let message = Reply::Added {
                        allocation: v6_allocation(a),
                    };
                    return self.send(reply, message);
                }
                if let Some(a) = self.pool.assignment(&key) {
                    let message = Reply::Added {
                        allocation: allocation(a),
                    };
                    return self.send(reply, message);
                }
                // A repeated ADD of a pod given a branch, whose groups since went: still its branch.
                if let Some(allocation) = self.branch_lookup(&key) {
                    return self.send(reply, Reply::Added { allocation });
                }
                self.supersede_branch_wait(&key);
                if matches!(self.phase, Phase::Draining { .. }) {
                    return self.send(
                        reply,
                        Reply::Error {
                            kind: ErrorKind::Unavailable,
                            message: "vpc-ipamd is stopping".into(),
                        },
                    );
                }
                let meta = PodMeta {
                    namespace: pod.namespace,
                    name: pod.name,
                    interfaces_count: 1,
                };
                if let Some(v6) = &mut self.v6 {
                    // The /80 never runs out: an IPv6 ADD never waits.
                    let message = match v6.assign(&key, meta, now) {
                        Ok(a) => {
                            tracing::debug!(ip = %a.ip, egress = ?a.egress_v4, pod = %a.meta.name, "assigned");
                            self.dirty = true;
                            Reply::Added {
                                allocation: v6_allocation(a),
                            }
                        }
                        Err(e) => Reply::Error {
                            kind: ErrorKind::NoAddressAvailable,
                            message: e.to_string(),
                        },
                    };
                    let assigned = matches!(message, Reply::Added { .. }).then_some(key);
                    self.outbox.push(Outgoing {
                        reply,
                        message,
                        assigned,
                        branch: None,
                    });
                    return;
                }
                let waiting = Waiting {
                    key,
                    meta,
                    reply,
                    since: Instant::now(),
                };
                // A retried ADD takes the place of the one it retries.
                match self.waiting.iter().position(|w| w.key == waiting.key) {
                    Some(i) => {
                        let old = std::mem::replace(&mut self.waiting[i], waiting);
                        let _ = old.reply.send(Reply::Error {
                            kind: ErrorKind::Unavailable,
                            message: "superseded by a retry of the same ADD".into(),
                        });
                    }
                    None => self.waiting.push_back(waiting),
                }
            }
            Request::Del {
                attachment,
                reason,
                pod,
            } => {
                let reason_label = match reason {
                    DelReason::PodDeleted => "PodDeleted",
                    DelReason::SetupFailed => "SetupFailed",
                };
                self.metrics
                    .count("awscni_del_ip_req_count", &[("reason", reason_label)]);
                let key = key_of(&attachment);
                if let Some(released) = self.branch_del(&key) {
                    return self.outbox.push(Outgoing {
                        reply,
                        message: Reply::Deleted {
                            released: Some(released),
                        },
                        assigned: None,
                        branch: None,
                    });
                }
                if let Some(i) = self.waiting.iter().position(|w| w.key == key) {
                    let w = self.waiting.remove(i).expect("index is in range");
                    let _ = w.reply.send(Reply::Error {
                        kind: ErrorKind::Unavailable,
                        message: "the pod was deleted while it waited for an address".into(),
                    });
                }
                // An address recovered from the host after a corrupt checkpoint is known by the
                // pod's host veth, which the pod's namespace and name give.
                let recovered = pod.map(|p| {
                    let veth = datapath::names::host_veth_name(
                        &self.veth_prefix,
                        &datapath::names::pod_key(&p.namespace, &p.name),
                    );
                    IpamKey::new(RECOVERED_NETWORK, &veth, "eth0")
                });
                let found = match self.release(&key, now) {
                    Some(found) => Some(found),
                    None => recovered.and_then(|r| self.release(&r, now)),
                };
                let released = found.map(|(allocation, meta)| {
                    self.dirty = true;
                    tracing::debug!(ip = %allocation.address, pod = %meta.name, "released");
                    allocation
                });
                self.send(reply, Reply::Deleted { released });
            }
            Request::Lookup { attachment, .. } => {
                let key = key_of(&attachment);
                let found = match &self.v6 {
                    Some(v6) => v6.assignment(&key).map(v6_allocation),
                    None => self.pool.assignment(&key).map(allocation),
                };
                let found = found.or_else(|| self.branch_lookup(&key));
                self.send(reply, Reply::Found { allocation: found });
            }
            Request::Status => {
                let message = Reply::Status {
                    ready: self.phase == Phase::Ready,
                    available_addresses: self.available(),
                    detail: match self.phase {
                        Phase::Warming => {
                            self.kept_from_ready().unwrap_or("initialising").to_string()
                        }
                        Phase::Draining { .. } => "stopping".to_string(),
                        Phase::Ready => self.stall_detail(),
                    },
                };
                self.send(reply, message);
            }
            Request::Gc { network, valid } => {
                let valid: HashSet<IpamKey> = valid.iter().map(key_of).collect();
                let doomed: Vec<IpamKey> = self
                    .assigned()
                    .into_iter()
                    .filter(|(k, _, _)| k.network_name == network && !valid.contains(k))
                    .map(|(k, _, _)| k.clone())
                    .collect();
                for key in &doomed {
                    if let Some((a, _)) = self.release(key, now) {
                        tracing::info!(ip = %a.address, container = %key.container_id, "collected");
                        self.dirty = true;
                    }
                }
                let branches = self.collect_branches(&network, &valid);
                let keep = self
                    .assigned()
                    .into_iter()
                    .map(|(_, _, ip)| ip)
                    .chain(self.branch_addresses())
                    .chain(
                        self.controller_branch_pods()
                            .into_iter()
                            .map(|(_, (.., ip))| ip),
                    )
                    .collect();
                self.send(
                    reply,
                    Reply::Collected {
                        keep,
                        released: doomed.len() as u32 + branches,
                    },
                );
            }
        }
    }

    fn eni_config_changed(&mut self, source: String, spec: Result<EniConfigSpec, String>) {
        match spec {
            Ok(spec) => {
                if self.pool.node.eni_config.as_ref() != Some(&spec) {
                    tracing::info!(source = %source, subnet = %spec.subnet, "ENIConfig");
                }
                self.pool.node.eni_config = Some(spec);
            }
            Err(why) => {
                tracing::error!(source = %source, why = %why, "custom networking has no ENIConfig: no new ENIs");
                self.reporter.warning(
                    "MissingENIConfig",
                    &format!("{source}: {why}; no ENI can be created for pods"),
                );
                self.pool.node.eni_config = None;
            }
        }
        self.eni_config_source = Some(source);
    }

    /// The cap follows the kubelet: one restarted with another `--max-pods`, or an API server that
    /// was unreachable at start (the cap then came from the instance type). A cordon holds the
    /// pool as it is (AWS_MANAGE_ENIS_NON_SCHEDULABLE).
    fn node_changed(&mut self, view: &k8s::NodeView) {
        if self.pool.node.unschedulable != view.unschedulable {
            tracing::info!(unschedulable = %view.unschedulable, "the Node");
            self.pool.node.unschedulable = view.unschedulable;
        }
        let Some(max_pods) = view.max_pods else {
            return;
        };
        if self.pool.node.max_pods != max_pods {
            tracing::info!(was = %self.pool.node.max_pods, now = %max_pods, "maxPods from the Node");
            self.pool.node.max_pods = max_pods;
        }
    }

    /// The pool and the SNAT table against IMDS. EC2 is asked (a read-back of one ENI, through
    /// the policy's `ResyncEni`) only for what two reads in a row show differently.
    fn reconcile(&mut self, network: cloud::identity::Network) {
        let Some(host) = &mut self.host else {
            return;
        };
        if let Some(policy) = host.snat_for(&network.vpc_cidrs) {
            // One nft run, once in a node's life: the loop waits for it, so that what the table
            // holds is what `host` says, and a failure is tried again at the next read.
            let applied = tokio::task::block_in_place(|| policy.apply());
            let outcome = if applied.is_ok() {
                "success"
            } else {
                "failure"
            };
            self.metrics
                .count("awscni_connmark_reconcile_total", &[("result", outcome)]);
            match applied {
                Ok(()) => {
                    tracing::info!(was = %cidrs(&host.vpc_cidrs), now = %cidrs(&network.vpc_cidrs), "the VPC's CIDRs changed; SNAT exemptions follow");
                    host.vpc_cidrs = network.vpc_cidrs.clone();
                    host.snat = policy;
                }
                Err(e) => {
                    self.metrics.count("awscni_reconcile_error_count", &[]);
                    tracing::error!(error = %e, "SNAT table update; tried again at the next read")
                }
            }
        }
        let seen: Vec<Seen> = network
            .enis
            .iter()
            .map(|e| Seen {
                id: e.eni_id.clone(),
                device: e.device_number,
                network_card: e.network_card,
                blocks: e.blocks(),
            })
            .collect();
        let known: HashSet<String> = host.foreign_enis.keys().cloned().collect();
        let found = reconcile::compare(&self.pool, &seen, &known);
        let mut dropped = Vec::new();
        for finding in self.reconciler.confirm(found) {
            match finding {
                Finding::Gone(eni) | Finding::Differs(eni) => {
                    let imds = seen.iter().find(|s| s.id == eni);
                    let kind = if imds.is_some() {
                        "addresses"
                    } else {
                        "detached"
                    };
                    tracing::warn!(eni = %eni, what = %kind, "IMDS shows an ENI differently from the pool (changed out of band)");
                    self.metrics
                        .count("vpccni_reconcile_findings_total", &[("kind", kind)]);
                    // Upstream's names: an ENI gone, addresses gone or added.
                    let held = self
                        .pool
                        .enis()
                        .iter()
                        .find(|e| e.info.id == eni)
                        .map_or(0, |e| e.blocks().len());
                    let function = match imds {
                        None => "eniReconcileDel",
                        Some(s) if s.blocks.len() < held => "eniIPPoolReconcileDel",
                        Some(_) => "eniDataStorePoolReconcileAdd",
                    };
                    self.metrics
                        .count("awscni_reconcile_count", &[("fn", function)]);
                    if self.provisioning {
                        // EC2's word, through the policy's read-back, before anything is trusted.
                        self.pool.mark_for_resync(&eni);
                    } else {
                        // No EC2 calls on this node (DISABLE_NETWORK_RESOURCE_PROVISIONING): the
                        // policy never runs, so IMDS's view is taken as it is.
                        dropped.extend(match imds {
                            Some(s) => self.pool.sync_eni(&eni, &s.blocks),
                            None => self.pool.remove_eni(&eni),
                        });
                    }
                }
                Finding::Unknown { eni, device } => {
                    tracing::warn!(eni = %eni, device = %device, "an ENI was attached by someone else; left alone, its device index avoided");
                    self.metrics
                        .count("vpccni_reconcile_findings_total", &[("kind", "foreign")]);
                    self.metrics
                        .count("awscni_reconcile_count", &[("fn", "eniReconcileAdd")]);
                    self.executor.avoid_device(device);
                    self.pool.node.unmanaged_enis += 1;
                    host.foreign_enis.insert(eni, (device, 0));
                }
                Finding::ForeignGone(eni) => {
                    let Some((device, card)) = host.foreign_enis.remove(&eni) else {
                        continue;
                    };
                    tracing::info!(eni = %eni, device = %device, "an ENI that is not ours was detached; its slot is free again");
                    if card == 0 {
                        self.executor.stop_avoiding(device);
                        self.pool.node.unmanaged_enis =
                            self.pool.node.unmanaged_enis.saturating_sub(1);
                    }
                }
            }
        }
        self.note_dropped(&dropped);
    }

    /// An assignment whose pod the API server has not listed for the grace period loses its
    /// address: the kubelet never sent DEL (it crashed, the node was rebuilt under it, the pod
    /// was force-deleted). The grace covers a watch that lags an ADD, and a force-deleted pod's
    /// containers still being torn down.
    fn release_vanished_pods(&mut self, pods: &HashSet<k8s::PodRef>) {
        let now = self.clock.now();
        let mut absent = HashMap::new();
        let mut gone = Vec::new();
        for (key, meta, _) in self.assigned() {
            if meta.name.is_empty() {
                continue;
            }
            let pod = k8s::PodRef {
                namespace: meta.namespace.clone(),
                name: meta.name.clone(),
            };
            if pods.contains(&pod) {
                continue;
            }
            let since = self.absent_since.get(key).copied().unwrap_or(now);
            if now.since(since) >= self.vanished_pod_grace {
                gone.push(key.clone());
            } else {
                absent.insert(key.clone(), since);
            }
        }
        self.absent_since = absent;
        let mut released = HashSet::new();
        for key in gone {
            if let Some((Allocation { address: ip, .. }, meta)) = self.release(&key, now) {
                released.insert(ip);
                self.dirty = true;
                self.metrics
                    .count("vpccni_vanished_pod_releases_total", &[]);
                tracing::info!(ip = %ip, pod = %format!("{}/{}", meta.namespace, meta.name), container = %key.container_id, "released the address of a pod the API server no longer has");
            }
        }
        // One pass over the host's links and rules for all the pods released in this snapshot,
        // touching only theirs.
        if !released.is_empty() {
            let prefix = self.veth_prefix.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = datapath::pod::remove_pods_host_state(&prefix, &released) {
                    tracing::warn!(error = %e, "removing vanished pods' host side");
                }
            });
        }
    }

    fn expire_waiting(&mut self) {
        while let Some(w) = self.waiting.front() {
            if w.since.elapsed() < ADD_WAIT && !w.reply.is_closed() {
                break;
            }
            let w = self.waiting.pop_front().expect("front exists");
            if w.reply.is_closed() {
                continue;
            }
            self.metrics.count("awscni_no_available_ip_addresses", &[]);
            let detail = self.stall_detail();
            let stats = self.pool.stats();
            let message = format!(
                "no address became available in {}s ({} of {} assigned, {} cooling down){}{}",
                ADD_WAIT.as_secs(),
                stats.assigned,
                stats.total,
                stats.cooling,
                if detail.is_empty() { "" } else { ": " },
                detail
            );
            tracing::warn!(pod = %w.meta.name, why = %message, "ADD timed out");
            self.send(
                w.reply,
                Reply::Error {
                    kind: ErrorKind::NoAddressAvailable,
                    message,
                },
            );
        }
    }

    fn serve_waiting(&mut self) {
        let now = self.clock.now();
        while let Some(w) = self.waiting.front() {
            if w.reply.is_closed() {
                self.waiting.pop_front();
                continue;
            }
            let Ok(a) = self
                .pool
                .assign(&w.key, &w.meta, now, self.settings.ip_cooldown)
            else {
                break;
            };
            let w = self.waiting.pop_front().expect("front exists");
            self.metrics.add_waited(w.since.elapsed());
            tracing::debug!(ip = %a.ip, pod = %w.meta.name, eni = %a.eni, "assigned");
            self.dirty = true;
            self.outbox.push(Outgoing {
                reply: w.reply,
                message: Reply::Added {
                    allocation: allocation(a),
                },
                assigned: Some(w.key),
                branch: None,
            });
        }
    }

    fn plan(&mut self) {
        if !self.provisioning || matches!(self.phase, Phase::Draining { .. }) {
            self.wake_at = None;
            return;
        }
        let now = self.clock.now();
        self.pool.expire_cooldowns(now, self.settings.ip_cooldown);
        let demand = Demand {
            pending_adds: self.waiting.len() as u32,
        };
        let decision = decide(&self.pool, &self.memory, &self.settings, now, &demand);
        if decision.stalls != self.stalls && !decision.stalls.is_empty() {
            tracing::warn!(why = ?decision.stalls, "the pool cannot grow");
        }
        self.stalls = decision.stalls;
        self.wake_at = decision.wake_at;
        for action in decision.actions {
            self.pool.begin(&action);
            self.memory.began(&action, now);
            self.spawn(action);
        }
        self.plan_branches();
    }

    fn finished(&mut self, action: Action, report: Report) {
        self.actions_in_flight -= 1;
        if let Some(n) = self.in_progress.get_mut(function_of(&action)) {
            *n -= 1;
        }
        if let Some(e) = &report.error {
            let hint = if e.kind == CloudErrorKind::Unauthorized {
                let hint = format!("the node's IAM role lacks ec2:{}", e.operation);
                self.reporter
                    .warning("MissingIAMPermissions", &format!("{hint}: {e}"));
                hint
            } else {
                String::new()
            };
            if e.kind == CloudErrorKind::Unauthorized {
                tracing::error!(action = ?action, error = %e, hint, "EC2 action failed");
            } else {
                tracing::warn!(action = ?action, error = %e, "EC2 action failed");
            }
        }
        let failed = matches!(report.outcome, Outcome::Failed(_));
        if action.is_branch() {
            return self.branch_finished(&action, report.outcome);
        }
        if failed && matches!(action, Action::CreateEni { .. }) {
            self.metrics.count("awscni_eni_allocation_error_count", &[]);
        }
        let dropped = ipam::choreography::settle(
            &mut self.pool,
            &mut self.memory,
            &action,
            report,
            self.clock.now(),
        );
        self.note_dropped(&dropped);
        if !failed {
            tracing::debug!(action = ?action, "action done");
        }
    }

    /// Assignments whose address the node no longer holds: gone from the checkpoint, logged, counted.
    fn note_dropped(&mut self, dropped: &[(IpamKey, Assignment)]) {
        if dropped.is_empty() {
            return;
        }
        self.dirty = true;
        let enis: HashSet<&str> = dropped
            .iter()
            .map(|(_, a)| a.eni.as_str())
            .filter(|eni| !self.pool.enis().iter().any(|e| e.info.id == *eni))
            .collect();
        self.metrics
            .add("awscni_force_removed_enis", &[], enis.len() as u64);
        for (key, a) in dropped {
            self.metrics.count("awscni_force_removed_ips", &[]);
            tracing::warn!(ip = %a.ip, container = %key.container_id, pod = %a.meta.name, "EC2 no longer has a pod's address");
        }
    }

    fn flush(&mut self) {
        if self.dirty {
            self.dirty = false;
            let checkpoint = match &self.v6 {
                Some(v6) => v6.checkpoint(),
                None => self.pool.checkpoint(),
            };
            if let Err(e) = self.store.save(&checkpoint) {
                tracing::error!(error = %e, "checkpoint write failed; ADDs are refused");
                self.metrics
                    .count("awscni_ipamd_error_count", &[("fn", "checkpoint")]);
                let now = self.clock.now();
                let mut outbox = std::mem::take(&mut self.outbox);
                for out in &mut outbox {
                    if let Some(key) = out.assigned.take() {
                        self.release(&key, now);
                        out.message = Reply::Error {
                            kind: ErrorKind::Internal,
                            message: format!("the checkpoint could not be written: {e}"),
                        };
                    }
                }
                self.outbox = outbox;
            }
        }
        self.save_branches();
        self.annotate_given();
        // New addresses the checkpoint holds (a failed write took them back above).
        let given = self
            .outbox
            .iter()
            .filter(|o| o.assigned.is_some() && matches!(o.message, Reply::Added { .. }))
            .count();
        self.metrics
            .add("awscni_ip_allocation_total", &[], given as u64);
        self.tell_netpol();
        for out in self.outbox.drain(..) {
            let _ = out.reply.send(out.message);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
