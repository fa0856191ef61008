//! Security groups for pods where the daemon does the VPC resource controller's work (standalone
//! mode, and the simulator): the branch ENIs of one node, decided without I/O in the pool engine's
//! style. [`Branches::ask`] serves a pod from a warm branch with its set of groups or puts it in
//! line; [`Branches::decide`] says which branches to create (one per pod in line, and
//! `WARM_BRANCH_TARGET` spare per set in use) and which to delete; every action is bracketed by
//! [`Branches::begin`] and [`Branches::complete`].
//!
//! Where EKS's controller creates and deletes a branch per pod, a branch whose pod left stays warm for
//! [`BRANCH_COOLDOWN`] and goes to the next pod of the node with the same groups: a rolling update
//! reuses its branches instead of making two EC2 calls per pod each way.

use crate::action::{Action, Failure, Outcome};
use crate::net::Ipv4Cidr;
use crate::pacing::Backoff;
use crate::pool::{IpamKey, PodMeta};
use crate::time::Time;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

/// How long a branch whose pod left waits for another pod with its groups before it is deleted
/// (beyond the warm target). Long enough to span a rolling update's gap between one pod's end and its
/// successor's start; the VPC resource controller waits as long before it deletes a branch.
pub const BRANCH_COOLDOWN: Duration = Duration::from_secs(60);

/// After a failed creation or deletion: 1 s doubling to 60 s.
const FAILURE_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// VLAN ids a branch may take on its trunk (802.1Q's usable range; EC2's too).
const VLANS: std::ops::RangeInclusive<u16> = 1..=4094;

/// A set of security groups, sorted and without repeats: pods with equal sets can share branches.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupSet(Arc<[String]>);

impl GroupSet {
    pub fn new<S: Into<String>>(groups: impl IntoIterator<Item = S>) -> GroupSet {
        let set: BTreeSet<String> = groups.into_iter().map(Into::into).collect();
        GroupSet(set.into_iter().collect())
    }

    pub fn groups(&self) -> &[String] {
        &self.0
    }
}

impl std::fmt::Display for GroupSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// A branch ENI associated with the node's trunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Branch {
    pub eni_id: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub subnet: Ipv4Cidr,
    pub vlan: u16,
    pub association_id: String,
    pub groups: GroupSet,
}

/// The trunk ENI the node's branches hang on, and its subnet (where branches are created).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trunk {
    pub eni_id: String,
    pub subnet_id: String,
    pub subnet: Ipv4Cidr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchSettings {
    /// The instance type's branch limit (`limits::branch_interfaces`).
    pub limit: u32,
    /// `WARM_BRANCH_TARGET`: spare branches kept per set of groups that pods on the node use.
    pub warm_target: u32,
    pub cooldown: Duration,
}

/// What [`Branches::ask`] gives a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ask {
    Ready(Branch),
    /// In line for a branch being created (or to be created once the trunk is there).
    Wait,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct BranchDecision {
    pub actions: Vec<Action>,
    /// When a warm branch's cooldown or a failure's hold ends.
    pub wake_at: Option<Time>,
}

#[derive(Clone, Debug)]
struct Warm {
    branch: Branch,
    since: Time,
}

#[derive(Clone, Debug)]
struct Waiter {
    key: IpamKey,
    groups: GroupSet,
    since: Time,
}

/// The branches of one node: given to pods, warm, being created or deleted, and the VLAN ids they
/// hold on the trunk.
#[derive(Clone, Debug)]
pub struct Branches {
    settings: BranchSettings,
    trunk: Option<Trunk>,
    vlans: BTreeSet<u16>,
    assigned: FxHashMap<IpamKey, Branch>,
    warm: BTreeMap<GroupSet, VecDeque<Warm>>,
    creating: BTreeMap<GroupSet, u32>,
    freeing: u32,
    waiting: VecDeque<Waiter>,
    failures: u32,
    hold_until: Option<Time>,
}

impl Branches {
    pub fn new(settings: BranchSettings) -> Branches {
        Branches {
            settings,
            trunk: None,
            vlans: BTreeSet::new(),
            assigned: FxHashMap::default(),
            warm: BTreeMap::new(),
            creating: BTreeMap::new(),
            freeing: 0,
            waiting: VecDeque::new(),
            failures: 0,
            hold_until: None,
        }
    }

    pub fn set_trunk(&mut self, trunk: Trunk) {
        self.trunk = Some(trunk);
    }

    /// Takes the pool's trunk ENI as the branches' trunk if there is none yet (the pool's policy
    /// makes it, or start-up found it). True when it was taken now.
    pub fn take_trunk_from(&mut self, pool: &crate::pool::Pool) -> bool {
        if self.trunk.is_some() {
            return false;
        }
        let Some(t) = pool.enis().iter().find(|e| e.info.is_trunk) else {
            return false;
        };
        self.trunk = Some(Trunk {
            eni_id: t.info.id.clone(),
            subnet_id: t.info.subnet_id.clone(),
            subnet: t.info.subnet_cidr,
        });
        true
    }

    pub fn trunk(&self) -> Option<&Trunk> {
        self.trunk.as_ref()
    }

    pub fn settings(&self) -> &BranchSettings {
        &self.settings
    }

    /// A branch a pod already has (read from the checkpoint at start): its VLAN id is taken.
    pub fn restore(&mut self, key: IpamKey, branch: Branch) {
        self.vlans.insert(branch.vlan);
        self.assigned.insert(key, branch);
    }

    /// A branch on the trunk that no pod has (a warm one saved at the last stop, or one EC2 shows
    /// that the last run made and did not live to record): warm from `now`, for the next pod with
    /// its groups, deleted after the cooldown otherwise.
    pub fn adopt(&mut self, branch: Branch, now: Time) {
        self.vlans.insert(branch.vlan);
        self.park(branch, now);
    }

    /// Every pod's branch.
    pub fn assignments(&self) -> impl Iterator<Item = (&IpamKey, &Branch)> {
        self.assigned.iter()
    }

    /// Branches no pod has, waiting for one.
    pub fn warm_branches(&self) -> impl Iterator<Item = &Branch> {
        self.warm.values().flatten().map(|w| &w.branch)
    }

    /// The pod's branch: the one it has (an ADD repeated), a warm one with its groups, or a place in
    /// line.
    pub fn ask(&mut self, key: &IpamKey, groups: &GroupSet, now: Time) -> Ask {
        if let Some(b) = self.assigned.get(key) {
            return Ask::Ready(b.clone());
        }
        if self.waiting.iter().any(|w| &w.key == key) {
            return Ask::Wait;
        }
        if let Some(branch) = self.take_warm(groups) {
            self.assigned.insert(key.clone(), branch.clone());
            return Ask::Ready(branch);
        }
        self.waiting.push_back(Waiter {
            key: key.clone(),
            groups: groups.clone(),
            since: now,
        });
        Ask::Wait
    }

    /// The oldest warm branch of the set: its address has rested longest.
    fn take_warm(&mut self, groups: &GroupSet) -> Option<Branch> {
        let line = self.warm.get_mut(groups)?;
        let w = line.pop_front();
        if line.is_empty() {
            self.warm.remove(groups);
        }
        w.map(|w| w.branch)
    }

    /// A pod deleted while in line: it waits no more (a branch created for it becomes warm).
    pub fn cancel(&mut self, key: &IpamKey) {
        self.waiting.retain(|w| &w.key != key);
    }

    /// The pod has ended: its branch turns warm, for the next pod with its groups.
    pub fn release(&mut self, key: &IpamKey, now: Time) -> Option<Branch> {
        let branch = self.assigned.remove(key)?;
        self.park(branch.clone(), now);
        Some(branch)
    }

    /// A branch no pod has: to the first pod in line with its groups, else warm from `now`.
    fn park(&mut self, branch: Branch, now: Time) {
        match self.waiting.iter().position(|w| w.groups == branch.groups) {
            Some(i) => {
                let w = self.waiting.remove(i).expect("just found");
                self.assigned.insert(w.key, branch);
            }
            None => self
                .warm
                .entry(branch.groups.clone())
                .or_default()
                .push_back(Warm { branch, since: now }),
        }
    }

    pub fn get(&self, key: &IpamKey) -> Option<&Branch> {
        self.assigned.get(key)
    }

    pub fn is_waiting(&self, key: &IpamKey) -> bool {
        self.waiting.iter().any(|w| &w.key == key)
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Since when the longest waiting pod has waited.
    pub fn oldest_wait(&self) -> Option<Time> {
        self.waiting.iter().map(|w| w.since).min()
    }

    pub fn assigned(&self) -> usize {
        self.assigned.len()
    }

    pub fn warm(&self) -> usize {
        self.warm.values().map(VecDeque::len).sum()
    }

    pub fn in_flight(&self) -> u32 {
        self.creating.values().sum::<u32>() + self.freeing
    }

    /// Branches the trunk carries or will: given, warm, being created or deleted.
    fn held(&self) -> u32 {
        (self.assigned.len() + self.warm()) as u32 + self.in_flight()
    }

    /// Sets of groups that pods on the node have or wait for: the warm target applies to these.
    fn in_use(&self) -> BTreeSet<&GroupSet> {
        self.assigned
            .values()
            .map(|b| &b.groups)
            .chain(self.waiting.iter().map(|w| &w.groups))
            .collect()
    }

    /// The branches to create and delete now.
    pub fn decide(&self, now: Time) -> BranchDecision {
        let mut d = BranchDecision::default();
        let Some(trunk) = &self.trunk else {
            return d;
        };
        if let Some(t) = self.hold_until.filter(|t| *t > now) {
            d.wake_at = Some(t);
            return d;
        }
        let mut room = self.settings.limit.saturating_sub(self.held());
        let mut vlans = self.vlans.clone();
        let mut evictable: Vec<&Warm> = self.warm.values().flatten().collect();
        evictable.sort_by_key(|w| w.since);
        let mut evicted: BTreeSet<&str> = BTreeSet::new();

        // One creation per pod in line, beyond those already under way for its set.
        let mut wanted: Vec<GroupSet> = Vec::new();
        let mut under_way = self.creating.clone();
        for w in &self.waiting {
            match under_way.get_mut(&w.groups) {
                Some(n) if *n > 0 => *n -= 1,
                _ => wanted.push(w.groups.clone()),
            }
        }
        // Spares: what is under way and not promised counts towards the target.
        let in_use = self.in_use();
        for &set in &in_use {
            let warm = self.warm.get(set).map_or(0, VecDeque::len) as u32;
            let spare = warm + under_way.get(set).copied().unwrap_or(0);
            let short = self.settings.warm_target.saturating_sub(spare);
            wanted.extend(std::iter::repeat_n(set.clone(), short as usize));
        }
        let waiting_sets: BTreeSet<&GroupSet> = self.waiting.iter().map(|w| &w.groups).collect();
        for groups in wanted {
            if room == 0 {
                // A pod in line comes before a spare of another set: delete the oldest such spare
                // to make room (the creation follows once it is gone).
                if waiting_sets.contains(&groups) {
                    if let Some(w) = evictable.iter().find(|w| {
                        w.branch.groups != groups && !evicted.contains(w.branch.eni_id.as_str())
                    }) {
                        evicted.insert(&w.branch.eni_id);
                        d.actions.push(Action::FreeBranch {
                            branch: w.branch.clone(),
                        });
                    }
                }
                continue;
            }
            let Some(vlan) = VLANS.clone().find(|v| !vlans.contains(v)) else {
                break;
            };
            vlans.insert(vlan);
            room -= 1;
            d.actions.push(Action::CreateBranch {
                groups,
                vlan,
                trunk: trunk.eni_id.clone(),
                subnet_id: trunk.subnet_id.clone(),
                subnet: trunk.subnet,
            });
        }

        // Warm branches past their cooldown, beyond the target of a set in use.
        for (set, line) in &self.warm {
            let keep = if in_use.contains(set) {
                self.settings.warm_target as usize
            } else {
                0
            };
            // The newest are kept: the oldest have waited longest for a pod.
            let surplus = line.len().saturating_sub(keep);
            for w in line.iter().take(surplus) {
                if evicted.contains(w.branch.eni_id.as_str()) {
                    continue;
                }
                let due = w.since + self.settings.cooldown;
                if due <= now {
                    d.actions.push(Action::FreeBranch {
                        branch: w.branch.clone(),
                    });
                } else {
                    d.wake_at = Some(d.wake_at.map_or(due, |t| t.min(due)));
                }
            }
        }
        d
    }

    /// Records that an action was sent to EC2.
    pub fn begin(&mut self, action: &Action) {
        match action {
            Action::CreateBranch { groups, vlan, .. } => {
                *self.creating.entry(groups.clone()).or_default() += 1;
                self.vlans.insert(*vlan);
            }
            Action::FreeBranch { branch } => {
                if let Some(line) = self.warm.get_mut(&branch.groups) {
                    line.retain(|w| w.branch.eni_id != branch.eni_id);
                    if line.is_empty() {
                        self.warm.remove(&branch.groups);
                    }
                }
                self.freeing += 1;
            }
            _ => {}
        }
    }

    /// Applies how an action started with `begin` ended: a new branch goes to the first pod in line
    /// with its groups (else it is warm); a deleted one frees its VLAN id. A failure holds further
    /// actions back for a while; a branch that could not be deleted is warm again, to be tried again.
    pub fn complete(&mut self, action: &Action, outcome: Outcome, now: Time) {
        let failed = matches!(outcome, Outcome::Failed(_));
        match (action, outcome) {
            (Action::CreateBranch { groups, vlan, .. }, outcome) => {
                if let Some(n) = self.creating.get_mut(groups) {
                    *n -= 1;
                    if *n == 0 {
                        self.creating.remove(groups);
                    }
                }
                match outcome {
                    Outcome::BranchCreated(branch) => self.park(branch, now),
                    _ => {
                        self.vlans.remove(vlan);
                    }
                }
            }
            (Action::FreeBranch { branch }, outcome) => {
                self.freeing -= 1;
                if outcome == Outcome::Done || outcome == Outcome::Failed(Failure::EniNotFound) {
                    self.vlans.remove(&branch.vlan);
                } else {
                    self.park(branch.clone(), now);
                }
            }
            _ => return,
        }
        if failed {
            self.hold_until = Some(now + FAILURE_BACKOFF.ceiling(self.failures));
            self.failures += 1;
        } else {
            self.failures = 0;
        }
    }

    /// What must hold whatever happened: VLAN ids are those of the branches held, each once, and no
    /// more branches than the limit (restored ones aside, which may exceed a lower new limit).
    pub fn check(&self) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        let branches = self
            .assigned
            .values()
            .chain(self.warm.values().flatten().map(|w| &w.branch));
        for b in branches {
            if !seen.insert(b.vlan) {
                return Err(format!("VLAN {} held by two branches", b.vlan));
            }
            if !self.vlans.contains(&b.vlan) {
                return Err(format!("VLAN {} of {} not recorded", b.vlan, b.eni_id));
            }
        }
        if self.held() > self.settings.limit.max(self.assigned.len() as u32) {
            return Err(format!(
                "{} branches held over the limit {}",
                self.held(),
                self.settings.limit
            ));
        }
        Ok(())
    }
}

/// The format of the file the node's branches are saved in beside the checkpoint (ours: upstream's
/// checkpoint holds the pool's addresses, and upstream's reader must not take a branch's address for
/// one of its own after a move back).
pub const SAVED_VERSION: &str = "vpc-cni-rs-branches/1";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBranches {
    pub version: String,
    pub branches: Vec<SavedBranch>,
}

/// A branch as saved: a pod's (with the pod) or warm (without).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedBranch {
    pub eni_id: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub subnet: Ipv4Cidr,
    pub vlan: u16,
    #[serde(rename = "associationID")]
    pub association_id: String,
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<SavedPod>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedPod {
    pub network_name: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub if_name: String,
    pub namespace: String,
    pub name: String,
}

impl SavedBranch {
    pub fn new(branch: &Branch, pod: Option<(&IpamKey, &PodMeta)>) -> SavedBranch {
        SavedBranch {
            eni_id: branch.eni_id.clone(),
            mac: branch.mac.clone(),
            ip: branch.ip,
            subnet: branch.subnet,
            vlan: branch.vlan,
            association_id: branch.association_id.clone(),
            groups: branch.groups.groups().to_vec(),
            pod: pod.map(|(key, meta)| SavedPod {
                network_name: key.network_name.clone(),
                container_id: key.container_id.clone(),
                if_name: key.if_name.clone(),
                namespace: meta.namespace.clone(),
                name: meta.name.clone(),
            }),
        }
    }

    pub fn branch(&self) -> Branch {
        Branch {
            eni_id: self.eni_id.clone(),
            mac: self.mac.clone(),
            ip: self.ip,
            subnet: self.subnet,
            vlan: self.vlan,
            association_id: self.association_id.clone(),
            groups: GroupSet::new(self.groups.iter().cloned()),
        }
    }

    pub fn key(&self) -> Option<(IpamKey, PodMeta)> {
        self.pod.as_ref().map(|p| {
            (
                IpamKey::new(&p.network_name, &p.container_id, &p.if_name),
                PodMeta {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    interfaces_count: 1,
                },
            )
        })
    }
}

impl SavedBranches {
    pub fn parse(bytes: &[u8]) -> Result<SavedBranches, String> {
        let saved: SavedBranches = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if saved.version != SAVED_VERSION {
            return Err(format!(
                "version {:?}, where {SAVED_VERSION:?} is read",
                saved.version
            ));
        }
        Ok(saved)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("plain data serialises")
    }
}

/// A branch associated with the trunk, as EC2 shows it (DescribeTrunkInterfaceAssociations, then
/// DescribeNetworkInterfaces for its address and groups).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Associated {
    pub association_id: String,
    pub eni_id: String,
    pub vlan: u16,
    /// Its MAC, address and groups; None when EC2 did not list the ENI.
    pub eni: Option<(String, Ipv4Addr, Vec<String>)>,
}

/// The node's branches at start, from the saved file and from EC2, which has the last word.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Pods' branches, as saved and still associated.
    pub assigned: Vec<(IpamKey, PodMeta, Branch)>,
    /// Warm as saved, and those the last run made and did not record (killed between EC2's
    /// answer and the file): warm again, reused or deleted after the cooldown. An association
    /// whose ENI EC2 did not describe holds its VLAN id as a branch of no groups, which no pod
    /// takes and the cooldown deletes.
    pub warm: Vec<Branch>,
    /// Saved but no longer associated with the trunk (deleted by someone else, or the trunk is
    /// new): forgotten.
    pub gone: Vec<SavedBranch>,
}

/// What the node's branches are at start: EC2's associations on the node's trunk decide which
/// exist; the file says which pod has which. A branch is never deleted here: one the file does not
/// know becomes warm: the last run made it for an ADD it did not answer (the reply waits for the
/// file), which the kubelet repeats and a warm branch with the pod's groups then serves.
pub fn reconcile(saved: &[SavedBranch], trunk_subnet: Ipv4Cidr, ec2: &[Associated]) -> Reconciled {
    let mut r = Reconciled::default();
    for s in saved {
        match ec2.iter().find(|a| a.association_id == s.association_id) {
            Some(a) if a.eni_id == s.eni_id && a.vlan == s.vlan => match s.key() {
                Some((key, meta)) => r.assigned.push((key, meta, s.branch())),
                None => r.warm.push(s.branch()),
            },
            _ => r.gone.push(s.clone()),
        }
    }
    for a in ec2 {
        if saved.iter().any(|s| s.association_id == a.association_id) {
            continue;
        }
        let (mac, ip, groups) =
            a.eni
                .clone()
                .unwrap_or((String::new(), Ipv4Addr::UNSPECIFIED, Vec::new()));
        r.warm.push(Branch {
            eni_id: a.eni_id.clone(),
            mac,
            ip,
            subnet: trunk_subnet,
            vlan: a.vlan,
            association_id: a.association_id.clone(),
            groups: GroupSet::new(groups),
        });
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Time = Time::ZERO;

    fn branches(limit: u32, warm_target: u32) -> Branches {
        let mut b = Branches::new(BranchSettings {
            limit,
            warm_target,
            cooldown: BRANCH_COOLDOWN,
        });
        b.set_trunk(Trunk {
            eni_id: "eni-trunk".into(),
            subnet_id: "subnet-1".into(),
            subnet: "10.0.0.0/24".parse().unwrap(),
        });
        b
    }

    fn key(pod: &str) -> IpamKey {
        IpamKey::new("aws-cni", pod, "eth0")
    }

    fn set(groups: &[&str]) -> GroupSet {
        GroupSet::new(groups.iter().copied())
    }

    /// What EC2 would make for a CreateBranch: a branch numbered after its VLAN id.
    fn made(action: &Action) -> Outcome {
        let Action::CreateBranch {
            groups,
            vlan,
            subnet,
            ..
        } = action
        else {
            panic!("{action:?}")
        };
        Outcome::BranchCreated(Branch {
            eni_id: format!("eni-{vlan}"),
            mac: format!("02:00:00:00:00:{vlan:02x}"),
            ip: Ipv4Addr::new(10, 0, 0, *vlan as u8),
            subnet: *subnet,
            vlan: *vlan,
            association_id: format!("assoc-{vlan}"),
            groups: groups.clone(),
        })
    }

    /// Decides, then runs every action to success at `now`; returns the actions.
    fn settle(b: &mut Branches, now: Time) -> Vec<Action> {
        let d = b.decide(now);
        for a in &d.actions {
            b.begin(a);
        }
        for a in &d.actions {
            let outcome = match a {
                Action::CreateBranch { .. } => made(a),
                _ => Outcome::Done,
            };
            b.complete(a, outcome, now);
        }
        b.check().unwrap();
        d.actions
    }

    fn creates(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::CreateBranch { .. }))
            .count()
    }

    fn frees(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::FreeBranch { .. }))
            .count()
    }

    #[test]
    fn a_rolling_update_hands_each_leaving_pods_branch_to_its_successor() {
        let mut b = branches(9, 0);
        let app = set(&["sg-app"]);
        for i in 0..3 {
            assert_eq!(b.ask(&key(&format!("old-{i}")), &app, T0), Ask::Wait);
        }
        assert_eq!(creates(&settle(&mut b, T0)), 3);
        let old: Vec<Branch> = (0..3)
            .map(|i| b.get(&key(&format!("old-{i}"))).unwrap().clone())
            .collect();
        let vlans: BTreeSet<u16> = old.iter().map(|x| x.vlan).collect();
        assert_eq!(vlans.len(), 3, "each branch its own VLAN id");

        // One pod at a time: the old one ends, its successor starts a few seconds later.
        for i in 0..3 {
            let t = Time::from_secs(10 * (i + 1));
            b.release(&key(&format!("old-{i}")), t);
            let Ask::Ready(got) =
                b.ask(&key(&format!("new-{i}")), &app, t + Duration::from_secs(2))
            else {
                panic!("a warm branch of the same groups was there")
            };
            assert_eq!(got, old[i as usize]);
            assert!(settle(&mut b, t + Duration::from_secs(2)).is_empty());
        }
        // A pod with other groups gets no branch of these.
        assert_eq!(b.ask(&key("db"), &set(&["sg-db"]), T0), Ask::Wait);
    }

    #[test]
    fn warm_branches_go_after_their_cooldown_unless_the_target_keeps_them() {
        let mut b = branches(9, 1);
        let app = set(&["sg-app"]);
        b.ask(&key("a"), &app, T0);
        // The pod's branch and one spare for its set.
        assert_eq!(creates(&settle(&mut b, T0)), 2);
        assert_eq!((b.assigned(), b.warm()), (1, 1));
        b.ask(&key("b"), &app, T0);
        assert_eq!(b.warm(), 0, "the spare went to the next pod at once");
        assert_eq!(creates(&settle(&mut b, T0)), 1, "and is replaced");

        // Both pods end (a Recreate rollout): no pod uses the set now, so no spare is kept for it,
        // but the pods' own branches wait out their cooldown for the successors.
        let end = Time::from_secs(100);
        b.release(&key("a"), end);
        b.release(&key("b"), end);
        let d = b.decide(end + Duration::from_secs(59));
        assert_eq!(frees(&d.actions), 1, "the spare made at the start: {d:?}");
        assert_eq!(d.wake_at, Some(end + BRANCH_COOLDOWN));
        settle(&mut b, end + Duration::from_secs(59));
        assert_eq!(frees(&settle(&mut b, end + BRANCH_COOLDOWN)), 2);
        assert_eq!(b.warm(), 0);
    }

    #[test]
    fn the_target_keeps_spares_while_a_pod_of_the_set_remains() {
        let mut b = branches(9, 1);
        let app = set(&["sg-app"]);
        b.ask(&key("a"), &app, T0);
        b.ask(&key("b"), &app, T0);
        assert_eq!(creates(&settle(&mut b, T0)), 3);
        b.release(&key("b"), T0);
        assert_eq!(b.warm(), 2);
        let later = T0 + BRANCH_COOLDOWN;
        assert_eq!(
            frees(&settle(&mut b, later)),
            1,
            "one spare is kept for pod a's set"
        );
        assert_eq!(b.warm(), 1);
    }

    #[test]
    fn a_pod_in_line_at_the_limit_makes_room_by_deleting_another_sets_spare() {
        let mut b = branches(2, 0);
        let app = set(&["sg-app"]);
        b.ask(&key("a1"), &app, T0);
        b.ask(&key("a2"), &app, T0);
        settle(&mut b, T0);
        b.release(&key("a1"), Time::from_secs(1));
        b.release(&key("a2"), Time::from_secs(2));
        assert_eq!(
            b.ask(&key("db"), &set(&["sg-db"]), Time::from_secs(3)),
            Ask::Wait
        );
        let d = b.decide(Time::from_secs(3));
        assert_eq!(creates(&d.actions), 0, "no room until a branch is gone");
        let [Action::FreeBranch { branch }] = d.actions.as_slice() else {
            panic!("{:?}", d.actions)
        };
        assert_eq!(branch.eni_id, "eni-1", "the oldest spare goes first");
        settle(&mut b, Time::from_secs(3));
        assert_eq!(creates(&settle(&mut b, Time::from_secs(4))), 1);
        assert!(b.get(&key("db")).is_some());
        assert_eq!(b.warm(), 1, "the other spare stays");
    }

    #[test]
    fn a_failed_creation_gives_its_vlan_back_and_holds_the_next_try() {
        let mut b = branches(9, 0);
        b.ask(&key("a"), &set(&["sg-app"]), T0);
        let d = b.decide(T0);
        b.begin(&d.actions[0]);
        b.complete(&d.actions[0], Outcome::Failed(Failure::Other), T0);
        assert!(b.is_waiting(&key("a")));
        let held = b.decide(Time::from_millis(500));
        assert!(held.actions.is_empty());
        assert_eq!(held.wake_at, Some(Time::from_secs(1)));
        let again = b.decide(Time::from_secs(1));
        let [Action::CreateBranch { vlan, .. }] = again.actions.as_slice() else {
            panic!("{:?}", again.actions)
        };
        assert_eq!(*vlan, 1, "the failed creation's VLAN id is free again");
    }

    #[test]
    fn nothing_is_created_before_the_trunk_and_a_repeated_ask_is_one_pod() {
        let mut b = Branches::new(BranchSettings {
            limit: 9,
            warm_target: 0,
            cooldown: BRANCH_COOLDOWN,
        });
        let app = set(&["sg-app"]);
        b.ask(&key("a"), &app, T0);
        b.ask(&key("a"), &app, T0);
        assert_eq!(b.waiting(), 1);
        assert!(b.decide(T0).actions.is_empty());
        b.set_trunk(Trunk {
            eni_id: "eni-trunk".into(),
            subnet_id: "subnet-1".into(),
            subnet: "10.0.0.0/24".parse().unwrap(),
        });
        assert_eq!(creates(&settle(&mut b, T0)), 1);
        let Ask::Ready(first) = b.ask(&key("a"), &app, T0) else {
            panic!()
        };
        assert_eq!(b.ask(&key("a"), &app, T0), Ask::Ready(first));
    }

    /// Random asks, ends, cancellations and EC2 failures: VLAN ids stay unique, the limit holds,
    /// and every pod in line is served once EC2 works again.
    #[test]
    fn any_sequence_keeps_vlans_unique_and_the_limit() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let sets = [set(&["sg-a"]), set(&["sg-b"]), set(&["sg-a", "sg-b"])];
        for round in 0..40 {
            let mut b = branches(4 + round % 5, round % 3);
            let mut now = T0;
            let mut pods: Vec<IpamKey> = Vec::new();
            let mut in_flight: Vec<Action> = Vec::new();
            for step in 0..300 {
                now = now + Duration::from_secs(next(30));
                match next(6) {
                    0 | 1 if pods.len() < 12 => {
                        let k = key(&format!("p{round}-{step}"));
                        b.ask(&k, &sets[next(3) as usize], now);
                        pods.push(k);
                    }
                    2 if !pods.is_empty() => {
                        let k = pods.swap_remove(next(pods.len() as u64) as usize);
                        if b.release(&k, now).is_none() {
                            b.cancel(&k);
                        }
                    }
                    3 if !in_flight.is_empty() => {
                        let a = in_flight.swap_remove(next(in_flight.len() as u64) as usize);
                        let outcome = match (&a, next(4)) {
                            (_, 0) => Outcome::Failed(Failure::Other),
                            (Action::CreateBranch { .. }, _) => made(&a),
                            _ => Outcome::Done,
                        };
                        // `made` names branches by VLAN id: unique while the ids are.
                        b.complete(&a, outcome, now);
                    }
                    _ => {
                        let d = b.decide(now);
                        for a in d.actions {
                            b.begin(&a);
                            in_flight.push(a);
                        }
                    }
                }
                b.check()
                    .unwrap_or_else(|e| panic!("round {round} step {step}: {e}"));
            }
            for a in in_flight.drain(..) {
                let outcome = match &a {
                    Action::CreateBranch { .. } => made(&a),
                    _ => Outcome::Done,
                };
                b.complete(&a, outcome, now);
            }
            for _ in 0..20 {
                now = now + Duration::from_secs(61);
                settle(&mut b, now);
            }
            // Every pod has a branch, as far as the limit goes.
            let limit = (4 + round % 5) as usize;
            assert_eq!(b.assigned(), pods.len().min(limit), "round {round}");
            assert_eq!(b.waiting(), pods.len() - b.assigned(), "round {round}");
        }
    }

    fn saved(eni: &str, vlan: u16, pod: Option<&str>) -> SavedBranch {
        let branch = Branch {
            eni_id: eni.into(),
            mac: "02:00:00:00:00:01".into(),
            ip: Ipv4Addr::new(10, 0, 0, vlan as u8),
            subnet: "10.0.0.0/24".parse().unwrap(),
            vlan,
            association_id: format!("assoc-{eni}"),
            groups: set(&["sg-b", "sg-a"]),
        };
        let meta = PodMeta {
            namespace: "shop".into(),
            name: pod.unwrap_or_default().into(),
            interfaces_count: 1,
        };
        let k = pod.map(key);
        SavedBranch::new(&branch, k.as_ref().map(|k| (k, &meta)))
    }

    fn associated(eni: &str, vlan: u16, listed: bool) -> Associated {
        Associated {
            association_id: format!("assoc-{eni}"),
            eni_id: eni.into(),
            vlan,
            eni: listed.then(|| {
                (
                    "02:00:00:00:00:09".into(),
                    Ipv4Addr::new(10, 0, 0, 99),
                    vec!["sg-c".into()],
                )
            }),
        }
    }

    #[test]
    fn saved_branches_read_back_and_a_foreign_version_is_refused() {
        let file = SavedBranches {
            version: SAVED_VERSION.into(),
            branches: vec![saved("eni-1", 1, Some("db-0")), saved("eni-2", 2, None)],
        };
        let back = SavedBranches::parse(&file.to_json()).unwrap();
        assert_eq!(back, file);
        let (k, meta) = back.branches[0].key().unwrap();
        assert_eq!((k, meta.name.as_str()), (key("db-0"), "db-0"));
        assert_eq!(back.branches[0].branch().groups, set(&["sg-a", "sg-b"]));
        assert!(back.branches[1].key().is_none());
        let other = br#"{"version": "vpc-cni-rs-branches/9", "branches": []}"#;
        assert!(SavedBranches::parse(other).unwrap_err().contains("/9"));
        assert!(SavedBranches::parse(b"{\"version\":").is_err());
    }

    #[test]
    fn ec2_decides_which_branches_exist_and_the_file_whose_they_are() {
        let file = [
            saved("eni-1", 1, Some("db-0")),
            saved("eni-2", 2, None),
            saved("eni-3", 3, Some("gone-0")),
            saved("eni-4", 4, Some("moved-0")),
        ];
        let ec2 = [
            associated("eni-1", 1, true),
            associated("eni-2", 2, true),
            // Same association, another VLAN: not what the file says (a new trunk reused ids).
            associated("eni-4", 9, true),
            // Made and associated by a run killed before it wrote the file.
            associated("eni-5", 5, true),
            // An association whose ENI EC2 did not describe: its VLAN id stays taken.
            associated("eni-6", 6, false),
        ];
        let subnet: Ipv4Cidr = "10.0.0.0/24".parse().unwrap();
        let r = reconcile(&file, subnet, &ec2);
        let assigned: Vec<_> = r
            .assigned
            .iter()
            .map(|(k, _, b)| (k.clone(), b.vlan))
            .collect();
        assert_eq!(assigned, vec![(key("db-0"), 1)]);
        let warm: Vec<_> = r.warm.iter().map(|b| (b.eni_id.as_str(), b.vlan)).collect();
        assert_eq!(warm, vec![("eni-2", 2), ("eni-5", 5), ("eni-6", 6)]);
        assert!(r.warm[2].groups.groups().is_empty());
        assert_eq!(r.warm[1].groups, set(&["sg-c"]), "EC2's groups");
        assert_eq!(r.warm[1].subnet, subnet);
        let gone: Vec<_> = r.gone.iter().map(|s| s.eni_id.as_str()).collect();
        assert_eq!(gone, vec!["eni-3", "eni-4"]);

        let mut b = branches(10, 0);
        for (k, _, branch) in r.assigned {
            b.restore(k, branch);
        }
        for branch in r.warm {
            b.adopt(branch, T0);
        }
        b.check().unwrap();
        assert_eq!((b.assigned(), b.warm()), (1, 3));
        // The adopted branch serves a pod with its groups; the other set's is deleted after the
        // cooldown.
        assert!(
            matches!(b.ask(&key("c-0"), &set(&["sg-c"]), T0), Ask::Ready(x) if x.eni_id == "eni-5")
        );
        let later = T0 + BRANCH_COOLDOWN;
        let mut freed: Vec<_> = b
            .decide(later)
            .actions
            .into_iter()
            .map(|a| match a {
                Action::FreeBranch { branch } => branch.eni_id,
                other => panic!("{other:?}"),
            })
            .collect();
        freed.sort();
        assert_eq!(freed, vec!["eni-2".to_string(), "eni-6".to_string()]);
    }
}
