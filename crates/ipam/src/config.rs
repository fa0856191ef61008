//! Configuration from the Amazon VPC CNI's environment variable names and defaults
//! (upstream-ipamd.md §1.1 and §1.2). Unlike upstream, a value that does not parse is an error that names
//! the variable and the value: a typo must not silently become a default.

use crate::net::Ipv4Cidr;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{name}={value:?}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0}")]
    Conflict(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RandomizeSnat {
    None,
    HashRandom,
    Prng,
}

impl RandomizeSnat {
    /// The integer upstream's introspection reports for this setting.
    pub fn upstream_code(self) -> u8 {
        match self {
            RandomizeSnat::None => 0,
            RandomizeSnat::HashRandom => 1,
            RandomizeSnat::Prng => 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkPolicyMode {
    Unset,
    None,
    Strict,
    Standard,
}

/// Where NetworkPolicy enforcement reads the policies (`VPC_CNI_NETWORK_POLICY_INPUT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkPolicyInput {
    /// NetworkPolicies, Namespaces and Pods, evaluated on the node.
    Cluster,
    /// EKS's PolicyEndpoints, which its managed controller resolves.
    PolicyEndpoints,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SgEnforcingMode {
    Strict,
    Standard,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    // Pool (upstream-ipamd.md §1.1).
    pub warm_eni_target: u32,
    pub warm_ip_target: u32,
    pub minimum_ip_target: u32,
    pub warm_prefix_target: u32,
    pub prefix_delegation: bool,
    /// MAX_ENI when it is at least 1; upstream ignores lower values.
    pub max_eni: Option<u32>,
    pub ip_cooldown: Duration,
    pub custom_networking: bool,
    pub eni_config_annotation: String,
    pub eni_config_label: String,
    pub pod_eni: bool,
    /// `POD_ENI_MANAGER=node` (ours): with `ENABLE_POD_ENI`, the node makes its own trunk and branch
    /// ENIs (a cluster without the VPC resource controller); `controller`, the default, leaves them
    /// to the controller as on EKS.
    pub node_makes_branches: bool,
    /// `WARM_BRANCH_TARGET` (ours): spare branch ENIs kept per set of security groups the node's
    /// pods use, with `ENABLE_POD_ENI` where the node makes its own branches.
    pub warm_branch_target: u32,
    pub ipv4: bool,
    pub ipv6: bool,
    pub subnet_discovery: bool,
    pub manage_enis_non_schedulable: bool,
    pub disable_provisioning: bool,
    pub imds_only: bool,
    pub disable_leaked_eni_cleanup: bool,
    pub manage_untagged_eni: bool,
    pub backing_store: String,
    pub annotate_pod_ip: bool,
    pub network_policy_mode: NetworkPolicyMode,
    /// ENABLE_NETWORK_POLICY: enforce NetworkPolicies (watched from the API server).
    pub network_policy: bool,
    pub network_policy_input: NetworkPolicyInput,
    pub multi_nic: bool,
    pub cluster_name: String,
    pub additional_eni_tags: BTreeMap<String, String>,
    pub introspection_bind: String,
    pub disable_introspection: bool,
    pub disable_metrics: bool,
    pub http_timeout: Duration,
    pub ec2_endpoint: Option<String>,
    pub vpc_cni_version: String,
    pub cluster_endpoint: Option<String>,
    pub log_level: String,
    /// AWS_VPC_K8S_CNI_LOG_FILE when it names a file; stdout, stderr or unset log to stderr
    /// (upstream's default path is a host mount that need not exist).
    pub log_file: Option<String>,
    // Host networking (§1.2).
    pub external_snat: bool,
    pub exclude_snat_cidrs: Vec<Ipv4Cidr>,
    pub randomize_snat: RandomizeSnat,
    pub node_port_support: bool,
    pub connmark: u32,
    pub external_service_cidrs: Vec<Ipv4Cidr>,
    pub eni_mtu: u32,
    pub pod_mtu: u32,
    pub veth_prefix: String,
    pub pod_sg_enforcing_mode: SgEnforcingMode,
    pub v6_egress: bool,
    /// ENABLE_V4_EGRESS (default true): IPv4 egress for the pods of an IPv6 cluster.
    pub v4_egress: bool,
    /// Values upstream tolerates and corrects (a reserved tag key, a timeout under 10 s): taken
    /// as upstream takes them, and said here for the daemon to log.
    pub warnings: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config::from_lookup(|_| None).expect("the defaults are valid")
    }
}

/// Reads variables through a lookup function so that the core never touches the process environment.
struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    fn raw(&self, name: &'static str) -> Option<String> {
        (self.lookup)(name).filter(|v| !v.trim().is_empty())
    }

    fn invalid(name: &'static str, value: &str, reason: impl fmt::Display) -> ConfigError {
        ConfigError::Invalid {
            name,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Go's strconv.ParseBool spellings, which is what upstream accepts.
    fn bool(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(name) {
            None => Ok(default),
            Some(v) => match v.trim() {
                "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
                "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
                _ => Err(Self::invalid(name, &v, "expected true or false")),
            },
        }
    }

    fn int(&self, name: &'static str) -> Result<Option<i64>, ConfigError> {
        self.raw(name)
            .map(|v| {
                v.trim()
                    .parse::<i64>()
                    .map_err(|_| Self::invalid(name, &v, "expected an integer"))
            })
            .transpose()
    }

    fn count(&self, name: &'static str, default: u32) -> Result<u32, ConfigError> {
        match self.int(name)? {
            None => Ok(default),
            Some(n) => u32::try_from(n).map_err(|_| {
                Self::invalid(
                    name,
                    &n.to_string(),
                    "expected a whole number of at least 0",
                )
            }),
        }
    }

    fn string(&self, name: &'static str, default: &str) -> String {
        self.raw(name).unwrap_or_else(|| default.to_string())
    }

    fn cidrs(&self, name: &'static str) -> Result<Vec<Ipv4Cidr>, ConfigError> {
        let Some(v) = self.raw(name) else {
            return Ok(Vec::new());
        };
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<Ipv4Cidr>()
                    .map_err(|e| Self::invalid(name, &v, e))
            })
            .collect()
    }
}

impl Config {
    /// Every variable this configuration reads, for introspection and for checking manifests.
    pub const VARIABLES: &'static [&'static str] = &[
        "WARM_ENI_TARGET",
        "WARM_IP_TARGET",
        "MINIMUM_IP_TARGET",
        "WARM_PREFIX_TARGET",
        "ENABLE_PREFIX_DELEGATION",
        "MAX_ENI",
        "IP_COOLDOWN_PERIOD",
        "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG",
        "ENI_CONFIG_ANNOTATION_DEF",
        "ENI_CONFIG_LABEL_DEF",
        "ENABLE_POD_ENI",
        "WARM_BRANCH_TARGET",
        "POD_ENI_MANAGER",
        "ENABLE_IPv4",
        "ENABLE_IPv6",
        "ENABLE_SUBNET_DISCOVERY",
        "AWS_MANAGE_ENIS_NON_SCHEDULABLE",
        "DISABLE_NETWORK_RESOURCE_PROVISIONING",
        "ENABLE_IMDS_ONLY_MODE",
        "DISABLE_LEAKED_ENI_CLEANUP",
        "MANAGE_UNTAGGED_ENI",
        "AWS_VPC_K8S_CNI_BACKING_STORE",
        "ANNOTATE_POD_IP",
        "NETWORK_POLICY_ENFORCING_MODE",
        "ENABLE_NETWORK_POLICY",
        "VPC_CNI_NETWORK_POLICY_INPUT",
        "ENABLE_MULTI_NIC",
        "CLUSTER_NAME",
        "ADDITIONAL_ENI_TAGS",
        "INTROSPECTION_BIND_ADDRESS",
        "DISABLE_INTROSPECTION",
        "DISABLE_METRICS",
        "HTTP_TIMEOUT",
        "AWS_EC2_ENDPOINT",
        "VPC_CNI_VERSION",
        "CLUSTER_ENDPOINT",
        "AWS_VPC_K8S_CNI_LOGLEVEL",
        "AWS_VPC_K8S_CNI_LOG_FILE",
        "AWS_VPC_K8S_CNI_EXTERNALSNAT",
        "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
        "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
        "AWS_VPC_CNI_NODE_PORT_SUPPORT",
        "AWS_VPC_K8S_CNI_CONNMARK",
        "AWS_EXTERNAL_SERVICE_CIDRS",
        "AWS_VPC_ENI_MTU",
        "POD_MTU",
        "AWS_VPC_K8S_CNI_VETHPREFIX",
        "POD_SECURITY_GROUP_ENFORCING_MODE",
        "ENABLE_V6_EGRESS",
        "ENABLE_V4_EGRESS",
    ];

    /// Builds the configuration from `lookup(name)`, e.g. `|k| std::env::var(k).ok()`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let env = Env { lookup: &lookup };
        let max_eni = env
            .int("MAX_ENI")?
            .filter(|&n| n >= 1)
            .map(|n| n.min(u32::MAX as i64) as u32);
        let mut warnings = Vec::new();
        let mut http_timeout = env.count("HTTP_TIMEOUT", 10)?;
        if http_timeout < 10 {
            warnings.push(format!(
                "HTTP_TIMEOUT={http_timeout}: below the minimum of 10 seconds; using 10, as upstream does"
            ));
            http_timeout = 10;
        }
        let eni_mtu = mtu(&env, "AWS_VPC_ENI_MTU", 9001)?;
        let cfg = Config {
            warm_eni_target: env.count("WARM_ENI_TARGET", 1)?,
            warm_ip_target: env.count("WARM_IP_TARGET", 0)?,
            minimum_ip_target: env.count("MINIMUM_IP_TARGET", 0)?,
            // Upstream's code default is 0 but its shipped manifest sets 1, and with 0 its entrypoint refuses
            // ENABLE_PREFIX_DELEGATION=true alone: 1 is what users of the manifest actually run.
            warm_prefix_target: env.count("WARM_PREFIX_TARGET", 1)?,
            prefix_delegation: env.bool("ENABLE_PREFIX_DELEGATION", false)?,
            max_eni,
            ip_cooldown: Duration::from_secs(env.count("IP_COOLDOWN_PERIOD", 30)? as u64),
            custom_networking: env.bool("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", false)?,
            eni_config_annotation: env
                .string("ENI_CONFIG_ANNOTATION_DEF", "k8s.amazonaws.com/eniConfig"),
            eni_config_label: env.string("ENI_CONFIG_LABEL_DEF", "k8s.amazonaws.com/eniConfig"),
            pod_eni: env.bool("ENABLE_POD_ENI", false)?,
            node_makes_branches: match env.raw("POD_ENI_MANAGER").as_deref().map(str::trim) {
                None | Some("controller") => false,
                Some("node") => true,
                Some(v) => {
                    return Err(Env::invalid(
                        "POD_ENI_MANAGER",
                        v,
                        "expected controller (the VPC resource controller makes branch ENIs) or \
                         node (this daemon makes its node's)",
                    ))
                }
            },
            warm_branch_target: env.count("WARM_BRANCH_TARGET", 0)?,
            // The code default is false but every manifest and the README say true: IPv4 clusters set nothing.
            ipv4: env.bool("ENABLE_IPv4", true)?,
            ipv6: env.bool("ENABLE_IPv6", false)?,
            subnet_discovery: env.bool("ENABLE_SUBNET_DISCOVERY", true)?,
            manage_enis_non_schedulable: env.bool("AWS_MANAGE_ENIS_NON_SCHEDULABLE", false)?,
            disable_provisioning: env.bool("DISABLE_NETWORK_RESOURCE_PROVISIONING", false)?,
            imds_only: env.bool("ENABLE_IMDS_ONLY_MODE", false)?,
            disable_leaked_eni_cleanup: env.bool("DISABLE_LEAKED_ENI_CLEANUP", false)?,
            manage_untagged_eni: env.bool("MANAGE_UNTAGGED_ENI", true)?,
            backing_store: env.string(
                "AWS_VPC_K8S_CNI_BACKING_STORE",
                "/var/run/aws-node/ipam.json",
            ),
            annotate_pod_ip: env.bool("ANNOTATE_POD_IP", false)?,
            network_policy_mode: match env.raw("NETWORK_POLICY_ENFORCING_MODE") {
                None => NetworkPolicyMode::Unset,
                Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                    "none" => NetworkPolicyMode::None,
                    "strict" => NetworkPolicyMode::Strict,
                    "standard" => NetworkPolicyMode::Standard,
                    _ => {
                        return Err(Env::invalid(
                            "NETWORK_POLICY_ENFORCING_MODE",
                            &v,
                            "expected none, strict or standard",
                        ))
                    }
                },
            },
            network_policy: env.bool("ENABLE_NETWORK_POLICY", false)?,
            network_policy_input: match env.raw("VPC_CNI_NETWORK_POLICY_INPUT") {
                None => NetworkPolicyInput::Cluster,
                Some(v) => match v.trim() {
                    "cluster" => NetworkPolicyInput::Cluster,
                    "policyendpoints" => NetworkPolicyInput::PolicyEndpoints,
                    _ => {
                        return Err(Env::invalid(
                            "VPC_CNI_NETWORK_POLICY_INPUT",
                            &v,
                            "expected cluster (NetworkPolicies, evaluated on the node) or policyendpoints (EKS's managed controller)",
                        ))
                    }
                },
            },
            multi_nic: env.bool("ENABLE_MULTI_NIC", false)?,
            cluster_name: env.string("CLUSTER_NAME", ""),
            additional_eni_tags: additional_tags(&env, &mut warnings)?,
            introspection_bind: env.string("INTROSPECTION_BIND_ADDRESS", "127.0.0.1:61679"),
            disable_introspection: env.bool("DISABLE_INTROSPECTION", false)?,
            disable_metrics: env.bool("DISABLE_METRICS", false)?,
            http_timeout: Duration::from_secs(http_timeout as u64),
            ec2_endpoint: env.raw("AWS_EC2_ENDPOINT"),
            vpc_cni_version: env.string("VPC_CNI_VERSION", ""),
            cluster_endpoint: env.raw("CLUSTER_ENDPOINT"),
            log_level: env.string("AWS_VPC_K8S_CNI_LOGLEVEL", "Debug"),
            log_file: env
                .raw("AWS_VPC_K8S_CNI_LOG_FILE")
                .filter(|f| f != "stdout" && f != "stderr"),
            external_snat: env.bool("AWS_VPC_K8S_CNI_EXTERNALSNAT", false)?,
            exclude_snat_cidrs: env.cidrs("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS")?,
            randomize_snat: match env
                .raw("AWS_VPC_K8S_CNI_RANDOMIZESNAT")
                .as_deref()
                .map(str::trim)
            {
                None | Some("prng") => RandomizeSnat::Prng,
                Some("hashrandom") => RandomizeSnat::HashRandom,
                Some("none") => RandomizeSnat::None,
                Some(v) => {
                    return Err(Env::invalid(
                        "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
                        v,
                        "expected prng, hashrandom or none",
                    ))
                }
            },
            node_port_support: env.bool("AWS_VPC_CNI_NODE_PORT_SUPPORT", true)?,
            connmark: connmark(&env)?,
            external_service_cidrs: env.cidrs("AWS_EXTERNAL_SERVICE_CIDRS")?,
            eni_mtu,
            pod_mtu: mtu(&env, "POD_MTU", eni_mtu)?,
            veth_prefix: veth_prefix(&env)?,
            pod_sg_enforcing_mode: match env
                .raw("POD_SECURITY_GROUP_ENFORCING_MODE")
                .as_deref()
                .map(str::trim)
            {
                None | Some("strict") => SgEnforcingMode::Strict,
                Some("standard") => SgEnforcingMode::Standard,
                Some(v) => {
                    return Err(Env::invalid(
                        "POD_SECURITY_GROUP_ENFORCING_MODE",
                        v,
                        "expected strict or standard",
                    ))
                }
            },
            v6_egress: env.bool("ENABLE_V6_EGRESS", false)?,
            v4_egress: env.bool("ENABLE_V4_EGRESS", true)?,
            warnings,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.ipv4 == self.ipv6 {
            return Err(ConfigError::Conflict(
                "exactly one of ENABLE_IPv4 and ENABLE_IPv6 must be true".into(),
            ));
        }
        if self.ipv6 && !self.prefix_delegation {
            return Err(ConfigError::Conflict(
                "ENABLE_IPv6=true requires ENABLE_PREFIX_DELEGATION=true".into(),
            ));
        }
        if self.ipv6 && self.custom_networking {
            return Err(ConfigError::Conflict(
                "ENABLE_IPv6=true cannot be combined with AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=true"
                    .into(),
            ));
        }
        if self.network_policy_mode == NetworkPolicyMode::Strict && !self.network_policy {
            return Err(ConfigError::Conflict(
                "NETWORK_POLICY_ENFORCING_MODE=strict denies new pods' traffic until their policies are \
                 enforced, which needs ENABLE_NETWORK_POLICY=true"
                    .into(),
            ));
        }
        if self.network_policy_input == NetworkPolicyInput::PolicyEndpoints && !self.network_policy
        {
            return Err(ConfigError::Conflict(
                "VPC_CNI_NETWORK_POLICY_INPUT=policyendpoints chooses where enforced policies come from, \
                 which needs ENABLE_NETWORK_POLICY=true"
                    .into(),
            ));
        }
        if self.node_makes_branches && !self.pod_eni {
            return Err(ConfigError::Conflict(
                "POD_ENI_MANAGER=node makes branch ENIs for security groups for pods, which needs \
                 ENABLE_POD_ENI=true"
                    .into(),
            ));
        }
        if self.warm_branch_target > 0 && !self.node_makes_branches {
            return Err(ConfigError::Conflict(
                "WARM_BRANCH_TARGET keeps spare branch ENIs on a node that makes its own, which needs \
                 ENABLE_POD_ENI=true and POD_ENI_MANAGER=node (on EKS the VPC resource controller \
                 makes a branch per pod)"
                    .into(),
            ));
        }
        if self.ipv6 && self.pod_mtu < 1280 {
            return Err(Env::invalid(
                "POD_MTU",
                &self.pod_mtu.to_string(),
                "IPv6 pods need an MTU of 1280 at least",
            ));
        }
        if self.prefix_delegation
            && self.warm_ip_target == 0
            && self.warm_prefix_target == 0
            && self.minimum_ip_target == 0
        {
            return Err(ConfigError::Conflict(
                "with ENABLE_PREFIX_DELEGATION=true, at least one of WARM_PREFIX_TARGET, WARM_IP_TARGET or \
                 MINIMUM_IP_TARGET must be greater than 0"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Settings the daemon reads but does not implement yet, each named with its value: a user who
    /// relies on one must not get a node without it and no word. The simulator, which models only the pool, does not call this.
    pub fn unsupported_by_daemon(&self) -> Result<(), ConfigError> {
        let refuse = |name: &'static str, value: &str, what: &str| {
            Err(Env::invalid(
                name,
                value,
                format!(
                    "{what} is not supported by vpc-cni-rs yet; unset {name} if this node does \
                     not rely on it (docs/configuration.md)"
                ),
            ))
        };
        if self.node_makes_branches && self.ipv6 {
            return refuse(
                "POD_ENI_MANAGER",
                "node",
                "branch ENIs made by the node for IPv6 pods",
            );
        }
        if self.annotate_pod_ip {
            return refuse(
                "ANNOTATE_POD_IP",
                "true",
                "annotating pods with their address",
            );
        }
        if self.v6_egress {
            return refuse(
                "ENABLE_V6_EGRESS",
                "true",
                "IPv6 egress for pods of an IPv4 cluster",
            );
        }
        if self.multi_nic {
            return refuse("ENABLE_MULTI_NIC", "true", "pods on network cards above 0");
        }
        if self.imds_only {
            return refuse(
                "ENABLE_IMDS_ONLY_MODE",
                "true",
                "learning ENIs from IMDS alone",
            );
        }
        if !self.external_service_cidrs.is_empty() {
            let value: Vec<String> = self
                .external_service_cidrs
                .iter()
                .map(|c| c.to_string())
                .collect();
            return refuse(
                "AWS_EXTERNAL_SERVICE_CIDRS",
                &value.join(","),
                "routing external service CIDRs by the primary ENI",
            );
        }
        if self.introspection_bind.starts_with("unix:") {
            return refuse(
                "INTROSPECTION_BIND_ADDRESS",
                &self.introspection_bind,
                "introspection on a unix socket",
            );
        }
        Ok(())
    }

    /// The hourly scan deletes ENIs: not when the operator said this node makes no EC2 changes.
    pub fn collects_leaked_enis(&self) -> bool {
        !self.disable_leaked_eni_cleanup && !self.disable_provisioning
    }

    /// WARM_IP_TARGET or MINIMUM_IP_TARGET set: upstream's "IP-target mode", which overrides the other targets.
    pub fn ip_targets_defined(&self) -> bool {
        self.warm_ip_target != 0 || self.minimum_ip_target != 0
    }
}

fn mtu(env: &Env, name: &'static str, default: u32) -> Result<u32, ConfigError> {
    let v = env.count(name, default)?;
    if !(576..=9001).contains(&v) {
        return Err(Env::invalid(
            name,
            &v.to_string(),
            "must lie between 576 and 9001",
        ));
    }
    Ok(v)
}

fn veth_prefix(env: &Env) -> Result<String, ConfigError> {
    let name = "AWS_VPC_K8S_CNI_VETHPREFIX";
    let v = env.string(name, "eni");
    if v.len() > 4 {
        return Err(Env::invalid(name, &v, "must be at most 4 characters"));
    }
    if ["eth", "lo", "vlan"].contains(&v.as_str()) {
        return Err(Env::invalid(name, &v, "eth, lo and vlan are reserved"));
    }
    Ok(v)
}

fn connmark(env: &Env) -> Result<u32, ConfigError> {
    let name = "AWS_VPC_K8S_CNI_CONNMARK";
    let Some(v) = env.raw(name) else {
        return Ok(0x80);
    };
    let t = v.trim();
    let parsed = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16)
    } else if let Some(oct) = t.strip_prefix('0').filter(|s| !s.is_empty()) {
        u32::from_str_radix(oct, 8)
    } else {
        t.parse()
    };
    match parsed {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Env::invalid(
            name,
            &v,
            "expected a mark between 1 and 0xffffffff",
        )),
    }
}

fn additional_tags(
    env: &Env,
    warnings: &mut Vec<String>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let name = "ADDITIONAL_ENI_TAGS";
    let Some(v) = env.raw(name) else {
        return Ok(BTreeMap::new());
    };
    let mut tags: BTreeMap<String, String> = serde_json::from_str(&v)
        .map_err(|e| Env::invalid(name, &v, format!("expected a JSON object of strings: {e}")))?;
    // Upstream drops such a key with a warning; our own tags must not be overwritten.
    tags.retain(|key, _| {
        let reserved = key.contains("k8s.amazonaws.com");
        if reserved {
            warnings.push(format!(
                "{name}: tag key {key:?} is reserved (contains k8s.amazonaws.com); left out"
            ));
        }
        !reserved
    });
    Ok(tags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_upstream() {
        let c = Config::default();
        assert_eq!(
            (c.warm_eni_target, c.warm_ip_target, c.minimum_ip_target),
            (1, 0, 0)
        );
        assert_eq!(c.ip_cooldown, Duration::from_secs(30));
        assert_eq!(c.max_eni, None);
        assert!(!c.prefix_delegation && c.subnet_discovery && c.manage_untagged_eni && c.ipv4);
        assert_eq!(c.backing_store, "/var/run/aws-node/ipam.json");
        assert_eq!((c.eni_mtu, c.pod_mtu, c.connmark), (9001, 9001, 0x80));
        assert_eq!(c.randomize_snat, RandomizeSnat::Prng);
        assert_eq!(c.veth_prefix, "eni");
        assert_eq!(c.introspection_bind, "127.0.0.1:61679");
    }

    #[test]
    fn values_are_read() {
        let c = cfg(&[
            ("WARM_IP_TARGET", "5"),
            ("MINIMUM_IP_TARGET", "10"),
            ("MAX_ENI", "2"),
            ("ENABLE_PREFIX_DELEGATION", "True"),
            (
                "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
                "10.1.0.0/16, 192.168.0.0/24",
            ),
            ("AWS_VPC_K8S_CNI_CONNMARK", "0x100"),
            ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "none"),
            ("ADDITIONAL_ENI_TAGS", r#"{"team":"net"}"#),
            ("POD_MTU", "1500"),
        ])
        .unwrap();
        assert!(c.ip_targets_defined() && c.prefix_delegation);
        assert_eq!(c.max_eni, Some(2));
        assert_eq!(c.exclude_snat_cidrs.len(), 2);
        assert_eq!(c.connmark, 0x100);
        assert_eq!(c.randomize_snat, RandomizeSnat::None);
        assert_eq!(c.additional_eni_tags["team"], "net");
        assert_eq!((c.eni_mtu, c.pod_mtu), (9001, 1500));
        assert_eq!(cfg(&[("MAX_ENI", "-1")]).unwrap().max_eni, None);
    }

    #[test]
    fn bad_values_name_the_variable_and_value() {
        for (name, value) in [
            ("WARM_IP_TARGET", "five"),
            ("WARM_ENI_TARGET", "-1"),
            ("ENABLE_PREFIX_DELEGATION", "yes"),
            ("IP_COOLDOWN_PERIOD", "30s"),
            ("AWS_VPC_ENI_MTU", "100"),
            ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.0.0.0/33"),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "veth0"),
            ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "random"),
            ("ADDITIONAL_ENI_TAGS", "{not json"),
            ("NETWORK_POLICY_ENFORCING_MODE", "lax"),
        ] {
            let err = cfg(&[(name, value)]).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(name) && text.contains(value),
                "{name}={value}: {text}"
            );
        }
    }

    #[test]
    fn conflicting_settings_are_refused() {
        assert!(cfg(&[("ENABLE_IPv4", "false")]).is_err());
        assert!(cfg(&[("ENABLE_IPv6", "true"), ("ENABLE_IPv4", "false")]).is_err());
        assert!(cfg(&[
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_PREFIX_TARGET", "0")
        ])
        .is_err());
        assert!(cfg(&[
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_PREFIX_TARGET", "0"),
            ("WARM_IP_TARGET", "1")
        ])
        .is_ok());
    }

    #[test]
    fn what_upstream_tolerates_is_corrected_with_a_warning() {
        let c = cfg(&[
            (
                "ADDITIONAL_ENI_TAGS",
                r#"{"node.k8s.amazonaws.com/x":"y","team":"net"}"#,
            ),
            ("HTTP_TIMEOUT", "5"),
        ])
        .unwrap();
        assert_eq!(
            c.additional_eni_tags,
            BTreeMap::from([("team".to_string(), "net".to_string())])
        );
        assert_eq!(c.http_timeout, Duration::from_secs(10));
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("HTTP_TIMEOUT=5"), "{:?}", c.warnings);
        assert!(
            c.warnings[1].contains("node.k8s.amazonaws.com/x"),
            "{:?}",
            c.warnings
        );
        assert!(Config::default().warnings.is_empty());
    }

    #[test]
    fn every_variable_read_has_its_row_in_the_configuration_doc() {
        let doc = include_str!("../../../docs/configuration.md");
        let rows: Vec<&str> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .collect();
        for name in Config::VARIABLES {
            assert!(
                rows.contains(name),
                "docs/configuration.md has no row for {name}"
            );
        }
    }

    #[test]
    fn no_provisioning_means_no_leaked_eni_deletion_either() {
        assert!(Config::default().collects_leaked_enis());
        assert!(!cfg(&[("DISABLE_LEAKED_ENI_CLEANUP", "true")])
            .unwrap()
            .collects_leaked_enis());
        assert!(!cfg(&[("DISABLE_NETWORK_RESOURCE_PROVISIONING", "true")])
            .unwrap()
            .collects_leaked_enis());
    }

    #[test]
    fn settings_not_built_yet_are_refused_by_name() {
        assert_eq!(Config::default().unsupported_by_daemon(), Ok(()));
        let eks = cfg(&[("ENABLE_POD_ENI", "true")]).unwrap();
        assert_eq!(
            eks.unsupported_by_daemon(),
            Ok(()),
            "security groups for pods on EKS"
        );
        let node = cfg(&[
            ("ENABLE_POD_ENI", "true"),
            ("POD_ENI_MANAGER", "node"),
            ("WARM_BRANCH_TARGET", "2"),
        ])
        .unwrap();
        assert!(node.node_makes_branches);
        assert_eq!(
            node.unsupported_by_daemon(),
            Ok(()),
            "the node's own branches"
        );
        let v6 = cfg(&[
            ("ENABLE_POD_ENI", "true"),
            ("POD_ENI_MANAGER", "node"),
            ("ENABLE_IPv6", "true"),
            ("ENABLE_IPv4", "false"),
            ("ENABLE_PREFIX_DELEGATION", "true"),
        ])
        .unwrap()
        .unsupported_by_daemon()
        .unwrap_err()
        .to_string();
        assert!(v6.contains("POD_ENI_MANAGER"), "{v6}");
        for (bad, named) in [
            (
                vec![("ENABLE_POD_ENI", "true"), ("WARM_BRANCH_TARGET", "2")],
                "POD_ENI_MANAGER=node",
            ),
            (vec![("POD_ENI_MANAGER", "node")], "ENABLE_POD_ENI"),
            (
                vec![("ENABLE_POD_ENI", "true"), ("POD_ENI_MANAGER", "nodes")],
                "POD_ENI_MANAGER",
            ),
        ] {
            let e = cfg(&bad).unwrap_err().to_string();
            assert!(e.contains(named), "{bad:?}: {e}");
        }
        for (name, value) in [
            ("ENABLE_MULTI_NIC", "true"),
            ("ENABLE_IMDS_ONLY_MODE", "true"),
            ("ANNOTATE_POD_IP", "true"),
            ("ENABLE_V6_EGRESS", "true"),
            ("AWS_EXTERNAL_SERVICE_CIDRS", "172.16.0.0/12"),
            ("INTROSPECTION_BIND_ADDRESS", "unix:/run/ipamd.sock"),
        ] {
            let err = cfg(&[(name, value)])
                .unwrap()
                .unsupported_by_daemon()
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(name) && err.contains(value) && err.contains("not supported"),
                "{name}={value}: {err}"
            );
        }
        let v6 = [
            ("ENABLE_IPv6", "true"),
            ("ENABLE_IPv4", "false"),
            ("ENABLE_PREFIX_DELEGATION", "true"),
        ];
        let config = cfg(&v6).unwrap();
        assert_eq!(config.unsupported_by_daemon(), Ok(()));
        assert!(config.v4_egress, "ENABLE_V4_EGRESS defaults to true");
        let small = cfg(&[v6[0], v6[1], v6[2], ("POD_MTU", "1200")]).unwrap_err();
        assert!(small.to_string().contains("POD_MTU"), "{small}");
        // NetworkPolicy: strict needs enforcement on; standard alone is what upstream's manifest
        // sets with its agent off, and enforces nothing.
        let input = cfg(&[("VPC_CNI_NETWORK_POLICY_INPUT", "policyendpoints")]).unwrap_err();
        assert!(
            input.to_string().contains("VPC_CNI_NETWORK_POLICY_INPUT")
                && input.to_string().contains("ENABLE_NETWORK_POLICY=true"),
            "{input}"
        );
        let strict = cfg(&[("NETWORK_POLICY_ENFORCING_MODE", "strict")]).unwrap_err();
        assert!(
            strict.to_string().contains("ENABLE_NETWORK_POLICY=true"),
            "{strict}"
        );
        let on = cfg(&[
            ("NETWORK_POLICY_ENFORCING_MODE", "strict"),
            ("ENABLE_NETWORK_POLICY", "true"),
        ])
        .unwrap();
        assert!(on.network_policy && on.unsupported_by_daemon().is_ok());
        // What upstream itself ignores while the feature is off is accepted.
        for (name, value) in [
            ("NETWORK_POLICY_ENFORCING_MODE", "none"),
            ("NETWORK_POLICY_ENFORCING_MODE", "standard"),
            ("POD_SECURITY_GROUP_ENFORCING_MODE", "standard"),
            ("ENABLE_POD_ENI", "false"),
        ] {
            assert_eq!(
                cfg(&[(name, value)]).unwrap().unsupported_by_daemon(),
                Ok(()),
                "{name}={value}"
            );
        }
    }
}
