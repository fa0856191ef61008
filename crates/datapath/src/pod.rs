//! Wiring one pod: a veth pair, the pod's /32 behind a link-local gateway with a permanent neighbour,
//! and on the host a /32 route to the veth plus the policy rules that pick the ENI's route table.
//!
//! An IPv6 pod gets its /128 the same way behind `fe80::1`, with a /128 route on the host and no
//! rules (every IPv6 pod is on the primary ENI, in main). Its IPv4 egress is a second veth pair,
//! `v4if0` in the pod, whose address from 169.254.172.0/22 the node SNATs to its own on the way out.

use crate::netns::NetNs;
use crate::nl::{self, tolerate_exists, tolerate_missing};
use crate::{Context, Error, Result, MAIN_TABLE};
use rtnetlink::packet_route::address::{AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The pod's default gateway. It exists nowhere: the permanent neighbour entry sends everything to
/// the host end of the veth, which needs no address of its own.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// An IPv6 pod's default gateway, as [`GATEWAY`] is an IPv4 pod's.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The interface in an IPv6 pod that carries its IPv4 egress (upstream's name).
pub const EGRESS_IFNAME: &str = "v4if0";
/// The IPv4 egress range of IPv6 pods; `.1` is their gateway, which exists nowhere either.
pub const EGRESS_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(169, 254, 172, 0), 22);
pub const EGRESS_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 172, 1);
/// The prefix of the host ends of `v4if0` pairs, named as pod veths are.
pub const EGRESS_VETH_PREFIX: &str = "v4e";
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
    pub family: Family,
}

/// The pod's address family, known from the configuration before the daemon answers, so that each
/// family's routes can be added while the answer is awaited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    /// `egress_veth`: the host end of the pod's `v4if0`, when it has IPv4 egress.
    Ipv6 {
        egress_veth: Option<String>,
    },
}

/// The pod's address and the host table for traffic from it ([`MAIN_TABLE`] for the primary ENI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodAddress {
    pub address: IpAddr,
    pub route_table: u32,
    /// An IPv6 pod's IPv4 egress address, on `v4if0`.
    pub egress_v4: Option<Ipv4Addr>,
    pub host_routes: HostRoutes,
}

/// How the host reaches an IPv4 pod and steers its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostRoutes {
    /// A /32 route in `main` and rules by address: to the pod through `main`, from it through its
    /// route table when that is another.
    #[default]
    Main,
    /// Only through its route table, steered by interface: a branch pod in strict mode
    /// ([`crate::branch`]), which the node itself reaches through the VPC.
    Table,
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
    /// The `v4if0` pair's host and pod MACs.
    pub egress_macs: Option<([u8; 6], [u8; 6])>,
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
    /// The host ends of the pod's veth pairs.
    fn host_ends(&self) -> impl Iterator<Item = &str> {
        let egress = match &self.family {
            Family::Ipv6 {
                egress_veth: Some(veth),
            } => Some(veth.as_str()),
            _ => None,
        };
        std::iter::once(self.host_veth.as_str()).chain(egress)
    }

    fn validate(&self) -> Result<()> {
        for name in self.host_ends().chain([self.ifname.as_str()]) {
            if name.is_empty() || name.len() > crate::names::IFNAME_MAX {
                return Err(Error::Invalid(format!(
                    "interface name {name:?} must be 1 to 15 characters"
                )));
            }
        }
        // IPv6 needs links of 1280 bytes at least (RFC 8200).
        let range = match self.family {
            Family::Ipv4 => MTU_RANGE,
            Family::Ipv6 { .. } => 1280..=*MTU_RANGE.end(),
        };
        if !range.contains(&self.mtu) {
            return Err(Error::Invalid(format!(
                "MTU {} is outside {}..={}",
                self.mtu,
                range.start(),
                range.end()
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
    for end in link.host_ends() {
        if link_index(end) != 0 {
            remove_veth(end).map_err(unallocated)?;
        }
    }
    let (host_mac, pod_mac) = (random_mac(), random_mac());
    let egress_macs = link
        .host_ends()
        .nth(1)
        .map(|_| (random_mac(), random_mac()));
    let (created_tx, created_rx) = std::sync::mpsc::sync_channel(1);
    let (address_tx, address_rx) = std::sync::mpsc::sync_channel(1);
    let (pod_side, allocated) = netns.run_alongside(
        || {
            let macs = (host_mac, pod_mac);
            wire_pod_side(
                netns,
                link,
                macs,
                egress_macs,
                host.fd(),
                created_tx,
                address_rx,
            )
        },
        move || {
            let allocated = allocate();
            // The pod side may have failed already and hung up; its error is reported below.
            let _ = address_tx.send(allocated.as_ref().ok().copied());
            allocated.map(|pod| {
                let host_side = wire_host_side(link, &pod, created_rx);
                (pod, host_side)
            })
        },
    );
    let (allocated, host_side) = match allocated {
        Ok(allocated) => allocated,
        Err(e) => {
            for end in link.host_ends() {
                let _ = remove_veth(end);
            }
            return Err(AddError::Allocation(e));
        }
    };
    // The pod side's error comes first: when it failed, the host side had nothing to wire.
    match pod_side.and_then(|side| side).and(host_side) {
        Ok(()) => Ok((
            Wired {
                host_mac,
                pod_mac,
                egress_macs,
            },
            allocated,
        )),
        Err(error) => {
            let _ = remove(&link.host_veth, allocated.address);
            for end in link.host_ends() {
                let _ = remove_veth(end);
            }
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
/// the /32 (/128) route to the pod and an IPv4 pod's policy rules; then an IPv6 pod's egress end, up,
/// with the /32 route to its egress address. The netlink connection is opened before the wait.
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
        let index = host_link_index(&link.host_veth)?;
        // The host end stays down until its IPv6 settings are written, so that it never sends a
        // router solicitation or accepts an advertisement. An IPv6 pod's host end also skips
        // duplicate address detection: its link-local address is the pod's neighbour at once.
        let dad = matches!(link.family, Family::Ipv6 { .. }).then_some(("accept_dad", "0"));
        for (key, value) in [
            ("accept_ra", "0"),
            ("accept_redirects", "1"),
            ("forwarding", "0"),
        ]
        .into_iter()
        .chain(dad)
        {
            nl::write_sysctl(
                &format!("net/ipv6/conf/{}/{key}", link.host_veth),
                value,
                true,
            )?;
        }
        set_up(&handle, index, &link.host_veth).await?;
        match pod.address {
            IpAddr::V4(address) if pod.host_routes == HostRoutes::Table => {
                route_to_link_in(&handle, address, index, &link.host_veth, pod.route_table).await?;
                let mut from_pod =
                    rule(crate::branch::STRICT_PRIORITY, None, None, pod.route_table);
                from_pod
                    .attributes
                    .push(RuleAttribute::Iifname(link.host_veth.clone()));
                add_rule(&handle, from_pod).await?;
            }
            IpAddr::V4(address) => {
                route_to_link(&handle, address, index, &link.host_veth).await?;
                add_rule(
                    &handle,
                    rule(TO_POD_PRIORITY, None, Some(address), MAIN_TABLE),
                )
                .await?;
                if pod.route_table != MAIN_TABLE {
                    add_rule(
                        &handle,
                        rule(FROM_POD_PRIORITY, Some(address), None, pod.route_table),
                    )
                    .await?;
                }
            }
            IpAddr::V6(address) => {
                let to_pod = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(address, 128)
                    .output_interface(index)
                    .build();
                handle
                    .route()
                    .add(to_pod)
                    .replace()
                    .execute()
                    .await
                    .context(|| format!("adding route {address}/128 dev {}", link.host_veth))?;
            }
        }
        if let (
            Family::Ipv6 {
                egress_veth: Some(veth),
            },
            Some(egress),
        ) = (&link.family, pod.egress_v4)
        {
            let index = host_link_index(veth)?;
            set_up(&handle, index, veth).await?;
            route_to_link(&handle, egress, index, veth).await?;
        }
        Ok(())
    })
}

fn host_link_index(name: &str) -> Result<u32> {
    match link_index(name) {
        0 => Err(Error::Invalid(format!(
            "{name} is not in the host namespace"
        ))),
        index => Ok(index),
    }
}

async fn set_up(handle: &Handle, index: u32, name: &str) -> Result<()> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .context(|| format!("bringing {name} up"))
}

/// `<address>/32 dev <link> scope link` in main.
async fn route_to_link(handle: &Handle, address: Ipv4Addr, index: u32, name: &str) -> Result<()> {
    route_to_link_in(handle, address, index, name, MAIN_TABLE).await
}

async fn route_to_link_in(
    handle: &Handle,
    address: Ipv4Addr,
    index: u32,
    name: &str,
    table: u32,
) -> Result<()> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(address, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .table_id(table)
        .build();
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .context(|| format!("adding route {address}/32 dev {name} table {table}"))
}

/// Creates the veth pair `ifname` (here, `mac`) / `host_veth` (`host_mac`, placed straight into the
/// host namespace `host_fd`), up or down, and returns the pod end's index.
async fn create_veth(
    handle: &Handle,
    netns: &NetNs,
    (ifname, mac): (&str, [u8; 6]),
    (host_veth, host_mac): (&str, [u8; 6]),
    mtu: u32,
    host_fd: std::os::unix::io::RawFd,
    up: bool,
) -> Result<u32> {
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(host_veth.to_string())
        .mtu(mtu)
        .address(host_mac.to_vec())
        .setns_by_fd(host_fd)
        .build();
    let veth = LinkVeth::new(ifname, host_veth)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .mtu(mtu)
        .address(mac.to_vec());
    let veth = if up { veth.up() } else { veth }.build();
    // No look before creating: the kernel refuses a name that exists, one round trip less.
    match handle.link().add(veth).execute().await {
        Err(e) if nl::errno(&e) == Some(libc::EEXIST) => {
            return Err(Error::Invalid(format!(
                "{ifname} already exists in {}",
                netns.path().display()
            )))
        }
        other => other.context(|| format!("creating veth {ifname} / {host_veth}"))?,
    }
    match link_index(ifname) {
        0 => Err(Error::Invalid(format!("{ifname} vanished"))),
        index => Ok(index),
    }
}

async fn permanent_neighbour(handle: &Handle, index: u32, ip: IpAddr, mac: &[u8; 6]) -> Result<()> {
    handle
        .neighbours()
        .add(index, ip)
        .link_layer_address(mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .context(|| format!("adding neighbour {ip}"))
}

/// Runs inside the pod's namespace: creates the veth with its host end placed straight into the
/// host namespace (`host_fd`) and says so through `created`, adds the pod's gateway route, default
/// route and neighbour, then waits for the address and adds it. Returns without adding one when
/// none comes.
fn wire_pod_side(
    netns: &NetNs,
    link: &PodLink,
    (host_mac, pod_mac): ([u8; 6], [u8; 6]),
    egress_macs: Option<([u8; 6], [u8; 6])>,
    host_fd: std::os::unix::io::RawFd,
    created: std::sync::mpsc::SyncSender<()>,
    address: std::sync::mpsc::Receiver<Option<PodAddress>>,
) -> Result<()> {
    nl::run(|handle| async move {
        let ends = (
            (link.ifname.as_str(), pod_mac),
            (link.host_veth.as_str(), host_mac),
        );
        let egress_veth = match &link.family {
            Family::Ipv4 => {
                let index =
                    create_veth(&handle, netns, ends.0, ends.1, link.mtu, host_fd, true).await?;
                // The host side may have given up already (no address); then nobody is waiting.
                let _ = created.send(());
                nl::default_via_link_gateway(&handle, index, GATEWAY, MAIN_TABLE).await?;
                permanent_neighbour(&handle, index, IpAddr::V4(GATEWAY), &host_mac).await?;
                // Blocking is fine: this runtime has nothing else to do meanwhile.
                let Ok(Some(pod)) = address.recv() else {
                    return Ok(());
                };
                return handle
                    .address()
                    .add(index, pod.address, 32)
                    .execute()
                    .await
                    .context(|| format!("adding {}/32 to {}", pod.address, link.ifname));
            }
            Family::Ipv6 { egress_veth } => egress_veth,
        };
        // Created down: its IPv6 settings must be in place before the link comes up, so that its
        // link-local address skips duplicate address detection too.
        let index = create_veth(&handle, netns, ends.0, ends.1, link.mtu, host_fd, false).await?;
        for (key, value) in [("accept_dad", "0"), ("disable_ipv6", "0")] {
            nl::write_sysctl(
                &format!("net/ipv6/conf/{}/{key}", link.ifname),
                value,
                false,
            )?;
        }
        nl::write_sysctl("net/ipv6/conf/lo/disable_ipv6", "0", true)?;
        set_up(&handle, index, &link.ifname).await?;
        let egress = match (egress_veth, egress_macs) {
            (Some(veth), Some((egress_host_mac, egress_pod_mac))) => {
                let egress_index = create_veth(
                    &handle,
                    netns,
                    (EGRESS_IFNAME, egress_pod_mac),
                    (veth, egress_host_mac),
                    link.mtu,
                    host_fd,
                    true,
                )
                .await?;
                Some((egress_index, egress_host_mac))
            }
            _ => None,
        };
        let _ = created.send(());
        let default = RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(GATEWAY_V6)
            .output_interface(index)
            .build();
        handle
            .route()
            .add(default)
            .replace()
            .execute()
            .await
            .context(|| format!("adding default via {GATEWAY_V6}"))?;
        permanent_neighbour(&handle, index, IpAddr::V6(GATEWAY_V6), &host_mac).await?;
        if let Some((egress_index, egress_host_mac)) = egress {
            nl::default_via_link_gateway(&handle, egress_index, EGRESS_GATEWAY, MAIN_TABLE).await?;
            let gateway = IpAddr::V4(EGRESS_GATEWAY);
            permanent_neighbour(&handle, egress_index, gateway, &egress_host_mac).await?;
        }
        let Ok(Some(pod)) = address.recv() else {
            return Ok(());
        };
        // No duplicate address detection: the /80 is this node's alone, so a duplicate cannot
        // exist, and waiting for it costs upstream about 1.5 s per pod.
        let mut add = handle.address().add(index, pod.address, 128);
        add.message_mut().header.flags = AddressHeaderFlags::Nodad;
        add.execute()
            .await
            .context(|| format!("adding {}/128 to {}", pod.address, link.ifname))?;
        if let (Some((egress_index, _)), Some(egress)) = (egress, pod.egress_v4) {
            handle
                .address()
                .add(egress_index, IpAddr::V4(egress), 32)
                .execute()
                .await
                .context(|| format!("adding {egress}/32 to {EGRESS_IFNAME}"))?;
        }
        Ok(())
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
pub fn remove(host_veth: &str, address: IpAddr) -> Result<()> {
    nl::run(|handle| async move {
        let veth = nl::link_by_name(&handle, host_veth).await?;
        let veth_index = veth.as_ref().map(|l| l.header.index);
        let route = match address {
            IpAddr::V4(address) => nl::ipv4_routes(&handle).await?.into_iter().find(|r| {
                nl::route_table(r) == MAIN_TABLE && nl::route_destination(r) == Some((address, 32))
            }),
            IpAddr::V6(address) => nl::ipv6_routes(&handle).await?.into_iter().find(|r| {
                nl::route_table(r) == MAIN_TABLE
                    && nl::route_destination_v6(r) == Some((address, 128))
            }),
        };
        let owned_by_other = match (&route, veth_index) {
            (Some(route), Some(ours)) => nl::route_oif(route) != Some(ours),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !owned_by_other {
            if let IpAddr::V4(address) = address {
                delete_rules(&handle, |r| {
                    (r.priority == TO_POD_PRIORITY && r.to == Some((address, 32)))
                        || (r.priority == FROM_POD_PRIORITY && r.from == Some((address, 32)))
                })
                .await?;
            }
            if let Some(route) = route {
                tolerate_missing(handle.route().del(route).execute().await)
                    .context(|| format!("deleting the route to {address}"))?;
            }
        }
        Ok(())
    })
}

/// Removes the host's route to an IPv6 pod's egress address through `egress_veth`, if it goes
/// there (the address may already be another pod's). Idempotent; the pair itself goes with the
/// pod's namespace.
pub fn remove_egress(egress_veth: &str, address: Ipv4Addr) -> Result<()> {
    nl::run(|handle| async move {
        let Some(veth) = nl::link_by_name(&handle, egress_veth).await? else {
            return Ok(());
        };
        let route = nl::ipv4_routes(&handle).await?.into_iter().find(|r| {
            nl::route_table(r) == MAIN_TABLE
                && nl::route_destination(r) == Some((address, 32))
                && nl::route_oif(r) == Some(veth.header.index)
        });
        if let Some(route) = route {
            tolerate_missing(handle.route().del(route).execute().await)
                .context(|| format!("deleting route {address}/32"))?;
        }
        Ok(())
    })
}

/// Removes a host veth, and with it the pod's end. Idempotent.
pub(crate) fn remove_veth(host_veth: &str) -> Result<()> {
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
    let address = match pod.address {
        IpAddr::V4(address) => address,
        IpAddr::V6(address) => return check_v6(netns, link, address, pod.egress_v4),
    };
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
        let host_table = match pod.host_routes {
            HostRoutes::Main => MAIN_TABLE,
            HostRoutes::Table => pod.route_table,
        };
        let routes = nl::ipv4_routes(&handle).await?;
        let to_pod = routes.iter().find(|r| {
            nl::route_table(r) == host_table && nl::route_destination(r) == Some((address, 32))
        });
        match to_pod {
            None => problems.push(format!(
                "host has no route to {address}/32 in table {host_table}"
            )),
            Some(r) if nl::route_oif(r) != Some(veth.header.index) => problems.push(format!(
                "host route to {}/32 does not go to {}",
                address, link.host_veth
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
        // Steered by interface instead (crate::branch::check).
        if pod.host_routes == HostRoutes::Table {
            return Ok((problems, nl::link_mac(&veth).map(<[u8]>::to_vec)));
        }
        if !has(TO_POD_PRIORITY, None, Some(address), MAIN_TABLE) {
            problems.push(format!(
                "rule 'to {} lookup main priority {TO_POD_PRIORITY}' is missing",
                address
            ));
        }
        if pod.route_table != MAIN_TABLE
            && !has(FROM_POD_PRIORITY, Some(address), None, pod.route_table)
        {
            problems.push(format!(
                "rule 'from {} lookup {} priority {FROM_POD_PRIORITY}' is missing",
                address, pod.route_table
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
            if !addresses.contains(&(address, 32)) {
                problems.push(format!(
                    "{} has {addresses:?}, expected {}/32",
                    link.ifname, address
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
            let neighbour = neighbour(&handle, index, IpAddr::V4(GATEWAY)).await?;
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

/// [`check`] for an IPv6 pod: the host's /128 route to its veth, the /128 on its interface (not
/// tentative), its default route via [`GATEWAY_V6`] and that neighbour, and its egress address.
fn check_v6(
    netns: &NetNs,
    link: &PodLink,
    address: Ipv6Addr,
    egress: Option<Ipv4Addr>,
) -> Result<Vec<String>> {
    let (mut problems, host_mac) = nl::run(|handle| async move {
        let mut problems = Vec::new();
        let Some(veth) = nl::link_by_name(&handle, &link.host_veth).await? else {
            problems.push(format!("host veth {} does not exist", link.host_veth));
            return Ok((problems, None));
        };
        let to_pod = nl::ipv6_routes(&handle).await?.into_iter().find(|r| {
            nl::route_table(r) == MAIN_TABLE && nl::route_destination_v6(r) == Some((address, 128))
        });
        match to_pod {
            None => problems.push(format!("host has no route to {address}/128")),
            Some(r) if nl::route_oif(&r) != Some(veth.header.index) => problems.push(format!(
                "host route to {address}/128 does not go to {}",
                link.host_veth
            )),
            Some(_) => {}
        }
        Ok((problems, nl::link_mac(&veth).map(<[u8]>::to_vec)))
    })?;
    problems.extend(netns.run(|| {
        nl::run(|handle| async move {
            let mut problems = Vec::new();
            let Some(pod_link) = nl::link_by_name(&handle, &link.ifname).await? else {
                problems.push(format!("{} does not exist in the pod", link.ifname));
                return Ok(problems);
            };
            let index = pod_link.header.index;
            let addresses = nl::ipv6_addresses(&handle, index).await?;
            match addresses
                .iter()
                .find(|(ip, len, _)| (*ip, *len) == (address, 128))
            {
                None => problems.push(format!("{} does not have {address}/128", link.ifname)),
                Some((_, _, flags)) if flags.contains(AddressFlags::Tentative) => {
                    problems.push(format!("{address} is still tentative"))
                }
                Some(_) => {}
            }
            let default = nl::ipv6_routes(&handle).await?.into_iter().any(|r| {
                nl::route_table(&r) == MAIN_TABLE
                    && nl::route_oif(&r) == Some(index)
                    && nl::route_destination_v6(&r) == Some((Ipv6Addr::UNSPECIFIED, 0))
                    && nl::route_gateway_v6(&r) == Some(GATEWAY_V6)
            });
            if !default {
                problems.push(format!("pod has no default route via {GATEWAY_V6}"));
            }
            match (
                neighbour(&handle, index, IpAddr::V6(GATEWAY_V6)).await?,
                &host_mac,
            ) {
                (Some((mac, NeighbourState::Permanent)), Some(expected)) if &mac == expected => {}
                (found, _) => problems.push(format!(
                    "neighbour {GATEWAY_V6} is {:?}, expected the host veth's MAC, permanent",
                    found.map(|(mac, state)| (nl::mac_string(&mac), state))
                )),
            }
            if let Some(egress) = egress {
                let found = match nl::link_by_name(&handle, EGRESS_IFNAME).await? {
                    Some(l) => nl::ipv4_addresses(&handle, l.header.index)
                        .await?
                        .iter()
                        .any(|(_, ip, len)| (*ip, *len) == (egress, 32)),
                    None => false,
                };
                if !found {
                    problems.push(format!("{EGRESS_IFNAME} does not have {egress}/32"));
                }
            }
            Ok(problems)
        })
    })??);
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

/// The routes in main to pod veths (links named with `veth_prefix`): /32s and /128s, as (address,
/// route, veth index).
async fn pod_routes(
    handle: &Handle,
    veths: &std::collections::HashMap<u32, String>,
) -> Result<Vec<(IpAddr, rtnetlink::packet_route::route::RouteMessage, u32)>> {
    let v4 = nl::ipv4_routes(handle)
        .await?
        .into_iter()
        .filter_map(|route| match nl::route_destination(&route) {
            Some((ip, 32)) => Some((IpAddr::V4(ip), route)),
            _ => None,
        });
    let v6 = nl::ipv6_routes(handle)
        .await?
        .into_iter()
        .filter_map(|route| match nl::route_destination_v6(&route) {
            Some((ip, 128)) => Some((IpAddr::V6(ip), route)),
            _ => None,
        });
    Ok(v4
        .chain(v6)
        .filter(|(_, route)| nl::route_table(route) == MAIN_TABLE)
        .filter_map(|(ip, route)| {
            let oif = nl::route_oif(&route).filter(|oif| veths.contains_key(oif))?;
            Some((ip, route, oif))
        })
        .collect())
}

/// The pods wired on this host: each /32 or /128 route in main to a veth named with `veth_prefix`,
/// as (address, host veth name). A restarting daemon uses it to tell live pods from dead ones.
pub fn wired_addresses(veth_prefix: &str) -> Result<Vec<(IpAddr, String)>> {
    nl::run(|handle| async move {
        let veths = pod_veths(&handle, veth_prefix).await?;
        Ok(pod_routes(&handle, &veths)
            .await?
            .into_iter()
            .map(|(ip, _, oif)| (ip, veths[&oif].clone()))
            .collect())
    })
}

/// Removes host state of pods that are gone: every /32 or /128 route in main to a veth named with
/// `veth_prefix` whose address is not in `keep`, that veth, and the priority-512 and -1536 rules of
/// addresses not in `keep`. Veths with no route are left alone: an ADD may be halfway through.
/// Branch pods' are never removed here ([`crate::branch::standard_pods`]). Returns what was
/// removed, in words. (CNI GC: the runtime named every attachment still valid.)
pub fn collect_leftovers(
    veth_prefix: &str,
    keep: &std::collections::HashSet<IpAddr>,
) -> Result<Vec<String>> {
    let branch_pods = nl::run(|handle| async move { crate::branch::standard_pods(&handle).await })?;
    remove_host_state(veth_prefix, &|ip| {
        !keep.contains(&ip) && !matches!(ip, IpAddr::V4(v4) if branch_pods.contains(&v4))
    })
}

/// Removes the host state of exactly these addresses: their routes to veths named with
/// `veth_prefix`, those veths, and their priority-512 and -1536 rules. Nothing of any other
/// address is touched, however it looks: a pod interface we cannot account for (another CNI's,
/// a branch-ENI pod of upstream's) stays. Returns what was removed, in words.
pub fn remove_pods_host_state(
    veth_prefix: &str,
    addresses: &std::collections::HashSet<IpAddr>,
) -> Result<Vec<String>> {
    if addresses.is_empty() {
        return Ok(Vec::new());
    }
    remove_host_state(veth_prefix, &|ip| addresses.contains(&ip))
}

fn remove_host_state(veth_prefix: &str, doomed: &dyn Fn(IpAddr) -> bool) -> Result<Vec<String>> {
    nl::run(|handle| async move {
        let mut removed = Vec::new();
        let veths = pod_veths(&handle, veth_prefix).await?;
        let mut doomed_veths = std::collections::BTreeMap::new();
        for (ip, route, oif) in pod_routes(&handle, &veths).await? {
            if !doomed(ip) {
                continue;
            }
            let veth = &veths[&oif];
            tolerate_missing(handle.route().del(route).execute().await)
                .context(|| format!("deleting the route to {ip}"))?;
            removed.push(format!("route {ip} dev {veth}"));
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
            if !doomed(IpAddr::V4(ip)) {
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

async fn neighbour(
    handle: &Handle,
    index: u32,
    ip: IpAddr,
) -> Result<Option<(Vec<u8>, NeighbourState)>> {
    use futures::TryStreamExt;
    let family = match ip {
        IpAddr::V4(_) => rtnetlink::IpVersion::V4,
        IpAddr::V6(_) => rtnetlink::IpVersion::V6,
    };
    let neighbours: Vec<_> = handle
        .neighbours()
        .get()
        .set_family(family)
        .execute()
        .try_collect()
        .await
        .context(|| "listing neighbours".into())?;
    let destination = |a: &NeighbourAttribute| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(found)) => IpAddr::V4(*found) == ip,
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(found)) => IpAddr::V6(*found) == ip,
        _ => false,
    };
    Ok(neighbours
        .iter()
        .filter(|n| n.header.ifindex == index)
        .find(|n| n.attributes.iter().any(destination))
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
            family: Family::Ipv4,
        };
        assert!(ok.validate().is_ok());
        let long = PodLink {
            ifname: "a-very-long-interface".into(),
            ..ok.clone()
        };
        assert!(long.validate().is_err());
        let tiny = PodLink {
            mtu: 100,
            ..ok.clone()
        };
        assert!(tiny.validate().unwrap_err().to_string().contains("MTU 100"));
        let v6 = |mtu, egress_veth: &str| PodLink {
            mtu,
            family: Family::Ipv6 {
                egress_veth: Some(egress_veth.into()),
            },
            ..ok.clone()
        };
        assert!(v6(1280, "v4e0123456789a").validate().is_ok());
        let small = v6(1279, "v4e0123456789a").validate().unwrap_err();
        assert!(small.to_string().contains("outside 1280..=9001"), "{small}");
        assert!(v6(1500, "v4e0123456789abcdef").validate().is_err());
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
