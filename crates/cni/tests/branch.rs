//! Pods with a branch ENI (security groups for pods) through the plugin, in real namespaces: the
//! daemon's answer carries the branch, and the plugin wires the pod behind its VLAN on the trunk.
//! The trunk's VLANs are emulated with eBPF on both ends (`testbed::vlan`; this kernel has no VLAN
//! links), so the wire carries real 802.1Q frames, and a "VPC" router delivers by VLAN.

mod common;

use common::*;
use proto::{Allocation, BranchAllocation};
use serde_json::{json, Value};
use std::net::{Ipv4Addr, SocketAddr};
use testbed::vlan::{self, VlanPort};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const VLAN: u16 = 5;
const BRANCH_MAC: [u8; 6] = [0x02, 0xb0, 0, 0, 0, 5];
const TRUNK_MAC: [u8; 6] = [0x02, 0x7a, 0, 0, 0, 1];

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

struct Vpc {
    router: Netns,
    node: Netns,
    _ports: Vec<VlanPort>,
}

/// The subnet's router with the branch's port, and a node with its primary ENI and its trunk.
fn vpc() -> Vpc {
    let router = Netns::new("sgvpc");
    let node = Netns::new("sgnode");
    let (r, n) = (&router.name, &node.name);
    let trunk_mac = mac_text(TRUNK_MAC);
    sh(&format!(
        "ip netns exec {r} sysctl -qw net.ipv4.ip_forward=1 && \
         ip netns exec {n} sysctl -qw net.ipv4.ip_forward=1 && \
         ip -n {r} link add tonode type veth peer name eth0 netns {n} && \
         ip -n {r} addr add 10.0.1.1/24 dev tonode && ip -n {r} link set tonode up && \
         ip -n {n} addr add {NODE_IP}/24 dev eth0 && ip -n {n} link set eth0 up && \
         ip -n {n} route add default via 10.0.1.1 && \
         ip -n {r} link add trunk type veth peer name ens6 netns {n} && \
         ip -n {r} link set trunk up && \
         ip -n {n} link set ens6 address {trunk_mac} && ip -n {n} link set ens6 up"
    ));
    let ports = vec![
        vlan::add(r, "trunk", VLAN, "br5", "02:0e:00:00:00:05").unwrap(),
        vlan::add(n, "ens6", VLAN, "vlan.eth.5", &mac_text(BRANCH_MAC)).unwrap(),
    ];
    sh(&format!(
        "ip -n {r} addr add 10.0.0.1/32 dev br5 && ip -n {r} route add {POD_IP}/32 dev br5 && \
         ip -n {r} neigh replace {POD_IP} lladdr {} dev br5 nud permanent && \
         ip netns exec {r} nft 'add table inet seen; \
         add chain inet seen forward {{ type filter hook forward priority 0; }}; \
         add rule inet seen forward iifname \"tonode\" oifname \"br5\" ip daddr {POD_IP} counter'",
        mac_text(BRANCH_MAC)
    ));
    Vpc {
        router,
        node,
        _ports: ports,
    }
}

impl Vpc {
    /// Packets from the node to the pod that the router forwarded to the branch.
    fn to_branch(&self) -> u64 {
        let table = self.router.exec("nft list table inet seen");
        table
            .split("packets ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter in {table}"))
    }
}

fn server() -> AddressServer {
    AddressServer::serving(vec![Allocation {
        address: POD_IP.into(),
        device_number: 0,
        route_table: 105,
        egress_v4: None,
        branch: Some(BranchAllocation {
            vlan: VLAN,
            mac: BRANCH_MAC,
            subnet: Ipv4Addr::new(10, 0, 0, 0),
            subnet_len: 24,
            trunk_mac: TRUNK_MAC,
        }),
    }])
}

fn env<'a>(command: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "sandbox-sg"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=db-0",
        ),
    ]
}

fn rules(node: &Netns) -> String {
    sh(&format!("ip -n {} rule show", node.name))
}

/// Nothing of VLAN 5 is left on the node: no link, no rule, no route in its table.
fn assert_branch_gone(node: &Netns) {
    let links = sh(&format!("ip -n {} -o link show", node.name));
    assert!(!links.contains("vlan.eth.5"), "{links}");
    let rules_now = rules(node);
    assert!(!rules_now.contains("105"), "{rules_now}");
    let table = sh(&format!("ip -n {} route show table 105", node.name));
    assert!(table.trim().is_empty(), "{table}");
}

#[test]
fn a_branch_pod_is_wired_behind_its_vlan_and_del_takes_it_all_away() {
    if !can_run_datapath_tests("a_branch_pod_is_wired_behind_its_vlan_and_del_takes_it_all_away") {
        return;
    }
    let vpc = vpc();
    // The daemon's part of strict mode, at its start.
    vpc.node.run(datapath::branch::setup_strict_node).unwrap();
    let server = server();
    let pod = Netns::new("sgpod");
    let netns = pod.path().display().to_string();
    let conf = conf("1.0.0", &server.socket, json!({}));
    let added = plugin(Some(&vpc.node), &env("ADD", &netns), &conf);
    assert_eq!(added.status, 0, "{}", added.raw);
    assert_eq!(added.stdout["ips"][0]["address"], "10.0.0.5/32");
    // Strict, the default: the node reaches the pod only through the VPC and the branch.
    let rules_now = rules(&vpc.node);
    assert!(
        rules_now.contains("iif vlan.eth.5 lookup 105"),
        "{rules_now}"
    );
    let listen = SocketAddr::new(POD_IP.into(), 8080);
    let echo = peer_echo_server(&pod, listen, 1);
    assert_eq!(seen_as(&vpc.node, listen), Ok(NODE_IP.to_string()));
    echo.join().unwrap();
    assert!(
        vpc.to_branch() > 0,
        "the node's connection went through the VPC"
    );

    let mut del_conf: Value = serde_json::from_str(&conf).unwrap();
    del_conf["prevResult"] = added.stdout.clone();
    // CHECK: the branch's VLAN, table and strict rules, besides the pod's own wiring.
    let check = || {
        plugin(
            Some(&vpc.node),
            &env("CHECK", &netns),
            &del_conf.to_string(),
        )
    };
    let healthy = check();
    assert_eq!(healthy.status, 0, "{}", healthy.raw);
    sh(&format!(
        "ip -n {} rule del iif vlan.eth.5 priority 10 lookup 105",
        vpc.node.name
    ));
    let broken = check();
    assert_eq!(broken.stdout["code"], 100, "{}", broken.raw);
    let details = broken.stdout["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("rule 'iif vlan.eth.5 lookup 105 priority 10' is missing"),
        "{}",
        broken.raw
    );
    let deleted = plugin(Some(&vpc.node), &env("DEL", &netns), &del_conf.to_string());
    assert_eq!(deleted.status, 0, "{}", deleted.raw);
    assert_branch_gone(&vpc.node);
}

#[test]
fn standard_mode_and_a_bad_mode_in_the_conflist() {
    if !can_run_datapath_tests("standard_mode_and_a_bad_mode_in_the_conflist") {
        return;
    }
    let vpc = vpc();
    let server = server();
    let pod = Netns::new("sgpod");
    let netns = pod.path().display().to_string();
    let bad = conf(
        "1.0.0",
        &server.socket,
        json!({"podSGEnforcingMode": "loose"}),
    );
    let refused = plugin(Some(&vpc.node), &env("ADD", &netns), &bad);
    assert_eq!(refused.stdout["code"], 7, "{}", refused.raw);
    assert!(
        refused.raw.contains("podSGEnforcingMode"),
        "{}",
        refused.raw
    );
    assert!(
        server.requests().is_empty(),
        "refused before asking the daemon"
    );

    let standard = conf(
        "1.0.0",
        &server.socket,
        json!({"podSGEnforcingMode": "standard"}),
    );
    let added = plugin(Some(&vpc.node), &env("ADD", &netns), &standard);
    assert_eq!(added.status, 0, "{}", added.raw);
    let rules_now = rules(&vpc.node);
    assert!(
        rules_now.contains("512:\tfrom all to 10.0.0.5 lookup main"),
        "{rules_now}"
    );
    assert!(
        rules_now.contains("1536:\tfrom 10.0.0.5 lookup 105"),
        "{rules_now}"
    );
    assert!(!rules_now.contains("iif"), "{rules_now}");
    // The node reaches the pod directly: nothing through the VPC.
    let listen = SocketAddr::new(POD_IP.into(), 8080);
    let echo = peer_echo_server(&pod, listen, 1);
    assert!(seen_as(&vpc.node, listen).is_ok());
    echo.join().unwrap();
    assert_eq!(vpc.to_branch(), 0);
}

/// A DEL the daemon cannot answer with the branch (on EKS once the pod object is gone, or the
/// daemon down) still takes the VLAN link, its rules and its table away: the ADD's result lists the
/// VLAN link with the branch's MAC, and the runtime gives it back as prevResult.
#[test]
fn a_branch_pods_del_without_the_daemon_finds_its_vlan_in_prev_result() {
    if !can_run_datapath_tests("a_branch_pods_del_without_the_daemon_finds_its_vlan_in_prev_result")
    {
        return;
    }
    let vpc = vpc();
    let mut server = server();
    let pod = Netns::new("sgpod");
    let netns = pod.path().display().to_string();
    let conf = conf("1.0.0", &server.socket, json!({}));
    let added = plugin(Some(&vpc.node), &env("ADD", &netns), &conf);
    assert_eq!(added.status, 0, "{}", added.raw);
    assert_eq!(
        added.stdout["interfaces"][2],
        json!({"name": "vlan.eth.5", "mac": mac_text(BRANCH_MAC)})
    );
    server.stop();
    let mut del_conf: Value = serde_json::from_str(&conf).unwrap();
    del_conf["prevResult"] = added.stdout.clone();
    let deleted = plugin(Some(&vpc.node), &env("DEL", &netns), &del_conf.to_string());
    assert_eq!(deleted.status, 0, "{}", deleted.raw);
    assert_branch_gone(&vpc.node);
}
