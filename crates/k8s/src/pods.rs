//! The pods scheduled on this node, from a metadata-only watch: the daemon compares them with its
//! assignments and releases those whose pod is gone (the kubelet never sent DEL), and on EKS learns
//! from their annotations which have a branch ENI of the VPC resource controller's.

use crate::Cluster;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, metadata_watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    fn of(meta: &PartialObjectMeta<Pod>) -> PodRef {
        PodRef {
            namespace: meta.metadata.namespace.clone().unwrap_or_default(),
            name: meta.metadata.name.clone().unwrap_or_default(),
        }
    }
}

/// Every pod the API server has for this node at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodSnapshot {
    pub pods: HashSet<PodRef>,
    /// The pods whose `vpc.amazonaws.com/pod-eni` annotation gives them a branch ENI, with its
    /// IPv4 address (security groups for pods on EKS: the daemon does not hand those out).
    pub branches: HashMap<PodRef, Ipv4Addr>,
}

/// The branch address in a pod's annotation, if it has a well-formed one.
fn branch_address(meta: &PartialObjectMeta<Pod>) -> Option<Ipv4Addr> {
    let text = meta
        .metadata
        .annotations
        .as_ref()?
        .get(ipam::branch::POD_ENI_ANNOTATION)?;
    ipam::branch::parse_pod_eni(text).ok()?.first()?.ipv4
}

/// The watch's events folded into the current set. `current` is `None` until the first listing
/// completes and again while the watch is failing: a stale set would make live pods look gone.
#[derive(Default)]
struct Tracker {
    pods: HashMap<PodRef, Option<Ipv4Addr>>,
    listing: Option<HashMap<PodRef, Option<Ipv4Addr>>>,
    listed: bool,
    healthy: bool,
}

impl Tracker {
    fn apply(&mut self, event: Event<PartialObjectMeta<Pod>>) {
        self.healthy = true;
        match event {
            Event::Init => self.listing = Some(HashMap::new()),
            Event::InitApply(p) => {
                if let Some(listing) = &mut self.listing {
                    listing.insert(PodRef::of(&p), branch_address(&p));
                }
            }
            Event::InitDone => {
                if let Some(listing) = self.listing.take() {
                    self.pods = listing;
                    self.listed = true;
                }
            }
            Event::Apply(p) => {
                self.pods.insert(PodRef::of(&p), branch_address(&p));
            }
            Event::Delete(p) => {
                self.pods.remove(&PodRef::of(&p));
            }
        }
    }

    fn failed(&mut self) {
        self.healthy = false;
    }

    fn current(&self) -> Option<PodSnapshot> {
        (self.listed && self.healthy && self.listing.is_none()).then(|| PodSnapshot {
            pods: self.pods.keys().cloned().collect(),
            branches: self
                .pods
                .iter()
                .filter_map(|(pod, ip)| Some((pod.clone(), (*ip)?)))
                .collect(),
        })
    }
}

impl Cluster {
    /// Calls `on_snapshot` when the set of pods on this node changes and again every `every`
    /// while the watch is healthy, so that the receiver can tell "gone for a while" from "gone
    /// a moment ago". Runs until the process ends; API errors go to `on_error` and are retried.
    pub async fn follow_pods(
        &self,
        every: Duration,
        mut on_snapshot: impl FnMut(PodSnapshot),
        mut on_error: impl FnMut(String),
    ) {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let config = watcher::Config::default()
            .fields(&format!("spec.nodeName={}", self.settings.node_name));
        let mut events = std::pin::pin!(metadata_watcher(pods, config).default_backoff());
        let mut tracker = Tracker::default();
        let mut last: Option<PodSnapshot> = None;
        // The first resend one period from now: an interval's first tick is immediate, and one
        // that fires just after the first listing would send that listing twice, which a
        // receiver waiting for a change takes as the change.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let resend = tokio::select! {
                event = events.next() => {
                    match event {
                        Some(Ok(event)) => tracker.apply(event),
                        Some(Err(e)) => {
                            tracker.failed();
                            on_error(e.to_string());
                        }
                        None => return,
                    }
                    false
                }
                _ = tick.tick() => true,
            };
            let Some(snapshot) = tracker.current() else {
                continue;
            };
            if resend || last.as_ref() != Some(&snapshot) {
                on_snapshot(snapshot.clone());
                last = Some(snapshot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(name: &str) -> PartialObjectMeta<Pod> {
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                namespace: Some("default".into()),
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            _phantom: Default::default(),
        }
    }

    fn annotated(name: &str, annotation: &str) -> PartialObjectMeta<Pod> {
        let mut p = pod(name);
        p.metadata.annotations = Some(
            [(
                ipam::branch::POD_ENI_ANNOTATION.to_string(),
                annotation.to_string(),
            )]
            .into(),
        );
        p
    }

    #[test]
    fn branch_pods_are_those_whose_annotation_gives_them_an_address() {
        let mut t = Tracker::default();
        t.apply(Event::Init);
        t.apply(Event::InitApply(pod("plain")));
        t.apply(Event::InitApply(annotated("bad", "[{\"vlanId\": 0}]")));
        t.apply(Event::InitDone);
        assert!(t.current().unwrap().branches.is_empty());
        let branch = r#"[{"eniId":"eni-1","ifAddress":"02:00:00:00:00:0b","privateIp":"10.0.3.77","vlanId":4,"subnetCidr":"10.0.0.0/16"}]"#;
        // The controller annotates a pod that was already listed.
        t.apply(Event::Apply(annotated("db", branch)));
        let snapshot = t.current().unwrap();
        assert_eq!(snapshot.pods.len(), 3);
        let db = PodRef {
            namespace: "default".into(),
            name: "db".into(),
        };
        assert_eq!(
            snapshot.branches,
            [(db, "10.0.3.77".parse().unwrap())].into()
        );
        t.apply(Event::Delete(annotated("db", branch)));
        assert!(t.current().unwrap().branches.is_empty());
    }

    fn names(t: &Tracker) -> Option<Vec<String>> {
        let mut names: Vec<String> = t.current()?.pods.into_iter().map(|p| p.name).collect();
        names.sort();
        Some(names)
    }

    #[test]
    fn nothing_is_published_before_the_first_listing_or_while_the_watch_fails() {
        let mut t = Tracker::default();
        t.apply(Event::Init);
        t.apply(Event::InitApply(pod("a")));
        assert_eq!(names(&t), None, "mid-listing");
        t.apply(Event::InitDone);
        assert_eq!(names(&t), Some(vec!["a".into()]));
        t.apply(Event::Apply(pod("b")));
        t.apply(Event::Delete(pod("a")));
        assert_eq!(names(&t), Some(vec!["b".into()]));
        t.failed();
        assert_eq!(names(&t), None, "the watch is failing");
        t.apply(Event::Init);
        t.apply(Event::InitApply(pod("c")));
        assert_eq!(names(&t), None, "relisting");
        t.apply(Event::InitDone);
        assert_eq!(
            names(&t),
            Some(vec!["c".into()]),
            "the relist replaces the set"
        );
    }
}
