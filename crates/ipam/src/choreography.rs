//! The EC2 calls each [`Action`] is made of, written once and free of I/O: a step machine that says
//! which request to make next and reads each reply, until the action ends in the [`Outcome`] the pool
//! expects. The daemon's executor runs it against the AWS SDK on tokio; the simulator runs it against
//! the simulated VPC on its virtual clock. So tags, descriptions, subnet choice, device indexes,
//! retries and backoff are the same in both by construction, and the simulator's property tests
//! exercise the daemon's retry logic.
//!
//! Host effects (an ENI's link set up or torn down) are requests too, so that the order "attach,
//! then configure the link, and give the ENI back if the link fails" is written here, not in each
//! caller.

use crate::action::{Failure, Outcome};
use crate::branches::Branch;
use crate::ec2::{
    format_rfc3339, CloudError, CreateEni, Eni, ErrorKind, SubnetInfo, CLUSTER_TAG, CREATED_AT_TAG,
    DESCRIPTION_PREFIX, INSTANCE_TAG,
};
use crate::ownership::route_table;
use crate::pacing::{unit_from, Backoff};
use crate::policy::PolicyMemory;
use crate::pool::{Assignment, EniInfo};
use crate::subnets::{self, Candidate};
use crate::{Action, AddressKind, IpamKey, Ipv4Cidr, Pool, SubnetTarget, Time};
use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, UNIX_EPOCH};

/// Retries of a throttled call, an ENI still detaching, or a lost reply where repeating is safe.
pub const BACKOFF: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(20));
/// Retries of anything but throttling before the action fails (about 100 s with [`BACKOFF`]). A
/// throttled call did not happen, so it is retried until EC2 takes it: no action is lost.
pub const MAX_RETRIES: u32 = 12;
/// Attaches of one new ENI whose replies were lost and whose read-back shows no attachment.
pub const ATTACH_TRIES: u32 = 3;
/// EC2 takes 2 to 3 s to detach an ENI; deleting before then only fails with InUse.
pub const DETACH_WAIT: Duration = Duration::from_secs(2);

/// What the actions need to know about the node.
#[derive(Clone, Debug, Default)]
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

/// An ENI's link as the host must configure it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkSpec {
    pub mac: [u8; 6],
    pub primary_ip: Ipv4Addr,
    pub subnet: Ipv4Cidr,
    pub route_table: u32,
    pub mtu: u32,
}

/// One call to make: to EC2, or (the last two) to the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    AssignIps {
        eni: String,
        count: u32,
    },
    AssignPrefixes {
        eni: String,
        count: u32,
    },
    Unassign {
        eni: String,
        ips: Vec<Ipv4Addr>,
        prefixes: Vec<Ipv4Cidr>,
    },
    DescribeEni {
        eni: String,
    },
    /// EC2's filter names: `availability-zone`, `vpc-id`, `subnet-id`.
    DescribeSubnets {
        filters: Vec<(String, Vec<String>)>,
    },
    Create(CreateEni),
    Attach {
        eni: String,
        instance_id: String,
        device: u32,
        network_card: u32,
    },
    KeepOnTermination {
        eni: String,
        attachment_id: String,
    },
    Detach {
        attachment_id: String,
    },
    Delete {
        eni: String,
    },
    /// AssociateTrunkInterface: a branch ENI on the trunk under a VLAN id; the token makes a repeat
    /// after a lost reply return the first association.
    Associate {
        branch: String,
        trunk: String,
        vlan: u16,
        client_token: String,
    },
    /// DisassociateTrunkInterface.
    Disassociate {
        association_id: String,
    },
    /// Configure a hot-plugged ENI's link (waiting for it to show up is the host's business).
    SetupLink(LinkSpec),
    /// Remove what [`Request::SetupLink`] put on the host.
    TeardownLink(LinkSpec),
}

impl Request {
    /// The EC2 operation, for metrics and errors; host effects are named for what they do.
    pub fn operation(&self) -> &'static str {
        match self {
            Request::AssignIps { .. } | Request::AssignPrefixes { .. } => {
                "AssignPrivateIpAddresses"
            }
            Request::Unassign { .. } => "UnassignPrivateIpAddresses",
            Request::DescribeEni { .. } => "DescribeNetworkInterfaces",
            Request::DescribeSubnets { .. } => "DescribeSubnets",
            Request::Create(_) => "CreateNetworkInterface",
            Request::Attach { .. } => "AttachNetworkInterface",
            Request::KeepOnTermination { .. } => "ModifyNetworkInterfaceAttribute",
            Request::Detach { .. } => "DetachNetworkInterface",
            Request::Delete { .. } => "DeleteNetworkInterface",
            Request::Associate { .. } => "AssociateTrunkInterface",
            Request::Disassociate { .. } => "DisassociateTrunkInterface",
            Request::SetupLink(_) => "SetupEniLink",
            Request::TeardownLink(_) => "TeardownEniLink",
        }
    }

    /// Whether the host, not EC2, carries it out.
    pub fn is_host(&self) -> bool {
        matches!(self, Request::SetupLink(_) | Request::TeardownLink(_))
    }
}

/// A successful reply, by request: `Addresses` for the assigns, `Enis` for DescribeEni (EC2's
/// NotFound comes as an error), `Subnets`, `Eni` for Create, `Attachment` (its id) for Attach and
/// Associate, `Done` for the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Done,
    Addresses(Vec<Ipv4Cidr>),
    Enis(Vec<Eni>),
    Subnets(Vec<SubnetInfo>),
    Eni(Box<Eni>),
    Attachment(String),
}

/// What to do next for an action: make the run's current request (now, or after a wait), or
/// nothing more. The request is borrowed from the run, which keeps it to repeat it as it was.
#[derive(Debug, PartialEq)]
pub enum Next<'a> {
    Call(&'a Request),
    /// The same or a next call, after a wait.
    After(Duration, &'a Request),
    Done(Finished),
}

/// What a stage decided: the request it makes, or how the action ended.
enum Step {
    Call(Request),
    After(Duration, Request),
    Done(Finished),
}

/// How an action ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    pub outcome: Outcome,
    /// The error behind a failure, or a failure that was worked around.
    pub error: Option<CloudError>,
    /// Things that went wrong without failing the action, for the log.
    pub warnings: Vec<String>,
}

impl Finished {
    /// The call may have happened: the caller's view of the ENI cannot be trusted until read back.
    pub fn outcome_unknown(&self) -> bool {
        self.error
            .as_ref()
            .is_some_and(|e| e.kind == ErrorKind::Unavailable)
    }
}

/// Hands a finished action to the policy (which reacts to failures) and the pool (its outcome, and a
/// read-back of the ENI when the outcome is unknown). Returns the assignments whose addresses the
/// node no longer has.
pub fn settle(
    pool: &mut Pool,
    memory: &mut PolicyMemory,
    action: &Action,
    finished: Finished,
    now: Time,
) -> Vec<(IpamKey, Assignment)> {
    let unknown = finished.outcome_unknown();
    memory.learn(action, &finished.outcome, now);
    let dropped = pool.complete(action, finished.outcome, now);
    if unknown {
        if let Some(eni) = action.eni() {
            pool.mark_for_resync(eni);
        }
    }
    dropped
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

fn node_error(operation: &'static str, code: &'static str, message: String) -> CloudError {
    CloudError {
        kind: ErrorKind::Other,
        operation,
        code: code.into(),
        message: message.into(),
    }
}

#[derive(Clone, Debug)]
struct Attached {
    link: LinkSpec,
    attachment_id: String,
    device: u32,
}

/// The node's side of every action: its facts and what the actions in flight share (device indexes
/// taken or promised, the ENIs attached and their links, subnet CIDRs already looked up).
#[derive(Debug)]
pub struct Choreography {
    facts: NodeFacts,
    /// `aws-K8S-<instance>`, made once.
    description: String,
    devices: BTreeSet<u32>,
    attached: FxHashMap<String, Attached>,
    subnet_cidrs: FxHashMap<String, Ipv4Cidr>,
}

/// One action on its way: where it is and what it is waiting for.
#[derive(Debug)]
pub struct Run {
    action: Action,
    stage: Stage,
    /// The request the current stage made, repeated as it was (same client token) on a retry.
    request: Request,
    retries: u32,
    seed: u64,
    token: String,
    warnings: Vec<String>,
}

#[derive(Clone, Debug)]
enum Stage {
    Assign,
    Release,
    Resync,
    /// Resync found the ENI gone: its link goes.
    Forget,
    Discover {
        primary: String,
    },
    Create {
        subnets: Vec<String>,
        index: usize,
    },
    Attach {
        eni: Box<Eni>,
        device: u32,
        tries: u32,
    },
    /// The attach's reply was lost: the ENI says whether it happened.
    FindAttachment {
        eni: Box<Eni>,
        device: u32,
        tries: u32,
        error: CloudError,
    },
    KeepOnTermination {
        eni: Box<Eni>,
        device: u32,
        attachment_id: String,
    },
    SubnetCidr {
        eni: Box<Eni>,
        device: u32,
        attachment_id: String,
    },
    SetupLink {
        eni: Box<Eni>,
        device: u32,
        attachment_id: String,
        link: LinkSpec,
    },
    /// A new ENI that cannot be used: detach it, then delete it, then fail with `error`.
    Undo {
        eni_id: String,
        device: Option<u32>,
        error: CloudError,
        detached: bool,
    },
    FreeLookup,
    FreeTeardown {
        attachment_id: String,
    },
    FreeDetach,
    FreeDelete,
    /// A new branch, to associate with the trunk.
    Associate {
        eni: Box<Eni>,
    },
    BranchDisassociate,
    BranchDelete,
}

impl Choreography {
    pub fn new(facts: NodeFacts) -> Choreography {
        Choreography {
            description: format!("{DESCRIPTION_PREFIX}{}", facts.instance_id),
            facts,
            devices: BTreeSet::new(),
            attached: FxHashMap::default(),
            subnet_cidrs: FxHashMap::default(),
        }
    }

    pub fn facts(&self) -> &NodeFacts {
        &self.facts
    }

    /// Records an ENI found attached at start: its device index is taken, and a secondary one's link
    /// can be torn down when it is freed.
    pub fn adopt(&mut self, eni: &Eni, subnet_cidr: Ipv4Cidr) {
        self.subnet_cidrs.insert(eni.subnet_id.clone(), subnet_cidr);
        let Some(attachment) = &eni.attachment else {
            return;
        };
        self.devices.insert(attachment.device_index);
        if let (Some(mac), Some(primary_ip)) = (parse_mac(&eni.mac), eni.primary_ip) {
            self.attached.insert(
                eni.id.clone(),
                Attached {
                    link: LinkSpec {
                        mac,
                        primary_ip,
                        subnet: subnet_cidr,
                        route_table: route_table(attachment.device_index, attachment.network_card),
                        mtu: self.facts.eni_mtu,
                    },
                    attachment_id: attachment.id.clone(),
                    device: attachment.device_index,
                },
            );
        }
    }

    /// A device index on card 0 held by an ENI that is not ours: new ENIs go elsewhere.
    pub fn avoid_device(&mut self, device: u32) {
        self.devices.insert(device);
    }

    /// That ENI is gone: its device index may be used again.
    pub fn stop_avoiding(&mut self, device: u32) {
        self.devices.remove(&device);
    }

    pub fn link_of(&self, eni_id: &str) -> Option<LinkSpec> {
        self.attached.get(eni_id).map(|a| a.link.clone())
    }

    /// Starts `action`. `seed` spreads its retries' jitter; `token` makes its creations idempotent
    /// (unique per action). `now` is wall time, for the ENI's `createdAt` tag.
    /// The run's first request is [`Run::first`].
    pub fn start(&mut self, action: Action, seed: u64, token: String, now: Time) -> Run {
        let (stage, request) = match &action {
            Action::AssignAddresses { eni, kind, count } => {
                let eni = eni.clone();
                let count = *count;
                let request = match kind {
                    AddressKind::Ip => Request::AssignIps { eni, count },
                    AddressKind::Prefix => Request::AssignPrefixes { eni, count },
                };
                (Stage::Assign, request)
            }
            Action::ReleaseAddresses { eni, cidrs } => (
                Stage::Release,
                Request::Unassign {
                    eni: eni.clone(),
                    ips: cidrs
                        .iter()
                        .filter(|c| c.prefix_len() == 32)
                        .map(|c| c.addr())
                        .collect(),
                    prefixes: cidrs
                        .iter()
                        .filter(|c| c.prefix_len() < 32)
                        .copied()
                        .collect(),
                },
            ),
            Action::ResyncEni { eni } => (Stage::Resync, Request::DescribeEni { eni: eni.clone() }),
            Action::CreateEni { subnet, .. } => match subnet {
                SubnetTarget::Subnet(id) => {
                    let stage = Stage::Create {
                        subnets: vec![id.clone()],
                        index: 0,
                    };
                    let request = self.create_request(&action, id, 0, &token, now);
                    (stage, request)
                }
                SubnetTarget::Discover { primary } => (
                    Stage::Discover {
                        primary: primary.clone(),
                    },
                    Request::DescribeSubnets {
                        filters: vec![
                            (
                                "availability-zone".into(),
                                vec![self.facts.availability_zone.clone()],
                            ),
                            ("vpc-id".into(), vec![self.facts.vpc_id.clone()]),
                        ],
                    },
                ),
            },
            Action::CreateTrunk { subnet, .. } => {
                let stage = Stage::Create {
                    subnets: vec![subnet.clone()],
                    index: 0,
                };
                let request = self.create_request(&action, subnet, 0, &token, now);
                (stage, request)
            }
            Action::CreateBranch { subnet_id, .. } => {
                let stage = Stage::Create {
                    subnets: vec![subnet_id.clone()],
                    index: 0,
                };
                let request = self.create_request(&action, subnet_id, 0, &token, now);
                (stage, request)
            }
            Action::FreeBranch { branch } => (
                Stage::BranchDisassociate,
                Request::Disassociate {
                    association_id: branch.association_id.clone(),
                },
            ),
            Action::FreeEni { eni } => match self.attached.get(eni) {
                Some(a) => (
                    Stage::FreeTeardown {
                        attachment_id: a.attachment_id.clone(),
                    },
                    Request::TeardownLink(a.link.clone()),
                ),
                None => (Stage::FreeLookup, Request::DescribeEni { eni: eni.clone() }),
            },
        };
        Run {
            action,
            stage,
            request,
            retries: 0,
            seed,
            token,
            warnings: Vec::new(),
        }
    }

    fn create_request(
        &self,
        action: &Action,
        subnet_id: &str,
        index: usize,
        token: &str,
        now: Time,
    ) -> Request {
        let (security_groups, kind, count, interface_type) = match action {
            Action::CreateEni {
                security_groups,
                kind,
                count,
                ..
            } => (security_groups.as_slice(), *kind, *count, None),
            Action::CreateTrunk {
                security_groups, ..
            } => (
                security_groups.as_slice(),
                AddressKind::Ip,
                0,
                Some("trunk"),
            ),
            Action::CreateBranch { groups, .. } => {
                (groups.groups(), AddressKind::Ip, 0, Some("branch"))
            }
            _ => unreachable!("only CreateEni, CreateTrunk and CreateBranch create"),
        };
        let facts = &self.facts;
        let mut tags = vec![
            (INSTANCE_TAG.to_string(), facts.instance_id.clone()),
            (
                CREATED_AT_TAG.to_string(),
                format_rfc3339(UNIX_EPOCH + Duration::from_nanos(now.as_nanos())),
            ),
        ];
        if let Some(cluster) = &facts.cluster_name {
            tags.push((CLUSTER_TAG.to_string(), cluster.clone()));
        }
        tags.extend(facts.extra_tags.clone());
        Request::Create(CreateEni {
            subnet_id: subnet_id.to_string(),
            description: self.description.clone(),
            security_groups: security_groups.to_vec(),
            secondary_ips: if kind == AddressKind::Ip { count } else { 0 },
            prefixes: if kind == AddressKind::Prefix {
                count
            } else {
                0
            },
            tags,
            // A token names one request: another subnet is another request.
            client_token: format!("{token}-{index}"),
            interface_type,
        })
    }

    fn reserve_device(&mut self) -> Option<u32> {
        let device = (1..self.facts.max_enis.max(1)).find(|d| !self.devices.contains(d))?;
        self.devices.insert(device);
        Some(device)
    }

    fn attached_to_us(&self, eni: &Eni) -> bool {
        eni.attachment.as_ref().is_some_and(|a| {
            // EC2 reports "attaching" for a moment after AttachNetworkInterface returns.
            a.instance_id == self.facts.instance_id
                && matches!(a.status.as_str(), "attaching" | "attached")
        })
    }

    /// Reads the reply to the run's last request and says what comes next.
    pub fn step<'r>(
        &mut self,
        run: &'r mut Run,
        reply: Result<Reply, CloudError>,
        now: Time,
    ) -> Next<'r> {
        let reply = match reply {
            Err(e) if run.retryable(&e) => {
                if e.kind == ErrorKind::Throttled || run.retries < MAX_RETRIES {
                    let wait = run.backoff();
                    return Next::After(wait, &run.request);
                }
                Err(e)
            }
            other => other,
        };
        let stage = std::mem::replace(&mut run.stage, Stage::FreeLookup);
        let (stage, step) = self.advance(run, stage, reply, now);
        if let Some(stage) = stage {
            run.stage = stage;
            run.retries = 0;
        }
        match step {
            Step::Call(request) => {
                run.request = request;
                Next::Call(&run.request)
            }
            Step::After(wait, request) => {
                run.request = request;
                Next::After(wait, &run.request)
            }
            Step::Done(finished) => Next::Done(finished),
        }
    }

    fn advance(
        &mut self,
        run: &mut Run,
        stage: Stage,
        reply: Result<Reply, CloudError>,
        now: Time,
    ) -> (Option<Stage>, Step) {
        let done = |run: &mut Run, outcome, error| (None, run.finish(outcome, error));
        let failed = |run: &mut Run, e: CloudError| {
            (
                None,
                run.finish(Outcome::Failed(failure_of(&e)), Some(e.clone())),
            )
        };
        match (stage, reply) {
            (Stage::Assign, Ok(Reply::Addresses(blocks))) => {
                done(run, Outcome::Assigned(blocks), None)
            }
            (Stage::Release, Ok(_)) => done(run, Outcome::Done, None),
            (Stage::Assign | Stage::Release, Err(e)) => failed(run, e),

            (Stage::Resync, Ok(Reply::Enis(found))) => {
                let eni_id = run.action.eni().unwrap_or_default();
                match found.iter().find(|e| e.id == eni_id) {
                    Some(e) if self.attached_to_us(e) => {
                        done(run, Outcome::Synced(Some(blocks_of(e))), None)
                    }
                    _ => self.forget(run),
                }
            }
            (Stage::Resync, Err(e)) if e.kind == ErrorKind::NotFound => self.forget(run),
            (Stage::Resync, Err(e)) => failed(run, e),
            (Stage::Forget, reply) => {
                if let Err(e) = reply {
                    run.warnings
                        .push(format!("host state of a vanished ENI: {e}"));
                }
                done(run, Outcome::Synced(None), None)
            }

            (Stage::Discover { primary }, reply) => {
                let ranked = match reply {
                    Ok(Reply::Subnets(found)) => {
                        for s in &found {
                            if let Some(cidr) = s.cidr {
                                // Known already, almost always: no key to copy.
                                if self.subnet_cidrs.get(&s.id) != Some(&cidr) {
                                    self.subnet_cidrs.insert(s.id.clone(), cidr);
                                }
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
                        // Empty when every subnet is excluded, the primary's too: the create then
                        // fails saying so, rather than putting pods where the operator said not to.
                        subnets::rank(&candidates, &primary, self.facts.cluster_name.as_deref())
                    }
                    Ok(other) => unreachable!("DescribeSubnets answered {other:?}"),
                    // As upstream: the primary subnet, when the subnets cannot be listed.
                    Err(e) => {
                        run.warnings.push(format!(
                            "subnet discovery failed; using the primary subnet: {e}"
                        ));
                        vec![primary]
                    }
                };
                if ranked.is_empty() {
                    return failed(
                        run,
                        node_error(
                            "CreateNetworkInterface",
                            "NoUsableSubnet",
                            "no subnet of the node's availability zone may be used for pods (all are tagged kubernetes.io/role/cni=0 or for other clusters)".into(),
                        ),
                    );
                }
                let request = self.create_request(&run.action, &ranked[0], 0, &run.token, now);
                (
                    Some(Stage::Create {
                        subnets: ranked,
                        index: 0,
                    }),
                    Step::Call(request),
                )
            }

            (Stage::Create { .. }, Ok(Reply::Eni(eni)))
                if matches!(run.action, Action::CreateBranch { .. }) =>
            {
                let Action::CreateBranch { trunk, vlan, .. } = &run.action else {
                    unreachable!("just matched");
                };
                if eni.primary_ip.is_none() {
                    let error = node_error(
                        "CreateNetworkInterface",
                        "NoPrimaryAddress",
                        format!("branch {} has no primary IPv4 address", eni.id),
                    );
                    return self.undo(eni.id, None, error, true);
                }
                let request = Request::Associate {
                    branch: eni.id.clone(),
                    trunk: trunk.clone(),
                    vlan: *vlan,
                    client_token: format!("{}-associate", run.token),
                };
                (Some(Stage::Associate { eni }), Step::Call(request))
            }
            (Stage::Associate { eni }, Ok(Reply::Attachment(association_id))) => {
                let Action::CreateBranch {
                    groups,
                    vlan,
                    subnet,
                    ..
                } = &run.action
                else {
                    unreachable!("only a branch is associated");
                };
                let branch = Branch {
                    eni_id: eni.id.clone(),
                    mac: eni.mac.clone(),
                    ip: eni.primary_ip.expect("checked when it was created"),
                    subnet: *subnet,
                    vlan: *vlan,
                    association_id,
                    groups: groups.clone(),
                };
                done(run, Outcome::BranchCreated(branch), None)
            }
            // Not associated: the branch is deleted (nothing is attached) and the action fails.
            (Stage::Associate { eni }, Err(e)) => self.undo(eni.id, None, e, true),

            (Stage::BranchDisassociate, reply) => match reply {
                Ok(_)
                | Err(CloudError {
                    kind: ErrorKind::NotFound,
                    ..
                }) => {
                    let Action::FreeBranch { branch } = &run.action else {
                        unreachable!("only a branch is disassociated");
                    };
                    (
                        Some(Stage::BranchDelete),
                        Step::Call(Request::Delete {
                            eni: branch.eni_id.clone(),
                        }),
                    )
                }
                Err(e) => failed(run, e),
            },
            (Stage::BranchDelete, reply) => match reply {
                Ok(_)
                | Err(CloudError {
                    kind: ErrorKind::NotFound,
                    ..
                }) => done(run, Outcome::Done, None),
                Err(e) => failed(run, e),
            },

            (Stage::Create { .. }, Ok(Reply::Eni(eni))) => match self.reserve_device() {
                Some(device) => {
                    let request = self.attach_request(&eni.id, device);
                    (
                        Some(Stage::Attach {
                            eni,
                            device,
                            tries: 1,
                        }),
                        Step::Call(request),
                    )
                }
                None => {
                    let error = CloudError {
                        kind: ErrorKind::AttachmentLimitExceeded,
                        operation: "AttachNetworkInterface",
                        code: "NoFreeDeviceIndex".into(),
                        message: format!("all {} device indexes are in use", self.facts.max_enis)
                            .into(),
                    };
                    self.undo(eni.id, None, error, true)
                }
            },
            (Stage::Create { subnets, index }, Err(e)) => {
                // Another subnet of the AZ may still have room.
                let full = matches!(
                    e.kind,
                    ErrorKind::InsufficientAddresses | ErrorKind::InsufficientCidr
                );
                if full && index + 1 < subnets.len() {
                    let request = self.create_request(
                        &run.action,
                        &subnets[index + 1],
                        index + 1,
                        &run.token,
                        now,
                    );
                    return (
                        Some(Stage::Create {
                            subnets,
                            index: index + 1,
                        }),
                        Step::Call(request),
                    );
                }
                failed(run, e)
            }

            (Stage::Attach { eni, device, .. }, Ok(Reply::Attachment(attachment_id))) => {
                self.keep_on_termination(eni, device, attachment_id)
            }
            (Stage::Attach { eni, device, tries }, Err(e)) if e.kind == ErrorKind::Unavailable => {
                let request = Request::DescribeEni {
                    eni: eni.id.clone(),
                };
                (
                    Some(Stage::FindAttachment {
                        eni,
                        device,
                        tries,
                        error: e,
                    }),
                    Step::Call(request),
                )
            }
            (Stage::Attach { eni, device, .. }, Err(e)) => self.undo(eni.id, Some(device), e, true),
            (
                Stage::FindAttachment {
                    eni,
                    device,
                    tries,
                    error,
                },
                Ok(Reply::Enis(found)),
            ) => {
                let ours = found
                    .into_iter()
                    .find(|e| e.id == eni.id && self.attached_to_us(e))
                    .and_then(|e| e.attachment);
                match ours {
                    Some(a) => {
                        if a.device_index != device {
                            self.devices.remove(&device);
                            self.devices.insert(a.device_index);
                        }
                        self.keep_on_termination(eni, a.device_index, a.id)
                    }
                    None if tries < ATTACH_TRIES => {
                        let request = self.attach_request(&eni.id, device);
                        (
                            Some(Stage::Attach {
                                eni,
                                device,
                                tries: tries + 1,
                            }),
                            Step::Call(request),
                        )
                    }
                    None => self.undo(eni.id, Some(device), error, true),
                }
            }
            (Stage::FindAttachment { eni, device, .. }, Err(e)) => {
                self.undo(eni.id, Some(device), e, true)
            }

            (
                Stage::KeepOnTermination {
                    eni,
                    device,
                    attachment_id,
                },
                reply,
            ) => {
                if let Err(e) = reply {
                    // The ENI works; only its clean-up on termination is left to the leaked-ENI scan.
                    run.warnings.push(format!(
                        "could not set DeleteOnTermination on {}: {e}",
                        eni.id
                    ));
                }
                match self.subnet_cidrs.get(&eni.subnet_id) {
                    Some(&cidr) => self.setup_link(eni, device, attachment_id, cidr),
                    None => {
                        let request = Request::DescribeSubnets {
                            filters: vec![("subnet-id".into(), vec![eni.subnet_id.clone()])],
                        };
                        (
                            Some(Stage::SubnetCidr {
                                eni,
                                device,
                                attachment_id,
                            }),
                            Step::Call(request),
                        )
                    }
                }
            }
            (
                Stage::SubnetCidr {
                    eni,
                    device,
                    attachment_id,
                },
                reply,
            ) => {
                let cidr = match reply {
                    Ok(Reply::Subnets(found)) => found
                        .iter()
                        .find(|s| s.id == eni.subnet_id)
                        .and_then(|s| s.cidr)
                        .ok_or_else(|| {
                            node_error(
                                "DescribeSubnets",
                                "NoSubnetCidr",
                                format!("{} has no IPv4 CIDR", eni.subnet_id),
                            )
                        }),
                    Ok(other) => unreachable!("DescribeSubnets answered {other:?}"),
                    Err(e) => Err(e),
                };
                match cidr {
                    Ok(cidr) => {
                        self.subnet_cidrs.insert(eni.subnet_id.clone(), cidr);
                        self.setup_link(eni, device, attachment_id, cidr)
                    }
                    Err(e) => self.undo_attached(eni.id, device, attachment_id, e),
                }
            }
            (
                Stage::SetupLink {
                    eni,
                    device,
                    attachment_id,
                    link,
                },
                reply,
            ) => match reply {
                Ok(_) => {
                    let info = EniInfo {
                        id: eni.id.clone(),
                        device_number: device,
                        subnet_id: eni.subnet_id.clone(),
                        subnet_cidr: link.subnet,
                        primary_ip: link.primary_ip,
                        is_primary: false,
                        is_trunk: matches!(run.action, Action::CreateTrunk { .. }),
                        is_efa: false,
                        excluded: false,
                    };
                    self.attached.insert(
                        eni.id.clone(),
                        Attached {
                            link,
                            attachment_id,
                            device,
                        },
                    );
                    done(
                        run,
                        Outcome::EniCreated {
                            blocks: blocks_of(&eni),
                            eni: info,
                        },
                        None,
                    )
                }
                Err(e) => {
                    let error = node_error(
                        "AttachNetworkInterface",
                        "EniLinkSetup",
                        format!("the new ENI's link could not be configured: {}", e.message),
                    );
                    self.undo_attached(eni.id, device, attachment_id, error)
                }
            },

            (
                Stage::Undo {
                    eni_id,
                    device,
                    error,
                    detached,
                },
                reply,
            ) => {
                if !detached {
                    // Detached or not, deleting is next: a delete of an attached ENI fails InUse
                    // and is retried until the detach is through.
                    return (
                        Some(Stage::Undo {
                            eni_id: eni_id.clone(),
                            device,
                            error,
                            detached: true,
                        }),
                        Step::After(DETACH_WAIT, Request::Delete { eni: eni_id }),
                    );
                }
                if let Some(device) = device {
                    self.devices.remove(&device);
                }
                if let Err(e) = reply {
                    if e.kind != ErrorKind::NotFound {
                        run.warnings.push(format!(
                            "could not delete {eni_id}; the leaked-ENI scan will collect it: {e}"
                        ));
                    }
                }
                failed(run, error)
            }

            (Stage::FreeLookup, Ok(Reply::Enis(found))) => {
                let eni_id = run.action.eni().unwrap_or_default().to_string();
                match found
                    .into_iter()
                    .find(|e| e.id == eni_id)
                    .and_then(|e| e.attachment)
                {
                    Some(a) => (
                        Some(Stage::FreeDetach),
                        Step::Call(Request::Detach {
                            attachment_id: a.id,
                        }),
                    ),
                    None => (
                        Some(Stage::FreeDelete),
                        Step::Call(Request::Delete { eni: eni_id }),
                    ),
                }
            }
            (Stage::FreeLookup, Err(e)) if e.kind == ErrorKind::NotFound => {
                done(run, Outcome::Done, None)
            }
            (Stage::FreeLookup, Err(e)) => failed(run, e),
            (Stage::FreeTeardown { attachment_id }, reply) => {
                if let Err(e) = reply {
                    run.warnings.push(format!("ENI link teardown: {e}"));
                }
                (
                    Some(Stage::FreeDetach),
                    Step::Call(Request::Detach { attachment_id }),
                )
            }
            (Stage::FreeDetach, reply) => match reply {
                // Detached already (a repeat after a lost reply, or by someone else): delete it.
                Ok(_)
                | Err(CloudError {
                    kind: ErrorKind::NotFound,
                    ..
                }) => (
                    Some(Stage::FreeDelete),
                    Step::After(
                        DETACH_WAIT,
                        Request::Delete {
                            eni: run.action.eni().unwrap_or_default().to_string(),
                        },
                    ),
                ),
                Err(e) => failed(run, e),
            },
            (Stage::FreeDelete, reply) => match reply {
                Ok(_)
                | Err(CloudError {
                    kind: ErrorKind::NotFound,
                    ..
                }) => {
                    if let Some(a) = self.attached.remove(run.action.eni().unwrap_or_default()) {
                        self.devices.remove(&a.device);
                    }
                    done(run, Outcome::Done, None)
                }
                Err(e) => {
                    run.warnings.push(format!(
                        "ENI still attached; the leaked-ENI scan will collect it: {e}"
                    ));
                    failed(run, e)
                }
            },

            (stage, Ok(reply)) => unreachable!("reply {reply:?} to {stage:?}"),
        }
    }

    fn attach_request(&self, eni_id: &str, device: u32) -> Request {
        Request::Attach {
            eni: eni_id.to_string(),
            instance_id: self.facts.instance_id.clone(),
            device,
            network_card: 0,
        }
    }

    fn keep_on_termination(
        &mut self,
        eni: Box<Eni>,
        device: u32,
        attachment_id: String,
    ) -> (Option<Stage>, Step) {
        let request = Request::KeepOnTermination {
            eni: eni.id.clone(),
            attachment_id: attachment_id.clone(),
        };
        (
            Some(Stage::KeepOnTermination {
                eni,
                device,
                attachment_id,
            }),
            Step::Call(request),
        )
    }

    fn setup_link(
        &mut self,
        eni: Box<Eni>,
        device: u32,
        attachment_id: String,
        cidr: Ipv4Cidr,
    ) -> (Option<Stage>, Step) {
        let (Some(mac), Some(primary_ip)) = (parse_mac(&eni.mac), eni.primary_ip) else {
            let error = node_error(
                "CreateNetworkInterface",
                "UnusableEni",
                format!(
                    "{} has MAC {:?} and primary address {:?}",
                    eni.id, eni.mac, eni.primary_ip
                ),
            );
            return self.undo_attached(eni.id, device, attachment_id, error);
        };
        let link = LinkSpec {
            mac,
            primary_ip,
            subnet: cidr,
            route_table: route_table(device, 0),
            mtu: self.facts.eni_mtu,
        };
        (
            Some(Stage::SetupLink {
                eni,
                device,
                attachment_id,
                link: link.clone(),
            }),
            Step::Call(Request::SetupLink(link)),
        )
    }

    /// A new ENI that is not attached: delete it, then fail with `error`.
    fn undo(
        &mut self,
        eni_id: String,
        device: Option<u32>,
        error: CloudError,
        detached: bool,
    ) -> (Option<Stage>, Step) {
        let request = Request::Delete {
            eni: eni_id.clone(),
        };
        (
            Some(Stage::Undo {
                eni_id,
                device,
                error,
                detached,
            }),
            Step::Call(request),
        )
    }

    /// A new ENI that is attached: detach, delete, fail with `error`.
    fn undo_attached(
        &mut self,
        eni_id: String,
        device: u32,
        attachment_id: String,
        error: CloudError,
    ) -> (Option<Stage>, Step) {
        (
            Some(Stage::Undo {
                eni_id,
                device: Some(device),
                error,
                detached: false,
            }),
            Step::Call(Request::Detach { attachment_id }),
        )
    }

    /// An ENI detached or deleted behind our back: its device index is free again and its link goes.
    fn forget(&mut self, run: &mut Run) -> (Option<Stage>, Step) {
        match self.attached.remove(run.action.eni().unwrap_or_default()) {
            Some(gone) => {
                self.devices.remove(&gone.device);
                (
                    Some(Stage::Forget),
                    Step::Call(Request::TeardownLink(gone.link)),
                )
            }
            None => (None, run.finish(Outcome::Synced(None), None)),
        }
    }
}

impl Run {
    pub fn action(&self) -> &Action {
        &self.action
    }

    /// The first request, to make when the run starts.
    pub fn first(&self) -> Next<'_> {
        Next::Call(&self.request)
    }

    /// The request the run is at: the one to repeat when a retry's wait is over.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// The wait before the request is repeated, counting the try. This is all a throttled reply
    /// does to a run ([`Choreography::step`] reads neither the clock nor the node's state for it),
    /// so a caller that knows its request was throttled may take the wait at once.
    pub fn backoff(&mut self) -> Duration {
        let wait = BACKOFF.delay(
            self.retries,
            unit_from(self.seed ^ u64::from(self.retries).rotate_left(32)),
        );
        self.retries += 1;
        wait
    }

    /// Throttled (it did not happen), or a failure where repeating is safe: a lost reply to a
    /// creation (its token returns the ENI it made), a read, a detach or delete (a repeat of what is
    /// done says so), or a delete of an ENI still detaching. Assigns and unassigns are not repeated:
    /// the pool reads the ENI back instead.
    fn retryable(&self, e: &CloudError) -> bool {
        match e.kind {
            ErrorKind::Throttled => true,
            ErrorKind::Unavailable => {
                !matches!(
                    self.stage,
                    Stage::Assign | Stage::Release | Stage::Attach { .. } | Stage::SetupLink { .. }
                ) && !self.request.is_host()
            }
            ErrorKind::InUse => matches!(self.request, Request::Delete { .. }),
            _ => false,
        }
    }

    fn finish(&mut self, outcome: Outcome, error: Option<CloudError>) -> Step {
        Step::Done(Finished {
            outcome,
            error,
            warnings: std::mem::take(&mut self.warnings),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ec2::EniAttachment;
    use crate::subnets::ROLE_TAG;

    const NOW: Time = Time::from_secs(1_709_251_198);

    fn facts() -> NodeFacts {
        NodeFacts {
            instance_id: "i-1".into(),
            availability_zone: "az-a".into(),
            vpc_id: "vpc-1".into(),
            cluster_name: Some("prod".into()),
            extra_tags: BTreeMap::from([("team".into(), "net".into())]),
            eni_mtu: 9001,
            max_enis: 4,
        }
    }

    fn error(kind: ErrorKind, code: &'static str) -> CloudError {
        CloudError {
            kind,
            operation: "X",
            code: code.into(),
            message: "".into(),
        }
    }

    fn new_eni(id: &str, subnet: &str) -> Eni {
        Eni {
            id: id.into(),
            mac: "02:00:00:00:00:07".into(),
            subnet_id: subnet.into(),
            primary_ip: Some(Ipv4Addr::new(10, 0, 1, 7)),
            secondary_ips: vec![Ipv4Addr::new(10, 0, 1, 8)],
            ..Eni::default()
        }
    }

    fn attached(mut eni: Eni, device: u32, status: &str) -> Eni {
        eni.attachment = Some(EniAttachment {
            id: format!("attach-{}", eni.id),
            instance_id: "i-1".into(),
            device_index: device,
            network_card: 0,
            status: status.into(),
            delete_on_termination: true,
        });
        eni
    }

    fn subnet(id: &str, free: u32, tags: &[(&str, &str)]) -> SubnetInfo {
        SubnetInfo {
            id: id.into(),
            availability_zone: "az-a".into(),
            cidr: Some(format!("10.0.{}.0/24", free % 250).parse().unwrap()),
            ipv6_cidr: None,
            free_addresses: free,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn create(subnet: SubnetTarget) -> Action {
        Action::CreateEni {
            subnet,
            security_groups: vec!["sg-1".into()],
            kind: AddressKind::Ip,
            count: 1,
        }
    }

    fn discover() -> Action {
        create(SubnetTarget::Discover {
            primary: "subnet-primary".into(),
        })
    }

    /// Runs `action` to its end, answering each request with `answer`; returns what was asked (waits
    /// included) and how it ended.
    fn drive(
        ch: &mut Choreography,
        action: Action,
        mut answer: impl FnMut(&Request) -> Result<Reply, CloudError>,
    ) -> (Vec<(Option<Duration>, Request)>, Finished) {
        let mut run = ch.start(action, 7, "tok".into(), NOW);
        let mut next = run.first();
        let mut asked = Vec::new();
        for _ in 0..200 {
            let reply = match next {
                Next::Done(finished) => return (asked, finished),
                Next::Call(r) => {
                    asked.push((None, r.clone()));
                    answer(r)
                }
                Next::After(wait, r) => {
                    asked.push((Some(wait), r.clone()));
                    answer(r)
                }
            };
            next = ch.step(&mut run, reply, NOW);
        }
        panic!("no end after 200 requests: {asked:?}");
    }

    fn ops(asked: &[(Option<Duration>, Request)]) -> Vec<&'static str> {
        asked.iter().map(|(_, r)| r.operation()).collect()
    }

    /// EC2 as it should be: everything works.
    fn happy(request: &Request) -> Result<Reply, CloudError> {
        Ok(match request {
            Request::DescribeSubnets { .. } => Reply::Subnets(vec![
                subnet("subnet-primary", 10, &[]),
                subnet("subnet-pods", 200, &[(ROLE_TAG, "1")]),
            ]),
            Request::Create(c) => Reply::Eni(Box::new(new_eni("eni-new", &c.subnet_id))),
            Request::Attach { eni, .. } => Reply::Attachment(format!("attach-{eni}")),
            Request::AssignIps { count, .. } => Reply::Addresses(
                (0..*count)
                    .map(|i| Ipv4Cidr::host(Ipv4Addr::new(10, 0, 1, 20 + i as u8)))
                    .collect(),
            ),
            _ => Reply::Done,
        })
    }

    #[test]
    fn a_new_eni_is_created_in_the_best_subnet_tagged_attached_kept_and_linked() {
        let mut ch = Choreography::new(facts());
        ch.avoid_device(0);
        let (asked, finished) = drive(&mut ch, discover(), happy);
        assert_eq!(
            ops(&asked),
            [
                "DescribeSubnets",
                "CreateNetworkInterface",
                "AttachNetworkInterface",
                "ModifyNetworkInterfaceAttribute",
                "SetupEniLink"
            ]
        );
        let Request::Create(c) = &asked[1].1 else {
            panic!()
        };
        assert_eq!(c.subnet_id, "subnet-pods", "most free addresses first");
        assert_eq!(c.description, "aws-K8S-i-1");
        assert_eq!(c.client_token, "tok-0");
        let tags: BTreeMap<_, _> = c.tags.iter().cloned().collect();
        assert_eq!(tags[INSTANCE_TAG], "i-1");
        assert_eq!(tags[CREATED_AT_TAG], "2024-02-29T23:59:58Z");
        assert_eq!(tags[CLUSTER_TAG], "prod");
        assert_eq!(tags["team"], "net");
        let Request::SetupLink(link) = &asked[4].1 else {
            panic!()
        };
        assert_eq!(link.route_table, route_table(1, 0));
        assert_eq!(link.mtu, 9001);
        assert_eq!(link.subnet, subnet("subnet-pods", 200, &[]).cidr.unwrap());
        match finished.outcome {
            Outcome::EniCreated { eni, blocks } => {
                assert_eq!(eni.device_number, 1);
                assert_eq!(blocks, vec![Ipv4Cidr::host(Ipv4Addr::new(10, 0, 1, 8))]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ch.link_of("eni-new").as_ref(), Some(link));
        let (asked, _) = drive(&mut ch, discover(), happy);
        assert!(
            matches!(asked[2].1, Request::Attach { device: 2, .. }),
            "the next ENI takes the next device index: {asked:?}"
        );
    }

    #[test]
    fn a_full_subnet_sends_the_create_to_the_next_with_its_own_token() {
        let mut ch = Choreography::new(facts());
        let (asked, finished) = drive(&mut ch, discover(), |r| match r {
            Request::Create(c) if c.subnet_id == "subnet-pods" => Err(error(
                ErrorKind::InsufficientAddresses,
                "InsufficientFreeAddressesInSubnet",
            )),
            _ => happy(r),
        });
        let creates: Vec<_> = asked
            .iter()
            .filter_map(|(_, r)| match r {
                Request::Create(c) => Some((c.subnet_id.as_str(), c.client_token.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(
            creates,
            [("subnet-pods", "tok-0"), ("subnet-primary", "tok-1")]
        );
        assert!(matches!(finished.outcome, Outcome::EniCreated { .. }));
    }

    #[test]
    fn only_excluded_subnets_fail_the_create_saying_so() {
        let mut ch = Choreography::new(facts());
        let (asked, finished) = drive(&mut ch, discover(), |r| match r {
            Request::DescribeSubnets { .. } => Ok(Reply::Subnets(vec![subnet(
                "subnet-primary",
                10,
                &[(ROLE_TAG, "0")],
            )])),
            _ => happy(r),
        });
        assert_eq!(ops(&asked), ["DescribeSubnets"]);
        assert_eq!(finished.outcome, Outcome::Failed(Failure::Other));
        assert_eq!(finished.error.unwrap().code, "NoUsableSubnet");
    }

    #[test]
    fn subnets_that_cannot_be_listed_leave_the_primary_with_a_warning() {
        let mut ch = Choreography::new(facts());
        let (asked, finished) = drive(&mut ch, discover(), |r| match r {
            Request::DescribeSubnets { filters } if filters[0].0 == "availability-zone" => {
                Err(error(ErrorKind::Unauthorized, "UnauthorizedOperation"))
            }
            Request::DescribeSubnets { .. } => {
                Ok(Reply::Subnets(vec![subnet("subnet-primary", 10, &[])]))
            }
            _ => happy(r),
        });
        let Request::Create(c) = &asked[1].1 else {
            panic!("{asked:?}")
        };
        assert_eq!(c.subnet_id, "subnet-primary");
        assert!(
            ops(&asked).contains(&"DescribeSubnets"),
            "the primary's CIDR is looked up"
        );
        assert!(matches!(finished.outcome, Outcome::EniCreated { .. }));
        assert_eq!(finished.warnings.len(), 1, "{:?}", finished.warnings);
    }

    #[test]
    fn a_lost_attach_reply_is_read_back_not_repeated() {
        let mut ch = Choreography::new(facts());
        ch.avoid_device(0);
        let (asked, finished) = drive(&mut ch, discover(), |r| match r {
            Request::Attach { .. } => Err(error(ErrorKind::Unavailable, "RequestTimeout")),
            Request::DescribeEni { eni } => Ok(Reply::Enis(vec![attached(
                new_eni(eni, "subnet-pods"),
                1,
                "attaching",
            )])),
            _ => happy(r),
        });
        assert_eq!(
            ops(&asked)
                .iter()
                .filter(|o| **o == "AttachNetworkInterface")
                .count(),
            1
        );
        assert!(matches!(
            asked[4].1,
            Request::KeepOnTermination { ref attachment_id, .. } if attachment_id == "attach-eni-new"
        ));
        assert!(matches!(finished.outcome, Outcome::EniCreated { .. }));
    }

    #[test]
    fn attaches_that_never_land_give_the_eni_back() {
        let mut ch = Choreography::new(facts());
        let (asked, finished) = drive(&mut ch, discover(), |r| match r {
            Request::Attach { .. } => Err(error(ErrorKind::Unavailable, "RequestTimeout")),
            Request::DescribeEni { eni } => Ok(Reply::Enis(vec![new_eni(eni, "subnet-pods")])),
            _ => happy(r),
        });
        let attaches = ops(&asked)
            .iter()
            .filter(|o| **o == "AttachNetworkInterface")
            .count();
        assert_eq!(attaches as u32, ATTACH_TRIES);
        assert_eq!(
            asked.last().unwrap().1.operation(),
            "DeleteNetworkInterface"
        );
        assert_eq!(finished.outcome, Outcome::Failed(Failure::Other));
        assert!(finished.outcome_unknown());
    }

    #[test]
    fn a_link_that_cannot_be_set_up_detaches_deletes_and_frees_the_device() {
        let mut ch = Choreography::new(facts());
        ch.avoid_device(0);
        let (asked, finished) = drive(&mut ch, discover(), |r| match r {
            Request::SetupLink(_) => Err(error(ErrorKind::Other, "NodeSetup")),
            _ => happy(r),
        });
        let tail: Vec<_> = asked.iter().rev().take(2).rev().cloned().collect();
        assert_eq!(
            tail,
            [
                (
                    None,
                    Request::Detach {
                        attachment_id: "attach-eni-new".into()
                    }
                ),
                (
                    Some(DETACH_WAIT),
                    Request::Delete {
                        eni: "eni-new".into()
                    }
                ),
            ]
        );
        assert_eq!(finished.outcome, Outcome::Failed(Failure::Other));
        assert_eq!(finished.error.unwrap().code, "EniLinkSetup");
        assert_eq!(ch.link_of("eni-new"), None);
        let (asked, _) = drive(&mut ch, discover(), happy);
        assert!(matches!(asked[2].1, Request::Attach { device: 1, .. }));
    }

    #[test]
    fn no_free_device_index_deletes_the_new_eni() {
        let mut ch = Choreography::new(NodeFacts {
            max_enis: 2,
            ..facts()
        });
        ch.avoid_device(1);
        let (asked, finished) = drive(&mut ch, discover(), happy);
        assert_eq!(
            ops(&asked),
            [
                "DescribeSubnets",
                "CreateNetworkInterface",
                "DeleteNetworkInterface"
            ]
        );
        assert_eq!(
            finished.outcome,
            Outcome::Failed(Failure::AttachmentLimitExceeded)
        );
    }

    #[test]
    fn throttling_is_waited_out_with_growing_jittered_backoff() {
        let mut ch = Choreography::new(facts());
        let mut throttles = 20;
        let action = Action::AssignAddresses {
            eni: "eni-1".into(),
            kind: AddressKind::Ip,
            count: 2,
        };
        let (asked, finished) = drive(&mut ch, action, |r| {
            if throttles > 0 {
                throttles -= 1;
                return Err(error(ErrorKind::Throttled, "RequestLimitExceeded"));
            }
            happy(r)
        });
        assert_eq!(
            asked.len(),
            21,
            "throttled calls are retried past MAX_RETRIES"
        );
        for (retry, (wait, request)) in asked.iter().skip(1).enumerate() {
            let wait = wait.expect("a retry waits");
            let ceiling = BACKOFF.ceiling(retry as u32);
            assert!(wait >= ceiling / 2 && wait <= ceiling, "{retry}: {wait:?}");
            assert_eq!(*request, asked[0].1, "the same call again");
        }
        assert!(matches!(finished.outcome, Outcome::Assigned(ref b) if b.len() == 2));
    }

    #[test]
    fn an_assign_whose_reply_is_lost_is_not_repeated_but_read_back() {
        let mut ch = Choreography::new(facts());
        let action = Action::AssignAddresses {
            eni: "eni-1".into(),
            kind: AddressKind::Prefix,
            count: 1,
        };
        let (asked, finished) = drive(&mut ch, action, |_| {
            Err(error(ErrorKind::Unavailable, "RequestTimeout"))
        });
        assert_eq!(asked.len(), 1);
        assert!(finished.outcome_unknown());
        assert_eq!(finished.outcome, Outcome::Failed(Failure::Other));
    }

    #[test]
    fn freeing_an_eni_tears_its_link_down_detaches_waits_and_deletes() {
        let mut ch = Choreography::new(facts());
        let eni = attached(new_eni("eni-2", "subnet-pods"), 2, "attached");
        ch.adopt(&eni, "10.0.1.0/24".parse().unwrap());
        let mut in_use = 2;
        let (asked, finished) = drive(
            &mut ch,
            Action::FreeEni {
                eni: "eni-2".into(),
            },
            |r| match r {
                Request::Delete { .. } if in_use > 0 => {
                    in_use -= 1;
                    Err(error(ErrorKind::InUse, "InvalidNetworkInterface.InUse"))
                }
                _ => happy(r),
            },
        );
        assert_eq!(
            ops(&asked),
            [
                "TeardownEniLink",
                "DetachNetworkInterface",
                "DeleteNetworkInterface",
                "DeleteNetworkInterface",
                "DeleteNetworkInterface"
            ]
        );
        assert_eq!(asked[2].0, Some(DETACH_WAIT));
        assert_eq!(finished.outcome, Outcome::Done);
        assert_eq!(ch.link_of("eni-2"), None);
        ch.avoid_device(0);
        ch.avoid_device(1);
        let (asked, _) = drive(&mut ch, discover(), happy);
        assert!(
            matches!(asked[2].1, Request::Attach { device: 2, .. }),
            "device 2 is free again"
        );
    }

    #[test]
    fn freeing_an_eni_we_did_not_record_finds_its_attachment_first() {
        let mut ch = Choreography::new(facts());
        let free = || Action::FreeEni {
            eni: "eni-9".into(),
        };
        let (asked, finished) = drive(&mut ch, free(), |r| match r {
            Request::DescribeEni { eni } => Ok(Reply::Enis(vec![attached(
                new_eni(eni, "s"),
                3,
                "attached",
            )])),
            _ => happy(r),
        });
        assert_eq!(
            ops(&asked),
            [
                "DescribeNetworkInterfaces",
                "DetachNetworkInterface",
                "DeleteNetworkInterface"
            ]
        );
        assert_eq!(finished.outcome, Outcome::Done);
        let (asked, finished) = drive(&mut ch, free(), |_| {
            Err(error(
                ErrorKind::NotFound,
                "InvalidNetworkInterfaceID.NotFound",
            ))
        });
        assert_eq!(asked.len(), 1);
        assert_eq!(finished.outcome, Outcome::Done, "gone already is done");
    }

    #[test]
    fn an_eni_that_left_us_is_forgotten_with_its_link_and_device() {
        let mut ch = Choreography::new(facts());
        let eni = attached(new_eni("eni-2", "subnet-pods"), 1, "attached");
        ch.adopt(&eni, "10.0.1.0/24".parse().unwrap());
        let resync = || Action::ResyncEni {
            eni: "eni-2".into(),
        };
        let (asked, finished) = drive(&mut ch, resync(), |_| {
            Ok(Reply::Enis(vec![attached(
                new_eni("eni-2", "subnet-pods"),
                1,
                "attached",
            )]))
        });
        assert_eq!(asked.len(), 1);
        assert!(matches!(finished.outcome, Outcome::Synced(Some(_))));
        let (asked, finished) = drive(&mut ch, resync(), |r| match r {
            Request::DescribeEni { eni } => Ok(Reply::Enis(vec![attached(
                new_eni(eni, "subnet-pods"),
                1,
                "detaching",
            )])),
            _ => happy(r),
        });
        assert_eq!(
            ops(&asked),
            ["DescribeNetworkInterfaces", "TeardownEniLink"]
        );
        assert_eq!(finished.outcome, Outcome::Synced(None));
        assert_eq!(ch.link_of("eni-2"), None);
        ch.avoid_device(0);
        let (asked, _) = drive(&mut ch, discover(), happy);
        assert!(matches!(asked[2].1, Request::Attach { device: 1, .. }));
    }

    #[test]
    fn settling_an_unknown_outcome_marks_the_eni_for_a_read_back() {
        use crate::PoolSettings;
        let settings = PoolSettings::default();
        let mut pool = Pool::new(crate::pool::tests::node(), &settings);
        pool.add_eni(
            EniInfo {
                id: "eni-1".into(),
                device_number: 0,
                subnet_id: "s".into(),
                subnet_cidr: "10.0.0.0/24".parse().unwrap(),
                primary_ip: Ipv4Addr::new(10, 0, 0, 5),
                is_primary: true,
                is_trunk: false,
                is_efa: false,
                excluded: false,
            },
            NOW,
        );
        let action = Action::AssignAddresses {
            eni: "eni-1".into(),
            kind: AddressKind::Ip,
            count: 1,
        };
        pool.begin(&action);
        let mut memory = PolicyMemory::default();
        memory.began(&action, NOW);
        let finished = Finished {
            outcome: Outcome::Failed(Failure::Other),
            error: Some(error(ErrorKind::Unavailable, "RequestTimeout")),
            warnings: Vec::new(),
        };
        settle(&mut pool, &mut memory, &action, finished, NOW);
        let d = crate::decide(&pool, &memory, &settings, NOW, &crate::Demand::default());
        assert!(
            d.actions.contains(&Action::ResyncEni {
                eni: "eni-1".into()
            }),
            "{:?}",
            d.actions
        );
    }

    fn branch_action() -> Action {
        Action::CreateBranch {
            groups: crate::branches::GroupSet::new(["sg-db", "sg-app", "sg-db"]),
            vlan: 7,
            trunk: "eni-trunk".into(),
            subnet_id: "subnet-primary".into(),
            subnet: "10.0.1.0/24".parse().unwrap(),
        }
    }

    #[test]
    fn a_branch_is_created_with_its_groups_and_associated_under_its_vlan() {
        let mut ch = Choreography::new(facts());
        let (asked, finished) = drive(&mut ch, branch_action(), |r| match r {
            Request::Associate { .. } => Ok(Reply::Attachment("trunk-assoc-1".into())),
            other => happy(other),
        });
        assert_eq!(
            ops(&asked),
            ["CreateNetworkInterface", "AssociateTrunkInterface"]
        );
        let Request::Create(c) = &asked[0].1 else {
            panic!("{asked:?}")
        };
        assert_eq!(c.interface_type, Some("branch"));
        assert_eq!(c.security_groups, ["sg-app", "sg-db"]);
        assert_eq!((c.secondary_ips, c.prefixes), (0, 0));
        assert!(c.tags.iter().any(|(k, v)| k == INSTANCE_TAG && v == "i-1"));
        assert_eq!(
            asked[1].1,
            Request::Associate {
                branch: "eni-new".into(),
                trunk: "eni-trunk".into(),
                vlan: 7,
                client_token: "tok-associate".into(),
            }
        );
        let Outcome::BranchCreated(b) = finished.outcome else {
            panic!("{finished:?}")
        };
        assert_eq!(
            (b.eni_id.as_str(), b.vlan, b.association_id.as_str(), b.ip),
            ("eni-new", 7, "trunk-assoc-1", Ipv4Addr::new(10, 0, 1, 7))
        );
    }

    #[test]
    fn a_branch_that_cannot_be_associated_is_deleted_and_the_action_fails() {
        let mut ch = Choreography::new(facts());
        let (asked, finished) = drive(&mut ch, branch_action(), |r| match r {
            Request::Associate { .. } => Err(error(ErrorKind::Other, "InvalidParameterValue")),
            other => happy(other),
        });
        assert_eq!(
            ops(&asked),
            [
                "CreateNetworkInterface",
                "AssociateTrunkInterface",
                "DeleteNetworkInterface"
            ]
        );
        assert_eq!(finished.outcome, Outcome::Failed(Failure::Other));
        assert_eq!(finished.error.unwrap().code, "InvalidParameterValue");
    }

    #[test]
    fn a_lost_association_reply_is_asked_again_with_the_same_token() {
        let mut ch = Choreography::new(facts());
        let mut tokens = Vec::new();
        let (_, finished) = drive(&mut ch, branch_action(), |r| match r {
            Request::Associate { client_token, .. } => {
                tokens.push(client_token.clone());
                if tokens.len() == 1 {
                    Err(error(ErrorKind::Unavailable, "RequestTimeout"))
                } else {
                    Ok(Reply::Attachment("trunk-assoc-1".into()))
                }
            }
            other => happy(other),
        });
        assert!(matches!(finished.outcome, Outcome::BranchCreated(_)));
        assert_eq!(tokens, ["tok-associate", "tok-associate"]);
    }

    #[test]
    fn a_branch_is_freed_by_disassociating_then_deleting_it_and_gone_is_done() {
        let branch = crate::branches::Branch {
            eni_id: "eni-b".into(),
            mac: "02:00:00:00:00:09".into(),
            ip: Ipv4Addr::new(10, 0, 1, 9),
            subnet: "10.0.1.0/24".parse().unwrap(),
            vlan: 3,
            association_id: "trunk-assoc-3".into(),
            groups: crate::branches::GroupSet::new(["sg-1"]),
        };
        let free = Action::FreeBranch {
            branch: branch.clone(),
        };
        let mut ch = Choreography::new(facts());
        let (asked, finished) = drive(&mut ch, free.clone(), happy);
        assert_eq!(
            asked.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
            [
                Request::Disassociate {
                    association_id: "trunk-assoc-3".into()
                },
                Request::Delete {
                    eni: "eni-b".into()
                }
            ]
        );
        assert_eq!(finished.outcome, Outcome::Done);
        // Already disassociated and deleted (a repeat after a restart): done all the same.
        let (_, finished) = drive(&mut ch, free, |_| {
            Err(error(ErrorKind::NotFound, "InvalidAssociationID.NotFound"))
        });
        assert_eq!(finished.outcome, Outcome::Done);
    }

    #[test]
    fn a_trunk_is_created_without_addresses_attached_kept_and_reported_as_a_trunk() {
        let mut ch = Choreography::new(facts());
        ch.avoid_device(0);
        let trunk = Action::CreateTrunk {
            subnet: "subnet-primary".into(),
            security_groups: vec!["sg-node".into()],
        };
        let (asked, finished) = drive(&mut ch, trunk, |r| match r {
            Request::Create(c) => Ok(Reply::Eni(Box::new(Eni {
                secondary_ips: vec![],
                ..new_eni("eni-trunk", &c.subnet_id)
            }))),
            other => happy(other),
        });
        let Request::Create(c) = &asked[0].1 else {
            panic!("{asked:?}")
        };
        assert_eq!(c.interface_type, Some("trunk"));
        assert_eq!((c.secondary_ips, c.prefixes), (0, 0));
        assert!(ops(&asked).contains(&"AttachNetworkInterface"));
        let Outcome::EniCreated { eni, blocks } = finished.outcome else {
            panic!("{finished:?}")
        };
        assert!(eni.is_trunk && blocks.is_empty(), "{eni:?}");
        assert_eq!(eni.device_number, 1);
    }
}
