//! NetworkPolicy in real namespaces: pods wired by the plugin, policies evaluated by `netpol`, the
//! table rendered and applied by `datapath::netpol`, and real TCP between the pods and the node.

mod common;

use common::*;
use datapath::netpol::{self as table, PodRules};
use netpol::*;
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

const WEB: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 41);
const DB: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 42);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 43);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);

/// A node namespace with an address, as the datapath tests' node has.
fn node() -> Netns {
    let node = Netns::new("npnode");
    node.exec("sysctl -qw net.ipv4.ip_forward=1");
    node.exec("ip link add eth0 type veth peer name peer0");
    node.exec(&format!("ip addr add {NODE_IP}/24 dev eth0"));
    node.exec("ip link set eth0 up");
    node.exec("ip link set peer0 up");
    node
}

fn add(node: &Netns, server: &AddressServer, pod: &Netns, name: &str) -> String {
    let path = pod.path();
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}");
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", name),
        ("CNI_NETNS", path.to_str().unwrap()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
        ("CNI_ARGS", args.as_str()),
    ];
    let run = plugin(Some(node), &env, &conf("1.0.0", &server.socket, json!({})));
    assert_eq!(run.status, 0, "ADD {name}: {}", run.raw);
    run.stdout["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Accepts connections on these ports in `ns` until the process ends, answering each with a line.
fn serve(ns: &Netns, ip: Ipv4Addr, ports: &[u16]) {
    for &port in ports {
        let listener = ns
            .run(move || TcpListener::bind(SocketAddr::from((ip, port))))
            .unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                use std::io::Write;
                let _ = (&stream).write_all(b"hello\n");
            }
        });
    }
}

/// Whether a TCP connection from `ns` to `to` is accepted and answered within a second.
fn reaches(ns: &Netns, to: Ipv4Addr, port: u16) -> bool {
    ns.run(move || {
        let Ok(mut stream) =
            TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_secs(1))
        else {
            return false;
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut line = String::new();
        use std::io::Read;
        stream.read_to_string(&mut line).is_ok() && line == "hello\n"
    })
}

fn labels(app: &str) -> Labels {
    Labels::from([("app".to_string(), app.to_string())])
}

fn selector(app: &str) -> Selector {
    Selector {
        match_labels: labels(app),
        ..Selector::default()
    }
}

fn tcp(port: u16) -> PortSpec {
    PortSpec {
        protocol: Protocol::Tcp,
        port: Some(PortRef::Number(port)),
        end_port: None,
    }
}

#[test]
fn policies_allow_what_they_say_and_nothing_else_on_real_traffic() {
    let test = "policies_allow_what_they_say_and_nothing_else_on_real_traffic";
    if !can_run_datapath_tests(test) {
        return;
    }
    let node = node();
    let server = AddressServer::start(&[(WEB, 0, 254), (DB, 0, 254), (OTHER, 0, 254)]);
    let (web, db, other) = (Netns::new("npweb"), Netns::new("npdb"), Netns::new("npoth"));
    let veths = [
        add(&node, &server, &web, "web"),
        add(&node, &server, &db, "db"),
        add(&node, &server, &other, "other"),
    ];
    serve(&web, WEB, &[80]);
    serve(&db, DB, &[5432, 80]);
    serve(&other, OTHER, &[80]);
    // Before any policy everything flows; two long-lived flows are opened to db's echo port, one
    // the policy will allow and one it will deny. The table without policies is in place already,
    // as on a node where conntrack tracks every flow (a namespace without a rule that reads
    // conntrack tracks none, and would pick flows up afresh anyway).
    node.run(|| table::apply(&[])).unwrap();
    assert!(reaches(&other, DB, 5432));
    let echo = SocketAddr::from((DB, 7001));
    let echo_server = peer_echo_server(&db, echo, 2);
    let mut allowed_flow = Client::connect(&web, echo).unwrap();
    let mut denied_flow = Client::connect(&other, echo).unwrap();
    assert_eq!(allowed_flow.seen_as().unwrap(), WEB.to_string());
    assert_eq!(denied_flow.seen_as().unwrap(), OTHER.to_string());

    let pod = |name: &str, ip: Ipv4Addr| Pod {
        namespace: "default".into(),
        name: name.into(),
        labels: labels(name),
        ips: vec![IpAddr::V4(ip)],
        ports: vec![],
    };
    let cluster = Cluster {
        namespaces: vec![Namespace {
            name: "default".into(),
            labels: Labels::new(),
        }],
        pods: vec![pod("web", WEB), pod("db", DB), pod("other", OTHER)],
        policies: vec![
            // db takes TCP 5432 from web only.
            Policy {
                namespace: "default".into(),
                name: "db".into(),
                pod_selector: selector("db"),
                ingress: vec![Rule {
                    peers: vec![Peer::Pods {
                        pod_selector: Some(selector("web")),
                        namespace_selector: None,
                    }],
                    ports: vec![tcp(5432), tcp(7001)],
                }],
                ..Policy::default()
            },
            // other may only send to the pod subnet, web excepted.
            Policy {
                namespace: "default".into(),
                name: "other".into(),
                pod_selector: selector("other"),
                policy_types: Some(vec![Direction::Egress]),
                egress: vec![Rule {
                    peers: vec![Peer::IpBlock {
                        cidr: "10.0.0.0/24".parse().unwrap(),
                        except: vec![format!("{WEB}/32").parse().unwrap()],
                    }],
                    ports: vec![],
                }],
                ..Policy::default()
            },
        ],
    };
    let evaluator = Evaluator::new(&cluster);
    let rules: Vec<PodRules> = cluster
        .pods
        .iter()
        .zip(&veths)
        .map(|(p, veth)| {
            let verdicts = evaluator.pod(p);
            PodRules {
                host_veth: veth.clone(),
                addresses: p.ips.clone(),
                ingress: verdicts.ingress,
                egress: verdicts.egress,
            }
        })
        .collect();
    node.run(|| table::apply(&rules)).unwrap();
    let changed = table::changed_addresses(&[], &rules);
    node.run(|| table::forget_flows(&changed)).unwrap();
    // The flow the policy denies is cut; the allowed one goes on.
    assert_eq!(allowed_flow.seen_as().unwrap(), WEB.to_string());
    assert!(
        denied_flow.seen_as().is_err(),
        "a flow the new policy denies lives on"
    );
    drop((allowed_flow, denied_flow));
    drop(echo_server);

    assert!(reaches(&web, DB, 5432), "web to db on 5432 is allowed");
    assert!(!reaches(&web, DB, 80), "db takes nothing else");
    assert!(!reaches(&other, DB, 5432), "db takes nothing from other");
    // What db's ingress chain dropped is counted, by chain.
    let db_chain = format!(
        "in-{}",
        rules
            .iter()
            .find(|r| r.addresses.contains(&std::net::IpAddr::V4(DB)))
            .unwrap()
            .host_veth
    );
    let dropped = node.run(table::dropped).unwrap();
    assert!(dropped[&db_chain] >= 2, "two attempts denied: {dropped:?}");
    assert!(
        reaches(&db, WEB, 80),
        "web is not isolated; db's egress is open; replies return"
    );
    assert!(
        !reaches(&other, WEB, 80),
        "other may not reach web (except)"
    );
    assert!(
        reaches(&node, DB, 80),
        "the node (kubelet probes) is never judged"
    );
    // A change touches only what differs: db now takes other on 5432 too.
    let mut widened = cluster.clone();
    widened.policies[0].ingress[0].peers.push(Peer::Pods {
        pod_selector: Some(selector("other")),
        namespace_selector: None,
    });
    let evaluator = Evaluator::new(&widened);
    let now: Vec<PodRules> = rules
        .iter()
        .zip(&widened.pods)
        .map(|(r, p)| {
            let v = evaluator.pod(p);
            PodRules {
                ingress: v.ingress,
                egress: v.egress,
                ..r.clone()
            }
        })
        .collect();
    let script = table::update_script(&rules, &now);
    assert!(
        script.starts_with(&format!("flush chain inet {} in-", table::TABLE))
            && !script.contains("eg-"),
        "only db's ingress chain changes: {script}"
    );
    node.run(|| table::update(&rules, &now)).unwrap();
    assert!(reaches(&other, DB, 5432), "the update is in force");
    let after = node.run(table::dropped).unwrap();
    assert!(
        after[&db_chain] >= dropped[&db_chain],
        "the count outlives the chain's new rules: {after:?}"
    );
    assert!(
        !reaches(&other, WEB, 80),
        "and other's egress chain is as it was"
    );
    // Updated to no policy at all: the chains and map entries go, everything flows again.
    node.run(|| table::update(&now, &[])).unwrap();
    assert!(reaches(&other, WEB, 80));
    assert!(
        node.run(table::dropped).unwrap().is_empty(),
        "no chain, no count"
    );
    assert!(!node
        .exec(&format!("nft list table inet {}", table::TABLE))
        .contains("chain in-"));
    node.run(|| table::apply(&[])).unwrap();
    assert!(reaches(&other, DB, 5432));
    node.run(table::remove).unwrap();
    assert!(!node.exec("nft list tables").contains(table::TABLE));
}
