//! Sets of addresses as sorted, disjoint, inclusive ranges per family: a CIDR with holes (`ipBlock`
//! with `except`) is a few ranges, and so is the union of a rule's peers, which is what an nftables
//! interval set holds.

use crate::model::Cidr;
use std::net::IpAddr;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpSet {
    v4: Vec<(u128, u128)>,
    v6: Vec<(u128, u128)>,
}

fn range(cidr: &Cidr) -> (bool, u128, u128) {
    match cidr.addr {
        IpAddr::V4(a) => {
            let host_bits = 32 - u32::from(cidr.len.min(32));
            let mask = u32::MAX.checked_shl(host_bits).unwrap_or(0);
            let base = u32::from(a) & mask;
            (false, base.into(), (base | !mask).into())
        }
        IpAddr::V6(a) => {
            let host_bits = 128 - u32::from(cidr.len.min(128));
            let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
            let base = u128::from(a) & mask;
            (true, base, base | !mask)
        }
    }
}

fn key(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u32::from(a).into()),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

/// Sorts and merges overlapping or adjacent ranges.
fn normalise(ranges: &mut Vec<(u128, u128)>) {
    ranges.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for &(start, end) in ranges.iter() {
        match out.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    *ranges = out;
}

fn subtract(ranges: &[(u128, u128)], holes: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut out = Vec::new();
    for &(mut start, end) in ranges {
        let mut whole = true;
        for &(h_start, h_end) in holes {
            if h_end < start || h_start > end {
                continue;
            }
            if h_start > start {
                out.push((start, h_start - 1));
            }
            if h_end >= end {
                whole = false;
                break;
            }
            start = h_end + 1;
        }
        if whole {
            out.push((start, end));
        }
    }
    out
}

impl IpSet {
    pub fn cidr(cidr: &Cidr) -> IpSet {
        let mut set = IpSet::default();
        let (v6, start, end) = range(cidr);
        set.family_mut(v6).push((start, end));
        set
    }

    /// The block minus the holes (`ipBlock` with `except`).
    pub fn block(cidr: &Cidr, except: &[Cidr]) -> IpSet {
        let mut set = IpSet::cidr(cidr);
        let holes = except.iter().fold(IpSet::default(), |mut acc, c| {
            acc.add(&IpSet::cidr(c));
            acc
        });
        set.v4 = subtract(&set.v4, &holes.v4);
        set.v6 = subtract(&set.v6, &holes.v6);
        set
    }

    /// Many single addresses, sorted once (a selector can pick thousands of pods).
    pub fn hosts(ips: impl IntoIterator<Item = IpAddr>) -> IpSet {
        let mut set = IpSet::default();
        for ip in ips {
            let (v6, k) = key(ip);
            set.family_mut(v6).push((k, k));
        }
        normalise(&mut set.v4);
        normalise(&mut set.v6);
        set
    }

    fn family_mut(&mut self, v6: bool) -> &mut Vec<(u128, u128)> {
        if v6 {
            &mut self.v6
        } else {
            &mut self.v4
        }
    }

    pub fn add(&mut self, other: &IpSet) {
        self.v4.extend_from_slice(&other.v4);
        self.v6.extend_from_slice(&other.v6);
        normalise(&mut self.v4);
        normalise(&mut self.v6);
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (v6, k) = key(ip);
        let ranges = if v6 { &self.v6 } else { &self.v4 };
        let i = ranges.partition_point(|&(_, end)| end < k);
        ranges.get(i).is_some_and(|&(start, _)| start <= k)
    }

    /// Whether every address of `other` is in this set.
    pub fn covers(&self, other: &IpSet) -> bool {
        let within = |mine: &[(u128, u128)], theirs: &[(u128, u128)]| {
            theirs.iter().all(|&(start, end)| {
                // Ranges are merged, so a covered range lies within one of ours.
                let i = mine.partition_point(|&(_, e)| e < start);
                mine.get(i).is_some_and(|&(s, e)| s <= start && end <= e)
            })
        };
        within(&self.v4, &other.v4) && within(&self.v6, &other.v6)
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// The IPv4 ranges, first and last address (an nftables interval set's elements).
    pub fn v4_ranges(&self) -> impl Iterator<Item = (std::net::Ipv4Addr, std::net::Ipv4Addr)> + '_ {
        self.v4
            .iter()
            .map(|&(s, e)| ((s as u32).into(), (e as u32).into()))
    }

    pub fn v6_ranges(&self) -> impl Iterator<Item = (std::net::Ipv6Addr, std::net::Ipv6Addr)> + '_ {
        self.v6.iter().map(|&(s, e)| (s.into(), e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_block_with_holes_is_the_ranges_around_them() {
        let set = IpSet::block(&c("10.0.0.0/24"), &[c("10.0.0.64/26"), c("10.0.0.0/30")]);
        let ranges: Vec<_> = set.v4_ranges().map(|(s, e)| format!("{s}-{e}")).collect();
        assert_eq!(ranges, ["10.0.0.4-10.0.0.63", "10.0.0.128-10.0.0.255"]);
        assert!(!set.contains(ip("10.0.0.70")));
        assert!(set.contains(ip("10.0.0.4")));
        assert!(!set.contains(ip("10.0.1.0")));
        assert!(!set.contains(ip("::a00:4")), "families never mix");
        assert!(IpSet::block(&c("10.0.0.0/24"), &[c("10.0.0.0/16")]).is_empty());
    }

    #[test]
    fn unions_merge_and_host_bits_are_ignored() {
        let mut set = IpSet::cidr(&c("10.0.0.7/31"));
        set.add(&IpSet::hosts([ip("10.0.0.8")]));
        set.add(&IpSet::cidr(&c("2001:db8::/127")));
        let v4: Vec<_> = set.v4_ranges().collect();
        assert_eq!(v4, [(ip4("10.0.0.6"), ip4("10.0.0.8"))]);
        assert!(set.contains(ip("2001:db8::1")));
        assert!(!set.contains(ip("2001:db8::2")));
        assert!(IpSet::cidr(&c("0.0.0.0/0")).contains(ip("255.255.255.255")));
        assert!(IpSet::cidr(&c("::/0")).contains(ip("ffff::1")));
    }

    fn ip4(s: &str) -> std::net::Ipv4Addr {
        s.parse().unwrap()
    }
}
