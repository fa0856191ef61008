//! Host-side interface names, as upstream derives them, so that a node moved from the Amazon VPC CNI
//! keeps recognising the veths of pods that were already running.

/// The longest interface name the kernel accepts.
pub const IFNAME_MAX: usize = 15;

/// `prefix` + the first 11 hex digits of SHA-1 of `key`. Upstream's key is `"<namespace>.<pod>"`;
/// callers without Kubernetes arguments (a bare runtime) key by container id instead.
pub fn host_veth_name(prefix: &str, key: &str) -> String {
    let digest = sha1_smol::Sha1::from(key).digest().to_string();
    format!("{prefix}{}", &digest[..IFNAME_MAX - 4])
}

/// The key upstream hashes for pod `name` in `namespace`.
pub fn pod_key(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_golden_names() {
        assert_eq!(
            host_veth_name("eni", &pod_key("kube-system", "coredns-57ff979f67-qqbdh")),
            "enib5faff8a083"
        );
        assert!(host_veth_name("eni", &pod_key("default", "sample-pod")).ends_with("cc21c2d7785"));
    }

    #[test]
    fn a_four_character_prefix_fills_the_kernel_limit() {
        assert_eq!(host_veth_name("vlan", "x").len(), IFNAME_MAX);
    }
}
