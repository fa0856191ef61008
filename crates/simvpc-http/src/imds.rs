//! IMDSv2 for one instance: a session token from `PUT /latest/api/token`, then the metadata tree,
//! read live from the simulated VPC (so ENIs attached through EC2 appear under
//! `network/interfaces/macs/`).

use simvpc::SimVpc;
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
pub const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const MAX_TTL: u64 = 21_600;

#[derive(Default)]
pub struct Tokens {
    issued: HashMap<String, Instant>,
    next: u64,
}

pub enum Answer {
    Text(String),
    Token { token: String, ttl: u64 },
    Status(u16, &'static str),
}

impl Tokens {
    pub fn issue(&mut self, ttl_header: Option<&str>) -> Answer {
        let Some(ttl) = ttl_header.and_then(|v| v.trim().parse::<u64>().ok()) else {
            return Answer::Status(
                400,
                "missing or invalid X-aws-ec2-metadata-token-ttl-seconds",
            );
        };
        if ttl == 0 || ttl > MAX_TTL {
            return Answer::Status(400, "token TTL must be 1 to 21600 seconds");
        }
        self.next += 1;
        let token = format!(
            "simvpc-token-{:016x}",
            self.next.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        );
        self.issued
            .insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
        Answer::Token { token, ttl }
    }

    pub fn valid(&self, token: Option<&str>) -> bool {
        token
            .and_then(|t| self.issued.get(t))
            .is_some_and(|expires| Instant::now() < *expires)
    }
}

/// The metadata at `path` (below `/latest/`) for `instance_id`.
pub fn metadata(vpc: &SimVpc, instance_id: &str, path: &str) -> Answer {
    let Some(instance) = vpc.instance(instance_id) else {
        return Answer::Status(404, "the instance was terminated");
    };
    let enis: Vec<&simvpc::NetworkInterface> = vpc
        .interfaces()
        .filter(|e| {
            e.attachment
                .as_ref()
                .is_some_and(|a| a.instance_id == instance_id)
        })
        .collect();
    let Some(primary) = enis.iter().find(|e| e.id == instance.primary_eni) else {
        return Answer::Status(404, "the instance has no primary interface");
    };
    let region = instance
        .az
        .trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let path = path.trim_end_matches('/');
    let text = match path {
        "meta-data" => "instance-id\ninstance-type\nlocal-ipv4\nmac\nnetwork/\nplacement/".into(),
        "meta-data/instance-id" => instance.id.clone(),
        "meta-data/instance-type" => instance.instance_type.clone(),
        "meta-data/local-ipv4" => primary.primary_ip.to_string(),
        "meta-data/mac" => primary.mac.clone(),
        "meta-data/placement/availability-zone" => instance.az.clone(),
        "meta-data/placement/region" => region.to_string(),
        "meta-data/network/interfaces/macs" => enis
            .iter()
            .map(|e| format!("{}/", e.mac))
            .collect::<Vec<_>>()
            .join("\n"),
        "dynamic/instance-identity/document" => format!(
            "{{\"instanceId\":\"{}\",\"instanceType\":\"{}\",\"availabilityZone\":\"{}\",\"region\":\"{region}\",\"privateIp\":\"{}\",\"accountId\":\"{}\"}}",
            instance.id,
            instance.instance_type,
            instance.az,
            primary.primary_ip,
            crate::ec2::OWNER_ID
        ),
        other => {
            let Some(rest) = other.strip_prefix("meta-data/network/interfaces/macs/") else {
                return Answer::Status(404, "not found");
            };
            let (mac, key) = rest.split_once('/').unwrap_or((rest, ""));
            let Some(eni) = enis.iter().find(|e| e.mac == mac) else {
                return Answer::Status(404, "no interface with that MAC");
            };
            let attachment = eni.attachment.as_ref().expect("filtered on attachment");
            let subnet_ipv6 = vpc.subnet(&eni.subnet_id).and_then(|s| s.ipv6_cidr);
            let join = |items: Vec<String>| items.join("\n");
            match key {
                "" => {
                    let mut keys = vec![
                        "device-number", "interface-id", "ipv4-prefix", "local-ipv4s", "mac",
                        "network-card", "security-group-ids", "subnet-id", "subnet-ipv4-cidr-block",
                        "vpc-id", "vpc-ipv4-cidr-blocks",
                    ];
                    if subnet_ipv6.is_some() {
                        keys.extend(["ipv6-prefix", "subnet-ipv6-cidr-blocks", "vpc-ipv6-cidr-blocks"]);
                        keys.sort_unstable();
                    }
                    keys.join("\n")
                }
                "ipv6-prefix" if subnet_ipv6.is_some() => {
                    join(eni.ipv6_prefixes.iter().map(|p| p.to_string()).collect())
                }
                "subnet-ipv6-cidr-blocks" if subnet_ipv6.is_some() => {
                    join(subnet_ipv6.iter().map(|c| c.to_string()).collect())
                }
                "vpc-ipv6-cidr-blocks" if subnet_ipv6.is_some() => {
                    join(vpc.ipv6_cidrs.iter().map(|c| c.to_string()).collect())
                }
                "device-number" => attachment.device_index.to_string(),
                "network-card" => attachment.network_card_index.to_string(),
                "interface-id" => eni.id.clone(),
                "mac" => eni.mac.clone(),
                "local-ipv4s" => std::iter::once(eni.primary_ip)
                    .chain(eni.secondary_ips.iter().copied())
                    .map(|ip| ip.to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
                "ipv4-prefix" => eni
                    .prefixes
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
                "security-group-ids" => eni.security_groups.join("\n"),
                "subnet-id" => eni.subnet_id.clone(),
                "subnet-ipv4-cidr-block" => eni.subnet_cidr.to_string(),
                "vpc-id" => eni.vpc_id.clone(),
                "vpc-ipv4-cidr-blocks" => vpc
                    .cidrs
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => return Answer::Status(404, "not found"),
            }
        }
    };
    Answer::Text(text)
}
