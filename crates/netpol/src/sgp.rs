//! Security groups for pods: which security groups a pod's branch ENI gets from the
//! `SecurityGroupPolicy` objects (`vpcresources.k8s.aws/v1beta1`) of its namespace, as EKS's VPC
//! resource controller decides it. A policy with neither a pod selector nor a service account
//! selector, or with no groups, is invalid and ignored. A pod matches a valid policy when every
//! selector the policy has matches (the pod's labels, its service account's labels); an empty
//! selector (`{}`) matches everything, an absent one is not asked. The groups are the union over
//! every matching policy, each once, in the policies' order (by name).

use crate::{Labels, Selector};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecurityGroupPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Option<Selector>,
    pub service_account_selector: Option<Selector>,
    /// `securityGroups.groupIds`.
    pub groups: Vec<String>,
}

impl SecurityGroupPolicy {
    /// Why the policy is ignored, if it is: the controller ignores the same ones.
    pub fn invalid(&self) -> Option<&'static str> {
        if self.pod_selector.is_none() && self.service_account_selector.is_none() {
            Some("it has neither a podSelector nor a serviceAccountSelector")
        } else if self.groups.is_empty() {
            Some("it lists no security groups")
        } else {
            None
        }
    }

    /// Whether the policy selects a pod of its namespace with these labels, whose service
    /// account has `service_account_labels`.
    pub fn selects(&self, pod_labels: &Labels, service_account_labels: &Labels) -> bool {
        self.invalid().is_none()
            && self
                .pod_selector
                .as_ref()
                .is_none_or(|s| s.matches(pod_labels))
            && self
                .service_account_selector
                .as_ref()
                .is_none_or(|s| s.matches(service_account_labels))
    }
}

/// The security groups of a pod in `namespace`: the union over `policies` that select it. Empty
/// when none does (the pod is not one of security groups for pods).
pub fn groups_for(
    namespace: &str,
    pod_labels: &Labels,
    service_account_labels: &Labels,
    policies: &[SecurityGroupPolicy],
) -> Vec<String> {
    let mut ordered: Vec<&SecurityGroupPolicy> = policies
        .iter()
        .filter(|p| p.namespace == namespace)
        .collect();
    ordered.sort_by(|a, b| a.name.cmp(&b.name));
    let mut groups: Vec<String> = Vec::new();
    for policy in ordered {
        if policy.selects(pod_labels, service_account_labels) {
            for g in &policy.groups {
                if !groups.contains(g) {
                    groups.push(g.clone());
                }
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Operator, Requirement};

    use crate::test_labels as labels;

    fn selector(pairs: &[(&str, &str)]) -> Selector {
        Selector {
            match_labels: labels(pairs),
            ..Selector::default()
        }
    }

    fn policy(
        name: &str,
        pod: Option<Selector>,
        sa: Option<Selector>,
        groups: &[&str],
    ) -> SecurityGroupPolicy {
        SecurityGroupPolicy {
            namespace: "shop".into(),
            name: name.into(),
            pod_selector: pod,
            service_account_selector: sa,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    /// Pod selector absent, empty, matching or not, times the same for the service account
    /// selector: what the controller's filter gives for each.
    #[test]
    fn the_matching_table() {
        let pod = labels(&[("app", "web")]);
        let sa = labels(&[("team", "payments")]);
        let choices: [(&str, Option<Selector>); 4] = [
            ("absent", None),
            ("empty", Some(Selector::default())),
            ("matching", Some(selector(&[("app", "web")]))),
            ("other", Some(selector(&[("app", "db")]))),
        ];
        let sa_choices: [(&str, Option<Selector>); 4] = [
            ("absent", None),
            ("empty", Some(Selector::default())),
            ("matching", Some(selector(&[("team", "payments")]))),
            ("other", Some(selector(&[("team", "search")]))),
        ];
        for (pod_case, pod_selector) in &choices {
            for (sa_case, sa_selector) in &sa_choices {
                let p = policy("p", pod_selector.clone(), sa_selector.clone(), &["sg-app"]);
                // Invalid without either selector; any selector that does not match rules it out.
                let expected = !matches!(
                    (*pod_case, *sa_case),
                    ("absent", "absent") | ("other", _) | (_, "other")
                );
                assert_eq!(
                    p.selects(&pod, &sa),
                    expected,
                    "pod selector {pod_case}, service account selector {sa_case}"
                );
            }
        }
    }

    #[test]
    fn groups_are_the_union_of_matching_policies_in_the_pods_namespace() {
        let pod = labels(&[("app", "web"), ("tier", "front")]);
        let sa = labels(&[("team", "payments")]);
        let expression = Selector {
            match_expressions: vec![Requirement {
                key: "tier".into(),
                operator: Operator::In,
                values: vec!["front".into(), "edge".into()],
            }],
            ..Selector::default()
        };
        let mut elsewhere = policy("a-other-ns", Some(Selector::default()), None, &["sg-x"]);
        elsewhere.namespace = "other".into();
        let policies = vec![
            policy("c-db", Some(selector(&[("app", "db")])), None, &["sg-db"]),
            policy(
                "b-web",
                Some(selector(&[("app", "web")])),
                None,
                &["sg-app", "sg-web"],
            ),
            policy("a-front", Some(expression), None, &["sg-web", "sg-front"]),
            policy(
                "d-payments",
                None,
                Some(selector(&[("team", "payments")])),
                &["sg-pay"],
            ),
            policy("e-no-groups", Some(Selector::default()), None, &[]),
            policy("f-no-selectors", None, None, &["sg-never"]),
            elsewhere,
        ];
        assert_eq!(
            groups_for("shop", &pod, &sa, &policies),
            ["sg-web", "sg-front", "sg-app", "sg-pay"]
        );
        assert!(groups_for("shop", &labels(&[]), &labels(&[]), &policies).is_empty());
        assert_eq!(policies[4].invalid(), Some("it lists no security groups"));
        assert!(policies[5].invalid().unwrap().contains("neither"));
    }
}
