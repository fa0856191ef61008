//! Subnet planning (`vpcctl plan subnets`): how many addresses each AZ's subnets must hold for a
//! node group, and subnets of the VPC CIDRs that hold them. Every step of the arithmetic is kept, so
//! that the operator can check it.
//!
//! Per node, on top of its pods: the node's primary address, one primary address per extra ENI, and
//! the warm pool the daemon keeps (WARM_ENI_TARGET=1: a whole ENI of addresses; prefix delegation:
//! WARM_PREFIX_TARGET=1 free /28). A subnet loses five addresses to AWS (the first four and the last).
//! Under prefix delegation a subnet is counted in aligned /28s: the first and last /28 are broken by
//! the reserved addresses, each ENI's primary address can break one more, and a share of /28s is kept
//! free for fragmentation.

use crate::limits::InstanceLimits;
use crate::maxpods::{max_pods, MaxPodsOptions};
use crate::net::Ipv4Cidr;
use serde::Serialize;
use std::net::Ipv4Addr;

/// AWS keeps the first four addresses and the last of every subnet.
pub const RESERVED_PER_SUBNET: u64 = 5;
/// The smallest subnet AWS allows is a /28, the largest a /16.
const SMALLEST: u8 = 28;
const LARGEST: u8 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    SecondaryIps,
    PrefixDelegation,
    /// Pods in subnets of their own (ENIConfig), with secondary IPs or prefixes.
    CustomNetworking {
        prefixes: bool,
    },
    /// IPv6 pods (ENABLE_IPv6): a /80 per node from its subnet's /64; IPv4 for the nodes only.
    Ipv6,
}

impl Mode {
    fn prefixes(self) -> bool {
        matches!(
            self,
            Mode::PrefixDelegation | Mode::CustomNetworking { prefixes: true }
        )
    }

    fn custom(self) -> bool {
        matches!(self, Mode::CustomNetworking { .. })
    }
}

/// Every mode, as `--mode` names it.
const MODES: &[(Mode, &str)] = &[
    (Mode::SecondaryIps, "secondary-ips"),
    (Mode::PrefixDelegation, "prefix-delegation"),
    (
        Mode::CustomNetworking { prefixes: false },
        "custom-networking",
    ),
    (
        Mode::CustomNetworking { prefixes: true },
        "custom-networking-prefixes",
    ),
    (Mode::Ipv6, "ipv6"),
];

#[derive(Clone, Debug)]
pub struct PlanInput {
    pub pods_per_node: u32,
    pub nodes_per_az: u32,
    pub growth: f64,
    pub azs: u32,
    pub vpc_cidrs: Vec<Ipv4Cidr>,
    pub mode: Mode,
    pub instance_type: String,
    /// Share of /28s kept free for fragmentation under prefix delegation.
    pub fragmentation_headroom: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SubnetNeed {
    pub role: &'static str,
    pub addresses: u64,
    /// Under prefix delegation: aligned /28s needed (None otherwise).
    pub prefixes: Option<u64>,
    pub prefix_len: u8,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AzPlan {
    pub az: u32,
    pub subnets: Vec<(String, Ipv4Cidr)>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub max_pods: u32,
    pub nodes_per_az: u64,
    pub enis_per_node: u32,
    pub needs: Vec<SubnetNeed>,
    pub azs: Vec<AzPlan>,
    /// The steps, in words.
    pub arithmetic: Vec<String>,
    /// When the VPC's CIDRs cannot hold the plan: secondary CIDRs (a VPC CIDR block is at most a
    /// /16) that can hold the pod subnets, from 100.64.0.0/10.
    pub proposed_secondary_cidrs: Vec<Ipv4Cidr>,
    /// IPv6: each subnet also takes an IPv6 block of this length (always a /64 on AWS).
    pub ipv6_subnet_prefix_len: Option<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("{instance_type} holds at most {max_pods} pods in this mode, not {wanted}{}", alternatives_text(.alternatives))]
    TooManyPods {
        instance_type: String,
        max_pods: u32,
        wanted: u32,
        /// What would hold them: other modes on this instance type, or the smallest types of its
        /// family in this mode.
        alternatives: Vec<String>,
    },
    #[error("{0}")]
    Invalid(String),
}

fn alternatives_text(alternatives: &[String]) -> String {
    if alternatives.is_empty() {
        String::new()
    } else {
        format!("; these would: {}", alternatives.join(", "))
    }
}

/// Max pods of `limits` in `mode`, as the kubelet would be told; None where the mode cannot run.
fn mode_max_pods(limits: &InstanceLimits, mode: Mode) -> Option<u32> {
    let ipv6 = mode == Mode::Ipv6;
    let options = MaxPodsOptions {
        prefix_delegation: mode.prefixes(),
        custom_networking: mode.custom(),
        ipv6,
        ..MaxPodsOptions::default()
    };
    if (mode.prefixes() || ipv6) && !limits.supports_prefixes() {
        return None;
    }
    Some(max_pods(limits, options))
}

/// The modes of this instance type and the instance types of its family (smallest first, by
/// vCPUs) in this mode that hold `pods` pods.
fn alternatives(
    instance_type: &str,
    limits: &InstanceLimits,
    mode: Mode,
    pods: u32,
) -> Vec<String> {
    let mut out: Vec<String> = MODES
        .iter()
        .filter(|(m, _)| *m != mode)
        .filter(|(m, _)| mode_max_pods(limits, *m).is_some_and(|n| n >= pods))
        .map(|(_, name)| format!("--mode {name} on {instance_type}"))
        .collect();
    let family = instance_type.split('.').next().unwrap_or(instance_type);
    let mut bigger: Vec<&InstanceLimits> = crate::limits::all()
        .filter(|l| l.instance_type.split('.').next() == Some(family))
        .filter(|l| mode_max_pods(l, mode).is_some_and(|n| n >= pods))
        .collect();
    bigger.sort_by_key(|l| (l.vcpus, l.instance_type.clone()));
    out.extend(
        bigger
            .iter()
            .take(2)
            .map(|l| format!("{} in this mode", l.instance_type)),
    );
    out
}

fn div_ceil(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

/// The smallest prefix length whose subnet holds `addresses` usable addresses (or `prefixes` aligned
/// /28s), if a /16 is enough.
fn prefix_len_for(addresses: u64, prefixes: Option<u64>) -> Option<u8> {
    (LARGEST..=SMALLEST).rev().find(|&len| {
        let size = 1u64 << (32 - len);
        match prefixes {
            Some(p) => (size / 16).saturating_sub(2) >= p,
            None => size - RESERVED_PER_SUBNET >= addresses,
        }
    })
}

/// Places subnets of the given lengths, largest first, each aligned and after the previous ones.
fn place(free: &mut Vec<(u64, u64)>, len: u8) -> Option<Ipv4Cidr> {
    let size = 1u64 << (32 - len);
    for i in 0..free.len() {
        let (start, end) = free[i];
        let aligned = div_ceil(start, size) * size;
        if aligned + size <= end {
            free.remove(i);
            if aligned > start {
                free.insert(i, (start, aligned));
            }
            if aligned + size < end {
                free.push((aligned + size, end));
            }
            free.sort();
            return Ipv4Cidr::new(Ipv4Addr::from(aligned as u32), len);
        }
    }
    None
}

pub fn plan(input: &PlanInput, limits: &InstanceLimits) -> Result<Plan, PlanError> {
    if input.azs == 0 || input.nodes_per_az == 0 || input.pods_per_node == 0 {
        return Err(PlanError::Invalid(
            "pods per node, nodes per AZ and AZs must be at least 1".into(),
        ));
    }
    if !(input.growth >= 1.0 && input.growth.is_finite()) {
        return Err(PlanError::Invalid(format!(
            "growth factor {} must be at least 1",
            input.growth
        )));
    }
    if input.mode == Mode::Ipv6 {
        return plan_ipv6(input, limits);
    }
    let prefixes = input.mode.prefixes();
    if prefixes && !limits.supports_prefixes() {
        return Err(PlanError::Invalid(format!(
            "{} is not a Nitro instance: no prefix delegation",
            input.instance_type
        )));
    }
    let custom = input.mode.custom();
    let max_pods = max_pods(
        limits,
        MaxPodsOptions {
            prefix_delegation: prefixes,
            custom_networking: custom,
            max_eni: None,
            uncapped: false,
            ipv6: false,
        },
    );
    if input.pods_per_node > max_pods {
        return Err(PlanError::TooManyPods {
            instance_type: input.instance_type.clone(),
            max_pods,
            wanted: input.pods_per_node,
            alternatives: alternatives(
                &input.instance_type,
                limits,
                input.mode,
                input.pods_per_node,
            ),
        });
    }
    let mut steps = Vec::new();
    let nodes = (input.nodes_per_az as f64 * input.growth).ceil() as u64;
    steps.push(format!(
        "nodes per AZ: {} x growth {} = {nodes}",
        input.nodes_per_az, input.growth
    ));
    let slots = limits.slots_per_eni() as u64;
    let pods = input.pods_per_node as u64;
    // Addresses (or /28s) each node holds for pods: its pods plus the warm pool.
    // Under custom networking the primary ENI gives no pod addresses.
    let pod_eni_limit = limits.enis().saturating_sub(u32::from(custom));
    let (held, enis) = if prefixes {
        let used = div_ceil(pods, 16);
        let held = used + 1;
        let enis = (div_ceil(held, slots) as u32).min(pod_eni_limit) + u32::from(custom);
        steps.push(format!(
            "per node: {pods} pods fill ceil({pods}/16) = {used} /28s, + 1 warm /28 (WARM_PREFIX_TARGET=1) = {held} /28s = {} addresses, on {enis} ENI(s) of {slots} slots",
            held * 16
        ));
        (held, enis)
    } else {
        let wanted = div_ceil(pods, slots) * slots + slots;
        let enis = (div_ceil(wanted, slots) as u32).min(pod_eni_limit) + u32::from(custom);
        let held = wanted.min(u64::from(enis - u32::from(custom)) * slots);
        let capped = if held < wanted {
            format!(" (capped by the instance's {pod_eni_limit} pod ENIs; max-pods counts 2 host-network pods)")
        } else {
            String::new()
        };
        steps.push(format!(
            "per node: {pods} pods on ENIs of {slots} addresses, + one warm ENI (WARM_ENI_TARGET=1) = {held} addresses on {enis} ENI(s){capped}"
        ));
        (held, enis)
    };
    let pod_enis = u64::from(enis) - u64::from(custom);
    let mut needs = Vec::new();
    let pod_need = |extra_primaries: u64, steps: &mut Vec<String>, role: &'static str| {
        if prefixes {
            let broken = extra_primaries;
            let raw = nodes * held + broken;
            let with_headroom = (raw as f64 * (1.0 + input.fragmentation_headroom)).ceil() as u64;
            steps.push(format!(
                "{role} subnet: {nodes} nodes x {held} /28s + {broken} /28s an ENI primary address may break = {raw} /28s; + {:.0}% fragmentation headroom = {with_headroom} aligned /28s",
                input.fragmentation_headroom * 100.0
            ));
            (with_headroom * 16, Some(with_headroom))
        } else {
            let addresses = nodes * held + extra_primaries;
            steps.push(format!(
                "{role} subnet: {nodes} nodes x {held} addresses + {extra_primaries} ENI primary addresses = {addresses}"
            ));
            (addresses, None)
        }
    };
    if custom {
        let node_addresses = nodes;
        let len = prefix_len_for(node_addresses, None).ok_or_else(|| {
            PlanError::Invalid(format!("{node_addresses} node addresses do not fit a /16"))
        })?;
        steps.push(format!(
            "node subnet: {nodes} primary addresses -> /{len} ({} usable after AWS's 5)",
            (1u64 << (32 - len)) - RESERVED_PER_SUBNET
        ));
        needs.push(SubnetNeed {
            role: "nodes",
            addresses: node_addresses,
            prefixes: None,
            prefix_len: len,
        });
        let (addresses, p) = pod_need(nodes * pod_enis, &mut steps, "pod");
        needs.push(SubnetNeed {
            role: "pods",
            addresses,
            prefixes: p,
            prefix_len: 0,
        });
    } else {
        // The primary ENI's address is the node's; extra ENIs bring one primary address each.
        let (addresses, p) = pod_need(nodes * pod_enis, &mut steps, "node");
        needs.push(SubnetNeed {
            role: "nodes",
            addresses,
            prefixes: p,
            prefix_len: 0,
        });
    }
    for need in needs.iter_mut().filter(|n| n.prefix_len == 0) {
        need.prefix_len = prefix_len_for(need.addresses, need.prefixes).ok_or_else(|| {
            PlanError::Invalid(format!(
                "{} addresses for {} exceed a /16, the largest subnet AWS allows: split the node group",
                need.addresses, need.role
            ))
        })?;
        let size = 1u64 << (32 - need.prefix_len);
        steps.push(match need.prefixes {
            Some(p) => format!(
                "{}: {p} /28s -> /{} ({} aligned /28s, the first and last broken by AWS's reserved addresses)",
                need.role,
                need.prefix_len,
                size / 16 - 2
            ),
            None => format!(
                "{}: {} addresses -> /{} ({} usable after AWS's 5)",
                need.role,
                need.addresses,
                need.prefix_len,
                size - RESERVED_PER_SUBNET
            ),
        });
    }

    let (azs, proposed) = lay_out(input, &needs, &mut steps);
    Ok(Plan {
        max_pods,
        nodes_per_az: nodes,
        enis_per_node: enis,
        needs,
        azs,
        arithmetic: steps,
        proposed_secondary_cidrs: proposed,
        ipv6_subnet_prefix_len: None,
    })
}

/// IPv6 pods: a node's pods share one /80 of its subnet's /64, so the subnets are sized by the
/// nodes' IPv4 primary addresses alone (IPv6 nodes still have one; their pods' IPv4 egress is the
/// node's own 169.254.172.0/22, not the VPC's).
fn plan_ipv6(input: &PlanInput, limits: &InstanceLimits) -> Result<Plan, PlanError> {
    let options = MaxPodsOptions {
        ipv6: true,
        ..MaxPodsOptions::default()
    };
    if let Some(why) = crate::maxpods::ipv6_refusal(&input.instance_type, limits, options) {
        return Err(PlanError::Invalid(why));
    }
    let max_pods = max_pods(limits, options);
    if input.pods_per_node > max_pods {
        return Err(PlanError::TooManyPods {
            instance_type: input.instance_type.clone(),
            max_pods,
            wanted: input.pods_per_node,
            alternatives: alternatives(
                &input.instance_type,
                limits,
                Mode::Ipv6,
                input.pods_per_node,
            ),
        });
    }
    /// A subnet's /64 holds 2^16 /80s.
    const PREFIXES_PER_SUBNET: u64 = 1 << 16;
    let nodes = (input.nodes_per_az as f64 * input.growth).ceil() as u64;
    if nodes > PREFIXES_PER_SUBNET {
        return Err(PlanError::Invalid(format!(
            "{nodes} nodes per AZ need more /80s than a /64 holds ({PREFIXES_PER_SUBNET}): split the node group"
        )));
    }
    // A VPC's IPv6 block is a /56: 256 subnets of a /64.
    if input.azs > 256 {
        return Err(PlanError::Invalid(format!(
            "{} AZs need more /64s than a VPC's /56 holds (256)",
            input.azs
        )));
    }
    let len = prefix_len_for(nodes, None)
        .ok_or_else(|| PlanError::Invalid(format!("{nodes} node addresses do not fit a /16")))?;
    let mut steps = vec![
        format!(
            "nodes per AZ: {} x growth {} = {nodes}",
            input.nodes_per_az, input.growth
        ),
        format!(
            "IPv6: each node's pods share one /80 (2^48 addresses, for at most {max_pods} pods) of its subnet's /64, which holds {PREFIXES_PER_SUBNET} /80s: {nodes} are used; the VPC's /56 holds 256 subnets"
        ),
        format!(
            "IPv4: {nodes} nodes x 1 primary address (one ENI per node; the pods' IPv4 egress is the node's own 169.254.172.0/22, SNATed to it) -> /{len} ({} usable after AWS's 5)",
            (1u64 << (32 - len)) - RESERVED_PER_SUBNET
        ),
    ];
    let needs = vec![SubnetNeed {
        role: "nodes",
        addresses: nodes,
        prefixes: None,
        prefix_len: len,
    }];
    let (azs, proposed) = lay_out(input, &needs, &mut steps);
    Ok(Plan {
        max_pods,
        nodes_per_az: nodes,
        enis_per_node: 1,
        needs,
        azs,
        arithmetic: steps,
        proposed_secondary_cidrs: proposed,
        ipv6_subnet_prefix_len: Some(64),
    })
}

/// Places every AZ's subnets, largest first; when they do not fit, proposes secondary CIDRs for
/// the pod subnets instead (and no layout). Under custom networking the node subnets go in the
/// VPC's primary CIDR (the first given) and the pod subnets in its secondary CIDRs only, those of
/// 100.64.0.0/10 first: keeping pods out of the routable primary range is what custom networking
/// is for.
fn lay_out(
    input: &PlanInput,
    needs: &[SubnetNeed],
    steps: &mut Vec<String>,
) -> (Vec<AzPlan>, Vec<Ipv4Cidr>) {
    let range = |c: &Ipv4Cidr| (c.base() as u64, c.base() as u64 + c.size());
    let custom = input.mode.custom();
    let mut shared: Vec<(u64, u64)> = input.vpc_cidrs.iter().map(range).collect();
    shared.sort();
    // Under custom networking: the primary CIDR for nodes, the secondary ones for pods.
    let cgnat: Ipv4Cidr = "100.64.0.0/10".parse().expect("a CIDR");
    let mut secondary: Vec<&Ipv4Cidr> = input.vpc_cidrs.iter().skip(1).collect();
    secondary.sort_by_key(|c| (!cgnat.contains_cidr(c), c.base()));
    let mut for_nodes: Vec<(u64, u64)> = input.vpc_cidrs.first().map(range).into_iter().collect();
    let mut for_pods: Vec<(u64, u64)> = secondary.iter().map(|c| range(c)).collect();
    if custom {
        let names: Vec<String> = secondary.iter().map(|c| c.to_string()).collect();
        steps.push(format!(
            "custom networking: node subnets in the primary CIDR {}, pod subnets in the secondary CIDRs ({})",
            input.vpc_cidrs.first().map_or("-".into(), |c| c.to_string()),
            if names.is_empty() { "none given".to_string() } else { names.join(", ") }
        ));
    }
    let mut order: Vec<(u32, usize)> = (0..input.azs)
        .flat_map(|az| (0..needs.len()).map(move |n| (az, n)))
        .collect();
    order.sort_by_key(|&(az, n)| (needs[n].prefix_len, az, n));
    let mut azs: Vec<AzPlan> = (0..input.azs)
        .map(|az| AzPlan {
            az,
            subnets: Vec::new(),
        })
        .collect();
    let mut proposed = Vec::new();
    for (az, n) in order {
        let free = match (custom, needs[n].role) {
            (false, _) => &mut shared,
            (true, "pods") => &mut for_pods,
            (true, _) => &mut for_nodes,
        };
        if let Some(cidr) = place(free, needs[n].prefix_len) {
            azs[az as usize]
                .subnets
                .push((needs[n].role.to_string(), cidr));
            continue;
        }
        // The pod subnets of every AZ, in /16 blocks from 100.64.0.0/10 as custom networking
        // users do, past the secondary CIDRs the VPC has already.
        let pod_len = needs.last().map_or(LARGEST, |n| n.prefix_len);
        let total = u64::from(input.azs) << (32 - pod_len);
        let blocks = div_ceil(total, 1 << (32 - LARGEST));
        let len = if blocks > 1 {
            LARGEST
        } else {
            (LARGEST..=SMALLEST)
                .rev()
                .find(|&l| 1u64 << (32 - l) >= total)
                .unwrap_or(LARGEST)
        };
        let taken = |c: &Ipv4Cidr| input.vpc_cidrs.iter().any(|v| v.overlaps(c));
        proposed = (0..64u8)
            .filter_map(|b| Ipv4Cidr::new(Ipv4Addr::new(100, 64 + b, 0, 0), len))
            .filter(|c| !taken(c))
            .take(blocks as usize)
            .collect();
        let names: Vec<String> = proposed.iter().map(|c: &Ipv4Cidr| c.to_string()).collect();
        steps.push(format!(
            "the VPC's CIDRs cannot hold {} AZs of these subnets: associate {} with the VPC and put the pod subnets there (custom networking)",
            input.azs,
            names.join(" and ")
        ));
        break;
    }
    for az in &mut azs {
        az.subnets.sort_by_key(|(role, _)| role.clone());
    }
    if proposed.is_empty() {
        (azs, proposed)
    } else {
        (Vec::new(), proposed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::lookup;

    fn input(mode: Mode, pods: u32, nodes: u32, growth: f64, vpc: &str, t: &str) -> PlanInput {
        PlanInput {
            pods_per_node: pods,
            nodes_per_az: nodes,
            growth,
            azs: 3,
            vpc_cidrs: vec![vpc.parse().unwrap()],
            mode,
            instance_type: t.into(),
            fragmentation_headroom: 0.15,
        }
    }

    #[test]
    fn the_seeds_example_needs_far_more_than_a_slash_20_per_az() {
        // The seed: custom networking with prefixes, 110 pods per node, 50 nodes per AZ, growth 2,
        // VPC 10.0.0.0/16, pod subnets /20. By hand, on an m5.large (9 slots per ENI): 100 nodes;
        // per node ceil(110/16) = 7 /28s + 1 warm = 8 /28s on 1 pod ENI + the primary = 2 ENIs.
        // Pods: 100 x 8 + 100 /28s the pod ENIs' primary addresses may break = 900; + 15% = 1,035
        // aligned /28s: a /18 has 1,022, so a /17 per AZ. A /20 holds 4,091 addresses, not the 11,000
        // the seed needs per AZ (it compared them with three AZs' 12,288). Nodes: 100 -> /25.
        // Three /17s do not fit a /16: two secondary /16s.
        let limits = lookup("m5.large").unwrap();
        let p = plan(
            &input(
                Mode::CustomNetworking { prefixes: true },
                110,
                50,
                2.0,
                "10.0.0.0/16",
                "m5.large",
            ),
            limits,
        )
        .unwrap();
        assert_eq!(p.nodes_per_az, 100);
        assert_eq!(p.enis_per_node, 2);
        assert_eq!(p.needs[0].prefix_len, 25);
        assert_eq!(p.needs[1].prefixes, Some(1035));
        assert_eq!(p.needs[1].prefix_len, 17);
        let proposed: Vec<String> = p
            .proposed_secondary_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(proposed, ["100.64.0.0/16", "100.65.0.0/16"]);
    }

    #[test]
    fn prefix_delegation_lays_out_one_subnet_per_az() {
        // 30 pods, 20 nodes, growth 1.5 -> 30 nodes; per node ceil(30/16) = 2 + 1 = 3 /28s on 1 ENI;
        // 90 + 30 broken = 120; + 15% = 138 /28s -> /20 (254 aligned /28s; a /21 has 126).
        let limits = lookup("m5.large").unwrap();
        let p = plan(
            &input(
                Mode::PrefixDelegation,
                30,
                20,
                1.5,
                "10.0.0.0/16",
                "m5.large",
            ),
            limits,
        )
        .unwrap();
        assert_eq!(p.needs[0].prefixes, Some(138));
        assert_eq!(p.needs[0].prefix_len, 20);
        let cidrs: Vec<String> = p.azs.iter().map(|a| a.subnets[0].1.to_string()).collect();
        assert_eq!(cidrs, ["10.0.0.0/20", "10.0.16.0/20", "10.0.32.0/20"]);
    }

    #[test]
    fn secondary_ips_count_a_warm_eni_and_each_enis_primary_address() {
        // m5.large: 9 slots per ENI. 20 pods -> 3 ENIs' worth (27) + one warm ENI = 36, but the
        // instance has 3 ENIs: 27 addresses on 3 ENIs. 10 nodes (growth 1): 270 + 30 primaries
        // = 300 -> /23 (507 usable); /24 has 251.
        let limits = lookup("m5.large").unwrap();
        let p = plan(
            &input(Mode::SecondaryIps, 20, 10, 1.0, "10.0.0.0/16", "m5.large"),
            limits,
        )
        .unwrap();
        assert_eq!(p.enis_per_node, 3);
        assert_eq!(p.needs[0].addresses, 300);
        assert_eq!(p.needs[0].prefix_len, 23);
    }

    #[test]
    fn custom_networking_splits_node_and_pod_subnets_and_proposes_a_secondary_cidr() {
        // m5.xlarge (4 ENIs, 14 slots); custom networking: max pods (4-1)*14+2 = 44. 40 pods, 200
        // nodes: per node ceil(40/14)*14 + 14 = 56 addresses on 4+1 ENIs, capped at 3 pod ENIs =
        // 42 addresses on 4 ENIs; pods: 200*42 + 200*3 = 9,000 -> /18. Nodes: 200 -> /24.
        // Three /18s and three /24s do not fit a /18 VPC.
        let limits = lookup("m5.xlarge").unwrap();
        let p = plan(
            &input(
                Mode::CustomNetworking { prefixes: false },
                40,
                200,
                1.0,
                "10.0.0.0/18",
                "m5.xlarge",
            ),
            limits,
        )
        .unwrap();
        assert_eq!(p.needs[0].role, "nodes");
        assert_eq!(p.needs[0].prefix_len, 24);
        assert_eq!(p.needs[1].addresses, 9_000);
        assert_eq!(p.needs[1].prefix_len, 18);
        let proposed: Vec<String> = p
            .proposed_secondary_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(proposed, ["100.64.0.0/16"]);
        assert!(p.azs.is_empty());
    }

    #[test]
    fn custom_networking_keeps_nodes_in_the_primary_cidr_and_pods_in_the_secondary_ones() {
        // The example: 110 pods, 50 nodes per AZ, growth 2, three AZs, the VPC's primary
        // 10.0.0.0/16 and secondaries 100.64.0.0/16 and 100.65.0.0/16: /25 node subnets in
        // 10.0.0.0/16, /17 pod subnets in the secondaries, never the other way round.
        let limits = lookup("m5.large").unwrap();
        let mut request = input(
            Mode::CustomNetworking { prefixes: true },
            110,
            50,
            2.0,
            "10.0.0.0/16",
            "m5.large",
        );
        request.vpc_cidrs.push("100.64.0.0/16".parse().unwrap());
        request.vpc_cidrs.push("100.65.0.0/16".parse().unwrap());
        let p = plan(&request, limits).unwrap();
        let primary: Ipv4Cidr = "10.0.0.0/16".parse().unwrap();
        let cgnat: Ipv4Cidr = "100.64.0.0/10".parse().unwrap();
        assert_eq!(p.azs.len(), 3);
        for az in &p.azs {
            for (role, cidr) in &az.subnets {
                match role.as_str() {
                    "nodes" => assert!(primary.contains_cidr(cidr), "{role} {cidr}"),
                    _ => assert!(cgnat.contains_cidr(cidr), "{role} {cidr}"),
                }
            }
        }
        // A secondary CIDR outside 100.64.0.0/10 serves pods too, after those inside it; with
        // none at all, the pods' blocks are proposed past what the VPC has.
        let mut other = input(
            Mode::CustomNetworking { prefixes: false },
            20,
            10,
            1.0,
            "10.0.0.0/16",
            "m5.large",
        );
        other.vpc_cidrs.push("172.16.0.0/16".parse().unwrap());
        let p = plan(&other, limits).unwrap();
        let secondary: Ipv4Cidr = "172.16.0.0/16".parse().unwrap();
        assert!(p.azs.iter().all(|az| az
            .subnets
            .iter()
            .all(|(role, c)| (role == "pods") == secondary.contains_cidr(c))));
        let none = plan(
            &input(
                Mode::CustomNetworking { prefixes: false },
                20,
                10,
                1.0,
                "10.0.0.0/16",
                "m5.large",
            ),
            limits,
        )
        .unwrap();
        assert!(none.azs.is_empty());
        assert!(
            cgnat.contains_cidr(&none.proposed_secondary_cidrs[0]),
            "{:?}",
            none.proposed_secondary_cidrs
        );
        // Without custom networking every CIDR serves every subnet.
        let shared = plan(
            &input(
                Mode::PrefixDelegation,
                110,
                50,
                1.0,
                "10.0.0.0/16",
                "m5.large",
            ),
            limits,
        )
        .unwrap();
        assert_eq!(shared.azs.len(), 3);
    }

    #[test]
    fn every_modes_layout_fits_the_vpc_without_overlap_and_keeps_pods_out_of_the_primary() {
        // A VPC as EKS's custom networking guide lays it out: a routable primary and CGNAT
        // secondaries. Under custom networking nodes stay in the primary and pods in the
        // secondaries; otherwise a subnet serves both and may come from any block.
        let limits = lookup("m5.xlarge").unwrap();
        let primary: Ipv4Cidr = "10.0.0.0/16".parse().unwrap();
        let secondaries: Vec<Ipv4Cidr> = ["100.64.0.0/16", "100.65.0.0/16"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        for &(mode, name) in MODES {
            let mut request = input(mode, 30, 40, 1.5, "10.0.0.0/16", "m5.xlarge");
            request.vpc_cidrs.extend(secondaries.iter().copied());
            let p = plan(&request, limits).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(p.azs.len(), 3, "{name}: {p:?}");
            let all: Vec<(&str, Ipv4Cidr)> = p
                .azs
                .iter()
                .flat_map(|az| az.subnets.iter().map(|(r, c)| (r.as_str(), *c)))
                .collect();
            for (i, (role, cidr)) in all.iter().enumerate() {
                assert!(
                    request.vpc_cidrs.iter().any(|v| v.contains_cidr(cidr)),
                    "{name}: {role} {cidr} outside the VPC"
                );
                for (other_role, other) in &all[i + 1..] {
                    assert!(
                        !cidr.overlaps(other),
                        "{name}: {role} {cidr} overlaps {other_role} {other}"
                    );
                }
                if mode.custom() {
                    match *role {
                        "nodes" => assert!(primary.contains_cidr(cidr), "{name}: {role} {cidr}"),
                        "pods" => assert!(
                            secondaries.iter().any(|s| s.contains_cidr(cidr)),
                            "{name}: {role} {cidr}"
                        ),
                        other => panic!("{name}: a subnet for {other}"),
                    }
                } else {
                    assert_eq!(*role, "nodes", "{name}: pods share the nodes' subnets");
                }
            }
            let per_az = if mode.custom() { 2 } else { 1 };
            assert!(
                p.azs.iter().all(|az| az.subnets.len() == per_az),
                "{name}: {p:?}"
            );
        }
    }

    #[test]
    fn ipv6_sizes_subnets_by_the_nodes_ipv4_alone() {
        // 110 pods on 100 nodes per AZ: in IPv4 prefix mode a /18-sized need per AZ; in IPv6 the
        // pods take none of the VPC's IPv4, so 100 node addresses -> a /25 (123 usable) per AZ.
        let limits = lookup("m5.large").unwrap();
        let p = plan(
            &input(Mode::Ipv6, 110, 50, 2.0, "10.0.0.0/16", "m5.large"),
            limits,
        )
        .unwrap();
        assert_eq!(p.max_pods, 110);
        assert_eq!(p.enis_per_node, 1);
        assert_eq!(p.ipv6_subnet_prefix_len, Some(64));
        assert_eq!(p.needs.len(), 1);
        assert_eq!((p.needs[0].addresses, p.needs[0].prefix_len), (100, 25));
        let layout: Vec<String> = p.azs.iter().map(|az| az.subnets[0].1.to_string()).collect();
        assert_eq!(layout, ["10.0.0.0/25", "10.0.0.128/25", "10.0.1.0/25"]);
        assert!(
            p.arithmetic.iter().any(|s| s.contains("/80")),
            "{:?}",
            p.arithmetic
        );
        let pd = plan(
            &input(
                Mode::PrefixDelegation,
                110,
                50,
                2.0,
                "10.0.0.0/16",
                "m5.large",
            ),
            limits,
        )
        .unwrap();
        assert!(pd.needs[0].prefix_len < 25, "IPv4 pods need far more");
        // Where IPv6 cannot run, and beyond its ceilings.
        let xen = plan(
            &input(Mode::Ipv6, 50, 10, 1.0, "10.0.0.0/16", "m4.large"),
            lookup("m4.large").unwrap(),
        );
        assert!(matches!(xen, Err(PlanError::Invalid(why)) if why.contains("m4.large")));
        let too_many = plan(
            &input(Mode::Ipv6, 200, 10, 1.0, "10.0.0.0/16", "m5.large"),
            limits,
        );
        assert!(matches!(
            too_many,
            Err(PlanError::TooManyPods { max_pods: 110, .. })
        ));
    }

    #[test]
    fn impossible_requests_say_why() {
        let limits = lookup("m5.large").unwrap();
        let e = plan(
            &input(Mode::SecondaryIps, 110, 50, 2.0, "10.0.0.0/16", "m5.large"),
            limits,
        )
        .unwrap_err();
        let PlanError::TooManyPods {
            instance_type,
            max_pods,
            wanted,
            alternatives,
        } = &e
        else {
            panic!("{e}");
        };
        assert_eq!(
            (instance_type.as_str(), *max_pods, *wanted),
            ("m5.large", 29, 110)
        );
        // Other modes on m5.large (110 with prefixes or IPv6), and the family's smallest types
        // with secondary IPs: m5.4xlarge (234) and m5.8xlarge.
        assert_eq!(
            alternatives,
            &[
                "--mode prefix-delegation on m5.large",
                "--mode custom-networking-prefixes on m5.large",
                "--mode ipv6 on m5.large",
                "m5.4xlarge in this mode",
                "m5.8xlarge in this mode",
            ]
        );
        assert!(
            e.to_string()
                .contains("these would: --mode prefix-delegation"),
            "{e}"
        );
        let e = plan(
            &input(Mode::SecondaryIps, 20, 10, 0.5, "10.0.0.0/16", "m5.large"),
            limits,
        )
        .unwrap_err();
        assert!(e.to_string().contains("growth"), "{e}");
    }
}
