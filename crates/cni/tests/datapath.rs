//! The plugin in real network namespaces: a "VPC" namespace routes between a node namespace (whose
//! primary and secondary ENIs are veth pairs with their own MACs), a VPC host and an outside host;
//! pods get namespaces of their own. Traffic is real TCP.

mod common;

use common::*;
use datapath::node::{self, EniLink, HostRouting};
use datapath::snat::{RandomizeSnat, SnatPolicy};
use serde_json::{json, Value};
use std::net::{Ipv4Addr, SocketAddr};

const ETH0_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x10];
const ETH1_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x20];
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const ETH1_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
const VPC_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const OUTSIDE_HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const POD_ON_ETH0: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 40);
const POD_ON_ETH1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);
const SECOND_POD_ON_ETH1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 51);

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The fake VPC: router namespace with a bridge for subnet 10.0.0.0/24, a VPC host in 10.0.1.0/24
/// and an outside host in 198.51.100.0/24. The router knows which ENI holds which pod address
/// through static neighbour entries, as the VPC fabric does.
struct Vpc {
    router: Netns,
    vpc_host: Netns,
    outside: Netns,
    node: Netns,
}

impl Vpc {
    fn build() -> Self {
        let router = Netns::new("vpc");
        let vpc_host = Netns::new("vhost");
        let outside = Netns::new("out");
        let node = Netns::new("node");
        let r = &router.name;
        sh(&format!("ip -n {r} link add br0 type bridge && ip -n {r} addr add 10.0.0.1/24 dev br0 && ip -n {r} link set br0 up"));
        sh(&format!(
            "ip netns exec {r} sysctl -qw net.ipv4.ip_forward=1"
        ));
        for (eni, m) in [("eth0", ETH0_MAC), ("eth1", ETH1_MAC)] {
            let port = format!("p{eni}");
            sh(&format!(
                "ip -n {r} link add {port} type veth peer name {eni} netns {n} && \
                 ip -n {r} link set {port} master br0 up && \
                 ip -n {n} link set {eni} address {m}",
                n = node.name,
                m = mac(m)
            ));
        }
        let n = &node.name;
        sh(&format!(
            "ip -n {n} addr add {NODE_IP}/24 dev eth0 && ip -n {n} link set eth0 up && \
             ip -n {n} route add default via 10.0.0.1 dev eth0"
        ));
        // Only the ENI that owns an address answers ARP for it, as in a VPC.
        sh(&format!(
            "ip netns exec {n} sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2"
        ));
        for (ns, net, ip) in [
            (&vpc_host, "10.0.1", VPC_HOST),
            (&outside, "198.51.100", OUTSIDE_HOST),
        ] {
            sh(&format!(
                "ip -n {r} link add to{h} type veth peer name eth0 netns {h} && \
                 ip -n {r} addr add {net}.1/24 dev to{h} && ip -n {r} link set to{h} up && \
                 ip -n {h} addr add {ip}/24 dev eth0 && ip -n {h} link set eth0 up && \
                 ip -n {h} route add default via {net}.1",
                h = ns.name
            ));
        }
        Vpc {
            router,
            vpc_host,
            outside,
            node,
        }
    }

    /// Tells the VPC router that `address` lives on the ENI with `eni_mac`.
    fn place(&self, address: Ipv4Addr, eni_mac: [u8; 6]) {
        sh(&format!(
            "ip -n {} neigh replace {address} lladdr {} dev br0 nud permanent",
            self.router.name,
            mac(eni_mac)
        ));
    }

    fn node_setup(&self, external_snat: bool) {
        self.node_setup_with(snat_policy(external_snat));
    }

    fn node_setup_with(&self, snat: SnatPolicy) {
        self.node.run(|| {
            node::setup_eni(&EniLink {
                mac: ETH1_MAC,
                primary_ip: ETH1_IP,
                subnet: (Ipv4Addr::new(10, 0, 0, 0), 24),
                // Upstream's table for device 1 on card 0 (ipam::ownership::route_table).
                route_table: 2,
                mtu: 9001,
            })
            .unwrap();
            node::setup_host(&HostRouting {
                primary_interface: "eth0".into(),
                fwmark_rule: true,
                connmark: 0x80,
            })
            .unwrap();
            snat.apply().unwrap();
        });
    }

    fn tx_packets(&self, link: &str) -> u64 {
        let out = sh(&format!("ip -n {} -s -j link show {link}", self.node.name));
        let value: Value = serde_json::from_str(&out).unwrap();
        value[0]["stats64"]["tx"]["packets"].as_u64().unwrap()
    }
}

fn snat_policy(external_snat: bool) -> SnatPolicy {
    SnatPolicy {
        primary_interface: "eth0".into(),
        primary_ip: NODE_IP,
        veth_prefix: "eni".into(),
        exempt: vec![(Ipv4Addr::new(10, 0, 0, 0), 16)],
        external_snat,
        randomize: RandomizeSnat::FullyRandom,
        node_port_support: true,
        connmark: 0x80,
        v4_egress: false,
    }
}

fn cni_env<'a>(
    command: &'a str,
    id: &'a str,
    netns: &'a str,
    args: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
        ("CNI_ARGS", args),
    ]
}

/// ADDs a pod through the plugin in the node namespace; returns its result.
fn add_pod(node: &Netns, server: &AddressServer, pod: &Netns, id: &str, name: &str) -> Value {
    let path = pod.path();
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}");
    let run = plugin(
        Some(node),
        &cni_env("ADD", id, path.to_str().unwrap(), &args),
        &conf("1.0.0", &server.socket, json!({})),
    );
    assert_eq!(run.status, 0, "ADD failed: {}", run.raw);
    run.stdout
}

fn with_prev(server: &AddressServer, prev: &Value) -> String {
    conf("1.0.0", &server.socket, json!({ "prevResult": prev }))
}

fn host_state(node: &Netns, address: Ipv4Addr) -> String {
    format!(
        "{}{}",
        node.exec("ip rule show")
            .lines()
            .filter(|l| l.contains(&address.to_string()))
            .collect::<Vec<_>>()
            .join("\n"),
        node.exec("ip route show table all")
            .lines()
            .filter(|l| l.starts_with(&address.to_string()))
            .collect::<Vec<_>>()
            .join("\n")
    )
}

#[test]
fn pods_reach_each_other_the_node_the_vpc_and_the_outside() {
    if !can_run_datapath_tests("pods_reach_each_other_the_node_the_vpc_and_the_outside") {
        return;
    }
    let vpc = Vpc::build();
    vpc.node_setup(false);
    let server = AddressServer::start(&[
        (POD_ON_ETH0, 0, 254),
        (POD_ON_ETH1, 1, 2),
        (SECOND_POD_ON_ETH1, 1, 2),
    ]);
    let pod_a = Netns::new("poda");
    let pod_b = Netns::new("podb");
    let result_a = add_pod(&vpc.node, &server, &pod_a, "ctr-a", "a");
    let result_b = add_pod(&vpc.node, &server, &pod_b, "ctr-b", "b");
    assert_eq!(result_a["ips"][0]["address"], "10.0.0.40/32");
    assert_eq!(result_b["ips"][0]["address"], "10.0.0.50/32");
    let pod_mac = pod_b.exec("cat /sys/class/net/eth0/address");
    assert_eq!(
        result_b["interfaces"][1]["mac"].as_str().unwrap(),
        pod_mac.trim(),
        "the result names the pod's real MAC"
    );
    vpc.place(POD_ON_ETH0, ETH0_MAC);
    vpc.place(POD_ON_ETH1, ETH1_MAC);

    // The host's view: upstream's rules and routes, and the veth MTU equal to the pod's.
    let rules = vpc.node.exec("ip rule show");
    assert!(
        rules.contains("512:\tfrom all to 10.0.0.40 lookup main"),
        "{rules}"
    );
    assert!(rules.contains("1536:\tfrom 10.0.0.50 lookup 2"), "{rules}");
    assert!(
        !rules.contains("from 10.0.0.40 lookup"),
        "primary-ENI pods use main: {rules}"
    );
    let host_veth = result_a["interfaces"][0]["name"].as_str().unwrap();
    assert_eq!(
        host_veth,
        datapath::names::host_veth_name("eni", "default.a")
    );
    assert!(vpc
        .node
        .exec(&format!("ip link show {host_veth}"))
        .contains("mtu 9001"));
    let pod_view = pod_a.exec("ip -4 route show");
    assert!(
        pod_view.contains("default via 169.254.1.1 dev eth0"),
        "{pod_view}"
    );
    assert!(pod_a.exec("ip neigh show").contains("PERMANENT"));

    // Pod to pod across ENIs on one node, both ways.
    let server_b = peer_echo_server(&pod_b, SocketAddr::from((POD_ON_ETH1, 8080)), 1);
    assert_eq!(
        seen_as(&pod_a, SocketAddr::from((POD_ON_ETH1, 8080))).unwrap(),
        POD_ON_ETH0.to_string()
    );
    server_b.join().unwrap();

    // Pod to pod on one ENI.
    let pod_c = Netns::new("podc");
    let result_c = add_pod(&vpc.node, &server, &pod_c, "ctr-c", "c");
    assert_eq!(result_c["ips"][0]["address"], "10.0.0.51/32");
    let server_c = peer_echo_server(&pod_c, SocketAddr::from((SECOND_POD_ON_ETH1, 8080)), 1);
    assert_eq!(
        seen_as(&pod_b, SocketAddr::from((SECOND_POD_ON_ETH1, 8080))).unwrap(),
        POD_ON_ETH1.to_string()
    );
    server_c.join().unwrap();
    let path_c = pod_c.path();
    let del_c = plugin(
        Some(&vpc.node),
        &cni_env("DEL", "ctr-c", path_c.to_str().unwrap(), "IgnoreUnknown=1"),
        &with_prev(&server, &result_c),
    );
    assert_eq!(del_c.status, 0, "{}", del_c.raw);
    drop(pod_c);

    // Pod to its node.
    let node_server = peer_echo_server(&vpc.node, SocketAddr::from((NODE_IP, 8081)), 1);
    assert_eq!(
        seen_as(&pod_b, SocketAddr::from((NODE_IP, 8081))).unwrap(),
        POD_ON_ETH1.to_string()
    );
    node_server.join().unwrap();

    // Pod to a VPC host keeps its own address, and a pod on eth1 leaves by eth1.
    let vpc_server = peer_echo_server(&vpc.vpc_host, SocketAddr::from((VPC_HOST, 8082)), 2);
    let eth1_before = vpc.tx_packets("eth1");
    assert_eq!(
        seen_as(&pod_b, SocketAddr::from((VPC_HOST, 8082))).unwrap(),
        POD_ON_ETH1.to_string()
    );
    assert!(
        vpc.tx_packets("eth1") > eth1_before,
        "the pod on the secondary ENI must leave by eth1"
    );
    assert_eq!(
        seen_as(&pod_a, SocketAddr::from((VPC_HOST, 8082))).unwrap(),
        POD_ON_ETH0.to_string()
    );
    vpc_server.join().unwrap();

    // Pods to the outside are SNATed to the node's primary IP, including the pod on eth1 (the
    // connmark sends it out of eth0). A connection kept open across a switch to external SNAT
    // keeps working; new connections then keep the pod's address.
    let outside = peer_echo_server(&vpc.outside, SocketAddr::from((OUTSIDE_HOST, 8083)), 3);
    let target = SocketAddr::from((OUTSIDE_HOST, 8083));
    assert_eq!(seen_as(&pod_a, target).unwrap(), NODE_IP.to_string());
    let mut long_lived = Client::connect(&pod_b, target).unwrap();
    assert_eq!(long_lived.seen_as().unwrap(), NODE_IP.to_string());
    vpc.node.run(|| snat_policy(true).apply().unwrap());
    assert_eq!(
        long_lived.seen_as().unwrap(),
        NODE_IP.to_string(),
        "an established connection survives switching external SNAT on"
    );
    assert_eq!(seen_as(&pod_a, target).unwrap(), POD_ON_ETH0.to_string());
    drop(long_lived);
    outside.join().unwrap();

    // NodePort: a connection to the node's primary IP, DNATed (as kube-proxy would) to the pod on
    // eth1, is answered through eth0, where it arrived, not through the pod's ENI table.
    vpc.node.exec(
        "nft add table ip fake-kube-proxy \\; \
         add chain ip fake-kube-proxy nodeports '{ type nat hook prerouting priority dstnat; }' \\; \
         add rule ip fake-kube-proxy nodeports iifname eth0 tcp dport 30080 dnat to 10.0.0.50:8080",
    );
    const ROUND_TRIPS: u64 = 20;
    let pod_server = peer_echo_server(&pod_b, SocketAddr::from((POD_ON_ETH1, 8080)), 1);
    let (eth0_before, eth1_before) = (vpc.tx_packets("eth0"), vpc.tx_packets("eth1"));
    let mut node_port = Client::connect(&vpc.vpc_host, SocketAddr::from((NODE_IP, 30080))).unwrap();
    for _ in 0..ROUND_TRIPS {
        assert_eq!(node_port.seen_as().unwrap(), VPC_HOST.to_string());
    }
    let (eth0_sent, eth1_sent) = (
        vpc.tx_packets("eth0") - eth0_before,
        vpc.tx_packets("eth1") - eth1_before,
    );
    assert!(
        eth0_sent >= ROUND_TRIPS,
        "replies left by eth0: {eth0_sent}"
    );
    assert!(
        eth1_sent < ROUND_TRIPS,
        "replies must not leave by eth1: {eth1_sent}"
    );
    drop(node_port);
    pod_server.join().unwrap();

    // CHECK passes on a healthy pod, and names what is missing once the host rule is removed.
    let check = |pod: &Netns, id: &str, prev: &Value| {
        let path = pod.path();
        plugin(
            Some(&vpc.node),
            &cni_env("CHECK", id, path.to_str().unwrap(), "IgnoreUnknown=1"),
            &with_prev(&server, prev),
        )
    };
    let healthy = check(&pod_a, "ctr-a", &result_a);
    assert_eq!(healthy.status, 0, "{}", healthy.raw);
    vpc.node.exec("ip rule del to 10.0.0.40 priority 512");
    let broken = check(&pod_a, "ctr-a", &result_a);
    assert_eq!(broken.stdout["code"], 100, "{}", broken.raw);
    assert!(broken.stdout["details"]
        .as_str()
        .unwrap()
        .contains("to 10.0.0.40 lookup main priority 512"));
    // CHECK also asks the daemon: a pod whose address it no longer holds is not healthy.
    let orphan = check(&pod_b, "ctr-unknown-to-the-daemon", &result_b);
    assert_eq!(orphan.stdout["code"], 100, "{}", orphan.raw);
    assert!(orphan.stdout["msg"]
        .as_str()
        .unwrap()
        .contains("no address"));

    // DEL removes the host state and returns the address; a second DEL is fine.
    for pod in [
        (&pod_a, "ctr-a", &result_a, POD_ON_ETH0),
        (&pod_b, "ctr-b", &result_b, POD_ON_ETH1),
    ] {
        let path = pod.0.path();
        for _ in 0..2 {
            let run = plugin(
                Some(&vpc.node),
                &cni_env("DEL", pod.1, path.to_str().unwrap(), "IgnoreUnknown=1"),
                &with_prev(&server, pod.2),
            );
            assert_eq!(run.status, 0, "{}", run.raw);
        }
        assert_eq!(
            host_state(&vpc.node, pod.3),
            "",
            "host state left for {}",
            pod.3
        );
    }
    assert!(server.assigned().is_empty());
    // The veths go with the pods' namespaces, which the runtime deletes after DEL.
    drop((pod_a, pod_b));
    let start = std::time::Instant::now();
    while vpc.node.exec("ip -o link show").contains("eni") {
        assert!(
            start.elapsed().as_secs() < 10,
            "veths outlived their namespaces"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // The ENI's own table and rule are there until torn down.
    let table = vpc.node.exec("ip route show table 2");
    assert!(table.contains("default via 10.0.0.1 dev eth1"), "{table}");
    vpc.node.run(|| {
        node::teardown_eni(&EniLink {
            mac: ETH1_MAC,
            primary_ip: ETH1_IP,
            subnet: (Ipv4Addr::new(10, 0, 0, 0), 24),
            route_table: 2,
            mtu: 9001,
        })
        .unwrap();
        datapath::snat::remove().unwrap();
    });
    assert_eq!(vpc.node.exec("ip route show table 2"), "");
    assert!(
        !vpc.node.exec("nft list tables").contains("vpc-cni"),
        "the SNAT table is gone"
    );
    assert!(!vpc.node.exec("ip rule show").contains("32765"));
    drop(vpc.router);
}

#[test]
fn a_failed_add_leaves_nothing_behind_and_returns_the_address() {
    if !can_run_datapath_tests("a_failed_add_leaves_nothing_behind_and_returns_the_address") {
        return;
    }
    let node = Netns::new("node");
    let server = AddressServer::start(&[(POD_ON_ETH1, 1, 2)]);
    let pod = Netns::new("pod");
    // Something else already owns eth0 in the pod.
    pod.exec("ip link add eth0 type veth peer name other");
    let path = pod.path();
    let run = plugin(
        Some(&node),
        &cni_env("ADD", "ctr-x", path.to_str().unwrap(), "IgnoreUnknown=1"),
        &conf("1.0.0", &server.socket, json!({})),
    );
    assert_eq!(run.status, 1, "{}", run.raw);
    assert!(
        run.stdout["msg"]
            .as_str()
            .unwrap()
            .contains("already exists"),
        "{}",
        run.raw
    );
    assert_eq!(host_state(&node, POD_ON_ETH1), "");
    assert!(!node.exec("ip -o link show").contains("eni"));
    assert!(
        server.assigned().is_empty(),
        "the address went back at once"
    );
    assert!(server.requests().iter().any(|r| matches!(
        r,
        proto::Request::Del {
            reason: proto::DelReason::SetupFailed,
            ..
        }
    )));
}

#[test]
fn add_twice_gives_the_same_address_and_one_veth() {
    if !can_run_datapath_tests("add_twice_gives_the_same_address_and_one_veth") {
        return;
    }
    let node = Netns::new("node");
    let server = AddressServer::start(&[(POD_ON_ETH0, 0, 254), (POD_ON_ETH1, 1, 2)]);
    let pod = Netns::new("pod");
    let first = add_pod(&node, &server, &pod, "ctr-twice", "twice");
    let second = add_pod(&node, &server, &pod, "ctr-twice", "twice");
    assert_eq!(first["ips"], second["ips"]);
    assert_eq!(server.assigned().len(), 1);
    let veths = node.exec("ip -o link show");
    assert_eq!(veths.matches("eni").count(), 1, "{veths}");
    let rules = node.exec("ip rule show");
    assert_eq!(rules.matches("to 10.0.0.40").count(), 1, "{rules}");
}

#[test]
fn del_with_the_daemon_down_cleans_up_from_prev_result() {
    if !can_run_datapath_tests("del_with_the_daemon_down_cleans_up_from_prev_result") {
        return;
    }
    let node = Netns::new("node");
    let mut server = AddressServer::start(&[(POD_ON_ETH1, 1, 2)]);
    let pod = Netns::new("pod");
    let result = add_pod(&node, &server, &pod, "ctr-down", "down");
    assert_ne!(host_state(&node, POD_ON_ETH1), "");
    let conf_with_prev = with_prev(&server, &result);
    server.stop();
    let path = pod.path();
    let run = plugin(
        Some(&node),
        &cni_env("DEL", "ctr-down", path.to_str().unwrap(), "IgnoreUnknown=1"),
        &conf_with_prev,
    );
    assert_eq!(run.status, 0, "{}", run.raw);
    assert_eq!(host_state(&node, POD_ON_ETH1), "");
}

#[test]
fn a_late_del_does_not_touch_the_address_of_a_newer_pod() {
    if !can_run_datapath_tests("a_late_del_does_not_touch_the_address_of_a_newer_pod") {
        return;
    }
    let node = Netns::new("node");
    let server = AddressServer::start(&[(POD_ON_ETH0, 0, 254)]);
    let old_pod = Netns::new("pod");
    let old = add_pod(&node, &server, &old_pod, "ctr-old", "old");
    // The old pod's address was released by the daemon and went to a new pod...
    let path = old_pod.path();
    let del = |conf: &str| {
        plugin(
            Some(&node),
            &cni_env("DEL", "ctr-old", path.to_str().unwrap(), "IgnoreUnknown=1"),
            conf,
        )
    };
    assert_eq!(del(&with_prev(&server, &old)).status, 0);
    let new_pod = Netns::new("pod");
    add_pod(&node, &server, &new_pod, "ctr-new", "new");
    // ...then the runtime repeats the old DEL with the old prevResult.
    assert_eq!(del(&with_prev(&server, &old)).status, 0);
    let rules = node.exec("ip rule show");
    assert!(
        rules.contains("to 10.0.0.40 lookup main"),
        "the new pod lost its rule: {rules}"
    );
}

#[test]
fn gc_removes_the_host_state_of_attachments_no_longer_valid() {
    if !can_run_datapath_tests("gc_removes_the_host_state_of_attachments_no_longer_valid") {
        return;
    }
    let node = Netns::new("node");
    let server = AddressServer::start(&[(POD_ON_ETH0, 0, 254), (POD_ON_ETH1, 1, 2)]);
    let kept = Netns::new("pod");
    let stale = Netns::new("pod");
    add_pod(&node, &server, &kept, "ctr-kept", "kept");
    add_pod(&node, &server, &stale, "ctr-stale", "stale");
    let run = plugin(
        Some(&node),
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")],
        &conf(
            "1.1.0",
            &server.socket,
            json!({"cni.dev/valid-attachments": [{"containerID": "ctr-kept", "ifname": "eth0"}]}),
        ),
    );
    assert_eq!(run.status, 0, "{}", run.raw);
    assert_eq!(
        host_state(&node, POD_ON_ETH1),
        "",
        "stale pod's host state remains"
    );
    assert_ne!(
        host_state(&node, POD_ON_ETH0),
        "",
        "valid pod lost its host state"
    );
    assert_eq!(server.assigned().len(), 1);
    let veths = node.exec("ip -o link show");
    assert!(!veths.contains(&datapath::names::host_veth_name("eni", "default.stale")));
    assert!(veths.contains(&datapath::names::host_veth_name("eni", "default.kept")));
}

/// kube-proxy's rules for two Services, as it writes them in iptables mode (through iptables-nft
/// or iptables-legacy) and in nftables mode, reduced to those Services: `self`, ClusterIP
/// 172.20.0.10:80 backed by the pod on eth0 (a pod reaching itself is marked for masquerade), and
/// `np`, NodePort 30080 with externalTrafficPolicy Cluster, backed by the pod on eth1.
fn kube_proxy_rules(node: &Netns, mode: &str) {
    const IPTABLES: &str = r#"*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-SELF - [0:0]
:KUBE-SEP-SELF - [0:0]
:KUBE-EXT-NP - [0:0]
:KUBE-SVC-NP - [0:0]
:KUBE-SEP-NP - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SERVICES -d 172.20.0.10/32 -p tcp -m comment --comment "default/self cluster IP" -m tcp --dport 80 -j KUBE-SVC-SELF
-A KUBE-SVC-SELF -m comment --comment "default/self -> 10.0.0.40:8080" -j KUBE-SEP-SELF
-A KUBE-SEP-SELF -s 10.0.0.40/32 -m comment --comment "default/self" -j KUBE-MARK-MASQ
-A KUBE-SEP-SELF -p tcp -m comment --comment "default/self" -m tcp -j DNAT --to-destination 10.0.0.40:8080
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/np" -m tcp --dport 30080 -j KUBE-EXT-NP
-A KUBE-EXT-NP -m comment --comment "masquerade traffic for default/np external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-NP -j KUBE-SVC-NP
-A KUBE-SVC-NP -m comment --comment "default/np -> 10.0.0.50:8080" -j KUBE-SEP-NP
-A KUBE-SEP-NP -s 10.0.0.50/32 -m comment --comment "default/np" -j KUBE-MARK-MASQ
-A KUBE-SEP-NP -p tcp -m comment --comment "default/np" -m tcp -j DNAT --to-destination 10.0.0.50:8080
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
"#;
    const NFTABLES: &str = r#"table ip kube-proxy {
  chain mark-for-masquerade {
    meta mark set meta mark | 0x4000
  }
  chain masquerading {
    meta mark & 0x4000 == 0 return
    meta mark set meta mark ^ 0x4000
    masquerade fully-random
  }
  chain nat-prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }
  chain nat-output {
    type nat hook output priority -100; policy accept;
    jump services
  }
  chain nat-postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    jump masquerading
  }
  chain services {
    ip daddr 172.20.0.10 tcp dport 80 goto service-self
    fib daddr type local tcp dport 30080 goto external-np
  }
  chain service-self {
    goto endpoint-self
  }
  chain endpoint-self {
    ip saddr 10.0.0.40 jump mark-for-masquerade
    meta l4proto tcp dnat to 10.0.0.40:8080
  }
  chain external-np {
    jump mark-for-masquerade
    goto service-np
  }
  chain service-np {
    goto endpoint-np
  }
  chain endpoint-np {
    ip saddr 10.0.0.50 jump mark-for-masquerade
    meta l4proto tcp dnat to 10.0.0.50:8080
  }
}
"#;
    let (tool, rules) = match mode {
        "iptables-nft" => ("iptables-nft-restore --noflush", IPTABLES),
        "iptables-legacy" => ("iptables-legacy-restore --noflush", IPTABLES),
        "nftables" => ("nft -f -", NFTABLES),
        other => panic!("no kube-proxy mode {other}"),
    };
    sh(&format!(
        "ip netns exec {} {tool} <<'RULES'\n{rules}RULES",
        node.name
    ));
}

fn kube_proxy_next_door(mode: &str) {
    let test = format!("kube_proxy_next_door_{mode}");
    if !can_run_datapath_tests(&test) {
        return;
    }
    let restore = match mode {
        "iptables-nft" => "iptables-nft-restore",
        "iptables-legacy" => "iptables-legacy-restore",
        _ => "nft",
    };
    if std::process::Command::new(restore)
        .arg("--version")
        .output()
        .is_err()
    {
        skip(
            &test,
            &format!("needs {restore}; scripts/test.sh installs the iptables package"),
        );
        return;
    }
    let vpc = Vpc::build();
    kube_proxy_rules(&vpc.node, mode);
    // The operator exempts all of 10/8 from SNAT on a 10.0.0.0/16 VPC: the nested block must not
    // make nft refuse the table.
    vpc.node_setup_with(SnatPolicy {
        exempt: vec![
            (Ipv4Addr::new(10, 0, 0, 0), 16),
            (Ipv4Addr::new(10, 0, 0, 0), 8),
        ],
        ..snat_policy(false)
    });
    let server = AddressServer::start(&[(POD_ON_ETH0, 0, 254), (POD_ON_ETH1, 1, 2)]);
    let pod_a = Netns::new("kpa");
    let pod_b = Netns::new("kpb");
    add_pod(&vpc.node, &server, &pod_a, "ctr-a", "a");
    add_pod(&vpc.node, &server, &pod_b, "ctr-b", "b");
    vpc.place(POD_ON_ETH0, ETH0_MAC);
    vpc.place(POD_ON_ETH1, ETH1_MAC);
    let service = SocketAddr::from((Ipv4Addr::new(172, 20, 0, 10), 80));

    // A pod reaches itself through its own Service: kube-proxy's masquerade bit must survive our
    // connmark rules, or the reply never finds its way back.
    let self_server = peer_echo_server(&pod_a, SocketAddr::from((POD_ON_ETH0, 8080)), 2);
    let seen = seen_as(&pod_a, service)
        .unwrap_or_else(|e| panic!("{mode}: the pod cannot reach itself through its Service: {e}"));
    assert_ne!(
        seen,
        POD_ON_ETH0.to_string(),
        "{mode}: hairpin not masqueraded"
    );

    // Another pod on the node through the same Service: not masqueraded, its own address.
    assert_eq!(
        seen_as(&pod_b, service).unwrap(),
        POD_ON_ETH1.to_string(),
        "{mode}"
    );
    self_server.join().unwrap();

    // NodePort from the VPC to the pod on eth1: the replies leave by eth0, where it came in.
    const ROUND_TRIPS: u64 = 20;
    let np_server = peer_echo_server(&pod_b, SocketAddr::from((POD_ON_ETH1, 8080)), 1);
    let (eth0_before, eth1_before) = (vpc.tx_packets("eth0"), vpc.tx_packets("eth1"));
    let mut node_port = Client::connect(&vpc.vpc_host, SocketAddr::from((NODE_IP, 30080)))
        .unwrap_or_else(|e| panic!("{mode}: NodePort: {e}"));
    for _ in 0..ROUND_TRIPS {
        let seen = node_port.seen_as().unwrap();
        assert_ne!(
            seen,
            VPC_HOST.to_string(),
            "{mode}: Cluster policy masquerades"
        );
    }
    let (eth0_sent, eth1_sent) = (
        vpc.tx_packets("eth0") - eth0_before,
        vpc.tx_packets("eth1") - eth1_before,
    );
    assert!(
        eth0_sent >= ROUND_TRIPS,
        "{mode}: replies by eth0: {eth0_sent}"
    );
    assert!(
        eth1_sent < ROUND_TRIPS,
        "{mode}: replies by eth1: {eth1_sent}"
    );
    drop(node_port);
    np_server.join().unwrap();

    // Pods still reach the outside SNATed, next to kube-proxy's masquerade.
    let outside = peer_echo_server(&vpc.outside, SocketAddr::from((OUTSIDE_HOST, 8083)), 1);
    assert_eq!(
        seen_as(&pod_b, SocketAddr::from((OUTSIDE_HOST, 8083))).unwrap(),
        NODE_IP.to_string(),
        "{mode}"
    );
    outside.join().unwrap();
    drop((pod_a, pod_b));
}

#[test]
fn kube_proxy_next_door_iptables_nft() {
    kube_proxy_next_door("iptables-nft");
}

#[test]
fn kube_proxy_next_door_iptables_legacy() {
    kube_proxy_next_door("iptables-legacy");
}

#[test]
fn kube_proxy_next_door_nftables() {
    kube_proxy_next_door("nftables");
}

/// Upstream's host rules as aws-node writes them (pkg/networkutils: the SNAT chain, the connmark
/// chain, the mangle connmark rules; the nftables connmark table of its nft backend), through the
/// given iptables front end.
fn upstream_rules(node: &Netns, iptables: &str) {
    for rule in [
        "-t nat -N AWS-SNAT-CHAIN-0",
        "-t nat -A POSTROUTING -m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0",
        "-t nat -A AWS-SNAT-CHAIN-0 -d 10.0.0.0/16 -m comment --comment \"AWS SNAT CHAIN\" -j RETURN",
        "-t nat -A AWS-SNAT-CHAIN-0 ! -o vlan+ -m comment --comment \"AWS, SNAT\" -m addrtype ! --dst-type LOCAL -j SNAT --to-source 10.0.0.10 --random-fully",
        "-t nat -N AWS-CONNMARK-CHAIN-0",
        "-t nat -A PREROUTING -i eni+ -m comment --comment \"AWS, outbound connections\" -j AWS-CONNMARK-CHAIN-0",
        "-t nat -A AWS-CONNMARK-CHAIN-0 -d 10.0.0.0/16 -m comment --comment \"AWS CONNMARK CHAIN, VPC CIDR\" -j RETURN",
        "-t nat -A AWS-CONNMARK-CHAIN-0 -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --set-xmark 0x80/0x80",
        "-t nat -A PREROUTING -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --restore-mark --mask 0x80",
        "-t mangle -A PREROUTING -m comment --comment \"AWS, primary ENI\" -i eth0 -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-mark 0x80/0x80",
        "-t mangle -A PREROUTING -m comment --comment \"AWS, primary ENI\" -i eni+ -j CONNMARK --restore-mark --mask 0x80",
        "-t mangle -A PREROUTING -m comment --comment \"AWS, primary ENI\" -i vlan+ -j CONNMARK --restore-mark --mask 0x80",
    ] {
        node.exec(&format!("{iptables} {rule}"));
    }
}

#[test]
fn upstreams_rules_are_removed_when_we_take_over_and_kube_proxys_stay() {
    let test = "upstreams_rules_are_removed_when_we_take_over_and_kube_proxys_stay";
    if !can_run_datapath_tests(test) {
        return;
    }
    for tool in ["iptables-legacy", "iptables-nft"] {
        if std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_err()
        {
            skip(
                test,
                &format!("needs {tool}; scripts/test.sh installs the iptables package"),
            );
            return;
        }
    }
    let vpc = Vpc::build();
    // Upstream ran with legacy iptables on this node once and with iptables-nft later, and its nft
    // connmark backend left its table; kube-proxy runs in iptables-nft mode.
    upstream_rules(&vpc.node, "iptables-legacy");
    upstream_rules(&vpc.node, "iptables-nft");
    vpc.node.exec(
        "nft add table ip aws-cni \\; add chain ip aws-cni nat-prerouting '{ type filter hook prerouting priority -90; }' \\; \
         add rule ip aws-cni nat-prerouting iifname eni* ct mark set ct mark or 0x80",
    );
    kube_proxy_rules(&vpc.node, "iptables-nft");
    vpc.node_setup(false);
    let removed = vpc.node.run(datapath::upstream::remove_rules);
    assert!(
        removed.unavailable.is_empty() && removed.failed.is_empty(),
        "{removed:?}"
    );
    // Three rules in mangle, three in nat and two chains, in each front end; and the nft table.
    assert_eq!(removed.removed.len(), 2 * 8 + 1, "{:#?}", removed.removed);
    for save in ["iptables-legacy-save", "iptables-nft-save"] {
        let left = vpc.node.exec(save);
        assert!(
            !left.contains("AWS"),
            "{save} still shows upstream's rules:\n{left}"
        );
    }
    let kube = vpc.node.exec("iptables-nft-save -t nat");
    assert!(
        kube.contains("KUBE-SEP-SELF") && kube.contains("-j KUBE-SERVICES"),
        "kube-proxy's rules must stay:\n{kube}"
    );
    let tables = vpc.node.exec("nft list tables");
    assert!(!tables.contains("aws-cni"), "{tables}");
    assert!(tables.contains("vpc-cni"), "our table stays: {tables}");
    // A second pass finds nothing.
    let again = vpc.node.run(datapath::upstream::remove_rules);
    assert!(again.removed.is_empty(), "{again:?}");

    // Pods still reach the outside through our table alone, and a ClusterIP through kube-proxy's.
    let server = AddressServer::start(&[(POD_ON_ETH0, 0, 254), (POD_ON_ETH1, 1, 2)]);
    let pod_a = Netns::new("upa");
    let pod_b = Netns::new("upb");
    add_pod(&vpc.node, &server, &pod_a, "ctr-a", "a");
    add_pod(&vpc.node, &server, &pod_b, "ctr-b", "b");
    vpc.place(POD_ON_ETH0, ETH0_MAC);
    vpc.place(POD_ON_ETH1, ETH1_MAC);
    let outside = peer_echo_server(&vpc.outside, SocketAddr::from((OUTSIDE_HOST, 8083)), 1);
    assert_eq!(
        seen_as(&pod_b, SocketAddr::from((OUTSIDE_HOST, 8083))).unwrap(),
        NODE_IP.to_string()
    );
    outside.join().unwrap();
    let service = peer_echo_server(&pod_a, SocketAddr::from((POD_ON_ETH0, 8080)), 1);
    assert_eq!(
        seen_as(
            &pod_b,
            SocketAddr::from((Ipv4Addr::new(172, 20, 0, 10), 80))
        )
        .unwrap(),
        POD_ON_ETH1.to_string()
    );
    service.join().unwrap();
    drop((pod_a, pod_b));
}
