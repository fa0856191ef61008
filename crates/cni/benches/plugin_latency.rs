//! 100 pods through ADD and DEL with our plugin and with the reference ptp + host-local plugins, in
//! the same run on the same machine, taking turns pod by pod, each plugin process started inside the
//! same node namespace.
//! Prints p50 and p90 of each and our ratio to the reference, and the same for our plugin wiring
//! IPv6 pods (with `v4if0` for IPv4 egress) against its own IPv4 ADD. Needs root, the reference
//! plugins (`containernetworking-plugins`) and iproute2.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use proto::{Allocation, BranchAllocation};
use serde_json::{json, Value};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use testbed::vlan::{self, VlanPort};

const PODS: usize = 100;
const REFERENCE: &str = "/usr/lib/cni";

/// Runs `binary` as the runtime would; it must succeed.
fn invoke(binary: &Path, node: &Netns, env: &[(&'static str, String)], stdin: &str) -> PluginRun {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = run_cni(binary, Some(node), &env, stdin);
    assert_eq!(run.status, 0, "{} failed: {}", binary.display(), run.raw);
    run
}

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index].as_secs_f64() * 1000.0
}

#[derive(Default)]
struct Figures {
    add: Vec<Duration>,
    del: Vec<Duration>,
}

/// A plugin under test and the pods it wires.
struct Contender<'a> {
    binary: PathBuf,
    conf: String,
    /// The pods' Kubernetes namespace: our two contenders' host veths are named from it, and must
    /// not take each other's for a stale sandbox's.
    namespace: &'static str,
    pods: Vec<Netns>,
    results: Vec<String>,
    figures: Figures,
    node: &'a Netns,
    /// Branch pods' VLAN sub-interfaces (emulated: this kernel has none), made before the race.
    _vlans: Vec<VlanPort>,
    /// The daemon that serves this contender's pods, when it is its own.
    _server: Option<AddressServer>,
}

impl Contender<'_> {
    fn add(&mut self, i: usize) {
        let timed = invoke(
            &self.binary,
            self.node,
            &cni_env("ADD", i, &self.pods[i], self.namespace),
            &self.conf,
        );
        self.figures.add.push(timed.elapsed);
        self.results.push(timed.raw);
    }

    fn del(&mut self, i: usize) {
        let mut with_prev: Value = serde_json::from_str(&self.conf).unwrap();
        with_prev["prevResult"] = serde_json::from_str(&self.results[i]).unwrap();
        let timed = invoke(
            &self.binary,
            self.node,
            &cni_env("DEL", i, &self.pods[i], self.namespace),
            &with_prev.to_string(),
        );
        self.figures.del.push(timed.elapsed);
    }
}

/// Both plugins in turns, pod by pod, so that whatever else the machine does meanwhile (the
/// kernel tearing down namespaces of an earlier run, say) weighs on both alike.
fn race(contenders: &mut [Contender], pods: usize) {
    for i in 0..pods {
        contenders
            .iter_mut()
            .filter(|c| i < c.pods.len())
            .for_each(|c| c.add(i));
    }
    for i in 0..pods {
        contenders
            .iter_mut()
            .filter(|c| i < c.pods.len())
            .for_each(|c| c.del(i));
    }
}

fn cni_env(command: &str, i: usize, pod: &Netns, namespace: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", format!("bench-{i}")),
        ("CNI_NETNS", pod.path().display().to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", REFERENCE.to_string()),
        (
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=pod-{i}"),
        ),
    ]
}

fn main() {
    if unsafe { libc::geteuid() } != 0 || !Path::new(REFERENCE).join("ptp").exists() {
        eprintln!("plugin_latency needs root and {REFERENCE}/ptp (apt-get install containernetworking-plugins)");
        std::process::exit(2);
    }
    let node = Netns::new("bnode");
    // Fresh pod namespaces for every run: after DEL the runtime deletes them, which is when the
    // veths go (for both plugins' pods alike, outside the timed calls).
    let fresh_pods = |n: usize| -> Vec<Netns> { (0..n).map(|_| Netns::new("bpod")).collect() };

    let addresses: Vec<(Ipv4Addr, u32, u32)> = (0..PODS)
        .map(|i| {
            let address = Ipv4Addr::new(10, 1, (i / 200) as u8, (i % 200 + 10) as u8);
            // Half on the primary ENI, half on a secondary one, as on a busy node.
            if i % 2 == 0 {
                (address, 0, 254)
            } else {
                (address, 1, 2)
            }
        })
        .collect();
    let server = AddressServer::start(&addresses);
    let ours_conf = conf("1.0.0", &server.socket, json!({}));
    let v6_server = AddressServer::serving(
        (0..PODS)
            .map(|i| Allocation {
                address: Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0xaaaa, 0, 0, i as u16 + 1).into(),
                device_number: 0,
                route_table: 254,
                egress_v4: Some(Ipv4Addr::new(
                    169,
                    254,
                    172 + (i / 250) as u8,
                    (i % 250 + 2) as u8,
                )),
                branch: None,
            })
            .collect(),
    );
    let v6_conf = conf("1.0.0", &v6_server.socket, json!({"enableIPv6": true}));
    let data = tempfile::tempdir().unwrap();
    let reference_conf = json!({
        "cniVersion": "1.0.0",
        "name": "bench",
        "type": "ptp",
        "mtu": 9001,
        "ipam": {"type": "host-local", "subnet": "10.2.0.0/16", "dataDir": data.path()},
    })
    .to_string();

    let contenders = |pods: usize| {
        vec![
            Contender {
                binary: plugin_binary(),
                conf: ours_conf.clone(),
                namespace: "bench",
                pods: fresh_pods(pods),
                results: Vec::new(),
                figures: Figures::default(),
                node: &node,
                _vlans: Vec::new(),
                _server: None,
            },
            Contender {
                binary: Path::new(REFERENCE).join("ptp"),
                conf: reference_conf.clone(),
                namespace: "bench",
                pods: fresh_pods(pods),
                results: Vec::new(),
                figures: Figures::default(),
                node: &node,
                _vlans: Vec::new(),
                _server: None,
            },
            Contender {
                binary: plugin_binary(),
                conf: v6_conf.clone(),
                namespace: "bench6",
                pods: fresh_pods(pods),
                results: Vec::new(),
                figures: Figures::default(),
                node: &node,
                _vlans: Vec::new(),
                _server: None,
            },
            // A trunk's emulated VLANs are TCX programs on its link, at most 64 of them.
            branches(&node, fresh_pods(pods.min(vlan::MAX_PER_PARENT))),
        ]
    };
    // A warm-up round, so that neither pays for cold page caches.
    race(&mut contenders(5), 5);
    let mut measured = contenders(PODS);
    race(&mut measured, PODS);
    let [ours, reference, ours_v6, ours_branch] = &mut measured[..] else {
        unreachable!("four contenders")
    };
    let (ours, reference, ours_v6, ours_branch) = (
        &mut ours.figures,
        &mut reference.figures,
        &mut ours_v6.figures,
        &mut ours_branch.figures,
    );

    let row = |name: &str, f: &mut Figures| {
        let add = (percentile(&mut f.add, 0.5), percentile(&mut f.add, 0.9));
        let del = (percentile(&mut f.del, 0.5), percentile(&mut f.del, 0.9));
        println!(
            "{name:<18} ADD p50 {:>6.2} ms  p90 {:>6.2} ms   DEL p50 {:>6.2} ms  p90 {:>6.2} ms",
            add.0, add.1, del.0, del.1
        );
        (add, del)
    };
    println!(
        "{PODS} pods, ADD then DEL, the two plugins taking turns, each process started in the node namespace"
    );
    println!("vpc-cni binary: {}", plugin_binary().display());
    let (our_add, our_del) = row("vpc-cni", ours);
    let (ref_add, ref_del) = row("ptp + host-local", reference);
    let (v6_add, v6_del) = row("vpc-cni IPv6", ours_v6);
    let (branch_add, _) = row("vpc-cni branch", ours_branch);
    println!(
        "ratio ADD p50 {:.3} (target <= 0.25), p90 {:.3}",
        our_add.0 / ref_add.0,
        our_add.1 / ref_add.1
    );
    println!(
        "ratio DEL p50 {:.3} (target <= 0.20), p90 {:.3}",
        our_del.0 / ref_del.0,
        our_del.1 / ref_del.1
    );
    println!(
        "IPv6 (with v4if0) to IPv4: ADD p50 {:.3} (target <= 1.5; upstream waits ~1.5 s for DAD), DEL p50 {:.3}",
        v6_add.0 / our_add.0,
        v6_del.0 / our_del.0
    );
    println!(
        "branch pod (strict, warm branch, VLAN link adopted): ADD p50 {:.2} ms (target < 5 ms: ratio {:.3}), {:.3} of ptp + host-local",
        branch_add.0,
        branch_add.0 / 5.0,
        branch_add.0 / ref_add.0
    );
}

/// Pods with warm branch ENIs (security groups for pods), strict mode: the daemon's answer carries
/// the branch, and its VLAN sub-interface is there already (as a VLAN link the plugin would create
/// in one more netlink request).
fn branches(node: &Netns, pods: Vec<Netns>) -> Contender<'_> {
    const TRUNK_MAC: [u8; 6] = [0x02, 0x7a, 0, 0, 0, 1];
    let mac = |vlan: u16| [0x02, 0xb0, 0, 0, (vlan >> 8) as u8, vlan as u8];
    let text = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
    if !sh(&format!("ip -n {} -o link show", node.name)).contains("trunk@") {
        sh(&format!(
            "ip -n {n} link add trunk address {} type veth peer name trunkwire && \
             ip -n {n} link set trunk up && ip -n {n} link set trunkwire up",
            text(TRUNK_MAC),
            n = node.name
        ));
        node.run(datapath::branch::setup_strict_node).unwrap();
    }
    let vlans: Vec<u16> = (1..=pods.len() as u16).collect();
    let ports = vlans
        .iter()
        .map(|&v| {
            let name = datapath::branch::vlan_link(v);
            vlan::add(&node.name, "trunk", v, &name, &text(mac(v))).unwrap()
        })
        .collect();
    let server = AddressServer::serving(
        vlans
            .iter()
            .map(|&v| Allocation {
                address: Ipv4Addr::new(10, 3, (v / 200) as u8, (v % 200 + 10) as u8).into(),
                device_number: 0,
                route_table: datapath::branch::route_table(v),
                egress_v4: None,
                branch: Some(BranchAllocation {
                    vlan: v,
                    mac: mac(v),
                    subnet: Ipv4Addr::new(10, 3, 0, 0),
                    subnet_len: 16,
                    trunk_mac: TRUNK_MAC,
                }),
            })
            .collect(),
    );
    Contender {
        binary: plugin_binary(),
        conf: conf("1.0.0", &server.socket, json!({})),
        namespace: "benchsg",
        pods,
        results: Vec::new(),
        figures: Figures::default(),
        node,
        _vlans: ports,
        _server: Some(server),
    }
}
