//! Leaked-ENI collection (upstream-ipamd.md §3.4): ENIs this CNI created for a node that went away
//! without deleting them are `available`, carry our tags, and cost the subnet addresses. Any node
//! may collect them; the scan is paginated and touches nothing it did not create.

use crate::{Ec2, Eni, EniQuery, Result};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use ipam::ownership::{INSTANCE_TAG, NO_MANAGE_TAG};
pub const CREATED_AT_TAG: &str = "node.k8s.amazonaws.com/createdAt";
pub const CLUSTER_TAG: &str = "cluster.k8s.amazonaws.com/name";
pub const DESCRIPTION_PREFIX: &str = "aws-K8S-";
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

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`, as Go's time.RFC3339 writes it.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(range)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits_end = fraction
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(fraction.len());
        if digits_end == 0 {
            return None;
        }
        rest = &fraction[digits_end..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            let h: i64 = rest[1..3].parse().ok()?;
            let m: i64 = rest[4..6].parse().ok()?;
            sign * (h * 3600 + m * 60)
        }
    };
    let seconds =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    u64::try_from(seconds)
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

pub fn format_rfc3339(time: SystemTime) -> String {
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_as_go_writes_it() {
        let t = parse_rfc3339("2024-02-29T23:59:58Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_709_251_198
        );
        assert_eq!(format_rfc3339(t), "2024-02-29T23:59:58Z");
        assert_eq!(
            parse_rfc3339("2024-03-01T01:59:58+02:00"),
            Some(t),
            "offsets are applied"
        );
        assert_eq!(parse_rfc3339("2024-02-29T23:59:58.123456789Z"), Some(t));
        assert_eq!(format_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn garbage_does_not_parse() {
        for bad in [
            "",
            "yesterday",
            "2024-13-01T00:00:00Z",
            "2024-02-29 23:59:58Z",
            "2024-02-29T23:59:58",
            "2024-02-29T23:59:58+0200",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
