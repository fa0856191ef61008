//! The ADD result, and reading a prevResult back for DEL and CHECK.
//!
//! Upstream smuggles its route table into the container interface's `mac` and adds a fake
//! `dummy<hash>` interface whose `mac` is `"0"`. Those are not MAC addresses, and runtimes that parse
//! results strictly (podman) refuse them, so our result holds real MACs and nothing fake: DEL does
//! not need the table (rules are found by priority and address), and CHECK asks the daemon. Results
//! written by upstream's plugin are still read, so pods started before a migration are cleaned up.

use crate::error::{CniError, Code};
use serde_json::{json, Value};
use std::net::IpAddr;

/// What DEL and CHECK need to find a pod's wiring again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub host_veth: String,
    pub address: IpAddr,
    /// The host end of an IPv6 pod's `v4if0`: the interface listed before it.
    pub egress_veth: Option<String>,
    /// Only upstream's results carry it.
    pub route_table: Option<u32>,
    /// A branch pod's VLAN id and branch MAC, from the VLAN link the result lists.
    pub branch: Option<(u16, [u8; 6])>,
}

pub struct AddResult<'a> {
    pub cni_version: &'a str,
    pub host_veth: &'a str,
    pub host_mac: [u8; 6],
    pub ifname: &'a str,
    pub pod_mac: [u8; 6],
    pub netns: &'a str,
    pub address: IpAddr,
    /// An IPv6 pod's `v4if0` pair: the host end's name and MAC, and the pod end's MAC. Listed as
    /// interfaces but its address is not among the IPs: the pod's IP is its IPv6 address alone.
    pub egress: Option<(&'a str, [u8; 6], [u8; 6])>,
    /// A branch pod's VLAN link on the host (`vlan.eth.<vlan>`) and the branch's MAC: listed so
    /// that a DEL finds them when the daemon no longer can (its pod object gone, on EKS).
    pub branch: Option<(u16, [u8; 6])>,
}

impl AddResult<'_> {
    pub fn to_json(&self) -> Value {
        let (address, gateway, default, version) = match self.address {
            IpAddr::V4(ip) => (
                format!("{ip}/32"),
                datapath::pod::GATEWAY.to_string(),
                "0.0.0.0/0",
                "4",
            ),
            IpAddr::V6(ip) => (
                format!("{ip}/128"),
                datapath::pod::GATEWAY_V6.to_string(),
                "::/0",
                "6",
            ),
        };
        let mut ip = json!({"address": address, "gateway": gateway, "interface": 1});
        // Results before 1.0.0 carry the IP version on each address.
        if !self.cni_version.starts_with('1') {
            ip["version"] = version.into();
        }
        let mut interfaces = vec![
            json!({"name": self.host_veth, "mac": mac_string(&self.host_mac)}),
            json!({"name": self.ifname, "mac": mac_string(&self.pod_mac), "sandbox": self.netns}),
        ];
        if let Some((host, host_mac, pod_mac)) = self.egress {
            interfaces.push(json!({"name": host, "mac": mac_string(&host_mac)}));
            interfaces.push(json!({
                "name": datapath::pod::EGRESS_IFNAME,
                "mac": mac_string(&pod_mac),
                "sandbox": self.netns,
            }));
        }
        if let Some((vlan, mac)) = self.branch {
            interfaces.push(json!({
                "name": datapath::branch::vlan_link(vlan),
                "mac": mac_string(&mac),
            }));
        }
        json!({
            "cniVersion": self.cni_version,
            "interfaces": interfaces,
            "ips": [ip],
            "routes": [{"dst": default, "gw": gateway}],
            "dns": {},
        })
    }
}

/// Reads the pod's wiring from a prevResult written by us or by upstream's plugin.
pub fn recorded(prev: &Value, ifname: &str) -> Result<Recorded, CniError> {
    let malformed = |what: &str| {
        CniError::new(
            Code::InvalidConfig,
            format!("prevResult does not describe a pod of this plugin: {what}"),
        )
    };
    let interfaces = prev["interfaces"]
        .as_array()
        .ok_or_else(|| malformed("no interfaces"))?;
    let container_index = interfaces
        .iter()
        .position(|i| i["name"] == ifname && i["sandbox"].is_string())
        .ok_or_else(|| malformed(&format!("no interface {ifname}")))?;
    let host_veth = interfaces
        .first()
        .and_then(|i| i["name"].as_str())
        .ok_or_else(|| malformed("no host interface"))?
        .to_string();
    // Upstream's encoding: a number where the MAC should be, 1 meaning main in old versions.
    let route_table = match interfaces[container_index]["mac"].as_str() {
        Some("1") => Some(datapath::MAIN_TABLE),
        Some(text) => text.parse().ok(),
        None => None,
    };
    let addresses: Vec<IpAddr> = prev["ips"]
        .as_array()
        .ok_or_else(|| malformed("no ips"))?
        .iter()
        .filter(|ip| ip["interface"].as_u64() == Some(container_index as u64))
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .collect();
    let egress_veth = interfaces
        .iter()
        .position(|i| i["name"] == datapath::pod::EGRESS_IFNAME && i["sandbox"].is_string())
        .and_then(|at| interfaces[at.checked_sub(1)?]["name"].as_str())
        .map(str::to_string);
    let branch = interfaces.iter().find_map(|i| {
        let vlan = i["name"]
            .as_str()?
            .strip_prefix("vlan.eth.")?
            .parse()
            .ok()?;
        let mac = parse_mac(i["mac"].as_str()?)?;
        (i["sandbox"].is_null() && datapath::branch::vlan_link(vlan) == i["name"])
            .then_some((vlan, mac))
    });
    match addresses.as_slice() {
        [address] => Ok(Recorded {
            host_veth,
            address: *address,
            egress_veth,
            route_table,
            branch,
        }),
        _ => Err(malformed(&format!(
            "expected one address on {ifname}, found {}",
            addresses.len()
        ))),
    }
}

/// `mac_string`'s inverse.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn result(version: &str) -> Value {
        with_branch(version, None)
    }

    fn with_branch(version: &str, branch: Option<(u16, [u8; 6])>) -> Value {
        AddResult {
            cni_version: version,
            host_veth: "enib5faff8a083",
            host_mac: [0x02, 0, 0, 0, 0, 1],
            ifname: "eth0",
            pod_mac: [0x0a, 0, 0, 0, 0, 2],
            netns: "/var/run/netns/x",
            address: Ipv4Addr::new(10, 0, 1, 7).into(),
            egress: None,
            branch,
        }
        .to_json()
    }

    #[test]
    fn every_mac_is_a_mac_and_versions_differ_only_in_ip_version() {
        let value = result("0.4.0");
        for interface in value["interfaces"].as_array().unwrap() {
            let mac = interface["mac"].as_str().unwrap();
            assert_eq!(mac.split(':').count(), 6, "{mac}");
        }
        assert_eq!(value["ips"][0]["version"], "4");
        assert!(result("1.0.0")["ips"][0].get("version").is_none());
    }

    #[test]
    fn prev_result_round_trips() {
        let recorded = recorded(&result("1.0.0"), "eth0").unwrap();
        assert_eq!(
            recorded,
            Recorded {
                host_veth: "enib5faff8a083".into(),
                address: Ipv4Addr::new(10, 0, 1, 7).into(),
                egress_veth: None,
                route_table: None,
                branch: None,
            }
        );
    }

    /// A branch pod's result lists its VLAN link with the branch's MAC (a real interface with a
    /// real MAC, so strict runtimes take it), and a DEL reads both back.
    #[test]
    fn a_branch_pods_result_keeps_its_vlan_for_del() {
        let mut value = with_branch("1.0.0", Some((4, [0x02, 0xb0, 0, 0, 0, 0x0b])));
        assert_eq!(
            value["interfaces"][2],
            json!({"name": "vlan.eth.4", "mac": "02:b0:00:00:00:0b"})
        );
        let back = recorded(&value, "eth0").unwrap();
        assert_eq!(back.branch, Some((4, [0x02, 0xb0, 0, 0, 0, 0x0b])));
        assert_eq!(back.host_veth, "enib5faff8a083");
        // Not a VLAN link: a name that only looks like one, or a MAC that is not one.
        value["interfaces"][2]["name"] = json!("vlan.eth.04");
        assert_eq!(recorded(&value, "eth0").unwrap().branch, None);
        value["interfaces"][2] = json!({"name": "vlan.eth.4", "mac": "4"});
        assert_eq!(recorded(&value, "eth0").unwrap().branch, None);
    }

    #[test]
    fn upstream_prev_results_with_their_table_encoding() {
        let upstream = |mac: &str| {
            json!({
                "cniVersion": "0.4.0",
                "interfaces": [
                    {"name": "eni1234567890a"},
                    {"name": "eth0", "sandbox": "/proc/1/ns/net", "mac": mac},
                    {"name": "dummy1234567890a", "mac": "0", "sandbox": "1"}
                ],
                "ips": [{"version": "4", "address": "10.0.0.9/32", "interface": 1}]
            })
        };
        let main = recorded(&upstream("1"), "eth0").unwrap();
        assert_eq!(main.route_table, Some(datapath::MAIN_TABLE));
        assert_eq!(main.address, IpAddr::from(Ipv4Addr::new(10, 0, 0, 9)));
        assert_eq!(main.host_veth, "eni1234567890a");
        assert_eq!(
            recorded(&upstream("10101"), "eth0").unwrap().route_table,
            Some(10101)
        );
    }

    #[test]
    fn an_ipv6_result_names_its_egress_interfaces_but_only_its_ipv6_address() {
        let address: IpAddr = "2600:1f14:abc:de00:1234::7".parse().unwrap();
        let value = AddResult {
            cni_version: "0.4.0",
            host_veth: "enib5faff8a083",
            host_mac: [0x02, 0, 0, 0, 0, 1],
            ifname: "eth0",
            pod_mac: [0x0a, 0, 0, 0, 0, 2],
            netns: "/var/run/netns/x",
            address,
            egress: Some((
                "v4eb5faff8a083",
                [0x02, 0, 0, 0, 0, 3],
                [0x0a, 0, 0, 0, 0, 4],
            )),
            branch: None,
        }
        .to_json();
        assert_eq!(value["ips"].as_array().unwrap().len(), 1);
        assert_eq!(value["ips"][0]["address"], "2600:1f14:abc:de00:1234::7/128");
        assert_eq!(value["ips"][0]["gateway"], "fe80::1");
        assert_eq!(value["ips"][0]["version"], "6");
        assert_eq!(value["routes"][0]["dst"], "::/0");
        assert_eq!(value["interfaces"][3]["name"], "v4if0");
        assert_eq!(value["interfaces"][3]["sandbox"], "/var/run/netns/x");
        let back = recorded(&value, "eth0").unwrap();
        assert_eq!(
            (back.address, back.host_veth.as_str()),
            (address, "enib5faff8a083")
        );
        assert_eq!(back.egress_veth.as_deref(), Some("v4eb5faff8a083"));
    }

    #[test]
    fn foreign_prev_results_are_refused() {
        assert!(recorded(&json!({"cniVersion": "1.0.0"}), "eth0").is_err());
        let two_addresses = json!({
            "interfaces": [{"name": "veth"}, {"name": "eth0", "sandbox": "/x"}],
            "ips": [{"address": "10.0.0.9/32", "interface": 1}, {"address": "10.0.0.8/32", "interface": 1}]
        });
        assert!(recorded(&two_addresses, "eth0").is_err());
    }
}
