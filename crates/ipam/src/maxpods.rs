//! max-pods as upstream computes it (amazon-eks-ami's max-pods-calculator.sh and eni-max-pods.txt).

use crate::limits::InstanceLimits;

#[derive(Clone, Copy, Debug, Default)]
pub struct MaxPodsOptions {
    pub prefix_delegation: bool,
    pub custom_networking: bool,
    /// MAX_ENI / --cni-max-eni: caps the ENIs counted, when lower than the instance's.
    pub max_eni: Option<u32>,
    /// Print the uncapped value (the calculator's --show-max-allowed; eni-max-pods.txt is uncapped).
    pub uncapped: bool,
    /// IPv6 pods: counted as prefix delegation counts them (upstream's calculator has no IPv6 case,
    /// and EKS sizes IPv6 nodes so), though a node's pods share one /80.
    pub ipv6: bool,
}

/// Why IPv6 pods cannot run on this instance type with these options, if they cannot: they need
/// prefix delegation, which Xen instances lack, and exclude custom networking (as upstream).
pub fn ipv6_refusal(
    instance_type: &str,
    limits: &InstanceLimits,
    opts: MaxPodsOptions,
) -> Option<String> {
    if !opts.ipv6 {
        return None;
    }
    if !limits.supports_prefixes() {
        return Some(format!(
            "IPv6 pods need prefix delegation, which {instance_type} (not a Nitro instance) does not support"
        ));
    }
    opts.custom_networking
        .then(|| "IPv6 pods cannot be combined with custom networking".to_string())
}

/// The kubelet's recommended ceiling: 110 on instances with at most 30 vCPUs, 250 above.
pub fn ceiling(vcpus: u32) -> u32 {
    if vcpus > 30 {
        250
    } else {
        110
    }
}

pub fn max_pods(limits: &InstanceLimits, opts: MaxPodsOptions) -> u32 {
    let mut enis = limits.enis();
    if let Some(cap) = opts.max_eni.filter(|&m| m >= 1) {
        enis = enis.min(cap);
    }
    if opts.custom_networking {
        // The primary ENI carries no pod addresses under custom networking.
        enis = enis.saturating_sub(1);
    }
    let per_eni = limits.slots_per_eni();
    let per_eni = if (opts.prefix_delegation || opts.ipv6) && limits.supports_prefixes() {
        per_eni * 16
    } else {
        per_eni
    };
    let n = enis * per_eni + 2;
    if opts.uncapped {
        n
    } else {
        n.min(ceiling(limits.vcpus))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::lookup;

    fn mp(t: &str, pd: bool, cn: bool, uncapped: bool) -> u32 {
        max_pods(
            lookup(t).unwrap(),
            MaxPodsOptions {
                prefix_delegation: pd,
                custom_networking: cn,
                max_eni: None,
                uncapped,
                ipv6: false,
            },
        )
    }

    #[test]
    fn reference_table() {
        // upstream-ipamd.md §4.4: instance, plain, custom networking, PD uncapped.
        for (t, plain, cn, pd) in [
            ("t3.micro", 4, 3, 34),
            ("t3.medium", 17, 12, 242),
            ("m5.large", 29, 20, 434),
            ("c5.18xlarge", 737, 688, 11762),
        ] {
            assert_eq!(mp(t, false, false, true), plain, "{t}");
            assert_eq!(mp(t, false, true, true), cn, "{t}");
            assert_eq!(mp(t, true, false, true), pd, "{t}");
        }
        // Xen: no prefixes, so PD changes nothing.
        assert_eq!(mp("m4.4xlarge", true, false, true), 234);
        assert_eq!(mp("p4d.24xlarge", false, false, true), 737);
    }

    #[test]
    fn ceiling_depends_on_vcpus() {
        assert_eq!(mp("m5.large", true, false, false), 110);
        assert_eq!(mp("c5.18xlarge", false, false, false), 250);
        assert_eq!(mp("m5.large", false, false, false), 29);
    }

    #[test]
    fn ipv6_counts_as_prefix_delegation_and_is_refused_where_it_cannot_run() {
        let ipv6 = |custom_networking| MaxPodsOptions {
            ipv6: true,
            custom_networking,
            ..Default::default()
        };
        let m5 = lookup("m5.large").unwrap();
        assert_eq!(max_pods(m5, ipv6(false)), 110);
        assert_eq!(max_pods(lookup("c5.18xlarge").unwrap(), ipv6(false)), 250);
        assert_eq!(ipv6_refusal("m5.large", m5, ipv6(false)), None);
        let xen = ipv6_refusal("m4.4xlarge", lookup("m4.4xlarge").unwrap(), ipv6(false));
        assert!(xen.unwrap().contains("m4.4xlarge"));
        assert!(ipv6_refusal("m5.large", m5, ipv6(true)).is_some());
        assert_eq!(
            ipv6_refusal("m5.large", m5, MaxPodsOptions::default()),
            None
        );
    }

    #[test]
    fn max_eni_caps_only_when_lower() {
        let l = lookup("m5.large").unwrap();
        let with = |m| {
            max_pods(
                l,
                MaxPodsOptions {
                    max_eni: Some(m),
                    uncapped: true,
                    ..Default::default()
                },
            )
        };
        assert_eq!(with(2), 20);
        assert_eq!(with(8), 29);
        assert_eq!(with(0), 29);
    }
}
