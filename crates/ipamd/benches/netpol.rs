//! NetworkPolicy end to end on the demo machinery (needs root), each figure against its reference
//! measured in the same run:
//! * ADD through the plugin with NetworkPolicy enforced (policies in force) against not enforced;
//! * a policy changed through the API server until its rules are in the node's kernel, p50 and
//!   p99, against the 100 ms target; and until the established flows it denies are cut;
//! * TCP connections per second between two pods with 500 rules in the server's chain (the allowed
//!   client's grant last) against no policy at all (target: within 5%).
//!
//! Run with `bench/netpol.sh`.

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use testbed::probe::WhoAmI;
use testbed::{Binaries, Options, Pod, PolicyStage, Stop, Testbed};

const ADDS: usize = 20;
const CHANGES: usize = 40;
const RULES: usize = 500;
const PORT: u16 = 7000;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn testbed(policy: bool) -> Testbed {
    let mut binaries = Binaries::locate().expect("bench/netpol.sh builds the binaries");
    binaries.ipamd = env!("CARGO_BIN_EXE_vpc-ipamd").into();
    let mut daemon_env = vec![("WARM_IP_TARGET".to_string(), (ADDS + 5).to_string())];
    if policy {
        daemon_env.push(("ENABLE_NETWORK_POLICY".into(), "true".into()));
    }
    let mut tb = Testbed::start(
        &Options {
            kubernetes: true,
            daemon_env,
            ..Options::default()
        },
        binaries,
    )
    .expect("a testbed");
    tb.kube.as_ref().unwrap().apply(
        "namespaces",
        json!({"metadata": {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}}}),
    );
    tb.start_daemon(0).expect("the daemon starts");
    tb
}

fn policy(name: &str, spec: Value) -> Value {
    json!({"metadata": {"namespace": "default", "name": name}, "spec": spec})
}

/// Waits until the node has the API server's last NetworkPolicy change in its kernel.
fn in_force(tb: &Testbed) {
    tb.wait_policy_in_force("networkpolicies", Duration::from_secs(30))
        .unwrap();
}

/// ADD times of `ADDS` pods through the plugin, one at a time, warm pool.
fn adds(tb: &Testbed, labels: &[(&str, &str)]) -> (Vec<Duration>, Vec<Pod>) {
    let mut times = Vec::new();
    let mut pods = Vec::new();
    for _ in 0..ADDS {
        let started = Instant::now();
        pods.push(tb.add_pod_labelled(0, labels).expect("ADD"));
        times.push(started.elapsed());
    }
    (times, pods)
}

/// TCP connections from `client` to `server` per second over `window`, one after the other, each
/// connected, answered (the server's WhoAmI) and closed.
fn connection_rate(client: &Pod, server: &Pod, window: Duration) -> f64 {
    let target = SocketAddr::new(server.ip, PORT);
    client
        .netns
        .run(move || {
            let started = Instant::now();
            let mut n = 0u64;
            while started.elapsed() < window {
                testbed::probe::seen_as(target).expect("the server answers");
                n += 1;
            }
            n as f64 / started.elapsed().as_secs_f64()
        })
        .expect("the client's namespace")
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED netpol bench: needs root for network namespaces");
        return;
    }
    let window = Duration::from_secs(3);

    // Reference: no NetworkPolicy enforcement.
    let mut off = testbed(false);
    let (mut add_off, pods_off) = adds(&off, &[("app", "web")]);
    let server = &pods_off[0];
    let address = SocketAddr::new(server.ip, PORT);
    let listener = server
        .netns
        .run(move || WhoAmI::bind(address))
        .unwrap()
        .unwrap();
    let rate_off = connection_rate(&pods_off[1], server, window);
    drop(listener);
    for pod in pods_off {
        off.del_pod(pod).unwrap();
    }
    off.stop_daemon(0, Stop::Term).unwrap();
    drop(off);

    // Enforced: the web pods isolated by a policy before they start, the db pod by 500 grants.
    let mut on = testbed(true);
    let api = on.kube.as_ref().unwrap();
    api.apply(
        "networkpolicies",
        policy("web", json!({"podSelector": {"matchLabels": {"app": "web"}},
                             "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 80}]}]})),
    );
    let (mut add_on, mut pods) = adds(&on, &[("app", "web")]);
    let db = on.add_pod_labelled(0, &[("app", "db")]).unwrap();
    let client = &pods[1];
    let client_ip = client.ip.to_string();
    let api = on.kube.as_ref().unwrap();
    for i in 0..RULES - 1 {
        let cidr = format!("192.168.{}.{}/32", i / 250, i % 250 + 1);
        api.apply(
            "networkpolicies",
            policy(
                &format!("db-{i:03}"),
                json!({"podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}], "ports": [{"port": PORT}]}]}),
            ),
        );
    }
    // The allowed client's grant sorts last.
    api.apply(
        "networkpolicies",
        policy("db-zzz", json!({"podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": format!("{client_ip}/32")}}], "ports": [{"port": PORT}]}]})),
    );
    in_force(&on);
    let address = SocketAddr::new(db.ip, PORT);
    let listener = db
        .netns
        .run(move || WhoAmI::bind(address))
        .unwrap()
        .unwrap();
    let rate_on = connection_rate(client, &db, window);
    drop(listener);

    // A policy change to its rules in the kernel: the web policy's port toggled.
    // The first narrows the client, whose connection-rate run left some 30,000 flows tracked.
    let (mut changes, mut cuts) = (Vec::new(), Vec::new());
    for i in 0..CHANGES {
        let port = if i % 2 == 0 { 81 } else { 80 };
        let started = Instant::now();
        on.kube.as_ref().unwrap().apply(
            "networkpolicies",
            policy("web", json!({"podSelector": {"matchLabels": {"app": "web"}},
                                 "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": port}]}]})),
        );
        on.wait_policy(
            "networkpolicies",
            PolicyStage::Rules,
            Duration::from_secs(30),
        )
        .unwrap();
        changes.push(started.elapsed());
        in_force(&on);
        cuts.push(started.elapsed());
    }

    pods.push(db);
    for pod in pods {
        on.del_pod(pod).unwrap();
    }
    on.stop_daemon(0, Stop::Term).unwrap();

    let (off50, on50) = (
        ms(percentile(&mut add_off, 0.5)),
        ms(percentile(&mut add_on, 0.5)),
    );
    println!(
        "ADD through the plugin, p50 of {ADDS}: NetworkPolicy enforced {on50:.1} ms, not enforced {off50:.1} ms, ratio {:.2}",
        on50 / off50
    );
    let (c50, c99) = (
        ms(percentile(&mut changes, 0.5)),
        ms(percentile(&mut changes, 0.99)),
    );
    println!(
        "policy change through the API server to its rules in the kernel, {CHANGES} changes: p50 {c50:.1} ms, p99 {c99:.1} ms; target 100 ms, ratio {:.2} (p99)",
        c99 / 100.0
    );
    let (f50, f99) = (
        ms(percentile(&mut cuts, 0.5)),
        ms(percentile(&mut cuts, 0.99)),
    );
    println!(
        "  and to the established flows it denies cut (20 pods narrowed): p50 {f50:.1} ms, p99 {f99:.1} ms"
    );
    println!(
        "TCP connections per second, pod to pod: {RULES} rules in the server's chain {rate_on:.0}, no policy {rate_off:.0}, ratio {:.3} (target at least 0.95)",
        rate_on / rate_off
    );
}
