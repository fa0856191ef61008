//! The plugin refuses bad input with the CNI spec's error codes and touches nothing.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;

const NO_DAEMON: &str = "/nonexistent/ipamd.sock";

fn add_env(netns: &str) -> Vec<(&str, &str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
        ),
    ]
}

fn assert_error(run: &PluginRun, code: u64, needle: &str) {
    assert_eq!(run.status, 1, "exit status for {}", run.raw);
    assert_eq!(run.stdout["code"], code, "{}", run.raw);
    assert!(
        run.stdout["msg"].as_str().unwrap_or("").contains(needle)
            || run.stdout["details"]
                .as_str()
                .unwrap_or("")
                .contains(needle),
        "expected {needle:?} in {}",
        run.raw
    );
    assert!(run.stdout["cniVersion"].is_string(), "{}", run.raw);
}

#[test]
fn version_lists_every_supported_version() {
    let run = plugin(
        None,
        &[("CNI_COMMAND", "VERSION")],
        r#"{"cniVersion":"1.0.0"}"#,
    );
    assert_eq!(run.status, 0);
    assert_eq!(run.stdout["cniVersion"], "1.0.0");
    assert_eq!(
        run.stdout["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

#[test]
fn malformed_json_is_a_decoding_failure() {
    let run = plugin(None, &add_env("/proc/self/ns/net"), "{\"cniVersion\": ");
    assert_error(&run, 6, "not valid JSON");
}

#[test]
fn unsupported_version_and_missing_name() {
    let run = plugin(
        None,
        &add_env("/proc/self/ns/net"),
        r#"{"cniVersion":"2.0.0","name":"x"}"#,
    );
    assert_error(&run, 1, "2.0.0");
    let run = plugin(
        None,
        &add_env("/proc/self/ns/net"),
        r#"{"cniVersion":"1.0.0"}"#,
    );
    assert_error(&run, 7, "name");
}

#[test]
fn a_bad_mtu_or_veth_prefix_is_an_invalid_configuration() {
    let socket = Path::new(NO_DAEMON);
    let run = plugin(
        None,
        &add_env("/proc/self/ns/net"),
        &conf("1.0.0", socket, json!({"mtu": "jumbo"})),
    );
    assert_error(&run, 7, "mtu");
    let run = plugin(
        None,
        &add_env("/proc/self/ns/net"),
        &conf("1.0.0", socket, json!({"vethPrefix": "lo"})),
    );
    assert_error(&run, 7, "vethPrefix");
}

#[test]
fn missing_or_invalid_environment() {
    let stdin = conf("1.0.0", Path::new(NO_DAEMON), json!({}));
    for (drop, needle) in [
        ("CNI_CONTAINERID", "CNI_CONTAINERID"),
        ("CNI_NETNS", "CNI_NETNS"),
        ("CNI_IFNAME", "CNI_IFNAME"),
    ] {
        let env: Vec<_> = add_env("/proc/self/ns/net")
            .into_iter()
            .filter(|(k, _)| *k != drop)
            .collect();
        assert_error(&plugin(None, &env, &stdin), 4, needle);
    }
    let mut env = add_env("/proc/self/ns/net");
    env[1] = ("CNI_CONTAINERID", "../etc");
    assert_error(&plugin(None, &env, &stdin), 4, "CNI_CONTAINERID");
    let mut env = add_env("/proc/self/ns/net");
    env[3] = ("CNI_IFNAME", "eth0/../x");
    assert_error(&plugin(None, &env, &stdin), 4, "CNI_IFNAME");
    let mut env = add_env("/proc/self/ns/net");
    env[0] = ("CNI_COMMAND", "FROB");
    assert_error(&plugin(None, &env, &stdin), 4, "FROB");
}

#[test]
fn unknown_cni_args_need_ignore_unknown() {
    let server = AddressServer::start(&[]);
    let stdin = conf("1.0.0", &server.socket, json!({}));
    let mut env = add_env("/proc/self/ns/net");
    env[5] = ("CNI_ARGS", "K8S_POD_NAME=web;FAVOURITE_COLOUR=blue");
    assert_error(&plugin(None, &env, &stdin), 4, "FAVOURITE_COLOUR");
    assert!(server.requests().is_empty(), "nothing may reach the daemon");
}

#[test]
fn a_netns_that_does_not_exist_is_an_unknown_container() {
    let server = AddressServer::start(&[]);
    let stdin = conf("1.0.0", &server.socket, json!({}));
    let run = plugin(None, &add_env("/var/run/netns/no-such-namespace"), &stdin);
    assert_error(&run, 3, "/var/run/netns/no-such-namespace");
    assert!(server.requests().is_empty(), "no address may be taken");
}

/// The veth pair is created while the daemon is asked for the address; when no address comes,
/// neither end may stay behind.
fn assert_nothing_wired(node: &Netns, pod: &Netns) {
    let pod_links = pod.exec("ip -o link show");
    assert!(!pod_links.contains("eth0"), "{pod_links}");
    let node_links = node.exec("ip -o link show");
    assert!(!node_links.contains("eni"), "{node_links}");
}

#[test]
fn add_with_the_daemon_down_says_try_again_later_and_wires_nothing() {
    if !can_run_datapath_tests("add_with_the_daemon_down_says_try_again_later_and_wires_nothing") {
        return;
    }
    let node = Netns::new("badnode");
    let pod = Netns::new("badpod");
    let path = pod.path();
    let run = plugin(
        Some(&node),
        &add_env(path.to_str().unwrap()),
        &conf("1.0.0", Path::new(NO_DAEMON), json!({})),
    );
    assert_error(&run, 11, NO_DAEMON);
    assert_nothing_wired(&node, &pod);
}

#[test]
fn an_empty_pool_says_try_again_later_and_wires_nothing() {
    if !can_run_datapath_tests("an_empty_pool_says_try_again_later_and_wires_nothing") {
        return;
    }
    let server = AddressServer::start(&[]);
    let node = Netns::new("badnode");
    let pod = Netns::new("badpod");
    let path = pod.path();
    let run = plugin(
        Some(&node),
        &add_env(path.to_str().unwrap()),
        &conf("1.0.0", &server.socket, json!({})),
    );
    assert_error(&run, 11, "no free address");
    assert_nothing_wired(&node, &pod);
}

#[test]
fn status_reports_the_daemon_and_needs_1_1() {
    let server = AddressServer::start(&[(std::net::Ipv4Addr::new(10, 0, 0, 5), 0, 254)]);
    let env = [("CNI_COMMAND", "STATUS")];
    let up = plugin(None, &env, &conf("1.1.0", &server.socket, json!({})));
    assert_eq!(up.status, 0, "{}", up.raw);
    assert!(up.raw.is_empty());
    let down = plugin(None, &env, &conf("1.1.0", Path::new(NO_DAEMON), json!({})));
    assert_error(&down, 50, "not reachable");
    let old = plugin(None, &env, &conf("1.0.0", &server.socket, json!({})));
    assert_error(&old, 1, "1.1.0");
}

#[test]
fn check_needs_0_4_and_a_prev_result() {
    let stdin = conf("0.3.1", Path::new(NO_DAEMON), json!({}));
    let mut env = add_env("/proc/self/ns/net");
    env[0] = ("CNI_COMMAND", "CHECK");
    assert_error(&plugin(None, &env, &stdin), 1, "0.4.0");
    let stdin = conf("1.0.0", Path::new(NO_DAEMON), json!({}));
    assert_error(&plugin(None, &env, &stdin), 7, "prevResult");
}

#[test]
fn del_of_something_never_added_succeeds() {
    let server = AddressServer::start(&[]);
    let env = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "never-added"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", ""),
    ];
    let run = plugin(None, &env, &conf("1.0.0", &server.socket, json!({})));
    assert_eq!(run.status, 0, "{}", run.raw);
    assert!(matches!(
        server.requests().as_slice(),
        [proto::Request::Del { .. }]
    ));
}
