//! The local demo's machinery, shared by `vpcctl demo` and the end-to-end tests: the simulated VPC
//! served over HTTP inside a "VPC" network namespace, a namespace per node whose ENIs are veth pairs
//! with the MACs EC2 assigned, the real `vpc-ipamd` in each node namespace (the AWS backend with the
//! endpoint override, exactly as in production), and pods added through the real plugin.

pub mod demo;
pub mod fabric;
pub mod kube_api;
pub mod netns;
pub mod policy_bench;
pub mod probe;
pub mod sctp;
pub mod vlan;

use fabric::{gateway, Fabric};
pub use netns::Netns;
use serde_json::{json, Value};
pub use simvpc_http::config::PreattachedConfig;
use simvpc_http::config::{Ec2Behaviour, InstanceConfig, SubnetConfig, VpcConfig};
pub use simvpc_http::ServeConfig;
use simvpc_http::{Running, Server};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const NODE_CIDR: &str = "10.0.0.0/20";
/// With `Options::ipv6`: the VPC's IPv6 block and the node subnet's /64 (documentation space: the
/// traffic never leaves the testbed's namespaces).
pub const VPC_CIDR_V6: &str = "2001:db8:7c00::/56";
pub const NODE_CIDR_V6: &str = "2001:db8:7c00::/64";
/// Custom networking's pod subnet, from the secondary VPC CIDR, as operators do (100.64.0.0/10).
pub const POD_CIDR: &str = "100.64.0.0/20";
pub const AZ: &str = "us-west-2a";
pub const REGION: &str = "us-west-2";
pub const NETWORK: &str = "aws-cni";
pub const INTROSPECTION: &str = "127.0.0.1:61679";
pub const METRICS: &str = "127.0.0.1:61678";
/// With `Options::kubernetes` and custom networking: the ENIConfig object and the Node label that
/// selects it.
pub const ENI_CONFIG_NAME: &str = "pod-subnet";
pub const ENI_CONFIG_LABEL: &str = "k8s.amazonaws.com/eniConfig";
/// The namespace of the pods the testbed adds.
pub const POD_NAMESPACE: &str = "default";

/// Where the binaries are: `VPC_CNI_BIN_DIR`, else next to the running executable (or one up, for
/// test executables in `deps/`).
#[derive(Clone, Debug)]
pub struct Binaries {
    pub ipamd: PathBuf,
    pub plugin: PathBuf,
}

impl Binaries {
    pub fn locate() -> Result<Binaries, String> {
        let mut dirs = Vec::new();
        if let Some(dir) = std::env::var_os("VPC_CNI_BIN_DIR") {
            dirs.push(PathBuf::from(dir));
        }
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            if let Some(parent) = dir.parent().filter(|_| dir.ends_with("deps")) {
                dirs.push(parent.to_path_buf());
            }
            dirs.push(dir);
        }
        for dir in &dirs {
            let (ipamd, plugin) = (dir.join("vpc-ipamd"), dir.join("vpc-cni"));
            if ipamd.is_file() && plugin.is_file() {
                return Ok(Binaries { ipamd, plugin });
            }
        }
        Err(format!(
            "vpc-ipamd and vpc-cni not found in {}; build them (cargo build --release --bins) or set VPC_CNI_BIN_DIR",
            dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        ))
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: usize,
    pub instance_type: String,
    /// The daemon's settings (upstream's variables), for every node.
    pub daemon_env: Vec<(String, String)>,
    pub ec2: Ec2Behaviour,
    /// Adds the pod subnet (`POD_CIDR`) for custom networking; the ENIConfig names it.
    pub custom_networking: bool,
    /// The node subnet's CIDR (a small one runs out of addresses sooner).
    pub node_subnet: String,
    /// Runs a Kubernetes API server (`kube_api`) in the VPC namespace with a Node object per
    /// node and a Pod object per pod; the daemons get a kubeconfig for it. With custom
    /// networking the ENIConfig is an object the Node's label selects instead of a file.
    pub kubernetes: bool,
    /// ENIs every node has before its daemon first starts (someone else's, a trunk, EFA).
    pub preattached: Vec<PreattachedConfig>,
    /// The whole simulated VPC from a file (`vpcctl demo --vpc`): its instances are the nodes, and
    /// a subnet named `pods`, if any, is custom networking's. `nodes`, `instance_type`,
    /// `node_subnet` and `preattached` then do not apply.
    pub vpc: Option<ServeConfig>,
    /// IPv6 pods: the node subnet gets an IPv6 /64, the daemons run with ENABLE_IPv6 (and prefix
    /// delegation), the plugin with enableIPv6.
    pub ipv6: bool,
    /// The daemon as the DaemonSet runs it: in a mount namespace of its own where /proc/sys is
    /// read-only, with no capability but NET_ADMIN and NET_RAW. `Testbed::init_node` then sets
    /// the node's sysctls first, as the init container does.
    pub unprivileged: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 1,
            instance_type: "m5.large".into(),
            daemon_env: Vec::new(),
            ec2: Ec2Behaviour::default(),
            custom_networking: false,
            node_subnet: NODE_CIDR.into(),
            kubernetes: false,
            preattached: Vec::new(),
            vpc: None,
            ipv6: false,
            unprivileged: false,
        }
    }
}

pub struct Node {
    pub name: String,
    pub netns: Netns,
    pub instance_id: String,
    pub primary_ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    /// Socket, checkpoint, logs.
    pub state: PathBuf,
    env: Vec<(String, String)>,
    daemon: Option<Child>,
}

impl Node {
    pub fn socket(&self) -> PathBuf {
        self.state.join("ipamd.sock")
    }

    pub fn checkpoint(&self) -> PathBuf {
        self.state.join("ipam.json")
    }

    pub fn daemon_log(&self) -> PathBuf {
        self.state.join("ipamd.log")
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// The last lines of the daemon's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.daemon_log()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// GET on the daemon's introspection or metrics address, from inside the node.
    pub fn http_get(&self, address: &str, path: &str) -> Result<(u16, String), String> {
        let address: SocketAddr = address.parse().map_err(|e| format!("{address}: {e}"))?;
        let path = path.to_string();
        self.netns.run(move || probe::http_get(address, &path))?
    }

    pub fn introspect(&self, path: &str) -> Result<Value, String> {
        let (status, body) = self.http_get(INTROSPECTION, path)?;
        if status != 200 {
            return Err(format!("{path}: HTTP {status}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("{path}: {e}: {body}"))
    }

    /// Polls `/v1/status` until `ready` holds (up to two minutes); the status that satisfied it.
    pub fn wait_status(&self, what: &str, ready: impl Fn(&Value) -> bool) -> Result<Value, String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = self.introspect("/v1/status")?;
            if ready(&status) {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(format!("{what}: not so after 120 s: {status}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the daemon has no EC2 action in flight and no ADD waiting.
    pub fn settle(&self) -> Result<Value, String> {
        self.wait_status("the daemon settled", |s| {
            s["ec2ActionsInFlight"] == 0 && s["pendingAdds"] == 0
        })
    }

    pub fn metrics(&self) -> Result<String, String> {
        match self.http_get(METRICS, "/metrics")? {
            (200, body) => Ok(body),
            (status, body) => Err(format!("/metrics: HTTP {status}: {body}")),
        }
    }

    pub fn status(&self) -> Result<proto::Reply, String> {
        proto::call(
            &self.socket(),
            &proto::Request::Status,
            Duration::from_secs(5),
        )
        .map_err(|e| e.to_string())
    }
}

pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node: usize,
    pub netns: Netns,
    pub container_id: String,
    pub ip: IpAddr,
    /// An IPv6 pod's IPv4 egress address (on `v4if0`).
    pub egress_v4: Option<Ipv4Addr>,
    /// The plugin's ADD result, handed back with DEL as runtimes do.
    pub result: Value,
}

pub enum Stop {
    /// SIGTERM, then wait for the exit.
    Term,
    /// SIGKILL: no chance to clean up.
    Kill,
}

/// How far a daemon has taken a NetworkPolicy change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyStage {
    /// Its rules are in the kernel: new flows are judged by them.
    Rules,
    /// And the established flows it denies are cut.
    FlowsCut,
}

pub struct Testbed {
    pub vpc: Netns,
    server: Option<Running>,
    pub fabric: Arc<Fabric>,
    pub nodes: Vec<Node>,
    /// The subnet id custom networking's ENIConfig names.
    pub pod_subnet: Option<String>,
    pub node_subnet: String,
    pub binaries: Binaries,
    root: PathBuf,
    next_pod: AtomicU32,
    /// Every ADD's sandbox gets a container id of its own, as a runtime gives.
    next_sandbox: AtomicU32,
    pub kube: Option<kube_api::KubeApi>,
    pub ipv6: bool,
    unprivileged: bool,
    /// The VPC file's `[[hosts]]`, wired and serving their ports.
    pub hosts: Vec<Host>,
}

/// A host of the VPC that is not a node: its own namespace on its subnet, an ENI's address and
/// security groups, serving its ports while it lives.
pub struct Host {
    pub name: String,
    pub ip: Ipv4Addr,
    pub netns: Netns,
    _tcp: Vec<probe::WhoAmI>,
    _udp: Vec<probe::UdpEcho>,
}

/// YAML documents as JSON, through PyYAML in the test venv (`python`): the manifests' parser.
pub fn yaml_documents(python: &Path, yaml: &str) -> Vec<Value> {
    let mut child = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(yaml.as_bytes())
        .expect("python reads its input");
    let output = child.wait_with_output().expect("python runs");
    assert!(output.status.success(), "PyYAML could not parse the YAML");
    serde_json::from_slice(&output.stdout).expect("JSON from python")
}

/// The demo's VPC: a node subnet (and a pod subnet for custom networking) and the instances the
/// options ask for.
fn built_in_vpc(options: &Options) -> Result<ServeConfig, String> {
    let node_cidr: ipam::Ipv4Cidr = options.node_subnet.parse().map_err(|e| format!("{e}"))?;
    let mut subnets = vec![SubnetConfig {
        name: "nodes".into(),
        cidr: node_cidr,
        az: AZ.into(),
        tags: BTreeMap::from([("kubernetes.io/role/cni".into(), "1".into())]),
        prefix_reservations: Vec::new(),
        ipv6_cidr: options.ipv6.then(|| NODE_CIDR_V6.parse().expect("a CIDR")),
    }];
    if options.custom_networking {
        subnets.push(SubnetConfig {
            name: "pods".into(),
            cidr: POD_CIDR.parse().expect("a CIDR"),
            az: AZ.into(),
            tags: BTreeMap::new(),
            prefix_reservations: Vec::new(),
            ipv6_cidr: None,
        });
    }
    Ok(ServeConfig {
        vpc: VpcConfig {
            cidr: "10.0.0.0/16".parse().expect("a CIDR"),
            secondary_cidrs: if options.custom_networking {
                vec!["100.64.0.0/16".parse().expect("a CIDR")]
            } else {
                Vec::new()
            },
            ipv6_cidrs: if options.ipv6 {
                vec![VPC_CIDR_V6.parse().expect("a CIDR")]
            } else {
                Vec::new()
            },
        },
        subnets,
        instances: (1..=options.nodes)
            .map(|i| InstanceConfig {
                name: format!("node-{i}"),
                instance_type: options.instance_type.clone(),
                subnet: "nodes".into(),
                security_groups: vec!["sg-0000000000000001".into()],
                enis: options.preattached.clone(),
            })
            .collect(),
        ec2: options.ec2.clone(),
        security_groups: Vec::new(),
        hosts: Vec::new(),
    })
}

static TESTBEDS: AtomicU32 = AtomicU32::new(0);

fn port_of(url: &str) -> Result<u16, String> {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .ok_or_else(|| format!("no port in {url}"))
}

impl Testbed {
    /// Needs root (network namespaces); says so rather than failing obscurely.
    pub fn start(options: &Options, binaries: Binaries) -> Result<Testbed, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("the demo needs root: it creates network namespaces, links and nftables rules (run it with sudo)".into());
        }
        let root = std::env::temp_dir().join(format!(
            "vpc-cni-testbed-{}-{}",
            std::process::id(),
            TESTBEDS.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        let vpc = Netns::create("vpc")?;
        netns::sysctl(&vpc.name, "net.ipv4.ip_forward", "1")?;
        netns::sysctl(&vpc.name, "net.ipv4.conf.all.send_redirects", "0")?;
        // The VPC's IPv6 router: forwarding, and no duplicate address detection to wait for.
        for (key, value) in [
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ] {
            netns::sysctl(&vpc.name, key, value)?;
        }
        let config = match &options.vpc {
            Some(config) => config.clone(),
            None => built_in_vpc(options)?,
        };
        let host_configs = config.hosts.clone();
        let first_subnet = config
            .instances
            .first()
            .map(|i| i.subnet.clone())
            .ok_or("the VPC has no instance to be a node")?;
        let fabric = Arc::new(Fabric::new(&vpc.name));
        let observer: simvpc_http::Observer = {
            let fabric = fabric.clone();
            Arc::new(move |v: &simvpc::SimVpc| fabric.follow(v))
        };
        let listen: SocketAddr = "0.0.0.0:0".parse().expect("an address");
        let server = vpc.run(move || Server::start_observed(&config, listen, Some(observer)))??;
        let ec2_port = port_of(&server.ec2_url)?;
        let node_subnet = server.names.subnets[&first_subnet].clone();
        let pod_subnet = server.names.subnets.get("pods").cloned();
        let mut testbed = Testbed {
            vpc,
            fabric: fabric.clone(),
            nodes: Vec::new(),
            pod_subnet,
            node_subnet,
            binaries,
            root,
            next_pod: AtomicU32::new(0),
            next_sandbox: AtomicU32::new(0),
            server: None,
            kube: None,
            ipv6: options.ipv6,
            unprivileged: options.unprivileged,
            hosts: Vec::new(),
        };
        if options.kubernetes {
            let listen: SocketAddr = "0.0.0.0:0".parse().expect("an address");
            let api = testbed
                .vpc
                .run(move || kube_api::KubeApi::start(listen))?
                .map_err(|e| format!("Kubernetes API server: {e}"))?;
            if let Some(subnet) = &testbed.pod_subnet {
                api.apply(
                    "eniconfigs",
                    json!({"metadata": {"name": ENI_CONFIG_NAME},
                           "spec": {"subnet": subnet, "securityGroups": ["sg-0000000000000002"]}}),
                );
            }
            testbed.kube = Some(api);
        }
        let endpoints = server.instances.clone();
        let vpc_model = server.vpc.clone();
        testbed.server = Some(server);
        for endpoint in endpoints {
            let netns = Netns::create(&format!("{}-", endpoint.name))?;
            // The ENIs' link-local addresses, which the fabric routes /80s through, are usable as
            // soon as the links are up.
            netns::sysctl(&netns.name, "net.ipv6.conf.default.accept_dad", "0")?;
            fabric.add_node(&endpoint.instance_id, &netns.name);
            let (primary_ip, cidr, has_v6) = {
                let v = vpc_model.lock().expect("vpc lock");
                let instance = v
                    .instance(&endpoint.instance_id)
                    .ok_or("instance vanished")?;
                let eni = v
                    .interfaces()
                    .find(|e| e.id == instance.primary_eni)
                    .ok_or("primary ENI vanished")?;
                fabric.follow(&v);
                let has_v6 = v
                    .subnet(&eni.subnet_id)
                    .is_some_and(|s| s.ipv6_cidr.is_some());
                (eni.primary_ip, eni.subnet_cidr, has_v6)
            };
            let gw = gateway(cidr);
            // What the instance's OS does at boot: the primary ENI up with its address and route.
            netns::ip_batch(
                &netns.name,
                &[
                    format!("addr add {primary_ip}/{} dev eth0", cidr.prefix_len()),
                    "link set eth0 up".into(),
                    format!("route add default via {gw} dev eth0"),
                ],
            )?;
            if has_v6 {
                // What EC2's router advertisement gives an instance in an IPv6 subnet.
                netns::ip_batch(
                    &netns.name,
                    &[format!("route add ::/0 via {} dev eth0", fabric::ROUTER_V6)],
                )?;
            }
            let state = testbed.root.join(&endpoint.name);
            std::fs::create_dir_all(&state).map_err(|e| format!("{}: {e}", state.display()))?;
            let imds_port = port_of(&endpoint.imds_url)?;
            let mut env: Vec<(String, String)> = vec![
                ("AWS_EC2_ENDPOINT".into(), format!("http://{gw}:{ec2_port}")),
                (
                    "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
                    format!("http://{gw}:{imds_port}"),
                ),
                ("AWS_REGION".into(), REGION.into()),
                ("AWS_ACCESS_KEY_ID".into(), "simulated".into()),
                ("AWS_SECRET_ACCESS_KEY".into(), "simulated".into()),
                (
                    "AWS_VPC_K8S_CNI_BACKING_STORE".into(),
                    state.join("ipam.json").display().to_string(),
                ),
                (
                    "VPC_CNI_IPAMD_SOCKET".into(),
                    state.join("ipamd.sock").display().to_string(),
                ),
                (
                    "AWS_VPC_K8S_CNI_LOG_FILE".into(),
                    state.join("ipamd.log").display().to_string(),
                ),
                ("AWS_VPC_K8S_CNI_LOGLEVEL".into(), "DEBUG".into()),
                ("INTROSPECTION_BIND_ADDRESS".into(), INTROSPECTION.into()),
                ("VPC_CNI_METRICS_BIND_ADDRESS".into(), METRICS.into()),
                ("CLUSTER_NAME".into(), "demo".into()),
            ];
            if let Some(api) = &testbed.kube {
                let mut labels = serde_json::Map::new();
                if testbed.pod_subnet.is_some() {
                    labels.insert(ENI_CONFIG_LABEL.into(), json!(ENI_CONFIG_NAME));
                }
                api.apply(
                    "nodes",
                    json!({"metadata": {"name": endpoint.name, "labels": labels},
                           "status": {"capacity": {"pods": "110"}}}),
                );
                let file = state.join("kubeconfig");
                std::fs::write(&file, api.kubeconfig(&gw.to_string()))
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                env.push(("KUBECONFIG".into(), file.display().to_string()));
                env.push(("MY_NODE_NAME".into(), endpoint.name.clone()));
                env.push(("MY_POD_NAME".into(), format!("aws-node-{}", endpoint.name)));
            } else if let Some(subnet) = &testbed.pod_subnet {
                let file = state.join("eniconfig.json");
                std::fs::write(
                    &file,
                    json!({"subnet": subnet, "securityGroups": ["sg-0000000000000002"]})
                        .to_string(),
                )
                .map_err(|e| format!("{}: {e}", file.display()))?;
                env.push(("VPC_CNI_ENICONFIG_FILE".into(), file.display().to_string()));
            }
            if options.ipv6 {
                for (key, value) in [
                    ("ENABLE_IPv6", "true"),
                    ("ENABLE_IPv4", "false"),
                    ("ENABLE_PREFIX_DELEGATION", "true"),
                ] {
                    env.push((key.into(), value.into()));
                }
            }
            env.extend(options.daemon_env.iter().cloned());
            testbed.nodes.push(Node {
                name: endpoint.name.clone(),
                netns,
                instance_id: endpoint.instance_id.clone(),
                primary_ip,
                gateway: gw,
                state,
                env,
                daemon: None,
            });
        }
        for host in &host_configs {
            let eni = &testbed.server.as_ref().expect("started above").names.hosts[&host.name];
            let netns = Netns::create(&format!("{}-", host.name))?;
            let ip = fabric.add_host(&vpc_model.lock().expect("vpc lock"), eni, &netns.name)?;
            let (mut tcp, mut udp) = (Vec::new(), Vec::new());
            for (is_udp, port) in host.served()? {
                let at = SocketAddr::from((ip, port));
                if is_udp {
                    udp.push(
                        netns
                            .run(move || probe::UdpEcho::bind(at))?
                            .map_err(|e| format!("host {}: serving udp/{port}: {e}", host.name))?,
                    );
                } else {
                    tcp.push(
                        netns
                            .run(move || probe::WhoAmI::bind(at))?
                            .map_err(|e| format!("host {}: serving tcp/{port}: {e}", host.name))?,
                    );
                }
            }
            testbed.hosts.push(Host {
                name: host.name.clone(),
                ip,
                netns,
                _tcp: tcp,
                _udp: udp,
            });
        }
        // The hosts' ENIs were made before any node ran: the fabric's security table takes them in
        // now rather than at the first EC2 change.
        fabric.follow(&vpc_model.lock().expect("vpc lock"));
        let errors = fabric.errors();
        if !errors.is_empty() {
            return Err(format!("fabric: {}", errors.join("; ")));
        }
        Ok(testbed)
    }

    /// Changes the VPC behind the CNI's back (someone else's API call, a console click); the
    /// fabric follows, as a real instance's NICs would.
    pub fn out_of_band<T>(&self, change: impl FnOnce(&mut simvpc::SimVpc) -> T) -> T {
        let model = self.vpc_model();
        let mut vpc = model.lock().expect("vpc lock");
        let result = change(&mut vpc);
        self.fabric.follow(&vpc);
        result
    }

    /// The simulated VPC's model, to check what EC2 holds.
    pub fn vpc_model(&self) -> Arc<std::sync::Mutex<simvpc::SimVpc>> {
        self.server.as_ref().expect("running").vpc.clone()
    }

    /// Sets one of the node's daemon settings for its next start.
    pub fn set_daemon_env(&mut self, node: usize, key: &str, value: &str) {
        let env = &mut self.nodes[node].env;
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.to_string()));
    }

    /// Starts the node's daemon inside the node's namespace and waits until it says it is ready.
    pub fn start_daemon(&mut self, node: usize) -> Result<Duration, String> {
        let started = Instant::now();
        self.spawn_daemon(node)?;
        self.wait_ready(node, Duration::from_secs(60))?;
        Ok(started.elapsed())
    }

    /// Starts the node's daemon inside the node's namespace without waiting for it.
    pub fn spawn_daemon(&mut self, node: usize) -> Result<(), String> {
        let n = &mut self.nodes[node];
        if n.daemon.is_some() {
            return Err(format!("{}: the daemon is already running", n.name));
        }
        let netns = std::fs::File::open(n.netns.path()).map_err(|e| e.to_string())?;
        let out = std::fs::File::create(n.state.join("ipamd.out")).map_err(|e| e.to_string())?;
        let mut command = Command::new(&self.binaries.ipamd);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(n.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out);
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&netns);
        let unprivileged = self.unprivileged;
        // SAFETY: setns, unshare, mount and prctl are async-signal-safe system calls on memory
        // the child owns, and `netns` stays open until the child has spawned.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if unprivileged {
                    contain()?;
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("{}: {e}", self.binaries.ipamd.display()))?;
        n.daemon = Some(child);
        Ok(())
    }

    /// Waits until every node's daemon has the API server's last change of `resource` in force:
    /// its rules in the kernel and the established flows it denies cut (`cutVersions` in
    /// /v1/network-policy).
    pub fn wait_policy_in_force(&self, resource: &str, patience: Duration) -> Result<(), String> {
        self.wait_policy(resource, PolicyStage::FlowsCut, patience)
    }

    /// Waits until every node's daemon has taken the API server's last change of `resource` as far
    /// as `stage`.
    pub fn wait_policy(
        &self,
        resource: &str,
        stage: PolicyStage,
        patience: Duration,
    ) -> Result<(), String> {
        let api = self.kube.as_ref().ok_or("no Kubernetes API server")?;
        let version = api.version_of(resource);
        let deadline = Instant::now() + patience;
        let field = match stage {
            PolicyStage::Rules => "appliedVersions",
            PolicyStage::FlowsCut => "cutVersions",
        };
        for node in &self.nodes {
            loop {
                let view = node.introspect("/v1/network-policy")?;
                if view[field][resource].as_u64().unwrap_or(0) >= version {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{}: the change of {resource} (resourceVersion {version}) not in {field} within {} s: {view}",
                        node.name,
                        patience.as_secs()
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }

    /// Runs `vpc-ipamd --init-node` in the node's namespace with the daemon's environment and full
    /// privileges, as the DaemonSet's init container does, and waits for it.
    pub fn init_node(&self, node: usize) -> Result<(), String> {
        let n = &self.nodes[node];
        let mut command = Command::new(&self.binaries.ipamd);
        command
            .arg("--init-node")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(n.env.iter().map(|(k, v)| (k, v)));
        let output = n
            .netns
            .run(move || command.output())?
            .map_err(|e| format!("vpc-ipamd --init-node: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "vpc-ipamd --init-node exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(())
    }

    /// Waits until the node's daemon says it is ready; an exit or the deadline is an error with
    /// the end of its log.
    pub fn wait_ready(&mut self, node: usize, patience: Duration) -> Result<(), String> {
        let n = &mut self.nodes[node];
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = n.daemon.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                n.daemon = None;
                let out = std::fs::read_to_string(n.state.join("ipamd.out")).unwrap_or_default();
                return Err(format!(
                    "{}: vpc-ipamd exited with {status}:\n{out}\n{}",
                    n.name,
                    n.log_tail(20)
                ));
            }
            if let Ok(proto::Reply::Status { ready: true, .. }) = n.status() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: vpc-ipamd not ready after {} s:\n{}",
                    n.name,
                    patience.as_secs(),
                    n.log_tail(30)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the node's daemon; with `Stop::Term` waits for it to exit by itself.
    pub fn stop_daemon(&mut self, node: usize, how: Stop) -> Result<(), String> {
        let n = &mut self.nodes[node];
        let Some(mut child) = n.daemon.take() else {
            return Ok(());
        };
        match how {
            Stop::Kill => {
                let _ = child.kill();
                let _ = child.wait();
                Ok(())
            }
            Stop::Term => {
                // SAFETY: the pid is our child's, which has not been reaped yet.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match child.try_wait() {
                        Ok(Some(status)) if status.success() => return Ok(()),
                        Ok(Some(status)) => {
                            return Err(format!(
                                "{}: vpc-ipamd exited with {status} on SIGTERM",
                                n.name
                            ))
                        }
                        _ if Instant::now() > deadline => {
                            let _ = child.kill();
                            let _ = child.wait();
                            return Err(format!(
                                "{}: vpc-ipamd did not stop within 30 s of SIGTERM",
                                n.name
                            ));
                        }
                        _ => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }
        }
    }

    /// The network configuration a runtime would pass; `prevResult` for DEL, as runtimes do.
    pub fn conf(&self, node: usize, prev: Option<&Value>) -> Value {
        let n = &self.nodes[node];
        let mut conf = json!({
            "cniVersion": "1.1.0",
            "name": NETWORK,
            "type": "vpc-cni",
            "vethPrefix": "eni",
            "mtu": "9001",
            "ipamdSocket": n.socket().display().to_string(),
            "pluginLogFile": n.state.join("plugin.log").display().to_string(),
        });
        if self.ipv6 {
            conf["enableIPv6"] = true.into();
        }
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        conf
    }

    /// Runs the plugin as a runtime does: in the node's namespace, the CNI environment only.
    pub fn run_plugin(
        &self,
        node: usize,
        command: &str,
        container_id: &str,
        (namespace, pod): (&str, &str),
        netns: &Path,
        conf: &Value,
    ) -> Result<(i32, String), String> {
        let n = &self.nodes[node];
        let ns = std::fs::File::open(n.netns.path()).map_err(|e| e.to_string())?;
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container_id}"
        );
        let mut cmd = Command::new(&self.binaries.plugin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&ns);
        // SAFETY: as in start_daemon.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("{}: {e}", self.binaries.plugin.display()))?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(conf.to_string().as_bytes())
            .map_err(|e| e.to_string())?;
        let output = child.wait_with_output().map_err(|e| e.to_string())?;
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        ))
    }

    /// A new pod namespace wired by the plugin on `node`.
    pub fn add_pod(&self, node: usize) -> Result<Pod, String> {
        self.add_pod_labelled(node, &[])
    }

    /// A new pod with these labels: the Pod object carries them from before the ADD (as the
    /// scheduler's does) and its address after (as the kubelet reports it).
    pub fn add_pod_labelled(&self, node: usize, labels: &[(&str, &str)]) -> Result<Pod, String> {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let n = self.next_pod.fetch_add(1, Ordering::SeqCst);
        self.add_pod_object(
            node,
            POD_NAMESPACE,
            &format!("pod-{n}"),
            json!({"labels": labels}),
            json!({}),
        )
    }

    /// A new pod `namespace/name` whose Pod object has `metadata` (labels, ...) and `spec`
    /// (containers and their ports, ...) besides what the testbed sets.
    pub fn add_pod_object(
        &self,
        node: usize,
        namespace: &str,
        name: &str,
        metadata: Value,
        spec: Value,
    ) -> Result<Pod, String> {
        let n = self.next_sandbox.fetch_add(1, Ordering::SeqCst);
        let name = name.to_string();
        let netns = Netns::create("pod")?;
        let container_id = format!("{:032x}{n:08x}", std::process::id());
        let mut object = json!({"metadata": metadata, "spec": spec});
        object["metadata"]["namespace"] = json!(namespace);
        object["metadata"]["name"] = json!(name);
        object["spec"]["nodeName"] = json!(self.nodes[node].name);
        // The scheduler's part: the pod exists, bound to the node, before the kubelet runs it.
        if let Some(api) = &self.kube {
            api.apply("pods", object.clone());
        }
        let conf = self.conf(node, None);
        let (code, stdout) = self.run_plugin(
            node,
            "ADD",
            &container_id,
            (namespace, &name),
            &netns.path(),
            &conf,
        )?;
        if code != 0 {
            return Err(format!(
                "ADD {name} on {}: exit {code}: {stdout}",
                self.nodes[node].name
            ));
        }
        let result: Value =
            serde_json::from_str(&stdout).map_err(|e| format!("ADD result: {e}: {stdout}"))?;
        let ip: IpAddr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("ADD result without an address: {stdout}"))?;
        let egress_v4 = if ip.is_ipv6() {
            egress_address(&netns)
        } else {
            None
        };
        if let Some(api) = &self.kube {
            object["status"] = json!({"podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]});
            api.apply("pods", object);
        }
        Ok(Pod {
            namespace: namespace.to_string(),
            name,
            node,
            netns,
            container_id,
            ip,
            egress_v4,
            result,
        })
    }

    /// DEL through the plugin; the pod's namespace goes away after, as the runtime does.
    pub fn del_pod(&self, pod: Pod) -> Result<(), String> {
        let (code, stdout) = self.run_plugin(
            pod.node,
            "DEL",
            &pod.container_id,
            (&pod.namespace, &pod.name),
            &pod.netns.path(),
            &self.conf(pod.node, Some(&pod.result)),
        )?;
        if code != 0 {
            return Err(format!("DEL {}: exit {code}: {stdout}", pod.name));
        }
        if let Some(api) = &self.kube {
            api.delete("pods", &pod.namespace, &pod.name);
        }
        // A branch pod's DEL removed its VLAN link, which the next pod on the branch needs.
        self.fabric.restore_vlan_links()
    }

    /// CNI GC as containerd 2 runs it: every attachment of the network not in `valid` is collected.
    pub fn gc(&self, node: usize, valid: &[&Pod]) -> Result<(), String> {
        let mut conf = self.conf(node, None);
        conf["cni.dev/valid-attachments"] = valid
            .iter()
            .map(|p| json!({"containerID": p.container_id, "ifname": "eth0"}))
            .collect();
        let (code, stdout) =
            self.run_plugin(node, "GC", "", (POD_NAMESPACE, ""), Path::new(""), &conf)?;
        if code != 0 {
            return Err(format!("GC: exit {code}: {stdout}"));
        }
        Ok(())
    }

    /// Sends SIGTERM and returns at once: the daemon drains (DEL still served) before it exits.
    pub fn terminate(&self, node: usize) {
        if let Some(pid) = self.nodes[node].daemon_pid() {
            // SAFETY: the pid is our child's, which has not been reaped yet.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }

    /// SIGKILL from a shared reference (to race it against plugin calls); `stop_daemon` reaps it.
    pub fn kill(&self, node: usize) {
        if let Some(pid) = self.nodes[node].daemon_pid() {
            // SAFETY: as in `terminate`.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }

    /// Connects from `from` to `to:port` (where a `probe::WhoAmI` listens) and returns the source
    /// address the far end saw.
    pub fn seen_as(
        &self,
        from: &Netns,
        to: impl Into<IpAddr>,
        port: u16,
    ) -> Result<IpAddr, String> {
        let target = SocketAddr::from((to.into(), port));
        from.run(move || probe::seen_as(target))?
    }
}

/// The IPv4 address on a pod's `v4if0`; none without the link (egress off).
fn egress_address(pod: &Netns) -> Option<Ipv4Addr> {
    let listing = netns::ip(&[
        "-n",
        &pod.name,
        "-4",
        "-o",
        "addr",
        "show",
        datapath::pod::EGRESS_IFNAME,
    ])
    .ok()?;
    listing
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.daemon.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(server) = self.server.take() {
            server.stop();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// In the child, before exec: what a container that is not privileged gets. /proc/sys read-only in
/// a mount namespace of its own, and a bounding set of NET_ADMIN and NET_RAW only (a root process
/// that execs keeps no capability outside it).
fn contain() -> std::io::Result<()> {
    let check = |r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let sys = c"/proc/sys";
    // SAFETY: plain system calls with NUL-terminated paths that outlive them.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            sys.as_ptr(),
            sys.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            std::ptr::null(),
            sys.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        ))?;
        // linux/capability.h: CAP_NET_ADMIN 12, CAP_NET_RAW 13.
        for cap in 0..64 {
            if cap == 12 || cap == 13 {
                continue;
            }
            // Past the kernel's last capability the call fails with EINVAL: done.
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                break;
            }
        }
    }
    Ok(())
}
