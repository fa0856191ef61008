//! Security groups for pods: the branch ENIs a pod is given, as the annotation
//! `vpc.amazonaws.com/pod-eni` carries them. EKS's VPC resource controller writes it (a JSON list);
//! upstream's daemon reads it with Go's JSON decoder, which matches keys without regard to case: the
//! controller writes `vlanId` and the daemon's struct says `vlanID`, and both work. This parser
//! matches keys the same way, and says which entry and field is wrong instead of starting a pod
//! half wired.

use crate::net::{Ipv4Cidr, Ipv6Cidr};
use serde_json::{Map, Value};
use std::net::{Ipv4Addr, Ipv6Addr};

/// The annotation's name.
pub const POD_ENI_ANNOTATION: &str = "vpc.amazonaws.com/pod-eni";

/// One branch ENI of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchEni {
    pub eni_id: String,
    /// The branch's MAC address, lower case.
    pub mac: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub vlan_id: u16,
    pub subnet_v4: Option<Ipv4Cidr>,
    pub subnet_v6: Option<Ipv6Cidr>,
    pub association_id: String,
}

/// The value of `key` in `entry`, whatever the case of its letters (Go's `encoding/json`).
fn field<'a>(entry: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    entry.get(key).or_else(|| {
        entry
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// A string field; absent, null and "" are all none, as the controller leaves IPv6 fields empty.
fn text<'a>(entry: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match field(entry, key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("{key} is {other}, not a string")),
    }
}

fn parsed<T: std::str::FromStr>(
    entry: &Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<Option<T>, String> {
    text(entry, key)?
        .map(|s| s.parse().map_err(|_| format!("{key} {s:?} is not {what}")))
        .transpose()
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn entry(value: &Value) -> Result<BranchEni, String> {
    let Value::Object(entry) = value else {
        return Err(format!("{value} is not an object"));
    };
    let eni_id = text(entry, "eniId")?.ok_or("eniId is missing")?.to_string();
    let mac = text(entry, "ifAddress")?.ok_or("ifAddress is missing")?;
    if !is_mac(mac) {
        return Err(format!("ifAddress {mac:?} is not a MAC address"));
    }
    let vlan_id = match field(entry, "vlanId") {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| (1..=4094).contains(n))
            .ok_or_else(|| format!("vlanId {n} is not a VLAN id (1 to 4094)"))?,
        Some(other) => return Err(format!("vlanId is {other}, not a number")),
        None => return Err("vlanId is missing".into()),
    };
    let ipv4: Option<Ipv4Addr> = parsed(entry, "privateIp", "an IPv4 address")?;
    let ipv6: Option<Ipv6Addr> = parsed(entry, "ipv6Addr", "an IPv6 address")?;
    if ipv4.is_none() && ipv6.is_none() {
        return Err("neither privateIp nor ipv6Addr is given".into());
    }
    let subnet_v4: Option<Ipv4Cidr> = parsed(entry, "subnetCidr", "an IPv4 CIDR")?;
    let subnet_v6: Option<Ipv6Cidr> = parsed(entry, "subnetV6Cidr", "an IPv6 CIDR")?;
    if let (Some(ip), Some(subnet)) = (ipv4, subnet_v4) {
        if !subnet.contains(ip) {
            return Err(format!("privateIp {ip} is not in subnetCidr {subnet}"));
        }
    }
    if ipv4.is_some() && subnet_v4.is_none() {
        return Err("subnetCidr is missing (the pod's route needs it)".into());
    }
    if ipv6.is_some() && subnet_v6.is_none() {
        return Err("subnetV6Cidr is missing (the pod's route needs it)".into());
    }
    Ok(BranchEni {
        eni_id,
        mac: mac.to_ascii_lowercase(),
        ipv4,
        ipv6,
        vlan_id,
        subnet_v4,
        subnet_v6,
        association_id: text(entry, "associationID")?
            .unwrap_or_default()
            .to_string(),
    })
}

/// The branch ENIs of a pod's `vpc.amazonaws.com/pod-eni` annotation, in order.
pub fn parse_pod_eni(annotation: &str) -> Result<Vec<BranchEni>, String> {
    let value: Value = serde_json::from_str(annotation)
        .map_err(|e| format!("{POD_ENI_ANNOTATION}: not JSON: {e}"))?;
    let Value::Array(entries) = value else {
        return Err(format!("{POD_ENI_ANNOTATION}: not a JSON list"));
    };
    if entries.is_empty() {
        return Err(format!("{POD_ENI_ANNOTATION}: an empty list"));
    }
    let branches = entries
        .iter()
        .enumerate()
        .map(|(i, e)| entry(e).map_err(|why| format!("{POD_ENI_ANNOTATION}, entry {i}: {why}")))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, b) in branches.iter().enumerate() {
        if branches[..i].iter().any(|a| a.vlan_id == b.vlan_id) {
            return Err(format!(
                "{POD_ENI_ANNOTATION}, entry {i}: vlanId {} is used twice",
                b.vlan_id
            ));
        }
    }
    Ok(branches)
}

/// The annotation for a pod whose branch the node made itself, as EKS's controller writes it (its
/// keys, `vlanId` among them), so that tools that read the controller's annotation read this one.
pub fn pod_eni_annotation(branch: &crate::branches::Branch) -> String {
    serde_json::json!([{
        "eniId": branch.eni_id,
        "ifAddress": branch.mac,
        "privateIp": branch.ip.to_string(),
        "vlanId": branch.vlan,
        "subnetCidr": branch.subnet.to_string(),
        "associationID": branch.association_id,
    }])
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As the VPC resource controller writes it for one branch.
    const CONTROLLER: &str = r#"[{"eniId":"eni-0a1b2c3d4e5f60718","ifAddress":"0A:1B:2C:3D:4E:5F","privateIp":"192.168.23.45","ipv6Addr":"","vlanId":1,"subnetCidr":"192.168.0.0/19","subnetV6Cidr":"","associationID":"trunk-assoc-0123456789abcdef0"}]"#;

    #[test]
    fn the_controllers_annotation_parses() {
        let b = &parse_pod_eni(CONTROLLER).unwrap()[0];
        assert_eq!(b.eni_id, "eni-0a1b2c3d4e5f60718");
        assert_eq!(b.mac, "0a:1b:2c:3d:4e:5f");
        assert_eq!(b.ipv4, Some("192.168.23.45".parse().unwrap()));
        assert_eq!((b.ipv6, b.subnet_v6), (None, None));
        assert_eq!(b.vlan_id, 1);
        assert_eq!(b.subnet_v4, Some("192.168.0.0/19".parse().unwrap()));
        assert_eq!(b.association_id, "trunk-assoc-0123456789abcdef0");
    }

    #[test]
    fn keys_match_whatever_their_case_as_gos_decoder_does() {
        // upstream's daemon spells it vlanID; the controller vlanId; Go takes either.
        for spelling in ["vlanID", "VlanId", "VLANID"] {
            let text = CONTROLLER.replace("\"vlanId\"", &format!("\"{spelling}\""));
            assert_eq!(parse_pod_eni(&text).unwrap()[0].vlan_id, 1, "{spelling}");
        }
        let text = CONTROLLER.replace("\"eniId\"", "\"ENIID\"");
        assert_eq!(
            parse_pod_eni(&text).unwrap()[0].eni_id,
            "eni-0a1b2c3d4e5f60718"
        );
    }

    #[test]
    fn ipv6_fields_and_several_enis() {
        let text = r#"[
          {"eniId":"eni-1","ifAddress":"02:00:00:00:00:01","privateIp":"10.0.0.5","ipv6Addr":"2600:1f14::5","vlanId":3,"subnetCidr":"10.0.0.0/24","subnetV6Cidr":"2600:1f14::/64","associationID":"trunk-assoc-1"},
          {"eniId":"eni-2","ifAddress":"02:00:00:00:00:02","ipv6Addr":"2600:1f14::6","vlanId":4,"subnetV6Cidr":"2600:1f14::/64"}
        ]"#;
        let branches = parse_pod_eni(text).unwrap();
        assert_eq!(branches.len(), 2);
        assert_eq!(branches[0].ipv6, Some("2600:1f14::5".parse().unwrap()));
        assert_eq!(
            branches[0].subnet_v6,
            Some("2600:1f14::/64".parse().unwrap())
        );
        assert_eq!(branches[1].ipv4, None);
        assert_eq!(branches[1].vlan_id, 4);
        assert_eq!(branches[1].association_id, "");
    }

    #[test]
    fn malformed_annotations_say_which_entry_and_field() {
        for (text, expected) in [
            ("not json", "not JSON"),
            (r#"{"eniId":"eni-1"}"#, "not a JSON list"),
            ("[]", "an empty list"),
            ("[1]", "entry 0: 1 is not an object"),
            (
                &CONTROLLER.replace("\"eniId\":\"eni-0a1b2c3d4e5f60718\",", ""),
                "entry 0: eniId is missing",
            ),
            (
                &CONTROLLER.replace("0A:1B:2C:3D:4E:5F", "0A1B2C3D4E5F"),
                "is not a MAC address",
            ),
            (
                &CONTROLLER.replace("\"vlanId\":1", "\"vlanId\":0"),
                "not a VLAN id",
            ),
            (
                &CONTROLLER.replace("\"vlanId\":1", "\"vlanId\":\"1\""),
                "not a number",
            ),
            (
                &CONTROLLER.replace("\"vlanId\":1,", ""),
                "vlanId is missing",
            ),
            (
                &CONTROLLER.replace("192.168.23.45", "192.168.23.456"),
                "is not an IPv4 address",
            ),
            (
                &CONTROLLER.replace("192.168.0.0/19", "10.0.0.0/19"),
                "is not in subnetCidr",
            ),
            (
                &CONTROLLER.replace("\"subnetCidr\":\"192.168.0.0/19\",", ""),
                "subnetCidr is missing",
            ),
            (
                &CONTROLLER.replace("\"privateIp\":\"192.168.23.45\",", ""),
                "neither privateIp nor ipv6Addr",
            ),
            (
                &CONTROLLER.replace("\"ipv6Addr\":\"\"", "\"ipv6Addr\":\"2600::1\""),
                "subnetV6Cidr is missing",
            ),
        ] {
            let error = parse_pod_eni(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
        let twice = format!("[{0},{0}]", &CONTROLLER[1..CONTROLLER.len() - 1]);
        assert!(parse_pod_eni(&twice)
            .unwrap_err()
            .contains("entry 1: vlanId 1 is used twice"));
    }

    #[test]
    fn the_annotation_the_node_writes_reads_back_as_the_controllers_does() {
        let branch = crate::branches::Branch {
            eni_id: "eni-0b1".into(),
            mac: "02:00:00:00:00:0b".into(),
            ip: Ipv4Addr::new(10, 0, 3, 77),
            subnet: "10.0.0.0/16".parse().unwrap(),
            vlan: 4,
            association_id: "trunk-assoc-1".into(),
            groups: crate::branches::GroupSet::new(["sg-a"]),
        };
        let text = pod_eni_annotation(&branch);
        assert!(
            text.contains("\"vlanId\":4"),
            "the controller's key: {text}"
        );
        let back = parse_pod_eni(&text).unwrap();
        assert_eq!(
            back,
            vec![BranchEni {
                eni_id: "eni-0b1".into(),
                mac: "02:00:00:00:00:0b".into(),
                ipv4: Some(Ipv4Addr::new(10, 0, 3, 77)),
                ipv6: None,
                vlan_id: 4,
                subnet_v4: Some("10.0.0.0/16".parse().unwrap()),
                subnet_v6: None,
                association_id: "trunk-assoc-1".into(),
            }]
        );
    }
}
