//! Wiring one pod: a veth pair, the pod's /32 behind a link-local gateway with a permanent neighbour,
//! and on the host a /32 route to the veth plus the policy rules that pick the ENI's route table.

use crate::netns::NetNs;
use crate::nl::{self, tolerate_exists, tolerate_missing};
use crate::{Context, Error, Result, MAIN_TABLE};
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr};

/// The pod's default gateway. It exists nowhere: the permanent neighbour entry sends everything to
/// the host end of the veth, which needs no address of its own.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// `to <pod> lookup main`: traffic to a pod never leaves by an ENI table.
pub const TO_POD_PRIORITY: u32 = 512;
/// `from <pod> lookup <ENI table>`: a pod on a secondary ENI leaves by that ENI.
pub const FROM_POD_PRIORITY: u32 = 1536;

/// How kernel names and MTUs are bounded; checked before anything is created.
const MTU_RANGE: std::ops::RangeInclusive<u32> = 576..=9001;

/// The pod's interface as it can be created before the pod has an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    pub host_veth: String,
    /// The interface inside the pod (CNI_IFNAME).
    pub ifname: String,
    pub mtu: u32,
}

/// The pod's address and the host table for traffic from it ([`MAIN_TABLE`] for the primary ENI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodAddress {
    pub address: Ipv4Addr,
    pub route_table: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pub link: PodLink,
    pub address: PodAddress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wired {
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
}

/// Why [`add`] failed. Either way nothing it created is left behind.
#[derive(Debug)]
pub enum AddError<E> {
    /// The caller's allocation failed.
    Allocation(E),
    /// The wiring failed; `allocated` is the address the allocation gave, if it got that far, for
    /// the caller to give back.
    Wiring {
        error: Error,
        allocated: Option<PodAddress>,
    },
}

impl PodLink {
    fn validate(&self) -> Result<()> {
        for name in [&self.host_veth, &self.ifname] {
            if name.is_empty() || name.len() > crate::names::IFNAME_MAX {
                return Err(Error::Invalid(format!(
                    "interface name {name:?} must be 1 to 15 characters"
                )));
            }
        }
        if !MTU_RANGE.contains(&self.mtu) {
            return Err(Error::Invalid(format!(
                "MTU {} is outside {}..={}",
                self.mtu,
                MTU_RANGE.start(),
                MTU_RANGE.end()
            )));
        }
        Ok(())
    }
}

/// Wires the pod. `allocate` is called for its address on this thread while the veth pair is
/// created in the pod's namespace: the daemon's answer (a checkpoint write) and the kernel's veth
/// creation are the two slowest steps of an ADD and need nothing from each other. The host end is
/// then wired here while the pod's routes and address are added there.
pub fn add<E>(
    netns: &NetNs,
    link: &PodLink,
    allocate: impl FnOnce() -> std::result::Result<PodAddress, E>,
) -> std::result::Result<(Wired, PodAddress), AddError<E>> {
    let unallocated = |error| AddError::Wiring {
        error,
        allocated: None,
    };
    link.validate().map_err(unallocated)?;
    let host = NetNs::current().map_err(unallocated)?;
    // A host veth of the same name is left from an earlier sandbox of the same pod. Asking the
    // kernel for the index is cheap, and it is almost always 0.
    if link_index(&link.host_veth) != 0 {
        remove_veth(&link.host_veth).map_err(unallocated)?;
    }
    let (host_mac, pod_mac) = (random_mac(), random_mac());
    let (created_tx, created_rx) = std::sync::mpsc::sync_channel(1);
    let (address_tx, address_rx) = std::sync::mpsc::sync_channel(1);
    let (pod_side, allocated) = netns.run_alongside(
        || {
            let macs = (host_mac, pod_mac);
            wire_pod_side(netns, link, macs, host.fd(), created_tx, address_rx)
        },
        move || {
            let allocated = allocate();
            // The pod side may have failed already and hung up; its error is reported below.
            let _ = address_tx.send(allocated.as_ref().ok().map(|a| a.address));
            allocated.map(|pod| {
                let host_side = wire_host_side(link, &pod, created_rx);
                (pod, host_side)
            })
        },
    );
    let (allocated, host_side) = match allocated {
        Ok(allocated) => allocated,
        Err(e) => {
            let _ = remove_veth(&link.host_veth);
            return Err(AddError::Allocation(e));
        }
    };
    // The pod side's error comes first: when it failed, the host side had nothing to wire.
    match pod_side.and_then(|side| side).and(host_side) {
        Ok(()) => Ok((Wired { host_mac, pod_mac }, allocated)),
        Err(error) => {
            let _ = remove(&link.host_veth, allocated.address);
            let _ = remove_veth(&link.host_veth);
            Err(AddError::Wiring {
                error,
                allocated: Some(allocated),
            })
        }
    }
}

/// The index of a link in the calling thread's namespace, 0 for none. One ioctl, where a netlink
/// lookup costs a round trip that returns the whole link (1.5 kB, a fifth of a millisecond here).
fn link_index(name: &str) -> u32 {
    let Ok(name) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}

/// The host end, once the pod side says through `created` that it exists: its IPv6 settings, up,
/// the /32 route to the pod and the pod's policy rules. The netlink connection is opened before
/// the wait.
fn wire_host_side(
    link: &PodLink,
    pod: &PodAddress,
    created: std::sync::mpsc::Receiver<()>,
) -> Result<()> {
    nl::run(|handle| async move {
        // Blocking is fine: this runtime has nothing else to do meanwhile.
        created
            .recv()
            .map_err(|_| Error::Invalid("the pod side stopped before creating the veth".into()))?;
        let index = link_index(&link.host_veth);
        if index == 0 {
            return Err(Error::Invalid(format!(
                "{} is not in the host namespace",
                link.host_veth
            )));
        }
        // The host end stays down until its IPv6 settings are written, so that it never sends a
        // router solicitation or accepts an advertisement.
        for (key, value) in [
            ("accept_ra", "0"),
            ("accept_redirects", "1"),
            ("forwarding", "0"),
        ] {
            nl::write_sysctl(
                &format!("net/ipv6/conf/{}/{key}", link.host_veth),
                value,
                true,
            )?;
        }
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .context(|| format!("bringing {} up", link.host_veth))?;
        let to_pod = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(pod.address, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        handle
            .route()
            .add(to_pod)
            .replace()
            .execute()
            .await
            .context(|| format!("adding route {}/32 dev {}", pod.address, link.host_veth))?;
        add_rule(
            &handle,
            rule(TO_POD_PRIORITY, None, Some(pod.address), MAIN_TABLE),
        )
        .await?;
        if pod.route_table != MAIN_TABLE {
            add_rule(
                &handle,
                rule(FROM_POD_PRIORITY, Some(pod.address), None, pod.route_table),
            )
            .await?;
        }
        Ok(())
    })
}

/// Runs inside the pod's namespace: creates the veth with its host end placed straight into the
/// host namespace (`host_fd`) and says so through `created`, adds the pod's gateway route, default
/// route and neighbour, then waits for the address and adds it. Returns without adding one when
/// none comes.
fn wire_pod_side(
    netns: &NetNs,
    link: &PodLink,
    (host_mac, pod_mac): ([u8; 6], [u8; 6]),
    host_fd: std::os::unix::io::RawFd,
    created: std::sync::mpsc::SyncSender<()>,
    address: std::sync::mpsc::Receiver<Option<Ipv4Addr>>,
) -> Result<()> {
    nl::run(|handle| async move {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(link.host_veth.clone())
            .mtu(link.mtu)
            .address(host_mac.to_vec())
            .setns_by_fd(host_fd)
            .build();
        let veth = LinkVeth::new(&link.ifname, &link.host_veth)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .mtu(link.mtu)
            .address(pod_mac.to_vec())
            .up()
            .build();
        // No look before creating: the kernel refuses a name that exists, one round trip less.
        match handle.link().add(veth).execute().await {
            Err(e) if nl::errno(&e) == Some(libc::EEXIST) => {
                return Err(Error::Invalid(format!(
                    "{} already exists in {}",
                    link.ifname,
                    netns.path().display()
                )))
            }
            other => {
                other.context(|| format!("creating veth {} / {}", link.ifname, link.host_veth))?
            }
        }
        // The host side may have given up already (no address); then nobody is waiting.
        let _ = created.send(());
        let index = link_index(&link.ifname);
        if index == 0 {
            return Err(Error::Invalid(format!("{} vanished", link.ifname)));
        }
        nl::default_via_link_gateway(&handle, index, GATEWAY, MAIN_TABLE).await?;
        handle
            .neighbours()
            .add(index, IpAddr::V4(GATEWAY))
            .link_layer_address(&host_mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .context(|| format!("adding neighbour {GATEWAY}"))?;
        // Blocking is fine: this runtime has nothing else to do meanwhile.
        let Ok(Some(address)) = address.recv() else {
            return Ok(());
        };
        handle
            .address()
            .add(index, IpAddr::V4(address), 32)
            .execute()
            .await
            .context(|| format!("adding {address}/32 to {}", link.ifname))
    })
}

/// Removes a pod's host routing: the rules of `address` (found by priority and address, whatever
/// their table) and its /32 route. Idempotent. When the /32 route already points at an interface
/// other than `host_veth`, the address belongs to a newer pod and nothing is touched (upstream
/// deletes the newer pod's rules in that case).
///
/// The veth is left to the runtime, which deletes the pod's namespace and with it the pair, as
/// upstream does: deleting a link waits for an RCU grace period (~20 ms here), the whole cost of a
/// DEL otherwise, while namespace teardown happens in the background.
pub fn remove(host_veth: &str, address: Ipv4Addr) -> Result<()> {
    nl::run(|handle| async move {
        let veth = nl::link_by_name(&handle, host_veth).await?;
        let veth_index = veth.as_ref().map(|l| l.header.index);
        let route = nl::ipv4_routes(&handle).await?.into_iter().find(|r| {
            nl::route_table(r) == MAIN_TABLE && nl::route_destination(r) == Some((address, 32))
        });
        let owned_by_other = match (&route, veth_index) {
            (Some(route), Some(ours)) => nl::route_oif(route) != Some(ours),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !owned_by_other {
            delete_rules(&handle, |r| {
                (r.priority == TO_POD_PRIORITY && r.to == Some((address, 32)))
                    || (r.priority == FROM_POD_PRIORITY && r.from == Some((address, 32)))
            })
            .await?;
            if let Some(route) = route {
                tolerate_missing(handle.route().del(route).execute().await)
                    .context(|| format!("deleting route {}/32", address))?;
            }
        }
        Ok(())
    })
}

/// Removes a host veth, and with it the pod's end. Idempotent.
fn remove_veth(host_veth: &str) -> Result<()> {
    nl::run(|handle| async move {
        if let Some(link) = nl::link_by_name(&handle, host_veth).await? {
            tolerate_missing(handle.link().del(link.header.index).execute().await)
                .context(|| format!("deleting {host_veth}"))?;
        }
        Ok(())
    })
}

/// Compares the pod's wiring with what the kernel has, in the pod and on the host, and returns every
/// difference in words; empty means the pod is wired as it should be.
pub fn check(netns: &NetNs, pod: &PodNetwork) -> Result<Vec<String>> {
    let (link, pod) = (&pod.link, &pod.address);
    let mut problems = Vec::new();
    let host_mac = nl::run(|handle| async move {
        let mut problems = Vec::new();
        let Some(veth) = nl::link_by_name(&handle, &link.host_veth).await? else {
            problems.push(format!("host veth {} does not exist", link.host_veth));
            return Ok((problems, None));
        };
        if !nl::link_is_up(&veth) {
            problems.push(format!("host veth {} is down", link.host_veth));
        }
        if nl::link_mtu(&veth) != Some(link.mtu) {
            problems.push(format!(
                "host veth MTU is {:?}, expected {}",
                nl::link_mtu(&veth),
                link.mtu
            ));
        }
        let routes = nl::ipv4_routes(&handle).await?;
        let to_pod = routes.iter().find(|r| {
            nl::route_table(r) == MAIN_TABLE && nl::route_destination(r) == Some((pod.address, 32))
        });
        match to_pod {
            None => problems.push(format!("host has no route to {}/32", pod.address)),
            Some(r) if nl::route_oif(r) != Some(veth.header.index) => problems.push(format!(
                "host route to {}/32 does not go to {}",
                pod.address, link.host_veth
            )),
            Some(_) => {}
        }
        let rules: Vec<_> = nl::ipv4_rules(&handle)
            .await?
            .iter()
            .map(nl::rule_view)
            .collect();
        let has = |priority: u32, from: Option<Ipv4Addr>, to: Option<Ipv4Addr>, table: u32| {
            rules.iter().any(|r| {
                r.priority == priority
                    && r.from == from.map(|ip| (ip, 32))
                    && r.to == to.map(|ip| (ip, 32))
                    && r.table == table
            })
        };
        if !has(TO_POD_PRIORITY, None, Some(pod.address), MAIN_TABLE) {
            problems.push(format!(
                "rule 'to {} lookup main priority {TO_POD_PRIORITY}' is missing",
                pod.address
            ));
        }
        if pod.route_table != MAIN_TABLE
            && !has(FROM_POD_PRIORITY, Some(pod.address), None, pod.route_table)
        {
            problems.push(format!(
                "rule 'from {} lookup {} priority {FROM_POD_PRIORITY}' is missing",
                pod.address, pod.route_table
            ));
        }
        Ok((problems, nl::link_mac(&veth).map(<[u8]>::to_vec)))
    })?;
    problems.extend(host_mac.0);
    let host_mac = host_mac.1;

    let pod_problems = netns.run(|| {
        nl::run(|handle| async move {
            let mut problems = Vec::new();
            let Some(pod_link) = nl::link_by_name(&handle, &link.ifname).await? else {
                problems.push(format!("{} does not exist in the pod", link.ifname));
                return Ok(problems);
            };
            let index = pod_link.header.index;
            if !nl::link_is_up(&pod_link) {
                problems.push(format!("{} is down", link.ifname));
            }
            if nl::link_mtu(&pod_link) != Some(link.mtu) {
                problems.push(format!(
                    "{} MTU is {:?}, expected {}",
                    link.ifname,
                    nl::link_mtu(&pod_link),
                    link.mtu
                ));
            }
            let addresses: Vec<(Ipv4Addr, u8)> = nl::ipv4_addresses(&handle, index)
                .await?
                .into_iter()
                .map(|(_, ip, len)| (ip, len))
                .collect();
            if !addresses.contains(&(pod.address, 32)) {
                problems.push(format!(
                    "{} has {addresses:?}, expected {}/32",
                    link.ifname, pod.address
                ));
            }
            let routes = nl::ipv4_routes(&handle).await?;
            let main: Vec<_> = routes
                .iter()
                .filter(|r| nl::route_table(r) == MAIN_TABLE && nl::route_oif(r) == Some(index))
                .collect();
            if !main
                .iter()
                .any(|r| nl::route_destination(r) == Some((GATEWAY, 32)))
            {
                problems.push(format!("pod has no route to {GATEWAY}/32"));
            }
            if !main.iter().any(|r| {
                nl::route_destination(r) == Some((Ipv4Addr::UNSPECIFIED, 0))
                    && nl::route_gateway(r) == Some(GATEWAY)
            }) {
                problems.push(format!("pod has no default route via {GATEWAY}"));
            }
            let neighbour = gateway_neighbour(&handle, index).await?;
            match (neighbour, &host_mac) {
                (None, _) => problems.push(format!("pod has no neighbour entry for {GATEWAY}")),
                (Some((mac, state)), Some(expected)) => {
                    if &mac != expected {
                        problems.push(format!(
                            "neighbour {GATEWAY} is {}, the host veth is {}",
                            nl::mac_string(&mac),
                            nl::mac_string(expected)
                        ));
                    }
                    if state != NeighbourState::Permanent {
                        problems.push(format!("neighbour {GATEWAY} is {state:?}, not permanent"));
                    }
                }
                (Some(_), None) => {}
            }
            Ok(problems)
        })
    })??;
    problems.extend(pod_problems);
    Ok(problems)
}

/// The host ends of pod veths (links named with `veth_prefix`), by link index.
async fn pod_veths(
    handle: &Handle,
    veth_prefix: &str,
) -> Result<std::collections::HashMap<u32, String>> {
    Ok(nl::all_links(handle)
        .await?
        .iter()
        .filter_map(|l| {
            let name = nl::link_name(l)?;
            name.starts_with(veth_prefix)
                .then(|| (l.header.index, name.to_string()))
        })
        .collect())
}

/// The pods wired on this host: each /32 route in main to a veth named with `veth_prefix`, as
/// (address, host veth name). A restarting daemon uses it to tell live pods from dead ones.
pub fn wired_addresses(veth_prefix: &str) -> Result<Vec<(Ipv4Addr, String)>> {
    nl::run(|handle| async move {
        let veths = pod_veths(&handle, veth_prefix).await?;
        Ok(nl::ipv4_routes(&handle)
            .await?
            .iter()
            .filter(|route| nl::route_table(route) == MAIN_TABLE)
            .filter_map(
                |route| match (nl::route_destination(route), nl::route_oif(route)) {
                    (Some((ip, 32)), Some(oif)) => veths.get(&oif).map(|veth| (ip, veth.clone())),
                    _ => None,
                },
            )
            .collect())
    })
}

/// Removes host state of pods that are gone: every /32 route in main to a veth named with
/// `veth_prefix` whose address is not in `keep`, that veth, and the priority-512 and -1536 rules of
/// addresses not in `keep`. Veths with no route are left alone: an ADD may be halfway through.
/// Returns what was removed, in words. (CNI GC: the runtime named every attachment still valid.)
pub fn collect_leftovers(
    veth_prefix: &str,
    keep: &std::collections::HashSet<Ipv4Addr>,
) -> Result<Vec<String>> {
    remove_host_state(veth_prefix, &|ip| !keep.contains(&ip))
}

/// Removes the host state of exactly these addresses: their /32 routes to veths named with
/// `veth_prefix`, those veths, and their priority-512 and -1536 rules. Nothing of any other
/// address is touched, however it looks: a pod interface we cannot account for (another CNI's,
/// a branch-ENI pod of upstream's) stays. Returns what was removed, in words.
pub fn remove_pods_host_state(
    veth_prefix: &str,
    addresses: &std::collections::HashSet<Ipv4Addr>,
) -> Result<Vec<String>> {
    if addresses.is_empty() {
        return Ok(Vec::new());
    }
    remove_host_state(veth_prefix, &|ip| addresses.contains(&ip))
}

fn remove_host_state(veth_prefix: &str, doomed: &dyn Fn(Ipv4Addr) -> bool) -> Result<Vec<String>> {
    nl::run(|handle| async move {
        let mut removed = Vec::new();
        let veths = pod_veths(&handle, veth_prefix).await?;
        let mut doomed_veths = std::collections::BTreeMap::new();
        for route in nl::ipv4_routes(&handle).await? {
            let (Some((ip, 32)), Some(oif)) =
                (nl::route_destination(&route), nl::route_oif(&route))
            else {
                continue;
            };
            let Some(veth) = veths.get(&oif) else {
                continue;
            };
            if nl::route_table(&route) != MAIN_TABLE || !doomed(ip) {
                continue;
            }
            tolerate_missing(handle.route().del(route).execute().await)
                .context(|| format!("deleting route {ip}/32"))?;
            removed.push(format!("route {ip}/32 dev {veth}"));
            doomed_veths.insert(oif, veth.clone());
        }
        for message in nl::ipv4_rules(&handle).await? {
            let view = nl::rule_view(&message);
            let address = match view.priority {
                TO_POD_PRIORITY => view.to,
                FROM_POD_PRIORITY => view.from,
                _ => None,
            };
            let Some((ip, 32)) = address else { continue };
            if !doomed(ip) {
                continue;
            }
            tolerate_missing(handle.rule().del(message).execute().await)
                .context(|| format!("deleting rule {view:?}"))?;
            removed.push(format!("rule priority {} for {ip}", view.priority));
        }
        for (index, name) in doomed_veths {
            tolerate_missing(handle.link().del(index).execute().await)
                .context(|| format!("deleting {name}"))?;
            removed.push(format!("veth {name}"));
        }
        Ok(removed)
    })
}

async fn gateway_neighbour(
    handle: &Handle,
    index: u32,
) -> Result<Option<(Vec<u8>, NeighbourState)>> {
    use futures::TryStreamExt;
    let neighbours: Vec<_> = handle
        .neighbours()
        .get()
        .set_family(rtnetlink::IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .context(|| "listing neighbours".into())?;
    Ok(neighbours
        .iter()
        .filter(|n| n.header.ifindex == index)
        .find(|n| {
            n.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) if *ip == GATEWAY)
            })
        })
        .map(|n| {
            let mac = n
                .attributes
                .iter()
                .find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(mac) => Some(mac.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            (mac, n.header.state)
        }))
}

/// A rule of the kind this crate writes: `[from <ip>/32] [to <ip>/32] lookup <table> priority <p>`.
pub(crate) fn rule(
    priority: u32,
    from: Option<Ipv4Addr>,
    to: Option<Ipv4Addr>,
    table: u32,
) -> RuleMessage {
    let mut message = RuleMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.action = RuleAction::ToTable;
    // Tables above 255 only fit the attribute; the header keeps the legacy byte.
    message.header.table = u8::try_from(table).unwrap_or(0);
    message.attributes.push(RuleAttribute::Table(table));
    message.attributes.push(RuleAttribute::Priority(priority));
    if let Some(ip) = from {
        message.header.src_len = 32;
        message
            .attributes
            .push(RuleAttribute::Source(IpAddr::V4(ip)));
    }
    if let Some(ip) = to {
        message.header.dst_len = 32;
        message
            .attributes
            .push(RuleAttribute::Destination(IpAddr::V4(ip)));
    }
    message
}

pub(crate) async fn add_rule(handle: &Handle, message: RuleMessage) -> Result<()> {
    let view = nl::rule_view(&message);
    let mut request = handle.rule().add();
    *request.message_mut() = message;
    tolerate_exists(request.execute().await).context(|| format!("adding rule {view:?}"))
}

/// Deletes every IPv4 rule matching `select`.
pub(crate) async fn delete_rules(
    handle: &Handle,
    select: impl Fn(&nl::RuleView) -> bool,
) -> Result<()> {
    for message in nl::ipv4_rules(handle).await? {
        let view = nl::rule_view(&message);
        if select(&view) {
            tolerate_missing(handle.rule().del(message).execute().await)
                .context(|| format!("deleting rule {view:?}"))?;
        }
    }
    Ok(())
}

/// A random locally administered unicast MAC. Upstream also lists every host link to rule out a
/// clash; with 46 random bits, a clash among 250 pods has odds below one in a billion, and the
/// listing cost 2.5 ms per ADD on a node with 50 pods, half of the whole ADD.
fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    fill_random(&mut mac);
    mac[0] = (mac[0] | 0x02) & !0x01;
    mac
}

fn fill_random(buf: &mut [u8]) {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert_eq!(n as usize, buf.len(), "getrandom failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_random_local_unicast() {
        let first = random_mac();
        assert_eq!(first[0] & 0x03, 0x02);
        assert_ne!(random_mac(), first);
    }

    #[test]
    fn bad_names_and_mtus_are_refused_before_anything_is_created() {
        let ok = PodLink {
            host_veth: "eni0123456789a".into(),
            ifname: "eth0".into(),
            mtu: 9001,
        };
        assert!(ok.validate().is_ok());
        let long = PodLink {
            ifname: "a-very-long-interface".into(),
            ..ok.clone()
        };
        assert!(long.validate().is_err());
        let tiny = PodLink { mtu: 100, ..ok };
        assert!(tiny.validate().unwrap_err().to_string().contains("MTU 100"));
    }

    #[test]
    fn rules_above_table_255_carry_the_table_attribute() {
        let message = rule(
            FROM_POD_PRIORITY,
            Some(Ipv4Addr::new(10, 0, 0, 5)),
            None,
            10101,
        );
        let view = nl::rule_view(&message);
        assert_eq!(view.table, 10101);
        assert_eq!(view.from, Some((Ipv4Addr::new(10, 0, 0, 5), 32)));
        assert_eq!(view.priority, FROM_POD_PRIORITY);
    }
}
