//! Leaked-ENI collection (upstream-ipamd.md §3.4): ENIs this CNI created for a node that went away
//! without deleting them are `available`, carry our tags, and cost the subnet addresses. Any node
//! may collect them; the scan is paginated and touches nothing it did not create.

use crate::{Ec2, Eni, EniQuery, Result};
use std::time::{Duration, SystemTime};

pub use ipam::ec2::{
    format_rfc3339, parse_rfc3339, CLUSTER_TAG, CREATED_AT_TAG, DESCRIPTION_PREFIX, INSTANCE_TAG,
    NO_MANAGE_TAG,
};
/// An ENI younger than this may be between CreateNetworkInterface and AttachNetworkInterface.
pub const MIN_AGE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Clone)]
pub struct LeakScan {
    pub vpc_id: String,
    /// CLUSTER_NAME: when set, only ENIs tagged for this cluster are considered.
    pub cluster_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub deleted: Vec<String>,
    /// Had no readable `createdAt`: tagged with now, collected on a later run if still leaked.
    pub tagged: Vec<String>,
    pub too_young: Vec<String>,
    /// Returned by the scan but not ours after all (description, tags, status): left alone.
    pub not_ours: Vec<String>,
}

/// One collection run at wall-clock time `now`.
pub async fn collect_leaked_enis(
    ec2: &impl Ec2,
    scan: &LeakScan,
    now: SystemTime,
) -> Result<GcReport> {
    let mut filters = vec![
        ("tag-key".to_string(), vec![INSTANCE_TAG.to_string()]),
        ("status".to_string(), vec!["available".to_string()]),
        ("vpc-id".to_string(), vec![scan.vpc_id.clone()]),
    ];
    if let Some(cluster) = &scan.cluster_name {
        filters.push((format!("tag:{CLUSTER_TAG}"), vec![cluster.clone()]));
    }
    let candidates = ec2
        .describe_network_interfaces(&EniQuery {
            filters,
            page_size: Some(1000),
            ..Default::default()
        })
        .await?;
    let mut report = GcReport::default();
    for eni in candidates {
        if !is_ours(&eni, scan) {
            report.not_ours.push(eni.id);
            continue;
        }
        match eni.tags.get(CREATED_AT_TAG).and_then(|t| parse_rfc3339(t)) {
            None => {
                // Upstream deletes an ENI whose createdAt does not parse; it may be seconds old.
                ec2.create_tags(
                    &eni.id,
                    &[(CREATED_AT_TAG.to_string(), format_rfc3339(now))],
                )
                .await?;
                report.tagged.push(eni.id);
            }
            Some(created) if now.duration_since(created).unwrap_or_default() < MIN_AGE => {
                report.too_young.push(eni.id);
            }
            Some(_) => {
                ec2.delete_network_interface(&eni.id).await?;
                report.deleted.push(eni.id);
            }
        }
    }
    Ok(report)
}

/// The filters already ask for this; checking again means a far side that ignores a filter (moto
/// ignores some) cannot make us delete someone else's ENI.
fn is_ours(eni: &Eni, scan: &LeakScan) -> bool {
    eni.status == "available"
        && eni.attachment.is_none()
        && eni.vpc_id == scan.vpc_id
        && eni.description.starts_with(DESCRIPTION_PREFIX)
        && eni.tags.contains_key(INSTANCE_TAG)
        && eni.tags.get(NO_MANAGE_TAG).map(String::as_str) != Some("true")
        && scan
            .cluster_name
            .as_ref()
            .is_none_or(|c| eni.tags.get(CLUSTER_TAG) == Some(c))
}
