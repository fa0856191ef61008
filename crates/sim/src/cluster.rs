use crate::node::{Next, Nexts, Node, RETRY};
use crate::queue::EventQueue;
use crate::report::{Calls, NodeReady, Report, Sample, Waits};
use crate::scenario::Scenario;
use ipam::branches::{BranchSettings, GroupSet, BRANCH_COOLDOWN};
use ipam::choreography::NodeFacts;
use ipam::maxpods::{max_pods, MaxPodsOptions};
use ipam::pool::{EniConfigSpec, NodeSpec};
use ipam::{limits, Config, Ipv4Cidr, Pool, PoolSettings, Time};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use simvpc::{Category, Op, SimConfig, SimVpc};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

#[derive(Clone, Copy, Debug)]
enum Event {
    Sample,
    /// `slot`: the node's number in the order of the node groups, as traces name nodes.
    Launch {
        group: usize,
        slot: usize,
    },
    Arrive {
        node: usize,
    },
    Burst {
        index: usize,
    },
    Trace {
        index: usize,
    },
    Leave {
        node: usize,
        pod: u64,
    },
    Wake {
        node: usize,
        at: Time,
    },
    Reply {
        node: usize,
        id: u64,
    },
}

/// Running totals of a run: see [`Cluster::spent`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spent {
    pub ec2_calls: u64,
    pub throttled_calls: u64,
    pub unschedulable_pods: u64,
}

/// How [`Cluster::run_unless`] ended.
#[derive(Debug)]
pub enum Ended {
    Finished(Box<Report>),
    /// Stopped with this reason: a bound broken.
    Stopped(String),
}

/// Many nodes sharing one simulated VPC, on one virtual clock.
pub struct Cluster {
    pub scenario: Scenario,
    pub vpc: SimVpc,
    pub nodes: Vec<Node>,
    /// The index in `nodes` of each launched node, by slot.
    slots: Vec<Option<usize>>,
    /// Pods of the trace that are running or waiting, by (node, pod name).
    trace_pods: HashMap<(usize, String), u64>,
    settings: PoolSettings,
    config: Config,
    subnet_ids: Vec<String>,
    queue: EventQueue<Event>,
    rng: SmallRng,
    pub now: Time,
    next_pod: u64,
    pod_events: u64,
    unschedulable: u64,
    timeline: Vec<Sample>,
    mutating_refill_per_sec: f64,
    /// The scenario's sets of security groups for pods.
    group_sets: Vec<GroupSet>,
}

fn exp(rng: &mut SmallRng, mean_secs: f64) -> Duration {
    Duration::from_secs_f64(-mean_secs * (1.0 - rng.gen::<f64>()).ln())
}

impl Cluster {
    pub fn new(scenario: Scenario) -> Result<Cluster, String> {
        // The simulated VPC has no resource controller: with security groups for pods, nodes make
        // their own trunks and branches (POD_ENI_MANAGER=node unless the scenario says otherwise,
        // which is refused below).
        let pod_eni = Config::from_lookup(|k| {
            (k == "ENABLE_POD_ENI")
                .then(|| scenario.settings.get(k).cloned())
                .flatten()
        })
        .map_err(|e| e.to_string())?
        .pod_eni;
        let config = Config::from_lookup(|k| match scenario.settings.get(k) {
            None if k == "POD_ENI_MANAGER" && pod_eni => Some("node".into()),
            v => v.cloned(),
        })
        .map_err(|e| e.to_string())?;
        if config.pod_eni && !config.node_makes_branches {
            return Err(
                "POD_ENI_MANAGER=controller: the simulated VPC has no resource controller; \
                        its nodes make their own branch ENIs (POD_ENI_MANAGER=node)"
                    .into(),
            );
        }
        let settings = PoolSettings::from_config(&config);
        if config.pod_eni && config.ipv6 {
            return Err("security groups for pods on IPv6 nodes are not simulated".into());
        }
        let group_sets = scenario
            .workload
            .security_group_sets
            .iter()
            .map(|set| GroupSet::new(set.iter().cloned()))
            .collect();
        let mut sim = SimConfig {
            seed: scenario.seed,
            ..SimConfig::default()
        };
        for (name, ms) in &scenario.ec2.latency_ms {
            let op = Op::ALL
                .into_iter()
                .find(|o| o.name() == name)
                .ok_or_else(|| format!("unknown EC2 operation {name:?}"))?;
            sim.latency.insert(op, Duration::from_millis(*ms));
        }
        for (name, bucket, category) in [
            (
                "ec2.mutating_bucket",
                scenario.ec2.mutating_bucket,
                Category::Mutating,
            ),
            (
                "ec2.non_mutating_bucket",
                scenario.ec2.non_mutating_bucket,
                Category::NonMutating,
            ),
        ] {
            if let Some([cap, rate]) = bucket {
                ipam::pacing::check_bucket(cap, rate).map_err(|e| format!("{name}: {e}"))?;
                sim.buckets.insert(category, (cap, rate));
            }
        }
        sim.error_rate = scenario.ec2.error_rate;
        sim.timeout_rate = scenario.ec2.timeout_rate;
        let cidr: Ipv4Cidr = scenario
            .vpc
            .cidr
            .parse()
            .map_err(|e| format!("vpc.cidr: {e}"))?;
        let mutating_refill_per_sec = sim.buckets[&Category::Mutating].1;
        let mut vpc = SimVpc::new(cidr, sim);
        if let Some(v6) = &scenario.vpc.ipv6_cidr {
            vpc.add_ipv6_cidr(v6.parse().map_err(|e| format!("vpc.ipv6_cidr: {e}"))?);
        }
        let mut subnet_ids = Vec::new();
        for s in &scenario.vpc.subnets {
            let c: Ipv4Cidr = s.cidr.parse().map_err(|e| format!("subnet: {e}"))?;
            let tags: Vec<(&str, &str)> = s
                .tags
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let id = vpc.add_subnet(c, &s.az, &tags)?;
            for r in &s.prefix_reservations {
                vpc.reserve_for_prefixes(
                    &id,
                    r.parse().map_err(|e| format!("prefix reservation: {e}"))?,
                )?;
            }
            if let Some(v6) = &s.ipv6_cidr {
                let block = v6.parse().map_err(|e| format!("subnet ipv6_cidr: {e}"))?;
                vpc.associate_subnet_ipv6(&id, block)?;
            }
            subnet_ids.push(id);
        }
        if config.ipv6 {
            for g in &scenario.nodes {
                let subnet = &scenario.vpc.subnets[g.subnet];
                if subnet.ipv6_cidr.is_none() {
                    return Err(format!(
                        "ENABLE_IPv6=true, but the nodes' subnet {} has no ipv6_cidr",
                        subnet.cidr
                    ));
                }
                let options = MaxPodsOptions {
                    ipv6: true,
                    custom_networking: config.custom_networking,
                    ..MaxPodsOptions::default()
                };
                let lim = limits::lookup(&g.instance_type)
                    .ok_or_else(|| format!("unknown instance type {:?}", g.instance_type))?;
                if let Some(why) = ipam::maxpods::ipv6_refusal(&g.instance_type, lim, options) {
                    return Err(format!("ENABLE_IPv6=true: {why}"));
                }
            }
        }
        let mut cluster = Cluster {
            rng: SmallRng::seed_from_u64(scenario.seed ^ 0x5eed),
            scenario,
            vpc,
            nodes: Vec::new(),
            slots: Vec::new(),
            trace_pods: HashMap::new(),
            settings,
            config,
            subnet_ids,
            queue: EventQueue::default(),
            now: Time::ZERO,
            next_pod: 0,
            pod_events: 0,
            unschedulable: 0,
            timeline: Vec::new(),
            mutating_refill_per_sec,
            group_sets,
        };
        for (group, g) in cluster.scenario.nodes.clone().iter().enumerate() {
            for i in 0..g.count {
                let spread = g.launch_spread_secs as f64 * f64::from(i) / f64::from(g.count.max(1));
                let slot = cluster.slots.len();
                cluster.slots.push(None);
                cluster.schedule(
                    Time::from_secs(g.start_secs) + Duration::from_secs_f64(spread),
                    Event::Launch { group, slot },
                );
            }
        }
        for (index, b) in cluster.scenario.workload.bursts.clone().iter().enumerate() {
            cluster.schedule(Time::from_secs(b.at_secs), Event::Burst { index });
        }
        match (&cluster.scenario.workload.trace, &cluster.scenario.trace) {
            (Some(file), None) => {
                return Err(format!(
                    "workload.trace {file:?} is read with its scenario file (Scenario::load)"
                ));
            }
            (_, Some(trace)) => {
                let times: Vec<f64> = trace.iter().map(|e| e.t_secs).collect();
                for (index, t) in times.into_iter().enumerate() {
                    cluster.schedule(
                        Time::ZERO + Duration::from_secs_f64(t),
                        Event::Trace { index },
                    );
                }
            }
            (None, None) => {}
        }
        cluster.schedule(Time::ZERO, Event::Sample);
        Ok(cluster)
    }

    fn schedule(&mut self, at: Time, e: Event) {
        self.queue.push(at, e);
    }

    fn apply(&mut self, node: usize, next: Nexts) {
        for n in next {
            match n {
                Next::Reply(at, id) => self.schedule(at, Event::Reply { node, id }),
                Next::Wake(at) => self.schedule(at, Event::Wake { node, at }),
                Next::Ready => self.node_ready(node),
            }
        }
    }

    /// The node's pool is warm and its CNI is ready: the scheduler starts placing pods on it.
    fn node_ready(&mut self, node: usize) {
        for _ in 0..self.scenario.workload.initial_burst {
            self.arrive(node, self.scenario.workload.mean_lifetime_secs);
        }
        if let Some(gap) = self.next_arrival_gap() {
            self.schedule(self.now + gap, Event::Arrive { node });
        }
    }

    fn launch(&mut self, group: usize, slot: usize) -> Result<(), String> {
        let g = self.scenario.nodes[group].clone();
        let subnet = &self.subnet_ids[g.subnet];
        let id = self
            .vpc
            .launch_instance(&g.instance_type, subnet, &["sg-nodes"])?;
        let inst = self.vpc.instance(&id).expect("just launched").clone();
        let lim = limits::lookup(&g.instance_type).expect("checked by the scenario");
        let pd = self.config.prefix_delegation && lim.supports_prefixes();
        let custom = self.config.custom_networking;
        let node_spec = NodeSpec {
            instance_type: g.instance_type.clone(),
            slots_per_eni: lim.slots_per_eni(),
            max_enis: lim.enis(),
            max_pods: max_pods(
                lim,
                MaxPodsOptions {
                    prefix_delegation: pd,
                    custom_networking: custom,
                    max_eni: self.config.max_eni,
                    uncapped: false,
                    ipv6: self.config.ipv6,
                },
            ),
            supports_prefixes: lim.supports_prefixes(),
            primary_subnet: subnet.clone(),
            security_groups: inst.security_groups.clone(),
            eni_config: g.eni_config_subnet.map(|i| EniConfigSpec {
                subnet: self.subnet_ids[i].clone(),
                security_groups: vec!["sg-pods".into()],
            }),
            unmanaged_enis: 0,
            unschedulable: false,
        };
        let primary = self
            .vpc
            .interfaces()
            .find(|e| e.id == inst.primary_eni)
            .expect("primary ENI")
            .clone();
        let mut pool = Pool::new(node_spec, &self.settings);
        pool.add_eni(primary.eni_info(0), self.now);
        let idx = self.nodes.len();
        self.slots[slot] = Some(idx);
        let facts = NodeFacts {
            instance_id: id,
            availability_zone: inst.az.clone(),
            vpc_id: self.vpc.vpc_id.clone(),
            max_enis: lim.enis(),
            ..NodeFacts::default()
        };
        let mut node = Node::new(facts, pool, self.settings.clone(), self.now);
        if self.config.pod_eni {
            node = node.with_branches(BranchSettings {
                limit: limits::branch_interfaces(&g.instance_type),
                warm_target: self.config.warm_branch_target,
                cooldown: BRANCH_COOLDOWN,
            });
        }
        if self.config.ipv6 {
            node = node.ipv6(primary.id.clone(), self.config.v4_egress);
        }
        self.nodes.push(node);
        let next = self.nodes[idx].plan(&mut self.vpc, self.now);
        self.apply(idx, next);
        Ok(())
    }

    /// Time from now to a node's next pod arrival: a Poisson process with `pods_per_node /
    /// mean_lifetime` per second on average, shaped by the daily curve if there is one (by thinning:
    /// candidates at the peak rate, each kept with the curve's share of the peak).
    fn next_arrival_gap(&mut self) -> Option<Duration> {
        let w = &self.scenario.workload;
        if w.pods_per_node <= 0.0 {
            return None;
        }
        let mean_gap = w.mean_lifetime_secs / w.pods_per_node;
        let Some(daily) = &w.daily else {
            return Some(exp(&mut self.rng, mean_gap));
        };
        let peak = daily.peak();
        let mut gap = Duration::ZERO;
        loop {
            gap += exp(&mut self.rng, mean_gap / peak);
            if self.rng.gen::<f64>() * peak < daily.factor((self.now + gap).as_secs_f64()) {
                return Some(gap);
            }
        }
    }

    /// A pod is created on the node, to live an exponentially distributed time with this mean; None if
    /// the node is full.
    fn arrive(&mut self, node: usize, mean_lifetime_secs: f64) -> Option<u64> {
        let pod = self.place(node)?;
        let life = exp(&mut self.rng, mean_lifetime_secs);
        self.schedule(self.now + life, Event::Leave { node, pod });
        Some(pod)
    }

    /// A pod is created on the node; None if the node is full.
    fn place(&mut self, node: usize) -> Option<u64> {
        self.pod_events += 1;
        // The scheduler does not place more pods than max-pods, two of which are host-network pods.
        let n = &mut self.nodes[node];
        if n.pods() as u32 + 2 >= n.pool.node.max_pods {
            self.unschedulable += 1;
            return None;
        }
        let pod = self.next_pod;
        self.next_pod += 1;
        self.pod_arrives(node, pod);
        Some(pod)
    }

    /// The groups a SecurityGroupPolicy gives `pod`: the scenario's share of pods, chosen from the
    /// pod's number (not the random stream, so that adding the feature changes no other draw), each
    /// taking the sets in turn.
    fn groups_for(&self, pod: u64) -> Option<&GroupSet> {
        if self.group_sets.is_empty() {
            return None;
        }
        let share = self.scenario.workload.security_group_share.unwrap_or(1.0);
        (ipam::pacing::unit_from(pod ^ self.scenario.seed) < share)
            .then(|| &self.group_sets[pod as usize % self.group_sets.len()])
    }

    fn pod_arrives(&mut self, node: usize, pod: u64) {
        match self.groups_for(pod).cloned() {
            Some(groups) => self.nodes[node].pod_with_groups_arrives(pod, &groups, self.now),
            None => self.nodes[node].pod_arrives(pod, self.now),
        }
        let next = self.nodes[node].plan(&mut self.vpc, self.now);
        self.apply(node, next);
    }

    /// Starts a pod on a node that stays until `stop_pod` (for tests that need exact pod counts).
    pub fn start_pod(&mut self, node: usize) -> u64 {
        let pod = self.next_pod;
        self.next_pod += 1;
        self.pod_arrives(node, pod);
        pod
    }

    pub fn stop_pod(&mut self, node: usize, pod: u64) {
        let n = &mut self.nodes[node];
        n.pod_leaves(pod, self.now);
        let next = n.plan(&mut self.vpc, self.now);
        self.apply(node, next);
    }

    /// Runs events for `d` of simulated time, checking the invariants after each if asked.
    pub fn run_for(&mut self, d: Duration, check: bool) -> Result<(), String> {
        let until = self.now + d;
        // Without moving the queue on: pods started between two runs are events before the next
        // one queued, and the queue takes no event before the last time it moved to.
        while let Some(at) = self.queue.next_time() {
            if at > until || !self.step()? {
                break;
            }
            if check {
                self.check_invariants()?;
            }
        }
        self.now = until;
        Ok(())
    }

    /// Processes the next event; false when the scenario's time is up.
    pub fn step(&mut self) -> Result<bool, String> {
        let end = Time::from_secs(self.scenario.duration_secs);
        let Some((at, event)) = self.queue.pop() else {
            return Ok(false);
        };
        if at > end {
            return Ok(false);
        }
        self.now = at;
        match event {
            Event::Sample => {
                let mut s = Sample {
                    t_secs: at.as_secs_f64(),
                    ..Sample::default()
                };
                for n in &self.nodes {
                    // An IPv6 node holds no IPv4 address of the subnet beyond its primary; its
                    // pods use /128s of its /80.
                    if n.is_ipv6() {
                        s.in_use += n.running.len() as u64;
                    } else {
                        let st = n.pool.stats();
                        s.held += u64::from(st.total);
                        s.in_use += u64::from(st.assigned);
                    }
                    s.pending_adds += n.pending_adds() as u64;
                }
                s.mutating_calls = self
                    .vpc
                    .calls
                    .iter()
                    .filter(|(op, _)| op.category() == Category::Mutating)
                    .map(|(_, c)| c.ok + c.throttled + c.failed)
                    .sum();
                self.timeline.push(s);
                self.schedule(
                    at + Duration::from_secs(self.scenario.sample_every_secs.max(1)),
                    Event::Sample,
                );
            }
            Event::Launch { group, slot } => self.launch(group, slot)?,
            Event::Arrive { node } => {
                self.arrive(node, self.scenario.workload.mean_lifetime_secs);
                if let Some(gap) = self.next_arrival_gap() {
                    self.schedule(at + gap, Event::Arrive { node });
                }
            }
            Event::Burst { index } => {
                let b = self.scenario.workload.bursts[index].clone();
                let life = b
                    .mean_lifetime_secs
                    .unwrap_or(self.scenario.workload.mean_lifetime_secs);
                // The scheduler places pods on ready nodes only.
                for node in 0..self.nodes.len() {
                    if self.nodes[node].ready_after().is_some() {
                        for _ in 0..b.pods_per_node {
                            self.arrive(node, life);
                        }
                    }
                }
                if let Some(every) = b.every_secs {
                    self.schedule(at + Duration::from_secs(every), Event::Burst { index });
                }
            }
            Event::Trace { index } => self.replay(index),
            Event::Leave { node, pod } => {
                self.pod_events += 1;
                let n = &mut self.nodes[node];
                n.pod_leaves(pod, at);
                let next = n.plan(&mut self.vpc, at);
                self.apply(node, next);
            }
            Event::Wake { node, at: when } => {
                let n = &mut self.nodes[node];
                if n.next_wake == Some(when) {
                    n.next_wake = None;
                    let next = n.plan(&mut self.vpc, at);
                    self.apply(node, next);
                }
            }
            Event::Reply { node, id } => {
                let n = &mut self.nodes[node];
                let next = if id & RETRY != 0 {
                    n.on_retry(id & !RETRY, &mut self.vpc, at)
                } else {
                    n.on_reply(id, &mut self.vpc, at)
                };
                self.apply(node, next);
            }
        }
        Ok(true)
    }

    /// One line of the trace. A create on a node not launched yet cannot be scheduled; a delete of a pod
    /// that was never placed is nothing to do.
    fn replay(&mut self, index: usize) {
        let e = &self
            .scenario
            .trace
            .as_ref()
            .expect("trace events come from a trace")[index];
        let (slot, create, key) = (e.node, e.create, (e.node, e.pod.clone()));
        let node = self.slots[slot];
        if create {
            match node {
                Some(node) => {
                    if let Some(pod) = self.place(node) {
                        self.trace_pods.insert(key, pod);
                    }
                }
                None => {
                    self.pod_events += 1;
                    self.unschedulable += 1;
                }
            }
        } else if let (Some(node), Some(pod)) = (node, self.trace_pods.remove(&key)) {
            self.pod_events += 1;
            let n = &mut self.nodes[node];
            n.pod_leaves(pod, self.now);
            let next = n.plan(&mut self.vpc, self.now);
            self.apply(node, next);
        }
    }

    pub fn run(self) -> Result<Report, String> {
        self.run_with_progress(&mut |_| {})
    }

    /// What the run has spent so far. Every figure only grows, so a bound on one that is broken now
    /// stays broken to the end: the tuner stops such a run instead of finishing it.
    pub fn spent(&self) -> Spent {
        let mut s = Spent {
            unschedulable_pods: self.unschedulable,
            ..Spent::default()
        };
        for c in self.vpc.calls.values() {
            s.ec2_calls += c.ok + c.throttled + c.failed;
            s.throttled_calls += c.throttled;
        }
        s
    }

    /// Runs to the end unless `stop`, asked every few thousand events, names a reason to stop there.
    pub fn run_unless(
        mut self,
        stop: &mut dyn FnMut(&Cluster) -> Option<String>,
    ) -> Result<Ended, String> {
        let mut steps: u32 = 0;
        while self.step()? {
            steps = steps.wrapping_add(1);
            if steps % (1 << 12) == 0 {
                if let Some(reason) = stop(&self) {
                    return Ok(Ended::Stopped(reason));
                }
            }
        }
        Ok(match stop(&self) {
            Some(reason) => Ended::Stopped(reason),
            None => Ended::Finished(Box::new(self.report())),
        })
    }

    /// Runs to the end, telling `progress` now and then the share of the simulated time done, and 1.0
    /// at the end.
    pub fn run_with_progress(mut self, progress: &mut dyn FnMut(f64)) -> Result<Report, String> {
        let end = self.scenario.duration_secs.max(1) as f64;
        let mut steps: u32 = 0;
        while self.step()? {
            steps = steps.wrapping_add(1);
            if steps % (1 << 16) == 0 {
                progress((self.now.as_secs_f64() / end).min(1.0));
            }
        }
        progress(1.0);
        Ok(self.report())
    }

    pub fn report(&self) -> Report {
        let mut waits = Vec::new();
        let mut r = Report {
            scenario: self.scenario.name.clone(),
            nodes: self.nodes.len() as u64,
            simulated_secs: self.scenario.duration_secs,
            pod_events: self.pod_events,
            unschedulable_pods: self.unschedulable,
            timeline: self.timeline.clone(),
            mutating_refill_per_sec: self.mutating_refill_per_sec,
            ..Report::default()
        };
        let mut ready = Vec::new();
        for n in &self.nodes {
            match n.ready_after() {
                Some(d) => ready.push(d),
                None => r.nodes_never_ready += 1,
            }
            waits.extend_from_slice(&n.counters.add_waits);
            r.throttled_retries += n.counters.throttled_retries;
            r.forced_removals += n.counters.forced_removals;
        }
        r.add_wait = Waits::from(waits);
        r.node_ready = NodeReady::from(ready);
        for (op, c) in &self.vpc.calls {
            r.ec2_calls.insert(
                op.name().to_string(),
                Calls {
                    ok: c.ok,
                    throttled: c.throttled,
                    failed: c.failed,
                },
            );
        }
        r.leaked_enis = self
            .vpc
            .interfaces()
            .filter(|e| self.unused(e) && e.tags.contains_key(ipam::ec2::INSTANCE_TAG))
            .count() as u64;
        r
    }

    /// An ENI neither attached nor, as a branch, associated with a trunk.
    fn unused(&self, e: &simvpc::NetworkInterface) -> bool {
        e.attachment.is_none() && !self.vpc.is_associated_branch(&e.id)
    }

    /// The invariants that must hold after every event; an error names the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = HashSet::new();
        for n in &self.nodes {
            for (key, a) in n.pool.assignments() {
                if !seen.insert(a.ip) {
                    return Err(format!("{} assigned twice (again to {key:?})", a.ip));
                }
            }
            if let Some(b) = n.branches() {
                b.check().map_err(|e| format!("{}: {e}", n.instance_id()))?;
            }
            if n.counters.cooldown_violations > 0 {
                return Err(format!(
                    "{} reused an address inside its cooldown",
                    n.instance_id()
                ));
            }
            let inst = self
                .vpc
                .instance(n.instance_id())
                .ok_or("node without instance")?;
            let on_instance: Vec<_> = self
                .vpc
                .interfaces()
                .filter(|e| {
                    e.attachment
                        .as_ref()
                        .is_some_and(|a| a.instance_id == n.instance_id())
                })
                .collect();
            if on_instance.len() as u32 > inst.limits.enis() {
                return Err(format!(
                    "{} has {} ENIs, above its limit",
                    n.instance_id(),
                    on_instance.len()
                ));
            }
            for e in &on_instance {
                if e.slots() > inst.limits.ipv4_per_eni {
                    return Err(format!(
                        "{} holds {} addresses, above the limit",
                        e.id,
                        e.slots()
                    ));
                }
            }
            if n.calls_in_flight() == 0 {
                // Every ENI the node created is attached to it or deleted: none is left behind.
                if let Some(leaked) = self.vpc.interfaces().find(|e| {
                    self.unused(e)
                        && e.tags.get(ipam::ec2::INSTANCE_TAG).map(String::as_str)
                            == Some(n.instance_id())
                }) {
                    return Err(format!("{} left {} unattached", n.instance_id(), leaked.id));
                }
                let ec2: HashMap<&str, HashSet<Ipv4Cidr>> = on_instance
                    .iter()
                    .map(|e| {
                        let blocks = e
                            .secondary_ips
                            .iter()
                            .map(|ip| Ipv4Cidr::host(*ip))
                            .chain(e.prefixes.iter().copied());
                        (e.id.as_str(), blocks.collect())
                    })
                    .collect();
                let pool: HashMap<&str, HashSet<Ipv4Cidr>> = n
                    .pool
                    .enis()
                    .iter()
                    .map(|e| {
                        (
                            e.info.id.as_str(),
                            e.blocks().iter().map(|b| b.cidr).collect(),
                        )
                    })
                    .collect();
                if ec2 != pool {
                    return Err(format!(
                        "{}: pool {pool:?} differs from EC2 {ec2:?}",
                        n.instance_id()
                    ));
                }
            }
        }
        Ok(())
    }
}
