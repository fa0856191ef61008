//! The address inventory of a cluster, from the metrics of every vpc-ipamd, as upstream's
//! cni-metrics-helper publishes it to CloudWatch (namespace `Kubernetes`, dimension `CLUSTER_ID`,
//! upstream's metric names), so that alarms on it are set as the seeds ask.
//!
//! Pure: a scrape's text in, the round's data out. Gauges are summed over the nodes; counters are
//! published as what they grew by since the previous round, per node (a daemon that restarted
//! counts from zero again; a node seen for the first time gives its baseline, so that a restarted
//! helper does not publish a node's whole history as one spike); EC2 latency as the highest mean
//! over the round among the nodes.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

pub const NAMESPACE: &str = "Kubernetes";
pub const DIMENSION: &str = "CLUSTER_ID";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

/// CloudWatch name, the daemon's metric, and how it aggregates.
pub const PUBLISHED: &[(&str, &str, Kind)] = &[
    ("eniAllocated", "awscni_eni_allocated", Kind::Gauge),
    ("eniMaxAvailable", "awscni_eni_max", Kind::Gauge),
    ("maxIPAddresses", "awscni_ip_max", Kind::Gauge),
    ("totalIPAddresses", "awscni_total_ip_addresses", Kind::Gauge),
    (
        "assignIPAddresses",
        "awscni_assigned_ip_addresses",
        Kind::Gauge,
    ),
    (
        "totalIPv4Prefixes",
        "awscni_total_ipv4_prefixes",
        Kind::Gauge,
    ),
    (
        "ipamdActionInProgress",
        "awscni_ipamd_action_inprogress",
        Kind::Gauge,
    ),
    ("addReqCount", "awscni_add_ip_req_count", Kind::Counter),
    ("delReqCount", "awscni_del_ip_req_count", Kind::Counter),
    ("awsAPIErr", "awscni_aws_api_error_count", Kind::Counter),
    ("awsUtilErr", "awscni_aws_utils_error_count", Kind::Counter),
    ("ipamdErr", "awscni_ipamd_error_count", Kind::Counter),
    ("podENIErr", "awscni_pod_eni_error_count", Kind::Counter),
    ("reconcileCount", "awscni_reconcile_count", Kind::Counter),
];

/// Upstream's EC2 latency, from the daemon's `awscni_aws_api_latency_ms` summary.
pub const LATENCY: &str = "awsAPILatency";
const LATENCY_SUM: &str = "awscni_aws_api_latency_ms_sum";
const LATENCY_COUNT: &str = "awscni_aws_api_latency_ms_count";

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unit {
    Count,
    Milliseconds,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Datum {
    pub name: &'static str,
    pub value: f64,
    pub unit: Unit,
}

/// One metric's value summed over its label sets, by metric name.
pub type Totals = BTreeMap<String, f64>;

/// Parses the Prometheus text format as vpc-ipamd writes it: `name value` or `name{labels} value`.
pub fn parse(text: &str) -> Result<Totals, String> {
    let mut totals = Totals::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("line {}: no value: {line:?}", n + 1))?;
        let name = series.split('{').next().unwrap_or(series);
        let value: f64 = value
            .parse()
            .map_err(|_| format!("line {}: {value:?} is not a number", n + 1))?;
        *totals.entry(name.to_string()).or_default() += value;
    }
    Ok(totals)
}

/// The counters each node showed last round.
#[derive(Default)]
pub struct Aggregator {
    previous: BTreeMap<String, Totals>,
}

impl Aggregator {
    /// The round's data from each node's scrape (node name → totals). Nodes not scraped this round
    /// are forgotten: when one comes back its counters start from a new baseline.
    pub fn round(&mut self, scrapes: &BTreeMap<String, Totals>) -> Vec<Datum> {
        let mut out = Vec::new();
        for (cloudwatch, metric, kind) in PUBLISHED {
            let value: f64 = match kind {
                Kind::Gauge => scrapes.values().filter_map(|t| t.get(*metric)).sum(),
                Kind::Counter => scrapes
                    .iter()
                    .map(|(node, t)| self.growth(node, t, metric))
                    .sum(),
            };
            out.push(Datum {
                name: cloudwatch,
                value,
                unit: Unit::Count,
            });
        }
        let latency = scrapes
            .iter()
            .filter_map(|(node, t)| {
                let count = self.growth(node, t, LATENCY_COUNT);
                let sum = self.growth(node, t, LATENCY_SUM);
                (count > 0.0).then(|| sum / count)
            })
            .fold(None, |max: Option<f64>, v| {
                Some(max.map_or(v, |m| m.max(v)))
            });
        if let Some(value) = latency {
            out.push(Datum {
                name: LATENCY,
                value,
                unit: Unit::Milliseconds,
            });
        }
        self.previous = scrapes.clone();
        out
    }

    fn growth(&self, node: &str, now: &Totals, metric: &str) -> f64 {
        let Some(before) = self.previous.get(node) else {
            return 0.0;
        };
        let now = now.get(metric).copied().unwrap_or(0.0);
        match before.get(metric) {
            // Lower than before: the daemon restarted and counts from zero.
            Some(&b) if now >= b => now - b,
            Some(_) => now,
            None => now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(text: &str) -> Totals {
        parse(text).unwrap()
    }

    fn value(data: &[Datum], name: &str) -> Option<f64> {
        data.iter().find(|d| d.name == name).map(|d| d.value)
    }

    #[test]
    fn labels_are_summed_and_comments_skipped() {
        let t = scrape(
            "# HELP awscni_ipamd_error_count x\n# TYPE awscni_ipamd_error_count counter\n\
             awscni_ipamd_error_count{fn=\"a\"} 2\nawscni_ipamd_error_count{fn=\"b,c\"} 3\n\
             awscni_total_ip_addresses 18\n",
        );
        assert_eq!(t["awscni_ipamd_error_count"], 5.0);
        assert_eq!(t["awscni_total_ip_addresses"], 18.0);
        assert!(parse("awscni_total_ip_addresses eighteen").is_err());
        assert!(parse("awscni_total_ip_addresses").is_err());
    }

    #[test]
    fn gauges_sum_over_nodes_and_counters_publish_their_growth() {
        let mut agg = Aggregator::default();
        let round = |a: &str, b: &str| {
            BTreeMap::from([("a".to_string(), scrape(a)), ("b".to_string(), scrape(b))])
        };
        let first = agg.round(&round(
            "awscni_total_ip_addresses 9\nawscni_add_ip_req_count 5\n",
            "awscni_total_ip_addresses 18\nawscni_add_ip_req_count 7\n",
        ));
        assert_eq!(value(&first, "totalIPAddresses"), Some(27.0));
        assert_eq!(value(&first, "addReqCount"), Some(0.0), "a baseline");
        let second = agg.round(&round(
            "awscni_total_ip_addresses 9\nawscni_add_ip_req_count 8\n\
             awscni_aws_api_latency_ms_sum 300\nawscni_aws_api_latency_ms_count 2\n",
            // b restarted: its counter starts again.
            "awscni_total_ip_addresses 10\nawscni_add_ip_req_count 2\n\
             awscni_aws_api_latency_ms_sum 40\nawscni_aws_api_latency_ms_count 1\n",
        ));
        assert_eq!(value(&second, "totalIPAddresses"), Some(19.0));
        assert_eq!(value(&second, "addReqCount"), Some(3.0 + 2.0));
        assert_eq!(value(&second, LATENCY), Some(150.0), "the highest mean");
        // A node gone and back starts from a baseline again.
        let third = agg.round(&BTreeMap::from([(
            "a".to_string(),
            scrape("awscni_add_ip_req_count 10\n"),
        )]));
        assert_eq!(value(&third, "addReqCount"), Some(2.0));
        assert_eq!(value(&third, LATENCY), None, "no EC2 call this round");
        let fourth = agg.round(&round(
            "awscni_add_ip_req_count 10\n",
            "awscni_add_ip_req_count 4\n",
        ));
        assert_eq!(value(&fourth, "addReqCount"), Some(0.0));
    }
}
