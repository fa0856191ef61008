//! Branch pods (security groups for pods) wired by `datapath::branch` in real namespaces, on a trunk
//! whose wire carries real 802.1Q frames (`testbed::vlan`: this kernel has no VLAN links, so the
//! sub-interfaces are emulated on both ends; the plugin adopts the node's). The "VPC" namespace is
//! the subnet's router: it delivers to each branch by its VLAN, and counts what it forwards, which
//! is what its security groups would see. Needs root; skipped, loudly, without it.

use datapath::branch::{self, BranchLink, Enforcing};
use datapath::pod::{self, Family, PodLink};
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;
use testbed::netns::{ip, nft, sysctl, Netns};
use testbed::probe::{seen_as, WhoAmI};
use testbed::vlan::{self, VlanPort};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const ROUTER: &str = "10.0.0.1";
const TRUNK_MAC: [u8; 6] = [0x02, 0x7a, 0, 0, 0, 1];

fn root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED {test}: needs root (network namespaces, eBPF)");
    }
    root
}

fn pod_ip(vlan: u16) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, vlan as u8)
}

fn branch_mac(vlan: u16) -> [u8; 6] {
    [0x02, 0xb0, 0, 0, 0, vlan as u8]
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The VPC router, the node (its primary ENI and its trunk) and their wires.
struct Vpc {
    router: Netns,
    node: Netns,
    ports: Vec<VlanPort>,
}

impl Vpc {
    fn build() -> Vpc {
        let router = Netns::create("brvpc").unwrap();
        let node = Netns::create("brnode").unwrap();
        let (r, n) = (router.name.as_str(), node.name.as_str());
        for ns in [r, n] {
            sysctl(ns, "net.ipv4.ip_forward", "1").unwrap();
        }
        for args in [
            vec![
                "-n", r, "link", "add", "tonode", "type", "veth", "peer", "name", "eth0", "netns",
                n,
            ],
            vec!["-n", r, "addr", "add", "10.0.1.1/24", "dev", "tonode"],
            vec!["-n", r, "link", "set", "tonode", "up"],
            vec!["-n", n, "addr", "add", "10.0.1.10/24", "dev", "eth0"],
            vec!["-n", n, "link", "set", "eth0", "up"],
            vec!["-n", n, "route", "add", "default", "via", "10.0.1.1"],
            vec![
                "-n", r, "link", "add", "trunk", "type", "veth", "peer", "name", "trunk", "netns",
                n,
            ],
            vec!["-n", r, "link", "set", "trunk", "up"],
            vec![
                "-n",
                n,
                "link",
                "set",
                "trunk",
                "address",
                &mac_text(TRUNK_MAC),
            ],
            vec!["-n", n, "link", "set", "trunk", "up"],
        ] {
            ip(&args).unwrap();
        }
        // What the router forwards between the branches and the node: what security groups judge.
        // By port: a frame reaches br5 only when it came tagged with VLAN 5.
        nft(
            r,
            "table inet seen {\n chain forward {\n  type filter hook forward priority 0; policy accept;\n  \
             iifname \"br5\" oifname \"br6\" ip saddr 10.0.0.5 ip daddr 10.0.0.6 counter\n  \
             iifname \"tonode\" oifname \"br5\" ip saddr 10.0.1.10 ip daddr 10.0.0.5 counter\n }\n}\n",
        )
        .unwrap();
        Vpc {
            router,
            node,
            ports: Vec::new(),
        }
    }

    /// The branch with VLAN `vlan`: the router's end delivers the pod's address to it; the node's
    /// end is the link the plugin adopts.
    fn branch(&mut self, vlan: u16) -> BranchLink {
        let r = self.router.name.clone();
        let port = format!("br{vlan}");
        self.ports.push(
            vlan::add(
                &self.router.name,
                "trunk",
                vlan,
                &port,
                &format!("02:0e:00:00:00:{vlan:02x}"),
            )
            .unwrap(),
        );
        let pod = pod_ip(vlan).to_string();
        let mac = mac_text(branch_mac(vlan));
        for args in [
            vec![
                "-n",
                &r,
                "addr",
                "add",
                &format!("{ROUTER}/32"),
                "dev",
                &port,
            ],
            vec!["-n", &r, "route", "add", &format!("{pod}/32"), "dev", &port],
            vec![
                "-n",
                &r,
                "neigh",
                "replace",
                &pod,
                "lladdr",
                &mac,
                "dev",
                &port,
                "nud",
                "permanent",
            ],
        ] {
            ip(&args).unwrap();
        }
        self.ports.push(
            vlan::add(
                &self.node.name,
                "trunk",
                vlan,
                &branch::vlan_link(vlan),
                &mac,
            )
            .unwrap(),
        );
        self.branch_link(vlan)
    }

    fn branch_link(&self, vlan: u16) -> BranchLink {
        BranchLink {
            vlan,
            mac: branch_mac(vlan),
            address: pod_ip(vlan),
            subnet: (Ipv4Addr::new(10, 0, 0, 0), 24),
            trunk_mac: TRUNK_MAC,
        }
    }

    /// The counters of an nftables table of the router, in order.
    /// Packets the router forwarded from pod 5 to pod 6, and from the node to pod 5.
    fn forwarded(&self) -> (u64, u64) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.router.name,
                "nft",
                "list",
                "table",
                "inet",
                "seen",
            ])
            .output()
            .unwrap();
        let counts: Vec<u64> = String::from_utf8_lossy(&out.stdout)
            .split("packets ")
            .skip(1)
            .map(|s| s.split_whitespace().next().unwrap().parse().unwrap())
            .collect();
        (counts[0], counts[1])
    }
}

fn link(vlan: u16) -> PodLink {
    PodLink {
        host_veth: format!("vlan{vlan:08x}"),
        ifname: "eth0".into(),
        mtu: 9001,
        family: Family::Ipv4,
    }
}

/// A pod namespace with a branch, answering on port 80 with the caller's address.
fn pod(vpc: &mut Vpc, vlan: u16, enforcing: Enforcing) -> (Netns, WhoAmI) {
    let ns = Netns::create(&format!("brpod{vlan}")).unwrap();
    let branch = vpc.branch(vlan);
    let pod_ns = ns.open().unwrap();
    vpc.node
        .run(|| branch::add(&pod_ns, &link(vlan), &branch, enforcing))
        .unwrap()
        .unwrap();
    let listener = ns
        .run(|| WhoAmI::bind(SocketAddr::new(IpAddr::V4(pod_ip(vlan)), 80)))
        .unwrap()
        .unwrap();
    (ns, listener)
}

fn from(ns: &Netns, to: Ipv4Addr) -> Result<IpAddr, String> {
    ns.run(|| seen_as(SocketAddr::new(IpAddr::V4(to), 80)))
        .unwrap()
}

/// The node's rules, IPv4 routes of every table, and link names.
fn host_state(node: &Netns) -> String {
    let n = node.name.as_str();
    let mut all = ip(&["-n", n, "rule", "show"]).unwrap();
    all.push_str(&ip(&["-n", n, "-4", "route", "show", "table", "all"]).unwrap());
    for line in ip(&["-n", n, "-o", "link", "show"]).unwrap().lines() {
        all.push_str(line.split(": ").nth(1).unwrap_or(line));
        all.push('\n');
    }
    all
}

#[test]
fn strict_mode_sends_even_same_node_traffic_and_the_nodes_probes_through_the_vpc() {
    if !root("strict_mode_sends_even_same_node_traffic_and_the_nodes_probes_through_the_vpc") {
        return;
    }
    let mut vpc = Vpc::build();
    vpc.node.run(branch::setup_strict_node).unwrap().unwrap();
    let (a, a_listener) = pod(&mut vpc, 5, Enforcing::Strict);
    let (_b, _b_listener) = pod(&mut vpc, 6, Enforcing::Strict);

    assert_eq!(from(&a, pod_ip(6)), Ok(IpAddr::V4(pod_ip(5))));
    let (pod_to_pod, node_to_pod) = vpc.forwarded();
    assert!(
        pod_to_pod > 0,
        "pod to pod on one node went through the VPC"
    );
    // kubelet's probe: from the node's own address, through the VPC and the branch, and back.
    assert_eq!(from(&vpc.node, pod_ip(5)), Ok(IpAddr::V4(NODE_IP)));
    assert!(vpc.forwarded().1 > node_to_pod);

    let rules = ip(&["-n", &vpc.node.name, "rule", "show"]).unwrap();
    for expected in [
        "10:\tfrom all iif vlan00000005 lookup 105",
        "10:\tfrom all iif vlan.eth.5 lookup 105",
        "20:\tfrom all lookup local",
    ] {
        assert!(rules.contains(expected), "{expected:?} in\n{rules}");
    }
    assert!(
        !rules.lines().any(|l| l.starts_with("0:\t")),
        "nothing before the pods' rules: {rules}"
    );
    let main = ip(&["-n", &vpc.node.name, "route", "show"]).unwrap();
    assert!(
        !main.contains("10.0.0.5"),
        "the node has no way of its own to the pod: {main}"
    );

    // DEL leaves nothing of the pod on the host.
    let five = vpc.branch_link(5);
    vpc.node
        .run(|| branch::remove("vlan00000005", five.vlan, &five.mac, five.address))
        .unwrap()
        .unwrap();
    // The runtime deletes the pod's namespace, and the veth with it.
    drop((a_listener, a));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while host_state(&vpc.node).contains("vlan00000005") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let state = host_state(&vpc.node);
    for gone in [
        "vlan00000005",
        "vlan.eth.5",
        "lookup 105",
        "table 105",
        "10.0.0.5",
    ] {
        assert!(!state.contains(gone), "{gone} left behind:\n{state}");
    }
    assert!(
        state.contains("vlan.eth.6"),
        "the other pod keeps its branch"
    );
    // Idempotent.
    vpc.node
        .run(|| branch::remove("vlan00000005", five.vlan, &five.mac, five.address))
        .unwrap()
        .unwrap();
}

#[test]
fn standard_mode_keeps_same_node_traffic_on_the_node() {
    if !root("standard_mode_keeps_same_node_traffic_on_the_node") {
        return;
    }
    let mut vpc = Vpc::build();
    let (a, _a) = pod(&mut vpc, 5, Enforcing::Standard);
    let (_b, _b_listener) = pod(&mut vpc, 6, Enforcing::Standard);
    assert_eq!(from(&a, pod_ip(6)), Ok(IpAddr::V4(pod_ip(5))));
    assert_eq!(from(&vpc.node, pod_ip(5)), Ok(IpAddr::V4(NODE_IP)));
    assert_eq!(vpc.forwarded(), (0, 0), "nothing went through the VPC");
    let rules = ip(&["-n", &vpc.node.name, "rule", "show"]).unwrap();
    assert!(
        rules.contains("512:\tfrom all to 10.0.0.5 lookup main"),
        "{rules}"
    );
    assert!(rules.contains("1536:\tfrom 10.0.0.5 lookup 105"), "{rules}");
    assert!(!rules.contains("iif"), "{rules}");
}

/// CNI GC removes the host side of addresses the daemon does not keep, but never a wired branch
/// pod's: on EKS the daemon does not hold the controller's branches. One whose VLAN is gone (a DEL
/// that stopped halfway) is a leftover like any other.
#[test]
fn gc_leaves_branch_pods_alone_whatever_the_daemon_keeps() {
    if !root("gc_leaves_branch_pods_alone_whatever_the_daemon_keeps") {
        return;
    }
    let mut vpc = Vpc::build();
    let (a, _a) = pod(&mut vpc, 5, Enforcing::Standard);
    let (_b, _b_listener) = pod(&mut vpc, 6, Enforcing::Standard);
    let (_c, _c_listener) = pod(&mut vpc, 7, Enforcing::Standard);
    ip(&["-n", &vpc.node.name, "link", "del", "vlan.eth.7"]).unwrap();

    let removed = vpc
        .node
        .run(|| pod::collect_leftovers("vlan", &HashSet::new()))
        .unwrap()
        .unwrap();
    assert!(
        removed
            .iter()
            .any(|r| r == "route 10.0.0.7 dev vlan00000007"),
        "{removed:?}"
    );
    assert!(
        removed
            .iter()
            .all(|r| r.contains("10.0.0.7") || r.contains("vlan00000007")),
        "only pod 7's: {removed:?}"
    );
    assert_eq!(from(&a, pod_ip(6)), Ok(IpAddr::V4(pod_ip(5))));
    assert_eq!(from(&vpc.node, pod_ip(5)), Ok(IpAddr::V4(NODE_IP)));
    let rules = ip(&["-n", &vpc.node.name, "rule", "show"]).unwrap();
    assert!(rules.contains("1536:\tfrom 10.0.0.6 lookup 106"), "{rules}");
    assert!(!rules.contains("10.0.0.7"), "{rules}");
}

#[test]
fn a_branch_that_cannot_be_wired_leaves_nothing_behind() {
    if !root("a_branch_that_cannot_be_wired_leaves_nothing_behind") {
        return;
    }
    let vpc = Vpc::build();
    let before = host_state(&vpc.node);
    let pod_ns = Netns::create("brbad").unwrap();
    let netns = pod_ns.open().unwrap();
    let branch = vpc.branch_link(9);
    let refused = || {
        vpc.node
            .run(|| branch::add(&netns, &link(9), &branch, Enforcing::Strict))
            .unwrap()
            .unwrap_err()
            .to_string()
    };
    // No VLAN link to adopt, and this kernel cannot make one: a clear error.
    let e = refused();
    assert!(e.contains("VLAN") && e.contains("vlan.eth.9"), "{e}");
    // A VLAN link of that name with another MAC is not taken over.
    ip(&[
        "-n",
        &vpc.node.name,
        "link",
        "add",
        "vlan.eth.9",
        "address",
        "02:00:00:00:00:99",
        "type",
        "veth",
        "peer",
        "name",
        "other9",
    ])
    .unwrap();
    let e = refused();
    assert!(e.contains("another MAC"), "{e}");
    ip(&["-n", &vpc.node.name, "link", "del", "other9"]).unwrap();
    assert_eq!(host_state(&vpc.node), before);
}
