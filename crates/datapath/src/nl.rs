//! A netlink connection on a single-threaded runtime, and the few lookups every module needs.

use crate::{Context, Error, Result};
use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::packet_route::rule::{RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Runs `work` with a netlink connection opened in the calling thread's network namespace (the
/// socket stays bound to the namespace it was created in).
pub(crate) fn run<T, F>(work: impl FnOnce(Handle) -> F) -> Result<T>
where
    F: Future<Output = Result<T>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context(|| "starting the netlink runtime".into())?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().context(|| "opening a netlink socket".into())?;
        tokio::spawn(connection);
        work(handle).await
    })
}

pub(crate) fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| -code.get()),
        _ => None,
    }
}

/// Treats "already there" as success.
pub(crate) fn tolerate_exists(
    result: Result<(), rtnetlink::Error>,
) -> Result<(), rtnetlink::Error> {
    match result {
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// Treats "not there" as success: deletes must be idempotent.
pub(crate) fn tolerate_missing(
    result: Result<(), rtnetlink::Error>,
) -> Result<(), rtnetlink::Error> {
    match result {
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::ESRCH | libc::ENODEV)) => Ok(()),
        other => other,
    }
}

pub(crate) async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    let found = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await;
    match found {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(Error::Netlink {
            what: format!("looking up link {name}"),
            source: e,
        }),
    }
}

pub(crate) async fn all_links(handle: &Handle) -> Result<Vec<LinkMessage>> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context(|| "listing links".into())
}

pub(crate) fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

pub(crate) fn link_mac(link: &LinkMessage) -> Option<&[u8]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.as_slice()),
        _ => None,
    })
}

pub(crate) fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(mtu) => Some(*mtu),
        _ => None,
    })
}

pub(crate) fn link_is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

/// Every address message of link `index`.
async fn link_addresses(handle: &Handle, index: u32) -> Result<Vec<AddressMessage>> {
    handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .context(|| format!("listing the addresses of link {index}"))
}

fn address_of(m: &AddressMessage) -> Option<IpAddr> {
    m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    })
}

/// The IPv4 addresses on link `index`, with the messages that delete them.
pub(crate) async fn ipv4_addresses(
    handle: &Handle,
    index: u32,
) -> Result<Vec<(AddressMessage, Ipv4Addr, u8)>> {
    Ok(link_addresses(handle, index)
        .await?
        .into_iter()
        .filter_map(|m| match address_of(&m)? {
            IpAddr::V4(ip) => {
                let len = m.header.prefix_len;
                Some((m, ip, len))
            }
            IpAddr::V6(_) => None,
        })
        .collect())
}

pub(crate) async fn ipv4_routes(handle: &Handle) -> Result<Vec<RouteMessage>> {
    handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().table_id(0).build())
        .execute()
        .try_collect()
        .await
        .context(|| "listing routes".into())
}

pub(crate) async fn ipv6_routes(handle: &Handle) -> Result<Vec<RouteMessage>> {
    handle
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().table_id(0).build())
        .execute()
        .try_collect()
        .await
        .context(|| "listing IPv6 routes".into())
}

/// The IPv6 addresses on link `index`, with their flags (IFA_FLAGS, which carries more bits than the
/// header's byte).
pub(crate) async fn ipv6_addresses(
    handle: &Handle,
    index: u32,
) -> Result<Vec<(Ipv6Addr, u8, AddressFlags)>> {
    Ok(link_addresses(handle, index)
        .await?
        .into_iter()
        .filter_map(|m| {
            let IpAddr::V6(ip) = address_of(&m)? else {
                return None;
            };
            let flags = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    AddressAttribute::Flags(f) => Some(*f),
                    _ => None,
                })
                .unwrap_or_else(|| AddressFlags::from_bits_retain(m.header.flags.bits().into()));
            Some((ip, m.header.prefix_len, flags))
        })
        .collect())
}

pub(crate) fn route_destination_v6(route: &RouteMessage) -> Option<(Ipv6Addr, u8)> {
    let address = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(*ip),
        _ => None,
    });
    match (address, route.header.destination_prefix_length) {
        (Some(ip), len) => Some((ip, len)),
        (None, 0) => Some((Ipv6Addr::UNSPECIFIED, 0)),
        (None, _) => None,
    }
}

pub(crate) fn route_gateway_v6(route: &RouteMessage) -> Option<Ipv6Addr> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => Some(*ip),
        _ => None,
    })
}

pub(crate) fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(route.header.table as u32)
}

pub(crate) fn route_destination(route: &RouteMessage) -> Option<(Ipv4Addr, u8)> {
    let address = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    });
    match (address, route.header.destination_prefix_length) {
        (Some(ip), len) => Some((ip, len)),
        (None, 0) => Some((Ipv4Addr::UNSPECIFIED, 0)),
        (None, _) => None,
    }
}

pub(crate) fn route_gateway(route: &RouteMessage) -> Option<Ipv4Addr> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

pub(crate) fn route_oif(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    })
}

/// `<gateway>/32 dev <index> scope link` and `default via <gateway> dev <index>` in `table`
/// (replacing what is there): a gateway that is reachable on the link without a subnet route.
pub(crate) async fn default_via_link_gateway(
    handle: &Handle,
    index: u32,
    gateway: Ipv4Addr,
    table: u32,
) -> Result<()> {
    let gateway_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(gateway, 32)
        .output_interface(index)
        .scope(rtnetlink::packet_route::route::RouteScope::Link)
        .table_id(table)
        .build();
    handle
        .route()
        .add(gateway_route)
        .replace()
        .execute()
        .await
        .context(|| format!("adding {gateway}/32 scope link to table {table}"))?;
    let default_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gateway)
        .output_interface(index)
        .table_id(table)
        .build();
    handle
        .route()
        .add(default_route)
        .replace()
        .execute()
        .await
        .context(|| format!("adding default via {gateway} to table {table}"))
}

pub(crate) async fn ipv4_rules(handle: &Handle) -> Result<Vec<RuleMessage>> {
    handle
        .rule()
        .get(IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .context(|| "listing rules".into())
}

/// A rule as (priority, from, to, fwmark, table), the fields this crate writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuleView {
    pub priority: u32,
    pub from: Option<(Ipv4Addr, u8)>,
    pub to: Option<(Ipv4Addr, u8)>,
    pub fwmark: Option<u32>,
    pub iif: Option<String>,
    pub table: u32,
}

pub(crate) fn rule_view(rule: &RuleMessage) -> RuleView {
    let mut view = RuleView {
        priority: 0,
        from: None,
        to: None,
        fwmark: None,
        iif: None,
        table: rule.header.table as u32,
    };
    for attribute in &rule.attributes {
        match attribute {
            RuleAttribute::Priority(p) => view.priority = *p,
            RuleAttribute::Source(IpAddr::V4(ip)) => view.from = Some((*ip, rule.header.src_len)),
            RuleAttribute::Destination(IpAddr::V4(ip)) => {
                view.to = Some((*ip, rule.header.dst_len))
            }
            RuleAttribute::FwMark(mark) => view.fwmark = Some(*mark),
            RuleAttribute::Iifname(name) => view.iif = Some(name.clone()),
            RuleAttribute::Table(t) => view.table = *t,
            _ => {}
        }
    }
    view
}

pub(crate) fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Sets a sysctl (`net/ipv4/ip_forward`, slash-separated so that interface names with dots stay
/// whole) of the calling thread's namespace, unless it already has the value: the daemon's
/// container sees /proc/sys read-only, and the privileged init container (`vpc-ipamd --init-node`)
/// set the node's values before it. `tolerate_missing` covers keys that exist only on kernels with
/// IPv6.
pub(crate) fn write_sysctl(key: &str, value: &str, tolerate_missing: bool) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    match std::fs::read_to_string(&path) {
        Ok(now) if now.trim() == value => return Ok(()),
        Err(e) if tolerate_missing && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        _ => {}
    }
    match std::fs::write(&path, value) {
        Err(e) if tolerate_missing && e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e)
            if e.raw_os_error() == Some(libc::EROFS)
                || e.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            Err(e).context(|| {
                format!(
                    "writing {value} to {path} (read-only here: the init container, vpc-ipamd --init-node, sets it)"
                )
            })
        }
        other => other.context(|| format!("writing {value} to {path}")),
    }
}
