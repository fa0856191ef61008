//! NetworkPolicy at a busy node's scale: 250 local pods in a cluster of 2,500 pods and 1,000
//! policies. Prints how long evaluating the local pods, rendering the table and applying it in one
//! nft transaction take (in a network namespace of its own; the apply needs root and nft).

use datapath::netpol::{self, PodRules};
use netpol_model::*;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

extern crate netpol as netpol_model;

const NAMESPACES: usize = 10;
const PODS: usize = 2500;
const LOCAL: usize = 250;
const POLICIES: usize = 1000;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn selector(pairs: &[(&str, String)]) -> Selector {
    Selector {
        match_labels: labels(pairs),
        ..Selector::default()
    }
}

/// A deterministic cluster: apps of ten pods each, every policy letting one app reach another
/// on a port or a range, some from other namespaces, some from address blocks with holes, a
/// quarter with egress rules too.
fn cluster() -> Cluster {
    let pods = (0..PODS)
        .map(|i| Pod {
            namespace: format!("ns{}", i % NAMESPACES),
            name: format!("pod{i}"),
            labels: labels(&[
                ("app", format!("app{}", i / 10)),
                ("tier", format!("t{}", i % 3)),
            ]),
            ips: vec![IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32 + 1))],
            ports: vec![ContainerPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        })
        .collect();
    let policies = (0..POLICIES)
        .map(|i| {
            let ns = format!("ns{}", i % NAMESPACES);
            let from = match i % 4 {
                0 => Peer::IpBlock {
                    cidr: format!("10.{}.0.0/16", i % 8).parse().unwrap(),
                    except: vec![format!("10.{}.{}.0/24", i % 8, i % 200).parse().unwrap()],
                },
                1 => Peer::Pods {
                    pod_selector: Some(selector(&[("app", format!("app{}", (i * 7) % 250))])),
                    namespace_selector: Some(Selector::default()),
                },
                _ => Peer::Pods {
                    pod_selector: Some(selector(&[("app", format!("app{}", (i * 3) % 250))])),
                    namespace_selector: None,
                },
            };
            let port = PortSpec {
                protocol: if i % 5 == 0 {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                },
                port: Some(if i % 6 == 0 {
                    PortRef::Name("http".into())
                } else {
                    PortRef::Number(1000 + (i % 50) as u16)
                }),
                end_port: (i % 7 == 0).then_some(1100 + (i % 50) as u16),
            };
            let rule = Rule {
                peers: vec![from],
                ports: vec![port],
            };
            Policy {
                namespace: ns,
                name: format!("p{i}"),
                pod_selector: selector(&[("app", format!("app{}", i % 250))]),
                policy_types: None,
                ingress: vec![rule.clone()],
                egress: if i % 4 == 3 { vec![rule] } else { vec![] },
            }
        })
        .collect();
    Cluster {
        namespaces: (0..NAMESPACES)
            .map(|i| Namespace {
                name: format!("ns{i}"),
                labels: labels(&[("team", format!("team{}", i % 3))]),
            })
            .collect(),
        pods,
        policies,
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let cluster = cluster();
    // One pod of every app is on this node, across the namespaces: each is selected by four
    // policies.
    let local: Vec<&Pod> = (0..LOCAL)
        .map(|i| &cluster.pods[i * (PODS / LOCAL) + i % NAMESPACES])
        .collect();
    let mut evaluations = Vec::new();
    let mut rules = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let evaluator = Evaluator::new(&cluster);
        rules = local
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let verdicts = evaluator.pod(pod);
                PodRules {
                    host_veth: format!("eni{i:011x}"),
                    addresses: pod.ips.clone(),
                    ingress: verdicts.ingress,
                    egress: verdicts.egress,
                }
            })
            .collect::<Vec<_>>();
        evaluations.push(started.elapsed());
    }
    let started = Instant::now();
    let text = netpol::ruleset(&rules);
    let render = started.elapsed();
    let isolated = rules
        .iter()
        .filter(|r| r.ingress != Verdict::Open || r.egress != Verdict::Open)
        .count();
    println!(
        "{LOCAL} local pods, {PODS} pods in {NAMESPACES} namespaces, {POLICIES} policies: {isolated} pods isolated"
    );
    println!(
        "evaluate: p50 {:.1} ms (5 runs); render: {:.1} ms, {} kB of nftables text",
        median(evaluations).as_secs_f64() * 1e3,
        render.as_secs_f64() * 1e3,
        text.len() / 1024
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("nft").arg("-v").output().is_err() {
        println!("nft transaction: not measured (needs root and nft)");
        return;
    }
    let name = format!("npbench{}", std::process::id());
    let added = Command::new("ip").args(["netns", "add", &name]).status();
    assert!(added.is_ok_and(|s| s.success()), "ip netns add {name}");
    let ns = datapath::netns::NetNs::open(format!("/var/run/netns/{name}")).unwrap();
    let applies: Vec<Duration> = (0..5)
        .map(|_| {
            ns.run(|| {
                let started = Instant::now();
                netpol::apply(&rules).unwrap();
                started.elapsed()
            })
            .unwrap()
        })
        .collect();
    // One policy edited (a peer added), as a user's kubectl apply: evaluate again, then update
    // only the chains that differ, back and forth. (Policy 1 has a numbered port: policy 0's named
    // UDP port resolves on no pod, and editing its peers changes no rule.)
    let mut edited = cluster.clone();
    edited.policies[1].ingress[0].peers.push(Peer::IpBlock {
        cidr: "192.168.0.0/16".parse().unwrap(),
        except: vec![],
    });
    let mut changes = Vec::new();
    let mut changed_chains = 0;
    for round in 0..10 {
        let to = if round % 2 == 0 { &edited } else { &cluster };
        let started = Instant::now();
        let evaluator = Evaluator::new(to);
        let next: Vec<PodRules> = local
            .iter()
            .zip(&rules)
            .map(|(pod, old)| {
                let found = to
                    .pods
                    .iter()
                    .find(|p| p.name == pod.name)
                    .expect("the same pods");
                let v = evaluator.pod(found);
                PodRules {
                    ingress: v.ingress,
                    egress: v.egress,
                    ..old.clone()
                }
            })
            .collect();
        changed_chains = netpol::update_script(&rules, &next)
            .lines()
            .filter(|l| l.starts_with("flush chain"))
            .count();
        ns.run(|| netpol::update(&rules, &next).unwrap()).unwrap();
        changes.push(started.elapsed());
        rules = next;
    }
    let _ = Command::new("ip").args(["netns", "del", &name]).status();
    println!(
        "nft transaction (the whole table replaced): p50 {:.1} ms (5 runs)",
        median(applies).as_secs_f64() * 1e3
    );
    println!(
        "one policy edited: evaluate and update {changed_chains} chain(s), p50 {:.1} ms, max {:.1} ms (10 runs); target, event to enforcement: 100 ms p99; ratio {:.2}",
        median(changes.clone()).as_secs_f64() * 1e3,
        changes.iter().max().unwrap().as_secs_f64() * 1e3,
        changes.iter().max().unwrap().as_secs_f64() * 1e3 / 100.0
    );
}
