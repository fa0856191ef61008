//! `vpc-cni-metrics-helper`: every `--interval-seconds`, lists the vpc-ipamd pods through the API
//! server, scrapes each one's `/metrics` on its node's address, and publishes the cluster's
//! address inventory to CloudWatch (docs/observability.md). One replica per cluster.

#![forbid(unsafe_code)]

use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit};
use clap::Parser;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::Api;
use metrics_helper::{Aggregator, Datum, Totals, Unit, DIMENSION, NAMESPACE};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "vpc-cni-metrics-helper", version, about)]
struct Args {
    /// The value of the CLUSTER_ID dimension (upstream's variable): the cluster's name.
    #[arg(long, env = "AWS_CLUSTER_ID")]
    cluster_id: String,
    /// Where the daemons run, and the label that selects their pods (`app.kubernetes.io/name=vpc-cni`
    /// under the default overlay, `k8s-app=aws-node` under the aws-node one).
    #[arg(long, env = "VPC_CNI_NAMESPACE", default_value = "kube-system")]
    namespace: String,
    #[arg(long, env = "VPC_CNI_SELECTOR", default_value = "k8s-app=aws-node")]
    selector: String,
    /// The daemons' metrics port (host network: the pod's address is its node's).
    #[arg(long, env = "VPC_CNI_METRICS_PORT", default_value_t = 61678)]
    port: u16,
    #[arg(long, env = "METRICS_INTERVAL_SECONDS", default_value_t = 30)]
    interval_seconds: u64,
    /// Stop after this many rounds (0: never).
    #[arg(long, default_value_t = 0)]
    rounds: u64,
    /// Upstream's switch: false logs the data instead of publishing it.
    #[arg(long, env = "USE_CLOUDWATCH", default_value_t = true, action = clap::ArgAction::Set)]
    use_cloudwatch: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    if args.cluster_id.trim().is_empty() {
        eprintln!(
            "vpc-cni-metrics-helper: AWS_CLUSTER_ID is empty: it names the cluster in CloudWatch"
        );
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vpc-cni-metrics-helper: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("Kubernetes client configuration: {e}"))?;
    let pods: Api<Pod> = Api::namespaced(client, &args.namespace);
    // The region, credentials and any AWS_ENDPOINT_URL from the environment, IRSA included.
    let cloudwatch = aws_sdk_cloudwatch::Client::new(&aws_config::load_from_env().await);
    let mut aggregator = Aggregator::default();
    let mut round = 0;
    loop {
        round += 1;
        match scrape(&pods, &args).await {
            Ok(scrapes) => {
                let data = aggregator.round(&scrapes);
                if args.use_cloudwatch {
                    match publish(&cloudwatch, &args.cluster_id, &data).await {
                        Ok(()) => tracing::info!(
                            round,
                            nodes = scrapes.len(),
                            metrics = data.len(),
                            "published"
                        ),
                        Err(e) => tracing::error!(error = %e, "PutMetricData"),
                    }
                } else {
                    for d in &data {
                        tracing::info!(
                            metric = d.name,
                            value = d.value,
                            "not published (USE_CLOUDWATCH=false)"
                        );
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "listing the daemons' pods"),
        }
        if args.rounds != 0 && round >= args.rounds {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(args.interval_seconds.max(1))).await;
    }
}

/// Each running daemon's totals, by node; a daemon that does not answer is left out of the round.
async fn scrape(pods: &Api<Pod>, args: &Args) -> Result<BTreeMap<String, Totals>, String> {
    let listed = pods
        .list(&ListParams::default().labels(&args.selector))
        .await
        .map_err(|e| e.to_string())?;
    let mut asks = Vec::new();
    for pod in listed {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| name.clone());
        let Some(ip) = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok())
        else {
            continue;
        };
        let address = SocketAddr::new(ip, args.port);
        asks.push((
            node,
            tokio::task::spawn_blocking(move || proto::http_get(address, "/metrics")),
        ));
    }
    let mut scrapes = BTreeMap::new();
    for (node, ask) in asks {
        match ask.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok((200, text)) => match metrics_helper::parse(&text) {
                Ok(totals) => {
                    scrapes.insert(node, totals);
                }
                Err(e) => tracing::warn!(%node, error = %e, "the daemon's metrics do not parse"),
            },
            Ok((status, _)) => tracing::warn!(%node, status, "the daemon's /metrics"),
            Err(e) => tracing::warn!(%node, error = %e, "the daemon's /metrics"),
        }
    }
    Ok(scrapes)
}

async fn publish(
    cloudwatch: &aws_sdk_cloudwatch::Client,
    cluster_id: &str,
    data: &[Datum],
) -> Result<(), String> {
    let dimension = Dimension::builder()
        .name(DIMENSION)
        .value(cluster_id)
        .build();
    // PutMetricData takes at most 1,000 data per call; a round has fewer than 20.
    let data: Vec<MetricDatum> = data
        .iter()
        .map(|d| {
            MetricDatum::builder()
                .metric_name(d.name)
                .value(d.value)
                .unit(match d.unit {
                    Unit::Count => StandardUnit::Count,
                    Unit::Milliseconds => StandardUnit::Milliseconds,
                })
                .dimensions(dimension.clone())
                .build()
        })
        .collect();
    cloudwatch
        .put_metric_data()
        .namespace(NAMESPACE)
        .set_metric_data(Some(data))
        .send()
        .await
        .map(|_| ())
        .map_err(|e| aws_sdk_cloudwatch::error::DisplayErrorContext(e).to_string())
}
