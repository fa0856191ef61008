//! The checkpoint in upstream's format (`vpc-cni-ipam/1`, upstream-ipamd.md §3.2), so that a node can move
//! between the Amazon VPC CNI and vpc-cni-rs without draining. Writing the file is the caller's job.

use crate::pool::{IpamKey, PodMeta, Pool};
use crate::time::Time;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr};

pub const VERSION: &str = "vpc-cni-ipam/1";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: String,
    pub allocations: Vec<Allocation>,
}

fn is_empty(s: &str) -> bool {
    s.is_empty()
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default, skip_serializing_if = "is_empty")]
    pub k8s_pod_namespace: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub k8s_pod_name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interfaces_count: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    #[serde(default, skip_serializing_if = "is_empty")]
    pub network_name: String,
    #[serde(rename = "containerID", default, skip_serializing_if = "is_empty")]
    pub container_id: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub if_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    /// An IPv6 pod's IPv4 egress address: ours alone (upstream's egress plugin keeps its own files),
    /// and ignored by upstream's reader.
    #[serde(
        rename = "egressIPv4",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub egress_ipv4: Option<Ipv4Addr>,
    /// Unix nanoseconds.
    #[serde(default)]
    pub allocation_timestamp: i64,
    #[serde(default)]
    pub metadata: Metadata,
}

impl Allocation {
    pub fn key(&self) -> IpamKey {
        IpamKey::new(&self.network_name, &self.container_id, &self.if_name)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("checkpoint is not valid JSON of the vpc-cni-ipam/1 format: {0}")]
    Corrupt(String),
    #[error("checkpoint version {found:?} is not {VERSION:?}")]
    Version { found: String },
    #[error("checkpoint assigns {0} twice")]
    DuplicateAddress(Ipv4Addr),
    #[error("checkpoint assigns {0} twice")]
    DuplicateV6(Ipv6Addr),
}

impl Checkpoint {
    pub fn parse(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
        let cp: Checkpoint =
            serde_json::from_slice(bytes).map_err(|e| CheckpointError::Corrupt(e.to_string()))?;
        if cp.version != VERSION {
            return Err(CheckpointError::Version { found: cp.version });
        }
        Ok(cp)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a checkpoint always serialises")
    }
}

/// What a restore kept and dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    pub restored: usize,
    /// Pods whose host veth is gone: the caller removes their leftover ip rules.
    pub dead: Vec<Allocation>,
    /// Addresses on no ENI or prefix the node has any more.
    pub stale: Vec<Allocation>,
}

impl Pool {
    /// Every assignment, sorted by key so that the same pool always writes the same bytes.
    pub fn checkpoint(&self) -> Checkpoint {
        let mut allocations: Vec<Allocation> = self
            .assignments()
            .map(|(k, a)| Allocation {
                network_name: k.network_name.clone(),
                container_id: k.container_id.clone(),
                if_name: k.if_name.clone(),
                ipv4: Some(a.ip),
                ipv6: None,
                egress_ipv4: None,
                allocation_timestamp: a.assigned_at.as_nanos() as i64,
                metadata: Metadata {
                    k8s_pod_namespace: a.meta.namespace.clone(),
                    k8s_pod_name: a.meta.name.clone(),
                    interfaces_count: a.meta.interfaces_count,
                },
            })
            .collect();
        allocations.sort_by_key(Allocation::key);
        Checkpoint {
            version: VERSION.to_string(),
            allocations,
        }
    }

    /// Re-assigns what a checkpoint recorded, once the ENIs and their addresses are known (§3.2): entries
    /// whose pod is gone (`alive` says no) or whose address the node no longer has are dropped; an address
    /// recorded twice aborts the restore and leaves the pool as it was.
    pub fn restore(
        &mut self,
        cp: &Checkpoint,
        alive: impl Fn(&Allocation) -> bool,
    ) -> Result<RestoreReport, CheckpointError> {
        let mut seen = std::collections::HashSet::new();
        for a in &cp.allocations {
            if let Some(ip) = a.ipv4 {
                if !seen.insert(ip) {
                    return Err(CheckpointError::DuplicateAddress(ip));
                }
            }
        }
        let mut report = RestoreReport::default();
        for a in &cp.allocations {
            let Some(ip) = a.ipv4 else {
                report.stale.push(a.clone());
                continue;
            };
            if !alive(a) {
                report.dead.push(a.clone());
                continue;
            }
            let meta = PodMeta {
                namespace: a.metadata.k8s_pod_namespace.clone(),
                name: a.metadata.k8s_pod_name.clone(),
                interfaces_count: a.metadata.interfaces_count,
            };
            let at = Time(a.allocation_timestamp.max(0) as u64);
            if self.assign_exact(&a.key(), ip, meta, at) {
                report.restored += 1;
            } else {
                report.stale.push(a.clone());
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{EniInfo, NodeSpec};
    use crate::settings::PoolSettings;
    use std::time::Duration;

    fn pool() -> Pool {
        let node = NodeSpec {
            instance_type: "m5.large".into(),
            slots_per_eni: 9,
            max_enis: 3,
            max_pods: 29,
            supports_prefixes: true,
            primary_subnet: "subnet-a".into(),
            security_groups: vec![],
            eni_config: None,
            unmanaged_enis: 0,
            unschedulable: false,
        };
        let mut p = Pool::new(node, &PoolSettings::default());
        p.add_eni(
            EniInfo {
                id: "eni-0".into(),
                device_number: 0,
                subnet_id: "subnet-a".into(),
                subnet_cidr: "10.0.1.0/24".parse().unwrap(),
                primary_ip: "10.0.1.5".parse().unwrap(),
                is_primary: true,
                is_trunk: false,
                is_efa: false,
                excluded: false,
            },
            Time::ZERO,
        );
        p.add_blocks(
            "eni-0",
            &[
                "10.0.1.23/32".parse().unwrap(),
                "10.0.1.24/32".parse().unwrap(),
            ],
        );
        p
    }

    const UPSTREAM: &str = r#"{"version":"vpc-cni-ipam/1","allocations":[{"networkName":"aws-cni","containerID":"sandbox1","ifName":"eth0","ipv4":"10.0.1.23","allocationTimestamp":1700000000000000000,"metadata":{"k8sPodNamespace":"default","k8sPodName":"web-1","interfacesCount":1}}]}"#;

    #[test]
    fn reads_and_writes_upstream_bytes_exactly() {
        let cp = Checkpoint::parse(UPSTREAM.as_bytes()).unwrap();
        let mut p = pool();
        let report = p.restore(&cp, |_| true).unwrap();
        assert_eq!(report.restored, 1);
        let a = p
            .assignment(&IpamKey::new("aws-cni", "sandbox1", "eth0"))
            .unwrap();
        assert_eq!(a.ip.to_string(), "10.0.1.23");
        assert_eq!(a.assigned_at, Time(1_700_000_000_000_000_000));
        assert_eq!(
            String::from_utf8(p.checkpoint().to_json()).unwrap(),
            UPSTREAM
        );
    }

    #[test]
    fn restored_address_is_not_handed_out_again() {
        let mut p = pool();
        p.restore(&Checkpoint::parse(UPSTREAM.as_bytes()).unwrap(), |_| true)
            .unwrap();
        let other = p
            .assign(
                &IpamKey::new("aws-cni", "c2", "eth0"),
                &PodMeta::default(),
                Time::ZERO,
                Duration::ZERO,
            )
            .unwrap()
            .clone();
        assert_eq!(other.ip.to_string(), "10.0.1.24");
    }

    #[test]
    fn restore_drops_dead_and_stale_entries() {
        let mut cp = Checkpoint::parse(UPSTREAM.as_bytes()).unwrap();
        let mut stale = cp.allocations[0].clone();
        stale.container_id = "gone-ip".into();
        stale.ipv4 = Some("10.9.9.9".parse().unwrap());
        let mut dead = cp.allocations[0].clone();
        dead.container_id = "dead".into();
        dead.ipv4 = Some("10.0.1.24".parse().unwrap());
        cp.allocations.extend([stale, dead]);
        let mut p = pool();
        let report = p.restore(&cp, |a| a.container_id != "dead").unwrap();
        assert_eq!(
            (report.restored, report.stale.len(), report.dead.len()),
            (1, 1, 1)
        );
        assert_eq!(p.stats().assigned, 1);
    }

    #[test]
    fn duplicate_address_aborts_and_changes_nothing() {
        let mut cp = Checkpoint::parse(UPSTREAM.as_bytes()).unwrap();
        let mut twin = cp.allocations[0].clone();
        twin.container_id = "twin".into();
        cp.allocations.push(twin);
        let mut p = pool();
        assert!(matches!(
            p.restore(&cp, |_| true),
            Err(CheckpointError::DuplicateAddress(_))
        ));
        assert_eq!(p.stats().assigned, 0);
    }

    #[test]
    fn corrupt_and_foreign_files_are_clear_errors() {
        assert!(matches!(
            Checkpoint::parse(b"{\"version\":"),
            Err(CheckpointError::Corrupt(_))
        ));
        let other = br#"{"version":"vpc-cni-ipam/2","allocations":[]}"#;
        assert_eq!(
            Checkpoint::parse(other),
            Err(CheckpointError::Version {
                found: "vpc-cni-ipam/2".into()
            })
        );
    }
}
