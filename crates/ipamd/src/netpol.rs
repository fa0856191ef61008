//! NetworkPolicy enforcement (ENABLE_NETWORK_POLICY): one task holds the cluster as the API server
//! shows it and the pods this node wired, evaluates the local pods' policies (`netpol`) and applies
//! the whole table (`datapath::netpol`) after each batch of changes.
//!
//! No start race: the control loop hands a new pod's ADD reply to this task, which sends it only
//! once the pod's rules are in the kernel. The pod's address is the daemon's own (the API server
//! learns it later, from the kubelet); its labels and ports come from the API server, whose Pod
//! exists before the kubelet calls ADD but may reach this node's watch a moment later: the reply
//! then waits for it, up to `KNOWN_WITHIN`, so that the pod starts with its own policies. A pod
//! the API server still has not shown is open (`standard`) or denied everything (`strict`) until it
//! has.
//!
//! With EKS's PolicyEndpoints as the input (`VPC_CNI_NETWORK_POLICY_INPUT=policyendpoints`) the
//! task enforces what the managed controller resolved instead of evaluating; the controller lists
//! a pod only once it has an address, so an ADD reply waits only for the table.

use crate::metrics::Metrics;
use datapath::netpol::{range, PodRules};
use ipam::IpamKey;
use proto::{ErrorKind, Reply};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Waits between tries to cut flows when the conntrack walk fails.
const CUT_RETRY: ipam::pacing::Backoff =
    ipam::pacing::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// How long a new pod's ADD reply waits for the pod to reach this node's watch.
pub const KNOWN_WITHIN: Duration = Duration::from_secs(2);
use tokio::sync::{mpsc, oneshot};

pub enum Input {
    /// The cluster as the API server shows it now (every listing complete), and the
    /// resourceVersion of each kind it was built from.
    Cluster(netpol::Cluster, k8s::Versions),
    /// Every PolicyEndpoint of the cluster (`VPC_CNI_NETWORK_POLICY_INPUT=policyendpoints`).
    Endpoints(Vec<netpol::endpoints::PolicyEndpoint>, k8s::Versions),
    /// A pod of this node has an address; `reply` goes to the plugin once its rules are in force.
    Up {
        key: IpamKey,
        namespace: String,
        name: String,
        ip: IpAddr,
        reply: Option<(oneshot::Sender<Reply>, Reply)>,
    },
    Down {
        key: IpamKey,
    },
    /// What each local pod's policies allow, for `/v1/network-policy`.
    Inspect(oneshot::Sender<serde_json::Value>),
    /// Each local pod with its host veth (the name of its chains), for the drop counts in
    /// `/metrics`.
    Pods(oneshot::Sender<Vec<(String, String, String)>>),
    /// The established flows that the view of these versions denies are cut.
    FlowsCut(k8s::Versions),
}

/// The flows of pods whose rules narrowed, to cut once the rules are in, and the view it is for.
struct Cut {
    addresses: Vec<IpAddr>,
    versions: k8s::Versions,
    since: Instant,
}

struct Local {
    namespace: String,
    name: String,
    ip: IpAddr,
}

/// What the task decides from, apart from its effects: pure, so that it is tested without root.
pub struct Enforcement {
    strict: bool,
    veth_prefix: String,
    cluster: Option<netpol::Cluster>,
    /// EKS's PolicyEndpoints, when they are the input: then `cluster` stays empty.
    endpoints: Option<Vec<netpol::endpoints::PolicyEndpoint>>,
    local: BTreeMap<IpamKey, Local>,
    /// Addresses of pods that arrived since the last table: no flow of theirs can need cutting,
    /// and forgetting flows costs a few milliseconds a pod.
    fresh: Vec<IpAddr>,
    /// Pods ADDed in this daemon's life (the others were restored from the checkpoint).
    added: std::collections::HashSet<IpamKey>,
    /// The resourceVersions of the view last taken, of the view whose rules are in the kernel (new
    /// flows are judged by them), and of the view whose denied established flows are cut too:
    /// `/v1/network-policy` shows them, so that whoever made a change knows when it is in force.
    versions: k8s::Versions,
    applied: k8s::Versions,
    cut: k8s::Versions,
}

impl Enforcement {
    pub fn new(strict: bool, veth_prefix: &str) -> Enforcement {
        Enforcement {
            strict,
            veth_prefix: veth_prefix.to_string(),
            cluster: None,
            endpoints: None,
            local: BTreeMap::new(),
            fresh: Vec::new(),
            added: std::collections::HashSet::new(),
            versions: k8s::Versions::new(),
            applied: k8s::Versions::new(),
            cut: k8s::Versions::new(),
        }
    }

    /// Whether the API server has shown the pod of `key` (its labels are known).
    fn known(&self, key: &IpamKey) -> bool {
        // EKS's controller lists a pod only once it has an address, which the kubelet reports
        // after the ADD: waiting for it would hold every ADD for the whole deadline.
        if self.endpoints.is_some() {
            return self.local.contains_key(key);
        }
        let (Some(cluster), Some(local)) = (&self.cluster, self.local.get(key)) else {
            return false;
        };
        cluster
            .pods
            .iter()
            .any(|p| p.namespace == local.namespace && p.name == local.name)
    }

    /// Takes one input; whether it changed what the rules are computed from (the cluster's view,
    /// the local pods), so that questions and a finished cut cost no evaluation.
    fn take(&mut self, input: Input, replies: &mut Vec<Waiting>) -> bool {
        match input {
            Input::Cluster(cluster, versions) => {
                self.cluster = Some(cluster);
                self.versions = versions;
            }
            Input::Endpoints(endpoints, versions) => {
                self.endpoints = Some(endpoints);
                self.versions = versions;
            }
            Input::Up {
                key,
                namespace,
                name,
                ip,
                reply,
            } => {
                self.local.insert(
                    key.clone(),
                    Local {
                        namespace,
                        name,
                        ip,
                    },
                );
                self.fresh.push(ip);
                if reply.is_some() {
                    self.added.insert(key.clone());
                }
                if let Some((reply, message)) = reply {
                    replies.push(Waiting {
                        key,
                        until: Instant::now() + KNOWN_WITHIN,
                        reply,
                        message,
                    });
                }
            }
            Input::Down { key } => {
                self.local.remove(&key);
                self.added.remove(&key);
            }
            Input::Inspect(answer) => {
                let _ = answer.send(self.describe());
                return false;
            }
            Input::Pods(answer) => {
                let pods = self
                    .local
                    .values()
                    .filter(|l| !l.name.is_empty())
                    .map(|l| (l.namespace.clone(), l.name.clone(), self.host_veth(l)))
                    .collect();
                let _ = answer.send(pods);
                return false;
            }
            Input::FlowsCut(versions) => {
                self.cut = versions;
                return false;
            }
        }
        true
    }

    /// Every local pod with what its policies allow each way, by policy, in words a person reads.
    pub fn describe(&self) -> serde_json::Value {
        let verdict = |v: &netpol::Verdict| match v {
            netpol::Verdict::Open => serde_json::json!("open"),
            netpol::Verdict::Isolated(grants) => grants
                .iter()
                .map(|g| {
                    let peers = match &g.peers {
                        None => serde_json::json!("any"),
                        Some(set) => set
                            .v4_ranges()
                            .map(|(s, e)| range(s, e))
                            .chain(set.v6_ranges().map(|(s, e)| range(s, e)))
                            .collect(),
                    };
                    let ports = match &g.ports {
                        None => serde_json::json!("any"),
                        Some(ranges) => ranges
                            .iter()
                            .map(|r| format!("{:?}/{}", r.protocol, range(r.first, r.last)))
                            .collect(),
                    };
                    serde_json::json!({"policy": g.policy, "peers": peers, "ports": ports})
                })
                .collect(),
        };
        let rules = self.rules();
        let pods: Vec<serde_json::Value> = self
            .local
            .values()
            .filter(|l| !l.name.is_empty())
            .map(|l| {
                let rule = rules.iter().find(|r| r.addresses.contains(&l.ip));
                let open = netpol::Verdict::Open;
                serde_json::json!({
                    "namespace": l.namespace,
                    "name": l.name,
                    "address": l.ip.to_string(),
                    "ingress": verdict(rule.map_or(&open, |r| &r.ingress)),
                    "egress": verdict(rule.map_or(&open, |r| &r.egress)),
                })
            })
            .collect();
        serde_json::json!({
            "mode": if self.strict { "strict" } else { "standard" },
            "clusterKnown": self.synced(),
            "seenVersions": self.versions,
            "appliedVersions": self.applied,
            "cutVersions": self.cut,
            "pods": pods,
        })
    }

    /// Whether the API server's view has arrived (every listing complete).
    fn synced(&self) -> bool {
        self.cluster.is_some() || self.endpoints.is_some()
    }

    /// The rules of the pods ADDed in this daemon's life: before the first view of the cluster,
    /// the only ones it may decide (a restarted daemon leaves the running pods' rules, which its
    /// predecessor applied, as they are until it knows better).
    pub fn rules_of_added(&self) -> Vec<PodRules> {
        let mut rules = self.rules();
        rules.retain(|r| {
            self.local
                .iter()
                .any(|(key, local)| self.added.contains(key) && r.addresses.contains(&local.ip))
        });
        rules
    }

    /// Every local pod's rules. The cluster's pods carry this node's addresses for its own pods
    /// (the API server may not have them yet).
    pub fn rules(&self) -> Vec<PodRules> {
        if let Some(endpoints) = &self.endpoints {
            return self.rules_from_endpoints(endpoints);
        }
        let mut cluster = self.cluster.clone().unwrap_or_default();
        let mut known = std::collections::HashSet::new();
        for local in self.local.values() {
            match cluster
                .pods
                .iter_mut()
                .find(|p| p.namespace == local.namespace && p.name == local.name)
            {
                Some(pod) => {
                    if !pod.ips.contains(&local.ip) {
                        pod.ips.push(local.ip);
                    }
                    if self.cluster.is_some() {
                        known.insert((local.namespace.clone(), local.name.clone()));
                    }
                }
                None => cluster.pods.push(netpol::Pod {
                    namespace: local.namespace.clone(),
                    name: local.name.clone(),
                    ips: vec![local.ip],
                    ..netpol::Pod::default()
                }),
            }
        }
        let evaluator = netpol::Evaluator::new(&cluster);
        let unknown = if self.strict {
            netpol::Verdict::Isolated(Vec::new())
        } else {
            netpol::Verdict::Open
        };
        let mut rules = Vec::new();
        for local in self.local.values() {
            // A pod without a Kubernetes name (a bare runtime's) is no policy's to isolate.
            if local.name.is_empty() {
                continue;
            }
            let host_veth = self.host_veth(local);
            let id = (local.namespace.clone(), local.name.clone());
            let pod = cluster
                .pods
                .iter()
                .find(|p| p.namespace == id.0 && p.name == id.1)
                .expect("every local pod is in the model");
            let (ingress, egress) = if known.contains(&id) {
                let verdicts = evaluator.pod(pod);
                (verdicts.ingress, verdicts.egress)
            } else {
                (unknown.clone(), unknown.clone())
            };
            if ingress == netpol::Verdict::Open && egress == netpol::Verdict::Open {
                continue;
            }
            rules.push(PodRules {
                host_veth,
                addresses: vec![local.ip],
                ingress,
                egress,
            });
        }
        rules
    }
}

impl Enforcement {
    /// Each local pod's rules from EKS's PolicyEndpoints. A pod no object lists is open
    /// (`standard`) or denied everything (`strict`), as a pod with no policy yet.
    fn rules_from_endpoints(
        &self,
        endpoints: &[netpol::endpoints::PolicyEndpoint],
    ) -> Vec<PodRules> {
        let mut rules = Vec::new();
        for local in self.local.values().filter(|l| !l.name.is_empty()) {
            let listed = endpoints
                .iter()
                .any(|pe| netpol::endpoints::lists(pe, &local.namespace, &local.name, local.ip));
            let (ingress, egress) = if listed || !self.strict {
                let verdicts =
                    netpol::endpoints::pod(endpoints, &local.namespace, &local.name, local.ip);
                (verdicts.ingress, verdicts.egress)
            } else {
                (
                    netpol::Verdict::Isolated(Vec::new()),
                    netpol::Verdict::Isolated(Vec::new()),
                )
            };
            if ingress == netpol::Verdict::Open && egress == netpol::Verdict::Open {
                continue;
            }
            rules.push(PodRules {
                host_veth: self.host_veth(local),
                addresses: vec![local.ip],
                ingress,
                egress,
            });
        }
        rules
    }

    fn host_veth(&self, local: &Local) -> String {
        datapath::names::host_veth_name(
            &self.veth_prefix,
            &datapath::names::pod_key(&local.namespace, &local.name),
        )
    }
}

/// An ADD reply held until its pod's rules are in force.
struct Waiting {
    key: IpamKey,
    until: Instant,
    reply: oneshot::Sender<Reply>,
    message: Reply,
}

/// Starts the task; its input is the returned sender.
pub fn spawn(enforcement: Enforcement, metrics: Arc<Metrics>) -> mpsc::UnboundedSender<Input> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (cuts, jobs) = mpsc::unbounded_channel();
    tokio::spawn(cut_flows(jobs, tx.clone(), metrics.clone()));
    tokio::spawn(run(enforcement, rx, cuts, metrics));
    tx
}

/// Cuts the flows of pods whose rules narrowed, in order, apart from the task that applies the
/// rules: on a node tracking tens of thousands of flows the walk of the conntrack table outlasts
/// the rules' transaction, and the next change, ADD replies and `/v1/network-policy` must not wait
/// for it. Jobs that queued up meanwhile are cut in one walk.
async fn cut_flows(
    mut jobs: mpsc::UnboundedReceiver<Cut>,
    done: mpsc::UnboundedSender<Input>,
    metrics: Arc<Metrics>,
) {
    while let Some(mut job) = jobs.recv().await {
        while let Ok(more) = jobs.try_recv() {
            job.addresses.extend(more.addresses);
            job.versions = more.versions;
        }
        // A failed walk (the conntrack tool missing or refused) is tried again, with whatever
        // queued meanwhile: a flow a policy denies is not to be left running for want of a retry.
        let mut tries = 0;
        while !job.addresses.is_empty() {
            job.addresses.sort();
            job.addresses.dedup();
            let addresses = job.addresses.clone();
            let result =
                tokio::task::spawn_blocking(move || datapath::netpol::forget_flows(&addresses))
                    .await;
            match result
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                Ok(()) => {
                    metrics.flows_cut(job.since.elapsed());
                    job.addresses.clear();
                }
                Err(e) => {
                    tries += 1;
                    tracing::error!(error = %e, tries, "flows a NetworkPolicy change denies could not be cut; trying again");
                    metrics.count("awscni_ipamd_error_count", &[("fn", "networkPolicyFlows")]);
                    tokio::time::sleep(CUT_RETRY.ceiling(tries - 1)).await;
                    while let Ok(more) = jobs.try_recv() {
                        job.addresses.extend(more.addresses);
                        job.versions = more.versions;
                    }
                }
            }
        }
        if done.send(Input::FlowsCut(job.versions)).is_err() {
            return;
        }
    }
}

async fn run(
    mut state: Enforcement,
    mut inputs: mpsc::UnboundedReceiver<Input>,
    cuts: mpsc::UnboundedSender<Cut>,
    metrics: Arc<Metrics>,
) {
    let mut applied: Option<Vec<PodRules>> = None;
    // Whether the table is wholly this daemon's (replaced once the cluster was known).
    let mut owned = false;
    let mut waiting: Vec<Waiting> = Vec::new();
    // Whether the last table was refused: it is tried again at the next wake-up, whatever wakes.
    let mut refused = false;
    loop {
        let deadline = waiting.iter().map(|w| w.until).min();
        let first = tokio::select! {
            // An input ready with the deadline may be the pod the reply waits for.
            biased;
            input = inputs.recv() => match input {
                Some(input) => Some(input),
                None => return,
            },
            _ = sleep_until(deadline) => None,
        };
        let started = Instant::now();
        let mut changed = refused;
        if let Some(first) = first {
            changed |= state.take(first, &mut waiting);
        }
        while let Ok(more) = inputs.try_recv() {
            changed |= state.take(more, &mut waiting);
        }
        // Until the cluster's first view the table is left as the last daemon left it, but for
        // pods ADDed since, whose rules go in on top; from the first view on, the table is this
        // daemon's: replaced whole once, then updated.
        let synced = state.synced();
        let rules = if !changed {
            None
        } else if synced {
            Some(state.rules())
        } else {
            Some(state.rules_of_added())
        };
        let mut failure = None;
        let fresh = std::mem::take(&mut state.fresh);
        let whole = synced && !owned;
        let mut cut = Vec::new();
        if let Some(rules) = rules.filter(|r| whole || applied.as_ref() != Some(r)) {
            let table = rules.clone();
            cut = datapath::netpol::changed_addresses(applied.as_deref().unwrap_or(&[]), &rules);
            cut.retain(|ip| !fresh.contains(ip));
            if whole {
                // Taking over a predecessor's table: this daemon does not know what it replaces,
                // and forgetting every pod's flows would make each stall on its next reply.
                cut.clear();
            }
            let before = applied.clone();
            let result = tokio::task::spawn_blocking(move || {
                // Only what changed, in one transaction; the whole table once the cluster is
                // known, or when an update is refused (the table changed behind our back, or
                // there is none yet).
                let updated = if whole {
                    datapath::netpol::apply(&table)
                } else {
                    datapath::netpol::update(before.as_deref().unwrap_or(&[]), &table)
                };
                if let Err(e) = updated {
                    tracing::warn!(error = %e, "NetworkPolicy update refused; replacing the table");
                    datapath::netpol::apply(&table)?;
                }
                Ok::<(), datapath::Error>(())
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
            match result {
                Ok(()) => {
                    metrics.policy_applied(started.elapsed());
                    tracing::debug!(pods = %rules.len(), took_ms = %started.elapsed().as_millis(), "NetworkPolicy table applied");
                    applied = Some(rules);
                    owned |= synced;
                }
                Err(e) => {
                    tracing::error!(error = %e, "NetworkPolicy table could not be applied");
                    metrics.count("awscni_ipamd_error_count", &[("fn", "networkPolicy")]);
                    failure = Some(e);
                }
            }
        }
        refused = failure.is_some();
        let advanced = failure.is_none() && state.applied != state.versions;
        if failure.is_none() {
            state.applied = state.versions.clone();
        }
        let now = Instant::now();
        let queued = !inputs.is_empty();
        let (ready, still): (Vec<Waiting>, Vec<Waiting>) = waiting.into_iter().partition(|w| {
            failure.is_some() || state.known(&w.key) || past_deadline(w.until, now, queued)
        });
        waiting = still;
        for w in ready {
            let message = match &failure {
                None => w.message,
                // The pod would run without its policies: the runtime retries the ADD instead.
                Some(e) => Reply::Error {
                    kind: ErrorKind::Internal,
                    message: format!("the pod's NetworkPolicy rules could not be applied: {e}"),
                },
            };
            let _ = w.reply.send(message);
        }
        // The flows of pods whose rules narrowed are forgotten once the new rules are in: a flow
        // the change denies is cut, an allowed one is picked up again. Every view newly in force
        // goes to the cutter, with something to cut or not, so that `cutVersions` follows in
        // order.
        if advanced || (failure.is_none() && !cut.is_empty()) {
            let _ = cuts.send(Cut {
                addresses: cut,
                versions: state.applied.clone(),
                since: started,
            });
        }
    }
}

/// Whether a reply whose pod is still unknown goes now. Past its deadline it still waits for the
/// inputs that queued up meanwhile (applying a table can take longer than the deadline on a loaded
/// node, and the pod may be among them); past twice the deadline it goes regardless, so that a
/// stream of changes cannot hold it.
fn past_deadline(until: Instant, now: Instant, queued: bool) -> bool {
    until <= now && (!queued || until + KNOWN_WITHIN <= now)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> IpamKey {
        IpamKey::new("aws-cni", n, "eth0")
    }

    fn up(state: &mut Enforcement, name: &str, ip: &str) {
        state.take(
            Input::Up {
                key: key(name),
                namespace: "default".into(),
                name: name.into(),
                ip: ip.parse().unwrap(),
                reply: None,
            },
            &mut Vec::new(),
        );
    }

    #[test]
    fn a_late_reply_waits_for_queued_inputs_but_not_forever() {
        let until = Instant::now();
        assert!(!past_deadline(
            until + Duration::from_millis(1),
            until,
            false
        ));
        assert!(
            past_deadline(until, until, false),
            "nothing queued: it goes"
        );
        assert!(
            !past_deadline(until, until + Duration::from_millis(1), true),
            "the pod may be in what queued up"
        );
        assert!(past_deadline(until, until + KNOWN_WITHIN, true));
    }

    fn deny_all_ingress() -> netpol::Cluster {
        netpol::Cluster {
            pods: vec![netpol::Pod {
                namespace: "default".into(),
                name: "known".into(),
                ..netpol::Pod::default()
            }],
            policies: vec![netpol::Policy {
                namespace: "default".into(),
                name: "deny".into(),
                ..netpol::Policy::default()
            }],
            ..netpol::Cluster::default()
        }
    }

    #[test]
    fn a_pod_the_api_server_has_not_shown_is_open_or_denied_by_the_mode() {
        for strict in [false, true] {
            let mut state = Enforcement::new(strict, "eni");
            up(&mut state, "new", "10.0.0.5");
            let rules = state.rules();
            if strict {
                assert_eq!(rules.len(), 1);
                assert_eq!(rules[0].ingress, netpol::Verdict::Isolated(vec![]));
                assert_eq!(rules[0].egress, netpol::Verdict::Isolated(vec![]));
                assert_eq!(
                    rules[0].host_veth,
                    datapath::names::host_veth_name("eni", "default.new")
                );
            } else {
                assert!(rules.is_empty(), "standard: open until known");
            }
        }
    }

    #[test]
    fn before_the_cluster_is_known_only_pods_added_since_the_start_are_decided() {
        let mut state = Enforcement::new(true, "eni");
        // Restored from the checkpoint: its predecessor's rules stay as they are.
        up(&mut state, "restored", "10.0.0.5");
        assert!(state.rules_of_added().is_empty());
        let (reply, _) = oneshot::channel();
        state.take(
            Input::Up {
                key: key("new"),
                namespace: "default".into(),
                name: "new".into(),
                ip: "10.0.0.6".parse().unwrap(),
                reply: Some((
                    reply,
                    Reply::Status {
                        ready: true,
                        available_addresses: 0,
                        detail: String::new(),
                    },
                )),
            },
            &mut Vec::new(),
        );
        let added = state.rules_of_added();
        assert_eq!(added.len(), 1, "strict: the new pod is denied until known");
        assert_eq!(added[0].addresses, ["10.0.0.6".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            state.rules().len(),
            2,
            "all of them once the cluster is known"
        );
    }

    #[test]
    fn known_pods_get_their_policies_and_the_daemons_address_counts() {
        let mut state = Enforcement::new(true, "eni");
        state.take(
            Input::Cluster(deny_all_ingress(), k8s::Versions::new()),
            &mut Vec::new(),
        );
        up(&mut state, "known", "10.0.0.7");
        let rules = state.rules();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].ingress, netpol::Verdict::Isolated(vec![]));
        assert_eq!(rules[0].egress, netpol::Verdict::Open, "no egress policy");
        state.take(Input::Down { key: key("known") }, &mut Vec::new());
        assert!(state.rules().is_empty());
    }
}
