use ipam::{Ipv4Cidr, Ipv6Cidr};
use rand::Rng;
use std::net::Ipv4Addr;

/// Which addresses of a subnet are taken, as AWS allocates them: the first four and the last address are
/// reserved, secondary IPs land anywhere free (so prefixes fragment over time), a prefix needs a whole
/// free aligned /28, and CIDR reservations of type prefix are kept for prefixes.
#[derive(Clone, Debug)]
pub struct SubnetAddresses {
    cidr: Ipv4Cidr,
    used: Vec<u64>,
    free: u32,
    prefix_reservations: Vec<Ipv4Cidr>,
    ipv6: Option<Ipv6Prefixes>,
}

/// The /80 prefixes of a subnet's IPv6 /64 that are delegated to ENIs, one bit each: EC2 picks them
/// anywhere in the /64.
#[derive(Clone, Debug)]
struct Ipv6Prefixes {
    cidr: Ipv6Cidr,
    taken: Vec<u64>,
    free: u32,
}

/// A subnet's IPv6 block: EC2 gives each subnet a /64.
pub const IPV6_SUBNET_LEN: u8 = 64;
/// EC2 delegates IPv6 to ENIs in /80s.
pub const IPV6_PREFIX_LEN: u8 = 80;

impl SubnetAddresses {
    pub fn new(cidr: Ipv4Cidr) -> SubnetAddresses {
        let size = cidr.size() as usize;
        let mut s = SubnetAddresses {
            cidr,
            used: vec![0; size.div_ceil(64)],
            free: size as u32,
            prefix_reservations: vec![],
            ipv6: None,
        };
        for off in [0, 1, 2, 3, size - 1] {
            s.set(off, true);
        }
        s
    }

    pub fn cidr(&self) -> Ipv4Cidr {
        self.cidr
    }

    pub fn free(&self) -> u32 {
        self.free
    }

    pub fn reserve_for_prefixes(&mut self, cidr: Ipv4Cidr) {
        self.prefix_reservations.push(cidr);
    }

    fn is_used(&self, off: usize) -> bool {
        self.used[off / 64] & (1 << (off % 64)) != 0
    }

    fn set(&mut self, off: usize, used: bool) {
        if self.is_used(off) != used {
            self.used[off / 64] ^= 1 << (off % 64);
            if used {
                self.free -= 1;
            } else {
                self.free += 1;
            }
        }
    }

    fn offset(&self, ip: Ipv4Addr) -> Option<usize> {
        self.cidr
            .contains(ip)
            .then(|| (u32::from(ip) - self.cidr.base()) as usize)
    }

    fn in_prefix_reservation(&self, off: usize) -> bool {
        let ip = self.cidr.nth(off as u32);
        self.prefix_reservations.iter().any(|r| r.contains(ip))
    }

    /// Takes one particular address (an ENI's requested primary IP, say); false if it is not free.
    pub fn take(&mut self, ip: Ipv4Addr) -> bool {
        match self.offset(ip) {
            Some(off) if !self.is_used(off) => {
                self.set(off, true);
                true
            }
            _ => false,
        }
    }

    /// Takes `n` free addresses outside prefix reservations, at random places; all or nothing.
    pub fn take_ips(&mut self, n: u32, rng: &mut impl Rng) -> Option<Vec<Ipv4Addr>> {
        let size = self.cidr.size() as usize;
        let mut out = Vec::with_capacity(n as usize);
        let mut start = rng.gen_range(0..size);
        for _ in 0..n {
            let found = (0..size).map(|i| (start + i) % size).find(|&off| {
                !self.is_used(off)
                    && (self.prefix_reservations.is_empty() || !self.in_prefix_reservation(off))
            });
            match found {
                Some(off) => {
                    self.set(off, true);
                    out.push(self.cidr.nth(off as u32));
                    start = rng.gen_range(0..size);
                }
                None => {
                    for ip in out {
                        self.release(ip);
                    }
                    return None;
                }
            }
        }
        Some(out)
    }

    fn block_free(&self, block: usize) -> bool {
        let off = block * 16;
        self.used[off / 64] >> (off % 64) & 0xffff == 0
    }

    /// Takes `n` whole free aligned /28s, from prefix reservations first; all or nothing.
    pub fn take_prefixes(&mut self, n: u32, rng: &mut impl Rng) -> Option<Vec<Ipv4Cidr>> {
        let blocks = (self.cidr.size() / 16) as usize;
        if blocks == 0 {
            return None;
        }
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let reserved =
                (0..blocks).find(|&b| self.block_free(b) && self.in_prefix_reservation(b * 16));
            let start = rng.gen_range(0..blocks);
            let any = || {
                (0..blocks)
                    .map(|i| (start + i) % blocks)
                    .find(|&b| self.block_free(b))
            };
            match reserved.or_else(any) {
                Some(b) => {
                    for off in b * 16..b * 16 + 16 {
                        self.set(off, true);
                    }
                    out.push(Ipv4Cidr::new(self.cidr.nth(b as u32 * 16), 28).expect("aligned"));
                }
                None => {
                    for p in out {
                        self.release_prefix(p);
                    }
                    return None;
                }
            }
        }
        Some(out)
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        if let Some(off) = self.offset(ip) {
            self.set(off, false);
        }
    }

    pub fn release_prefix(&mut self, p: Ipv4Cidr) {
        for i in 0..p.size() as u32 {
            self.release(p.nth(i));
        }
    }

    /// Associates the subnet's IPv6 block, a /64.
    pub fn set_ipv6(&mut self, cidr: Ipv6Cidr) {
        assert_eq!(
            cidr.prefix_len(),
            IPV6_SUBNET_LEN,
            "a subnet's IPv6 block is a /64"
        );
        let count = 1usize << (IPV6_PREFIX_LEN - IPV6_SUBNET_LEN);
        self.ipv6 = Some(Ipv6Prefixes {
            cidr,
            taken: vec![0; count / 64],
            free: count as u32,
        });
    }

    pub fn ipv6_cidr(&self) -> Option<Ipv6Cidr> {
        self.ipv6.as_ref().map(|v6| v6.cidr)
    }

    /// Takes `n` free /80s of the subnet's IPv6 block at random places; all or nothing, and nothing
    /// when the subnet has no IPv6 block.
    pub fn take_ipv6_prefixes(&mut self, n: u32, rng: &mut impl Rng) -> Option<Vec<Ipv6Cidr>> {
        let v6 = self.ipv6.as_mut()?;
        if v6.free < n {
            return None;
        }
        let words = v6.taken.len();
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let start = rng.gen_range(0..words);
            let word = (0..words)
                .map(|i| (start + i) % words)
                .find(|&w| v6.taken[w] != u64::MAX)
                .expect("counted above");
            let bit = v6.taken[word].trailing_ones() as usize;
            v6.taken[word] |= 1 << bit;
            v6.free -= 1;
            let index = (word * 64 + bit) as u128;
            out.push(v6.cidr.subnet(IPV6_PREFIX_LEN, index).expect("in range"));
        }
        Some(out)
    }

    pub fn release_ipv6_prefix(&mut self, prefix: Ipv6Cidr) {
        let Some(v6) = self.ipv6.as_mut() else {
            return;
        };
        if prefix.prefix_len() != IPV6_PREFIX_LEN {
            return;
        }
        if let Some(i) = v6.cidr.subnet_index(&prefix) {
            let (word, bit) = (i as usize / 64, i as usize % 64);
            if v6.taken[word] & (1 << bit) != 0 {
                v6.taken[word] &= !(1 << bit);
                v6.free += 1;
            }
        }
    }

    /// /80s not delegated to any ENI, if the subnet has an IPv6 block.
    pub fn free_ipv6_prefixes(&self) -> Option<u32> {
        self.ipv6.as_ref().map(|v6| v6.free)
    }

    /// Aligned /28s that are wholly free.
    pub fn free_prefixes(&self) -> u32 {
        (0..(self.cidr.size() / 16) as usize)
            .filter(|&b| self.block_free(b))
            .count() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, SeedableRng};
    use std::collections::HashSet;

    #[test]
    fn reserves_first_four_and_last() {
        let s = SubnetAddresses::new("10.0.0.0/28".parse().unwrap());
        assert_eq!(s.free(), 11);
        let mut s = s;
        let mut rng = SmallRng::seed_from_u64(1);
        let ips = s.take_ips(11, &mut rng).unwrap();
        for bad in ["10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.15"] {
            assert!(!ips.contains(&bad.parse().unwrap()));
        }
        assert!(s.take_ips(1, &mut rng).is_none());
        // The only /28 holds reserved addresses, so no prefix fits.
        assert_eq!(s.free_prefixes(), 0);
    }

    #[test]
    fn fragmentation_leaves_addresses_but_no_prefix() {
        let mut s = SubnetAddresses::new("10.0.0.0/26".parse().unwrap());
        let mut rng = SmallRng::seed_from_u64(7);
        // One address in each of the two /28s that hold no reserved address.
        assert!(s.take(Ipv4Addr::new(10, 0, 0, 20)) && s.take(Ipv4Addr::new(10, 0, 0, 40)));
        assert_eq!(s.free_prefixes(), 0);
        assert!(s.free() > 50);
        assert!(s.take_prefixes(1, &mut rng).is_none());
        assert_eq!(s.take_ips(3, &mut rng).map(|v| v.len()), Some(3));
    }

    #[test]
    fn prefixes_come_from_reservations_first_and_ips_stay_out_of_them() {
        let mut s = SubnetAddresses::new("10.0.0.0/24".parse().unwrap());
        s.reserve_for_prefixes("10.0.0.128/27".parse().unwrap());
        let mut rng = SmallRng::seed_from_u64(3);
        let p = s.take_prefixes(2, &mut rng).unwrap();
        assert_eq!(
            p.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            ["10.0.0.128/28", "10.0.0.144/28"]
        );
        s.release_prefix(p[1]);
        let ips = s.take_ips(220, &mut rng);
        assert!(
            ips.is_none(),
            "256 - 5 reserved - 32 kept for prefixes = 219 addresses for IPs"
        );
        let ips = s.take_ips(100, &mut rng).unwrap();
        assert!(ips
            .iter()
            .all(|ip| !"10.0.0.128/27".parse::<Ipv4Cidr>().unwrap().contains(*ip)));
    }

    #[test]
    fn ipv6_prefixes_are_distinct_80s_of_the_subnet_and_come_back() {
        let mut s = SubnetAddresses::new("10.0.0.0/28".parse().unwrap());
        let mut rng = SmallRng::seed_from_u64(7);
        assert_eq!(s.take_ipv6_prefixes(1, &mut rng), None, "no IPv6 block yet");
        let block: Ipv6Cidr = "2600:1f14:1:200::/64".parse().unwrap();
        s.set_ipv6(block);
        let taken = s.take_ipv6_prefixes(100, &mut rng).unwrap();
        let distinct: HashSet<_> = taken.iter().collect();
        assert_eq!(distinct.len(), 100);
        assert!(taken
            .iter()
            .all(|p| p.prefix_len() == 80 && block.contains_cidr(p)));
        assert_eq!(s.free_ipv6_prefixes(), Some(65536 - 100));
        for p in &taken {
            s.release_ipv6_prefix(*p);
        }
        assert_eq!(s.free_ipv6_prefixes(), Some(65536));
        // IPv4 exhaustion has nothing to do with IPv6.
        assert_eq!(s.take_ips(11, &mut rng).map(|v| v.len()), Some(11));
        assert!(s.take_ipv6_prefixes(1, &mut rng).is_some());
    }

    #[test]
    fn an_exhausted_ipv6_block_refuses_all_or_nothing() {
        let mut s = SubnetAddresses::new("10.0.0.0/28".parse().unwrap());
        let mut rng = SmallRng::seed_from_u64(1);
        s.set_ipv6("2600:1f14:1:200::/64".parse().unwrap());
        assert!(s.take_ipv6_prefixes(65530, &mut rng).is_some());
        assert_eq!(s.take_ipv6_prefixes(7, &mut rng), None);
        assert_eq!(s.free_ipv6_prefixes(), Some(6));
        assert_eq!(s.take_ipv6_prefixes(6, &mut rng).map(|v| v.len()), Some(6));
        assert_eq!(s.free_ipv6_prefixes(), Some(0));
    }
}
