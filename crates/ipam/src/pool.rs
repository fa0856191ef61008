//! The node's address pool as plain data: ENIs, their /32 secondary IPs and /28 prefixes ("blocks"), the
//! pods' assignments, addresses in cooldown, and what the policy has asked EC2 for but not yet heard back.

use crate::action::{Action, AddressKind, Failure, Outcome};
use crate::net::Ipv4Cidr;
use crate::settings::PoolSettings;
use crate::time::Time;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Duration;

/// Identifies one attachment of a pod: the same key always gets the same address back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IpamKey {
    pub network_name: String,
    pub container_id: String,
    pub if_name: String,
}

impl IpamKey {
    pub fn new(network_name: &str, container_id: &str, if_name: &str) -> IpamKey {
        IpamKey {
            network_name: network_name.to_string(),
            container_id: container_id.to_string(),
            if_name: if_name.to_string(),
        }
    }

    /// The key upstream gave to pods it migrated from its old CRI-based checkpoint.
    fn legacy(container_id: &str) -> IpamKey {
        IpamKey::new("_migrated-from-cri", container_id, "unknown")
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub interfaces_count: u32,
}

/// The ENIConfig that custom networking puts new ENIs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EniConfigSpec {
    pub subnet: String,
    pub security_groups: Vec<String>,
}

/// Facts about the node that the policy needs, from IMDS, the limits table and the Kubernetes Node.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub instance_type: String,
    /// Address slots per ENI (IPv4 per ENI minus the primary); a slot holds a /32 or a /28.
    pub slots_per_eni: u32,
    /// ENIs the instance type allows on its default network card.
    pub max_enis: u32,
    pub max_pods: u32,
    pub supports_prefixes: bool,
    pub primary_subnet: String,
    pub security_groups: Vec<String>,
    pub eni_config: Option<EniConfigSpec>,
    /// ENIs attached to the instance that are not ours to manage (upstream-ipamd.md §2.7).
    pub unmanaged_enis: u32,
    /// The Node is cordoned: with AWS_MANAGE_ENIS_NON_SCHEDULABLE=false the pool neither grows nor
    /// shrinks (upstream-ipamd.md §1.1), so a node being drained keeps what it has.
    pub unschedulable: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EniInfo {
    pub id: String,
    pub device_number: u32,
    pub subnet_id: String,
    pub subnet_cidr: Ipv4Cidr,
    pub primary_ip: Ipv4Addr,
    pub is_primary: bool,
    pub is_trunk: bool,
    pub is_efa: bool,
    /// In a subnet tagged `kubernetes.io/role/cni=0`: never gives addresses to pods; its idle
    /// addresses go back to EC2. (ENIs that are not ours never enter the pool: `ownership`.)
    pub excluded: bool,
}

impl EniInfo {
    /// Upstream's route table; the pool holds ENIs of network card 0 only.
    pub fn route_table(&self) -> u32 {
        if self.is_primary {
            crate::ownership::route_table(0, 0)
        } else {
            crate::ownership::route_table(self.device_number, 0)
        }
    }
}

/// A /32 or /28 on an ENI, with a bit per address for "assigned" and "cooling down".
#[derive(Clone, Debug)]
pub struct Block {
    pub cidr: Ipv4Cidr,
    used: u16,
    cooling: u16,
    /// An Unassign call for it is in flight: nothing may be assigned from it.
    releasing: bool,
}

impl Block {
    fn new(cidr: Ipv4Cidr) -> Block {
        Block {
            cidr,
            used: 0,
            cooling: 0,
            releasing: false,
        }
    }

    pub fn is_prefix(&self) -> bool {
        self.cidr.prefix_len() < 32
    }

    pub fn kind(&self) -> AddressKind {
        if self.is_prefix() {
            AddressKind::Prefix
        } else {
            AddressKind::Ip
        }
    }

    pub fn size(&self) -> u32 {
        self.cidr.size() as u32
    }

    pub fn assigned(&self) -> u32 {
        self.used.count_ones()
    }

    pub fn cooling(&self) -> u32 {
        self.cooling.count_ones()
    }

    /// Neither assigned nor cooling: the block could go back to EC2.
    pub fn is_idle(&self) -> bool {
        self.used == 0 && self.cooling == 0
    }

    pub fn is_releasing(&self) -> bool {
        self.releasing
    }

    fn full_mask(&self) -> u16 {
        if self.size() >= 16 {
            u16::MAX
        } else {
            (1u16 << self.size()) - 1
        }
    }

    fn free_mask(&self) -> u16 {
        self.full_mask() & !self.used & !self.cooling
    }

    fn offset(&self, ip: Ipv4Addr) -> Option<u32> {
        self.cidr
            .contains(ip)
            .then(|| u32::from(ip) - self.cidr.base())
    }

    /// What this block adds to its ENI's counts: nothing while it is being released.
    fn counts(&self) -> BlockCounts {
        if self.releasing {
            return BlockCounts::default();
        }
        let prefix = u32::from(self.is_prefix());
        BlockCounts {
            total: self.size(),
            assigned: self.assigned(),
            cooling: self.cooling(),
            prefixes: prefix,
            free_prefixes: prefix & u32::from(self.is_idle()),
        }
    }
}

/// Address counts over an ENI's blocks that are not being released, kept up to date on every change so
/// that the policy, which runs on every event, reads them without walking the blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct BlockCounts {
    total: u32,
    assigned: u32,
    cooling: u32,
    prefixes: u32,
    free_prefixes: u32,
}

impl BlockCounts {
    fn add(&mut self, o: BlockCounts) {
        self.total += o.total;
        self.assigned += o.assigned;
        self.cooling += o.cooling;
        self.prefixes += o.prefixes;
        self.free_prefixes += o.free_prefixes;
    }

    fn sub(&mut self, o: BlockCounts) {
        self.total -= o.total;
        self.assigned -= o.assigned;
        self.cooling -= o.cooling;
        self.prefixes -= o.prefixes;
        self.free_prefixes -= o.free_prefixes;
    }

    fn available(&self) -> u32 {
        self.total - self.assigned - self.cooling
    }
}

#[derive(Clone, Debug)]
pub struct Eni {
    pub info: EniInfo,
    pub added_at: Time,
    blocks: Vec<Block>,
    counts: BlockCounts,
    /// A FreeEni for it is in flight.
    pub freeing: bool,
    /// Slots asked of EC2 for this ENI and not yet answered.
    pub inflight_slots: u32,
    /// EC2 said our view of it is wrong (limit exceeded, not found): read it back before using it again.
    pub needs_resync: bool,
    pub resyncing: bool,
}

impl Eni {
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// An assign or release on this ENI has not been answered: a read of it now could be overtaken.
    pub fn address_calls_in_flight(&self) -> bool {
        self.inflight_slots > 0 || self.blocks.iter().any(|b| b.releasing)
    }

    pub fn slots_used(&self) -> u32 {
        self.blocks.len() as u32
    }

    // Blocks being released are idle (only idle ones are released, and nothing is assigned from them
    // meanwhile), so the counts, which leave them out, hold every assigned and cooling address.
    pub fn assigned(&self) -> u32 {
        self.counts.assigned
    }

    pub fn has_cooling(&self) -> bool {
        self.counts.cooling > 0
    }

    /// Addresses neither assigned nor cooling, in blocks not being released.
    pub fn available(&self) -> u32 {
        self.counts.available()
    }

    /// Prefixes not being released.
    pub fn prefix_count(&self) -> u32 {
        self.counts.prefixes
    }

    pub fn has(&self, cidr: &Ipv4Cidr) -> bool {
        self.blocks.iter().any(|b| b.cidr == *cidr)
    }

    /// Changes one block and its share of the ENI's counts together.
    fn update_block<R>(&mut self, index: usize, change: impl FnOnce(&mut Block) -> R) -> R {
        let b = &mut self.blocks[index];
        self.counts.sub(b.counts());
        let r = change(b);
        self.counts.add(b.counts());
        r
    }

    /// Counts again after a change to many blocks at once.
    fn recount(&mut self) {
        self.counts = self.counted();
    }

    fn counted(&self) -> BlockCounts {
        let mut c = BlockCounts::default();
        for b in &self.blocks {
            c.add(b.counts());
        }
        c
    }

    fn block_index(&self, ip: Ipv4Addr) -> Option<usize> {
        self.blocks.iter().position(|b| b.cidr.contains(ip))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Assignment {
    pub ip: Ipv4Addr,
    pub eni: String,
    pub device_number: u32,
    pub route_table: u32,
    pub meta: PodMeta,
    pub assigned_at: Time,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssignError {
    #[error("no available IP address in the pool (assigned {assigned} of {total}, {cooling} cooling down)")]
    NoAvailableAddress {
        total: u32,
        assigned: u32,
        cooling: u32,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnassignError {
    #[error("no address is assigned to {0:?}")]
    UnknownPod(IpamKey),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    pub addresses: u32,
    pub enis: u32,
    /// Slots requested with the ENIs being created: their other slots can be filled once they exist.
    pub eni_slots: u32,
    /// The trunk ENI is being created (it is one of `enis`).
    pub trunk: bool,
}

/// Address counts over the ENIs that may give addresses to pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub total: u32,
    pub assigned: u32,
    pub cooling: u32,
    /// Free now: neither assigned nor cooling down (upstream counts cooling addresses too).
    pub available: u32,
    pub prefixes: u32,
    /// Prefixes with nothing assigned and nothing cooling.
    pub free_prefixes: u32,
}

/// The upstream-compatible record of every assignment, and the restore rules of upstream-ipamd.md §3.2.
#[derive(Clone, Debug)]
pub struct Pool {
    pub node: NodeSpec,
    enis: Vec<Eni>,
    assignments: FxHashMap<IpamKey, Assignment>,
    /// Released addresses in the order they were released, with the device number of their ENI where
    /// they are looked for first, to end their cooldown.
    cooling: VecDeque<(Time, Ipv4Addr, u32)>,
    pub inflight: InFlight,
    custom_networking: bool,
}

pub const MIN_ENI_AGE: Duration = Duration::from_secs(60);

impl Pool {
    pub fn new(node: NodeSpec, settings: &PoolSettings) -> Pool {
        Pool {
            node,
            enis: Vec::new(),
            assignments: FxHashMap::default(),
            cooling: VecDeque::new(),
            inflight: InFlight::default(),
            custom_networking: settings.custom_networking,
        }
    }

    pub fn enis(&self) -> &[Eni] {
        &self.enis
    }

    pub fn eni(&self, id: &str) -> Option<&Eni> {
        self.enis.iter().find(|e| e.info.id == id)
    }

    fn eni_mut(&mut self, id: &str) -> Option<&mut Eni> {
        self.enis.iter_mut().find(|e| e.info.id == id)
    }

    pub fn assignments(&self) -> impl Iterator<Item = (&IpamKey, &Assignment)> {
        self.assignments.iter()
    }

    pub fn assignment(&self, key: &IpamKey) -> Option<&Assignment> {
        self.assignments.get(key)
    }

    /// Whether pods may get addresses from this ENI.
    pub fn gives_pod_addresses(&self, eni: &Eni) -> bool {
        !(eni.info.excluded
            || eni.info.is_trunk
            || eni.info.is_efa
            || eni.freeing
            || (eni.info.is_primary && self.custom_networking))
    }

    pub fn stats(&self) -> PoolStats {
        let mut c = BlockCounts::default();
        for eni in &self.enis {
            debug_assert_eq!(eni.counts, eni.counted(), "{} counted wrong", eni.info.id);
            if self.gives_pod_addresses(eni) {
                c.add(eni.counts);
            }
        }
        PoolStats {
            total: c.total,
            assigned: c.assigned,
            cooling: c.cooling,
            available: c.available(),
            prefixes: c.prefixes,
            free_prefixes: c.free_prefixes,
        }
    }

    /// When the oldest address in cooldown becomes free again.
    pub fn next_cooldown_end(&self, cooldown: Duration) -> Option<Time> {
        self.cooling.front().map(|(t, _, _)| *t + cooldown)
    }

    pub fn add_eni(&mut self, info: EniInfo, now: Time) {
        if self.eni(&info.id).is_some() {
            return;
        }
        let at = self
            .enis
            .partition_point(|e| e.info.device_number < info.device_number);
        self.enis.insert(
            at,
            Eni {
                info,
                added_at: now,
                blocks: Vec::new(),
                counts: BlockCounts::default(),
                freeing: false,
                inflight_slots: 0,
                needs_resync: false,
                resyncing: false,
            },
        );
    }

    /// Adds /32s and /28s that EC2 reports on an ENI; known ones are ignored.
    pub fn add_blocks(&mut self, eni_id: &str, cidrs: &[Ipv4Cidr]) {
        if let Some(eni) = self.eni_mut(eni_id) {
            for c in cidrs {
                if !eni.has(c) && c.addr() != eni.info.primary_ip {
                    eni.blocks.push(Block::new(*c));
                }
            }
            eni.recount();
        }
    }

    /// Makes an ENI's blocks match what EC2 says it has. Pods on blocks that vanished lose their assignment;
    /// they are returned so that the caller can count and log them.
    pub fn sync_eni(&mut self, eni_id: &str, actual: &[Ipv4Cidr]) -> Vec<(IpamKey, Assignment)> {
        let Some(eni) = self.eni_mut(eni_id) else {
            return Vec::new();
        };
        let gone: Vec<Ipv4Cidr> = eni
            .blocks
            .iter()
            .map(|b| b.cidr)
            .filter(|c| !actual.contains(c))
            .collect();
        eni.blocks.retain(|b| actual.contains(&b.cidr));
        eni.recount();
        self.add_blocks(eni_id, actual);
        self.forget_addresses_in(&gone)
    }

    /// EC2's view of this ENI is uncertain (a call timed out): the policy reads it back before using it.
    pub fn mark_for_resync(&mut self, eni_id: &str) {
        if let Some(e) = self.eni_mut(eni_id) {
            e.needs_resync = true;
        }
    }

    /// Removes an ENI (detached, or freed); pods still on it lose their assignment and are returned.
    pub fn remove_eni(&mut self, eni_id: &str) -> Vec<(IpamKey, Assignment)> {
        let Some(pos) = self.enis.iter().position(|e| e.info.id == eni_id) else {
            return Vec::new();
        };
        let eni = self.enis.remove(pos);
        let cidrs: Vec<Ipv4Cidr> = eni.blocks.iter().map(|b| b.cidr).collect();
        self.forget_addresses_in(&cidrs)
    }

    fn forget_addresses_in(&mut self, cidrs: &[Ipv4Cidr]) -> Vec<(IpamKey, Assignment)> {
        if cidrs.is_empty() {
            return Vec::new();
        }
        self.cooling
            .retain(|(_, ip, _)| !cidrs.iter().any(|c| c.contains(*ip)));
        let keys: Vec<IpamKey> = self
            .assignments
            .iter()
            .filter(|(_, a)| cidrs.iter().any(|c| c.contains(a.ip)))
            .map(|(k, _)| k.clone())
            .collect();
        keys.into_iter()
            .map(|k| {
                let a = self.assignments.remove(&k).expect("key was just listed");
                (k, a)
            })
            .collect()
    }

    /// Ends the cooldown of addresses released at least `cooldown` ago.
    pub fn expire_cooldowns(&mut self, now: Time, cooldown: Duration) {
        while let Some(&(t, ip, device)) = self.cooling.front() {
            if now.since(t) < cooldown {
                break;
            }
            self.cooling.pop_front();
            self.update_block_of(ip, Some(device), |b, off| b.cooling &= !(1 << off));
        }
    }

    /// Changes the block holding `ip` (given the block and the address's offset in it), looking on the ENI
    /// with device number `device` first; None if no block holds it.
    fn update_block_of<R>(
        &mut self,
        ip: Ipv4Addr,
        device: Option<u32>,
        change: impl FnOnce(&mut Block, u32) -> R,
    ) -> Option<(&EniInfo, R)> {
        let hinted = device
            .and_then(|d| {
                self.enis
                    .binary_search_by_key(&d, |e| e.info.device_number)
                    .ok()
            })
            .and_then(|ei| self.enis[ei].block_index(ip).map(|bi| (ei, bi)));
        let (ei, bi) = hinted.or_else(|| {
            self.enis
                .iter()
                .enumerate()
                .find_map(|(ei, e)| e.block_index(ip).map(|bi| (ei, bi)))
        })?;
        let eni = &mut self.enis[ei];
        let r = eni.update_block(bi, |b| {
            let off = b.offset(ip).expect("block contains ip");
            change(b, off)
        });
        Some((&eni.info, r))
    }

    /// Gives the pod an address, or the one it already has. In prefix mode addresses are packed into the
    /// fullest prefix so that idle prefixes can go back to the subnet.
    pub fn assign(
        &mut self,
        key: &IpamKey,
        meta: &PodMeta,
        now: Time,
        cooldown: Duration,
    ) -> Result<&Assignment, AssignError> {
        if self.assignments.contains_key(key) {
            return Ok(&self.assignments[key]);
        }
        self.expire_cooldowns(now, cooldown);
        let mut best: Option<(usize, usize, (bool, u32))> = None;
        for (ei, eni) in self.enis.iter().enumerate() {
            // An ENI whose EC2 state is uncertain (a call on it timed out) may not hold the address any
            // more: nothing of it goes to a pod until it has been read back.
            if !self.gives_pod_addresses(eni)
                || eni.needs_resync
                || eni.resyncing
                || eni.counts.available() == 0
            {
                continue;
            }
            // Every free /32 ranks the same, so an ENI without prefixes offers its first one; a prefix
            // anywhere outranks it.
            if eni.counts.prefixes == 0 && best.is_some() {
                continue;
            }
            for (bi, b) in eni.blocks.iter().enumerate() {
                if b.releasing || b.free_mask() == 0 {
                    continue;
                }
                // Prefer prefixes, then the fullest block; ENIs in device order break ties.
                let rank = (b.is_prefix(), b.assigned());
                if best.is_none_or(|(_, _, r)| rank > r) {
                    best = Some((ei, bi, rank));
                }
                if eni.counts.prefixes == 0 {
                    break;
                }
            }
        }
        let Some((ei, bi, _)) = best else {
            let s = self.stats();
            return Err(AssignError::NoAvailableAddress {
                total: s.total,
                assigned: s.assigned,
                cooling: s.cooling,
            });
        };
        let eni = &mut self.enis[ei];
        let ip = eni.update_block(bi, |b| {
            let off = b.free_mask().trailing_zeros();
            b.used |= 1 << off;
            b.cidr.nth(off)
        });
        let a = Assignment {
            ip,
            eni: eni.info.id.clone(),
            device_number: eni.info.device_number,
            route_table: eni.info.route_table(),
            meta: meta.clone(),
            assigned_at: now,
        };
        Ok(self.assignments.entry(key.clone()).or_insert(a))
    }

    /// Gives the pod exactly this address (restoring a checkpoint); false if no block has it free.
    pub(crate) fn assign_exact(
        &mut self,
        key: &IpamKey,
        ip: Ipv4Addr,
        meta: PodMeta,
        at: Time,
    ) -> bool {
        let taken = self.update_block_of(ip, None, |b, off| {
            let free = b.used & (1 << off) == 0 && !b.releasing;
            b.used |= u16::from(free) << off;
            free
        });
        let Some((info, true)) = taken else {
            return false;
        };
        let a = Assignment {
            ip,
            eni: info.id.clone(),
            device_number: info.device_number,
            route_table: info.route_table(),
            meta,
            assigned_at: at,
        };
        self.assignments.insert(key.clone(), a);
        true
    }

    /// Takes the pod's address back; it cools down before anyone else gets it.
    pub fn unassign(&mut self, key: &IpamKey, now: Time) -> Result<Assignment, UnassignError> {
        let a = match self.assignments.remove(key) {
            Some(a) => a,
            None => self
                .assignments
                .remove(&IpamKey::legacy(&key.container_id))
                .ok_or_else(|| UnassignError::UnknownPod(key.clone()))?,
        };
        let held = self.update_block_of(a.ip, Some(a.device_number), |b, off| {
            b.used &= !(1 << off);
            b.cooling |= 1 << off;
        });
        if let Some((info, ())) = held {
            let device = info.device_number;
            let at = self.cooling.partition_point(|(t, _, _)| *t <= now);
            self.cooling.insert(at, (now, a.ip, device));
        }
        Ok(a)
    }

    /// Records that an action was sent to EC2.
    pub fn begin(&mut self, action: &Action) {
        match action {
            Action::AssignAddresses { eni, kind, count } => {
                self.inflight.addresses += count * kind.size();
                if let Some(e) = self.eni_mut(eni) {
                    e.inflight_slots += count;
                }
            }
            Action::CreateEni { kind, count, .. } => {
                self.inflight.addresses += count * kind.size();
                self.inflight.enis += 1;
                self.inflight.eni_slots += count;
            }
            Action::ReleaseAddresses { eni, cidrs } => {
                if let Some(e) = self.eni_mut(eni) {
                    for b in e.blocks.iter_mut().filter(|b| cidrs.contains(&b.cidr)) {
                        b.releasing = true;
                    }
                    e.recount();
                }
            }
            Action::FreeEni { eni } => {
                if let Some(e) = self.eni_mut(eni) {
                    e.freeing = true;
                }
            }
            Action::CreateTrunk { .. } => {
                self.inflight.enis += 1;
                self.inflight.trunk = true;
            }
            // Branch ENIs are associated, not attached: no slot of the pool's.
            Action::CreateBranch { .. } | Action::FreeBranch { .. } => {}
            Action::ResyncEni { eni } => {
                // The read now under way answers every doubt raised before it; a call that times out
                // while it runs raises a new one, and the ENI is read again.
                if let Some(e) = self.eni_mut(eni) {
                    e.resyncing = true;
                    e.needs_resync = false;
                }
            }
        }
    }

    /// Applies the result of an action started with `begin`. Returns assignments that had to be dropped
    /// because their addresses no longer exist in EC2.
    pub fn complete(
        &mut self,
        action: &Action,
        outcome: Outcome,
        now: Time,
    ) -> Vec<(IpamKey, Assignment)> {
        let mut dropped = Vec::new();
        let failure = match &outcome {
            Outcome::Failed(f) => Some(*f),
            _ => None,
        };
        match action {
            Action::AssignAddresses { eni, kind, count } => {
                self.inflight.addresses -= count * kind.size();
                if let Some(e) = self.eni_mut(eni) {
                    e.inflight_slots -= count;
                }
                if let Outcome::Assigned(cidrs) = &outcome {
                    self.add_blocks(eni, cidrs);
                }
            }
            Action::CreateEni { kind, count, .. } => {
                self.inflight.addresses -= count * kind.size();
                self.inflight.enis -= 1;
                self.inflight.eni_slots -= count;
                if let Outcome::EniCreated { eni, blocks } = &outcome {
                    let id = eni.id.clone();
                    self.add_eni(eni.clone(), now);
                    self.add_blocks(&id, blocks);
                }
            }
            Action::ReleaseAddresses { eni, cidrs } => {
                if outcome == Outcome::Done {
                    if let Some(e) = self.eni_mut(eni) {
                        e.blocks.retain(|b| !cidrs.contains(&b.cidr));
                        e.recount();
                    }
                    dropped = self.forget_addresses_in(cidrs);
                } else if let Some(e) = self.eni_mut(eni) {
                    for b in e.blocks.iter_mut().filter(|b| cidrs.contains(&b.cidr)) {
                        b.releasing = false;
                    }
                    e.recount();
                }
            }
            Action::FreeEni { eni } => {
                if outcome == Outcome::Done || failure == Some(Failure::EniNotFound) {
                    dropped = self.remove_eni(eni);
                } else if let Some(e) = self.eni_mut(eni) {
                    // It may be half-freed (detached, not deleted): read it back before using it again.
                    e.freeing = false;
                    e.needs_resync = true;
                }
            }
            Action::CreateTrunk { .. } => {
                self.inflight.enis -= 1;
                self.inflight.trunk = false;
                if let Outcome::EniCreated { eni, .. } = &outcome {
                    self.add_eni(eni.clone(), now);
                }
            }
            Action::CreateBranch { .. } | Action::FreeBranch { .. } => {}
            Action::ResyncEni { eni } => {
                if let Some(e) = self.eni_mut(eni) {
                    e.resyncing = false;
                }
                match &outcome {
                    Outcome::Synced(Some(cidrs)) => dropped = self.sync_eni(eni, cidrs),
                    Outcome::Synced(None) => dropped = self.remove_eni(eni),
                    _ => {
                        if let Some(e) = self.eni_mut(eni) {
                            e.needs_resync = true;
                        }
                    }
                }
            }
        }
        // The policy reacts to failures (policy::PolicyMemory::learn); the pool only stops trusting an
        // ENI whose count EC2 contradicted.
        if let Some(Failure::AddressLimitExceeded | Failure::EniNotFound) = failure {
            if let Some(id) = action.eni() {
                if let Some(e) = self.eni_mut(id) {
                    e.needs_resync = true;
                }
            }
        }
        dropped
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::settings::PoolSettings;

    /// A t3.small-like node for the engine's unit tests.
    pub(crate) fn node() -> NodeSpec {
        NodeSpec {
            instance_type: "t3.small".into(),
            slots_per_eni: 3,
            max_enis: 3,
            max_pods: 11,
            supports_prefixes: true,
            primary_subnet: "subnet-a".into(),
            security_groups: vec!["sg-1".into()],
            eni_config: None,
            unmanaged_enis: 0,
            unschedulable: false,
        }
    }

    fn primary() -> EniInfo {
        EniInfo {
            id: "eni-0".into(),
            device_number: 0,
            subnet_id: "subnet-a".into(),
            subnet_cidr: "10.0.0.0/24".parse().unwrap(),
            primary_ip: "10.0.0.10".parse().unwrap(),
            is_primary: true,
            is_trunk: false,
            is_efa: false,
            excluded: false,
        }
    }

    fn key(n: u32) -> IpamKey {
        IpamKey::new("aws-cni", &format!("c{n}"), "eth0")
    }

    fn pool_with(cidrs: &[&str]) -> Pool {
        let mut p = Pool::new(node(), &PoolSettings::default());
        p.add_eni(primary(), Time::ZERO);
        let cidrs: Vec<Ipv4Cidr> = cidrs.iter().map(|c| c.parse().unwrap()).collect();
        p.add_blocks("eni-0", &cidrs);
        p
    }

    const COOL: Duration = Duration::from_secs(30);

    #[test]
    fn assign_is_idempotent_per_key() {
        let mut p = pool_with(&["10.0.0.20/32", "10.0.0.21/32"]);
        let a = p
            .assign(&key(1), &PodMeta::default(), Time::ZERO, COOL)
            .unwrap()
            .clone();
        let again = p
            .assign(&key(1), &PodMeta::default(), Time::from_secs(5), COOL)
            .unwrap()
            .clone();
        assert_eq!(a, again);
        let b = p
            .assign(&key(2), &PodMeta::default(), Time::ZERO, COOL)
            .unwrap()
            .clone();
        assert_ne!(a.ip, b.ip);
        assert!(p
            .assign(&key(3), &PodMeta::default(), Time::ZERO, COOL)
            .is_err());
    }

    #[test]
    fn released_address_cools_down_and_does_not_count_as_available() {
        let mut p = pool_with(&["10.0.0.20/32"]);
        let a = p
            .assign(&key(1), &PodMeta::default(), Time::ZERO, COOL)
            .unwrap()
            .clone();
        p.unassign(&key(1), Time::from_secs(10)).unwrap();
        assert_eq!(p.stats().available, 0);
        assert_eq!(p.stats().cooling, 1);
        let err = p
            .assign(&key(2), &PodMeta::default(), Time::from_secs(39), COOL)
            .unwrap_err();
        assert!(matches!(
            err,
            AssignError::NoAvailableAddress { cooling: 1, .. }
        ));
        let b = p
            .assign(&key(2), &PodMeta::default(), Time::from_secs(40), COOL)
            .unwrap()
            .clone();
        assert_eq!(a.ip, b.ip);
        assert_eq!(p.next_cooldown_end(COOL), None);
    }

    #[test]
    fn unknown_pod_and_legacy_key() {
        let mut p = pool_with(&["10.0.0.20/32"]);
        assert!(matches!(
            p.unassign(&key(9), Time::ZERO),
            Err(UnassignError::UnknownPod(_))
        ));
        let legacy = IpamKey::legacy("c1");
        p.assign(&legacy, &PodMeta::default(), Time::ZERO, COOL)
            .unwrap();
        assert!(p.unassign(&key(1), Time::ZERO).is_ok());
    }

    #[test]
    fn prefixes_are_packed_fullest_first() {
        let mut p = pool_with(&["10.0.0.32/28", "10.0.0.48/28"]);
        let a = p
            .assign(&key(1), &PodMeta::default(), Time::ZERO, COOL)
            .unwrap()
            .clone();
        let b = p
            .assign(&key(2), &PodMeta::default(), Time::ZERO, COOL)
            .unwrap()
            .clone();
        let block: Ipv4Cidr = "10.0.0.32/28".parse().unwrap();
        assert!(block.contains(a.ip) && block.contains(b.ip));
        assert_eq!(p.stats().free_prefixes, 1);
    }

    #[test]
    fn the_primary_address_is_never_a_block() {
        let p = pool_with(&["10.0.0.10/32", "10.0.0.11/32"]);
        assert_eq!(p.stats().total, 1);
    }

    #[test]
    fn sync_drops_vanished_addresses_and_their_pods() {
        let mut p = pool_with(&["10.0.0.20/32", "10.0.0.21/32"]);
        let a = p
            .assign(&key(1), &PodMeta::default(), Time::ZERO, COOL)
            .unwrap()
            .clone();
        let keep: Ipv4Cidr = if a.ip.to_string() == "10.0.0.20" {
            "10.0.0.21/32"
        } else {
            "10.0.0.20/32"
        }
        .parse()
        .unwrap();
        let dropped = p.sync_eni("eni-0", &[keep, "10.0.0.22/32".parse().unwrap()]);
        assert_eq!(dropped.len(), 1);
        assert_eq!(p.stats().total, 2);
        assert!(p.assignment(&key(1)).is_none());
    }
}
