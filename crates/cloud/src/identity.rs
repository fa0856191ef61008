//! The node's identity from IMDSv2, read once at start: never on the allocation path (EC2's own
//! replies carry new ENIs and addresses).

use crate::{CloudError, ErrorKind, Result};
use aws_config::imds::Client;

/// The IMDSv2 client, for callers that keep one.
pub type ImdsClient = Client;
use ipam::net::Ipv4Cidr;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedEni {
    pub mac: String,
    pub eni_id: String,
    pub device_number: u32,
    pub network_card: u32,
    /// `local-ipv4s`: the ENI's primary address first, then its secondary ones.
    pub addresses: Vec<Ipv4Addr>,
    /// `ipv4-prefix`: its delegated /28s.
    pub prefixes: Vec<Ipv4Cidr>,
}

impl AttachedEni {
    /// The secondary /32s and the /28s, as the pool holds them.
    pub fn blocks(&self) -> Vec<Ipv4Cidr> {
        self.addresses
            .iter()
            .skip(1)
            .map(|ip| Ipv4Cidr::host(*ip))
            .chain(self.prefixes.iter().copied())
            .collect()
    }
}

/// What IMDS says of the instance's network now: local, free and unthrottled, so the daemon reads
/// it periodically to notice what changed without asking EC2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub enis: Vec<AttachedEni>,
    pub vpc_cidrs: Vec<Ipv4Cidr>,
    /// IMDS requests it took.
    pub reads: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub instance_id: String,
    pub instance_type: String,
    pub availability_zone: String,
    pub region: String,
    pub primary_mac: String,
    pub primary_ip: Ipv4Addr,
    pub primary_eni: String,
    pub vpc_cidrs: Vec<Ipv4Cidr>,
    pub enis: Vec<AttachedEni>,
}

/// An IMDSv2 client: `endpoint` overrides the address (the simulated VPC's per-instance listener);
/// otherwise the SDK's default (169.254.169.254, or `AWS_EC2_METADATA_SERVICE_ENDPOINT`).
pub fn client(endpoint: Option<&str>) -> Result<Client> {
    let mut builder = Client::builder();
    if let Some(endpoint) = endpoint {
        builder = builder.endpoint(endpoint).map_err(|e| CloudError {
            kind: ErrorKind::InvalidParameter,
            operation: "IMDS",
            code: "endpoint".into(),
            message: e.to_string().into(),
        })?;
    }
    Ok(builder.build())
}

async fn get(client: &Client, path: &str) -> Result<String> {
    client
        .get(format!("/latest/meta-data/{path}"))
        .await
        .map(|s| s.as_ref().trim().to_string())
        .map_err(|e| CloudError {
            kind: ErrorKind::Unavailable,
            operation: "IMDS",
            code: path.to_string().into(),
            message: aws_sdk_ec2::error::DisplayErrorContext(&e)
                .to_string()
                .into(),
        })
}

fn parse<T: std::str::FromStr>(path: &str, text: &str) -> Result<T> {
    text.parse().map_err(|_| CloudError {
        kind: ErrorKind::Other,
        operation: "IMDS",
        code: path.to_string().into(),
        message: format!("{text:?} does not parse").into(),
    })
}

/// Reads every attached ENI (its device, card, addresses and prefixes) and the VPC's CIDRs.
pub async fn network(client: &Client, primary_mac: &str) -> Result<Network> {
    let mut reads = 1;
    let macs = get(client, "network/interfaces/macs/").await?;
    let mut enis = Vec::new();
    for mac in macs
        .lines()
        .map(|m| m.trim_end_matches('/'))
        .filter(|m| !m.is_empty())
    {
        let base = format!("network/interfaces/macs/{mac}");
        let device = get(client, &format!("{base}/device-number")).await?;
        // Instances without multiple network cards have no network-card key; an ENI without
        // addresses or prefixes has no such key either.
        let card = get(client, &format!("{base}/network-card"))
            .await
            .unwrap_or_else(|_| "0".into());
        let addresses = get(client, &format!("{base}/local-ipv4s"))
            .await
            .unwrap_or_default();
        let prefixes = get(client, &format!("{base}/ipv4-prefix"))
            .await
            .unwrap_or_default();
        reads += 5;
        enis.push(AttachedEni {
            mac: mac.to_string(),
            eni_id: get(client, &format!("{base}/interface-id")).await?,
            device_number: parse("device-number", &device)?,
            network_card: parse("network-card", &card)?,
            addresses: lines(&addresses)
                .map(|a| parse("local-ipv4s", a))
                .collect::<Result<_>>()?,
            prefixes: lines(&prefixes)
                .map(|p| parse("ipv4-prefix", p))
                .collect::<Result<_>>()?,
        });
    }
    reads += 1;
    let vpc_cidrs = lines(
        &get(
            client,
            &format!("network/interfaces/macs/{primary_mac}/vpc-ipv4-cidr-blocks"),
        )
        .await?,
    )
    .map(|c| parse("vpc-ipv4-cidr-blocks", c))
    .collect::<Result<Vec<Ipv4Cidr>>>()?;
    Ok(Network {
        enis,
        vpc_cidrs,
        reads,
    })
}

fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty())
}

impl Identity {
    pub async fn fetch(client: &Client) -> Result<Identity> {
        let primary_mac = get(client, "mac").await?;
        let Network {
            enis, vpc_cidrs, ..
        } = network(client, &primary_mac).await?;
        let primary_eni = enis
            .iter()
            .find(|e| e.mac == primary_mac)
            .map(|e| e.eni_id.clone())
            .ok_or_else(|| CloudError {
                kind: ErrorKind::Other,
                operation: "IMDS",
                code: "mac".into(),
                message: format!("the primary MAC {primary_mac} is not among the interfaces")
                    .into(),
            })?;
        Ok(Identity {
            instance_id: get(client, "instance-id").await?,
            instance_type: get(client, "instance-type").await?,
            availability_zone: get(client, "placement/availability-zone").await?,
            region: get(client, "placement/region").await?,
            primary_ip: parse("local-ipv4", &get(client, "local-ipv4").await?)?,
            primary_mac,
            primary_eni,
            vpc_cidrs,
            enis,
        })
    }
}
