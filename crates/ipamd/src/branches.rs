//! Security groups for pods on EKS (`ENABLE_POD_ENI=true`): the VPC resource controller gives each
//! pod a SecurityGroupPolicy selects a branch ENI on the node's trunk and writes it in the pod's
//! annotation; the daemon answers that pod's ADD with the branch instead of an address of its pool,
//! and its DEL with the branch again, so that the plugin wires and unwires the pod behind its VLAN.
//! These answers are the plugin socket's, before the control loop: a branch is the controller's, not
//! the pool's, and reading the pod must not hold up other pods' ADDs.
//!
//! Where the node makes its branches (`POD_ENI_MANAGER=node`), the plugin socket reads only the
//! pod's groups ([`PodGroupsSource`]) and the control loop gives the branch (`ipam::branches`);
//! [`restore`] finds the branches of the last run at start.

use cloud::{Ec2, EniQuery};
use ipam::branch::BranchEni;
use ipam::ownership::InterfaceType;
use k8s::{PodEni, PodEniError};
use proto::{Allocation, BranchAllocation, ErrorKind, Reply, Request};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How long an ADD waits for the controller's annotation on a pod that asks for a branch.
pub const ANNOTATION_PATIENCE: Duration = Duration::from_secs(8);

/// Where pods' branch ENIs are read: the API server, in the daemon.
pub trait PodEniSource: Send + Sync {
    fn pod_eni<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        patience: Duration,
    ) -> BoxFuture<'a, Result<PodEni, PodEniError>>;
}

impl PodEniSource for std::sync::Arc<k8s::Cluster> {
    fn pod_eni<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        patience: Duration,
    ) -> BoxFuture<'a, Result<PodEni, PodEniError>> {
        Box::pin(k8s::Cluster::pod_eni(self, namespace, name, patience))
    }
}

/// Where a pod's security groups are read when the node makes its branches: the API server's
/// SecurityGroupPolicies and ServiceAccounts, in the daemon.
pub trait PodGroupsSource: Send + Sync {
    fn pod_groups<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, PodEniError>>;
}

impl PodGroupsSource for std::sync::Arc<k8s::Cluster> {
    fn pod_groups<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, PodEniError>> {
        Box::pin(k8s::Cluster::pod_groups(self, namespace, name))
    }
}

/// How the plugin socket finds a pod's branch with security groups for pods on.
pub enum PodEniMode {
    /// The VPC resource controller made it and annotated the pod (EKS).
    Controller(std::sync::Arc<Branches>),
    /// The node makes it: the socket reads the pod's groups, the control loop gives the branch.
    Node(std::sync::Arc<dyn PodGroupsSource>),
}

/// The node's branches at start (`POD_ENI_MANAGER=node`): the associations EC2 lists on the trunk,
/// read with the file saved by the last run (`ipam::branches::reconcile`); nothing without a trunk
/// (its branches went with it).
pub async fn restore(
    ec2: &impl Ec2,
    trunk: Option<&ipam::pool::EniInfo>,
    saved: &[ipam::branches::SavedBranch],
) -> cloud::Result<ipam::branches::Reconciled> {
    use ipam::branches::{reconcile, Associated};
    let Some(trunk) = trunk else {
        return Ok(reconcile(
            saved,
            ipam::Ipv4Cidr::host([0, 0, 0, 0].into()),
            &[],
        ));
    };
    let associations = ec2.describe_trunk_interface_associations(&trunk.id).await?;
    let unknown: Vec<String> = associations
        .iter()
        .filter(|a| !saved.iter().any(|s| s.association_id == a.association_id))
        .map(|a| a.branch_id.clone())
        .collect();
    let described = if unknown.is_empty() {
        Vec::new()
    } else {
        // One missing id fails the whole call: those associations then keep their VLAN ids until
        // the cooldown deletes them (`reconcile`).
        match ec2
            .describe_network_interfaces(&EniQuery {
                ids: unknown,
                ..EniQuery::default()
            })
            .await
        {
            Err(e) if e.kind == cloud::ErrorKind::NotFound => Vec::new(),
            other => other?,
        }
    };
    let associated: Vec<Associated> = associations
        .into_iter()
        .map(|a| Associated {
            eni: described
                .iter()
                .find(|e| e.id == a.branch_id)
                .and_then(|e| Some((e.mac.clone(), e.primary_ip?, e.security_groups.clone()))),
            association_id: a.association_id,
            eni_id: a.branch_id,
            vlan: a.vlan,
        })
        .collect();
    Ok(reconcile(saved, trunk.subnet_cidr, &associated))
}

/// Where the trunk ENI's MAC is found when start-up did not see a trunk (the controller attaches it
/// after the node asked for the feature): EC2, once.
pub trait TrunkSource: Send + Sync {
    fn trunk_mac(&self) -> BoxFuture<'_, Result<Option<[u8; 6]>, String>>;
}

/// The trunk among the instance's ENIs, as EC2 lists them, through the executor's client.
pub struct Ec2Trunk<E, L> {
    pub executor: std::sync::Arc<crate::executor::Executor<E, L>>,
    pub instance_id: String,
}

impl<E: Ec2, L: crate::executor::Links> TrunkSource for Ec2Trunk<E, L> {
    fn trunk_mac(&self) -> BoxFuture<'_, Result<Option<[u8; 6]>, String>> {
        Box::pin(async move {
            let query = EniQuery {
                filters: vec![(
                    "attachment.instance-id".into(),
                    vec![self.instance_id.clone()],
                )],
                ..EniQuery::default()
            };
            let enis = self
                .executor
                .ec2
                .describe_network_interfaces(&query)
                .await
                .map_err(|e| e.to_string())?;
            Ok(enis
                .iter()
                .find(|e| e.interface_type == InterfaceType::Trunk)
                .and_then(|e| crate::executor::parse_mac(&e.mac)))
        })
    }
}

pub struct Branches {
    pods: Box<dyn PodEniSource>,
    trunks: Box<dyn TrunkSource>,
    trunk_mac: Mutex<Option<[u8; 6]>>,
    patience: Duration,
}

fn error(kind: ErrorKind, message: String) -> Reply {
    Reply::Error { kind, message }
}

impl Branches {
    /// `trunk_mac`: the trunk start-up found among the node's ENIs, if any.
    pub fn new(
        pods: Box<dyn PodEniSource>,
        trunks: Box<dyn TrunkSource>,
        trunk_mac: Option<[u8; 6]>,
        patience: Duration,
    ) -> Branches {
        Branches {
            pods,
            trunks,
            trunk_mac: Mutex::new(trunk_mac),
            patience,
        }
    }

    /// The answer to a branch pod's ADD, CHECK or DEL; None for any other request, which goes to
    /// the control loop.
    pub async fn answer(&self, request: &Request) -> Option<Reply> {
        match request {
            Request::Add { pod, .. } => {
                let branches = match self
                    .pods
                    .pod_eni(&pod.namespace, &pod.name, self.patience)
                    .await
                {
                    Ok(PodEni::NotRequested) => return None,
                    Ok(PodEni::Branches(b)) => b,
                    Err(e @ PodEniError::Malformed(..)) => {
                        return Some(error(ErrorKind::BadRequest, e.to_string()))
                    }
                    Err(e) => return Some(error(ErrorKind::Unavailable, e.to_string())),
                };
                Some(match self.allocation(&branches).await {
                    Ok(allocation) => Reply::Added { allocation },
                    Err(e) => error(ErrorKind::Unavailable, e),
                })
            }
            // CHECK: what the annotation says, which only the pod has. A pod the API server does
            // not show as a branch pod (or cannot show now) is looked up in the pool, so that the
            // CHECK of a pod of the pool never depends on the API server.
            Request::Lookup { pod: Some(pod), .. } => {
                let branches = self.annotated(pod).await?;
                Some(match self.allocation(&branches).await {
                    Ok(allocation) => Reply::Found {
                        allocation: Some(allocation),
                    },
                    Err(e) => error(ErrorKind::Unavailable, e),
                })
            }
            Request::Del { pod: Some(pod), .. } => {
                // The pod is still there at its sandbox's DEL (its object goes once the kubelet has
                // torn it down); when it is not, the plugin falls back to its prevResult.
                let branches = self.annotated(pod).await?;
                let released = self.allocation(&branches).await.ok()?;
                Some(Reply::Deleted {
                    released: Some(released),
                })
            }
            _ => None,
        }
    }

    /// The pod's branches as its annotation says now, without waiting; None when it has none or
    /// cannot be read.
    async fn annotated(&self, pod: &proto::PodRef) -> Option<Vec<BranchEni>> {
        match self
            .pods
            .pod_eni(&pod.namespace, &pod.name, Duration::ZERO)
            .await
        {
            Ok(PodEni::Branches(branches)) => Some(branches),
            _ => None,
        }
    }

    async fn trunk(&self) -> Result<[u8; 6], String> {
        if let Some(mac) = *self.trunk_mac.lock().expect("trunk") {
            return Ok(mac);
        }
        let found = self.trunks.trunk_mac().await?.ok_or_else(|| {
            "the node has no trunk ENI yet: the VPC resource controller attaches one once the node's \
             CNINode has SecurityGroupsForPods"
                .to_string()
        })?;
        *self.trunk_mac.lock().expect("trunk") = Some(found);
        Ok(found)
    }

    /// The pod's (first) branch as the plugin wires it.
    async fn allocation(&self, branches: &[BranchEni]) -> Result<Allocation, String> {
        let b = branches
            .first()
            .ok_or("the pod's branch ENI annotation is an empty list")?;
        let (Some(address), Some(subnet)) = (b.ipv4, b.subnet_v4) else {
            return Err(format!(
                "branch {} has no IPv4 address or subnet: IPv6 branch pods are not supported",
                b.eni_id
            ));
        };
        let mac = crate::executor::parse_mac(&b.mac)
            .ok_or_else(|| format!("branch {}: MAC {:?}", b.eni_id, b.mac))?;
        Ok(Allocation {
            address: address.into(),
            device_number: 0,
            route_table: datapath::branch::route_table(b.vlan_id),
            egress_v4: None,
            branch: Some(BranchAllocation {
                vlan: b.vlan_id,
                mac,
                subnet: subnet.addr(),
                subnet_len: subnet.prefix_len(),
                trunk_mac: self.trunk().await?,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Attachment, DelReason, PodRef};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    const TRUNK: [u8; 6] = [0x02, 0x7a, 0, 0, 0, 1];

    /// Pods by name: their annotation's branches, nothing asked for, or an error.
    struct Pods(HashMap<&'static str, Result<PodEni, PodEniError>>);

    impl PodEniSource for Pods {
        fn pod_eni<'a>(
            &'a self,
            _: &'a str,
            name: &'a str,
            _: Duration,
        ) -> BoxFuture<'a, Result<PodEni, PodEniError>> {
            let answer = self
                .0
                .get(name)
                .cloned()
                .unwrap_or(Err(PodEniError::Api(name.into(), "404 not found".into())));
            Box::pin(async move { answer })
        }
    }

    /// A trunk EC2 lists once it is attached; counts the lookups.
    struct Trunks(Option<[u8; 6]>, Arc<AtomicU32>);

    impl TrunkSource for Trunks {
        fn trunk_mac(&self) -> BoxFuture<'_, Result<Option<[u8; 6]>, String>> {
            self.1.fetch_add(1, Ordering::SeqCst);
            let mac = self.0;
            Box::pin(async move { Ok(mac) })
        }
    }

    fn branch() -> BranchEni {
        ipam::branch::parse_pod_eni(
            r#"[{"eniId":"eni-b","ifAddress":"02:00:00:00:00:0b","privateIp":"10.0.0.77","vlanId":4,"subnetCidr":"10.0.0.0/24"}]"#,
        )
        .unwrap()
        .remove(0)
    }

    fn pod(name: &str) -> PodRef {
        PodRef {
            namespace: "shop".into(),
            name: name.into(),
            infra_container_id: String::new(),
            uid: String::new(),
        }
    }

    fn attachment(name: &str) -> Attachment {
        Attachment {
            container_id: format!("sandbox-{name}"),
            ifname: "eth0".into(),
            network: "aws-cni".into(),
        }
    }

    fn add(name: &str) -> Request {
        Request::Add {
            attachment: attachment(name),
            pod: pod(name),
            netns: "/var/run/netns/x".into(),
        }
    }

    fn del(name: &str) -> Request {
        Request::Del {
            attachment: attachment(name),
            pod: Some(pod(name)),
            reason: DelReason::PodDeleted,
        }
    }

    fn branches(trunk_at_start: Option<[u8; 6]>, lookups: Arc<AtomicU32>) -> Branches {
        let pods = Pods(HashMap::from([
            ("db", Ok(PodEni::Branches(vec![branch()]))),
            ("web", Ok(PodEni::NotRequested)),
            (
                "late",
                Err(PodEniError::NotYetAnnotated(
                    "shop/late".into(),
                    ANNOTATION_PATIENCE,
                )),
            ),
            (
                "bad",
                Err(PodEniError::Malformed("shop/bad".into(), "vlanId 0".into())),
            ),
        ]));
        Branches::new(
            Box::new(pods),
            Box::new(Trunks(Some(TRUNK), lookups)),
            trunk_at_start,
            ANNOTATION_PATIENCE,
        )
    }

    #[tokio::test]
    async fn a_branch_pod_is_answered_with_its_branch_and_others_go_to_the_pool() {
        let lookups = Arc::new(AtomicU32::new(0));
        let b = branches(None, lookups.clone());
        let Some(Reply::Added { allocation }) = b.answer(&add("db")).await else {
            panic!()
        };
        assert_eq!(allocation.address.to_string(), "10.0.0.77");
        assert_eq!(allocation.route_table, 104);
        let branch = allocation.branch.unwrap();
        assert_eq!(
            (
                branch.vlan,
                branch.mac,
                branch.subnet.to_string(),
                branch.subnet_len
            ),
            (4, [2, 0, 0, 0, 0, 0x0b], "10.0.0.0".into(), 24)
        );
        assert_eq!(branch.trunk_mac, TRUNK, "found in EC2");
        b.answer(&add("db")).await.unwrap();
        assert_eq!(lookups.load(Ordering::SeqCst), 1, "EC2 asked once");

        let check = |name: &str| Request::Lookup {
            attachment: attachment(name),
            pod: Some(pod(name)),
        };
        assert_eq!(
            b.answer(&check("db")).await,
            Some(Reply::Found {
                allocation: Some(allocation)
            }),
            "CHECK finds the branch in the annotation"
        );
        assert_eq!(b.answer(&check("web")).await, None, "the pool's");
        assert_eq!(b.answer(&add("web")).await, None, "the pool's");
        assert_eq!(b.answer(&del("web")).await, None);
        assert_eq!(
            b.answer(&del("gone")).await,
            None,
            "a pod gone goes to the pool"
        );
        let Some(Reply::Deleted {
            released: Some(released),
        }) = b.answer(&del("db")).await
        else {
            panic!()
        };
        assert_eq!(released, allocation);
    }

    #[tokio::test]
    async fn a_missing_or_bad_annotation_and_a_missing_trunk_are_errors_that_say_so() {
        let b = branches(Some(TRUNK), Arc::new(AtomicU32::new(0)));
        let Some(Reply::Error { kind, message }) = b.answer(&add("late")).await else {
            panic!()
        };
        assert_eq!(kind, ErrorKind::Unavailable);
        assert!(message.contains("VPC resource controller"), "{message}");
        let Some(Reply::Error { kind, .. }) = b.answer(&add("bad")).await else {
            panic!()
        };
        assert_eq!(kind, ErrorKind::BadRequest);

        let no_trunk = Branches::new(
            Box::new(Pods(HashMap::from([(
                "db",
                Ok(PodEni::Branches(vec![branch()])),
            )]))),
            Box::new(Trunks(None, Arc::new(AtomicU32::new(0)))),
            None,
            ANNOTATION_PATIENCE,
        );
        let Some(Reply::Error { kind, message }) = no_trunk.answer(&add("db")).await else {
            panic!()
        };
        assert_eq!(kind, ErrorKind::Unavailable);
        assert!(message.contains("no trunk ENI"), "{message}");
    }
}
