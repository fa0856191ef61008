//! One simulated node: the real pool engine, the EC2 calls each of its actions takes, and its pods.

use ipam::pool::{EniInfo, Failure, Outcome};
use ipam::{
    decide, Action, AddressKind, Demand, IpamKey, Ipv4Cidr, PodMeta, Pool, PoolSettings,
    SubnetTarget, Time,
};
use rustc_hash::FxHashMap;
use simvpc::{codes, CreateEniRequest, Ec2Error, NetworkInterface, Reply, SimVpc};
use std::collections::VecDeque;
use std::time::Duration;

/// The calls an action is made of, one step at a time.
#[derive(Clone, Debug)]
enum Step {
    Assign,
    Release,
    Resync,
    DiscoverSubnets,
    Create {
        subnets: Vec<String>,
    },
    Attach {
        eni: Box<NetworkInterface>,
        device: u32,
    },
    /// The attach's reply was lost: read the ENI back to learn whether it happened.
    FindAttachment {
        eni: Box<NetworkInterface>,
        device: u32,
    },
    KeepOnTermination {
        eni: Box<NetworkInterface>,
        device: u32,
    },
    /// Undo a create whose attach failed, then report `failure`.
    DeleteUnattached {
        eni_id: String,
        failure: Failure,
    },
    Detach {
        attachment: String,
    },
    Delete {
        eni_id: String,
    },
}

#[derive(Clone, Debug)]
struct Call {
    action: Action,
    step: Step,
    /// Throttled or failed tries of the current step.
    tries: u32,
    /// The reply EC2 gave, to be read when its latency has passed.
    reply: Option<Result<StepReply, Ec2Error>>,
}

#[derive(Clone, Debug)]
enum StepReply {
    Unit,
    Addresses(Vec<Ipv4Cidr>),
    Subnets(Vec<String>),
    Eni(Box<NetworkInterface>),
    Attachment(String),
    Described(Option<Vec<Ipv4Cidr>>),
    Found(Option<Box<NetworkInterface>>),
}

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

pub struct Node {
    pub instance_id: String,
    pub az: String,
    pub pool: Pool,
    pub settings: PoolSettings,
    calls: FxHashMap<u64, Call>,
    next_call: u64,
    pending_adds: VecDeque<PendingAdd>,
    pub running: FxHashMap<u64, IpamKey>,
    attachments: FxHashMap<String, String>,
    pub next_wake: Option<Time>,
    launched_at: Time,
    ready_at: Option<Time>,
    /// Who held each address last and when they let it go, to catch reuse inside the cooldown.
    released_at: FxHashMap<std::net::Ipv4Addr, Time>,
    pub counters: NodeCounters,
}

fn failure_of(e: &Ec2Error) -> Failure {
    match e.code {
        codes::INSUFFICIENT_ADDRESSES => Failure::InsufficientAddresses,
        codes::INSUFFICIENT_CIDR => Failure::InsufficientCidr,
        codes::ADDRESS_LIMIT => Failure::AddressLimitExceeded,
        codes::ATTACHMENT_LIMIT => Failure::AttachmentLimitExceeded,
        codes::ENI_NOT_FOUND => Failure::EniNotFound,
        _ => Failure::Other,
    }
}

fn blocks_of(eni: &NetworkInterface) -> Vec<Ipv4Cidr> {
    eni.secondary_ips
        .iter()
        .map(|ip| Ipv4Cidr::host(*ip))
        .chain(eni.prefixes.iter().copied())
        .collect()
}

fn eni_info(eni: &NetworkInterface, device: u32) -> EniInfo {
    EniInfo {
        id: eni.id.clone(),
        device_number: device,
        subnet_id: eni.subnet_id.clone(),
        subnet_cidr: eni.subnet_cidr,
        primary_ip: eni.primary_ip,
        is_primary: device == 0,
        is_trunk: false,
        is_efa: false,
        excluded: false,
    }
}

/// Retries of a throttled call wait 200 ms doubling up to 20 s, with full jitter from the call id.
fn backoff(tries: u32, id: u64) -> Duration {
    let cap = Duration::from_millis(200 * (1u64 << tries.min(7))).min(Duration::from_secs(20));
    let jitter = (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) as f64 / (1u64 << 31) as f64;
    cap.mul_f64(0.5 + jitter / 2.0)
}

const MAX_TRIES: u32 = 12;

/// Upstream waits this long between detach and delete (EC2 takes about 2 to 3 s to detach).
const DETACH_WAIT: Duration = Duration::from_secs(2);

impl Node {
    pub fn new(
        instance_id: String,
        az: String,
        pool: Pool,
        settings: PoolSettings,
        launched_at: Time,
    ) -> Node {
        Node {
            instance_id,
            az,
            pool,
            settings,
            calls: FxHashMap::default(),
            next_call: 0,
            pending_adds: VecDeque::new(),
            running: FxHashMap::default(),
            attachments: FxHashMap::default(),
            next_wake: None,
            launched_at,
            ready_at: None,
            released_at: FxHashMap::default(),
            counters: NodeCounters::default(),
        }
    }

    /// How long the node took from launch to ready (the daemon's rule: the first pass after which no
    /// EC2 call is in flight); None while it warms up.
    pub fn ready_after(&self) -> Option<Duration> {
        self.ready_at.map(|t| t.since(self.launched_at))
    }

    pub fn calls_in_flight(&self) -> usize {
        self.calls.len()
    }

    pub fn pending_adds(&self) -> usize {
        self.pending_adds.len()
    }

    pub fn pods(&self) -> usize {
        self.running.len() + self.pending_adds.len()
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
    pub fn plan(&mut self, vpc: &mut SimVpc, now: Time) -> Vec<Next> {
        self.pool.expire_cooldowns(now, self.settings.ip_cooldown);
        self.serve_pending(now);
        let demand = Demand {
            pending_adds: self.pending_adds.len() as u32,
        };
        let d = decide(&self.pool, &self.settings, now, &demand);
        let mut next = Vec::new();
        for action in d.actions {
            self.pool.begin(&action, now);
            let step = match &action {
                Action::AssignAddresses { .. } => Step::Assign,
                Action::ReleaseAddresses { .. } => Step::Release,
                Action::ResyncEni { .. } => Step::Resync,
                Action::CreateEni {
                    subnet: SubnetTarget::Subnet(s),
                    ..
                } => Step::Create {
                    subnets: vec![s.clone()],
                },
                Action::CreateEni {
                    subnet: SubnetTarget::Discover { .. },
                    ..
                } => Step::DiscoverSubnets,
                Action::FreeEni { eni } => match self.attachments.get(eni) {
                    Some(att) => Step::Detach {
                        attachment: att.clone(),
                    },
                    None => Step::Delete {
                        eni_id: eni.clone(),
                    },
                },
            };
            let id = self.next_call;
            self.next_call += 1;
            self.calls.insert(
                id,
                Call {
                    action,
                    step,
                    tries: 0,
                    reply: None,
                },
            );
            next.push(self.send(id, vpc, now));
        }
        if let Some(w) = d.wake_at {
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

    /// Makes the current step's call and says when its reply arrives.
    fn send(&mut self, id: u64, vpc: &mut SimVpc, now: Time) -> Next {
        let mut call = self.calls.remove(&id).expect("live call");
        let unit = |r: Reply<()>| (r.result.map(|_| StepReply::Unit), r.latency);
        let (result, latency) = match (&call.step, &call.action) {
            (Step::Assign, Action::AssignAddresses { eni, kind, count }) => {
                let (ips, prefixes) = if *kind == AddressKind::Prefix {
                    (0, *count)
                } else {
                    (*count, 0)
                };
                let r = vpc.assign_private_ip_addresses(now, eni, ips, prefixes);
                let blocks = r.result.map(|(ips, pfx)| {
                    StepReply::Addresses(ips.into_iter().map(Ipv4Cidr::host).chain(pfx).collect())
                });
                (blocks, r.latency)
            }
            (Step::Release, Action::ReleaseAddresses { eni, cidrs }) => {
                let ips: Vec<_> = cidrs
                    .iter()
                    .filter(|c| c.prefix_len() == 32)
                    .map(|c| c.addr())
                    .collect();
                let prefixes: Vec<_> = cidrs
                    .iter()
                    .filter(|c| c.prefix_len() < 32)
                    .copied()
                    .collect();
                unit(vpc.unassign_private_ip_addresses(now, eni, &ips, &prefixes))
            }
            (Step::Resync, Action::ResyncEni { eni }) => {
                let r = vpc.describe_network_interfaces(now, std::slice::from_ref(eni), &[], None);
                let res = match r.result {
                    // An ENI detaching or detached from this instance (a half-done FreeEni) is gone for us.
                    Ok((enis, _)) => Ok(StepReply::Described(
                        enis.first()
                            .filter(|e| {
                                e.attachment.as_ref().is_some_and(|a| {
                                    a.instance_id == self.instance_id
                                        && a.status == simvpc::AttachmentStatus::Attached
                                })
                            })
                            .map(blocks_of),
                    )),
                    Err(e) if e.code == codes::ENI_NOT_FOUND => Ok(StepReply::Described(None)),
                    Err(e) => Err(e),
                };
                (res, r.latency)
            }
            (
                Step::DiscoverSubnets,
                Action::CreateEni {
                    subnet: SubnetTarget::Discover { primary },
                    ..
                },
            ) => {
                let r = vpc.describe_subnets(now, &self.az);
                let res = r.result.map(|subnets| {
                    let candidates: Vec<ipam::subnets::Candidate> = subnets
                        .into_iter()
                        .map(|(subnet, _, free)| ipam::subnets::Candidate {
                            id: subnet.id,
                            free_addresses: free,
                            tags: subnet.tags,
                        })
                        .collect();
                    StepReply::Subnets(ipam::subnets::rank(&candidates, primary, None))
                });
                (res, r.latency)
            }
            (
                Step::Create { subnets },
                Action::CreateEni {
                    security_groups,
                    kind,
                    count,
                    ..
                },
            ) => {
                let (ips, prefixes) = if *kind == AddressKind::Prefix {
                    (0, *count)
                } else {
                    (*count, 0)
                };
                let req = CreateEniRequest {
                    subnet_id: subnets[0].clone(),
                    description: format!("aws-K8S-{}", self.instance_id),
                    security_groups: security_groups.clone(),
                    secondary_ip_count: ips,
                    prefix_count: prefixes,
                    tags: [
                        (
                            "node.k8s.amazonaws.com/instance_id".to_string(),
                            self.instance_id.clone(),
                        ),
                        (
                            "node.k8s.amazonaws.com/createdAt".to_string(),
                            format!("{}", now.as_nanos()),
                        ),
                    ]
                    .into(),
                    // Every try of this call carries the same token: a creation whose reply was
                    // lost is repeated and EC2 returns the ENI it made.
                    client_token: Some(format!("{}-{id}", self.instance_id)),
                };
                let r = vpc.create_network_interface(now, req);
                (r.result.map(|e| StepReply::Eni(Box::new(e))), r.latency)
            }
            (Step::Attach { eni, device }, _) => {
                let r = vpc.attach_network_interface(now, &eni.id, &self.instance_id, *device, 0);
                (r.result.map(StepReply::Attachment), r.latency)
            }
            (Step::FindAttachment { eni, .. }, _) => {
                let r =
                    vpc.describe_network_interfaces(now, std::slice::from_ref(&eni.id), &[], None);
                let found = match r.result {
                    Ok((mut enis, _)) => Ok(StepReply::Found(enis.pop().map(Box::new))),
                    Err(e) if e.code == codes::ENI_NOT_FOUND => Ok(StepReply::Found(None)),
                    Err(e) => Err(e),
                };
                (found, r.latency)
            }
            (Step::KeepOnTermination { eni, .. }, _) => {
                unit(vpc.set_delete_on_termination(now, &eni.id, true))
            }
            (Step::DeleteUnattached { eni_id, .. } | Step::Delete { eni_id }, _) => {
                unit(vpc.delete_network_interface(now, eni_id))
            }
            (Step::Detach { attachment }, _) => unit(vpc.detach_network_interface(now, attachment)),
            (step, action) => unreachable!("step {step:?} does not belong to {action:?}"),
        };
        call.reply = Some(result);
        self.calls.insert(id, call);
        Next::Reply(now + latency, id)
    }

    /// The lowest device index that neither an attached ENI nor an attach in flight uses.
    fn free_device_index(&self) -> u32 {
        let in_flight = self.calls.values().filter_map(|c| match &c.step {
            Step::Attach { device, .. }
            | Step::FindAttachment { device, .. }
            | Step::KeepOnTermination { device, .. } => Some(*device),
            _ => None,
        });
        let used: Vec<u32> = self
            .pool
            .enis()
            .iter()
            .map(|e| e.info.device_number)
            .chain(in_flight)
            .collect();
        (0..)
            .find(|d| !used.contains(d))
            .expect("some index is free")
    }

    /// Reads the reply of call `id` and moves it to its next step, or finishes its action.
    pub fn on_reply(&mut self, id: u64, vpc: &mut SimVpc, now: Time) -> Vec<Next> {
        let mut call = self.calls.remove(&id).expect("reply to a live call");
        let reply = call.reply.take().expect("a sent call has a reply");
        let next_step = match reply {
            Err(e)
                if e.code == codes::THROTTLED
                    || (e.code == codes::ENI_IN_USE
                        && matches!(call.step, Step::Delete { .. }))
                    || ((e.code == codes::TIMEOUT || e.code == codes::UNAVAILABLE)
                        && matches!(
                            call.step,
                            Step::Create { .. }
                                | Step::FindAttachment { .. }
                                | Step::DeleteUnattached { .. }
                                | Step::Detach { .. }
                                | Step::Delete { .. }
                        )) =>
            {
                // Throttled, the ENI still detaching, or a failure or lost reply where repeating is
                // safe (a creation's token returns the ENI it made; a repeated detach or delete of
                // what is gone says so): the same call again after a backoff, so that a failed
                // attach never leaves its ENI behind. A throttled call is retried until EC2 takes
                // it, so that no action is lost or started twice.
                call.tries += 1;
                self.counters.throttled_retries += u64::from(e.code == codes::THROTTLED);
                if e.code == codes::THROTTLED || call.tries < MAX_TRIES {
                    let at = now + backoff(call.tries, id);
                    self.calls.insert(id, call);
                    return vec![Next::Reply(at, id | RETRY)];
                }
                Err(Failure::Other)
            }
            Err(e) => {
                if e.code == codes::TIMEOUT {
                    // It may have happened: read the ENI back before trusting our view of it.
                    if let Some(eni) = call.action.eni() {
                        self.pool.mark_for_resync(eni);
                    }
                }
                match call.step {
                    Step::KeepOnTermination { eni, device } => {
                        // The ENI is attached and ours: DeleteOnTermination is only a safety net.
                        let outcome = Outcome::EniCreated {
                            eni: eni_info(&eni, device),
                            blocks: blocks_of(&eni),
                        };
                        return self.finish(&call.action, outcome, vpc, now);
                    }
                    Step::Attach { eni, device } if e.code == codes::TIMEOUT => {
                        Ok(Step::FindAttachment { eni, device })
                    }
                    Step::Attach { eni, .. } => Ok(Step::DeleteUnattached {
                        eni_id: eni.id,
                        failure: failure_of(&e),
                    }),
                    Step::Create { mut subnets }
                        if subnets.len() > 1 && failure_of(&e) != Failure::Other =>
                    {
                        // Subnet discovery: try the next candidate subnet.
                        subnets.remove(0);
                        Ok(Step::Create { subnets })
                    }
                    Step::Delete { .. } if e.code == codes::ENI_NOT_FOUND => {
                        Err(Failure::EniNotFound)
                    }
                    // Detached already (a repeat after a lost reply, or by someone else): delete it.
                    Step::Detach { .. } if e.code == codes::ATTACHMENT_NOT_FOUND => {
                        Ok(Step::Delete {
                            eni_id: call
                                .action
                                .eni()
                                .expect("FreeEni names its ENI")
                                .to_string(),
                        })
                    }
                    Step::DeleteUnattached { failure, .. } => Err(failure),
                    _ => Err(failure_of(&e)),
                }
            }
            Ok(r) => match (call.step, r) {
                (Step::Assign, StepReply::Addresses(b)) => {
                    return self.finish(&call.action, Outcome::Assigned(b), vpc, now)
                }
                (Step::Release, _) => return self.finish(&call.action, Outcome::Done, vpc, now),
                (Step::Resync, StepReply::Described(b)) => {
                    return self.finish(&call.action, Outcome::Synced(b), vpc, now)
                }
                (Step::DiscoverSubnets, StepReply::Subnets(s)) if s.is_empty() => {
                    Err(Failure::InsufficientAddresses)
                }
                (Step::DiscoverSubnets, StepReply::Subnets(subnets)) => {
                    Ok(Step::Create { subnets })
                }
                (Step::Create { .. }, StepReply::Eni(eni)) => Ok(Step::Attach {
                    eni,
                    device: self.free_device_index(),
                }),
                (Step::FindAttachment { eni, device }, StepReply::Found(found)) => {
                    let ours = found.and_then(|e| e.attachment).filter(|a| {
                        a.instance_id == self.instance_id
                            && a.status == simvpc::AttachmentStatus::Attached
                    });
                    match ours {
                        Some(a) => {
                            self.attachments.insert(eni.id.clone(), a.id);
                            Ok(Step::KeepOnTermination {
                                eni,
                                device: a.device_index,
                            })
                        }
                        None => Ok(Step::Attach { eni, device }),
                    }
                }
                (Step::Attach { eni, device }, StepReply::Attachment(att)) => {
                    self.attachments.insert(eni.id.clone(), att);
                    Ok(Step::KeepOnTermination { eni, device })
                }
                (Step::KeepOnTermination { eni, device }, _) => {
                    let outcome = Outcome::EniCreated {
                        eni: eni_info(&eni, device),
                        blocks: blocks_of(&eni),
                    };
                    return self.finish(&call.action, outcome, vpc, now);
                }
                (Step::DeleteUnattached { failure, .. }, _) => Err(failure),
                (Step::Detach { .. }, _) => {
                    // A detaching ENI cannot be deleted: wait as long as detaching usually takes.
                    let eni_id = call
                        .action
                        .eni()
                        .expect("FreeEni names its ENI")
                        .to_string();
                    call.step = Step::Delete { eni_id };
                    call.tries = 0;
                    self.calls.insert(id, call);
                    return vec![Next::Reply(now + DETACH_WAIT, id | RETRY)];
                }
                (Step::Delete { .. }, _) => {
                    return self.finish(&call.action, Outcome::Done, vpc, now);
                }
                (step, r) => unreachable!("reply {r:?} to step {step:?}"),
            },
        };
        match next_step {
            Ok(step) => {
                call.step = step;
                call.tries = 0;
                self.calls.insert(id, call);
                vec![self.send(id, vpc, now)]
            }
            Err(f) => self.finish(&call.action, Outcome::Failed(f), vpc, now),
        }
    }

    /// A retry's timer went off: make the call again.
    pub fn on_retry(&mut self, id: u64, vpc: &mut SimVpc, now: Time) -> Vec<Next> {
        vec![self.send(id, vpc, now)]
    }

    fn finish(
        &mut self,
        action: &Action,
        outcome: Outcome,
        vpc: &mut SimVpc,
        now: Time,
    ) -> Vec<Next> {
        if let (Action::FreeEni { eni }, Outcome::Done) = (action, &outcome) {
            self.attachments.remove(eni);
        }
        let dropped = self.pool.complete(action, outcome, now);
        self.counters.forced_removals += dropped.len() as u64;
        for (key, _) in dropped {
            self.running.retain(|_, k| *k != key);
        }
        self.plan(vpc, now)
    }
}

/// Marks a call id as a retry timer rather than a reply.
pub const RETRY: u64 = 1 << 63;
