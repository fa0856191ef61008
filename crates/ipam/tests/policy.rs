//! The policy as a pure function: each case builds a pool by hand and checks the actions by hand.

use ipam::action::{Failure, Outcome};
use ipam::pool::{EniInfo, NodeSpec};
use ipam::{
    decide, Action, AddressKind, Config, Demand, IpamKey, Ipv4Cidr, PodMeta, PolicyMemory, Pool,
    PoolSettings, Stall, Time,
};
use std::time::Duration;

fn settings(vars: &[(&str, &str)]) -> PoolSettings {
    let cfg = Config::from_lookup(|k| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    })
    .unwrap();
    PoolSettings::from_config(&cfg)
}

/// t3.medium-like: 3 ENIs, 5 slots each.
fn node() -> NodeSpec {
    NodeSpec {
        instance_type: "t3.medium".into(),
        slots_per_eni: 5,
        max_enis: 3,
        max_pods: 17,
        supports_prefixes: true,
        primary_subnet: "subnet-a".into(),
        security_groups: vec!["sg-1".into()],
        eni_config: None,
        unmanaged_enis: 0,
        unschedulable: false,
    }
}

fn eni(n: u32) -> EniInfo {
    EniInfo {
        id: format!("eni-{n}"),
        device_number: n,
        subnet_id: "subnet-a".into(),
        subnet_cidr: "10.0.0.0/16".parse().unwrap(),
        primary_ip: format!("10.0.{n}.1").parse().unwrap(),
        is_primary: n == 0,
        is_trunk: false,
        is_efa: false,
        excluded: false,
    }
}

/// A pool with ENIs 0..enis, each holding `per_eni` /32s (or /28s when `prefixes`), `pods` assigned.
fn pool(s: &PoolSettings, enis: u32, per_eni: u32, prefixes: bool, pods: u32) -> Pool {
    pool_on(node(), s, enis, per_eni, prefixes, pods)
}

fn pool_on(
    node: NodeSpec,
    s: &PoolSettings,
    enis: u32,
    per_eni: u32,
    prefixes: bool,
    pods: u32,
) -> Pool {
    let mut p = Pool::new(node, s);
    for n in 0..enis {
        p.add_eni(eni(n), Time::ZERO);
        let blocks: Vec<Ipv4Cidr> = (0..per_eni)
            .map(|i| {
                if prefixes {
                    format!("10.0.{n}.{}/28", 16 * (i + 1))
                } else {
                    format!("10.0.{n}.{}/32", 10 + i)
                }
            })
            .map(|c| c.parse().unwrap())
            .collect();
        p.add_blocks(&format!("eni-{n}"), &blocks);
    }
    for i in 0..pods {
        p.assign(
            &IpamKey::new("aws-cni", &format!("c{i}"), "eth0"),
            &PodMeta::default(),
            Time::ZERO,
            s.ip_cooldown,
        )
        .unwrap();
    }
    p
}

const LATER: Time = Time::from_secs(3600);

fn act(p: &Pool, s: &PoolSettings, pending: u32) -> Vec<Action> {
    decide(
        p,
        &PolicyMemory::default(),
        s,
        LATER,
        &Demand {
            pending_adds: pending,
        },
    )
    .actions
}

fn assign(eni: u32, kind: AddressKind, count: u32) -> Action {
    Action::AssignAddresses {
        eni: format!("eni-{eni}"),
        kind,
        count,
    }
}

#[test]
fn warm_eni_fills_whole_enis_then_creates_whole_enis() {
    let s = settings(&[]);
    // Fresh node: fill the primary ENI.
    assert_eq!(
        act(&pool(&s, 1, 0, false, 0), &s, 0),
        [assign(0, AddressKind::Ip, 5)]
    );
    // 5 slots full, 1 pod: 4 available < 5: a new ENI with 5 addresses, in the one CreateNetworkInterface call.
    let a = act(&pool(&s, 1, 5, false, 1), &s, 0);
    assert!(
        matches!(
            &a[..],
            [Action::CreateEni {
                kind: AddressKind::Ip,
                count: 5,
                ..
            }]
        ),
        "{a:?}"
    );
    // Exactly one ENI's worth free: nothing to do.
    assert!(act(&pool(&s, 2, 5, false, 5), &s, 0).is_empty());
}

#[test]
fn ip_target_short_and_over() {
    let s = settings(&[("WARM_IP_TARGET", "2"), ("MINIMUM_IP_TARGET", "6")]);
    // short = max(W - available, M - total) = max(2 - 1, 6 - 3) = 3: fill eni-0's 2 free slots, 1 on a new ENI.
    let a = act(&pool(&s, 1, 3, false, 2), &s, 0);
    assert_eq!(a[0], assign(0, AddressKind::Ip, 2));
    assert!(matches!(&a[1], Action::CreateEni { count: 1, .. }), "{a:?}");
    assert_eq!(a.len(), 2);
    // over = min(available - W, total - M) = min(8 - 2, 10 - 6) = 4 released, from the highest ENI first.
    let a = act(&pool(&s, 2, 5, false, 2), &s, 0);
    let [Action::ReleaseAddresses { eni, cidrs }] = &a[..] else {
        panic!("{a:?}")
    };
    assert_eq!((eni.as_str(), cidrs.len()), ("eni-1", 4));
}

#[test]
fn a_release_still_in_flight_is_not_asked_for_again() {
    // 5 free addresses, WARM_IP_TARGET=2: the first three go.
    let s = settings(&[("WARM_IP_TARGET", "2")]);
    let mut p = pool(&s, 1, 5, false, 0);
    let first = act(&p, &s, 0);
    let [release @ Action::ReleaseAddresses {
        cidrs: releasing, ..
    }] = &first[..]
    else {
        panic!("{first:?}")
    };
    assert_eq!(releasing.len(), 3);
    p.begin(release);
    // The Unassign call is still being retried a shrink interval later, when the target is 1: one more
    // address may go, and it is not one of the three already on their way.
    let s = settings(&[("WARM_IP_TARGET", "1")]);
    let again = decide(
        &p,
        &PolicyMemory::default(),
        &s,
        LATER + Duration::from_secs(60),
        &Demand::default(),
    )
    .actions;
    let [Action::ReleaseAddresses { cidrs, .. }] = &again[..] else {
        panic!("{again:?}")
    };
    assert_eq!(cidrs.len(), 1);
    assert!(!releasing.contains(&cidrs[0]), "{cidrs:?} again");
}

#[test]
fn pending_adds_grow_the_pool_beyond_the_target_at_once() {
    let s = settings(&[("WARM_IP_TARGET", "1")]);
    // Full pool, 4 ADDs waiting: 4 + 1 warm = 5 addresses in one call.
    assert_eq!(
        act(&pool(&s, 1, 0, false, 0), &s, 4),
        [assign(0, AddressKind::Ip, 5)]
    );
}

#[test]
fn cooling_addresses_are_not_available() {
    let s = settings(&[("WARM_IP_TARGET", "2")]);
    let mut p = pool(&s, 1, 3, false, 1);
    // 2 free: at target. One pod leaves: 2 free + 1 cooling; upstream would count 3 available and shrink.
    assert!(act(&p, &s, 0).is_empty());
    p.unassign(&IpamKey::new("aws-cni", "c0", "eth0"), LATER)
        .unwrap();
    let d = decide(&p, &PolicyMemory::default(), &s, LATER, &Demand::default());
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    assert_eq!(d.wake_at, Some(LATER + Duration::from_secs(30)));
}

#[test]
fn max_pods_caps_growth() {
    let s = settings(&[("WARM_IP_TARGET", "10")]);
    let mut n = node();
    n.max_pods = 7;
    let mut p = Pool::new(n, &s);
    p.add_eni(eni(0), Time::ZERO);
    p.add_blocks(
        "eni-0",
        &[
            "10.0.0.10/32".parse().unwrap(),
            "10.0.0.11/32".parse().unwrap(),
        ],
    );
    // Short 8 but only 5 more fit under max-pods 7.
    assert_eq!(
        act(&p, &s, 0),
        [
            assign(0, AddressKind::Ip, 3),
            Action::CreateEni {
                subnet: ipam::SubnetTarget::Discover {
                    primary: "subnet-a".into()
                },
                security_groups: vec!["sg-1".into()],
                kind: AddressKind::Ip,
                count: 2,
            }
        ]
    );
    p.add_blocks(
        "eni-0",
        &(12..17)
            .map(|i| format!("10.0.0.{i}/32").parse().unwrap())
            .collect::<Vec<_>>(),
    );
    let d = decide(&p, &PolicyMemory::default(), &s, LATER, &Demand::default());
    assert!(
        d.actions.is_empty() && d.stalls == [Stall::MaxPodsReached],
        "{d:?}"
    );
}

#[test]
fn max_eni_and_the_trunk_slot_limit_new_enis() {
    let s = settings(&[("MAX_ENI", "2")]);
    let a = act(&pool(&s, 2, 5, false, 6), &s, 0);
    assert!(a.is_empty(), "{a:?}");
    let mut s = settings(&[("ENABLE_POD_ENI", "true")]);
    let m5 = NodeSpec {
        instance_type: "m5.large".into(),
        ..node()
    };
    let d = decide(
        &pool_on(m5.clone(), &s, 2, 5, false, 6),
        &PolicyMemory::default(),
        &s,
        LATER,
        &Demand::default(),
    );
    assert!(
        d.actions.is_empty() && d.stalls == [Stall::NoRoomForEni],
        "the last slot is the trunk's: {d:?}"
    );
    // A t3 cannot carry a trunk: nothing is kept for one.
    let a = act(&pool(&s, 2, 5, false, 6), &s, 0);
    assert!(matches!(a.as_slice(), [Action::CreateEni { .. }]), "{a:?}");

    // Standalone: the node makes the trunk itself, once, in its primary subnet with its groups.
    s.create_trunk = true;
    let mut p = pool_on(m5, &s, 2, 5, false, 6);
    let a = act(&p, &s, 0);
    let trunk = Action::CreateTrunk {
        subnet: "subnet-a".into(),
        security_groups: vec!["sg-1".into()],
    };
    assert_eq!(a, std::slice::from_ref(&trunk));
    p.begin(&trunk);
    let a = act(&p, &s, 3);
    assert!(a.is_empty(), "neither a second trunk nor an ENI: {a:?}");
    // It failed: tried again after its own backoff, which holds nothing else back.
    let mut memory = PolicyMemory::default();
    memory.learn(&trunk, &Outcome::Failed(Failure::Other), LATER);
    p.complete(&trunk, Outcome::Failed(Failure::Other), LATER);
    let d = decide(&p, &memory, &s, LATER, &Demand { pending_adds: 3 });
    assert!(
        d.actions.is_empty() && d.wake_at == Some(LATER + Duration::from_secs(2)),
        "{d:?}"
    );
    assert!(memory.retry_after.is_none());
    let d = decide(
        &p,
        &memory,
        &s,
        LATER + Duration::from_secs(2),
        &Demand::default(),
    );
    assert_eq!(d.actions, [trunk]);
}

#[test]
fn insufficient_addresses_hold_growth_for_120s() {
    let s = settings(&[("WARM_IP_TARGET", "3")]);
    let mut p = pool(&s, 1, 0, false, 0);
    let a = act(&p, &s, 0);
    let mut m = PolicyMemory::default();
    p.begin(&a[0]);
    m.learn(
        &a[0],
        &Outcome::Failed(Failure::InsufficientAddresses),
        LATER,
    );
    p.complete(
        &a[0],
        Outcome::Failed(Failure::InsufficientAddresses),
        LATER,
    );
    let d = decide(
        &p,
        &m,
        &s,
        LATER + Duration::from_secs(119),
        &Demand::default(),
    );
    assert!(d.actions.is_empty());
    assert_eq!(
        d.stalls,
        [Stall::SubnetFullUntil(LATER + Duration::from_secs(120))]
    );
    assert!(decide(&p, &m, &s, LATER, &Demand::default())
        .actions
        .is_empty());
    assert_eq!(
        decide(
            &p,
            &m,
            &s,
            LATER + Duration::from_secs(120),
            &Demand::default()
        )
        .actions
        .len(),
        1
    );
}

#[test]
fn prefix_delegation_falls_back_to_ips_and_returns() {
    let s = settings(&[
        ("ENABLE_PREFIX_DELEGATION", "true"),
        ("WARM_PREFIX_TARGET", "1"),
    ]);
    let mut p = pool(&s, 1, 0, true, 0);
    let a = act(&p, &s, 0);
    assert_eq!(a, [assign(0, AddressKind::Prefix, 1)]);
    let mut m = PolicyMemory::default();
    p.begin(&a[0]);
    m.learn(&a[0], &Outcome::Failed(Failure::InsufficientCidr), LATER);
    p.complete(&a[0], Outcome::Failed(Failure::InsufficientCidr), LATER);
    // No aligned /28: 16 /32s instead (they fit: 5 slots hold at most 5 /32s, so 5 now and a new ENI).
    let a = decide(&p, &m, &s, LATER, &Demand::default()).actions;
    assert_eq!(a[0], assign(0, AddressKind::Ip, 5));
    assert!(matches!(
        &a[1],
        Action::CreateEni {
            kind: AddressKind::Ip,
            ..
        }
    ));
    // After the hold, prefixes again.
    let after = LATER + Duration::from_secs(121);
    assert_eq!(
        decide(&p, &m, &s, after, &Demand::default()).actions,
        [assign(0, AddressKind::Prefix, 1)]
    );
}

#[test]
fn leftover_ips_in_prefix_mode_go_once_prefixes_cover_the_target() {
    let s = settings(&[
        ("ENABLE_PREFIX_DELEGATION", "true"),
        ("WARM_PREFIX_TARGET", "1"),
    ]);
    let mut p = pool(&s, 1, 2, true, 0);
    p.add_blocks("eni-0", &["10.0.0.200/32".parse().unwrap()]);
    // 2 prefixes (one beyond target) and a /32: release one prefix and the /32.
    let a = act(&p, &s, 0);
    let [Action::ReleaseAddresses { cidrs, .. }] = &a[..] else {
        panic!("{a:?}")
    };
    assert_eq!(cidrs.len(), 2);
    assert!(
        cidrs.iter().any(|c| c.prefix_len() == 32) && cidrs.iter().any(|c| c.prefix_len() == 28)
    );
}

#[test]
fn free_eni_eligibility() {
    let s = settings(&[("WARM_IP_TARGET", "3")]);
    // eni-0: 5 addresses, 2 pods, so exactly 3 free. eni-1: attached, no addresses left, a minute old.
    let mut p = pool(&s, 1, 5, false, 2);
    p.add_eni(eni(1), Time::ZERO);
    assert_eq!(
        act(&p, &s, 0),
        [Action::FreeEni {
            eni: "eni-1".into()
        }]
    );
    // Not before it is a minute old: decide again then.
    let young = decide(
        &p,
        &PolicyMemory::default(),
        &s,
        Time::from_secs(59),
        &Demand::default(),
    );
    assert!(young.actions.is_empty(), "{young:?}");
    assert_eq!(young.wake_at, Some(Time::from_secs(60)));
    // Not when the other ENIs cannot keep WARM_IP_TARGET without it (3 free < 4: it gets filled instead).
    let s4 = settings(&[("WARM_IP_TARGET", "4")]);
    assert_eq!(act(&p, &s4, 0), [assign(1, AddressKind::Ip, 1)]);
    // Not the primary, even when empty.
    let empty_primary = pool(&s, 1, 0, false, 0);
    assert!(!act(&empty_primary, &s, 0)
        .iter()
        .any(|a| matches!(a, Action::FreeEni { .. })));
    // Not with a pod on it, nor while its released address cools down.
    let mut q = Pool::new(node(), &s);
    q.add_eni(eni(0), Time::ZERO);
    q.add_eni(eni(1), Time::ZERO);
    q.add_blocks(
        "eni-1",
        &[
            "10.0.1.10/32".parse().unwrap(),
            "10.0.1.11/32".parse().unwrap(),
            "10.0.1.12/32".parse().unwrap(),
        ],
    );
    let key = IpamKey::new("aws-cni", "x", "eth0");
    let frees = |p: &Pool| {
        act(p, &s, 0)
            .iter()
            .any(|a| matches!(a, Action::FreeEni { .. }))
    };
    q.assign(&key, &PodMeta::default(), LATER, s.ip_cooldown)
        .unwrap();
    assert!(!frees(&q));
    q.unassign(&key, LATER).unwrap();
    assert!(!frees(&q));
}

#[test]
fn custom_networking_uses_the_eniconfig_and_never_the_primary() {
    let s = settings(&[("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true")]);
    let p = pool(&s, 1, 0, false, 0);
    let d = decide(&p, &PolicyMemory::default(), &s, LATER, &Demand::default());
    assert_eq!(d.stalls, [Stall::NoEniConfig]);
    let mut n = node();
    n.eni_config = Some(ipam::pool::EniConfigSpec {
        subnet: "subnet-pods".into(),
        security_groups: vec![],
    });
    let mut p = Pool::new(n, &s);
    p.add_eni(eni(0), Time::ZERO);
    assert_eq!(
        act(&p, &s, 0),
        [Action::CreateEni {
            subnet: ipam::SubnetTarget::Subnet("subnet-pods".into()),
            security_groups: vec!["sg-1".into()],
            kind: AddressKind::Ip,
            count: 5,
        }]
    );
}

#[test]
fn an_uncertain_eni_is_read_back_only_after_its_calls_and_used_by_nobody_until_then() {
    // 10 addresses, 2 in use: 3 over WARM_IP_TARGET=5, released from eni-1, which keeps 2.
    let s = settings(&[("WARM_IP_TARGET", "5")]);
    let mut p = pool(&s, 2, 5, false, 2);
    let release = act(&p, &s, 0).remove(0);
    let Action::ReleaseAddresses { eni, cidrs } = &release else {
        panic!("{release:?}")
    };
    assert_eq!((eni.as_str(), cidrs.len()), ("eni-1", 3));
    let released = cidrs.clone();
    p.begin(&release);
    // Another call on eni-1 timed out: its state is uncertain, but a read sent now could be answered
    // before the release and undo it.
    p.mark_for_resync("eni-1");
    let resync = Action::ResyncEni {
        eni: "eni-1".into(),
    };
    assert!(!act(&p, &s, 0).contains(&resync), "{:?}", act(&p, &s, 0));
    p.complete(&release, Outcome::Done, LATER);
    assert!(act(&p, &s, 0).contains(&resync));
    p.begin(&resync);
    // While the read runs, no address of eni-1 is assigned or released (freeing the whole ENI stays
    // allowed: deleting it returns whatever it holds), and no pod gets one of its addresses: eni-0's
    // three free ones go, then there is none.
    let during = act(&p, &s, 0);
    assert!(
        during.iter().all(|a| !matches!(a,
            Action::AssignAddresses { eni, .. } | Action::ReleaseAddresses { eni, .. } if eni == "eni-1")),
        "{during:?}"
    );
    for i in 2..5 {
        let a = p
            .assign(
                &IpamKey::new("aws-cni", &format!("c{i}"), "eth0"),
                &PodMeta::default(),
                LATER,
                s.ip_cooldown,
            )
            .unwrap()
            .clone();
        assert!(a.ip.to_string().starts_with("10.0.0."), "{a:?}");
    }
    let sixth = IpamKey::new("aws-cni", "c5", "eth0");
    assert!(p
        .assign(&sixth, &PodMeta::default(), LATER, s.ip_cooldown)
        .is_err());
    // A call that times out during the read raises a new doubt: after the reply, eni-1 is read again.
    p.mark_for_resync("eni-1");
    let kept: Vec<Ipv4Cidr> = (10..15)
        .map(|i| format!("10.0.1.{i}/32").parse().unwrap())
        .filter(|c| !released.contains(c))
        .collect();
    p.complete(&resync, Outcome::Synced(Some(kept.clone())), LATER);
    assert!(act(&p, &s, 0).contains(&resync));
    p.begin(&resync);
    p.complete(&resync, Outcome::Synced(Some(kept)), LATER);
    assert!(!act(&p, &s, 0).contains(&resync));
    let a = p
        .assign(&sixth, &PodMeta::default(), LATER, s.ip_cooldown)
        .unwrap()
        .clone();
    assert!(a.ip.to_string().starts_with("10.0.1."), "{a:?}");
}

#[test]
fn a_rolling_update_does_not_grow_the_pool_for_addresses_cooling_down() {
    // WARM_ENI_TARGET=1 on 2 ENIs of 5: 5 pods, so exactly one ENI's worth free.
    let s = settings(&[]);
    let mut p = pool(&s, 2, 5, false, 5);
    assert!(act(&p, &s, 0).is_empty());
    // Two new pods start, then two old ones stop: 3 free and 2 cooling, one ENI's worth.
    for i in 5..7 {
        p.assign(
            &IpamKey::new("aws-cni", &format!("c{i}"), "eth0"),
            &PodMeta::default(),
            LATER,
            s.ip_cooldown,
        )
        .unwrap();
    }
    for i in 0..2 {
        p.unassign(&IpamKey::new("aws-cni", &format!("c{i}"), "eth0"), LATER)
            .unwrap();
    }
    let d = decide(&p, &PolicyMemory::default(), &s, LATER, &Demand::default());
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    // But ADDs waiting now are not served by cooling addresses: 4 waiting, 3 free.
    let a = act(&p, &s, 4);
    assert!(
        matches!(&a[..], [Action::CreateEni { count: 5, .. }]),
        "{a:?}"
    );
    // The same under WARM_IP_TARGET: 3 free + 2 cooling covers a target of 5.
    let s = settings(&[("WARM_IP_TARGET", "5")]);
    let mut p = pool(&s, 2, 5, false, 5);
    for i in 0..2 {
        p.unassign(&IpamKey::new("aws-cni", &format!("c{i}"), "eth0"), LATER)
            .unwrap();
    }
    p.assign(
        &IpamKey::new("aws-cni", "c9", "eth0"),
        &PodMeta::default(),
        LATER,
        s.ip_cooldown,
    )
    .unwrap();
    p.assign(
        &IpamKey::new("aws-cni", "c8", "eth0"),
        &PodMeta::default(),
        LATER,
        s.ip_cooldown,
    )
    .unwrap();
    assert!(act(&p, &s, 0).is_empty(), "{:?}", act(&p, &s, 0));
}

#[test]
fn a_cordoned_node_keeps_its_pool_unless_told_to_manage_it() {
    let s = settings(&[("WARM_IP_TARGET", "2")]);
    let mut p = pool(&s, 1, 3, false, 3);
    p.node.unschedulable = true;
    let d = decide(
        &p,
        &PolicyMemory::default(),
        &s,
        LATER,
        &Demand { pending_adds: 1 },
    );
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    assert_eq!(d.stalls, [Stall::NodeUnschedulable]);
    // Nor does it shrink: 5 free over a target of 2 stay.
    let q = {
        let mut q = pool(&s, 2, 4, false, 1);
        q.node.unschedulable = true;
        q
    };
    assert!(act(&q, &s, 0).is_empty());
    let s = settings(&[
        ("WARM_IP_TARGET", "2"),
        ("AWS_MANAGE_ENIS_NON_SCHEDULABLE", "true"),
    ]);
    assert!(!act(&p, &s, 1).is_empty());
    assert!(!act(&q, &s, 0).is_empty());
}
