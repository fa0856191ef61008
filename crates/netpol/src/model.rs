//! The inputs: `networking.k8s.io/v1` NetworkPolicy as the API server serves it (defaults applied),
//! and the namespaces and pods it selects from, reduced to what the semantics read.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

pub type Labels = BTreeMap<String, String>;

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// The API's default when a port names none.
    #[default]
    Tcp,
    Udp,
    Sctp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    Ingress,
    Egress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default)]
    pub values: Vec<String>,
}

/// A label selector; the empty one selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: Labels,
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    /// Every label of `match_labels` and every requirement holds (Kubernetes' `labels.Selector`:
    /// `NotIn` holds where the label is absent).
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator {
                    Operator::In => value.is_some_and(|v| r.values.contains(v)),
                    Operator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// An address block; host bits are ignored, as the API server's sloppy parsing does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("{s:?} is not a CIDR such as 10.0.0.0/16 or 2001:db8::/64");
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(bad());
        }
        Ok(Cidr { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Container ports with a name: what named ports in policies resolve to.
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

/// One element of a rule's `from` or `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Peer {
    /// `podSelector` and/or `namespaceSelector`: with both, pods matching the first in namespaces
    /// matching the second; with the pod selector alone, in the policy's own namespace; with the
    /// namespace selector alone, every pod of the matching namespaces.
    Pods {
        pod_selector: Option<Selector>,
        namespace_selector: Option<Selector>,
    },
    IpBlock {
        cidr: Cidr,
        except: Vec<Cidr>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortSpec {
    #[serde(default)]
    pub protocol: Protocol,
    /// None: every port of the protocol.
    pub port: Option<PortRef>,
    /// With a numeric `port`: the range's last port.
    pub end_port: Option<u16>,
}

/// One ingress or egress rule; empty peers mean every peer, empty ports every port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    #[serde(default)]
    pub peers: Vec<Peer>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    /// As written; None defaults as the API does (Ingress, and Egress when there are egress rules).
    pub policy_types: Option<Vec<Direction>>,
    #[serde(default)]
    pub ingress: Vec<Rule>,
    #[serde(default)]
    pub egress: Vec<Rule>,
}

impl Policy {
    /// Whether the policy isolates the pods it selects in `direction`.
    pub fn applies(&self, direction: Direction) -> bool {
        match &self.policy_types {
            Some(types) => types.contains(&direction),
            None => direction == Direction::Ingress || !self.egress.is_empty(),
        }
    }

    pub fn rules(&self, direction: Direction) -> &[Rule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// Everything the semantics read: namespaces (their labels), pods and policies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub pods: Vec<Pod>,
    #[serde(default)]
    pub policies: Vec<Policy>,
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_labels as labels;

    #[test]
    fn selectors_as_kubernetes_reads_them() {
        let pod = labels(&[("app", "web"), ("tier", "front")]);
        assert!(Selector::default().matches(&pod));
        assert!(Selector::default().matches(&Labels::new()));
        let expr = |key: &str, operator, values: &[&str]| Selector {
            match_expressions: vec![Requirement {
                key: key.into(),
                operator,
                values: values.iter().map(|v| v.to_string()).collect(),
            }],
            ..Selector::default()
        };
        assert!(expr("app", Operator::In, &["web", "api"]).matches(&pod));
        assert!(!expr("app", Operator::In, &["api"]).matches(&pod));
        assert!(!expr("missing", Operator::In, &["x"]).matches(&pod));
        assert!(expr("missing", Operator::NotIn, &["x"]).matches(&pod));
        assert!(!expr("app", Operator::NotIn, &["web"]).matches(&pod));
        assert!(expr("tier", Operator::Exists, &[]).matches(&pod));
        assert!(expr("missing", Operator::DoesNotExist, &[]).matches(&pod));
        let both = Selector {
            match_labels: labels(&[("app", "web")]),
            ..expr("tier", Operator::NotIn, &["front"])
        };
        assert!(
            !both.matches(&pod),
            "matchLabels and expressions must all hold"
        );
    }

    #[test]
    fn policy_types_default_as_the_api_server_defaults_them() {
        let mut p = Policy::default();
        assert!(p.applies(Direction::Ingress));
        assert!(!p.applies(Direction::Egress));
        p.egress.push(Rule::default());
        assert!(p.applies(Direction::Egress));
        p.policy_types = Some(vec![Direction::Egress]);
        assert!(!p.applies(Direction::Ingress));
    }

    #[test]
    fn cidrs_parse_both_families_and_refuse_garbage() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!((c.addr.to_string(), c.len), ("10.1.2.3".into(), 8));
        assert!("2001:db8::/64".parse::<Cidr>().is_ok());
        for bad in ["10.0.0.0", "10.0.0.0/33", "::/129", "x/8"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
