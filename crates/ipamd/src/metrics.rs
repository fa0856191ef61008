//! Prometheus metrics: upstream's `awscni_*` names where upstream has the metric, `vpccni_*` for what
//! only this daemon measures (EC2 latency and throttles by operation, how long ADDs waited for an
//! address). Counters live here; pool gauges are read from the pool when scraped.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone, Debug, Default)]
pub struct Histogram {
    /// Observations at or below each of `BUCKETS`.
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, value: Duration) {
        let seconds = value.as_secs_f64();
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in BUCKETS.iter().enumerate() {
            let n = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

#[derive(Default)]
struct Inner {
    /// (metric, rendered labels) → value.
    counters: BTreeMap<(&'static str, String), u64>,
    ec2_latency: BTreeMap<String, Histogram>,
    /// Upstream's summary, without quantiles: (api, error, status) → (sum in ms, count).
    api_latency_ms: BTreeMap<String, (f64, u64)>,
    add_wait: Histogram,
    startup: Histogram,
    node_init: Histogram,
    pod_eni_allocation: Histogram,
    policy_apply: Histogram,
    flows_cut: Histogram,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// The pool as the gauges show it, read when scraped.
#[derive(Clone, Debug, Default)]
pub struct PoolGauges {
    pub enis: u32,
    pub total_addresses: u32,
    pub assigned_addresses: u32,
    pub prefixes: u32,
    pub eni_max: u32,
    pub ip_max: u32,
    pub assigned_per_eni: Vec<(String, u32)>,
    /// Per /32, /28 or (IPv6) /80 the pool holds, the addresses assigned from it.
    pub assigned_per_cidr: Vec<(String, u32)>,
    pub pending_adds: u32,
    /// Addresses released by pods and not yet given again (IP_COOLDOWN_PERIOD).
    pub cooling: u32,
    /// EC2 actions in flight, by upstream's name for the work (`increaseDatastorePool`, ...).
    pub in_progress: Vec<(&'static str, u32)>,
    pub ready: bool,
    /// Calls EC2 throttled (and the client retried), by operation, from the client's own tally.
    pub throttled: Vec<(&'static str, u64)>,
}

/// Counters: name, help, whether it carries labels (an unlabelled counter is shown at 0 before its
/// first event, so that rate() has a start).
const COUNTERS: &[(&str, &str, bool)] = &[
    (
        "awscni_add_ip_req_count",
        "ADD requests from the plugin",
        false,
    ),
    (
        "awscni_del_ip_req_count",
        "DEL requests from the plugin, by reason",
        true,
    ),
    (
        "awscni_no_available_ip_addresses",
        "ADDs that failed for lack of an address",
        false,
    ),
    (
        "awscni_force_removed_ips",
        "Addresses taken from pods because EC2 no longer had them",
        false,
    ),
    ("awscni_ec2api_req_count", "EC2 requests by operation", true),
    (
        "awscni_ec2api_error_count",
        "EC2 requests that failed, by operation",
        true,
    ),
    (
        "awscni_aws_api_error_count",
        "EC2 errors by operation and error code",
        true,
    ),
    (
        "awscni_ipamd_error_count",
        "Internal errors by function",
        true,
    ),
    (
        "awscni_ip_allocation_total",
        "Addresses given to pods (each ADD served with an address)",
        false,
    ),
    (
        "awscni_eni_allocation_error_count",
        "ENIs that could not be created or attached",
        false,
    ),
    (
        "awscni_force_removed_enis",
        "ENIs gone from the node (detached out of band) while pods had addresses on them",
        false,
    ),
    (
        "awscni_reconcile_count",
        "Differences with IMDS acted on, by upstream's function (eniReconcileAdd, eniReconcileDel, eniIPPoolReconcileDel)",
        true,
    ),
    (
        "awscni_reconcile_error_count",
        "Periodic reconciles that failed (IMDS unreadable, the SNAT table not applied)",
        false,
    ),
    (
        "awscni_connmark_reconcile_total",
        "SNAT and connmark table applications, by result",
        true,
    ),
    (
        "awscni_aws_utils_error_count",
        "Node-side errors around EC2 work (an ENI's link not set up), by function and error",
        true,
    ),
    (
        "awscni_pod_eni_error_count",
        "Errors for pod ENIs (security groups for pods are not built: none yet)",
        true,
    ),
    (
        "vpccni_imds_requests_total",
        "IMDS requests of the periodic reconcile",
        false,
    ),
    (
        "vpccni_reconcile_findings_total",
        "Differences between the pool and IMDS acted on, by kind (addresses, detached, foreign)",
        true,
    ),
    (
        "vpccni_vanished_pod_releases_total",
        "Addresses released because their pod left the API server without a DEL",
        false,
    ),
    (
        "vpccni_ec2_throttled_total",
        "EC2 calls throttled and retried, by operation",
        true,
    ),
];

impl Metrics {
    pub fn count(&self, metric: &'static str, labels: &[(&str, &str)]) {
        self.add(metric, labels, 1);
    }

    pub fn add(&self, metric: &'static str, labels: &[(&str, &str)], n: u64) {
        let labels = render_labels(labels);
        let mut inner = self.lock();
        *inner.counters.entry((metric, labels)).or_default() += n;
    }

    pub fn ec2_call(&self, operation: &str, took: Duration, error_code: Option<&str>) {
        let mut inner = self.lock();
        inner
            .ec2_latency
            .entry(operation.to_string())
            .or_default()
            .observe(took);
        let key = render_labels(&[("fn", operation)]);
        *inner
            .counters
            .entry(("awscni_ec2api_req_count", key.clone()))
            .or_default() += 1;
        let summary = render_labels(&[
            ("api", operation),
            (
                "error",
                if error_code.is_some() {
                    "true"
                } else {
                    "false"
                },
            ),
            ("status", error_code.unwrap_or("200")),
        ]);
        let entry = inner.api_latency_ms.entry(summary).or_default();
        entry.0 += took.as_secs_f64() * 1000.0;
        entry.1 += 1;
        if let Some(code) = error_code {
            *inner
                .counters
                .entry(("awscni_ec2api_error_count", key))
                .or_default() += 1;
            let detail = render_labels(&[("api", operation), ("error", code)]);
            *inner
                .counters
                .entry(("awscni_aws_api_error_count", detail))
                .or_default() += 1;
        }
    }

    pub fn add_waited(&self, waited: Duration) {
        self.lock().add_wait.observe(waited);
    }

    /// A NetworkPolicy change (or a pod's rules) in the kernel, from the event to the end of the
    /// nft transaction.
    pub fn policy_applied(&self, took: Duration) {
        self.lock().policy_apply.observe(took);
    }

    pub fn flows_cut(&self, took: Duration) {
        self.lock().flows_cut.observe(took);
    }

    pub fn started(&self, took: Duration) {
        self.lock().startup.observe(took);
    }

    /// The node's initialisation (identity, ENIs, checkpoint, host set-up), as upstream's nodeInit.
    pub fn node_initialized(&self, took: Duration) {
        self.lock().node_init.observe(took);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The Prometheus text format.
    pub fn render(&self, pool: &PoolGauges) -> String {
        let inner = self.lock();
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, value: u32| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            &mut out,
            "awscni_eni_allocated",
            "ENIs in the pool",
            pool.enis,
        );
        gauge(
            &mut out,
            "awscni_total_ip_addresses",
            "Addresses in the pool",
            pool.total_addresses,
        );
        gauge(
            &mut out,
            "awscni_assigned_ip_addresses",
            "Addresses assigned to pods",
            pool.assigned_addresses,
        );
        gauge(
            &mut out,
            "awscni_total_ipv4_prefixes",
            "/28 prefixes in the pool",
            pool.prefixes,
        );
        gauge(
            &mut out,
            "awscni_eni_max",
            "ENIs this node may use",
            pool.eni_max,
        );
        gauge(
            &mut out,
            "awscni_ip_max",
            "Addresses this node may hold",
            pool.ip_max,
        );
        gauge(
            &mut out,
            "awscni_ip_cooldown_queue_size",
            "Addresses released by pods and cooling down before reuse",
            pool.cooling,
        );
        let _ = writeln!(
            out,
            "# HELP awscni_connmark_backend The backend of the SNAT and connmark rules (1 for the one in use)\n# TYPE awscni_connmark_backend gauge\nawscni_connmark_backend{{backend=\"nftables\"}} 1"
        );
        let _ = writeln!(
            out,
            "# HELP awscni_ipamd_action_inprogress EC2 work in flight, by upstream's function\n# TYPE awscni_ipamd_action_inprogress gauge"
        );
        for (function, n) in &pool.in_progress {
            let _ = writeln!(
                out,
                "awscni_ipamd_action_inprogress{{fn=\"{function}\"}} {n}"
            );
        }
        gauge(
            &mut out,
            "vpccni_pending_adds",
            "ADDs waiting for an address",
            pool.pending_adds,
        );
        gauge(
            &mut out,
            "vpccni_ready",
            "1 once the node is initialised",
            pool.ready as u32,
        );
        let _ = writeln!(
            out,
            "# HELP awscni_assigned_ip_per_eni Addresses assigned to pods per ENI\n# TYPE awscni_assigned_ip_per_eni gauge"
        );
        for (eni, n) in &pool.assigned_per_eni {
            let _ = writeln!(out, "awscni_assigned_ip_per_eni{{eni=\"{eni}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP awscni_assigned_ip_per_cidr Addresses assigned to pods per CIDR (secondary /32, /28 prefix, or IPv6 /80)\n# TYPE awscni_assigned_ip_per_cidr gauge"
        );
        for (cidr, n) in &pool.assigned_per_cidr {
            let _ = writeln!(out, "awscni_assigned_ip_per_cidr{{cidr=\"{cidr}\"}} {n}");
        }
        for (name, help, labelled) in COUNTERS {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let mut any = false;
            for ((metric, labels), value) in &inner.counters {
                if metric == name {
                    any = true;
                    if labels.is_empty() {
                        let _ = writeln!(out, "{name} {value}");
                    } else {
                        let _ = writeln!(out, "{name}{{{labels}}} {value}");
                    }
                }
            }
            if !any && !labelled {
                let _ = writeln!(out, "{name} 0");
            }
        }
        let _ = writeln!(
            out,
            "# HELP vpccni_ec2_throttled_total EC2 calls throttled and retried, by operation\n# TYPE vpccni_ec2_throttled_total counter"
        );
        for (operation, n) in &pool.throttled {
            let _ = writeln!(
                out,
                "vpccni_ec2_throttled_total{{operation=\"{operation}\"}} {n}"
            );
        }
        let ec2: Vec<(String, &Histogram)> = inner
            .ec2_latency
            .iter()
            .map(|(operation, h)| (render_labels(&[("operation", operation)]), h))
            .collect();
        let ec2: Vec<(&str, &Histogram)> = ec2.iter().map(|(l, h)| (l.as_str(), *h)).collect();
        for (name, help, series) in [
            (
                "vpccni_ec2_call_duration_seconds",
                "EC2 call latency by operation, pacing and retries included",
                ec2,
            ),
            (
                "vpccni_add_wait_seconds",
                "How long ADDs waited for an address",
                vec![("", &inner.add_wait)],
            ),
            (
                "awscni_ipamd_startup_duration_seconds",
                "Time from start to Ready",
                vec![("success=\"true\"", &inner.startup)],
            ),
            (
                "awscni_ipamd_node_initialization_duration_seconds",
                "Time to initialise the node (identity, ENIs, checkpoint, host)",
                vec![("success=\"true\"", &inner.node_init)],
            ),
            (
                "awscni_pod_eni_allocation_duration_seconds",
                "Time to give a pod its branch ENI (security groups for pods are not built: no observations yet)",
                vec![("", &inner.pod_eni_allocation)],
            ),
            (
                "vpccni_network_policy_apply_seconds",
                "From a NetworkPolicy, namespace or pod change (or a new pod) to its rules in the kernel",
                vec![("", &inner.policy_apply)],
            ),
            (
                "vpccni_network_policy_flows_cut_seconds",
                "From a change that narrows pods' policies to their established flows it denies cut (conntrack entries removed)",
                vec![("", &inner.flows_cut)],
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (labels, histogram) in series {
                histogram.render(&mut out, name, labels);
            }
        }
        let _ = writeln!(
            out,
            "# HELP awscni_aws_api_latency_ms EC2 call latency in milliseconds, by operation, whether it failed and its status (200 or the error code)\n# TYPE awscni_aws_api_latency_ms summary"
        );
        for (labels, (sum, count)) in &inner.api_latency_ms {
            let _ = writeln!(out, "awscni_aws_api_latency_ms_sum{{{labels}}} {sum}");
            let _ = writeln!(out, "awscni_aws_api_latency_ms_count{{{labels}}} {count}");
        }
        let _ = writeln!(
            out,
            "# HELP awscni_build_info Build information\n# TYPE awscni_build_info gauge\nawscni_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out
    }
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_histograms_and_gauges_render_in_the_text_format() {
        let m = Metrics::default();
        m.count("awscni_add_ip_req_count", &[]);
        m.count("awscni_del_ip_req_count", &[("reason", "PodDeleted")]);
        m.ec2_call("AssignPrivateIpAddresses", Duration::from_millis(30), None);
        m.ec2_call(
            "CreateNetworkInterface",
            Duration::from_millis(200),
            Some("InsufficientFreeAddressesInSubnet"),
        );
        m.add_waited(Duration::from_millis(3));
        let text = m.render(&PoolGauges {
            enis: 2,
            assigned_per_eni: vec![("eni-1".into(), 4)],
            assigned_per_cidr: vec![("2600:1f14::/80".into(), 7)],
            throttled: vec![("CreateNetworkInterface", 3)],
            cooling: 2,
            in_progress: vec![("increaseDatastorePool", 1)],
            ..PoolGauges::default()
        });
        for line in [
            "awscni_eni_allocated 2",
            "awscni_add_ip_req_count 1",
            "awscni_del_ip_req_count{reason=\"PodDeleted\"} 1",
            "awscni_ec2api_req_count{fn=\"AssignPrivateIpAddresses\"} 1",
            "awscni_ec2api_error_count{fn=\"CreateNetworkInterface\"} 1",
            "awscni_aws_api_error_count{api=\"CreateNetworkInterface\",error=\"InsufficientFreeAddressesInSubnet\"} 1",
            "awscni_assigned_ip_per_eni{eni=\"eni-1\"} 4",
            "awscni_assigned_ip_per_cidr{cidr=\"2600:1f14::/80\"} 7",
            "vpccni_ec2_call_duration_seconds_bucket{operation=\"AssignPrivateIpAddresses\",le=\"0.05\"} 1",
            "vpccni_ec2_call_duration_seconds_bucket{operation=\"AssignPrivateIpAddresses\",le=\"0.025\"} 0",
            "vpccni_add_wait_seconds_bucket{le=\"0.005\"} 1",
            "vpccni_add_wait_seconds_count 1",
            "awscni_no_available_ip_addresses 0",
            "vpccni_ec2_throttled_total{operation=\"CreateNetworkInterface\"} 3",
            "awscni_aws_api_latency_ms_count{api=\"CreateNetworkInterface\",error=\"true\",status=\"InsufficientFreeAddressesInSubnet\"} 1",
            "awscni_aws_api_latency_ms_sum{api=\"AssignPrivateIpAddresses\",error=\"false\",status=\"200\"} 30",
            "awscni_ipamd_action_inprogress{fn=\"increaseDatastorePool\"} 1",
            "awscni_ip_cooldown_queue_size 2",
            "awscni_connmark_backend{backend=\"nftables\"} 1",
            "awscni_pod_eni_allocation_duration_seconds_count 0",
            "awscni_ip_allocation_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
