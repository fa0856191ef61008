//! The laboratory: the simulator, the tuner, the simulated VPC as a service and the local demo. Behind
//! the default feature `lab`, so that the `vpcctl` the DaemonSet runs as its installer
//! (`--no-default-features`) links neither the simulator nor the testbed.

use crate::print_json;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use sim::{Cluster, Scenario};
use std::time::Instant;

#[derive(Subcommand)]
pub enum Command {
    /// Replays pod churn through the real pool engine against the simulated VPC.
    Simulate {
        #[command(flatten)]
        source: Source,
        /// With --from-cluster: print the scenario built (the file format of --scenario, to edit
        /// and run again) and what was left out, instead of running it.
        #[arg(long, requires = "from_cluster")]
        print_scenario: bool,
        #[arg(long)]
        json: bool,
        /// Write the report's plots here, each as SVG and PNG: addresses.*, ec2-calls.*, add-waits.*
        /// (and compare-held.* with --compare).
        #[arg(long)]
        plots: Option<std::path::PathBuf>,
        /// Also run with these settings laid over the scenario's (NAME=VALUE,NAME=VALUE; repeat for
        /// more runs) and report all runs side by side.
        #[arg(long, value_parser = sim::tune::parse_settings)]
        compare: Vec<std::collections::BTreeMap<String, String>>,
    },
    /// Searches warm-pool settings for a scenario: the Pareto front of addresses held, p99 ADD wait and
    /// EC2 calls, and the setting that meets --max-p99-wait (and --max-ec2-calls) with the fewest
    /// addresses held.
    Tune {
        #[command(flatten)]
        source: Source,
        /// The p99 ADD wait to meet: 2s, 500ms, or plain milliseconds.
        #[arg(long, default_value = "1s", value_parser = parse_millis)]
        max_p99_wait: f64,
        /// At most this many EC2 calls over the whole run (throttled ones included).
        #[arg(long)]
        max_ec2_calls: Option<u64>,
        /// At most this many EC2 calls per node and hour (throttled ones included): the trade-off
        /// between addresses held and EC2 calls, whatever the scenario's size.
        #[arg(long)]
        max_ec2_calls_per_node_hour: Option<f64>,
        /// Run every setting to the end, for the whole Pareto front: without it, a setting is stopped
        /// as soon as it breaks a bound (more throttled calls or unschedulable pods than the
        /// scenario's settings, more EC2 calls than allowed), which gives the same recommendation.
        #[arg(long)]
        exhaustive: bool,
        #[arg(long)]
        json: bool,
    },
    /// The simulated VPC as a service.
    Simvpc {
        #[command(subcommand)]
        command: SimvpcCommand,
    },
    /// The whole system on this machine (needs root): the simulated VPC over HTTP, node network
    /// namespaces whose ENIs are veth pairs, the real vpc-ipamd on each node, pods wired by the real
    /// plugin, traffic between them; everything is removed at the end.
    Demo {
        #[arg(long, default_value_t = 10)]
        pods: usize,
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        #[arg(long, default_value = "m5.large")]
        instance_type: String,
        #[arg(long)]
        prefix_delegation: bool,
        /// Pods in their own subnet (100.64.0.0/20) through an ENIConfig.
        #[arg(long)]
        custom_networking: bool,
        /// The simulated VPC from a file (docs/simvpc.md: subnets, instances and the ENIs they
        /// start with, security groups with rules, hosts); its instances are the nodes, a subnet
        /// named `pods` is custom networking's, its groups are enforced in the fabric.
        #[arg(long, value_name = "FILE")]
        vpc: Option<std::path::PathBuf>,
        /// A daemon setting, as in the DaemonSet's environment (repeatable): --set WARM_IP_TARGET=2.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        settings: Vec<String>,
        /// Leave everything running after the report, print the namespaces, and clean up on
        /// SIGINT or SIGTERM.
        #[arg(long)]
        keep: bool,
        /// The report as one JSON document on stdout (the narration goes to stderr).
        #[arg(long)]
        json: bool,
        /// IPv6 nodes and pods: the node subnet gets an IPv6 /64, each node a /80, each pod a /128
        /// and an IPv4 egress address (ENABLE_IPv6, ENABLE_V4_EGRESS).
        #[arg(long)]
        ipv6: bool,
        /// The NetworkPolicy bench (docs/network-policy.md): Namespaces, Pods and NetworkPolicies
        /// from this multi-document YAML, the policies enforced by the daemons through the API
        /// server, every ordered pair of pods probed on every `--probe` (and with --vpc, every pod
        /// to every host of the file, as vpc/<name>); prints the matrix.
        #[arg(long, value_name = "FILE")]
        manifests: Option<std::path::PathBuf>,
        /// With --manifests: what to probe, as tcp/80,udp/53,sctp/80 (every pod serves these and
        /// its container ports).
        #[arg(long, default_value = "tcp/80", requires = "manifests")]
        probe: String,
    },
}

/// Where a scenario comes from: a file, a running cluster, or a built-in.
#[derive(clap::Args)]
pub struct Source {
    /// A scenario file (docs/simulate.md); without it, the built-in scenario named by --built-in.
    #[arg(long, conflicts_with = "from_cluster")]
    scenario: Option<String>,
    /// steady, prefix-fragmented, launch-storm-500 or churn-day-1000.
    #[arg(long, default_value = "steady")]
    built_in: String,
    /// A scenario of the cluster the kubeconfig points at (KUBECONFIG, else ~/.kube/config): its
    /// nodes by instance type and zone, its pods per node and their mean age as their lifetime,
    /// and the VPC CNI's settings from its DaemonSet and the amazon-vpc-cni ConfigMap.
    #[arg(long)]
    from_cluster: bool,
    /// With --from-cluster: the VPC CNI's DaemonSet, as NAMESPACE/NAME (default: kube-system/aws-node,
    /// else kube-system/vpc-cni).
    #[arg(long, requires = "from_cluster", value_name = "NAMESPACE/NAME")]
    daemonset: Option<String>,
    /// With --from-cluster: the simulated hours.
    #[arg(long, requires = "from_cluster", default_value_t = 24)]
    hours: u64,
}

/// A scenario built from a cluster: its text (the file format) and what the cluster's shape left out.
struct Built {
    text: String,
    notes: Vec<String>,
}

impl Source {
    fn load(self) -> Result<(Scenario, Option<Built>), String> {
        if !self.from_cluster {
            return load_scenario(self.scenario, &self.built_in).map(|s| (s, None));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let shape = runtime
            .block_on(k8s::shape::read_shape(self.daemonset.as_deref()))
            .map_err(|e| e.to_string())?;
        let nodes: Vec<sim::scenario::SeenNode> = shape
            .nodes
            .iter()
            .map(|n| sim::scenario::SeenNode {
                instance_type: n.instance_type.clone(),
                zone: n.zone.clone(),
                pods: n.pods,
            })
            .collect();
        let (text, more) =
            sim::scenario::from_cluster(&nodes, &shape.pod_ages_secs, &shape.settings, self.hours)
                .map_err(|e| e.to_string())?;
        let mut notes = vec![format!("settings from the DaemonSet {}", shape.daemonset)];
        notes.extend(shape.notes);
        notes.extend(more);
        let scenario = Scenario::parse(&text).map_err(|e| e.to_string())?;
        Ok((scenario, Some(Built { text, notes })))
    }
}

#[derive(Subcommand)]
pub enum SimvpcCommand {
    /// Serves EC2's Query API and each instance's IMDSv2 until stopped.
    Serve {
        /// Where EC2 listens; each instance's IMDS gets a port of its own at the same address.
        #[arg(long, default_value = "127.0.0.1:4566")]
        listen: std::net::SocketAddr,
        /// The VPC, subnets and instances (docs/simvpc.md); without it, one m5.large node.
        #[arg(long)]
        config: Option<String>,
    },
}

pub fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Demo {
            pods,
            nodes,
            instance_type,
            prefix_delegation,
            custom_networking,
            vpc,
            settings,
            keep,
            json,
            ipv6,
            manifests,
            probe,
        } => {
            if nodes == 0 {
                return Err("--nodes must be at least 1".into());
            }
            if let Some(path) = manifests {
                if ipv6 || custom_networking || keep {
                    return Err(
                        "--manifests runs the NetworkPolicy bench on IPv4 nodes: drop --ipv6, --custom-networking and --keep"
                            .into(),
                    );
                }
                let vpc = match vpc {
                    Some(_) if nodes != 1 => {
                        return Err("--nodes: with --vpc the nodes are the file's instances".into())
                    }
                    Some(path) => Some(read_vpc(&path).map_err(|e| format!("--vpc {e}"))?),
                    None => None,
                };
                return policy_bench(&path, &probe, nodes, vpc, json);
            }
            let vpc = match vpc {
                Some(path) => Some(read_vpc(&path).map_err(|e| format!("--vpc {e}"))?),
                None => None,
            };
            let settings = settings
                .iter()
                .map(|s| match s.split_once('=') {
                    Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                    _ => Err(format!("--set {s:?}: expected KEY=VALUE")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            // A setting the daemon would refuse is refused here, before any namespace exists, with
            // what the flags set (as the testbed sets them) before the --set values.
            let mut effective: Vec<(String, String)> = Vec::new();
            if ipv6 {
                for (k, v) in [
                    ("ENABLE_IPv6", "true"),
                    ("ENABLE_IPv4", "false"),
                    ("ENABLE_PREFIX_DELEGATION", "true"),
                ] {
                    effective.push((k.into(), v.into()));
                }
            }
            if custom_networking {
                effective.push(("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG".into(), "true".into()));
            }
            effective.extend(settings.iter().cloned());
            ipam::Config::from_lookup(|k| {
                effective
                    .iter()
                    .rev()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
            })
            .and_then(|c| c.unsupported_by_daemon().map(|()| c))
            .map_err(|e| format!("--set: {e}"))
            .and_then(|c| {
                // A pod's groups come from SecurityGroupPolicies, which only --manifests gives.
                if c.pod_eni {
                    Err(
                        "--set: ENABLE_POD_ENI=true: security groups for pods come from \
                         SecurityGroupPolicies; give them with --manifests (the nodes then make \
                         their own branch ENIs; docs/security-groups-for-pods.md)"
                            .to_string(),
                    )
                } else {
                    Ok(())
                }
            })?;
            let binaries = testbed::Binaries::locate()?;
            let options = testbed::demo::DemoOptions {
                nodes,
                pods,
                instance_type,
                prefix_delegation,
                custom_networking,
                vpc,
                settings,
                keep,
                ipv6,
            };
            let mut print_json = |report: &testbed::demo::DemoReport| {
                if json {
                    println!("{}", report.to_json());
                }
            };
            let report = if json {
                testbed::demo::run(&options, binaries, &mut std::io::stderr(), &mut print_json)?
            } else {
                testbed::demo::run(&options, binaries, &mut std::io::stdout(), &mut print_json)?
            };
            if report.connected() {
                Ok(())
            } else {
                Err("some connections failed (see above)".into())
            }
        }
        Command::Simvpc {
            command: SimvpcCommand::Serve { listen, config },
        } => {
            let config = match config {
                Some(path) => read_vpc(std::path::Path::new(&path))?,
                None => simvpc_http::ServeConfig::example(),
            };
            let running = simvpc_http::Server::start(&config, listen)?;
            // One JSON line that scripts and the demo read, then serve until killed.
            let instances: Vec<_> = running
                .instances
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "name": i.name, "instance_id": i.instance_id, "imds": i.imds_url,
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "ec2": running.ec2_url,
                    "subnets": running.names.subnets,
                    "instances": instances,
                })
            );
            loop {
                std::thread::park();
            }
        }
        Command::Tune {
            source,
            max_p99_wait,
            max_ec2_calls,
            max_ec2_calls_per_node_hour,
            exhaustive,
            json,
        } => {
            let (scenario, built) = source.load()?;
            print_notes(built.as_ref());
            let bounds = sim::tune::Bounds {
                max_p99_wait_ms: max_p99_wait,
                max_ec2_calls,
                max_ec2_calls_per_node_hour,
            };
            let bar = progress_bar(json, "{bar:30} {pos}/{len} runs ({elapsed})");
            let progress = |done: usize, total: usize| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            };
            let search = if exhaustive {
                sim::tune::Search::Exhaustive
            } else {
                sim::tune::Search::Fast
            };
            let report = sim::tune::tune(&scenario, bounds, search, threads(), &progress)?;
            bar.finish_and_clear();
            if json {
                print_json(&report);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        Command::Simulate {
            source,
            print_scenario,
            json,
            plots,
            compare,
        } => {
            let (scenario, built) = source.load()?;
            if print_scenario {
                if let Some(built) = &built {
                    for note in &built.notes {
                        println!("# {note}");
                    }
                    print!("{}", built.text);
                }
                return Ok(());
            }
            print_notes(built.as_ref());
            if !compare.is_empty() {
                return simulate_compare(&scenario, compare, json, plots.as_deref());
            }
            let bar = progress_bar(json, "{bar:30} {pos}/{len} simulated seconds ({elapsed})");
            bar.set_length(scenario.duration_secs);
            let duration = scenario.duration_secs as f64;
            let mut progress = |done: f64| bar.set_position((done * duration) as u64);
            let started = Instant::now();
            let report = Cluster::new(scenario)?.run_with_progress(&mut progress)?;
            bar.finish_and_clear();
            let wall = started.elapsed();
            if let Some(dir) = &plots {
                write_plots(dir, &report)?;
            }
            if json {
                print_json(&report);
            } else {
                print!("{}", report.render());
                println!(
                    "\nsimulated in {:.2} s of wall time: {:.0} pod events per second",
                    wall.as_secs_f64(),
                    report.pod_events as f64 / wall.as_secs_f64()
                );
            }
            Ok(())
        }
    }
}

/// What a scenario built from a cluster left out, on standard error so `--json` stays one document.
fn print_notes(built: Option<&Built>) {
    for note in built.map(|b| b.notes.as_slice()).unwrap_or_default() {
        eprintln!("from the cluster: {note}");
    }
}

/// A simulated VPC's file (docs/simvpc.md); errors name the file.
fn read_vpc(path: &std::path::Path) -> Result<simvpc_http::ServeConfig, String> {
    std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|text| simvpc_http::ServeConfig::parse(&text))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A progress bar on standard error (indicatif draws it only on a terminal, at most 20 times a
/// second), or none with `--json`.
fn progress_bar(json: bool, template: &str) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template(template).expect("the templates are valid"));
    bar
}

/// The simulator runs of tune and compare, one per core.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn load_scenario(path: Option<String>, built_in: &str) -> Result<Scenario, String> {
    match path {
        Some(path) => Scenario::load(std::path::Path::new(&path)),
        None => Scenario::built_in(built_in).ok_or_else(|| {
            let names: Vec<_> = Scenario::built_in_names().collect();
            format!(
                "no built-in scenario {built_in:?} (there are: {})",
                names.join(", ")
            )
        }),
    }
}

/// "2s", "500ms" or "750" (milliseconds) as milliseconds.
fn parse_millis(text: &str) -> Result<f64, String> {
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (text, 1.0)
    };
    match number.trim().parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(v * scale),
        _ => Err(format!(
            "{text:?} is not a duration (write 2s, 500ms or a number of milliseconds)"
        )),
    }
}

fn simulate_compare(
    scenario: &Scenario,
    sets: Vec<std::collections::BTreeMap<String, String>>,
    json: bool,
    plots: Option<&std::path::Path>,
) -> Result<(), String> {
    let (outcomes, reports) = sim::tune::compare(scenario, sets, threads())?;
    if let Some(dir) = plots {
        write_plots(dir, &reports[0])?;
        let runs: Vec<(String, &sim::Report)> =
            outcomes.iter().map(|o| o.label()).zip(&reports).collect();
        write_charts(
            dir,
            vec![("compare-held", sim::plot::comparison(&scenario.name, &runs))],
        )?;
    }
    if json {
        let runs: Vec<_> = outcomes
            .iter()
            .zip(&reports)
            .map(|(o, r)| serde_json::json!({ "outcome": o, "report": r }))
            .collect();
        print_json(&runs);
    } else {
        print!(
            "{}",
            sim::tune::render_comparison(&scenario.name, &outcomes)
        );
    }
    Ok(())
}

fn write_plots(dir: &std::path::Path, report: &sim::Report) -> Result<(), String> {
    write_charts(dir, sim::plot::charts(report))
}

fn write_charts(
    dir: &std::path::Path,
    charts: Vec<(&str, sim::plot::Chart)>,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (name, chart) in charts {
        for (ext, bytes) in [("svg", chart.svg().into_bytes()), ("png", chart.png())] {
            let path = dir.join(format!("{name}.{ext}"));
            std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// `vpcctl demo --manifests FILE --probe ...`: the NetworkPolicy bench.
fn policy_bench(
    path: &std::path::Path,
    probes: &str,
    nodes: usize,
    vpc: Option<simvpc_http::ServeConfig>,
    json: bool,
) -> Result<(), String> {
    use testbed::policy_bench::{matrix, parse_probes, to_json, Bench, Manifests};
    let probes = parse_probes(probes)?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let manifests = Manifests::from_yaml(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let binaries = testbed::Binaries::locate()?;
    let nodes = vpc.as_ref().map_or(nodes, |v| v.instances.len());
    eprintln!(
        "{} namespaces, {} pods, {} policies, {} security group policies on {nodes} node(s); probing {}",
        manifests.namespaces.len(),
        manifests.pods.len(),
        manifests.policies.len(),
        manifests.security_group_policies.len(),
        probes
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut bench = Bench::start(&manifests, &probes, nodes, vpc, Vec::new(), binaries)?;
    let outcome = bench
        .set_policies(&manifests.policies)
        .map(|()| bench.probe(&probes));
    let ids: Vec<String> = bench.pods().map(|(spec, _)| spec.id()).collect();
    let servers = bench.servers();
    let stopped = bench.stop();
    let outcomes = outcome?;
    stopped?;
    if json {
        println!("{}", to_json(&outcomes));
    } else {
        println!("policies in force on every node; + connected, - not, . the pod itself (rows: clients, columns: servers)");
        for probe in &probes {
            println!("\n{}", matrix(&outcomes, *probe, &ids, &servers));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_millis;

    #[test]
    fn waits_are_read_in_the_units_written() {
        assert_eq!(parse_millis("2s"), Ok(2000.0));
        assert_eq!(parse_millis("1.5s"), Ok(1500.0));
        assert_eq!(parse_millis("500ms"), Ok(500.0));
        assert_eq!(parse_millis("750"), Ok(750.0));
        for bad in ["", "fast", "-1s", "2m", "NaNs"] {
            let e = parse_millis(bad).unwrap_err();
            assert!(e.contains("not a duration"), "{bad}: {e}");
        }
    }
}
