use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IPv4 network in CIDR notation whose address is the network's first address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    base: u32,
    len: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("{0:?} is not an IPv4 CIDR such as 10.0.0.0/16")]
    Syntax(String),
    #[error("{0:?} has host bits set (the network address would be {1})")]
    HostBits(String, Ipv4Cidr),
    #[error("{0:?} is not an IPv6 CIDR such as 2600:1f13:fe4:a00::/56 with its host bits clear")]
    Ipv6Syntax(String),
}

impl Ipv4Cidr {
    /// A network from its first address and prefix length; host bits must be clear.
    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Ipv4Cidr> {
        if len > 32 {
            return None;
        }
        let base = u32::from(addr);
        (base & !Self::mask(len) == 0).then_some(Ipv4Cidr { base, len })
    }

    /// The /32 of one address.
    pub fn host(addr: Ipv4Addr) -> Ipv4Cidr {
        Ipv4Cidr {
            base: u32::from(addr),
            len: 32,
        }
    }

    fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - len)
        }
    }

    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base)
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn base(&self) -> u32 {
        self.base
    }

    /// Number of addresses in the network.
    pub fn size(&self) -> u64 {
        1u64 << (32 - self.len)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.len) == self.base
    }

    pub fn contains_cidr(&self, other: &Ipv4Cidr) -> bool {
        other.len >= self.len && self.contains(other.addr())
    }

    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains_cidr(other) || other.contains_cidr(self)
    }

    /// The `i`-th address of the network.
    pub fn nth(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.base.wrapping_add(i))
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(Self::mask(self.len))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || CidrError::Syntax(s.to_string());
        let (addr, len) = s.trim().split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        let len: u8 = len.parse().map_err(|_| syntax())?;
        if len > 32 {
            return Err(syntax());
        }
        Ipv4Cidr::new(addr, len).ok_or_else(|| {
            CidrError::HostBits(
                s.to_string(),
                Ipv4Cidr {
                    base: u32::from(addr) & Self::mask(len),
                    len,
                },
            )
        })
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An IPv6 network in CIDR notation whose address is the network's first address: a VPC's /56, a
/// subnet's /64, the /80 prefix EC2 delegates to an ENI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv6Cidr {
    base: u128,
    len: u8,
}

impl Ipv6Cidr {
    /// A network from its first address and prefix length; host bits must be clear.
    pub fn new(addr: Ipv6Addr, len: u8) -> Option<Ipv6Cidr> {
        let base = u128::from(addr);
        (len <= 128 && base & !Self::mask(len) == 0).then_some(Ipv6Cidr { base, len })
    }

    fn mask(len: u8) -> u128 {
        u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
    }

    pub fn addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.base)
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn contains_cidr(&self, other: &Ipv6Cidr) -> bool {
        other.len >= self.len && other.base & Self::mask(self.len) == self.base
    }

    pub fn overlaps(&self, other: &Ipv6Cidr) -> bool {
        self.contains_cidr(other) || other.contains_cidr(self)
    }

    /// How many networks of length `len` this one holds (saturating: a /0 holds more /128s than a u128).
    pub fn subnet_count(&self, len: u8) -> u128 {
        if len < self.len || len > 128 {
            return 0;
        }
        1u128
            .checked_shl(u32::from(len - self.len))
            .unwrap_or(u128::MAX)
    }

    /// The `i`-th network of length `len` inside this one.
    pub fn subnet(&self, len: u8, i: u128) -> Option<Ipv6Cidr> {
        if i >= self.subnet_count(len) {
            return None;
        }
        let step = 1u128.checked_shl(128 - u32::from(len)).unwrap_or(0);
        Some(Ipv6Cidr {
            base: self.base + i * step,
            len,
        })
    }

    /// Which of this network's `len`-long networks `other` is, if it is one.
    pub fn subnet_index(&self, other: &Ipv6Cidr) -> Option<u128> {
        (self.contains_cidr(other) && other.len < 128)
            .then(|| (other.base - self.base) >> (128 - u32::from(other.len)))
    }
}

impl fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.len)
    }
}

impl FromStr for Ipv6Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || CidrError::Ipv6Syntax(s.to_string());
        let (addr, len) = s.trim().split_once('/').ok_or_else(syntax)?;
        let addr: Ipv6Addr = addr.parse().map_err(|_| syntax())?;
        let len: u8 = len.parse().map_err(|_| syntax())?;
        Ipv6Cidr::new(addr, len).ok_or_else(syntax)
    }
}

impl Serialize for Ipv6Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv6Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let c: Ipv4Cidr = "10.0.16.0/20".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.16.0/20");
        assert_eq!(c.size(), 4096);
        assert!(c.contains("10.0.31.255".parse().unwrap()));
        assert!(!c.contains("10.0.32.0".parse().unwrap()));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 240, 0));
    }

    #[test]
    fn rejects_host_bits_and_garbage() {
        assert_eq!(
            "10.0.0.1/24".parse::<Ipv4Cidr>(),
            Err(CidrError::HostBits(
                "10.0.0.1/24".into(),
                "10.0.0.0/24".parse().unwrap()
            ))
        );
        assert!("10.0.0.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0.0".parse::<Ipv4Cidr>().is_err());
        assert!("ten/8".parse::<Ipv4Cidr>().is_err());
    }

    #[test]
    fn ipv6_networks_split_into_prefixes() {
        let subnet: Ipv6Cidr = "2600:1f14:abc:de00::/64".parse().unwrap();
        assert_eq!(subnet.subnet_count(80), 65536);
        let p = subnet.subnet(80, 3).unwrap();
        assert_eq!(p.to_string(), "2600:1f14:abc:de00:3::/80");
        assert_eq!(subnet.subnet_index(&p), Some(3));
        assert!(subnet.contains_cidr(&p) && !p.contains_cidr(&subnet));
        assert_eq!(subnet.subnet(80, 65536), None);
        let last = subnet.subnet(80, 65535).unwrap();
        assert_eq!(last.to_string(), "2600:1f14:abc:de00:ffff::/80");
        let vpc: Ipv6Cidr = "2600:1f14:abc:de00::/56".parse().unwrap();
        assert!(vpc.overlaps(&subnet) && subnet.overlaps(&vpc));
        let other: Ipv6Cidr = "2600:1f14:abc:de01::/64".parse().unwrap();
        assert!(!other.overlaps(&subnet));
        assert_eq!(vpc.subnet_index(&other), Some(1));
    }

    #[test]
    fn ipv6_rejects_host_bits_and_garbage() {
        for bad in ["2600::1/64", "2600::/129", "10.0.0.0/8", "2600::", "x::/64"] {
            assert_eq!(
                bad.parse::<Ipv6Cidr>(),
                Err(CidrError::Ipv6Syntax(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            "::/0".parse::<Ipv6Cidr>().unwrap().subnet_count(128),
            u128::MAX
        );
    }
}
