//! Settings from the cluster: the `amazon-vpc-cni` ConfigMap in kube-system, with the kebab-case
//! keys the seeds' runbook uses (`warm-ip-target`, `enable-prefix-delegation`, ...), layered over
//! the environment. One rule of precedence: a key the ConfigMap sets wins over the DaemonSet's
//! environment; a key it drops falls back to the environment. What can change while the daemon
//! runs (the pool's targets, MAX_ENI, the cooldown) does; the rest waits for a restart and is
//! reported, never half-applied.

use crate::config::{Config, ConfigError};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

pub const NAMESPACE: &str = "kube-system";
pub const NAME: &str = "amazon-vpc-cni";

/// The variables a running daemon takes from a new ConfigMap without a restart.
pub const LIVE: &[&str] = &[
    "WARM_ENI_TARGET",
    "WARM_IP_TARGET",
    "MINIMUM_IP_TARGET",
    "WARM_PREFIX_TARGET",
    "MAX_ENI",
    "IP_COOLDOWN_PERIOD",
];

/// Keys of the ConfigMap that other components read (EKS's controllers, Windows nodes): accepted
/// and reported as theirs, not refused as typos.
const OTHERS: &[(&str, &str)] = &[
    (
        "enable-network-policy-controller",
        "EKS's network policy controller (this daemon's enforcement is ENABLE_NETWORK_POLICY)",
    ),
    (
        "enable-windows-ipam",
        "the VPC resource controller, for Windows nodes",
    ),
    (
        "enable-windows-prefix-delegation",
        "the VPC resource controller, for Windows nodes",
    ),
    (
        "warm-prefix-target-windows",
        "the VPC resource controller, for Windows nodes",
    ),
    (
        "branch-eni-cooldown",
        "the VPC resource controller (security groups for pods)",
    ),
];

/// Keys whose variable is not their upper-cased spelling.
const ALIASES: &[(&str, &str)] = &[
    (
        "enable-custom-networking",
        "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG",
    ),
    ("enable-ipv4", "ENABLE_IPv4"),
    ("enable-ipv6", "ENABLE_IPv6"),
    ("external-snat", "AWS_VPC_K8S_CNI_EXTERNALSNAT"),
    ("exclude-snat-cidrs", "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS"),
    ("randomize-snat", "AWS_VPC_K8S_CNI_RANDOMIZESNAT"),
    ("veth-prefix", "AWS_VPC_K8S_CNI_VETHPREFIX"),
    ("eni-mtu", "AWS_VPC_ENI_MTU"),
    ("log-level", "AWS_VPC_K8S_CNI_LOGLEVEL"),
];

/// Variables read before the API server is reached (the log, and the API server's own address):
/// a ConfigMap cannot set them.
const ENVIRONMENT_ONLY: &[&str] = &[
    "AWS_VPC_K8S_CNI_LOGLEVEL",
    "AWS_VPC_K8S_CNI_LOG_FILE",
    "CLUSTER_ENDPOINT",
];

/// Not a variable of upstream's: the seeds' runbook sets `enable-ip-cooldown: "false"` to turn the
/// cooldown off, which is IP_COOLDOWN_PERIOD=0.
const ENABLE_IP_COOLDOWN: &str = "enable-ip-cooldown";

/// Every variable `Config::from_lookup` reads.
pub fn variables_read() -> BTreeSet<String> {
    let asked = RefCell::new(BTreeSet::new());
    // Some variables are read only when another is set (IPv6's, network policy's): ask with a
    // lookup that says "true" to every switch so that each branch is taken once.
    for answer in [None, Some("true")] {
        let _ = Config::from_lookup(|name| {
            asked.borrow_mut().insert(name.to_string());
            answer
                .filter(|_| name.starts_with("ENABLE_"))
                .map(str::to_string)
        });
    }
    asked.into_inner()
}

/// What the ConfigMap says, as variables, and what of it is not taken.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterSettings {
    /// Variable → value, ConfigMap keys translated.
    pub variables: BTreeMap<String, String>,
    /// The variable each key was read as, for messages in the user's words.
    pub keys: BTreeMap<String, String>,
    /// "key: why" for keys refused (unknown, or a value that does not parse).
    pub refused: Vec<String>,
    /// "key: which component reads it" for keys other components own.
    pub others: Vec<String>,
}

impl ClusterSettings {
    /// Translates the ConfigMap's `data`. A key that names no setting is refused with its name,
    /// so a typo is seen instead of silently doing nothing.
    pub fn from_data(data: &BTreeMap<String, String>) -> ClusterSettings {
        let known = variables_read();
        let mut out = ClusterSettings::default();
        for (key, value) in data {
            if let Some((_, owner)) = OTHERS.iter().find(|(k, _)| k == key) {
                out.others.push(format!("{key}: read by {owner}"));
                continue;
            }
            if key == ENABLE_IP_COOLDOWN {
                match parse_bool(value) {
                    Some(true) => {}
                    Some(false) => {
                        out.variables
                            .insert("IP_COOLDOWN_PERIOD".into(), "0".into());
                        out.keys.insert("IP_COOLDOWN_PERIOD".into(), key.clone());
                    }
                    None => out
                        .refused
                        .push(format!("{key}={value:?}: expected true or false")),
                }
                continue;
            }
            let variable = ALIASES
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.to_string())
                .unwrap_or_else(|| key.to_uppercase().replace('-', "_"));
            if !known.contains(&variable) {
                out.refused
                    .push(format!("{key}: no such setting (read as {variable})"));
                continue;
            }
            if ENVIRONMENT_ONLY.contains(&variable.as_str()) {
                out.refused.push(format!(
                    "{key}: {variable} is read before the API server is reached; set it in the DaemonSet's environment"
                ));
                continue;
            }
            // enable-ip-cooldown=false outranks a period given beside it.
            if variable == "IP_COOLDOWN_PERIOD"
                && data.get(ENABLE_IP_COOLDOWN).and_then(|v| parse_bool(v)) == Some(false)
            {
                continue;
            }
            out.variables.insert(variable.clone(), value.clone());
            out.keys.insert(variable, key.clone());
        }
        out
    }

    /// The value of `name` with this ConfigMap over `env`.
    pub fn get(&self, name: &str, env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
        self.variables.get(name).cloned().or_else(|| env(name))
    }

    /// The ConfigMap's key for `variable`, or the variable itself.
    pub fn key_of(&self, variable: &str) -> String {
        self.keys
            .get(variable)
            .cloned()
            .unwrap_or_else(|| variable.to_string())
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// The configuration with `cluster` over `env`. A ConfigMap value that does not parse is replaced
/// by the one `previous` (the ConfigMap as last taken) had, or dropped for the environment's, and
/// named in `refused`: the daemon keeps running on what it had. A conflict sets the ConfigMap
/// aside. The environment alone must parse (it did at start).
pub fn layered(
    cluster: &ClusterSettings,
    previous: &ClusterSettings,
    env: &dyn Fn(&str) -> Option<String>,
    check: &dyn Fn(&Config) -> Result<(), ConfigError>,
) -> Result<(Config, ClusterSettings), ConfigError> {
    let mut taken = cluster.clone();
    loop {
        match Config::from_lookup(|name| taken.get(name, env)).and_then(|c| check(&c).map(|()| c)) {
            Ok(config) => return Ok((config, taken)),
            Err(ConfigError::Invalid {
                name,
                value,
                reason,
            }) if taken.variables.contains_key(name) => {
                let key = taken.key_of(name);
                let before = previous.variables.get(name).filter(|v| **v != value);
                match before {
                    Some(v) => taken.variables.insert(name.to_string(), v.clone()),
                    None => taken.variables.remove(name),
                };
                taken.refused.push(format!("{key}={value:?}: {reason}"));
            }
            Err(e @ ConfigError::Conflict(_)) if !taken.variables.is_empty() => {
                // A conflict names no single key: the ConfigMap as a whole is set aside.
                let keys: Vec<String> = taken.keys.values().cloned().collect();
                taken.refused.push(format!(
                    "{} set aside: {e}",
                    if keys.is_empty() {
                        "the ConfigMap".to_string()
                    } else {
                        keys.join(", ")
                    }
                ));
                taken.variables.clear();
                taken.keys.clear();
            }
            Err(e) => return Err(e),
        }
    }
}

/// Variables whose value differs between two layered lookups, split into those a running daemon
/// takes (`LIVE`) and those that wait for a restart.
pub fn changes(
    before: &dyn Fn(&str) -> Option<String>,
    after: &dyn Fn(&str) -> Option<String>,
) -> (Vec<String>, Vec<String>) {
    let (mut live, mut restart) = (Vec::new(), Vec::new());
    for name in variables_read() {
        let norm = |v: Option<String>| v.map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        if norm(before(&name)) != norm(after(&name)) {
            if LIVE.contains(&name.as_str()) {
                live.push(name);
            } else {
                restart.push(name);
            }
        }
    }
    (live, restart)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_seeds_keys_map_to_upstreams_variables() {
        // Every key the seeds' ConfigMaps use.
        let s = ClusterSettings::from_data(&data(&[
            ("warm-ip-target", "10"),
            ("minimum-ip-target", "20"),
            ("warm-eni-target", "1"),
            ("max-eni", "8"),
            ("enable-ip-cooldown", "true"),
            ("ip-cooldown-period", "30"),
            ("enable-prefix-delegation", "true"),
            ("warm-prefix-target", "1"),
            ("enable-ipv6", "false"),
            ("enable-pod-eni", "true"),
            ("enable-network-policy-controller", "true"),
            ("enable-custom-networking", "true"),
            (
                "eni-config-label-def",
                "failure-domain.beta.kubernetes.io/zone",
            ),
        ]));
        assert_eq!(s.refused, Vec::<String>::new());
        for (variable, value) in [
            ("WARM_IP_TARGET", "10"),
            ("MINIMUM_IP_TARGET", "20"),
            ("WARM_ENI_TARGET", "1"),
            ("MAX_ENI", "8"),
            ("IP_COOLDOWN_PERIOD", "30"),
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_PREFIX_TARGET", "1"),
            ("ENABLE_IPv6", "false"),
            ("ENABLE_POD_ENI", "true"),
            ("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true"),
            (
                "ENI_CONFIG_LABEL_DEF",
                "failure-domain.beta.kubernetes.io/zone",
            ),
        ] {
            assert_eq!(
                s.variables.get(variable).map(String::as_str),
                Some(value),
                "{variable}"
            );
        }
        assert_eq!(s.others.len(), 1, "{:?}", s.others);
        assert!(s.others[0].starts_with("enable-network-policy-controller"));
        assert_eq!(s.key_of("WARM_IP_TARGET"), "warm-ip-target");
    }

    #[test]
    fn a_typo_is_refused_by_name_and_cooldown_off_is_a_zero_period() {
        let s = ClusterSettings::from_data(&data(&[
            ("warm-ip-targt", "5"),
            ("enable-ip-cooldown", "false"),
            ("ip-cooldown-period", "30"),
        ]));
        assert_eq!(s.refused.len(), 1);
        assert!(s.refused[0].starts_with("warm-ip-targt: no such setting"));
        assert_eq!(s.variables["IP_COOLDOWN_PERIOD"], "0");
        let bad = ClusterSettings::from_data(&data(&[("enable-ip-cooldown", "sometimes")]));
        assert!(bad.refused[0].contains("expected true or false"));
        let early = ClusterSettings::from_data(&data(&[("log-level", "debug")]));
        assert!(early.variables.is_empty());
        assert!(
            early.refused[0].contains("DaemonSet's environment"),
            "{:?}",
            early.refused
        );
    }

    #[test]
    fn the_configmap_wins_and_a_bad_value_leaves_the_environments() {
        let env = |name: &str| match name {
            "WARM_IP_TARGET" => Some("3".to_string()),
            "WARM_ENI_TARGET" => Some("2".to_string()),
            _ => None,
        };
        let s = ClusterSettings::from_data(&data(&[
            ("warm-ip-target", "7"),
            ("warm-eni-target", "many"),
        ]));
        let (config, taken) = layered(&s, &ClusterSettings::default(), &env, &|_| Ok(())).unwrap();
        assert_eq!(
            config.warm_ip_target, 7,
            "the ConfigMap over the environment"
        );
        assert_eq!(config.warm_eni_target, 2, "the bad value is dropped");
        assert_eq!(taken.refused.len(), 1);
        assert!(
            taken.refused[0].starts_with("warm-eni-target=\"many\""),
            "{:?}",
            taken.refused
        );
        // Given the ConfigMap as last taken, a bad value keeps the value it had.
        let before = ClusterSettings::from_data(&data(&[("warm-eni-target", "4")]));
        let (config, _) = layered(&s, &before, &env, &|_| Ok(())).unwrap();
        assert_eq!(config.warm_eni_target, 4, "the previous value stands");
        // A conflict sets the ConfigMap aside as a whole.
        let conflict =
            ClusterSettings::from_data(&data(&[("enable-ipv6", "true"), ("warm-ip-target", "7")]));
        let (config, taken) =
            layered(&conflict, &ClusterSettings::default(), &env, &|_| Ok(())).unwrap();
        assert!(!config.ipv6);
        assert_eq!(config.warm_ip_target, 3);
        assert!(
            taken.refused[0].contains("set aside"),
            "{:?}",
            taken.refused
        );
    }

    #[test]
    fn a_setting_the_daemon_refuses_is_dropped_with_the_checks_reason() {
        let s = ClusterSettings::from_data(&data(&[("annotate-pod-ip", "true")]));
        let (config, taken) = layered(&s, &ClusterSettings::default(), &|_| None, &|c| {
            c.unsupported_by_daemon()
        })
        .unwrap();
        assert!(!config.annotate_pod_ip);
        assert!(
            taken.refused[0].starts_with("annotate-pod-ip=\"true\": annotating pods"),
            "{:?}",
            taken.refused
        );
    }

    #[test]
    fn the_pool_takes_exactly_the_live_variables() {
        use crate::settings::PoolSettings;
        let base = Config::default();
        for name in variables_read() {
            // A value each variable accepts that differs from the default.
            let value = match name.as_str() {
                "MAX_ENI" | "WARM_ENI_TARGET" | "WARM_IP_TARGET" | "MINIMUM_IP_TARGET"
                | "WARM_PREFIX_TARGET" | "IP_COOLDOWN_PERIOD" => "7",
                "ENABLE_PREFIX_DELEGATION" | "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG" => "true",
                _ => continue,
            };
            let changed = Config::from_lookup(|n| (n == name).then(|| value.to_string())).unwrap();
            let mut running = PoolSettings::from_config(&base);
            let taken = running.take_live(&PoolSettings::from_config(&changed));
            assert_eq!(
                !taken.is_empty(),
                LIVE.contains(&name.as_str()),
                "{name}: {taken:?}"
            );
            if LIVE.contains(&name.as_str()) {
                assert!(taken[0].starts_with(&name), "{taken:?}");
            } else {
                assert_eq!(running, PoolSettings::from_config(&base), "{name}");
            }
        }
    }

    #[test]
    fn changes_split_into_live_and_restart() {
        let before = |name: &str| (name == "WARM_IP_TARGET").then(|| "1".to_string());
        let after = |name: &str| match name {
            "WARM_IP_TARGET" => Some("4".to_string()),
            "ENABLE_PREFIX_DELEGATION" => Some("true".to_string()),
            _ => None,
        };
        let (live, restart) = changes(&before, &after);
        assert_eq!(live, vec!["WARM_IP_TARGET".to_string()]);
        assert_eq!(restart, vec!["ENABLE_PREFIX_DELEGATION".to_string()]);
        let (live, restart) = changes(&before, &before);
        assert!(live.is_empty() && restart.is_empty());
    }

    #[test]
    fn every_live_variable_is_read() {
        let read = variables_read();
        for name in LIVE {
            assert!(read.contains(*name), "{name}");
        }
        assert!(read.contains("ENABLE_IPv6") && read.contains("ENI_CONFIG_LABEL_DEF"));
    }
}
