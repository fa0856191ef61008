//! `vpc-ipamd`: initialises the node, then serves the plugin's socket, introspection and metrics
//! until SIGTERM.

#![forbid(unsafe_code)]

use clap::Parser;
use ipam::config::Config;
use ipam::config_map::{self, ClusterSettings};
use ipam::pool::EniConfigSpec;
use ipam::settings::PoolSettings;
use ipamd::control::{Event, SettingsView};
use ipamd::introspect;
use ipamd::log::{self, Level};
use ipamd::metrics::Metrics;
use ipamd::settings::Environment;
use ipamd::startup;
use ipamd::store::Store;
use k8s::Cluster;
use proto::Listener;
use serde::Deserialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(name = "vpc-ipamd", version, about = "The vpc-cni-rs node daemon")]
struct Args {
    /// The plugin's socket.
    #[arg(long, env = "VPC_CNI_IPAMD_SOCKET", default_value = proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Prometheus metrics and the health probes.
    #[arg(
        long,
        env = "VPC_CNI_METRICS_BIND_ADDRESS",
        default_value = "0.0.0.0:61678"
    )]
    metrics_bind: String,
    /// Without Kubernetes: the ENIConfig for custom networking, as JSON
    /// `{"subnet": "subnet-...", "securityGroups": ["sg-..."]}` (the ENIConfig CRD's spec).
    #[arg(long, env = "VPC_CNI_ENICONFIG_FILE")]
    eni_config: Option<PathBuf>,
    /// In a cluster: this node's name (the DaemonSet sets it from `spec.nodeName`).
    #[arg(long, env = "MY_NODE_NAME")]
    node_name: Option<String>,
    /// In a cluster: this daemon's pod in `kube-system`, which its Warning Events are about.
    #[arg(long, env = "MY_POD_NAME")]
    pod_name: Option<String>,
    /// In a cluster: how long a pod may be missing from the API server before the address it was
    /// given is released (the kubelet never sent DEL).
    #[arg(long, env = "VPC_CNI_VANISHED_POD_GRACE_SECONDS", default_value_t = 60)]
    vanished_pod_grace_seconds: u64,
    /// The plugin socket of the daemon this one takes over from (upstream's aws-node): start-up
    /// waits while it answers. Empty: not checked.
    #[arg(
        long,
        env = "VPC_CNI_PREDECESSOR_SOCKET",
        default_value = "/var/run/aws-node/ipamd.sock"
    )]
    predecessor_socket: String,
    /// The predecessor's gRPC address; start-up waits while it answers. Empty: not checked.
    #[arg(
        long,
        env = "VPC_CNI_PREDECESSOR_GRPC",
        default_value = "127.0.0.1:50051"
    )]
    predecessor_grpc: String,
    /// How often the pool and the SNAT table are compared with IMDS (addresses or ENIs changed
    /// out of band, a VPC CIDR added); EC2 is asked only about what differs.
    #[arg(long, env = "VPC_CNI_RECONCILE_SECONDS", default_value_t = 60)]
    reconcile_seconds: u64,
    /// The ConfigMap in kube-system whose kebab-case keys set the daemon's settings, live
    /// (docs/configuration.md); empty: none. On EKS `amazon-vpc-cni` also carries the VPC resource
    /// controller's Windows settings, under the same key names.
    #[arg(long, env = "VPC_CNI_CONFIG_MAP", default_value = config_map::NAME)]
    config_map: String,
    /// Set the node's sysctls and exit: the DaemonSet's privileged init container, so that the
    /// daemon's own container runs with NET_ADMIN and NET_RAW alone (docs/deployment.md).
    #[arg(long)]
    init_node: bool,
    /// `json` for one JSON object per log line.
    #[arg(long, env = "VPC_CNI_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EniConfigFile {
    subnet: String,
    #[serde(default)]
    security_groups: Vec<String>,
}

fn read_eni_config(path: &PathBuf) -> Result<EniConfigSpec, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: EniConfigFile =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if !file.subnet.starts_with("subnet-") {
        return Err(format!(
            "{}: subnet {:?} is not a subnet id",
            path.display(),
            file.subnet
        ));
    }
    Ok(EniConfigSpec {
        subnet: file.subnet,
        security_groups: file.security_groups,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let environment: Environment = Arc::new(std::env::vars().collect());
    let config = match Config::from_lookup(|k| environment.get(k).cloned())
        .and_then(|c| c.unsupported_by_daemon().map(|()| c))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vpc-ipamd: {e}");
            report_refused_settings(&args, &e.to_string());
            return ExitCode::from(2);
        }
    };
    let level = match Level::parse(&config.log_level) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vpc-ipamd: {e}");
            return ExitCode::from(2);
        }
    };
    let json = args.log_format == "json";
    if let Err(e) = log::init(level, json, config.log_file.as_deref()) {
        eprintln!("vpc-ipamd: log file: {e}");
        return ExitCode::from(2);
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        // The release the DaemonSet says it runs (upstream's manifest sets it too).
        VPC_CNI_VERSION = %config.vpc_cni_version,
        "vpc-ipamd starting"
    );
    for warning in &config.warnings {
        tracing::warn!(what = %warning, "setting corrected");
    }
    let eni_config = match &args.eni_config {
        Some(path) => match read_eni_config(path) {
            Ok(spec) => Some((path.display().to_string(), spec)),
            Err(e) => {
                eprintln!("vpc-ipamd: ENIConfig {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if args.init_node {
        let strict_branches =
            config.pod_eni && config.pod_sg_enforcing_mode == ipam::config::SgEnforcingMode::Strict;
        return match runtime.block_on(startup::init_node(config.ipv6, strict_branches)) {
            Ok(link) => {
                tracing::info!(primary = %link, ipv6 = %config.ipv6, "node sysctls set");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "node initialisation failed");
                eprintln!("vpc-ipamd --init-node: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(run(args, config, environment, eni_config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "vpc-ipamd failed");
            eprintln!("vpc-ipamd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Settings refused at start (a typo, a conflict such as ENABLE_IPv6 with ENABLE_IPv4) keep the node
/// not ready with the daemon restarting; a `StartFailed` Warning Event on the daemon's pod says why
/// where `kubectl describe` shows it. Best effort, bounded: the configuration that would name a
/// custom API endpoint is the one that did not parse, so the in-cluster default is used.
fn report_refused_settings(args: &Args, message: &str) {
    if !k8s::in_cluster(|k| std::env::var(k).ok().filter(|v| !v.is_empty())) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let message = format!("vpc-ipamd refused its settings: {message}");
    let sent = runtime.block_on(async {
        let cluster = Cluster::connect(k8s::ClusterSettings {
            node_name: args.node_name.clone().unwrap_or_default(),
            own_pod: args.pod_name.clone().filter(|p| !p.is_empty()),
            endpoint: None,
            eni_config_annotation: String::new(),
            eni_config_label: String::new(),
        })
        .await
        .map_err(|e| e.to_string())?;
        tokio::time::timeout(
            Duration::from_secs(5),
            cluster.warn_now("StartFailed", &message),
        )
        .await
        .unwrap_or_else(|_| Err("the API server did not answer in 5 s".into()))
    });
    if let Err(why) = sent {
        eprintln!("vpc-ipamd: could not send the StartFailed Event: {why}");
    }
}

/// Security groups for pods: the SecurityGroupsForPods feature on this node's CNINode, so that the
/// VPC resource controller attaches a trunk ENI; tried until it takes (the controller makes the
/// CNINode when the node joins), with one Warning Event while it does not.
async fn ask_for_a_trunk(cluster: Arc<Cluster>) {
    let added = until_it_takes(|tries| {
        let cluster = cluster.clone();
        async move {
            let result = cluster.enable_security_groups_for_pods().await;
            if let Err(e) = &result {
                tracing::warn!(error = %e, "CNINode");
                if tries == 0 {
                    if let Err(why) = cluster
                        .warn_now("SecurityGroupsForPods", &e.to_string())
                        .await
                    {
                        tracing::warn!(error = %why, "could not send the Event");
                    }
                }
            }
            result
        }
    })
    .await;
    tracing::info!(added, "CNINode has SecurityGroupsForPods");
}

/// The API server's answer to a write the node needs once (its CNINode's feature, its Node's
/// capacity), tried again after each failure with the one backoff, 1 s growing to 30 s.
async fn until_it_takes<T, E, F>(mut attempt: impl FnMut(u32) -> F) -> T
where
    F: std::future::Future<Output = Result<T, E>>,
{
    const RETRY: ipam::pacing::Backoff =
        ipam::pacing::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut tries = 0;
    loop {
        if let Ok(done) = attempt(tries).await {
            return done;
        }
        tokio::time::sleep(RETRY.ceiling(tries)).await;
        tries += 1;
    }
}

/// Where the node makes its branches: their number on the Node (`vpc.amazonaws.com/pod-eni`), as
/// EKS's controller advertises it; tried until it takes. None on a type without a trunk.
async fn advertise_branches(cluster: Arc<Cluster>, branches: u32) {
    if branches == 0 {
        return;
    }
    until_it_takes(|_| {
        let cluster = cluster.clone();
        async move {
            let result = cluster.advertise_branch_capacity(branches).await;
            if let Err(e) = &result {
                tracing::warn!(error = %e, "advertising the node's branch capacity");
            }
            result
        }
    })
    .await;
    tracing::info!(branches, "pod-eni capacity advertised on the Node");
}

/// The API server when the environment places the daemon in a cluster, and whether it answered.
/// It must answer before start-up goes on when custom networking reads the ENIConfig from it;
/// otherwise the daemon starts without it after 30 s and its watches keep trying.
async fn connect_cluster(
    args: &Args,
    config: &Config,
    needed: bool,
) -> Result<Option<(Arc<Cluster>, bool)>, String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if !k8s::in_cluster(env) {
        tracing::info!(
            "standalone: no Kubernetes API (neither KUBERNETES_SERVICE_HOST nor KUBECONFIG)"
        );
        return Ok(None);
    }
    let cluster = Cluster::connect(k8s::ClusterSettings {
        node_name: args.node_name.clone().unwrap_or_default(),
        own_pod: args.pod_name.clone().filter(|p| !p.is_empty()),
        endpoint: config.cluster_endpoint.clone().filter(|e| !e.is_empty()),
        eni_config_annotation: config.eni_config_annotation.clone(),
        eni_config_label: config.eni_config_label.clone(),
    })
    .await
    .map_err(|e| e.to_string())?;
    let patience = (!needed).then_some(Duration::from_secs(30));
    match cluster.wait_reachable(patience).await {
        Ok(()) => Ok(Some((Arc::new(cluster), true))),
        Err(e) => {
            tracing::warn!(error = %e, "starting without the API server; maxPods from the instance type");
            Ok(Some((Arc::new(cluster), false)))
        }
    }
}

async fn run(
    args: Args,
    config: Config,
    environment: Environment,
    file_eni_config: Option<(String, EniConfigSpec)>,
) -> Result<(), String> {
    let metrics = Arc::new(Metrics::default());
    let mut config = config;
    let mut cluster = connect_cluster(
        &args,
        &config,
        config.custom_networking && file_eni_config.is_none(),
    )
    .await?;
    let mut settings_view = SettingsView::default();
    let mut at_start = ClusterSettings::default();
    let mut said = Vec::new();
    let config_map_name = args.config_map.trim().to_string();
    if let (Some((c, true)), false) = (&cluster, config_map_name.is_empty()) {
        let before = (
            config.eni_config_label.clone(),
            config.eni_config_annotation.clone(),
        );
        let c = c.clone();
        (config, settings_view, at_start, said) =
            ipamd::settings::from_cluster(&c, &config_map_name, config, &environment).await;
        // The ConfigMap may name another ENIConfig label or annotation: the client reads them.
        if before
            != (
                config.eni_config_label.clone(),
                config.eni_config_annotation.clone(),
            )
        {
            cluster = connect_cluster(&args, &config, true).await?;
        }
    }
    let config = Arc::new(config);
    let eni_config_from_cluster = config.custom_networking && file_eni_config.is_none();
    let mut kubelet = None;
    let mut eni_config = file_eni_config.map(|(source, spec)| (source, Ok(spec)));
    if let Some((cluster, true)) = &cluster {
        let node = cluster.node().await.map_err(|e| e.to_string())?;
        if eni_config_from_cluster {
            let selection = cluster
                .eni_config(&node.eni_config_name)
                .await
                .map_err(|e| e.to_string())?;
            eni_config = Some((format!("ENIConfig/{}", selection.name), selection.spec));
        }
        kubelet = Some(node);
    }
    let store = Store::new(&config.backing_store);
    let predecessor = startup::Predecessor {
        socket: Some(PathBuf::from(&args.predecessor_socket)).filter(|p| !p.as_os_str().is_empty()),
        grpc: match args.predecessor_grpc.as_str() {
            "" => None,
            text => Some(
                text.parse()
                    .map_err(|e| format!("VPC_CNI_PREDECESSOR_GRPC={text:?}: {e}"))?,
            ),
        },
    };
    let initialising = std::time::Instant::now();
    let started = match startup::start(
        &config,
        eni_config
            .as_ref()
            .and_then(|(_, spec)| spec.as_ref().ok().cloned()),
        kubelet,
        &predecessor,
        store,
        metrics.clone(),
    )
    .await
    {
        Ok(started) => started,
        Err(e) => {
            // The node stays not ready (no conflist is written without a running daemon); the
            // Event says why where `kubectl describe` shows it, not only in this pod's log.
            if let Some((cluster, true)) = &cluster {
                let sent = tokio::time::timeout(
                    Duration::from_secs(5),
                    cluster.warn_now("StartFailed", &e.to_string()),
                )
                .await
                .unwrap_or_else(|_| Err("the API server did not answer in 5 s".into()));
                if let Err(why) = sent {
                    tracing::warn!(error = %why, "could not send the StartFailed Event");
                }
            }
            return Err(e.to_string());
        }
    };
    metrics.node_initialized(initialising.elapsed());
    let events = started.events.clone();
    if let Some((source, spec)) = eni_config {
        let _ = events.send(Event::EniConfig { source, spec });
    }
    let mut control = started.control;
    if let (Some((cluster, _)), false) = (&cluster, config_map_name.is_empty()) {
        let _ = events.send(Event::Settings {
            pool: PoolSettings::from_config(&config),
            view: settings_view,
        });
        tokio::spawn(ipamd::settings::follow(
            cluster.clone(),
            config_map_name.clone(),
            events.clone(),
            environment.clone(),
            at_start,
            said,
        ));
    }
    let enforce = config.network_policy
        && config.network_policy_mode != ipam::config::NetworkPolicyMode::None;
    let mut network_policy = None;
    if enforce {
        let Some((cluster, _)) = &cluster else {
            return Err("ENABLE_NETWORK_POLICY=true needs the Kubernetes API server (in a cluster, or KUBECONFIG), where the NetworkPolicies are".into());
        };
        let strict = config.network_policy_mode == ipam::config::NetworkPolicyMode::Strict;
        let enforcer = ipamd::netpol::spawn(
            ipamd::netpol::Enforcement::new(strict, &config.veth_prefix),
            metrics.clone(),
        );
        let inputs = enforcer.clone();
        let cluster = cluster.clone();
        let input = config.network_policy_input;
        tokio::spawn(async move {
            let on_error = |e: String| tracing::warn!(error = %e, "NetworkPolicy watch");
            match input {
                ipam::config::NetworkPolicyInput::Cluster => {
                    cluster
                        .follow_network_policies(
                            |c, versions| {
                                let _ = inputs.send(ipamd::netpol::Input::Cluster(c, versions));
                            },
                            on_error,
                        )
                        .await
                }
                ipam::config::NetworkPolicyInput::PolicyEndpoints => {
                    cluster
                        .follow_policy_endpoints(
                            |endpoints, versions| {
                                let _ = inputs
                                    .send(ipamd::netpol::Input::Endpoints(endpoints, versions));
                            },
                            on_error,
                        )
                        .await
                }
            }
        });
        tracing::info!(mode = %if strict { "strict" } else { "standard" }, input = ?config.network_policy_input, "NetworkPolicy enforced");
        network_policy = Some(enforcer.clone());
        control = control.with_network_policy(enforcer);
    }
    if let Some((cluster, _)) = &cluster {
        let grace = Duration::from_secs(args.vanished_pod_grace_seconds);
        control = control.in_cluster(
            cluster.reporter(|e| tracing::warn!(error = %e, "Kubernetes Event")),
            grace,
        );
        follow_cluster(
            cluster.clone(),
            events.clone(),
            grace,
            eni_config_from_cluster,
        );
    }

    let branches = if config.pod_eni {
        let Some((cluster, _)) = &cluster else {
            return Err("ENABLE_POD_ENI=true needs the Kubernetes API server (in a cluster, or KUBECONFIG): a pod's security groups come from its SecurityGroupPolicies (POD_ENI_MANAGER=node), or its branch ENI from the VPC resource controller's annotation".into());
        };
        if config.node_makes_branches {
            let branches =
                node_branches(&config, &started.executor.ec2, &control, &started.identity).await?;
            let (annotate, mut to_annotate) = mpsc::unbounded_channel();
            control = control
                .with_node_branches(branches)
                .annotating_branches(annotate);
            tokio::spawn(advertise_branches(
                cluster.clone(),
                ipam::limits::branch_interfaces(&started.identity.instance_type),
            ));
            let annotator = cluster.clone();
            tokio::spawn(async move {
                while let Some(a) = to_annotate.recv().await {
                    let ipamd::control::BranchAnnotation {
                        namespace,
                        name,
                        value,
                    } = a;
                    if let Err(e) = annotator.annotate_pod_eni(&namespace, &name, &value).await {
                        tracing::warn!(error = %e, "pod annotation");
                    }
                }
            });
            Some(ipamd::branches::PodEniMode::Node(Arc::new(cluster.clone())))
        } else {
            tokio::spawn(ask_for_a_trunk(cluster.clone()));
            control = control.with_controller_branches();
            Some(ipamd::branches::PodEniMode::Controller(Arc::new(
                ipamd::branches::Branches::new(
                    Box::new(cluster.clone()),
                    Box::new(ipamd::branches::Ec2Trunk {
                        executor: started.executor.clone(),
                        instance_id: started.identity.instance_id.clone(),
                    }),
                    started.trunk_mac,
                    ipamd::branches::ANNOTATION_PATIENCE,
                ),
            )))
        }
    } else {
        None
    };
    let listener = Listener::bind(&args.socket)
        .map_err(|e| format!("plugin socket {}: {e}", args.socket.display()))?;
    ipamd::plugin_socket::spawn(listener, events.clone(), branches).map_err(|e| e.to_string())?;
    if !config.disable_introspection {
        let listener = tokio::net::TcpListener::bind(&config.introspection_bind)
            .await
            .map_err(|e| format!("introspection on {}: {e}", config.introspection_bind))?;
        let routes = introspect::introspection_routes(
            events.clone(),
            config.clone(),
            network_policy.clone(),
        );
        tokio::spawn(ipamd::http::serve(listener, routes));
    }
    if !config.disable_metrics {
        let listener = tokio::net::TcpListener::bind(&args.metrics_bind)
            .await
            .map_err(|e| format!("metrics on {}: {e}", args.metrics_bind))?;
        let routes = introspect::metrics_routes(events.clone(), metrics.clone(), network_policy);
        tokio::spawn(ipamd::http::serve(listener, routes));
    }
    if config.collects_leaked_enis() {
        tokio::spawn(collect_leaked_enis(
            started.executor.clone(),
            cloud::gc::LeakScan {
                vpc_id: started.vpc_id.clone(),
                cluster_name: Some(config.cluster_name.clone()).filter(|c| !c.is_empty()),
            },
        ));
    }
    tokio::spawn(read_imds_periodically(
        started.imds.clone(),
        events.clone(),
        started.identity.primary_mac.clone(),
        Duration::from_secs(args.reconcile_seconds.max(1)),
        metrics.clone(),
    ));
    tokio::spawn(forward_signals(events.clone()));
    tracing::info!(socket = %args.socket.display(), introspection = %config.introspection_bind, metrics = %args.metrics_bind, "serving");
    control.run(started.receiver).await;
    Ok(())
}

/// The node's own branch ENIs at start (`POD_ENI_MANAGER=node`): the file the last run saved, read
/// against the associations EC2 lists on the trunk. An unreadable file stops the start: guessing
/// which running pod has which branch could give one pod's address to another.
async fn node_branches(
    config: &Config,
    ec2: &impl cloud::Ec2,
    control: &ipamd::control::Control,
    identity: &cloud::identity::Identity,
) -> Result<ipamd::control::NodeBranches, String> {
    use ipam::branches::{BranchSettings, Branches, BRANCH_COOLDOWN};
    let store = Store::new(&config.backing_store);
    let saved = store.load_branches().map_err(|e| {
        format!("{e}: move it aside to start over (the branches of running pods then wait for their pods' next ADD)")
    })?;
    let trunk = control
        .pool()
        .enis()
        .iter()
        .find(|e| e.info.is_trunk)
        .map(|e| &e.info);
    let found = ipamd::branches::restore(ec2, trunk, &saved)
        .await
        .map_err(|e| format!("reading the trunk's branch ENIs: {e}"))?;
    for gone in &found.gone {
        tracing::warn!(branch = %gone.eni_id, vlan = %gone.vlan, pod = ?gone.pod.as_ref().map(|p| format!("{}/{}", p.namespace, p.name)), "a saved branch ENI is no longer on the trunk");
    }
    let limit = ipam::limits::branch_interfaces(&identity.instance_type);
    if limit == 0 {
        tracing::warn!(instance_type = %identity.instance_type, "this instance type cannot carry a trunk ENI: pods with security groups cannot start here");
    }
    let mut engine = Branches::new(BranchSettings {
        limit,
        warm_target: config.warm_branch_target,
        cooldown: BRANCH_COOLDOWN,
    });
    let now = ipamd::control::now();
    let mut pods = std::collections::HashMap::new();
    tracing::info!(given = %found.assigned.len(), warm = %found.warm.len(), gone = %found.gone.len(), "branch ENIs restored");
    for (key, meta, branch) in found.assigned {
        engine.restore(key.clone(), branch);
        pods.insert(key, meta);
    }
    for branch in found.warm {
        engine.adopt(branch, now);
    }
    Ok(ipamd::control::NodeBranches::new(engine, pods))
}

/// The watches that feed the control loop: the pods on this node (snapshots at least every half
/// grace period, so that a pod missing for the whole grace is seen twice) and, for custom
/// networking, the Node's ENIConfig selection.
fn follow_cluster(
    cluster: Arc<Cluster>,
    events: mpsc::UnboundedSender<Event>,
    grace: Duration,
    eni_config: bool,
) {
    let watch_error = |e: String| tracing::warn!(error = %e, "Kubernetes watch");
    {
        let (cluster, events) = (cluster.clone(), events.clone());
        tokio::spawn(async move {
            cluster
                .follow_node(
                    move |view| drop(events.send(Event::Node(view.clone()))),
                    watch_error,
                )
                .await
        });
    }
    {
        let (cluster, events) = (cluster.clone(), events.clone());
        tokio::spawn(async move {
            cluster
                .follow_pods(
                    (grace / 2).max(Duration::from_secs(1)),
                    move |snapshot| drop(events.send(Event::PodsOnNode(snapshot))),
                    watch_error,
                )
                .await
        });
    }
    if eni_config {
        tokio::spawn(async move {
            cluster
                .follow_eni_config(
                    move |selection| {
                        drop(events.send(Event::EniConfig {
                            source: format!("ENIConfig/{}", selection.name),
                            spec: selection.spec,
                        }))
                    },
                    watch_error,
                )
                .await
        });
    }
}

/// SIGTERM or SIGINT: drain; a second one: stop now.
async fn forward_signals(events: mpsc::UnboundedSender<Event>) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    let mut immediate = false;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = events.send(Event::Stop { immediate });
        immediate = true;
    }
}

/// At start (after a random delay, so that a fleet starting together does not scan at once) and
/// then hourly: ENIs this cluster's nodes created and left unattached (upstream-ipamd.md §3.4).
/// IMDS, read every `every` and handed to the control loop to compare with the pool.
async fn read_imds_periodically(
    client: cloud::identity::ImdsClient,
    events: mpsc::UnboundedSender<Event>,
    primary_mac: String,
    every: Duration,
    metrics: Arc<Metrics>,
) {
    loop {
        tokio::time::sleep(every).await;
        match cloud::identity::network(&client, &primary_mac).await {
            Ok(network) => {
                metrics.add("vpccni_imds_requests_total", &[], network.reads.into());
                if events.send(Event::Imds(network)).is_err() {
                    return;
                }
            }
            Err(e) => {
                metrics.count("awscni_reconcile_error_count", &[]);
                tracing::warn!(error = %e, "IMDS read for the reconcile")
            }
        }
    }
}

async fn collect_leaked_enis(executor: Arc<ipamd::executor::Executor>, scan: cloud::gc::LeakScan) {
    let first = Duration::from_millis(rand::random::<u64>() % 60_000);
    tokio::time::sleep(first).await;
    loop {
        match cloud::gc::collect_leaked_enis(&executor.ec2, &scan, std::time::SystemTime::now())
            .await
        {
            Ok(report) if !report.deleted.is_empty() || !report.tagged.is_empty() => {
                tracing::info!(deleted = %report.deleted.join(","), tagged = %report.tagged.join(","), "leaked ENIs")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "leaked-ENI scan"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
