//! Node setup: the links of secondary ENIs with a route table each, and the host-wide rules and
//! sysctls that pod traffic relies on.

use crate::nl::{self, tolerate_missing};
use crate::pod::{add_rule, delete_rules, rule};
use crate::{Context, Error, Result, MAIN_TABLE};
use rtnetlink::packet_route::rule::RuleAttribute;
use rtnetlink::LinkUnspec;
use std::net::{IpAddr, Ipv4Addr};

/// `from <ENI primary IP> lookup <ENI table>`, so that the node's own traffic from a secondary ENI's
/// address leaves by that ENI.
pub const ENI_PRIMARY_IP_PRIORITY: u32 = 32765;
/// `fwmark 0x80/0x80 lookup main`: connections marked by the connmark rules leave by the primary ENI.
pub const FWMARK_PRIORITY: u32 = 1024;

/// A secondary ENI as the node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniLink {
    pub mac: [u8; 6],
    pub primary_ip: Ipv4Addr,
    pub subnet: (Ipv4Addr, u8),
    pub route_table: u32,
    pub mtu: u32,
}

impl EniLink {
    /// The VPC router: the subnet's base address plus one.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.0) + 1)
    }
}

/// The name of the link with this MAC, if any (the primary ENI's, to name it in rules and sysctls).
pub fn link_name_by_mac(mac: [u8; 6]) -> Result<Option<String>> {
    nl::run(|handle| async move {
        Ok(nl::all_links(&handle)
            .await?
            .iter()
            .find(|l| nl::link_mac(l) == Some(&mac[..]))
            .and_then(|l| nl::link_name(l).map(str::to_string)))
    })
}

/// Finds the ENI's link by MAC and gives it its MTU, its primary address, a route table with the
/// subnet gateway and a default route, and the `from <primary IP>` rule. Returns the link's name.
/// Idempotent: running it again on a configured ENI changes nothing.
pub fn setup_eni(eni: &EniLink) -> Result<String> {
    if eni.route_table == MAIN_TABLE || eni.route_table == 0 {
        return Err(Error::Invalid(format!(
            "secondary ENI {} needs a table of its own, not {}",
            nl::mac_string(&eni.mac),
            eni.route_table
        )));
    }
    nl::run(|handle| async move {
        let links = nl::all_links(&handle).await?;
        let link = links
            .iter()
            .find(|l| nl::link_mac(l) == Some(&eni.mac[..]))
            .ok_or_else(|| {
                Error::Invalid(format!("no link has MAC {}", nl::mac_string(&eni.mac)))
            })?;
        let index = link.header.index;
        let name = nl::link_name(link).unwrap_or_default().to_string();
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(eni.mtu).up().build())
            .execute()
            .await
            .context(|| format!("setting {name} up with MTU {}", eni.mtu))?;

        // The ENI carries exactly its primary address: anything else is left from an earlier use.
        let existing = nl::ipv4_addresses(&handle, index).await?;
        for (message, ip, len) in existing {
            if (ip, len) != (eni.primary_ip, eni.subnet.1) {
                tolerate_missing(handle.address().del(message).execute().await)
                    .context(|| format!("removing {ip}/{len} from {name}"))?;
            }
        }
        nl::tolerate_exists(
            handle
                .address()
                .add(index, IpAddr::V4(eni.primary_ip), eni.subnet.1)
                .execute()
                .await,
        )
        .context(|| format!("adding {}/{} to {name}", eni.primary_ip, eni.subnet.1))?;

        nl::default_via_link_gateway(&handle, index, eni.gateway(), eni.route_table).await?;

        // The kernel's subnet route in main would send traffic for the subnet out of this ENI,
        // whatever its source; the primary ENI's route must win.
        for route in nl::ipv4_routes(&handle).await? {
            if nl::route_table(&route) == MAIN_TABLE
                && nl::route_oif(&route) == Some(index)
                && nl::route_destination(&route) == Some(eni.subnet)
            {
                tolerate_missing(handle.route().del(route).execute().await)
                    .context(|| format!("deleting the subnet route of {name}"))?;
            }
        }
        add_rule(
            &handle,
            rule(
                ENI_PRIMARY_IP_PRIORITY,
                Some(eni.primary_ip),
                None,
                eni.route_table,
            ),
        )
        .await?;
        Ok(name)
    })
}

/// Removes what [`setup_eni`] added that outlives the link: the rule and the table's routes.
pub fn teardown_eni(eni: &EniLink) -> Result<()> {
    nl::run(|handle| async move {
        delete_rules(&handle, |r| {
            r.priority == ENI_PRIMARY_IP_PRIORITY && r.from == Some((eni.primary_ip, 32))
        })
        .await?;
        for route in nl::ipv4_routes(&handle).await? {
            if nl::route_table(&route) == eni.route_table {
                tolerate_missing(handle.route().del(route).execute().await)
                    .context(|| format!("flushing table {}", eni.route_table))?;
            }
        }
        Ok(())
    })
}

/// Host-wide settings for pod traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRouting {
    pub primary_interface: String,
    /// Whether connections marked by the connmark rules must be routed by main (NodePort support on,
    /// or SNAT by the node on). Off removes the rule.
    pub fwmark_rule: bool,
    pub connmark: u32,
}

/// The node's sysctls: forwarding on, loose reverse-path filtering on the primary ENI (replies to
/// pods on secondary ENIs arrive there). What the init container sets (`vpc-ipamd --init-node`).
pub fn host_sysctls(primary_interface: &str) -> Result<()> {
    nl::write_sysctl("net/ipv4/ip_forward", "1", false)?;
    nl::write_sysctl(
        &format!("net/ipv4/conf/{primary_interface}/rp_filter"),
        "2",
        false,
    )
}

/// The node's sysctls (checked: the init container set them), and the fwmark rule.
pub fn setup_host(host: &HostRouting) -> Result<()> {
    host_sysctls(&host.primary_interface)?;
    let host = host.clone();
    nl::run(|handle| async move {
        delete_rules(&handle, |r| {
            r.priority == FWMARK_PRIORITY && r.fwmark.is_some()
        })
        .await?;
        if host.fwmark_rule {
            let mut message = rule(FWMARK_PRIORITY, None, None, MAIN_TABLE);
            message
                .attributes
                .push(RuleAttribute::FwMark(host.connmark));
            message
                .attributes
                .push(RuleAttribute::FwMask(host.connmark));
            add_rule(&handle, message).await?;
        }
        Ok(())
    })
}

/// An IPv6 node: IPv6 on, forwarding on, and router advertisements still accepted on the primary
/// ENI (`accept_ra=2`; forwarding alone would stop them, and the node's default route with them).
/// `accept_ra` goes first so that there is no moment without it.
pub fn setup_host_v6(primary_interface: &str) -> Result<()> {
    nl::write_sysctl("net/ipv6/conf/all/disable_ipv6", "0", false)?;
    nl::write_sysctl(
        &format!("net/ipv6/conf/{primary_interface}/accept_ra"),
        "2",
        false,
    )?;
    nl::write_sysctl("net/ipv6/conf/all/forwarding", "1", false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_is_the_subnet_base_plus_one() {
        let eni = EniLink {
            mac: [2, 0, 0, 0, 0, 1],
            primary_ip: Ipv4Addr::new(10, 0, 32, 7),
            subnet: (Ipv4Addr::new(10, 0, 32, 0), 19),
            route_table: 2,
            mtu: 9001,
        };
        assert_eq!(eni.gateway(), Ipv4Addr::new(10, 0, 32, 1));
    }
}
