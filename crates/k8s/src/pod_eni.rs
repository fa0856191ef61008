//! Security groups for pods on EKS, the daemon's side of the VPC resource controller's work: the
//! controller gives a pod that asks for `vpc.amazonaws.com/pod-eni` a branch ENI and writes it in
//! the pod's annotation; the daemon reads it at ADD. The kubelet may start the pod's sandbox before
//! the controller has written it: upstream then fails the ADD and the kubelet tries again later;
//! here the ADD waits a while for the annotation instead.

use crate::Cluster;
use ipam::branch::{parse_pod_eni, BranchEni, POD_ENI_ANNOTATION};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::Api;
use netpol::sgp::{groups_for, SecurityGroupPolicy};
use std::time::Duration;

/// The extended resource a pod selected by a SecurityGroupPolicy requests (the controller's webhook
/// adds it to the pod's first container).
pub const POD_ENI_RESOURCE: &str = "vpc.amazonaws.com/pod-eni";

/// How often the pod is read again while its annotation is awaited.
const POLL: Duration = Duration::from_millis(250);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodEni {
    /// The pod's branch ENIs, as the controller wrote them.
    Branches(Vec<BranchEni>),
    /// The pod asks for no branch: it takes an address of the node's.
    NotRequested,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodEniError {
    #[error("pod {0} asks for {POD_ENI_RESOURCE} but the VPC resource controller has not annotated it with its branch ENI after {1:?}; is the controller running, and does the node have a trunk ENI?")]
    NotYetAnnotated(String, Duration),
    #[error("pod {0}: {POD_ENI_ANNOTATION} is malformed: {1}")]
    Malformed(String, String),
    #[error("reading pod {0}: {1}")]
    Api(String, String),
}

/// Whether any container of the pod requests or is limited to the branch ENI resource.
pub fn requests_pod_eni(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else {
        return false;
    };
    spec.containers.iter().any(|c| {
        c.resources.as_ref().is_some_and(|r| {
            [&r.requests, &r.limits]
                .into_iter()
                .flatten()
                .any(|m| m.contains_key(POD_ENI_RESOURCE))
        })
    })
}

/// What the pod's annotation says, or that it asks for nothing.
pub fn pod_eni_of(pod: &Pod) -> Result<Option<PodEni>, String> {
    match pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(POD_ENI_ANNOTATION))
    {
        Some(text) => parse_pod_eni(text).map(|b| Some(PodEni::Branches(b))),
        None if requests_pod_eni(pod) => Ok(None),
        None => Ok(Some(PodEni::NotRequested)),
    }
}

/// The feature the daemon adds to its node's CNINode so that the controller gives the node a trunk
/// ENI and advertises its branch capacity.
pub const SGP_FEATURE: &str = "SecurityGroupsForPods";

fn cni_nodes() -> ApiResource {
    ApiResource {
        group: "vpcresources.k8s.aws".into(),
        version: "v1alpha1".into(),
        api_version: "vpcresources.k8s.aws/v1alpha1".into(),
        kind: "CNINode".into(),
        plural: "cninodes".into(),
    }
}

fn security_group_policies() -> ApiResource {
    ApiResource {
        group: "vpcresources.k8s.aws".into(),
        version: "v1beta1".into(),
        api_version: "vpcresources.k8s.aws/v1beta1".into(),
        kind: "SecurityGroupPolicy".into(),
        plural: "securitygrouppolicies".into(),
    }
}

/// A SecurityGroupPolicy as the API serves it (`spec.podSelector`, `spec.serviceAccountSelector`,
/// `spec.securityGroups.groupIds`). A selector that does not parse is absent, which leaves a policy
/// with neither invalid, as the controller's validation would have refused it.
pub fn security_group_policy(object: &DynamicObject) -> SecurityGroupPolicy {
    let spec = &object.data["spec"];
    let selector = |field: &str| {
        serde_json::from_value::<LabelSelector>(spec.get(field)?.clone())
            .ok()
            .map(|s| crate::policy_inputs::selector(&s))
    };
    SecurityGroupPolicy {
        namespace: object.metadata.namespace.clone().unwrap_or_default(),
        name: object.metadata.name.clone().unwrap_or_default(),
        pod_selector: selector("podSelector"),
        service_account_selector: selector("serviceAccountSelector"),
        groups: spec["securityGroups"]["groupIds"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g.as_str().map(str::to_string))
            .collect(),
    }
}

impl Cluster {
    /// The security groups of a pod's branch ENI where the node makes branches itself: the union
    /// over the SecurityGroupPolicies of its namespace that select it (by its labels and its
    /// service account's), read at the ADD, so that a policy changed a moment before applies.
    /// Empty when none selects it, or when the SecurityGroupPolicy CRD is not installed.
    pub async fn pod_groups(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<String>, PodEniError> {
        let who = format!("{namespace}/{name}");
        let api = |e: kube::Error| PodEniError::Api(who.clone(), e.to_string());
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let policies: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &security_group_policies());
        // Both at once: every ADD on the node waits for them, groups or not.
        let list = Default::default();
        let (pod, policies) = tokio::join!(pods.get(name), policies.list(&list));
        let pod = pod.map_err(api)?;
        let policies: Vec<SecurityGroupPolicy> = match policies {
            Ok(list) => list.items.iter().map(security_group_policy).collect(),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Vec::new()),
            Err(e) => return Err(api(e)),
        };
        if policies.iter().all(|p| p.invalid().is_some()) {
            return Ok(Vec::new());
        }
        let pod_labels = pod.metadata.labels.clone().unwrap_or_default();
        let mut account_labels = Default::default();
        if policies
            .iter()
            .any(|p| p.service_account_selector.is_some())
        {
            let account = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into());
            let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
            account_labels = match accounts.get_opt(&account).await.map_err(api)? {
                Some(sa) => sa.metadata.labels.unwrap_or_default(),
                None => Default::default(),
            };
        }
        Ok(groups_for(
            namespace,
            &pod_labels,
            &account_labels,
            &policies,
        ))
    }

    /// Writes the branch the node gave the pod in its `vpc.amazonaws.com/pod-eni` annotation, as
    /// the controller would have (a JSON merge patch of that one annotation).
    pub async fn annotate_pod_eni(
        &self,
        namespace: &str,
        name: &str,
        value: &str,
    ) -> Result<(), crate::ClusterError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {POD_ENI_ANNOTATION: value}}});
        pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(crate::api_error(format!(
                "annotating pod {namespace}/{name} with its branch ENI"
            )))
    }

    /// Advertises the node's branch capacity, `vpc.amazonaws.com/pod-eni` in its status, as EKS's
    /// controller does once the trunk is attached, for pods that request the resource.
    pub async fn advertise_branch_capacity(
        &self,
        branches: u32,
    ) -> Result<(), crate::ClusterError> {
        let node = &self.settings.node_name;
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        let patch =
            serde_json::json!({"status": {"capacity": {POD_ENI_RESOURCE: branches.to_string()}}});
        nodes
            .patch_status(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(crate::api_error(format!(
                "advertising {POD_ENI_RESOURCE} on node {node}"
            )))
    }

    /// Adds [`SGP_FEATURE`] to this node's CNINode (`vpcresources.k8s.aws/v1alpha1`), keeping the
    /// features already there. True when it was added, false when it was there already. The VPC
    /// resource controller makes the CNINode when the node joins; until then this fails, saying so.
    pub async fn enable_security_groups_for_pods(&self) -> Result<bool, crate::ClusterError> {
        let node = &self.settings.node_name;
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &cni_nodes());
        let current = api.get(node).await.map_err(crate::api_error(format!(
            "reading the CNINode {node} (made by the VPC resource controller)"
        )))?;
        let mut features = current.data["spec"]["features"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if features.iter().any(|f| f["name"] == SGP_FEATURE) {
            return Ok(false);
        }
        features.push(serde_json::json!({"name": SGP_FEATURE}));
        let patch = serde_json::json!({"spec": {"features": features}});
        api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(crate::api_error(format!(
                "adding {SGP_FEATURE} to the CNINode {node}"
            )))?;
        Ok(true)
    }

    /// The pod's branch ENIs, waiting up to `patience` for the controller's annotation when the
    /// pod asks for one.
    pub async fn pod_eni(
        &self,
        namespace: &str,
        name: &str,
        patience: Duration,
    ) -> Result<PodEni, PodEniError> {
        let who = format!("{namespace}/{name}");
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let pod = pods
                .get(name)
                .await
                .map_err(|e| PodEniError::Api(who.clone(), e.to_string()))?;
            match pod_eni_of(&pod) {
                Ok(Some(answer)) => return Ok(answer),
                Err(e) => return Err(PodEniError::Malformed(who, e)),
                Ok(None) if tokio::time::Instant::now() + POLL > deadline => {
                    return Err(PodEniError::NotYetAnnotated(who, patience))
                }
                Ok(None) => tokio::time::sleep(POLL).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_pod_asks_by_its_containers_resources_and_is_answered_by_its_annotation() {
        let asks = json!({"metadata": {"name": "db"}, "spec": {"containers": [
            {"name": "side", "image": "x"},
            {"name": "db", "image": "x",
             "resources": {"limits": {"vpc.amazonaws.com/pod-eni": "1"}}}]}});
        assert!(requests_pod_eni(&pod(asks.clone())));
        assert_eq!(pod_eni_of(&pod(asks.clone())), Ok(None), "waits");

        let mut annotated = asks.clone();
        annotated["metadata"]["annotations"] = json!({POD_ENI_ANNOTATION:
            r#"[{"eniId":"eni-1","ifAddress":"02:00:00:00:00:01","privateIp":"10.0.0.5","vlanId":3,"subnetCidr":"10.0.0.0/24"}]"#});
        let Ok(Some(PodEni::Branches(b))) = pod_eni_of(&pod(annotated.clone())) else {
            panic!()
        };
        assert_eq!((b[0].vlan_id, b[0].eni_id.as_str()), (3, "eni-1"));

        annotated["metadata"]["annotations"] = json!({POD_ENI_ANNOTATION: "[{\"vlanId\": 0}]"});
        assert!(pod_eni_of(&pod(annotated)).is_err());

        let plain = json!({"metadata": {"name": "web"}, "spec": {"containers": [
            {"name": "web", "image": "x", "resources": {"requests": {"cpu": "1"}}}]}});
        assert_eq!(pod_eni_of(&pod(plain)), Ok(Some(PodEni::NotRequested)));
    }
}
