//! IPv6 pods through the plugin in real namespaces: a "VPC" router namespace with an IPv6 and an
//! IPv4 subnet routes the node's /80 to the node (as the VPC fabric routes an ENI's prefix), and a
//! VPC host answers on both families. Traffic is real TCP.

mod common;

use common::*;
use datapath::node::{self, HostRouting};
use datapath::snat::{RandomizeSnat, SnatPolicy};
use proto::Allocation;
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const NODE_IP6: &str = "2001:db8:0:1::10";
/// The node's /80, as EC2 would assign it to the primary ENI.
const PREFIX: &str = "2001:db8:0:1:aaaa";
const VPC_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const VPC_HOST6: &str = "2001:db8:0:2::10";

fn pod_ip(n: u16) -> Ipv6Addr {
    format!("{PREFIX}::{n}").parse().unwrap()
}

fn egress_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(169, 254, 172, n)
}

/// The router, the node and a VPC host. Addresses are added with `nodad`: these namespaces are
/// ours alone, and the test must not wait for duplicate address detection either.
struct Vpc {
    router: Netns,
    node: Netns,
    vpc_host: Netns,
}

impl Vpc {
    fn build() -> Vpc {
        let router = Netns::new("v6vpc");
        let node = Netns::new("v6node");
        let vpc_host = Netns::new("v6host");
        let (r, n, h) = (&router.name, &node.name, &vpc_host.name);
        sh(&format!(
            "ip netns exec {r} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1"
        ));
        sh(&format!(
            "ip -n {r} link add tonode type veth peer name eth0 netns {n} && \
             ip -n {r} addr add 10.0.0.1/24 dev tonode && \
             ip -n {r} addr add 2001:db8:0:1::1/64 dev tonode nodad && ip -n {r} link set tonode up && \
             ip -n {n} addr add {NODE_IP}/24 dev eth0 && \
             ip -n {n} addr add {NODE_IP6}/64 dev eth0 nodad && ip -n {n} link set eth0 up && \
             ip -n {n} route add default via 10.0.0.1 dev eth0 && \
             ip -n {n} -6 route add default via 2001:db8:0:1::1 dev eth0 && \
             ip -n {r} -6 route add {PREFIX}::/80 via {NODE_IP6} dev tonode"
        ));
        sh(&format!(
            "ip -n {r} link add tohost type veth peer name eth0 netns {h} && \
             ip -n {r} addr add 10.0.1.1/24 dev tohost && \
             ip -n {r} addr add 2001:db8:0:2::1/64 dev tohost nodad && ip -n {r} link set tohost up && \
             ip -n {h} addr add {VPC_HOST}/24 dev eth0 && \
             ip -n {h} addr add {VPC_HOST6}/64 dev eth0 nodad && ip -n {h} link set eth0 up && \
             ip -n {h} route add default via 10.0.1.1 && \
             ip -n {h} -6 route add default via 2001:db8:0:2::1"
        ));
        Vpc {
            router,
            node,
            vpc_host,
        }
    }

    /// What vpc-ipamd does on an IPv6 node: the host settings, IPv6's, and the table with the
    /// IPv4 egress SNAT.
    fn node_setup(&self) {
        self.node.run(|| {
            node::setup_host(&HostRouting {
                primary_interface: "eth0".into(),
                fwmark_rule: true,
                connmark: 0x80,
            })
            .unwrap();
            node::setup_host_v6("eth0").unwrap();
            SnatPolicy {
                primary_interface: "eth0".into(),
                primary_ip: NODE_IP,
                veth_prefix: "eni".into(),
                exempt: vec![(Ipv4Addr::new(10, 0, 0, 0), 16)],
                external_snat: false,
                randomize: RandomizeSnat::FullyRandom,
                node_port_support: true,
                connmark: 0x80,
                v4_egress: true,
            }
            .apply()
            .unwrap();
        });
    }
}

fn v6_server(pods: &[(u16, u8)]) -> AddressServer {
    AddressServer::serving(
        pods.iter()
            .map(|&(n, egress)| Allocation {
                address: pod_ip(n).into(),
                device_number: 0,
                route_table: 254,
                egress_v4: Some(egress_ip(egress)),
                branch: None,
            })
            .collect(),
    )
}

fn v6_conf(server: &AddressServer, extra: Value) -> String {
    let mut extra = extra;
    extra["enableIPv6"] = true.into();
    conf("1.0.0", &server.socket, extra)
}

fn env<'a>(
    command: &'a str,
    id: &'a str,
    netns: &'a str,
    name: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
        ("CNI_ARGS", name),
    ]
}

fn args(name: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}")
}

fn add(vpc: &Vpc, server: &AddressServer, pod: &Netns, id: &str, name: &str) -> Value {
    let path = pod.path();
    let args = args(name);
    let run = plugin(
        Some(&vpc.node),
        &env("ADD", id, path.to_str().unwrap(), &args),
        &v6_conf(server, json!({})),
    );
    assert_eq!(run.status, 0, "ADD failed: {}", run.raw);
    run.stdout
}

fn sysctl(ns: &Netns, key: &str) -> String {
    ns.exec(&format!("cat /proc/sys/net/ipv6/conf/{key}"))
        .trim()
        .to_string()
}

/// Waits until `check` holds (a namespace's links go away asynchronously after `ip netns del`).
fn eventually(what: &str, check: impl Fn() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ipv6_pods_reach_each_other_and_the_vpc_and_leave_for_ipv4_as_the_node() {
    if !can_run_datapath_tests(
        "ipv6_pods_reach_each_other_and_the_vpc_and_leave_for_ipv4_as_the_node",
    ) {
        return;
    }
    let vpc = Vpc::build();
    vpc.node_setup();
    let server = v6_server(&[(0x11, 2), (0x12, 3)]);
    let pod_a = Netns::new("v6poda");
    let pod_b = Netns::new("v6podb");
    let result_a = add(&vpc, &server, &pod_a, "ctr-a", "a");
    let result_b = add(&vpc, &server, &pod_b, "ctr-b", "b");

    // The result: the /128 alone among the IPs, both pairs among the interfaces.
    assert_eq!(
        result_a["ips"][0]["address"],
        format!("{}/128", pod_ip(0x11))
    );
    assert_eq!(result_a["ips"].as_array().unwrap().len(), 1);
    assert_eq!(
        result_a["routes"][0],
        json!({"dst": "::/0", "gw": "fe80::1"})
    );
    let host_veth = result_a["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let egress_veth = result_a["interfaces"][2]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        host_veth,
        datapath::names::host_veth_name("eni", "default.a")
    );
    assert_eq!(
        egress_veth,
        datapath::names::host_veth_name("v4e", "default.a")
    );
    assert_eq!(result_a["interfaces"][3]["name"], "v4if0");

    // The pod's side: a /128 usable at once (no duplicate address detection), the default route
    // via fe80::1 with a permanent neighbour, and IPv4 only by v4if0.
    let addresses = pod_a.exec("ip -6 addr show dev eth0");
    assert!(
        addresses.contains(&format!("{}/128", pod_ip(0x11))),
        "{addresses}"
    );
    assert!(!addresses.contains("tentative"), "{addresses}");
    assert_eq!(sysctl(&pod_a, "eth0/accept_dad"), "0");
    let routes = pod_a.exec("ip -6 route show");
    assert!(routes.contains("default via fe80::1 dev eth0"), "{routes}");
    let neighbours = pod_a.exec("ip -6 neigh show");
    assert!(
        neighbours.contains("fe80::1 dev eth0 lladdr"),
        "{neighbours}"
    );
    assert!(neighbours.contains("PERMANENT"), "{neighbours}");
    let v4 = pod_a.exec("ip -4 addr show");
    assert!(v4.contains("169.254.172.2/32 scope global v4if0"), "{v4}");
    assert!(!v4.contains("eth0"), "no IPv4 on eth0: {v4}");
    let v4_routes = pod_a.exec("ip -4 route show");
    assert!(
        v4_routes.contains("default via 169.254.172.1 dev v4if0"),
        "{v4_routes}"
    );

    // The host's side: the veth's IPv6 settings, a /128 route to it, no rules, the egress route.
    assert_eq!(sysctl(&vpc.node, &format!("{host_veth}/accept_ra")), "0");
    assert_eq!(
        sysctl(&vpc.node, &format!("{host_veth}/accept_redirects")),
        "1"
    );
    assert_eq!(sysctl(&vpc.node, &format!("{host_veth}/forwarding")), "0");
    let host_routes = vpc.node.exec("ip -6 route show");
    assert!(
        host_routes.contains(&format!("{} dev {host_veth}", pod_ip(0x11))),
        "{host_routes}"
    );
    assert!(!vpc.node.exec("ip -6 rule show").contains(PREFIX));
    let v4_host_routes = vpc.node.exec("ip -4 route show");
    assert!(
        v4_host_routes.lines().any(
            |l| l.starts_with(&format!("169.254.172.2 dev {egress_veth} "))
                && l.contains("scope link")
        ),
        "{v4_host_routes}"
    );
    assert_eq!(sysctl(&vpc.node, "all/forwarding"), "1");
    assert_eq!(sysctl(&vpc.node, "eth0/accept_ra"), "2");

    // Pod to pod on the node, over IPv6, both seen by their own addresses.
    let b = SocketAddr::from((pod_ip(0x12), 8080));
    let on_b = peer_echo_server(&pod_b, b, 1);
    assert_eq!(seen_as(&pod_a, b).unwrap(), pod_ip(0x11).to_string());
    on_b.join().unwrap();

    // Pod to a VPC host over IPv6, seen from the pod's own address; and back, from the VPC host
    // to the pod.
    let host6: Ipv6Addr = VPC_HOST6.parse().unwrap();
    let on_host = peer_echo_server(&vpc.vpc_host, SocketAddr::from((host6, 8081)), 1);
    assert_eq!(
        seen_as(&pod_b, SocketAddr::from((host6, 8081))).unwrap(),
        pod_ip(0x12).to_string()
    );
    on_host.join().unwrap();
    let a = SocketAddr::from((pod_ip(0x11), 8082));
    let on_a = peer_echo_server(&pod_a, a, 1);
    assert_eq!(seen_as(&vpc.vpc_host, a).unwrap(), VPC_HOST6);
    on_a.join().unwrap();

    // Pod to an IPv4 VPC host by v4if0, seen as the node's primary IPv4.
    let on_host4 = peer_echo_server(&vpc.vpc_host, SocketAddr::from((VPC_HOST, 8083)), 1);
    assert_eq!(
        seen_as(&pod_a, SocketAddr::from((VPC_HOST, 8083))).unwrap(),
        NODE_IP.to_string()
    );
    on_host4.join().unwrap();

    // The egress range is the node's: a new connection to it from the VPC, or from another pod,
    // is rejected (the node itself may still reach it, as for probes).
    sh(&format!(
        "ip -n {} route add 169.254.172.0/22 via {NODE_IP}",
        vpc.router.name
    ));
    let egress_a = SocketAddr::from((egress_ip(2), 8084));
    let on_egress = peer_echo_server(&pod_a, egress_a, 1);
    let from_vpc = seen_as(&vpc.vpc_host, egress_a);
    assert!(
        from_vpc.is_err(),
        "the VPC reached a pod's egress address: {from_vpc:?}"
    );
    let from_pod = seen_as(&pod_b, egress_a);
    assert!(
        from_pod.is_err(),
        "a pod reached another's egress address: {from_pod:?}"
    );
    let from_node = seen_as(&vpc.node, egress_a);
    assert!(
        from_node.is_ok(),
        "the node reaches its pods' egress addresses: {from_node:?}"
    );
    on_egress.join().unwrap();

    // CHECK agrees with what ADD built.
    let path_a = pod_a.path();
    let check_env = env(
        "CHECK",
        "ctr-a",
        path_a.to_str().unwrap(),
        "IgnoreUnknown=1",
    );
    let check = plugin(
        Some(&vpc.node),
        &check_env,
        &v6_conf(&server, json!({ "prevResult": result_a })),
    );
    assert_eq!(check.status, 0, "CHECK: {}", check.raw);

    // DEL, then the runtime deletes the namespace: nothing of the pod is left on the host.
    let del = plugin(
        Some(&vpc.node),
        &env("DEL", "ctr-a", path_a.to_str().unwrap(), "IgnoreUnknown=1"),
        &v6_conf(&server, json!({ "prevResult": result_a })),
    );
    assert_eq!(del.status, 0, "DEL: {}", del.raw);
    assert!(!vpc
        .node
        .exec("ip -6 route show")
        .contains(&pod_ip(0x11).to_string()));
    assert!(!vpc.node.exec("ip -4 route show").contains("169.254.172.2 "));
    drop(pod_a);
    eventually("both host ends go with the pod's namespace", || {
        let links = vpc.node.exec("ip -o link show");
        !links.contains(&host_veth) && !links.contains(&egress_veth)
    });
    let left = result_b["interfaces"][0]["name"].as_str().unwrap();
    assert!(
        vpc.node.exec("ip -o link show").contains(left),
        "pod b is untouched"
    );
}

#[test]
fn a_daemon_and_a_conflist_of_different_families_fail_the_add_and_leave_nothing() {
    if !can_run_datapath_tests(
        "a_daemon_and_a_conflist_of_different_families_fail_the_add_and_leave_nothing",
    ) {
        return;
    }
    let vpc = Vpc::build();
    vpc.node_setup();
    let server = v6_server(&[(0x21, 5)]);
    let pod = Netns::new("v6mis");
    let path = pod.path();
    let args = args("mis");
    // An IPv4 conflist (as left by an older install) against an IPv6 daemon.
    let run = plugin(
        Some(&vpc.node),
        &env("ADD", "ctr-m", path.to_str().unwrap(), &args),
        &conf("1.0.0", &server.socket, json!({})),
    );
    assert_eq!(run.status, 1, "{}", run.raw);
    assert_eq!(run.stdout["code"], 7, "invalid configuration: {}", run.raw);
    let message = run.stdout["msg"].as_str().unwrap();
    assert!(message.contains("enableIPv6=false"), "{message}");
    assert!(server.assigned().is_empty(), "the address was given back");
    let host_veth = datapath::names::host_veth_name("eni", "default.mis");
    assert!(!vpc.node.exec("ip -o link show").contains(&host_veth));
    assert!(!pod.exec("ip -o link show").contains("eth0"));

    // Egress asked for by the conflist but not given by the daemon is refused the same way.
    let no_egress = AddressServer::serving(vec![Allocation {
        address: IpAddr::V6(pod_ip(0x22)),
        device_number: 0,
        route_table: 254,
        egress_v4: None,
        branch: None,
    }]);
    let run = plugin(
        Some(&vpc.node),
        &env("ADD", "ctr-m", path.to_str().unwrap(), &args),
        &v6_conf(&no_egress, json!({})),
    );
    assert_eq!(run.stdout["code"], 7, "{}", run.raw);
    assert!(!pod.exec("ip -o link show").contains("v4if0"));
    let egress_veth = datapath::names::host_veth_name("v4e", "default.mis");
    assert!(!vpc.node.exec("ip -o link show").contains(&egress_veth));

    // Without egress in the conflist an IPv6 pod has no v4if0 and no IPv4 at all.
    let run = plugin(
        Some(&vpc.node),
        &env("ADD", "ctr-m", path.to_str().unwrap(), &args),
        &v6_conf(&no_egress, json!({ "enableV4Egress": false })),
    );
    assert_eq!(run.status, 0, "{}", run.raw);
    assert_eq!(run.stdout["interfaces"].as_array().unwrap().len(), 2);
    assert!(!pod.exec("ip -o link show").contains("v4if0"));
    assert!(pod
        .exec("ip -4 addr show")
        .trim()
        .lines()
        .all(|l| !l.contains("inet ") || l.contains("127.0.0.1")));
}
