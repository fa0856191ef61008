//! The pool against what IMDS shows: an address unassigned or an ENI detached out of band (by an
//! operator, another tool, a console click) is noticed without asking EC2. IMDS is local, free and
//! unthrottled; EC2 is asked (a read-back of one ENI) only where IMDS differs, so an idle node makes
//! no EC2 call.

use crate::net::Ipv4Cidr;
use crate::pool::Pool;
use std::collections::{BTreeSet, HashSet};

/// One ENI as IMDS lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub id: String,
    pub device: u32,
    pub network_card: u32,
    /// Its secondary /32s and its /28s.
    pub blocks: Vec<Ipv4Cidr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Finding {
    /// An ENI in the pool that IMDS does not list: detached.
    Gone(String),
    /// An ENI whose addresses differ from the pool's.
    Differs(String),
    /// An ENI on card 0 that is neither in the pool nor known as someone else's: attached by
    /// someone else since start. Its device index must be avoided.
    Unknown { eni: String, device: u32 },
    /// Someone else's ENI, known, no longer attached: its device index and its share of the
    /// instance's ENI limit are free again.
    ForeignGone(String),
}

/// What differs now. ENIs with EC2 calls in flight, being freed or read back are skipped (the
/// pool is ahead of IMDS there), and so are unknown ENIs while one of ours is being created.
pub fn compare(pool: &Pool, seen: &[Seen], foreign: &HashSet<String>) -> BTreeSet<Finding> {
    let mut findings = BTreeSet::new();
    for eni in pool.enis() {
        if eni.freeing || eni.address_calls_in_flight() || eni.needs_resync || eni.resyncing {
            continue;
        }
        let id = &eni.info.id;
        match seen.iter().find(|s| s.id == *id) {
            None => {
                findings.insert(Finding::Gone(id.clone()));
            }
            Some(s) => {
                let ours: BTreeSet<Ipv4Cidr> = eni.blocks().iter().map(|b| b.cidr).collect();
                let theirs: BTreeSet<Ipv4Cidr> = s.blocks.iter().copied().collect();
                if ours != theirs {
                    findings.insert(Finding::Differs(id.clone()));
                }
            }
        }
    }
    for id in foreign {
        if !seen.iter().any(|s| s.id == *id) {
            findings.insert(Finding::ForeignGone(id.clone()));
        }
    }
    if pool.inflight.enis == 0 {
        for s in seen {
            if s.network_card == 0 && pool.eni(&s.id).is_none() && !foreign.contains(&s.id) {
                findings.insert(Finding::Unknown {
                    eni: s.id.clone(),
                    device: s.device,
                });
            }
        }
    }
    findings
}

/// IMDS lags EC2 by seconds: an address EC2 gave a moment before a read may be missing from it.
/// Only what two consecutive reads agree on is acted on.
#[derive(Clone, Debug, Default)]
pub struct Reconciler {
    last: BTreeSet<Finding>,
}

impl Reconciler {
    pub fn confirm(&mut self, now: BTreeSet<Finding>) -> Vec<Finding> {
        let confirmed = now.intersection(&self.last).cloned().collect();
        self.last = now;
        confirmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::EniInfo;
    use crate::settings::PoolSettings;
    use crate::time::Time;

    fn pool() -> Pool {
        let node = crate::pool::tests::node();
        let mut p = Pool::new(node, &PoolSettings::default());
        for (n, id) in ["eni-0", "eni-1"].iter().enumerate() {
            p.add_eni(
                EniInfo {
                    id: id.to_string(),
                    device_number: n as u32,
                    subnet_id: "subnet-a".into(),
                    subnet_cidr: "10.0.1.0/24".parse().unwrap(),
                    primary_ip: format!("10.0.1.{}", 5 + n).parse().unwrap(),
                    is_primary: n == 0,
                    is_trunk: false,
                    is_efa: false,
                    excluded: false,
                },
                Time::ZERO,
            );
        }
        p.add_blocks("eni-0", &[cidr("10.0.1.20/32"), cidr("10.0.1.21/32")]);
        p.add_blocks("eni-1", &[cidr("10.0.1.30/32")]);
        p
    }

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    fn seen(id: &str, device: u32, blocks: &[&str]) -> Seen {
        Seen {
            id: id.into(),
            device,
            network_card: 0,
            blocks: blocks.iter().map(|b| cidr(b)).collect(),
        }
    }

    #[test]
    fn agreement_finds_nothing() {
        let p = pool();
        let imds = [
            seen("eni-0", 0, &["10.0.1.21/32", "10.0.1.20/32"]),
            seen("eni-1", 1, &["10.0.1.30/32"]),
        ];
        assert!(compare(&p, &imds, &HashSet::new()).is_empty());
    }

    #[test]
    fn an_address_taken_an_eni_detached_and_a_stranger_attached_are_found() {
        let p = pool();
        let imds = [
            seen("eni-0", 0, &["10.0.1.20/32"]),
            seen("eni-9", 2, &["10.0.1.90/32"]),
        ];
        let found = compare(&p, &imds, &HashSet::new());
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            [
                Finding::Gone("eni-1".into()),
                Finding::Differs("eni-0".into()),
                Finding::Unknown {
                    eni: "eni-9".into(),
                    device: 2
                },
            ]
        );
        // Someone else's ENI, known since start, is no news; once gone, it is.
        let foreign = HashSet::from(["eni-9".to_string()]);
        assert!(!compare(&p, &imds, &foreign)
            .iter()
            .any(|f| matches!(f, Finding::Unknown { .. } | Finding::ForeignGone(_))));
        assert!(compare(&p, &imds[..1], &foreign).contains(&Finding::ForeignGone("eni-9".into())));
        // Another card is not ours to count.
        let mut other_card = seen("eni-8", 0, &[]);
        other_card.network_card = 1;
        assert!(!compare(&p, &[other_card], &HashSet::new())
            .iter()
            .any(|f| matches!(f, Finding::Unknown { .. })));
    }

    #[test]
    fn enis_being_read_back_wait_for_the_answer() {
        let mut p = pool();
        p.mark_for_resync("eni-1");
        let imds = [seen("eni-0", 0, &["10.0.1.20/32", "10.0.1.21/32"])];
        assert!(compare(&p, &imds, &HashSet::new()).is_empty());
    }

    #[test]
    fn only_what_two_reads_agree_on_is_confirmed() {
        let mut r = Reconciler::default();
        let gone = Finding::Gone("eni-1".into());
        let differs = Finding::Differs("eni-0".into());
        assert!(r.confirm(BTreeSet::from([gone.clone()])).is_empty());
        assert_eq!(
            r.confirm(BTreeSet::from([gone.clone(), differs.clone()])),
            [gone]
        );
        // A difference that cleared up in between is never acted on.
        assert!(r.confirm(BTreeSet::new()).is_empty());
        assert!(r.confirm(BTreeSet::from([differs])).is_empty());
    }
}
