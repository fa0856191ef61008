//! `vpc-ipamd`: initialises the node, then serves the plugin's socket, introspection and metrics
//! until SIGTERM.

use clap::Parser;
use ipam::config::Config;
use ipam::pool::EniConfigSpec;
use ipamd::control::Event;
use ipamd::introspect;
use ipamd::log::{self, Level};
use ipamd::metrics::Metrics;
use ipamd::startup;
use ipamd::store::Store;
use proto::{ErrorKind, Listener, Reply};
use serde::Deserialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

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
    let config = match Config::from_lookup(|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vpc-ipamd: {e}");
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
    // The file only when asked for: upstream's default path is a host mount that need not exist.
    let file = std::env::var("AWS_VPC_K8S_CNI_LOG_FILE")
        .ok()
        .filter(|f| !f.is_empty() && f != "stdout" && f != "stderr");
    if let Err(e) = log::init(level, json, file.as_deref()) {
        eprintln!("vpc-ipamd: log file: {e}");
        return ExitCode::from(2);
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
    match runtime.block_on(run(args, config, eni_config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error("vpc-ipamd failed", &[("error", &e)]);
            eprintln!("vpc-ipamd: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    args: Args,
    config: Config,
    eni_config: Option<(String, EniConfigSpec)>,
) -> Result<(), String> {
    let metrics = Arc::new(Metrics::default());
    let config = Arc::new(config);
    let store = Store::new(&config.backing_store);
    let started = startup::start(
        &config,
        eni_config.as_ref().map(|(_, spec)| spec.clone()),
        store,
        metrics.clone(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let events = started.events.clone();

    let listener = Listener::bind(&args.socket)
        .map_err(|e| format!("plugin socket {}: {e}", args.socket.display()))?;
    {
        let events = events.clone();
        std::thread::Builder::new()
            .name("plugin-socket".into())
            .spawn(move || accept_plugin_connections(listener, events))
            .map_err(|e| e.to_string())?;
    }
    if !config.disable_introspection {
        let listener = tokio::net::TcpListener::bind(&config.introspection_bind)
            .await
            .map_err(|e| format!("introspection on {}: {e}", config.introspection_bind))?;
        let routes = introspect::introspection_routes(events.clone(), config.clone(), eni_config);
        tokio::spawn(ipamd::http::serve(listener, routes));
    }
    if !config.disable_metrics {
        let listener = tokio::net::TcpListener::bind(&args.metrics_bind)
            .await
            .map_err(|e| format!("metrics on {}: {e}", args.metrics_bind))?;
        let routes = introspect::metrics_routes(events.clone(), metrics.clone());
        tokio::spawn(ipamd::http::serve(listener, routes));
    }
    if !config.disable_leaked_eni_cleanup {
        tokio::spawn(collect_leaked_enis(
            started.executor.clone(),
            cloud::gc::LeakScan {
                vpc_id: started.vpc_id.clone(),
                cluster_name: Some(config.cluster_name.clone()).filter(|c| !c.is_empty()),
            },
        ));
    }
    tokio::spawn(forward_signals(events.clone()));
    log::info(
        "serving",
        &[
            ("socket", &args.socket.display()),
            ("introspection", &config.introspection_bind),
            ("metrics", &args.metrics_bind),
        ],
    );
    started.control.run(started.receiver).await;
    Ok(())
}

/// One thread per plugin connection: each carries one short request, and the thread waits for
/// the control loop's answer.
fn accept_plugin_connections(listener: Listener, events: mpsc::UnboundedSender<Event>) {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                log::warn("plugin socket accept", &[("error", &e)]);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let events = events.clone();
        let _ = std::thread::Builder::new()
            .name("plugin-request".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = proto::serve_one(&stream, |request| {
                    let (reply, answer) = oneshot::channel();
                    if events.send(Event::Plugin { request, reply }).is_err() {
                        return Reply::Error {
                            kind: ErrorKind::Unavailable,
                            message: "vpc-ipamd is stopping".into(),
                        };
                    }
                    answer.blocking_recv().unwrap_or(Reply::Error {
                        kind: ErrorKind::Unavailable,
                        message: "vpc-ipamd is stopping".into(),
                    })
                });
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
async fn collect_leaked_enis(executor: Arc<ipamd::executor::Executor>, scan: cloud::gc::LeakScan) {
    let first = Duration::from_millis(rand::random::<u64>() % 60_000);
    tokio::time::sleep(first).await;
    loop {
        match cloud::gc::collect_leaked_enis(&executor.ec2, &scan, std::time::SystemTime::now())
            .await
        {
            Ok(report) if !report.deleted.is_empty() || !report.tagged.is_empty() => log::info(
                "leaked ENIs",
                &[
                    ("deleted", &report.deleted.join(",")),
                    ("tagged", &report.tagged.join(",")),
                ],
            ),
            Ok(_) => {}
            Err(e) => log::warn("leaked-ENI scan", &[("error", &e)]),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
