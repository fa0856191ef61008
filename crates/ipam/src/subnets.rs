//! Subnet discovery (upstream-ipamd.md §2.6): which of the AZ's subnets a new ENI may go to, best
//! first. Pure, so that the daemon and the simulator rank alike.

use std::collections::BTreeMap;

pub const ROLE_TAG: &str = "kubernetes.io/role/cni";
pub const CLUSTER_TAG_PREFIX: &str = "cni.networking.k8s.aws/cluster/";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub free_addresses: u32,
    pub tags: BTreeMap<String, String>,
}

/// Whether pods may not have addresses from this subnet: tagged `kubernetes.io/role/cni=0`, or
/// carrying `cni.networking.k8s.aws/cluster/*` tags none of which names `cluster_name` (that check
/// is skipped without a cluster name, as upstream). Applies to the subnets of ENIs already attached
/// as much as to new ones.
pub fn excluded(tags: &BTreeMap<String, String>, cluster_name: Option<&str>) -> bool {
    if tags.get(ROLE_TAG).map(String::as_str) == Some("0") {
        return true;
    }
    let Some(cluster) = cluster_name else {
        return false;
    };
    let mut clusters = tags
        .keys()
        .filter_map(|k| k.strip_prefix(CLUSTER_TAG_PREFIX))
        .peekable();
    clusters.peek().is_some() && !clusters.any(|c| c == cluster)
}

/// The subnets a new ENI may use, most free addresses first (ties by id, so the order is stable):
/// never an excluded one, the primary subnet included; the node's primary subnet even untagged, any
/// other only when tagged for the CNI. Empty when none qualifies: there is no fallback to a subnet
/// the operator excluded.
pub fn rank(candidates: &[Candidate], primary: &str, cluster_name: Option<&str>) -> Vec<String> {
    let mut usable: Vec<&Candidate> = candidates
        .iter()
        .filter(|s| !excluded(&s.tags, cluster_name))
        .filter(|s| s.id == primary || s.tags.contains_key(ROLE_TAG))
        .collect();
    usable.sort_by(|a, b| {
        b.free_addresses
            .cmp(&a.free_addresses)
            .then_with(|| a.id.cmp(&b.id))
    });
    usable.into_iter().map(|s| s.id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(id: &str, free: u32, tags: &[(&str, &str)]) -> Candidate {
        Candidate {
            id: id.into(),
            free_addresses: free,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn tagged_subnets_by_free_addresses_and_the_primary_even_untagged() {
        let subnets = [
            subnet("primary", 10, &[]),
            subnet("big", 500, &[(ROLE_TAG, "1")]),
            subnet("untagged", 900, &[]),
            subnet("excluded", 800, &[(ROLE_TAG, "0")]),
            subnet("mid", 100, &[(ROLE_TAG, "")]),
        ];
        assert_eq!(rank(&subnets, "primary", None), ["big", "mid", "primary"]);
    }

    #[test]
    fn a_primary_subnet_tagged_zero_is_excluded_too() {
        let subnets = [subnet("primary", 10, &[(ROLE_TAG, "0")])];
        assert!(rank(&subnets, "primary", None).is_empty());
    }

    #[test]
    fn cluster_tags_restrict_a_subnet_to_its_clusters() {
        let other = format!("{CLUSTER_TAG_PREFIX}other");
        let ours = format!("{CLUSTER_TAG_PREFIX}prod");
        let subnets = [
            subnet("shared", 300, &[(ROLE_TAG, "1")]),
            subnet("theirs", 900, &[(ROLE_TAG, "1"), (&other, "1")]),
            subnet("both", 200, &[(ROLE_TAG, "1"), (&other, "1"), (&ours, "1")]),
        ];
        assert_eq!(rank(&subnets, "x", Some("prod")), ["shared", "both"]);
        assert_eq!(
            rank(&subnets, "x", None),
            ["theirs", "shared", "both"],
            "without a cluster name the check is skipped"
        );
    }
}
