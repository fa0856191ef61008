//! The examples of upstream's docs/eni-and-ip-target.md and docs/prefix-and-ip-target.md, replayed through
//! the real engine against the simulated VPC.

mod common;
use common::{one_node, set_pods};

struct Row {
    pods: usize,
    enis: usize,
    /// Secondary IPs per ENI (secondary-IP mode) or prefixes per ENI (prefix mode), summed.
    held: u32,
    unused_ips: u32,
}

fn check(instance: &str, settings: &[(&str, &str)], rows: &[Row], prefixes: bool) {
    let mut c = one_node(instance, settings);
    let mut running = Vec::new();
    for r in rows {
        set_pods(&mut c, &mut running, r.pods);
        let pool = &c.nodes[0].pool;
        let st = pool.stats();
        let held = if prefixes { st.prefixes } else { st.total };
        let what = format!("{instance} {settings:?} with {} pods", r.pods);
        assert_eq!(pool.enis().len(), r.enis, "ENIs, {what}");
        assert_eq!(
            held,
            r.held,
            "{} held, {what}",
            if prefixes { "prefixes" } else { "IPs" }
        );
        assert_eq!(st.total - st.assigned, r.unused_ips, "unused IPs, {what}");
    }
}

fn rows(t: &[(usize, usize, u32, u32)]) -> Vec<Row> {
    t.iter()
        .map(|&(pods, enis, held, unused_ips)| Row {
            pods,
            enis,
            held,
            unused_ips,
        })
        .collect()
}

#[test]
fn eni_and_ip_target_t3_small() {
    check(
        "t3.small",
        &[("WARM_ENI_TARGET", "1")],
        &rows(&[(0, 1, 3, 3), (5, 3, 9, 4), (9, 3, 9, 0)]),
        false,
    );
    let ip1 = [("WARM_IP_TARGET", "1"), ("MINIMUM_IP_TARGET", "1")];
    check(
        "t3.small",
        &ip1,
        &rows(&[(0, 1, 1, 1), (5, 2, 6, 1), (9, 3, 9, 0)]),
        false,
    );
    let ip2 = [("WARM_IP_TARGET", "2"), ("MINIMUM_IP_TARGET", "5")];
    check(
        "t3.small",
        &ip2,
        &rows(&[(0, 2, 5, 5), (5, 3, 7, 2), (9, 3, 9, 0)]),
        false,
    );
}

#[test]
fn eni_and_ip_target_p3dn() {
    check(
        "p3dn.24xlarge",
        &[],
        &rows(&[(0, 1, 49, 49), (3, 2, 98, 95), (95, 3, 147, 52)]),
        false,
    );
    let t = [("WARM_IP_TARGET", "5"), ("MINIMUM_IP_TARGET", "10")];
    check(
        "p3dn.24xlarge",
        &t,
        &rows(&[
            (0, 1, 10, 10),
            (7, 1, 12, 5),
            (15, 1, 20, 5),
            (45, 2, 50, 5),
        ]),
        false,
    );
}

#[test]
fn prefix_and_ip_target_t3_small() {
    let pd = ("ENABLE_PREFIX_DELEGATION", "true");
    check(
        "t3.small",
        &[pd, ("WARM_PREFIX_TARGET", "1")],
        &rows(&[
            (0, 1, 1, 16),
            (5, 1, 2, 27),
            (16, 1, 2, 16),
            (17, 1, 3, 31),
            (58, 2, 5, 22),
        ]),
        true,
    );
    check(
        "t3.small",
        &[pd, ("WARM_IP_TARGET", "1"), ("MINIMUM_IP_TARGET", "1")],
        &rows(&[(0, 1, 1, 16), (5, 1, 1, 11), (17, 1, 2, 15), (58, 2, 4, 6)]),
        true,
    );
    // Upstream's row for 0 pods says 1 prefix and 16 unused IPs but also "0,0" pods per prefix and 2
    // prefixes per ENI: MINIMUM_IP_TARGET=20 needs 2 prefixes (32 addresses), which is what we assert.
    check(
        "t3.small",
        &[pd, ("WARM_IP_TARGET", "7"), ("MINIMUM_IP_TARGET", "20")],
        &rows(&[(0, 1, 2, 32), (5, 1, 2, 27), (17, 1, 2, 15), (58, 2, 5, 22)]),
        true,
    );
}

#[test]
fn prefix_and_ip_target_p3dn() {
    let pd = ("ENABLE_PREFIX_DELEGATION", "true");
    // Upstream's rows list 2 and 3 ENIs (with 0 prefixes on the extra ones) for 3 and 95 pods; one ENI
    // holds up to 49 prefixes, so the prefixes in its table (2 and 7) fit on the primary ENI, as here.
    check(
        "p3dn.24xlarge",
        &[pd, ("WARM_PREFIX_TARGET", "1")],
        &rows(&[(0, 1, 1, 16), (3, 1, 2, 29), (95, 1, 7, 17)]),
        true,
    );
    check(
        "p3dn.24xlarge",
        &[pd, ("WARM_IP_TARGET", "5"), ("MINIMUM_IP_TARGET", "10")],
        &rows(&[(0, 1, 1, 16), (7, 1, 1, 9), (15, 1, 2, 17), (45, 1, 4, 19)]),
        true,
    );
}

/// Upstream makes no EC2 call when a 2-pod rolling update (old pods first, as with maxUnavailable)
/// passes over a half-full node with the default WARM_ENI_TARGET=1: the old pods' addresses,
/// cooling down, still count as warm.
#[test]
fn a_rolling_update_on_a_half_full_node_makes_no_ec2_call() {
    use std::time::Duration;
    let mut c = one_node("m5.large", &[]);
    let mut running = Vec::new();
    // m5.large: 9 addresses per ENI; 8 pods on two ENIs leave 10 free.
    set_pods(&mut c, &mut running, 8);
    assert_eq!(c.nodes[0].pool.enis().len(), 2);
    let calls = |c: &sim::Cluster| -> u64 {
        c.report()
            .ec2_calls
            .iter()
            .filter(|(op, _)| !op.starts_with("Describe"))
            .map(|(_, n)| n.ok + n.failed + n.throttled)
            .sum()
    };
    let before = calls(&c);
    // Two old pods go, two new ones start (8 free, 2 cooling), then the cooldown passes.
    for _ in 0..2 {
        let old = running.remove(0);
        c.stop_pod(0, old);
        c.run_for(Duration::from_secs(1), true).unwrap();
    }
    for _ in 0..2 {
        running.push(c.start_pod(0));
        c.run_for(Duration::from_secs(1), true).unwrap();
    }
    c.run_for(Duration::from_secs(900), true).unwrap();
    assert_eq!(calls(&c), before, "{:?}", c.report().ec2_calls);
    assert_eq!(c.nodes[0].pool.enis().len(), 2);
}
