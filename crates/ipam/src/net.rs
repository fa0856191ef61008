use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::Ipv4Addr;
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
}
