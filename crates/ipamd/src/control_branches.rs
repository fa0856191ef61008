//! The control loop's part in security groups for pods where the node makes its branches
//! (`POD_ENI_MANAGER=node`): `ipam::branches` decides, the executor runs its actions through the
//! one choreography, and the loop answers a pod with groups from a warm branch or once one is made.
//! Branches are saved beside the checkpoint before an ADD or DEL is answered, as addresses are.

use super::{key_of, Control, Event, Outgoing, ADD_WAIT};
use ipam::branches::{Ask, Branch, Branches, GroupSet, SavedBranch};
use ipam::{Action, IpamKey, PodMeta};
use proto::{Allocation, Attachment, BranchAllocation, ErrorKind, PodRef, Reply};
use std::collections::HashMap;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The node's branches and the pods waiting for one.
pub struct NodeBranches {
    engine: Branches,
    /// The pod of each branch given, for the file and for pods that vanish.
    pods: HashMap<IpamKey, PodMeta>,
    waiting: Vec<Waiter>,
    /// Pods of branches the API server did not list, since when.
    absent_since: HashMap<IpamKey, ipam::Time>,
    dirty: bool,
}

struct Waiter {
    key: IpamKey,
    meta: PodMeta,
    reply: oneshot::Sender<Reply>,
    since: Instant,
}

impl NodeBranches {
    /// `engine` with what start-up restored; `pods` names the pod of each assigned branch.
    pub fn new(engine: Branches, pods: HashMap<IpamKey, PodMeta>) -> NodeBranches {
        NodeBranches {
            engine,
            pods,
            waiting: Vec::new(),
            absent_since: HashMap::new(),
            dirty: false,
        }
    }

    pub fn engine(&self) -> &Branches {
        &self.engine
    }

    /// Every pod's branch, with the pod.
    pub fn given(&self) -> impl Iterator<Item = (&IpamKey, Option<&PodMeta>, &Branch)> {
        self.engine
            .assignments()
            .map(|(key, b)| (key, self.pods.get(key), b))
    }

    /// Every pod's branch with its pod, and the warm ones without, as saved.
    fn saved(&self) -> Vec<SavedBranch> {
        let mut saved: Vec<SavedBranch> = self
            .engine
            .assignments()
            .map(|(key, b)| SavedBranch::new(b, self.pods.get(key).map(|m| (key, m))))
            .chain(
                self.engine
                    .warm_branches()
                    .map(|b| SavedBranch::new(b, None)),
            )
            .collect();
        saved.sort_by_key(|s| s.vlan);
        saved
    }

    /// The earliest deadline of a pod waiting for a branch.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.waiting.iter().map(|w| w.since + ADD_WAIT).min()
    }

    pub(super) fn refuse_waiting(&mut self, message: &str) {
        for w in self.waiting.drain(..) {
            self.engine.cancel(&w.key);
            let _ = w.reply.send(Reply::Error {
                kind: ErrorKind::Unavailable,
                message: message.into(),
            });
        }
    }
}

/// A pod to annotate with its branch (`vpc.amazonaws.com/pod-eni`), for the task that talks to the
/// API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchAnnotation {
    pub namespace: String,
    pub name: String,
    pub value: String,
}

/// A pod of this node that the VPC resource controller gave a branch (EKS), as NetworkPolicy sees
/// it.
pub struct ControllerPod {
    namespace: String,
    name: String,
    ip: std::net::IpAddr,
    /// When its ADD was answered: the pods watch may not show it yet.
    since: ipam::Time,
}

/// Such a pod's name for NetworkPolicy, the same across the daemon's restarts (its sandbox's is not
/// known after one).
fn controller_key(namespace: &str, name: &str) -> IpamKey {
    IpamKey::new("controller-branch", &format!("{namespace}/{name}"), "eth0")
}

fn superseded() -> Reply {
    Reply::Error {
        kind: ErrorKind::Unavailable,
        message: "superseded by a retry of the same ADD".into(),
    }
}

fn pod_meta(pod: PodRef) -> PodMeta {
    PodMeta {
        namespace: pod.namespace,
        name: pod.name,
        interfaces_count: 1,
    }
}

impl Control {
    /// With the node's own branches (`POD_ENI_MANAGER=node`).
    pub fn with_node_branches(mut self, branches: NodeBranches) -> Control {
        self.branches = Some(branches);
        self
    }

    pub fn node_branches(&self) -> Option<&NodeBranches> {
        self.branches.as_ref()
    }

    /// Each pod given a branch is sent to `annotator`, to be annotated with it.
    pub fn annotating_branches(
        mut self,
        annotator: tokio::sync::mpsc::UnboundedSender<BranchAnnotation>,
    ) -> Control {
        self.annotate_branches = Some(annotator);
        self
    }

    /// How the plugin wires `branch`: behind its VLAN on the trunk, whose MAC the executor has
    /// from start-up or from the trunk's creation.
    fn branch_allocation(&self, branch: &Branch) -> Result<Allocation, String> {
        let trunk = self
            .branches
            .as_ref()
            .and_then(|b| b.engine.trunk())
            .ok_or("the node has no trunk ENI")?;
        let trunk_mac = self
            .executor
            .mac_of(&trunk.eni_id)
            .ok_or_else(|| format!("the trunk ENI {}'s link is not known", trunk.eni_id))?;
        let mac = crate::executor::parse_mac(&branch.mac)
            .ok_or_else(|| format!("branch {}: MAC {:?}", branch.eni_id, branch.mac))?;
        Ok(Allocation {
            address: branch.ip.into(),
            device_number: 0,
            route_table: datapath::branch::route_table(branch.vlan),
            egress_v4: None,
            branch: Some(BranchAllocation {
                vlan: branch.vlan,
                mac,
                subnet: branch.subnet.addr(),
                subnet_len: branch.subnet.prefix_len(),
                trunk_mac,
            }),
        })
    }

    /// Answers with the branch `key` was just given, once the branches are saved.
    fn answer_with_branch(&mut self, key: IpamKey, reply: oneshot::Sender<Reply>, branch: &Branch) {
        let message = self.branch_reply(branch);
        self.outbox.push(Outgoing {
            reply,
            message,
            assigned: None,
            branch: Some(key),
        });
    }

    fn branch_reply(&self, branch: &Branch) -> Reply {
        match self.branch_allocation(branch) {
            Ok(allocation) => Reply::Added { allocation },
            Err(message) => Reply::Error {
                kind: ErrorKind::Internal,
                message,
            },
        }
    }

    /// An ADD of a pod whose SecurityGroupPolicies give it `groups`: its branch, a warm one with
    /// its groups, or a place in line for one being made.
    pub(super) fn branch_add(
        &mut self,
        attachment: Attachment,
        pod: PodRef,
        groups: GroupSet,
        reply: oneshot::Sender<Reply>,
    ) {
        self.metrics.count("awscni_add_ip_req_count", &[]);
        let now = self.clock.now();
        let key = key_of(&attachment);
        // A repeated ADD of a pod that got the pool's address before a SecurityGroupPolicy
        // selected it keeps that address: one pod, one address, until its DEL.
        if let Some(a) = self.pool.assignment(&key) {
            let message = Reply::Added {
                allocation: super::allocation(a),
            };
            return self.send(reply, message);
        }
        // A retry, now with groups, of an ADD still waiting for the pool takes its place.
        if let Some(i) = self.waiting.iter().position(|w| w.key == key) {
            let old = self.waiting.remove(i).expect("index is in range");
            let _ = old.reply.send(superseded());
        }
        let draining = matches!(self.phase, super::Phase::Draining { .. });
        let Some(b) = &mut self.branches else {
            return self.send(
                reply,
                Reply::Error {
                    kind: ErrorKind::Internal,
                    message: "a branch asked of a node that does not make branches".into(),
                },
            );
        };
        if let Some(branch) = b.engine.get(&key).cloned() {
            let message = self.branch_reply(&branch);
            return self.send(reply, message);
        }
        if b.engine.settings().limit == 0 {
            let message = format!(
                "pod {}/{} has security groups (a SecurityGroupPolicy selects it) but this node's \
                 instance type {} cannot carry a trunk ENI: schedule it on a type that can",
                pod.namespace, pod.name, self.pool.node.instance_type
            );
            return self.send(
                reply,
                Reply::Error {
                    kind: ErrorKind::NoAddressAvailable,
                    message,
                },
            );
        }
        if draining {
            return self.send(
                reply,
                Reply::Error {
                    kind: ErrorKind::Unavailable,
                    message: "vpc-ipamd is stopping".into(),
                },
            );
        }
        let meta = pod_meta(pod);
        match b.engine.ask(&key, &groups, now) {
            Ask::Ready(branch) => {
                tracing::debug!(branch = %branch.eni_id, vlan = %branch.vlan, pod = %meta.name, "branch given");
                b.pods.insert(key.clone(), meta);
                b.dirty = true;
                self.answer_with_branch(key, reply, &branch);
            }
            Ask::Wait => {
                let waiter = Waiter {
                    key,
                    meta,
                    reply,
                    since: Instant::now(),
                };
                // A retried ADD takes the place of the one it retries.
                if let Some(old) = b.waiting.iter_mut().find(|w| w.key == waiter.key) {
                    let old = std::mem::replace(old, waiter);
                    let _ = old.reply.send(superseded());
                } else {
                    b.waiting.push(waiter);
                }
            }
        }
    }

    /// A retry, now without groups, of an ADD still waiting for a branch: it stops waiting (the
    /// pool's path takes its place).
    pub(super) fn supersede_branch_wait(&mut self, key: &IpamKey) {
        let Some(b) = &mut self.branches else { return };
        if let Some(i) = b.waiting.iter().position(|w| &w.key == key) {
            let old = b.waiting.swap_remove(i);
            b.engine.cancel(key);
            let _ = old.reply.send(superseded());
        }
    }

    /// A DEL of a branch pod: its branch turns warm for the next pod with its groups. None when
    /// `key` has no branch (the pool's, or nobody's).
    pub(super) fn branch_del(&mut self, key: &IpamKey) -> Option<Allocation> {
        let now = self.clock.now();
        let b = self.branches.as_mut()?;
        if let Some(i) = b.waiting.iter().position(|w| &w.key == key) {
            let w = b.waiting.swap_remove(i);
            b.engine.cancel(key);
            let _ = w.reply.send(Reply::Error {
                kind: ErrorKind::Unavailable,
                message: "the pod was deleted while it waited for its branch ENI".into(),
            });
        }
        let branch = b.engine.release(key, now)?;
        b.pods.remove(key);
        b.dirty = true;
        tracing::debug!(branch = %branch.eni_id, vlan = %branch.vlan, "branch released");
        // Its allocation as it was given, so that the plugin can unwire it; the branch is warm.
        self.branch_allocation(&branch).ok()
    }

    pub(super) fn branch_lookup(&self, key: &IpamKey) -> Option<Allocation> {
        let branch = self.branches.as_ref()?.engine.get(key)?;
        self.branch_allocation(branch).ok()
    }

    /// Answers pods whose branch came, and those that waited too long.
    pub(super) fn serve_branch_waiters(&mut self) {
        let Some(b) = &mut self.branches else {
            return;
        };
        let mut served = Vec::new();
        let mut i = 0;
        while i < b.waiting.len() {
            let w = &b.waiting[i];
            let given = b.engine.get(&w.key).cloned();
            if given.is_none() && !w.reply.is_closed() && w.since.elapsed() < ADD_WAIT {
                i += 1;
                continue;
            }
            let w = b.waiting.swap_remove(i);
            match given {
                Some(branch) => {
                    self.metrics.add_waited(w.since.elapsed());
                    b.pods.insert(w.key.clone(), w.meta);
                    b.dirty = true;
                    served.push((w.key, w.reply, branch));
                }
                None => {
                    b.engine.cancel(&w.key);
                    if !w.reply.is_closed() {
                        let message = format!(
                            "no branch ENI became available in {}s ({} pods in line, {} branches given, {} warm)",
                            ADD_WAIT.as_secs(),
                            b.engine.waiting(),
                            b.engine.assigned(),
                            b.engine.warm()
                        );
                        tracing::warn!(pod = %w.meta.name, why = %message, "ADD timed out");
                        let _ = w.reply.send(Reply::Error {
                            kind: ErrorKind::NoAddressAvailable,
                            message,
                        });
                    }
                }
            }
        }
        for (key, reply, branch) in served {
            self.answer_with_branch(key, reply, &branch);
        }
    }

    /// The branches to make and delete now, started through the executor.
    pub(super) fn plan_branches(&mut self) {
        let now = self.clock.now();
        let Some(b) = &mut self.branches else {
            return;
        };
        if b.engine.take_trunk_from(&self.pool) {
            let trunk = b.engine.trunk().map(|t| t.eni_id.as_str());
            tracing::info!(trunk = ?trunk, "branch ENIs go on this trunk");
        }
        let decision = b.engine.decide(now);
        for action in &decision.actions {
            b.engine.begin(action);
        }
        if let Some(t) = decision.wake_at {
            self.wake_at = Some(self.wake_at.map_or(t, |w| w.min(t)));
        }
        for action in decision.actions {
            self.spawn(action);
        }
    }

    pub(super) fn branch_finished(&mut self, action: &Action, outcome: ipam::action::Outcome) {
        let now = self.clock.now();
        if let Some(b) = &mut self.branches {
            b.engine.complete(action, outcome, now);
            b.dirty = true;
        }
    }

    /// Saves the branches if they changed; a failed write takes back the branches just given (they
    /// turn warm) and their ADDs fail.
    pub(super) fn save_branches(&mut self) {
        let Some(b) = &mut self.branches else {
            return;
        };
        if !b.dirty {
            return;
        }
        b.dirty = false;
        let Err(e) = self.store.save_branches(b.saved()) else {
            return;
        };
        tracing::error!(error = %e, "saving branch ENIs failed; their ADDs are refused");
        self.metrics
            .count("awscni_ipamd_error_count", &[("fn", "checkpoint")]);
        let now = self.clock.now();
        for out in &mut self.outbox {
            if let Some(key) = out.branch.take() {
                b.engine.release(&key, now);
                b.pods.remove(&key);
                out.message = Reply::Error {
                    kind: ErrorKind::Internal,
                    message: format!("the branch ENIs could not be saved: {e}"),
                };
            }
        }
        b.dirty = true;
    }

    /// Has each pod whose new branch is saved and about to be answered annotated with it.
    pub(super) fn annotate_given(&self) {
        let (Some(annotate), Some(b)) = (&self.annotate_branches, &self.branches) else {
            return;
        };
        for out in &self.outbox {
            let (Some(key), Reply::Added { .. }) = (&out.branch, &out.message) else {
                continue;
            };
            if let (Some(meta), Some(branch)) = (b.pods.get(key), b.engine.get(key)) {
                let _ = annotate.send(BranchAnnotation {
                    namespace: meta.namespace.clone(),
                    name: meta.name.clone(),
                    value: ipam::branch::pod_eni_annotation(branch),
                });
            }
        }
    }

    /// Branches of pods the API server no longer lists (for the grace period) turn warm, and
    /// their host side goes, as a DEL would have done.
    pub(super) fn release_vanished_branch_pods(
        &mut self,
        pods: &std::collections::HashSet<k8s::PodRef>,
    ) {
        let now = self.clock.now();
        let grace = self.vanished_pod_grace;
        let Some(b) = &mut self.branches else {
            return;
        };
        let mut gone = Vec::new();
        for (key, meta) in &b.pods {
            let pod = k8s::PodRef {
                namespace: meta.namespace.clone(),
                name: meta.name.clone(),
            };
            if pods.contains(&pod) {
                b.absent_since.remove(key);
                continue;
            }
            let since = *b.absent_since.entry(key.clone()).or_insert(now);
            if now.since(since) >= grace {
                gone.push(key.clone());
            }
        }
        let mut unwire = Vec::new();
        for key in gone {
            b.absent_since.remove(&key);
            let meta = b.pods.remove(&key);
            if let (Some(branch), Some(meta)) = (b.engine.release(&key, now), meta) {
                b.dirty = true;
                self.metrics
                    .count("vpccni_vanished_pod_releases_total", &[]);
                tracing::info!(branch = %branch.eni_id, pod = %format!("{}/{}", meta.namespace, meta.name), "released the branch of a pod the API server no longer has");
                unwire.push((meta, branch));
            }
        }
        self.unwire_branch_pods(unwire);
    }

    /// CNI GC: the branches of `network`'s attachments that the runtime no longer lists turn warm,
    /// and their host side goes, as a DEL would have done. Returns how many.
    pub(super) fn collect_branches(
        &mut self,
        network: &str,
        valid: &std::collections::HashSet<IpamKey>,
    ) -> u32 {
        let now = self.clock.now();
        let Some(b) = &mut self.branches else {
            return 0;
        };
        let doomed: Vec<IpamKey> = b
            .engine
            .assignments()
            .filter(|(k, _)| k.network_name == network && !valid.contains(k))
            .map(|(k, _)| k.clone())
            .collect();
        let mut unwire = Vec::new();
        for key in &doomed {
            b.absent_since.remove(key);
            let meta = b.pods.remove(key);
            if let Some(branch) = b.engine.release(key, now) {
                b.dirty = true;
                tracing::info!(branch = %branch.eni_id, ip = %branch.ip, container = %key.container_id, "collected");
                unwire.extend(meta.map(|m| (m, branch)));
            }
        }
        self.unwire_branch_pods(unwire);
        doomed.len() as u32
    }

    /// The addresses of the branches given to pods: GC keeps their host side.
    pub(super) fn branch_addresses(&self) -> Vec<std::net::IpAddr> {
        self.branches
            .iter()
            .flat_map(|b| b.engine.assignments().map(|(_, branch)| branch.ip.into()))
            .collect()
    }

    /// On EKS: the pods the controller gave a branch are told to NetworkPolicy like the pool's (their
    /// traffic crosses their host veth as any pod's), from the pods watch (the annotation; so also
    /// after a restart) and from their ADDs.
    pub fn with_controller_branches(mut self) -> Control {
        self.controller_branches = Some(HashMap::new());
        self
    }

    pub(super) fn controller_branch_added(
        &mut self,
        pod: k8s::PodRef,
        ip: std::net::IpAddr,
        reply: oneshot::Sender<Reply>,
        message: Reply,
    ) {
        let now = self.clock.now();
        let key = controller_key(&pod.namespace, &pod.name);
        let tracked = self.controller_branches.as_mut().map(|pods| {
            let entry = ControllerPod {
                namespace: pod.namespace,
                name: pod.name,
                ip,
                since: now,
            };
            pods.insert(key.clone(), entry);
        });
        self.outbox.push(Outgoing {
            reply,
            message,
            assigned: None,
            branch: tracked.map(|_| key),
        });
    }

    /// The controller's branch pods as the API server lists them: a pod gone (its ADD answered
    /// longer than the grace ago) is forgotten.
    pub(super) fn follow_controller_branches(&mut self, snapshot: &k8s::PodSnapshot) {
        let now = self.clock.now();
        let grace = self.vanished_pod_grace;
        let Some(pods) = &mut self.controller_branches else {
            return;
        };
        pods.retain(|_, p| {
            let pod = k8s::PodRef {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
            };
            snapshot.pods.contains(&pod) || now.since(p.since) < grace
        });
        for (pod, ip) in &snapshot.branches {
            let key = controller_key(&pod.namespace, &pod.name);
            let entry = pods.entry(key).or_insert_with(|| ControllerPod {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                ip: (*ip).into(),
                since: now,
            });
            entry.ip = (*ip).into();
        }
    }

    pub(super) fn controller_branch_pods(
        &self,
    ) -> Vec<(IpamKey, (String, String, std::net::IpAddr))> {
        self.controller_branches
            .iter()
            .flatten()
            .map(|(key, p)| (key.clone(), (p.namespace.clone(), p.name.clone(), p.ip)))
            .collect()
    }

    /// Each pod with a branch, as NetworkPolicy sees it: its host veth carries its traffic as any
    /// pod's, whichever way the branch's packets go on the host.
    pub(super) fn branch_pods(&self) -> Vec<(IpamKey, (String, String, std::net::IpAddr))> {
        self.branches
            .iter()
            .flat_map(NodeBranches::given)
            .filter_map(|(key, meta, branch)| {
                let meta = meta?;
                let pod = (meta.namespace.clone(), meta.name.clone(), branch.ip.into());
                Some((key.clone(), pod))
            })
            .collect()
    }

    /// Removes the host side of pods whose branch was taken back without their DEL, off the loop.
    fn unwire_branch_pods(&self, unwire: Vec<(PodMeta, Branch)>) {
        let links: Vec<(String, Branch, [u8; 6])> = unwire
            .into_iter()
            .filter_map(|(meta, branch)| {
                let mac = crate::executor::parse_mac(&branch.mac)?;
                let host_veth = datapath::names::host_veth_name(
                    &self.veth_prefix,
                    &datapath::names::pod_key(&meta.namespace, &meta.name),
                );
                Some((host_veth, branch, mac))
            })
            .collect();
        if !links.is_empty() {
            tokio::task::spawn_blocking(move || {
                for (veth, branch, mac) in links {
                    if let Err(e) = datapath::branch::remove(&veth, branch.vlan, &mac, branch.ip) {
                        tracing::warn!(error = %e, "removing a vanished branch pod's host side");
                    }
                }
            });
        }
    }

    /// Starts `action` on the executor; its end comes back as [`Event::Finished`].
    pub(super) fn spawn(&mut self, action: Action) {
        tracing::debug!(action = ?action, "action");
        self.actions_in_flight += 1;
        *self
            .in_progress
            .entry(super::function_of(&action))
            .or_default() += 1;
        let executor = self.executor.clone();
        let events = self.events.clone();
        let clock = self.clock;
        tokio::spawn(async move {
            let report = executor.run(&action, clock).await;
            let _ = events.send(Event::Finished { action, report });
        });
    }
}
