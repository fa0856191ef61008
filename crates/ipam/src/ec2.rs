//! The EC2 boundary as plain data, shared by everything that speaks EC2 or pretends to: the daemon's
//! AWS SDK client (`cloud`), and the simulated VPC the simulator drives, both through the one
//! choreography ([`crate::choreography`]). Errors are sorted by what the caller must do about them.

use crate::net::{Ipv4Cidr, Ipv6Cidr};
use crate::ownership::InterfaceType;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use crate::ownership::{INSTANCE_TAG, NO_MANAGE_TAG};
pub const CREATED_AT_TAG: &str = "node.k8s.amazonaws.com/createdAt";
pub const CLUSTER_TAG: &str = "cluster.k8s.amazonaws.com/name";
pub const DESCRIPTION_PREFIX: &str = "aws-K8S-";

/// What the caller must do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The account's request bucket is empty: the call did not happen; retry later.
    Throttled,
    /// The subnet has no free address.
    InsufficientAddresses,
    /// The subnet has no free aligned /28 (prefix delegation).
    InsufficientCidr,
    /// The ENI or the instance type cannot take more addresses: resync the ENI from EC2.
    AddressLimitExceeded,
    /// No free ENI slot on the instance.
    AttachmentLimitExceeded,
    /// The ENI, attachment, instance or subnet does not exist (done, for delete and detach).
    NotFound,
    /// The ENI is attached (delete) or already attached (attach).
    InUse,
    /// The role lacks an IAM permission; the message names the action.
    Unauthorized,
    /// A parameter EC2 refused: a bug on our side or a misconfiguration.
    InvalidParameter,
    /// EC2 or the network failed; the call may or may not have happened.
    Unavailable,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{operation}: {code}: {message}")]
pub struct CloudError {
    pub kind: ErrorKind,
    pub operation: &'static str,
    /// EC2's error code, or a description of the transport failure. Borrowed where they are
    /// fixed (the simulator's throttled calls, tens of millions on a busy day, allocate nothing).
    pub code: Cow<'static, str>,
    pub message: Cow<'static, str>,
}

/// EC2's error codes, by kind.
pub fn classify(code: &str) -> ErrorKind {
    match code {
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => ErrorKind::Throttled,
        "InsufficientFreeAddressesInSubnet" => ErrorKind::InsufficientAddresses,
        "InsufficientCidrBlocks" => ErrorKind::InsufficientCidr,
        "PrivateIpAddressLimitExceeded" | "InvalidParameterValue.PrivateIpAddressLimitExceeded" => {
            ErrorKind::AddressLimitExceeded
        }
        "AttachmentLimitExceeded" => ErrorKind::AttachmentLimitExceeded,
        "InvalidNetworkInterface.InUse" => ErrorKind::InUse,
        "InvalidInstanceType" => ErrorKind::NotFound,
        "UnauthorizedOperation" | "AuthFailure" => ErrorKind::Unauthorized,
        "Unavailable" | "InternalError" | "ServiceUnavailable" | "RequestTimeout" => {
            ErrorKind::Unavailable
        }
        c if c.ends_with(".NotFound") || c.ends_with(".Malformed") && c.contains("ID") => {
            ErrorKind::NotFound
        }
        c if c.starts_with("InvalidParameter") || c == "MissingParameter" => {
            ErrorKind::InvalidParameter
        }
        _ => ErrorKind::Other,
    }
}

impl CloudError {
    pub fn new(operation: &'static str, code: &str, message: &str) -> CloudError {
        CloudError::of(operation, code.to_string(), message.to_string())
    }

    /// As `new`, taking the code and message as they are (no copy when they are borrowed).
    pub fn of(
        operation: &'static str,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> CloudError {
        let code = code.into();
        let kind = classify(&code);
        let message = message.into();
        let message = if kind == ErrorKind::Unauthorized {
            format!("the node's IAM role lacks ec2:{operation} ({message})").into()
        } else {
            message
        };
        CloudError {
            kind,
            operation,
            code,
            message,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniAttachment {
    pub id: String,
    pub instance_id: String,
    pub device_index: u32,
    pub network_card: u32,
    pub status: String,
    pub delete_on_termination: bool,
}

/// A network interface as EC2 describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Eni {
    pub id: String,
    pub mac: String,
    pub subnet_id: String,
    pub vpc_id: String,
    pub availability_zone: String,
    pub description: String,
    /// `available`, `in-use`, ...
    pub status: String,
    pub primary_ip: Option<Ipv4Addr>,
    pub secondary_ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Ipv4Cidr>,
    /// Delegated IPv6 /80s.
    pub ipv6_prefixes: Vec<Ipv6Cidr>,
    pub security_groups: Vec<String>,
    pub tags: BTreeMap<String, String>,
    pub interface_type: InterfaceType,
    pub attachment: Option<EniAttachment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateEni {
    pub subnet_id: String,
    pub description: String,
    pub security_groups: Vec<String>,
    pub secondary_ips: u32,
    pub prefixes: u32,
    pub tags: Vec<(String, String)>,
    /// EC2's idempotency token; repeat a creation whose outcome is unknown with the same token and
    /// EC2 returns the ENI the first call made instead of making another. Empty: a fresh one.
    pub client_token: String,
    /// `InterfaceType`: None for a plain interface, `trunk` or `branch` (security groups for pods).
    pub interface_type: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetInfo {
    pub id: String,
    pub availability_zone: String,
    pub cidr: Option<Ipv4Cidr>,
    /// The subnet's associated IPv6 block, if it has one.
    pub ipv6_cidr: Option<Ipv6Cidr>,
    pub free_addresses: u32,
    pub tags: BTreeMap<String, String>,
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
    fn the_codes_the_engine_reacts_to() {
        assert_eq!(classify("RequestLimitExceeded"), ErrorKind::Throttled);
        assert_eq!(
            classify("InsufficientCidrBlocks"),
            ErrorKind::InsufficientCidr
        );
        assert_eq!(
            classify("InsufficientFreeAddressesInSubnet"),
            ErrorKind::InsufficientAddresses
        );
        assert_eq!(
            classify("PrivateIpAddressLimitExceeded"),
            ErrorKind::AddressLimitExceeded
        );
        assert_eq!(
            classify("AttachmentLimitExceeded"),
            ErrorKind::AttachmentLimitExceeded
        );
        assert_eq!(
            classify("InvalidNetworkInterfaceID.NotFound"),
            ErrorKind::NotFound
        );
        assert_eq!(
            classify("InvalidAttachmentID.NotFound"),
            ErrorKind::NotFound
        );
        assert_eq!(classify("InvalidNetworkInterface.InUse"), ErrorKind::InUse);
        assert_eq!(
            classify("InvalidParameterCombination"),
            ErrorKind::InvalidParameter
        );
        assert_eq!(classify("SomethingNew"), ErrorKind::Other);
    }

    #[test]
    fn unauthorized_names_the_missing_action() {
        let e = CloudError::new("CreateNetworkInterface", "UnauthorizedOperation", "denied");
        assert!(e.to_string().contains("ec2:CreateNetworkInterface"), "{e}");
    }

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
