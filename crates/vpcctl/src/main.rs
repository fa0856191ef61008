#[cfg(test)]
mod deploy_check;
mod inspect;
mod install;
#[cfg(feature = "lab")]
mod lab;

use clap::{Parser, Subcommand};
use ipam::limits;
use ipam::maxpods::{max_pods, MaxPodsOptions};
use std::process::ExitCode;

#[cfg(feature = "lab")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Operator tools for vpc-cni-rs.
#[derive(Parser)]
#[command(name = "vpcctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The max-pods value for an instance type, as upstream's calculator computes it.
    MaxPods {
        instance_type: String,
        #[arg(long)]
        prefix_delegation: bool,
        #[arg(long)]
        custom_networking: bool,
        /// Count at most this many ENIs (MAX_ENI).
        #[arg(long)]
        max_eni: Option<u32>,
        /// Do not apply the 110/250 ceiling (upstream's --show-max-allowed; eni-max-pods.txt is uncapped).
        #[arg(long)]
        show_max_allowed: bool,
        /// IPv6 pods (ENABLE_IPv6): counted as prefix delegation counts them.
        #[arg(long)]
        ipv6: bool,
        #[arg(long)]
        json: bool,
    },
    #[cfg(feature = "lab")]
    #[command(flatten)]
    Lab(lab::Command),
    /// Planning tools.
    Plan {
        #[command(subcommand)]
        command: PlanCommand,
    },
    /// The daemon's state, from its introspection endpoint.
    Status(inspect::Target),
    /// The node's ENIs and their addresses.
    Enis(inspect::Target),
    /// The pods that hold an address.
    Pods(inspect::Target),
    /// The daemon's Prometheus metrics.
    Metrics(inspect::MetricsTarget),
    /// What the NetworkPolicies of this node's pods allow, by policy (ENABLE_NETWORK_POLICY).
    Netpol(inspect::NetpolTarget),
    /// Run by the DaemonSet: copy the plugin to the host, wait for the daemon, write the conflist.
    Install {
        /// The plugin binary to install.
        #[arg(long, default_value = "/app/vpc-cni")]
        plugin: std::path::PathBuf,
        /// Where the image keeps the reference plugins chained after ours (loopback, portmap,
        /// bandwidth, tuning), installed beside it.
        #[arg(long, default_value = "/app/cni")]
        chained_from: std::path::PathBuf,
        #[arg(long, env = "HOST_CNI_BIN_PATH", default_value = "/host/opt/cni/bin")]
        bin_dir: std::path::PathBuf,
        #[arg(
            long,
            env = "HOST_CNI_CONFDIR_PATH",
            default_value = "/host/etc/cni/net.d"
        )]
        conf_dir: std::path::PathBuf,
        #[arg(long, env = "VPC_CNI_IPAMD_SOCKET", default_value = proto::DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
        /// How long to wait for the daemon to become ready.
        #[arg(long, default_value_t = 300)]
        wait_seconds: u64,
        /// Keep running once installed (a DaemonSet container that exits is restarted).
        #[arg(long)]
        stay: bool,
    },
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Node and pod subnets per AZ for a node group, with the arithmetic (docs/plan.md).
    Subnets {
        #[arg(long)]
        pods_per_node: u32,
        #[arg(long)]
        nodes_per_az: u32,
        /// Multiplies the nodes per AZ (room to grow).
        #[arg(long, default_value_t = 1.0)]
        growth: f64,
        #[arg(long, default_value_t = 3)]
        azs: u32,
        /// The VPC's CIDR blocks (repeat for secondary ones).
        #[arg(long = "vpc-cidr", required = true)]
        vpc_cidrs: Vec<ipam::Ipv4Cidr>,
        /// secondary-ips, prefix-delegation, custom-networking, custom-networking-prefixes or ipv6.
        #[arg(long, default_value = "secondary-ips")]
        mode: String,
        #[arg(long, default_value = "m5.large")]
        instance_type: String,
        /// Share of /28s kept free for fragmentation under prefix delegation.
        #[arg(long, default_value_t = 0.15)]
        fragmentation_headroom: f64,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vpcctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        #[cfg(feature = "lab")]
        Command::Lab(command) => lab::run(command),
        Command::Plan {
            command:
                PlanCommand::Subnets {
                    pods_per_node,
                    nodes_per_az,
                    growth,
                    azs,
                    vpc_cidrs,
                    mode,
                    instance_type,
                    fragmentation_headroom,
                    json,
                },
        } => {
            use ipam::plan::{plan, Mode, PlanInput};
            let mode = match mode.as_str() {
                "secondary-ips" => Mode::SecondaryIps,
                "prefix-delegation" => Mode::PrefixDelegation,
                "custom-networking" => Mode::CustomNetworking { prefixes: false },
                "custom-networking-prefixes" => Mode::CustomNetworking { prefixes: true },
                "ipv6" => Mode::Ipv6,
                other => return Err(format!("--mode {other:?}: expected secondary-ips, prefix-delegation, custom-networking, custom-networking-prefixes or ipv6")),
            };
            let limits = limits::lookup(&instance_type)
                .ok_or_else(|| format!("unknown instance type {instance_type:?}"))?;
            let input = PlanInput {
                pods_per_node,
                nodes_per_az,
                growth,
                azs,
                vpc_cidrs,
                mode,
                instance_type,
                fragmentation_headroom,
            };
            let p = plan(&input, limits).map_err(|e| e.to_string())?;
            if json {
                print_json(&p);
                return Ok(());
            }
            println!("max pods per node in this mode: {}", p.max_pods);
            for step in &p.arithmetic {
                println!("  {step}");
            }
            for az in &p.azs {
                let subnets: Vec<String> = az
                    .subnets
                    .iter()
                    .map(|(role, cidr)| format!("{role} {cidr}"))
                    .collect();
                let v6 = p
                    .ipv6_subnet_prefix_len
                    .map(|len| format!(" (each with a /{len} of the VPC's IPv6 block)"))
                    .unwrap_or_default();
                println!("AZ {}: {}{v6}", az.az + 1, subnets.join(", "));
            }
            Ok(())
        }
        Command::Status(target) => inspect::status(&target),
        Command::Enis(target) => inspect::enis(&target),
        Command::Pods(target) => inspect::pods(&target),
        Command::Metrics(target) => inspect::metrics(&target),
        Command::Netpol(args) => inspect::netpol(&args),
        Command::Install {
            plugin,
            chained_from,
            bin_dir,
            conf_dir,
            socket,
            wait_seconds,
            stay,
        } => {
            let written = install::run(
                &install::Install {
                    plugin,
                    chained_from,
                    bin_dir,
                    conf_dir,
                    socket,
                    wait: std::time::Duration::from_secs(wait_seconds),
                },
                &|k| std::env::var(k).ok(),
            )?;
            println!("installed; wrote {written}");
            if stay {
                loop {
                    std::thread::park();
                }
            }
            Ok(())
        }
        Command::MaxPods {
            instance_type,
            prefix_delegation,
            custom_networking,
            max_eni,
            show_max_allowed,
            ipv6,
            json,
        } => {
            let Some(lim) = limits::lookup(&instance_type) else {
                let close = limits::suggest(&instance_type);
                let hint = if close.is_empty() {
                    String::new()
                } else {
                    format!("; did you mean {}?", close.join(", "))
                };
                return Err(format!("unknown instance type {instance_type:?}{hint}"));
            };
            let opts = MaxPodsOptions {
                prefix_delegation,
                custom_networking,
                max_eni,
                uncapped: show_max_allowed,
                ipv6,
            };
            if let Some(why) = ipam::maxpods::ipv6_refusal(&instance_type, lim, opts) {
                return Err(why);
            }
            let n = max_pods(lim, opts);
            if json {
                let v = serde_json::json!({
                    "instanceType": instance_type,
                    "maxPods": n,
                    "enis": lim.enis(),
                    "ipv4PerEni": lim.ipv4_per_eni,
                    "vcpus": lim.vcpus,
                    "prefixDelegation": prefix_delegation && lim.supports_prefixes(),
                    "prefixDelegationSupported": lim.supports_prefixes(),
                    "customNetworking": custom_networking,
                    "ipv6": ipv6,
                    "capped": !show_max_allowed,
                });
                println!("{v}");
            } else {
                if prefix_delegation && !lim.supports_prefixes() {
                    eprintln!("note: {instance_type} is not a Nitro instance: prefix delegation falls back to secondary IPs");
                }
                println!("{n}");
            }
            Ok(())
        }
    }
}

pub(crate) fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("plans and reports serialise")
    );
}
