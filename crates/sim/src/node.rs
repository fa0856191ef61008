//! One simulated node: the real pool engine, the daemon's choreography of EC2 calls
//! (`ipam::choreography`) interpreted against the simulated VPC on the virtual clock, and its pods.

use ipam::branches::{Ask, BranchSettings, Branches, GroupSet};
use ipam::choreography::{self, Choreography, NodeFacts, Reply, Request, Run};
use ipam::ec2::{CloudError, ErrorKind};
use ipam::pacing::Backoff;
use ipam::v6::V6Pool;
use ipam::Ipv6Cidr;
use ipam::{
    decide, Action, Demand, IpamKey, Ipv4Cidr, PodMeta, PolicyMemory, Pool, PoolSettings, Time,
};
use rustc_hash::FxHashMap;
use simvpc::SimVpc;
use smallvec::{smallvec, SmallVec};
use std::collections::VecDeque;
use std::time::Duration;

/// An action on its way through the shared choreography.
struct Call {
    run: Run,
    /// The reply EC2 gave, to be read when its latency has passed.
    reply: Option<Result<Reply, CloudError>>,
}

/// What the cluster has to schedule for a node after an event: one thing nearly always, and kept off
/// the heap because there are tens of millions of events in a 10,000-node day.
pub type Nexts = SmallVec<[Next; 2]>;

/// What the cluster has to schedule for a node.
pub enum Next {
    /// The reply to call `id` arrives at this time.
    Reply(Time, u64),
    /// Run the policy again at this time.
    Wake(Time),
    /// The node has just become ready: its pool reached its targets with no call left in flight.
    Ready,
}

#[derive(Default, Clone, Debug)]
pub struct NodeCounters {
    pub add_waits: Vec<Duration>,
    pub unschedulable: u64,
    pub throttled_retries: u64,
    pub forced_removals: u64,
    pub cooldown_violations: u64,
}

/// A pod whose ADD waits for an address.
struct PendingAdd {
    pod: u64,
    since: Time,
    key: IpamKey,
}

/// An IPv6 node (ENABLE_IPv6), as the daemon runs one: the primary ENI's /80 asked for once, then a
/// /128 (and an egress address) for each pod from it; no warm pool and no policy.
struct V6 {
    primary_eni: String,
    egress: bool,
    pool: Option<V6Pool>,
    /// The AssignIpv6Addresses reply on its way, and the tries so far.
    reply: Option<Result<Vec<Ipv6Cidr>, CloudError>>,
    attempts: u32,
}

/// The call id of an IPv6 node's AssignIpv6Addresses (choreography calls count up from 0).
const V6_CALL: u64 = RETRY - 1;
/// Waits between AssignIpv6Addresses tries EC2 refused: the daemon's start-up retries through the
/// AWS backend's own pacing; this is its shape, without the jitter.
const V6_BACKOFF: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(20));

/// Security groups for pods, as a standalone node runs them: its pods with groups get branch ENIs on
/// the trunk the node made, from `ipam::branches`.
struct Sgp {
    branches: Branches,
    /// Pods in line for a branch, and since when.
    waiting: Vec<(u64, IpamKey, Time)>,
    running: FxHashMap<u64, IpamKey>,
}

pub struct Node {
    pub pool: Pool,
    // Boxed: most nodes have no pods with security groups.
    sgp: Option<Box<Sgp>>,
    // Boxed: most nodes are IPv4, and what each pod event touches stays small.
    v6: Option<Box<V6>>,
    pub memory: PolicyMemory,
    pub settings: PoolSettings,
    // Boxed: what each pod event touches stays on fewer cache lines (about 3% of the 1,000-node day).
    choreography: Box<Choreography>,
    calls: FxHashMap<u64, Call>,
    next_call: u64,
    pending_adds: VecDeque<PendingAdd>,
    pub running: FxHashMap<u64, IpamKey>,
    pub next_wake: Option<Time>,
    launched_at: Time,
    ready_at: Option<Time>,
    /// Who held each address last and when they let it go, to catch reuse inside the cooldown.
    released_at: FxHashMap<std::net::Ipv4Addr, Time>,
    pub counters: NodeCounters,
}

impl Node {
    /// The pool holds the ENIs the instance was launched with; their device indexes are taken.
    pub fn new(facts: NodeFacts, pool: Pool, settings: PoolSettings, launched_at: Time) -> Node {
        let mut choreography = Box::new(Choreography::new(facts));
        for eni in pool.enis() {
            choreography.avoid_device(eni.info.device_number);
        }
        Node {
            pool,
            sgp: None,
            v6: None,
            memory: PolicyMemory::default(),
            settings,
            choreography,
            calls: FxHashMap::default(),
            next_call: 0,
            pending_adds: VecDeque::new(),
            running: FxHashMap::default(),
            next_wake: None,
            launched_at,
            ready_at: None,
            released_at: FxHashMap::default(),
            counters: NodeCounters::default(),
        }
    }

    /// An IPv6 node: its pods get /128s of one /80 on `primary_eni` (with IPv4 egress addresses
    /// when `egress`), and its pool of ENIs gives none.
    pub fn ipv6(mut self, primary_eni: String, egress: bool) -> Node {
        self.v6 = Some(Box::new(V6 {
            primary_eni,
            egress,
            pool: None,
            reply: None,
            attempts: 0,
        }));
        self
    }

    /// Security groups for pods: pods that come with groups get branch ENIs.
    pub fn with_branches(mut self, settings: BranchSettings) -> Node {
        self.sgp = Some(Box::new(Sgp {
            branches: Branches::new(settings),
            waiting: Vec::new(),
            running: FxHashMap::default(),
        }));
        self
    }

    pub fn branches(&self) -> Option<&Branches> {
        self.sgp.as_ref().map(|s| &s.branches)
    }

    /// A pod that a SecurityGroupPolicy selects: a warm branch with its groups at once, or one made
    /// for it.
    pub fn pod_with_groups_arrives(&mut self, pod: u64, groups: &GroupSet, now: Time) {
        let sgp = self
            .sgp
            .as_mut()
            .expect("a node with security groups for pods");
        let key = IpamKey {
            container_id: pod.to_string(),
            ..IpamKey::default()
        };
        match sgp.branches.ask(&key, groups, now) {
            Ask::Ready(_) => {
                sgp.running.insert(pod, key);
                self.counters.add_waits.push(Duration::ZERO);
            }
            Ask::Wait => sgp.waiting.push((pod, key, now)),
        }
    }

    /// Pods in line whose branch has come.
    fn serve_branch_waiters(&mut self, now: Time) {
        let Some(sgp) = self.sgp.as_mut() else { return };
        let (branches, running, waits) = (
            &sgp.branches,
            &mut sgp.running,
            &mut self.counters.add_waits,
        );
        sgp.waiting.retain(|(pod, key, since)| {
            if branches.get(key).is_some() {
                running.insert(*pod, key.clone());
                waits.push(now.since(*since));
                false
            } else {
                true
            }
        });
    }

    pub fn is_ipv6(&self) -> bool {
        self.v6.is_some()
    }

    /// The /80 an IPv6 node's pods take their addresses from, once EC2 has delegated it.
    pub fn ipv6_prefix(&self) -> Option<Ipv6Cidr> {
        self.v6.as_ref()?.pool.as_ref().map(V6Pool::prefix)
    }

    pub fn instance_id(&self) -> &str {
        &self.choreography.facts().instance_id
    }

    /// How long the node took from launch to ready (the daemon's rule: the first pass after which no
    /// EC2 call is in flight); None while it warms up.
    pub fn ready_after(&self) -> Option<Duration> {
        self.ready_at.map(|t| t.since(self.launched_at))
    }

    pub fn calls_in_flight(&self) -> usize {
        self.calls.len()
            + self
                .v6
                .as_ref()
                .map_or(0, |v6| usize::from(v6.pool.is_none()))
    }

    pub fn pods(&self) -> usize {
        self.running.len()
            + self.pending_adds.len()
            + self
                .sgp
                .as_ref()
                .map_or(0, |s| s.running.len() + s.waiting.len())
    }

    pub fn pending_adds(&self) -> usize {
        self.pending_adds.len() + self.sgp.as_ref().map_or(0, |s| s.waiting.len())
    }

    pub fn pod_arrives(&mut self, pod: u64, now: Time) {
        self.pending_adds.push_back(PendingAdd {
            pod,
            since: now,
            // The container id alone tells the simulator's pods apart; network, interface and pod names
            // would only cost allocations, and nothing here reads them.
            key: IpamKey {
                container_id: pod.to_string(),
                ..IpamKey::default()
            },
        });
        self.serve_pending(now);
    }

    /// A pod deleted while still waiting for an address just stops waiting.
    pub fn pod_leaves(&mut self, pod: u64, now: Time) {
        if let Some(sgp) = &mut self.sgp {
            if let Some(key) = sgp.running.remove(&pod) {
                sgp.branches.release(&key, now);
                return;
            }
            if let Some(i) = sgp.waiting.iter().position(|(p, _, _)| *p == pod) {
                let (_, key, _) = sgp.waiting.swap_remove(i);
                sgp.branches.cancel(&key);
                return;
            }
        }
        if let Some(v6) = &mut self.v6 {
            match self.running.remove(&pod) {
                Some(key) => {
                    let pool = v6.pool.as_mut().expect("running pods hold an address");
                    pool.unassign(&key).expect("running pods hold an address");
                }
                None => self.pending_adds.retain(|p| p.pod != pod),
            }
            return;
        }
        if let Some(key) = self.running.remove(&pod) {
            let a = self
                .pool
                .unassign(&key, now)
                .expect("running pods hold an address");
            self.released_at.insert(a.ip, now);
        } else {
            self.pending_adds.retain(|p| p.pod != pod);
        }
    }

    fn serve_pending(&mut self, now: Time) {
        let meta = PodMeta {
            interfaces_count: 1,
            ..PodMeta::default()
        };
        if let Some(v6) = &mut self.v6 {
            let Some(pool) = &mut v6.pool else { return };
            while let Some(p) = self.pending_adds.front() {
                if pool.assign(&p.key, meta.clone(), now).is_err() {
                    break;
                }
                let p = self.pending_adds.pop_front().expect("just looked");
                self.running.insert(p.pod, p.key);
                self.counters.add_waits.push(now.since(p.since));
            }
            return;
        }
        while let Some(p) = self.pending_adds.front() {
            match self
                .pool
                .assign(&p.key, &meta, now, self.settings.ip_cooldown)
            {
                Ok(&ipam::pool::Assignment { ip, .. }) => {
                    if let Some(t) = self.released_at.get(&ip) {
                        if now.since(*t) < self.settings.ip_cooldown {
                            self.counters.cooldown_violations += 1;
                        }
                    }
                    let p = self.pending_adds.pop_front().expect("just looked");
                    self.running.insert(p.pod, p.key);
                    self.counters.add_waits.push(now.since(p.since));
                }
                Err(_) => break,
            }
        }
    }

    /// Runs the policy and starts the EC2 calls it asks for.
    pub fn plan(&mut self, vpc: &mut SimVpc, now: Time) -> Nexts {
        if self.v6.is_some() {
            return self.plan_v6(vpc, now);
        }
        self.pool.expire_cooldowns(now, self.settings.ip_cooldown);
        self.serve_pending(now);
        self.serve_branch_waiters(now);
        let demand = Demand {
            pending_adds: self.pending_adds.len() as u32,
        };
        let d = decide(&self.pool, &self.memory, &self.settings, now, &demand);
        let mut next = Nexts::new();
        let mut wake_at = d.wake_at;
        for action in d.actions {
            self.pool.begin(&action);
            self.memory.began(&action, now);
            next.extend(self.start(action, vpc, now));
        }
        if let Some(sgp) = &mut self.sgp {
            sgp.branches.take_trunk_from(&self.pool);
            let d = sgp.branches.decide(now);
            for action in &d.actions {
                sgp.branches.begin(action);
            }
            wake_at = match (wake_at, d.wake_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            for action in d.actions {
                next.extend(self.start(action, vpc, now));
            }
        }
        if let Some(w) = wake_at {
            if self.next_wake.is_none_or(|t| w < t || t <= now) {
                self.next_wake = Some(w);
                next.push(Next::Wake(w));
            }
        }
        if self.ready_at.is_none() && self.calls.is_empty() {
            self.ready_at = Some(now);
            next.push(Next::Ready);
        }
        next
    }

    /// Starts an action through the choreography.
    fn start(&mut self, action: Action, vpc: &mut SimVpc, now: Time) -> Nexts {
        let id = self.next_call;
        self.next_call += 1;
        // Reproducible: the jitter and the token follow from the node and the call.
        let token = match action {
            Action::CreateEni { .. } | Action::CreateTrunk { .. } | Action::CreateBranch { .. } => {
                format!("{}-{id}", self.instance_id())
            }
            _ => String::new(),
        };
        let run = self.choreography.start(action, id, token, now);
        self.calls.insert(id, Call { run, reply: None });
        self.drive(id, None, vpc, now)
    }

    /// Goes on with call `id`: from its first request (`reply` None) or with the reply to its last
    /// one. Host effects happen at once, an EC2 call's reply is scheduled after its latency, a retry
    /// after its wait, and a finished action goes to the pool.
    fn drive(
        &mut self,
        id: u64,
        mut reply: Option<Result<Reply, CloudError>>,
        vpc: &mut SimVpc,
        now: Time,
    ) -> Nexts {
        loop {
            let call = self.calls.get_mut(&id).expect("live call");
            let next = match reply.take() {
                None => call.run.first(),
                Some(r) => self.choreography.step(&mut call.run, r, now),
            };
            match next {
                choreography::Next::Call(request) if request.is_host() => {
                    reply = Some(Ok(Reply::Done));
                }
                choreography::Next::Call(_) => return self.send(id, vpc, now),
                choreography::Next::After(wait, _) => {
                    return smallvec![Next::Reply(now + wait, id | RETRY)];
                }
                choreography::Next::Done(finished) => {
                    let call = self.calls.remove(&id).expect("live call");
                    if call.run.action().is_branch() {
                        let sgp = self.sgp.as_mut().expect("branch actions need branches");
                        sgp.branches
                            .complete(call.run.action(), finished.outcome, now);
                        self.serve_branch_waiters(now);
                        return self.plan(vpc, now);
                    }
                    let dropped = choreography::settle(
                        &mut self.pool,
                        &mut self.memory,
                        call.run.action(),
                        finished,
                        now,
                    );
                    self.counters.forced_removals += dropped.len() as u64;
                    for (key, _) in dropped {
                        self.running.retain(|_, k| *k != key);
                    }
                    return self.plan(vpc, now);
                }
            }
        }
    }

    /// An IPv6 node: the /80 asked for until EC2 gives it, then pods served at once.
    fn plan_v6(&mut self, vpc: &mut SimVpc, now: Time) -> Nexts {
        let v6 = self.v6.as_mut().expect("an IPv6 node");
        if v6.pool.is_none() {
            if v6.reply.is_none() {
                return self.ask_v6(vpc, now);
            }
            return Nexts::new();
        }
        self.serve_pending(now);
        if self.ready_at.is_none() {
            self.ready_at = Some(now);
            return smallvec![Next::Ready];
        }
        Nexts::new()
    }

    fn ask_v6(&mut self, vpc: &mut SimVpc, now: Time) -> Nexts {
        let v6 = self.v6.as_mut().expect("an IPv6 node");
        let r = vpc.assign_ipv6_prefixes(now, &v6.primary_eni, 1);
        let result = r
            .result
            .map_err(|e| CloudError::of("AssignIpv6Addresses", e.code, e.message));
        v6.reply = Some(result);
        smallvec![Next::Reply(now + r.latency, V6_CALL)]
    }

    fn on_v6_reply(&mut self, vpc: &mut SimVpc, now: Time) -> Nexts {
        let v6 = self.v6.as_mut().expect("an IPv6 node");
        match v6.reply.take().expect("a sent call has a reply") {
            Ok(prefixes) => {
                let prefix = *prefixes.first().expect("EC2 delegated one /80");
                v6.pool = Some(V6Pool::new(prefix, v6.egress));
                self.plan(vpc, now)
            }
            Err(e) => {
                if e.kind == ErrorKind::Throttled {
                    self.counters.throttled_retries += 1;
                }
                v6.attempts += 1;
                // Still in flight for `calls_in_flight`: the retry is scheduled, not sent.
                v6.reply = Some(Err(e));
                smallvec![Next::Reply(
                    now + V6_BACKOFF.ceiling(v6.attempts),
                    V6_CALL | RETRY,
                )]
            }
        }
    }

    /// Reads the reply of call `id` and goes on with its action.
    pub fn on_reply(&mut self, id: u64, vpc: &mut SimVpc, now: Time) -> Nexts {
        if id == V6_CALL {
            return self.on_v6_reply(vpc, now);
        }
        let call = self.calls.get_mut(&id).expect("reply to a live call");
        let reply = call.reply.take().expect("a sent call has a reply");
        self.drive(id, Some(reply), vpc, now)
    }

    /// A retry's wait is over: make the run's request again.
    pub fn on_retry(&mut self, id: u64, vpc: &mut SimVpc, now: Time) -> Nexts {
        if id == V6_CALL {
            return self.ask_v6(vpc, now);
        }
        self.send(id, vpc, now)
    }

    /// Makes call `id`'s current request of EC2. A throttled one is retried after its latency and
    /// the run's backoff, both known now: one event instead of a reply that changes nothing but the
    /// run's count of tries and then a retry. Throttled calls are most of the events on a day where
    /// thousands of nodes share the account's bucket.
    fn send(&mut self, id: u64, vpc: &mut SimVpc, now: Time) -> Nexts {
        let call = self.calls.get_mut(&id).expect("live call");
        let (result, latency) = call_vpc(call.run.request(), vpc, now);
        match result {
            Err(e) if e.kind == ErrorKind::Throttled => {
                self.counters.throttled_retries += 1;
                smallvec![Next::Reply(now + latency + call.run.backoff(), id | RETRY)]
            }
            result => {
                call.reply = Some(result);
                smallvec![Next::Reply(now + latency, id)]
            }
        }
    }
}

/// Makes an EC2 request of the simulated VPC: the reply, and when it arrives.
fn call_vpc(
    request: &Request,
    vpc: &mut SimVpc,
    now: Time,
) -> (Result<Reply, CloudError>, Duration) {
    fn answer<T>(
        operation: &'static str,
        r: simvpc::Reply<T>,
        reply: impl FnOnce(T) -> Reply,
    ) -> (Result<Reply, CloudError>, Duration) {
        let result = r
            .result
            .map(reply)
            .map_err(|e| CloudError::of(operation, e.code, e.message));
        (result, r.latency)
    }
    let op = request.operation();
    match request {
        Request::AssignIps { eni, count } => answer(
            op,
            vpc.assign_private_ip_addresses(now, eni, *count, 0),
            |(ips, _)| Reply::Addresses(ips.into_iter().map(Ipv4Cidr::host).collect()),
        ),
        Request::AssignPrefixes { eni, count } => answer(
            op,
            vpc.assign_private_ip_addresses(now, eni, 0, *count),
            |(_, prefixes)| Reply::Addresses(prefixes),
        ),
        Request::Unassign { eni, ips, prefixes } => answer(
            op,
            vpc.unassign_private_ip_addresses(now, eni, ips, prefixes),
            |()| Reply::Done,
        ),
        Request::DescribeEni { eni } => answer(
            op,
            vpc.describe_network_interfaces(now, std::slice::from_ref(eni), &[], None),
            |(enis, _)| Reply::Enis(enis.iter().map(|e| e.to_ec2()).collect()),
        ),
        Request::DescribeSubnets { filters } => answer(
            op,
            vpc.describe_subnets_filtered(now, filters),
            Reply::Subnets,
        ),
        Request::Create(c) => answer(op, vpc.create_network_interface(now, c), |e| {
            Reply::Eni(Box::new(e.to_ec2()))
        }),
        Request::Attach {
            eni,
            instance_id,
            device,
            network_card,
        } => answer(
            op,
            vpc.attach_network_interface(now, eni, instance_id, *device, *network_card),
            Reply::Attachment,
        ),
        Request::KeepOnTermination { eni, .. } => {
            answer(op, vpc.set_delete_on_termination(now, eni, true), |()| {
                Reply::Done
            })
        }
        Request::Detach { attachment_id } => {
            answer(op, vpc.detach_network_interface(now, attachment_id), |()| {
                Reply::Done
            })
        }
        Request::Delete { eni } => {
            answer(op, vpc.delete_network_interface(now, eni), |()| Reply::Done)
        }
        Request::Associate {
            branch,
            trunk,
            vlan,
            client_token,
        } => answer(
            op,
            vpc.associate_trunk_interface(now, branch, trunk, *vlan, Some(client_token)),
            |a| Reply::Attachment(a.id),
        ),
        Request::Disassociate { association_id } => answer(
            op,
            vpc.disassociate_trunk_interface(now, association_id),
            |()| Reply::Done,
        ),
        Request::SetupLink(_) | Request::TeardownLink(_) => {
            unreachable!("host effects are not EC2 calls")
        }
    }
}

/// Marks a call id as a retry timer rather than a reply.
pub const RETRY: u64 = 1 << 63;
