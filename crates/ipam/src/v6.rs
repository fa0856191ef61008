//! IPv6 pods (`ENABLE_IPv6=true`): one /80 on the primary ENI for the node's lifetime, a /128 from it
//! for each pod, and (with `ENABLE_V4_EGRESS`) an IPv4 egress address from 169.254.172.0/22 that
//! the node SNATs to its own. No EC2 call after the /80 exists, so no warm pool and no policy: the
//! pool is this allocator and its checkpoint.
//!
//! Addresses are handed out by a cursor that only moves forward, so a released /128 is not given
//! to another pod until the cursor has gone round 2^48 addresses (a restart resumes after the
//! highest one restored). The egress range is small (1,021 addresses) and goes round the same way,
//! skipping those in use.

use crate::checkpoint::{
    Allocation, Checkpoint, CheckpointError, Metadata, RestoreReport, VERSION,
};
use crate::net::Ipv6Cidr;
use crate::pool::{IpamKey, PodMeta};
use crate::time::Time;
use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Upstream's size of the prefix a node's pods share.
pub const PREFIX_LEN: u8 = 80;
/// 169.254.172.0/22: .0 and .1 (the pods' gateway) and the last address are never given out.
const EGRESS_BASE: u32 = u32::from_be_bytes([169, 254, 172, 0]);
const EGRESS_FIRST: u32 = 2;
const EGRESS_LAST: u32 = (1 << 10) - 2;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V6Assignment {
    pub ip: Ipv6Addr,
    pub egress_v4: Option<Ipv4Addr>,
    pub assigned_at: Time,
    pub meta: PodMeta,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum V6Error {
    #[error("all {} IPv4 egress addresses of 169.254.172.0/22 are in use", EGRESS_LAST - EGRESS_FIRST + 1)]
    EgressExhausted,
}

#[derive(Debug)]
pub struct V6Pool {
    prefix: Ipv6Cidr,
    egress: bool,
    assignments: BTreeMap<IpamKey, V6Assignment>,
    in_use: HashSet<Ipv6Addr>,
    egress_in_use: HashSet<Ipv4Addr>,
    next: u128,
    next_egress: u32,
}

impl V6Pool {
    /// `prefix` is the node's /80 (or any prefix shorter than /127); `egress` gives each pod an
    /// IPv4 egress address too.
    pub fn new(prefix: Ipv6Cidr, egress: bool) -> V6Pool {
        V6Pool {
            prefix,
            egress,
            assignments: BTreeMap::new(),
            in_use: HashSet::new(),
            egress_in_use: HashSet::new(),
            next: 1,
            next_egress: EGRESS_FIRST,
        }
    }

    pub fn prefix(&self) -> Ipv6Cidr {
        self.prefix
    }

    pub fn egress(&self) -> bool {
        self.egress
    }

    pub fn assignment(&self, key: &IpamKey) -> Option<&V6Assignment> {
        self.assignments.get(key)
    }

    pub fn assignments(&self) -> impl Iterator<Item = (&IpamKey, &V6Assignment)> {
        self.assignments.iter()
    }

    pub fn assigned(&self) -> usize {
        self.assignments.len()
    }

    fn size(&self) -> u128 {
        1u128 << (128 - u32::from(self.prefix.prefix_len()))
    }

    fn address(&self, offset: u128) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.prefix.addr()) | offset)
    }

    fn offset(&self, ip: Ipv6Addr) -> Option<u128> {
        let base = u128::from(self.prefix.addr());
        let offset = u128::from(ip).wrapping_sub(base);
        (offset < self.size() && u128::from(ip) >= base).then_some(offset)
    }

    /// The key's addresses: the ones it has, or new ones.
    pub fn assign(
        &mut self,
        key: &IpamKey,
        meta: PodMeta,
        now: Time,
    ) -> Result<&V6Assignment, V6Error> {
        if self.assignments.contains_key(key) {
            return Ok(&self.assignments[key]);
        }
        let egress_v4 = if self.egress {
            Some(self.take_egress().ok_or(V6Error::EgressExhausted)?)
        } else {
            None
        };
        // Fewer pods than addresses by 2^40 at least: the loop ends at the first free one.
        let ip = loop {
            let candidate = self.address(self.next);
            self.next = (self.next + 1) % self.size();
            if self.next == 0 {
                self.next = 1;
            }
            if !self.in_use.contains(&candidate) {
                break candidate;
            }
        };
        self.in_use.insert(ip);
        let assignment = V6Assignment {
            ip,
            egress_v4,
            assigned_at: now,
            meta,
        };
        Ok(self.assignments.entry(key.clone()).or_insert(assignment))
    }

    fn take_egress(&mut self) -> Option<Ipv4Addr> {
        for _ in EGRESS_FIRST..=EGRESS_LAST {
            let candidate = Ipv4Addr::from(EGRESS_BASE + self.next_egress);
            self.next_egress = if self.next_egress == EGRESS_LAST {
                EGRESS_FIRST
            } else {
                self.next_egress + 1
            };
            if self.egress_in_use.insert(candidate) {
                return Some(candidate);
            }
        }
        None
    }

    pub fn unassign(&mut self, key: &IpamKey) -> Option<V6Assignment> {
        let a = self.assignments.remove(key)?;
        self.in_use.remove(&a.ip);
        if let Some(egress) = a.egress_v4 {
            self.egress_in_use.remove(&egress);
        }
        Some(a)
    }

    /// Every assignment in upstream's format: the /128 in `ipv6`, the egress address in a field of
    /// our own that upstream ignores.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            version: VERSION.to_string(),
            allocations: self
                .assignments
                .iter()
                .map(|(k, a)| Allocation {
                    network_name: k.network_name.clone(),
                    container_id: k.container_id.clone(),
                    if_name: k.if_name.clone(),
                    ipv4: None,
                    ipv6: Some(a.ip),
                    egress_ipv4: a.egress_v4,
                    allocation_timestamp: a.assigned_at.as_nanos() as i64,
                    metadata: Metadata {
                        k8s_pod_namespace: a.meta.namespace.clone(),
                        k8s_pod_name: a.meta.name.clone(),
                        interfaces_count: a.meta.interfaces_count,
                    },
                })
                .collect(),
        }
    }

    /// Re-assigns what a checkpoint recorded: entries whose pod is gone (`alive` says no) are
    /// dropped, and so are those with no IPv6 address in the /80 (an IPv4 node's, or another
    /// prefix's). An entry without an egress address gets one when egress is on (upstream's
    /// entries have none: its egress plugin kept them in files of its own). An address recorded
    /// twice aborts the restore and leaves the pool as it was.
    pub fn restore(
        &mut self,
        cp: &Checkpoint,
        alive: impl Fn(&Allocation) -> bool,
    ) -> Result<RestoreReport, CheckpointError> {
        let mut seen = HashSet::new();
        let mut seen_egress = HashSet::new();
        for a in &cp.allocations {
            if a.ipv6.is_some_and(|ip| !seen.insert(ip)) {
                return Err(CheckpointError::DuplicateV6(a.ipv6.expect("checked")));
            }
            if let Some(egress) = a.egress_ipv4 {
                if !seen_egress.insert(egress) {
                    return Err(CheckpointError::DuplicateAddress(egress));
                }
            }
        }
        let mut report = RestoreReport::default();
        let mut missing_egress = Vec::new();
        for a in &cp.allocations {
            let Some(offset) = a.ipv6.and_then(|ip| self.offset(ip)).filter(|&o| o != 0) else {
                report.stale.push(a.clone());
                continue;
            };
            if !alive(a) {
                report.dead.push(a.clone());
                continue;
            }
            let ip = self.address(offset);
            let egress_v4 = if self.egress {
                a.egress_ipv4.filter(|e| is_egress(*e))
            } else {
                None
            };
            if self.egress && egress_v4.is_none() {
                missing_egress.push(a.key());
            }
            self.in_use.insert(ip);
            if let Some(e) = egress_v4 {
                self.egress_in_use.insert(e);
            }
            self.next = self.next.max(offset + 1) % self.size();
            self.assignments.insert(
                a.key(),
                V6Assignment {
                    ip,
                    egress_v4,
                    assigned_at: Time(a.allocation_timestamp.max(0) as u64),
                    meta: PodMeta {
                        namespace: a.metadata.k8s_pod_namespace.clone(),
                        name: a.metadata.k8s_pod_name.clone(),
                        interfaces_count: a.metadata.interfaces_count,
                    },
                },
            );
            report.restored += 1;
        }
        for key in missing_egress {
            let egress = self.take_egress();
            if let Some(a) = self.assignments.get_mut(&key) {
                a.egress_v4 = egress;
            }
        }
        if self.next == 0 {
            self.next = 1;
        }
        Ok(report)
    }
}

fn is_egress(ip: Ipv4Addr) -> bool {
    (EGRESS_FIRST..=EGRESS_LAST).contains(&u32::from(ip).wrapping_sub(EGRESS_BASE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn prefix() -> Ipv6Cidr {
        "2600:1f14:abc:de00:1234::/80".parse().unwrap()
    }

    fn key(n: u32) -> IpamKey {
        IpamKey::new("aws-cni", &format!("c{n}"), "eth0")
    }

    fn meta(n: u32) -> PodMeta {
        PodMeta {
            namespace: "default".into(),
            name: format!("pod-{n}"),
            interfaces_count: 1,
        }
    }

    #[test]
    fn pods_get_distinct_addresses_from_the_prefix_and_the_same_ones_again() {
        let mut pool = V6Pool::new(prefix(), true);
        let a = pool.assign(&key(1), meta(1), Time::ZERO).unwrap().clone();
        let b = pool.assign(&key(2), meta(2), Time::ZERO).unwrap().clone();
        assert_ne!(a.ip, b.ip);
        assert!(prefix().contains_cidr(&Ipv6Cidr::new(a.ip, 128).unwrap()));
        assert_eq!(a.egress_v4, Some(Ipv4Addr::new(169, 254, 172, 2)));
        assert_eq!(b.egress_v4, Some(Ipv4Addr::new(169, 254, 172, 3)));
        assert_eq!(pool.assign(&key(1), meta(1), Time::ZERO).unwrap(), &a);
        assert_eq!(pool.assigned(), 2);
    }

    #[test]
    fn a_released_address_is_not_given_to_the_next_pod() {
        let mut pool = V6Pool::new(prefix(), true);
        let a = pool.assign(&key(1), meta(1), Time::ZERO).unwrap().clone();
        assert_eq!(pool.unassign(&key(1)).unwrap().ip, a.ip);
        assert_eq!(pool.unassign(&key(1)), None);
        let b = pool.assign(&key(2), meta(2), Time::ZERO).unwrap().clone();
        assert_ne!(b.ip, a.ip);
        assert_ne!(b.egress_v4, a.egress_v4);
    }

    #[test]
    fn egress_goes_round_its_range_and_says_when_it_is_full() {
        let mut pool = V6Pool::new(prefix(), true);
        let total = EGRESS_LAST - EGRESS_FIRST + 1;
        for n in 0..total {
            let a = pool.assign(&key(n), meta(n), Time::ZERO).unwrap();
            assert!(is_egress(a.egress_v4.unwrap()));
        }
        assert_eq!(
            pool.assign(&key(total), meta(total), Time::ZERO),
            Err(V6Error::EgressExhausted)
        );
        // The failed ADD took nothing: the /128 count is unchanged and a release makes room.
        assert_eq!(pool.assigned(), total as usize);
        let freed = pool.unassign(&key(7)).unwrap().egress_v4;
        let again = pool.assign(&key(total), meta(total), Time::ZERO).unwrap();
        assert_eq!(again.egress_v4, freed);
        let without = V6Pool::new(prefix(), false)
            .assign(&key(1), meta(1), Time::ZERO)
            .unwrap()
            .egress_v4;
        assert_eq!(without, None);
    }

    #[test]
    fn the_checkpoint_round_trips_and_a_restart_does_not_reuse_restored_addresses() {
        let mut pool = V6Pool::new(prefix(), true);
        for n in 0..3 {
            pool.assign(&key(n), meta(n), Time::ZERO + Duration::from_secs(n.into()))
                .unwrap();
        }
        let cp = Checkpoint::parse(&pool.checkpoint().to_json()).unwrap();
        let text = String::from_utf8(cp.to_json()).unwrap();
        assert!(
            text.contains("\"ipv6\":\"2600:1f14:abc:de00:1234::1\""),
            "{text}"
        );
        assert!(!text.contains("\"ipv4\""), "{text}");

        let mut restarted = V6Pool::new(prefix(), true);
        let report = restarted.restore(&cp, |a| a.container_id != "c1").unwrap();
        assert_eq!(report.restored, 2);
        assert_eq!(report.dead.len(), 1);
        assert_eq!(
            restarted.assignment(&key(2)).unwrap(),
            pool.assignment(&key(2)).unwrap()
        );
        let new = restarted.assign(&key(9), meta(9), Time::ZERO).unwrap();
        let restored: Vec<_> = pool.assignments().map(|(_, a)| a.ip).collect();
        assert!(!restored.contains(&new.ip), "{new:?}");
    }

    #[test]
    fn upstream_entries_gain_egress_and_foreign_ones_are_stale() {
        let upstream = br#"{"version":"vpc-cni-ipam/1","allocations":[
            {"networkName":"aws-cni","containerID":"c1","ifName":"eth0","ipv6":"2600:1f14:abc:de00:1234::9","allocationTimestamp":1,"metadata":{"k8sPodNamespace":"default","k8sPodName":"a"}},
            {"networkName":"aws-cni","containerID":"c2","ifName":"eth0","ipv6":"2600:1f14:abc:de00:9999::9","allocationTimestamp":1},
            {"networkName":"aws-cni","containerID":"c3","ifName":"eth0","ipv4":"10.0.0.5","allocationTimestamp":1}]}"#;
        let cp = Checkpoint::parse(upstream).unwrap();
        let mut pool = V6Pool::new(prefix(), true);
        let report = pool.restore(&cp, |_| true).unwrap();
        assert_eq!(report.restored, 1);
        assert_eq!(report.stale.len(), 2);
        let a = pool.assignment(&key(1)).unwrap();
        assert_eq!(
            a.ip,
            "2600:1f14:abc:de00:1234::9".parse::<Ipv6Addr>().unwrap()
        );
        assert!(a.egress_v4.is_some_and(is_egress));
        assert_eq!(a.meta.name, "a");

        let twice = br#"{"version":"vpc-cni-ipam/1","allocations":[
            {"containerID":"c1","ipv6":"2600:1f14:abc:de00:1234::9"},
            {"containerID":"c2","ipv6":"2600:1f14:abc:de00:1234::9"}]}"#;
        let mut pool = V6Pool::new(prefix(), true);
        assert!(pool
            .restore(&Checkpoint::parse(twice).unwrap(), |_| true)
            .is_err());
        assert_eq!(pool.assigned(), 0);
    }
}
