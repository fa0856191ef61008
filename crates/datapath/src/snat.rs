//! SNAT and connmark as one nftables table, replaced in a single transaction.
//!
//! Pods talk to the VPC with their own address; anything else leaves by the primary ENI, SNATed to
//! the node's primary IP, unless the operator does SNAT elsewhere (`AWS_VPC_K8S_CNI_EXTERNALSNAT`).
//! Connections from pods that will be SNATed, and NodePort connections arriving on the primary ENI,
//! get a connmark; the mark is copied to their packets so that the `fwmark` rule routes them by
//! main, out of the primary ENI, even from a pod whose ENI has a table of its own.
//!
//! The whole table is replaced in one `nft -f` transaction: the kernel applies all of it or none,
//! so there is never a moment with half the rules. Conntrack keeps the NAT bindings and marks of
//! established connections, which is why switching external SNAT on a running node does not break
//! its pods (upstream #1462: rules were removed one by one while the marks still steered replies).

use crate::{Context, Error, Result};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

pub const TABLE: &str = "vpc-cni";

/// `AWS_VPC_K8S_CNI_RANDOMIZESNAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomizeSnat {
    /// `prng`, the default: fully random source ports.
    FullyRandom,
    /// `hashrandom`.
    Random,
    /// `none`.
    None,
}

impl RandomizeSnat {
    /// Upstream treats unknown values as `prng`; we refuse them so a typo is seen.
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "" | "prng" => Ok(Self::FullyRandom),
            "hashrandom" => Ok(Self::Random),
            "none" => Ok(Self::None),
            other => Err(Error::Invalid(format!(
                "AWS_VPC_K8S_CNI_RANDOMIZESNAT={other:?}: expected prng, hashrandom or none"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnatPolicy {
    pub primary_interface: String,
    pub primary_ip: Ipv4Addr,
    pub veth_prefix: String,
    /// Destinations reached with the pod's own address: the VPC CIDRs and
    /// `AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS`.
    pub exempt: Vec<(Ipv4Addr, u8)>,
    pub external_snat: bool,
    pub randomize: RandomizeSnat,
    pub node_port_support: bool,
    pub connmark: u32,
    /// IPv6 pods' IPv4 egress (`ENABLE_V4_EGRESS` in an IPv6 cluster): their 169.254.172.0/22
    /// addresses are SNATed to the primary IP whatever the destination and whatever
    /// `AWS_VPC_K8S_CNI_EXTERNALSNAT` says (nothing outside the node could answer them), and new
    /// connections to them from outside the node are rejected.
    pub v4_egress: bool,
}

impl SnatPolicy {
    /// The table as nftables text.
    pub fn ruleset(&self) -> String {
        let mark = format!("{:#x}", self.connmark);
        let pods = format!("iifname \"{}*\"", self.veth_prefix);
        let mut out = format!("table ip {TABLE} {{\n");
        out.push_str("  set snat-exempt {\n    type ipv4_addr\n    flags interval\n");
        let exempt = outermost(&self.exempt);
        if !exempt.is_empty() {
            let elements: Vec<String> = exempt
                .iter()
                .map(|(ip, len)| format!("{ip}/{len}"))
                .collect();
            out.push_str(&format!("    elements = {{ {} }}\n", elements.join(", ")));
        }
        out.push_str("  }\n");

        // Before kube-proxy's DNAT, while the destination is still the node's own address.
        out.push_str(
            "  chain nodeport {\n    type filter hook prerouting priority mangle; policy accept;\n",
        );
        if self.node_port_support {
            out.push_str(&format!(
                "    iifname \"{}\" fib daddr type local ct state new ct mark set ct mark | {mark}\n",
                self.primary_interface
            ));
        }
        out.push_str("  }\n");

        // After DNAT, so that a pod talking to a Service is judged by the endpoint it reaches.
        out.push_str(
            "  chain pods {\n    type filter hook prerouting priority dstnat + 10; policy accept;\n",
        );
        if !self.external_snat {
            out.push_str(&format!(
                "    {pods} ct state new fib daddr type != local ip daddr != @snat-exempt ct mark set ct mark | {mark}\n"
            ));
        }
        // Only our bit is added: kube-proxy's masquerade bit (0x4000), set at dstnat for a pod
        // reaching itself through its Service, must survive to postrouting.
        if self.node_port_support || !self.external_snat {
            out.push_str(&format!(
                "    {pods} ct mark & {mark} == {mark} meta mark set meta mark | {mark}\n"
            ));
        }
        out.push_str("  }\n");

        let flags = match self.randomize {
            RandomizeSnat::FullyRandom => " fully-random",
            RandomizeSnat::Random => " random",
            RandomizeSnat::None => "",
        };
        let (range, len) = crate::pod::EGRESS_RANGE;
        if self.v4_egress {
            out.push_str(&format!(
                "  chain egress-guard {{\n    type filter hook forward priority filter; policy accept;\n    ip daddr {range}/{len} ct state new reject\n  }}\n"
            ));
        }
        out.push_str(
            "  chain egress {\n    type nat hook postrouting priority srcnat; policy accept;\n",
        );
        if self.v4_egress {
            out.push_str(&format!(
                "    ip saddr {range}/{len} snat to {}{flags}\n",
                self.primary_ip
            ));
        }
        if !self.external_snat {
            out.push_str(&format!(
                "    oifname != \"vlan*\" ip daddr != @snat-exempt fib daddr type != local snat to {}{flags}\n",
                self.primary_ip
            ));
        }
        out.push_str("  }\n}\n");
        out
    }

    /// Replaces the table in one transaction.
    pub fn apply(&self) -> Result<()> {
        nft(&format!(
            "table ip {TABLE}\ndelete table ip {TABLE}\n{}",
            self.ruleset()
        ))
    }
}

/// The blocks not inside another one, deduplicated and in order. nftables refuses a whole
/// transaction whose interval set holds overlapping elements ("conflicting intervals"), and an
/// operator's `AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS=10.0.0.0/8` on a 10.0.0.0/16 VPC is ordinary. Two
/// CIDR blocks either nest or are disjoint, so dropping the nested ones leaves no overlap.
fn outermost(blocks: &[(Ipv4Addr, u8)]) -> Vec<(Ipv4Addr, u8)> {
    let mask = |len: u8| {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - len.min(32))
        }
    };
    let mut normal: Vec<(u32, u8)> = blocks
        .iter()
        .map(|(ip, len)| (u32::from(*ip) & mask(*len), (*len).min(32)))
        .collect();
    // Widest first among equal bases, so a nested block always comes after its container.
    normal.sort_by_key(|&(base, len)| (base, len));
    normal.dedup();
    let mut out: Vec<(u32, u8)> = Vec::new();
    for (base, len) in normal {
        let inside = out.iter().any(|&(b, l)| l <= len && base & mask(l) == b);
        if !inside {
            out.push((base, len));
        }
    }
    out.into_iter()
        .map(|(base, len)| (Ipv4Addr::from(base), len))
        .collect()
}

/// Removes the table (and with it every rule this module added).
pub fn remove() -> Result<()> {
    nft(&format!("table ip {TABLE}\ndelete table ip {TABLE}\n"))
}

/// Applies an nftables script in one transaction, in the caller's namespace (the SNAT and
/// NetworkPolicy tables use it, and the testbed's fabric for its security groups).
pub fn nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context(|| "running nft (is the nftables package installed?)".into())?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .context(|| "writing the nftables transaction".into())?;
    let output = child
        .wait_with_output()
        .context(|| "waiting for nft".into())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "nft rejected the transaction: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> SnatPolicy {
        SnatPolicy {
            primary_interface: "eth0".into(),
            primary_ip: Ipv4Addr::new(10, 0, 0, 10),
            veth_prefix: "eni".into(),
            exempt: vec![(Ipv4Addr::new(10, 0, 0, 0), 16)],
            external_snat: false,
            randomize: RandomizeSnat::FullyRandom,
            node_port_support: true,
            connmark: 0x80,
            v4_egress: false,
        }
    }

    #[test]
    fn node_snat_marks_pod_connections_and_snats_to_the_primary_ip() {
        let text = policy().ruleset();
        assert!(text.contains("elements = { 10.0.0.0/16 }"), "{text}");
        assert!(text.contains("snat to 10.0.0.10 fully-random"), "{text}");
        assert!(text.contains("iifname \"eni*\" ct state new"), "{text}");
        assert!(
            text.contains("iifname \"eth0\" fib daddr type local"),
            "{text}"
        );
    }

    #[test]
    fn external_snat_keeps_only_the_nodeport_marks() {
        let text = SnatPolicy {
            external_snat: true,
            ..policy()
        }
        .ruleset();
        assert!(!text.contains("snat to"), "{text}");
        assert!(
            !text.contains("ct state new fib daddr type != local"),
            "{text}"
        );
        assert!(
            text.contains("ct mark & 0x80 == 0x80 meta mark set meta mark | 0x80"),
            "{text}"
        );
        let neither = SnatPolicy {
            external_snat: true,
            node_port_support: false,
            ..policy()
        }
        .ruleset();
        assert!(!neither.contains("mark"), "{neither}");
    }

    #[test]
    fn nested_exempt_blocks_collapse_to_the_outermost() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let blocks = [
            (ip("10.0.0.0"), 16),
            (ip("10.0.0.0"), 8),
            (ip("100.64.0.0"), 16),
            (ip("192.168.0.0"), 16),
            (ip("192.168.3.7"), 24),
            (ip("10.0.0.0"), 16),
        ];
        assert_eq!(
            outermost(&blocks),
            [
                (ip("10.0.0.0"), 8),
                (ip("100.64.0.0"), 16),
                (ip("192.168.0.0"), 16)
            ]
        );
        let everything = [(ip("10.0.0.0"), 16), (ip("0.0.0.0"), 0)];
        assert_eq!(outermost(&everything), [(ip("0.0.0.0"), 0)]);
        let text = SnatPolicy {
            exempt: blocks.to_vec(),
            ..policy()
        }
        .ruleset();
        assert!(
            text.contains("elements = { 10.0.0.0/8, 100.64.0.0/16, 192.168.0.0/16 }"),
            "{text}"
        );
    }

    #[test]
    fn randomize_values_as_upstream_and_typos_refused() {
        assert_eq!(
            RandomizeSnat::parse("prng").unwrap(),
            RandomizeSnat::FullyRandom
        );
        assert_eq!(
            RandomizeSnat::parse("hashrandom").unwrap(),
            RandomizeSnat::Random
        );
        assert_eq!(RandomizeSnat::parse("none").unwrap(), RandomizeSnat::None);
        assert!(RandomizeSnat::parse("prgn").is_err());
        let text = SnatPolicy {
            randomize: RandomizeSnat::None,
            ..policy()
        }
        .ruleset();
        assert!(text.contains("snat to 10.0.0.10\n"), "{text}");
    }

    #[test]
    fn v4_egress_is_snated_even_with_external_snat_and_guarded_from_outside() {
        let text = SnatPolicy {
            v4_egress: true,
            external_snat: true,
            randomize: RandomizeSnat::Random,
            ..policy()
        }
        .ruleset();
        assert!(
            text.contains("ip saddr 169.254.172.0/22 snat to 10.0.0.10 random\n"),
            "{text}"
        );
        assert!(
            text.contains("hook forward priority filter; policy accept;\n    ip daddr 169.254.172.0/22 ct state new reject"),
            "{text}"
        );
        assert!(!policy().ruleset().contains("169.254.172"));
    }
}
