//! A pod with a branch ENI of its own (security groups for pods), wired as upstream's plugin wires
//! one: the usual veth pair; the branch as VLAN `vlan.eth.<vlan>` of the trunk ENI's link, with the
//! branch's MAC; route table `vlan + 100` holding the way out through the VLAN (default via the
//! subnet's router) and the way in to the pod.
//!
//! * **Strict** (`POD_SECURITY_GROUP_ENFORCING_MODE=strict`, the default): the pod's traffic is
//!   steered by interface at priority [`STRICT_PRIORITY`], from the pod's veth and from the VLAN both
//!   to the branch's table, and the host has no route of its own to the pod. So everything the pod
//!   sends leaves through its branch, and everything it receives came in through it, other pods of
//!   the node and the node itself (kubelet's probes) included: the security groups see it all. This
//!   takes the `local` table moved below those rules (the node's set-up, [`crate::node`]) and TCP's
//!   early demultiplexing off, or replies to the node's own probes never reach their socket.
//! * **Standard**: the usual rules: to the pod through `main` (priority 512), from it through the
//!   branch's table (1536); traffic within the node stays there.

use crate::nl::{self, tolerate_missing};
use crate::pod::{self, AddError, HostRoutes, PodAddress, PodLink, Wired};
use crate::{Context, Error, Result};
use rtnetlink::packet_route::rule::RuleMessage;
use rtnetlink::{Handle, LinkUnspec, LinkVlan};
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

/// Rules of strict mode; below them, the `local` table at [`LOCAL_PRIORITY`].
pub const STRICT_PRIORITY: u32 = 10;
/// Where strict mode puts the rule for the `local` table (0 on a stock kernel).
pub const LOCAL_PRIORITY: u32 = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcing {
    Strict,
    Standard,
}

/// A pod's branch ENI, as the daemon hands it over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchLink {
    pub vlan: u16,
    pub mac: [u8; 6],
    pub address: Ipv4Addr,
    /// The branch's subnet, whose first address is its router.
    pub subnet: (Ipv4Addr, u8),
    /// The trunk ENI's MAC: its link on the host, whatever its name, carries the VLAN.
    pub trunk_mac: [u8; 6],
}

/// `vlan.eth.<vlan>`, upstream's name.
pub fn vlan_link(vlan: u16) -> String {
    format!("vlan.eth.{vlan}")
}

/// `vlan + 100`, upstream's table.
pub fn route_table(vlan: u16) -> u32 {
    u32::from(vlan) + 100
}

fn router(subnet: (Ipv4Addr, u8)) -> Ipv4Addr {
    let mask = u32::MAX.checked_shl(32 - u32::from(subnet.1)).unwrap_or(0);
    Ipv4Addr::from((u32::from(subnet.0) & mask) + 1)
}

fn iif_rule(link: &str, table: u32) -> RuleMessage {
    let mut rule = pod::rule(STRICT_PRIORITY, None, None, table);
    rule.attributes
        .push(rtnetlink::packet_route::rule::RuleAttribute::Iifname(
            link.to_string(),
        ));
    rule
}

/// How the host reaches a branch pod in each mode.
pub fn host_routes(enforcing: Enforcing) -> HostRoutes {
    match enforcing {
        Enforcing::Strict => HostRoutes::Table,
        Enforcing::Standard => HostRoutes::Main,
    }
}

/// Wires the pod with its branch as the plugin does: the pod first, then its VLAN ([`finish`]).
/// Nothing is left behind when it fails.
pub fn add(
    netns: &crate::netns::NetNs,
    link: &PodLink,
    branch: &BranchLink,
    enforcing: Enforcing,
) -> Result<Wired> {
    let address = PodAddress {
        address: IpAddr::V4(branch.address),
        route_table: route_table(branch.vlan),
        egress_v4: None,
        host_routes: host_routes(enforcing),
    };
    let (wired, _) = pod::add(netns, link, || Ok::<_, Error>(address)).map_err(|e| match e {
        AddError::Allocation(e) | AddError::Wiring { error: e, .. } => e,
    })?;
    finish(&link.host_veth, branch, enforcing)?;
    Ok(wired)
}

/// The plugin's second half, once the pod is wired with [`crate::pod::add`] for a branch: its
/// VLAN. When that fails, the pod's host state goes, its veth too, and the error is returned.
pub fn finish(host_veth: &str, branch: &BranchLink, enforcing: Enforcing) -> Result<()> {
    wire_vlan(branch, enforcing).inspect_err(|_| {
        let _ = remove(host_veth, branch.vlan, &branch.mac, branch.address);
        let _ = pod::remove_veth(host_veth);
    })
}

/// The VLAN link (created, or taken over when it is there with the branch's MAC), its table's
/// routes, and in strict mode its rule. The plugin calls it once the pod is wired ([`add`] does
/// both, in the other order).
pub fn wire_vlan(branch: &BranchLink, enforcing: Enforcing) -> Result<()> {
    if !(1..=4094).contains(&branch.vlan) {
        return Err(Error::Invalid(format!(
            "VLAN id {} is outside 1..=4094",
            branch.vlan
        )));
    }
    let name = vlan_link(branch.vlan);
    let table = route_table(branch.vlan);
    nl::run(|handle| async move {
        let index = match nl::link_by_name(&handle, &name).await? {
            Some(existing) => {
                if nl::link_mac(&existing) != Some(&branch.mac[..]) {
                    return Err(Error::Invalid(format!(
                        "{name} exists with another MAC address than the branch's: another pod's \
                         VLAN, or a leftover"
                    )));
                }
                existing.header.index
            }
            None => create_vlan(&handle, branch, &name).await?,
        };
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .context(|| format!("bringing {name} up"))?;
        nl::default_via_link_gateway(&handle, index, router(branch.subnet), table).await?;
        if enforcing == Enforcing::Strict {
            pod::add_rule(&handle, iif_rule(&name, table)).await?;
        }
        Ok(())
    })
}

async fn create_vlan(handle: &Handle, branch: &BranchLink, name: &str) -> Result<u32> {
    let trunk = nl::all_links(handle)
        .await?
        .into_iter()
        .find(|l| nl::link_mac(l) == Some(&branch.trunk_mac[..]))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "the trunk ENI ({}) has no link on the host",
                nl::mac_string(&branch.trunk_mac)
            ))
        })?;
    let trunk_name = nl::link_name(&trunk).unwrap_or_default().to_string();
    let vlan = LinkVlan::new(name, trunk.header.index, branch.vlan)
        .address(branch.mac.to_vec())
        .build();
    match handle.link().add(vlan).execute().await {
        Err(e) if nl::errno(&e) == Some(libc::EOPNOTSUPP) => {
            return Err(Error::Invalid(format!(
            "this kernel cannot create VLAN links (no 802.1Q support): {name} for the branch ENI"
        )))
        }
        other => other.context(|| format!("creating VLAN {name} on {trunk_name}"))?,
    }
    nl::link_by_name(handle, name)
        .await?
        .map(|l| l.header.index)
        .ok_or_else(|| Error::Invalid(format!("{name} vanished")))
}

/// Removes what [`add`] put on the host for the pod at `address` behind VLAN `vlan` of the branch
/// with `mac`: the pod's rules of either mode and its routes, and the VLAN link with its rule and
/// table when the link is the branch's (its MAC): a link of that name with another MAC is another
/// branch's now, and stays. Idempotent. The veth goes with the pod's namespace. Needs nothing the
/// pod's prevResult does not keep, so a DEL can clean up without the daemon.
pub fn remove(host_veth: &str, vlan: u16, mac: &[u8; 6], address: Ipv4Addr) -> Result<()> {
    let name = vlan_link(vlan);
    let table = route_table(vlan);
    pod::remove(host_veth, IpAddr::V4(address))?;
    nl::run(|handle| async move {
        let vlan = nl::link_by_name(&handle, &name).await?;
        let ours = vlan
            .as_ref()
            .is_none_or(|l| nl::link_mac(l) == Some(&mac[..]));
        pod::delete_rules(&handle, |r| {
            r.priority == STRICT_PRIORITY
                && r.table == table
                && (r.iif.as_deref() == Some(host_veth)
                    || (ours && r.iif.as_deref() == Some(&name)))
        })
        .await?;
        for route in nl::ipv4_routes(&handle).await? {
            let to_pod = nl::route_destination(&route) == Some((address, 32));
            if nl::route_table(&route) == table && (ours || to_pod) {
                tolerate_missing(handle.route().del(route).execute().await)
                    .context(|| format!("deleting a route of table {table}"))?;
            }
        }
        if let (Some(link), true) = (vlan, ours) {
            tolerate_missing(handle.link().del(link.header.index).execute().await)
                .context(|| format!("deleting {name}"))?;
        }
        Ok(())
    })
}

/// CHECK's part for the branch: what [`wire_vlan`] and, in strict mode, the pod's rule by its veth
/// set up, each difference in words; empty when it is all there.
pub fn check(host_veth: &str, branch: &BranchLink, enforcing: Enforcing) -> Result<Vec<String>> {
    let name = vlan_link(branch.vlan);
    let table = route_table(branch.vlan);
    nl::run(|handle| async move {
        let mut problems = Vec::new();
        match nl::link_by_name(&handle, &name).await? {
            None => problems.push(format!("{name} does not exist")),
            Some(link) => {
                if nl::link_mac(&link) != Some(&branch.mac[..]) {
                    problems.push(format!(
                        "{name} does not have the branch's MAC {}",
                        nl::mac_string(&branch.mac)
                    ));
                }
                if !nl::link_is_up(&link) {
                    problems.push(format!("{name} is down"));
                }
                let out = nl::ipv4_routes(&handle).await?.iter().any(|r| {
                    nl::route_table(r) == table
                        && nl::route_destination(r) == Some((Ipv4Addr::UNSPECIFIED, 0))
                        && nl::route_oif(r) == Some(link.header.index)
                });
                if !out {
                    problems.push(format!("table {table} has no default route through {name}"));
                }
            }
        }
        if enforcing == Enforcing::Strict {
            let rules: Vec<_> = nl::ipv4_rules(&handle)
                .await?
                .iter()
                .map(nl::rule_view)
                .collect();
            for link in [host_veth, name.as_str()] {
                let found = rules.iter().any(|r| {
                    r.priority == STRICT_PRIORITY
                        && r.table == table
                        && r.iif.as_deref() == Some(link)
                });
                if !found {
                    problems.push(format!(
                        "rule 'iif {link} lookup {table} priority {STRICT_PRIORITY}' is missing"
                    ));
                }
            }
        }
        Ok(problems)
    })
}

/// The addresses of standard-mode branch pods wired on this host: a from-pod rule (priority
/// [`pod::FROM_POD_PRIORITY`]) into the table of a `vlan.eth.<vlan>` link that is there. CNI GC
/// leaves them alone whatever the daemon keeps: on EKS their branch is the controller's, which the
/// daemon does not hold, and their DEL removes them (strict-mode pods have nothing GC looks at).
pub(crate) async fn standard_pods(handle: &Handle) -> Result<HashSet<Ipv4Addr>> {
    let tables: HashSet<u32> = nl::all_links(handle)
        .await?
        .iter()
        .filter_map(|l| nl::link_name(l)?.strip_prefix("vlan.eth.")?.parse().ok())
        .map(route_table)
        .collect();
    Ok(nl::ipv4_rules(handle)
        .await?
        .iter()
        .map(nl::rule_view)
        .filter(|r| r.priority == pod::FROM_POD_PRIORITY && tables.contains(&r.table))
        .filter_map(|r| match r.from {
            Some((ip, 32)) => Some(ip),
            _ => None,
        })
        .collect())
}

/// The node's part of strict mode: the `local` table's rule moved from priority 0 to
/// [`LOCAL_PRIORITY`], below the pods' rules, so that a branch pod's packets to the node's own
/// addresses leave through its branch too; and TCP's early demultiplexing off, which would otherwise
/// hand a reply that comes back through the VPC to a socket by the route of another interface, and
/// drop it (kubelet's probes fail). Idempotent.
pub fn setup_strict_node() -> Result<()> {
    nl::write_sysctl("net/ipv4/tcp_early_demux", "0", false)?;
    nl::run(|handle| async move {
        let local = pod::rule(LOCAL_PRIORITY, None, None, LOCAL_TABLE);
        pod::add_rule(&handle, local).await?;
        pod::delete_rules(&handle, |r| r.priority == 0 && r.table == LOCAL_TABLE).await
    })
}

/// The kernel's `local` table.
const LOCAL_TABLE: u32 = 255;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_names_and_the_subnets_router() {
        assert_eq!(vlan_link(7), "vlan.eth.7");
        assert_eq!(route_table(7), 107);
        assert_eq!(
            router((Ipv4Addr::new(10, 0, 5, 77), 20)),
            Ipv4Addr::new(10, 0, 0, 1)
        );
    }
}
