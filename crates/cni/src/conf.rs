//! What the runtime gives the plugin: the network configuration on stdin, the `CNI_*` environment
//! and the `CNI_ARGS` key-value pairs. Everything is validated before anything is touched.

use crate::error::{CniError, Code};
use datapath::branch::Enforcing;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const DEFAULT_MTU: u32 = 9001;
const DEFAULT_VETH_PREFIX: &str = "eni";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: Option<String>,
    name: Option<String>,
    veth_prefix: Option<String>,
    mtu: Option<Value>,
    plugin_log_file: Option<String>,
    ipamd_socket: Option<PathBuf>,
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<ValidAttachment>>,
    #[serde(rename = "enableIPv6")]
    enable_ipv6: Option<bool>,
    #[serde(rename = "enableV4Egress")]
    enable_v4_egress: Option<bool>,
    #[serde(rename = "podSGEnforcingMode")]
    pod_sg_enforcing_mode: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The plugin's configuration, as upstream's conflist spells it (upstream-plugin.md §1.2), plus
/// `ipamdSocket`, where to reach the daemon. Keys it does not use (`pluginLogLevel`,
/// `capabilities`, ...) pass, as the spec asks.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub veth_prefix: String,
    pub mtu: u32,
    pub plugin_log_file: Option<PathBuf>,
    pub ipamd_socket: PathBuf,
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// `enableIPv6` (the installer writes ENABLE_IPv6): the pod gets an IPv6 address. Known before
    /// the daemon answers, so the family's routes are added while it does.
    pub ipv6: bool,
    /// `enableV4Egress` (ENABLE_V4_EGRESS, default true): an IPv6 pod also gets `v4if0`.
    pub v4_egress: bool,
    /// `podSGEnforcingMode` (POD_SECURITY_GROUP_ENFORCING_MODE, default strict): how a pod with a
    /// branch ENI is wired.
    pub pod_sg_enforcing: Enforcing,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let raw: RawConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                Code::DecodingFailure,
                "network configuration is not valid JSON",
            )
            .details(e.to_string())
        })?;
        let cni_version = raw.cni_version.ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                "network configuration lacks cniVersion",
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!(
                    "cniVersion {cni_version} is not supported (supported: {})",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let name = raw.name.filter(|n| !n.is_empty()).ok_or_else(|| {
            CniError::new(Code::InvalidConfig, "network configuration lacks a name")
        })?;
        let veth_prefix = raw
            .veth_prefix
            .unwrap_or_else(|| DEFAULT_VETH_PREFIX.into());
        if veth_prefix.is_empty()
            || veth_prefix.len() > 4
            || ["eth", "lo", "vlan"].contains(&veth_prefix.as_str())
        {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!(
                    "vethPrefix {veth_prefix:?} must be 1 to 4 characters and not eth, lo or vlan"
                ),
            ));
        }
        let mtu = match raw.mtu {
            None => DEFAULT_MTU,
            Some(value) => parse_mtu(&value)?,
        };
        let pod_sg_enforcing = match raw.pod_sg_enforcing_mode.as_deref() {
            None | Some("strict") => Enforcing::Strict,
            Some("standard") => Enforcing::Standard,
            Some(other) => {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    format!("podSGEnforcingMode {other:?} must be strict or standard"),
                ))
            }
        };
        Ok(Self {
            cni_version,
            name,
            veth_prefix,
            mtu,
            plugin_log_file: raw
                .plugin_log_file
                .filter(|f| !f.is_empty())
                .map(Into::into),
            ipamd_socket: raw
                .ipamd_socket
                .unwrap_or_else(|| proto::DEFAULT_SOCKET.into()),
            prev_result: raw.prev_result,
            valid_attachments: raw.valid_attachments,
            ipv6: raw.enable_ipv6.unwrap_or(false),
            v4_egress: raw.enable_v4_egress.unwrap_or(true),
            pod_sg_enforcing,
        })
    }

    /// Whether this configuration's version is at least `major.minor`.
    pub fn version_at_least(&self, major: u32, minor: u32) -> bool {
        let mut parts = self
            .cni_version
            .split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let have = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        have >= (major, minor)
    }
}

/// Upstream writes the MTU as a string and silently uses 9001 for anything it cannot read; a typo
/// here would quietly fragment every pod's traffic, so it is an error instead.
fn parse_mtu(value: &Value) -> Result<u32, CniError> {
    let parsed = match value {
        Value::String(s) => s.trim().parse::<u32>().ok(),
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    };
    match parsed {
        Some(mtu) if (576..=9001).contains(&mtu) => Ok(mtu),
        _ => Err(CniError::new(
            Code::InvalidConfig,
            format!("mtu {value} must be an integer from 576 to 9001"),
        )),
    }
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
}

impl Env {
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        Self {
            command: get("CNI_COMMAND").unwrap_or_default(),
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            args: get("CNI_ARGS").unwrap_or_default(),
        }
    }

    /// The checks the spec asks of ADD, DEL and CHECK.
    pub fn validate(&self, needs_netns: bool) -> Result<(), CniError> {
        if self.container_id.is_empty() {
            return Err(missing("CNI_CONTAINERID"));
        }
        let id_ok = self
            .container_id
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && self
                .container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !id_ok {
            return Err(CniError::new(
                Code::InvalidEnvironment,
                format!(
                    "CNI_CONTAINERID {:?} must match [a-zA-Z0-9][a-zA-Z0-9_.-]*",
                    self.container_id
                ),
            ));
        }
        if self.ifname.is_empty() {
            return Err(missing("CNI_IFNAME"));
        }
        let name_ok = self.ifname.len() <= 15
            && self.ifname != "."
            && self.ifname != ".."
            && !self
                .ifname
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace());
        if !name_ok {
            return Err(CniError::new(
                Code::InvalidEnvironment,
                format!(
                    "CNI_IFNAME {:?} is not a valid interface name (at most 15 characters, no '/', ':' or spaces)",
                    self.ifname
                ),
            ));
        }
        if needs_netns && self.netns.is_empty() {
            return Err(missing("CNI_NETNS"));
        }
        Ok(())
    }
}

fn missing(name: &str) -> CniError {
    CniError::new(
        Code::InvalidEnvironment,
        format!("{name} is required for this command"),
    )
}

/// `CNI_ARGS`: `K=V;K=V`. The Kubernetes keys are known; any other key is an error unless
/// `IgnoreUnknown` is true, as the spec's reference plugins do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct K8sArgs {
    pub pod_name: String,
    pub pod_namespace: String,
    pub infra_container_id: String,
    pub pod_uid: String,
}

impl K8sArgs {
    pub fn parse(args: &str) -> Result<Self, CniError> {
        let mut pairs = BTreeMap::new();
        for pair in args.split(';').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                CniError::new(
                    Code::InvalidEnvironment,
                    format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"),
                )
            })?;
            pairs.insert(key.to_string(), value.to_string());
        }
        let ignore_unknown = pairs
            .get("IgnoreUnknown")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true"));
        let mut parsed = Self::default();
        let mut unknown = Vec::new();
        for (key, value) in pairs {
            match key.as_str() {
                "K8S_POD_NAME" => parsed.pod_name = value,
                "K8S_POD_NAMESPACE" => parsed.pod_namespace = value,
                "K8S_POD_INFRA_CONTAINER_ID" => parsed.infra_container_id = value,
                "K8S_POD_UID" => parsed.pod_uid = value,
                "IgnoreUnknown" => {}
                _ => unknown.push(key),
            }
        }
        if !unknown.is_empty() && !ignore_unknown {
            return Err(CniError::new(
                Code::InvalidEnvironment,
                format!(
                    "CNI_ARGS has unknown keys {unknown:?} (add IgnoreUnknown=1 to allow them)"
                ),
            ));
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_as_upstream() {
        let conf =
            NetConf::parse(br#"{"cniVersion":"0.4.0","name":"aws-cni","type":"vpc-cni"}"#).unwrap();
        assert_eq!(conf.veth_prefix, "eni");
        assert_eq!(conf.mtu, 9001);
        assert_eq!(conf.ipamd_socket, PathBuf::from(proto::DEFAULT_SOCKET));
        assert!(conf.version_at_least(0, 4) && !conf.version_at_least(1, 0));
    }

    #[test]
    fn mtu_as_string_or_number_and_bad_ones_refused() {
        let parse = |mtu: &str| {
            NetConf::parse(format!(r#"{{"cniVersion":"1.0.0","name":"n","mtu":{mtu}}}"#).as_bytes())
        };
        assert_eq!(parse("\"1500\"").unwrap().mtu, 1500);
        assert_eq!(parse("9000").unwrap().mtu, 9000);
        for bad in ["\"jumbo\"", "100", "65536", "true"] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.code, Code::InvalidConfig, "{bad}");
        }
    }

    #[test]
    fn bad_configurations_get_the_spec_codes() {
        assert_eq!(
            NetConf::parse(b"{not json").unwrap_err().code,
            Code::DecodingFailure
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"9.9.9","name":"n"}"#)
                .unwrap_err()
                .code,
            Code::IncompatibleVersion
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.0.0"}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","vethPrefix":"toolong"}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
    }

    #[test]
    fn cni_args_known_unknown_and_ignore_unknown() {
        let args = K8sArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc;Other=x",
        )
        .unwrap();
        assert_eq!(args.pod_name, "web");
        assert_eq!(args.pod_namespace, "default");
        let err = K8sArgs::parse("K8S_POD_NAME=web;Other=x").unwrap_err();
        assert!(err.msg.contains("Other"), "{}", err.msg);
        assert!(K8sArgs::parse("garbage").is_err());
        assert_eq!(K8sArgs::parse("").unwrap(), K8sArgs::default());
    }

    #[test]
    fn environment_checks() {
        let good = Env {
            command: "ADD".into(),
            container_id: "abc-123".into(),
            netns: "/var/run/netns/x".into(),
            ifname: "eth0".into(),
            args: String::new(),
        };
        assert!(good.validate(true).is_ok());
        let bad_id = Env {
            container_id: "-abc".into(),
            ..good.clone()
        };
        assert_eq!(
            bad_id.validate(true).unwrap_err().code,
            Code::InvalidEnvironment
        );
        let bad_if = Env {
            ifname: "eth0:1".into(),
            ..good.clone()
        };
        assert!(bad_if.validate(true).is_err());
        let no_netns = Env {
            netns: String::new(),
            ..good
        };
        assert!(no_netns.validate(true).is_err());
        assert!(no_netns.validate(false).is_ok());
    }
}
