//! The ADD result in upstream's shape, and reading it back as DEL's and CHECK's prevResult.
//!
//! Upstream smuggles what DEL needs when the daemon is down into the result: the container
//! interface's `mac` holds the route table, and a fake `dummy<hash>` interface holds the device
//! number in `sandbox`. Keeping the encoding lets a node switch between the two plugins with pods
//! running.

use crate::error::{CniError, Code};
use serde_json::{json, Value};
use std::net::Ipv4Addr;

/// What DEL and CHECK need to find a pod's wiring again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub host_veth: String,
    pub address: Ipv4Addr,
    pub route_table: u32,
}

pub struct AddResult<'a> {
    pub cni_version: &'a str,
    pub host_veth: &'a str,
    pub host_mac: [u8; 6],
    pub ifname: &'a str,
    pub netns: &'a str,
    pub address: Ipv4Addr,
    pub route_table: u32,
    pub device_number: u32,
}

impl AddResult<'_> {
    pub fn to_json(&self) -> Value {
        let hash = &self.host_veth[self.host_veth.len().saturating_sub(11)..];
        let mut ip = json!({
            "address": format!("{}/32", self.address),
            "interface": 1,
        });
        // Results before 1.0.0 carry the IP version on each address.
        if !self.cni_version.starts_with('1') {
            ip["version"] = "4".into();
        }
        json!({
            "cniVersion": self.cni_version,
            "interfaces": [
                {"name": self.host_veth, "mac": mac_string(&self.host_mac)},
                {"name": self.ifname, "sandbox": self.netns, "mac": self.route_table.to_string()},
                {"name": format!("dummy{hash}"), "mac": "0", "sandbox": self.device_number.to_string()},
            ],
            "ips": [ip],
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
    let route_table = match interfaces[container_index]["mac"].as_str() {
        // Upstream wrote 1 for main in old versions.
        Some("1") | Some("") | None => datapath::MAIN_TABLE,
        Some(table) => table
            .parse()
            .map_err(|_| malformed(&format!("route table {table:?}")))?,
    };
    let addresses: Vec<Ipv4Addr> = prev["ips"]
        .as_array()
        .ok_or_else(|| malformed("no ips"))?
        .iter()
        .filter(|ip| ip["interface"].as_u64() == Some(container_index as u64))
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .collect();
    match addresses.as_slice() {
        [address] => Ok(Recorded {
            host_veth,
            address: *address,
            route_table,
        }),
        _ => Err(malformed(&format!(
            "expected one IPv4 address on {ifname}, found {}",
            addresses.len()
        ))),
    }
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

    fn result(version: &str) -> Value {
        AddResult {
            cni_version: version,
            host_veth: "enib5faff8a083",
            host_mac: [0x02, 0, 0, 0, 0, 1],
            ifname: "eth0",
            netns: "/var/run/netns/x",
            address: Ipv4Addr::new(10, 0, 1, 7),
            route_table: 2,
            device_number: 1,
        }
        .to_json()
    }

    #[test]
    fn upstream_encoding_of_table_and_device_number() {
        let value = result("0.4.0");
        assert_eq!(value["interfaces"][1]["mac"], "2");
        assert_eq!(value["interfaces"][2]["name"], "dummyb5faff8a083");
        assert_eq!(value["interfaces"][2]["sandbox"], "1");
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
                address: Ipv4Addr::new(10, 0, 1, 7),
                route_table: 2
            }
        );
    }

    #[test]
    fn an_upstream_prev_result_with_main_as_1_and_no_mac() {
        let prev = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "eni1234567890a"}, {"name": "eth0", "sandbox": "/proc/1/ns/net", "mac": "1"}],
            "ips": [{"version": "4", "address": "10.0.0.9/32", "interface": 1}]
        });
        let recorded = recorded(&prev, "eth0").unwrap();
        assert_eq!(recorded.route_table, datapath::MAIN_TABLE);
        assert_eq!(recorded.address, Ipv4Addr::new(10, 0, 0, 9));
    }

    #[test]
    fn foreign_prev_results_are_refused() {
        assert!(recorded(&json!({"cniVersion": "1.0.0"}), "eth0").is_err());
        let bad_table = json!({
            "interfaces": [{"name": "veth"}, {"name": "eth0", "sandbox": "/x", "mac": "aa:bb"}],
            "ips": [{"address": "10.0.0.9/32", "interface": 1}]
        });
        assert!(recorded(&bad_table, "eth0").is_err());
    }
}
