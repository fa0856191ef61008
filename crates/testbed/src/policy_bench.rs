//! The NetworkPolicy bench (`vpcctl demo --manifests FILE --probe tcp/80,udp/81`): the namespaces
//! and pods of a multi-document Kubernetes YAML are created in the test API server and wired by
//! the real plugin on real nodes; every pod serves every probed port and its named container
//! ports; the policies go through the API server that the daemons watch; once every node says
//! they are in force, every ordered pair of distinct pods is probed on every port (TCP: a
//! connection accepted; UDP: a datagram echoed; SCTP: an INIT seen by the target, sent and seen
//! through raw sockets, as this kernel has no SCTP sockets). A user tests policies here before
//! applying them to a cluster; the test suite runs Kubernetes' own NetworkPolicy cases through it.

use crate::probe::{answers, UdpEcho, WhoAmI};
use crate::sctp::SctpListener;
use crate::{Binaries, Options, Pod, Stop, Testbed};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::str::FromStr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

/// How long a probe waits for its answer: traffic between namespaces on one machine answers in
/// well under a millisecond, so this is only a loaded machine's margin.
const PATIENCE: Duration = Duration::from_secs(2);
/// How long the daemons have to put a change in force.
const IN_FORCE_WITHIN: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Probe {
    pub protocol: Protocol,
    pub port: u16,
}

impl FromStr for Probe {
    type Err = String;

    fn from_str(text: &str) -> Result<Probe, String> {
        let (protocol, port) = text
            .split_once('/')
            .ok_or_else(|| format!("probe {text:?}: expected PROTOCOL/PORT, as tcp/80"))?;
        let protocol = match protocol.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            other => {
                return Err(format!(
                    "probe {text:?}: protocol {other:?} is not tcp, udp or sctp"
                ))
            }
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("probe {text:?}: {port:?} is not a port"))?;
        Ok(Probe { protocol, port })
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let protocol = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        };
        write!(f, "{protocol}/{}", self.port)
    }
}

/// `tcp/80,udp/81` as probes.
pub fn parse_probes(text: &str) -> Result<Vec<Probe>, String> {
    let probes: Vec<Probe> = text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    if probes.is_empty() {
        return Err("--probe: no probe given".into());
    }
    Ok(probes)
}

#[derive(Clone, Debug)]
pub struct BenchPod {
    pub namespace: String,
    pub name: String,
    pub labels: Map<String, Value>,
    /// `spec.nodeName`, if the manifest names a node.
    pub node: Option<String>,
    /// The containers as the manifest gives them (their ports name the named ports).
    pub containers: Value,
    /// The container ports that can be served: (protocol, port).
    pub serves: BTreeSet<Probe>,
    /// `spec.serviceAccountName`, which a SecurityGroupPolicy may select by.
    pub service_account: Option<String>,
}

impl BenchPod {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Namespaces, pods, NetworkPolicies, SecurityGroupPolicies and ServiceAccounts from
/// multi-document YAML.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    /// Name → labels.
    pub namespaces: BTreeMap<String, Map<String, Value>>,
    pub pods: Vec<BenchPod>,
    pub policies: Vec<Value>,
    /// With any, the nodes make branch ENIs for the pods these select (POD_ENI_MANAGER=node), and
    /// the VPC's security groups hold for those pods on their own.
    pub security_group_policies: Vec<Value>,
    pub service_accounts: Vec<Value>,
}

fn name_of(doc: &Value, what: &str) -> Result<String, String> {
    doc["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .ok_or_else(|| format!("{what} without metadata.name"))
}

impl Manifests {
    pub fn from_yaml(text: &str) -> Result<Manifests, String> {
        let mut out = Manifests::default();
        for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let doc =
                Value::deserialize(document).map_err(|e| format!("document {}: {e}", i + 1))?;
            if doc.is_null() {
                continue;
            }
            out.add(doc)
                .map_err(|e| format!("document {}: {e}", i + 1))?;
        }
        // A namespace that a pod or a policy names but no document declares is created bare.
        let named: Vec<String> = out
            .pods
            .iter()
            .map(|p| p.namespace.clone())
            .chain(
                out.policies
                    .iter()
                    .chain(&out.security_group_policies)
                    .chain(&out.service_accounts)
                    .map(|p| {
                        p["metadata"]["namespace"]
                            .as_str()
                            .unwrap_or("default")
                            .to_string()
                    }),
            )
            .collect();
        for namespace in named {
            out.namespaces.entry(namespace).or_default();
        }
        let mut seen = BTreeSet::new();
        for pod in &out.pods {
            if !seen.insert(pod.id()) {
                return Err(format!("pod {} is declared twice", pod.id()));
            }
        }
        if out.pods.len() < 2 {
            return Err("the manifests need at least two pods to probe between".into());
        }
        Ok(out)
    }

    fn add(&mut self, doc: Value) -> Result<(), String> {
        match doc["kind"].as_str().unwrap_or("") {
            "List" => {
                for item in doc["items"].as_array().cloned().unwrap_or_default() {
                    self.add(item)?;
                }
                Ok(())
            }
            "Namespace" => {
                let name = name_of(&doc, "a Namespace")?;
                let labels = doc["metadata"]["labels"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                self.namespaces.insert(name, labels);
                Ok(())
            }
            "NetworkPolicy" => {
                name_of(&doc, "a NetworkPolicy")?;
                self.policies.push(doc);
                Ok(())
            }
            "SecurityGroupPolicy" => {
                name_of(&doc, "a SecurityGroupPolicy")?;
                self.security_group_policies.push(doc);
                Ok(())
            }
            "ServiceAccount" => {
                name_of(&doc, "a ServiceAccount")?;
                self.service_accounts.push(doc);
                Ok(())
            }
            "Pod" => {
                let name = name_of(&doc, "a Pod")?;
                let namespace = doc["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string();
                let containers = doc["spec"]["containers"].clone();
                let mut serves = BTreeSet::new();
                for port in containers
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                {
                    let number = port["containerPort"]
                        .as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|p| *p != 0)
                        .ok_or_else(|| format!("pod {namespace}/{name}: a container port without a containerPort: {port}"))?;
                    let protocol = match port["protocol"].as_str().unwrap_or("TCP") {
                        "TCP" => Protocol::Tcp,
                        "UDP" => Protocol::Udp,
                        "SCTP" => Protocol::Sctp,
                        other => return Err(format!("pod {namespace}/{name}: protocol {other:?}")),
                    };
                    serves.insert(Probe {
                        protocol,
                        port: number,
                    });
                }
                self.pods.push(BenchPod {
                    namespace,
                    name,
                    labels: doc["metadata"]["labels"]
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                    node: doc["spec"]["nodeName"].as_str().map(str::to_string),
                    containers,
                    serves,
                    service_account: doc["spec"]["serviceAccountName"]
                        .as_str()
                        .map(str::to_string),
                });
                Ok(())
            }
            other => Err(format!(
                "kind {other:?}: the bench takes Namespace, Pod, NetworkPolicy, \
                 SecurityGroupPolicy and ServiceAccount objects"
            )),
        }
    }
}

/// One probe's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub from: String,
    pub to: String,
    pub probe: Probe,
    pub connected: bool,
}

/// The bench, running: a testbed with NetworkPolicy on, the manifests' namespaces and pods, the
/// servers in each pod.
pub struct Bench {
    pub testbed: Testbed,
    pods: Vec<(BenchPod, Pod)>,
    tcp: Vec<WhoAmI>,
    udp: Vec<UdpEcho>,
    /// By pod address: what arrives over SCTP, whatever the port.
    sctp: BTreeMap<IpAddr, SctpListener>,
    policies: BTreeSet<(String, String)>,
}

impl Bench {
    /// Starts `nodes` nodes (or the instances of `vpc`, whose hosts are probed too) with
    /// `settings` (the daemons' environment, over NetworkPolicy on in standard mode), creates the
    /// namespaces and pods and has every pod serve `probes` and its container ports. No policy yet.
    pub fn start(
        manifests: &Manifests,
        probes: &[Probe],
        nodes: usize,
        vpc: Option<crate::ServeConfig>,
        settings: Vec<(String, String)>,
        binaries: Binaries,
    ) -> Result<Bench, String> {
        let mut env = vec![
            ("ENABLE_NETWORK_POLICY".to_string(), "true".to_string()),
            (
                "NETWORK_POLICY_ENFORCING_MODE".to_string(),
                "standard".to_string(),
            ),
        ];
        if !manifests.security_group_policies.is_empty() {
            env.extend(
                [("ENABLE_POD_ENI", "true"), ("POD_ENI_MANAGER", "node")]
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            );
        }
        env.extend(settings);
        let mut testbed = Testbed::start(
            &Options {
                nodes: nodes.max(1),
                kubernetes: true,
                daemon_env: env,
                vpc,
                ..Options::default()
            },
            binaries,
        )?;
        let api = testbed.kube.as_ref().expect("a Kubernetes API server");
        for (name, labels) in &manifests.namespaces {
            let mut labels = labels.clone();
            labels.insert("kubernetes.io/metadata.name".into(), json!(name));
            api.apply(
                "namespaces",
                json!({"metadata": {"name": name, "labels": labels}}),
            );
        }
        for (resource, objects) in [
            ("serviceaccounts", &manifests.service_accounts),
            ("securitygrouppolicies", &manifests.security_group_policies),
        ] {
            for object in objects {
                let mut object = object.clone();
                if object["metadata"]["namespace"].is_null() {
                    object["metadata"]["namespace"] = json!("default");
                }
                api.apply(resource, object);
            }
        }
        for i in 0..testbed.nodes.len() {
            testbed.start_daemon(i)?;
        }
        let mut pods = Vec::new();
        for (i, spec) in manifests.pods.iter().enumerate() {
            let node = match &spec.node {
                Some(name) => testbed
                    .nodes
                    .iter()
                    .position(|n| &n.name == name)
                    .ok_or_else(|| {
                        format!(
                            "pod {} names node {name:?}; the nodes are {}",
                            spec.id(),
                            testbed
                                .nodes
                                .iter()
                                .map(|n| n.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })?,
                None => i % testbed.nodes.len(),
            };
            let mut object_spec = json!({});
            if !spec.containers.is_null() {
                object_spec["containers"] = spec.containers.clone();
            }
            if let Some(account) = &spec.service_account {
                object_spec["serviceAccountName"] = json!(account);
            }
            let pod = testbed.add_pod_object(
                node,
                &spec.namespace,
                &spec.name,
                json!({"labels": spec.labels}),
                object_spec,
            )?;
            pods.push((spec.clone(), pod));
        }
        let (mut tcp, mut udp, mut sctp) = (Vec::new(), Vec::new(), BTreeMap::new());
        for (spec, pod) in &pods {
            let served: BTreeSet<Probe> = spec.serves.iter().chain(probes).copied().collect();
            for probe in served {
                let address = SocketAddr::new(pod.ip, probe.port);
                match probe.protocol {
                    Protocol::Sctp => {
                        let IpAddr::V4(ip) = pod.ip else {
                            return Err(format!(
                                "{}: SCTP is probed over IPv4 only (raw sockets stand in for the SCTP sockets this kernel lacks)",
                                spec.id()
                            ));
                        };
                        if let std::collections::btree_map::Entry::Vacant(slot) = sctp.entry(pod.ip)
                        {
                            let listener = pod
                                .netns
                                .run(move || SctpListener::bind(ip))?
                                .map_err(|e| format!("{}: serving {probe}: {e}", spec.id()))?;
                            slot.insert(listener);
                        }
                    }
                    Protocol::Tcp => tcp.push(
                        pod.netns
                            .run(move || WhoAmI::bind(address))?
                            .map_err(|e| format!("{}: serving {probe}: {e}", spec.id()))?,
                    ),
                    Protocol::Udp => udp.push(
                        pod.netns
                            .run(move || UdpEcho::bind(address))?
                            .map_err(|e| format!("{}: serving {probe}: {e}", spec.id()))?,
                    ),
                }
            }
        }
        Ok(Bench {
            testbed,
            pods,
            tcp,
            udp,
            sctp,
            policies: BTreeSet::new(),
        })
    }

    pub fn pods(&self) -> impl Iterator<Item = (&BenchPod, &Pod)> {
        self.pods.iter().map(|(s, p)| (s, p))
    }

    /// What the matrix's columns show: every pod, then every VPC host as `vpc/<name>`.
    pub fn servers(&self) -> Vec<String> {
        self.targets().into_iter().map(|(id, _)| id).collect()
    }

    /// Every pod, then the VPC's hosts, with their addresses.
    fn targets(&self) -> Vec<(String, IpAddr)> {
        self.pods
            .iter()
            .map(|(spec, pod)| (spec.id(), pod.ip))
            .chain(
                self.testbed
                    .hosts
                    .iter()
                    .map(|h| (format!("vpc/{}", h.name), IpAddr::V4(h.ip))),
            )
            .collect()
    }

    fn api(&self) -> &crate::kube_api::KubeApi {
        self.testbed.kube.as_ref().expect("a Kubernetes API server")
    }

    /// Makes `policies` the cluster's policies (the others deleted, these created or replaced)
    /// and waits until every node has them in force.
    pub fn set_policies(&mut self, policies: &[Value]) -> Result<(), String> {
        let mut wanted = BTreeSet::new();
        for policy in policies {
            let namespace = policy["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let name = name_of(policy, "a NetworkPolicy")?;
            let mut object = policy.clone();
            object["metadata"]["namespace"] = json!(namespace);
            self.api().apply("networkpolicies", object);
            wanted.insert((namespace, name));
        }
        for (namespace, name) in self.policies.difference(&wanted) {
            self.api().delete("networkpolicies", namespace, name);
        }
        self.policies = wanted;
        self.wait_in_force("networkpolicies")
    }

    /// Replaces a namespace's labels (its name label kept) and waits until it is in force.
    pub fn label_namespace(
        &mut self,
        namespace: &str,
        labels: Map<String, Value>,
    ) -> Result<(), String> {
        let mut labels = labels;
        labels.insert("kubernetes.io/metadata.name".into(), json!(namespace));
        self.api().apply(
            "namespaces",
            json!({"metadata": {"name": namespace, "labels": labels}}),
        );
        self.wait_in_force("namespaces")
    }

    /// Replaces a pod's labels and waits until it is in force.
    pub fn label_pod(&mut self, id: &str, labels: Map<String, Value>) -> Result<(), String> {
        let (namespace, name) = id
            .split_once('/')
            .ok_or_else(|| format!("pod {id:?}: expected NAMESPACE/NAME"))?;
        let mut object = self
            .api()
            .objects("pods")
            .into_iter()
            .find(|o| o["metadata"]["namespace"] == namespace && o["metadata"]["name"] == name)
            .ok_or_else(|| format!("no pod {id}"))?;
        object["metadata"]["labels"] = Value::Object(labels);
        self.api().apply("pods", object);
        self.wait_in_force("pods")
    }

    fn wait_in_force(&self, resource: &str) -> Result<(), String> {
        self.testbed.wait_policy_in_force(resource, IN_FORCE_WITHIN)
    }

    /// Every ordered pair of distinct pods on every probe, all at once.
    pub fn probe(&self, probes: &[Probe]) -> Vec<Outcome> {
        // Hosts serve TCP and UDP only: SCTP is probed where a listener sees it arrive.
        let targets = self.targets();
        let mut outcomes = Vec::new();
        std::thread::scope(|scope| {
            let mut running = Vec::new();
            for (from_spec, from) in &self.pods {
                for (to, to_ip) in &targets {
                    if from_spec.id() == *to {
                        continue;
                    }
                    let listener = self.sctp.get(to_ip);
                    for probe in probes {
                        if probe.protocol == Protocol::Sctp && listener.is_none() {
                            continue;
                        }
                        let target = SocketAddr::new(*to_ip, probe.port);
                        let netns = &from.netns;
                        let from_ip = from.ip;
                        let probe = *probe;
                        running.push((
                            from_spec.id(),
                            to.clone(),
                            probe,
                            scope.spawn(move || {
                                match (probe.protocol, target, from_ip, listener) {
                                    (
                                        Protocol::Sctp,
                                        SocketAddr::V4(target),
                                        IpAddr::V4(source),
                                        Some(listener),
                                    ) => sctp_reaches(netns, target, source, listener),
                                    (Protocol::Sctp, ..) => false,
                                    (protocol, ..) => netns
                                        .run(move || {
                                            answers(target, protocol == Protocol::Udp, PATIENCE)
                                        })
                                        .unwrap_or(false),
                                }
                            }),
                        ));
                    }
                }
            }
            for (from, to, probe, handle) in running {
                outcomes.push(Outcome {
                    from,
                    to,
                    probe,
                    connected: handle.join().unwrap_or(false),
                });
            }
        });
        outcomes
    }

    /// Deletes the pods through the plugin and stops the daemons.
    pub fn stop(mut self) -> Result<(), String> {
        self.tcp.clear();
        self.udp.clear();
        self.sctp.clear();
        for (_, pod) in std::mem::take(&mut self.pods) {
            self.testbed.del_pod(pod)?;
        }
        for i in 0..self.testbed.nodes.len() {
            self.testbed.stop_daemon(i, Stop::Term)?;
        }
        Ok(())
    }
}

/// The outcomes of one probe as a matrix: a row per client, a column per server; `+` connected,
/// `-` not, `.` the pod itself.
/// Whether an SCTP INIT from the namespace `netns` (address `source`) reaches `target`, whose
/// listener is `listener`. Each probe sends from a port of its own, so that probes running at once
/// are separate associations to conntrack.
fn sctp_reaches(
    netns: &crate::netns::Netns,
    target: SocketAddrV4,
    source: std::net::Ipv4Addr,
    listener: &SctpListener,
) -> bool {
    static NEXT_PORT: AtomicU16 = AtomicU16::new(0);
    let source_port = 20_000 + NEXT_PORT.fetch_add(1, Ordering::Relaxed) % 40_000;
    let sent = netns.run(move || crate::sctp::send_inits(target, source_port));
    if !matches!(sent, Ok(Ok(()))) {
        return false;
    }
    crate::sctp::reached(
        listener,
        SocketAddrV4::new(source, source_port),
        target.port(),
        PATIENCE,
    )
}

pub fn matrix(
    outcomes: &[Outcome],
    probe: Probe,
    clients: &[String],
    servers: &[String],
) -> String {
    let width = clients
        .iter()
        .chain(servers)
        .map(String::len)
        .max()
        .unwrap_or(1)
        .max(5);
    let mut out = format!("{:width$}", probe.to_string());
    for to in servers {
        out += &format!(" {to:>width$}");
    }
    out.push('\n');
    for from in clients {
        out += &format!("{from:width$}");
        for to in servers {
            let cell = if from == to {
                "."
            } else {
                match outcomes
                    .iter()
                    .find(|o| &o.from == from && &o.to == to && o.probe == probe)
                {
                    Some(o) if o.connected => "+",
                    Some(_) => "-",
                    None => "?",
                }
            };
            out += &format!(" {cell:>width$}");
        }
        out.push('\n');
    }
    out
}

/// The outcomes as the `--json` report.
pub fn to_json(outcomes: &[Outcome]) -> Value {
    json!({"probes": outcomes.iter().map(|o| json!({
        "from": o.from,
        "to": o.to,
        "port": o.probe.to_string(),
        "connected": o.connected,
    })).collect::<Vec<_>>()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_read_and_bad_ones_refused_by_document() {
        let m = Manifests::from_yaml(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: a}}\n---\n\
             kind: Pod\nmetadata: {namespace: x, name: a, labels: {pod: a}}\n\
             spec: {containers: [{name: c, ports: [{name: web, containerPort: 80}, {containerPort: 53, protocol: UDP}]}]}\n---\n\
             kind: Pod\nmetadata: {namespace: y, name: b}\n---\n\
             kind: NetworkPolicy\nmetadata: {namespace: x, name: deny}\nspec: {podSelector: {}}\n",
        )
        .unwrap();
        assert_eq!(m.pods.len(), 2);
        assert_eq!(m.namespaces["x"]["team"], "a");
        assert!(m.namespaces.contains_key("y"), "named by a pod, created");
        assert_eq!(
            m.pods[0].serves,
            BTreeSet::from(["tcp/80".parse().unwrap(), "udp/53".parse().unwrap()])
        );
        let e = Manifests::from_yaml(
            "kind: Pod\nmetadata: {name: a}\n---\nkind: Service\nmetadata: {name: s}\n",
        )
        .unwrap_err();
        assert!(e.starts_with("document 2: kind \"Service\""), "{e}");
        let e = Manifests::from_yaml("kind: Pod\nmetadata: {name: a}\n").unwrap_err();
        assert!(e.contains("at least two pods"), "{e}");
        assert!(parse_probes("tcp/80, udp/81").unwrap().len() == 2);
        assert_eq!(parse_probes("SCTP/80").unwrap()[0].to_string(), "sctp/80");
        assert!(parse_probes("tcp/0").is_err() && parse_probes("icmp/1").is_err());
    }

    #[test]
    fn the_matrix_marks_each_pair() {
        let probe: Probe = "tcp/80".parse().unwrap();
        let outcomes = vec![
            Outcome {
                from: "x/a".into(),
                to: "x/b".into(),
                probe,
                connected: true,
            },
            Outcome {
                from: "x/b".into(),
                to: "x/a".into(),
                probe,
                connected: false,
            },
        ];
        let pods = ["x/a".to_string(), "x/b".to_string()];
        let text = matrix(&outcomes, probe, &pods, &pods);
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(
            rows[1].split_whitespace().collect::<Vec<_>>(),
            ["x/a", ".", "+"]
        );
        assert_eq!(
            rows[2].split_whitespace().collect::<Vec<_>>(),
            ["x/b", "-", "."]
        );
        assert_eq!(to_json(&outcomes)["probes"][1]["connected"], false);
    }
}
