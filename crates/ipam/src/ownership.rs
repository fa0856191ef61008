//! Which of the ENIs attached to the instance are ours (upstream-ipamd.md §2.7). A node we did not
//! build carries ENIs that others put there on purpose (Multus, DPDK and host-device users tag them
//! `no_manage`; EFA-only interfaces; cards above 0): the daemon must never configure, assign from,
//! release or free those. Pure, so the daemon and its tests decide alike.

use std::collections::BTreeMap;

/// Upstream's tag that keeps an ENI away from the CNI, when its value is exactly `true`.
pub const NO_MANAGE_TAG: &str = "node.k8s.amazonaws.com/no_manage";
/// The tag this CNI writes on the ENIs it creates (and upstream on every ENI it manages).
pub const INSTANCE_TAG: &str = "node.k8s.amazonaws.com/instance_id";

/// EC2's `InterfaceType` of a network interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum InterfaceType {
    #[default]
    Interface,
    /// The parent of branch ENIs (security groups for pods).
    Trunk,
    /// An ENA interface with EFA: it has addresses, but HPC jobs own it.
    Efa,
    /// EFA without an IP stack: nothing for IP to do.
    EfaOnly,
    /// Anything else EC2 may report (and one we do not know is one we leave alone).
    Other(String),
}

impl InterfaceType {
    /// EC2's spelling; an empty value (older APIs, IMDS-only views) is a plain interface.
    pub fn parse(text: &str) -> InterfaceType {
        match text {
            "" | "interface" => InterfaceType::Interface,
            "trunk" => InterfaceType::Trunk,
            "efa" => InterfaceType::Efa,
            "efa-only" => InterfaceType::EfaOnly,
            other => InterfaceType::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            InterfaceType::Interface => "interface",
            InterfaceType::Trunk => "trunk",
            InterfaceType::Efa => "efa",
            InterfaceType::EfaOnly => "efa-only",
            InterfaceType::Other(s) => s,
        }
    }
}

/// What EC2 says about one attached ENI, as far as ownership goes.
#[derive(Clone, Debug)]
pub struct EniFacts<'a> {
    pub is_primary: bool,
    pub interface_type: InterfaceType,
    pub network_card: u32,
    pub tags: &'a BTreeMap<String, String>,
}

/// Why an ENI is not ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unmanaged {
    /// Tagged `no_manage=true`.
    NoManageTag,
    /// Carries no tag of ours and `MANAGE_UNTAGGED_ENI=false`.
    Untagged,
    /// On a network card above 0: multi-NIC is not built.
    OtherNetworkCard(u32),
    /// `efa-only`, or an interface type we do not know.
    InterfaceType(String),
}

impl std::fmt::Display for Unmanaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unmanaged::NoManageTag => write!(f, "tagged {NO_MANAGE_TAG}=true"),
            Unmanaged::Untagged => write!(f, "untagged, and MANAGE_UNTAGGED_ENI=false"),
            Unmanaged::OtherNetworkCard(card) => write!(f, "on network card {card}"),
            Unmanaged::InterfaceType(t) => write!(f, "interface type {t}"),
        }
    }
}

/// The part an attached ENI plays for the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Ours, and it may give addresses to pods (unless its subnet is excluded, or it is the primary
    /// under custom networking: the pool decides those).
    Managed,
    /// Ours to know about, never to give pod addresses from or to free: the trunk of security
    /// groups for pods, and EFA interfaces.
    Trunk,
    Efa,
    /// Not ours: never configured, assigned from, released or freed. It still takes a slot of the
    /// instance's ENI limit when it is on card 0.
    Unmanaged(Unmanaged),
}

/// Upstream's rules, in its order: the primary ENI is always managed; a `no_manage` tag decides
/// when present; our instance tag, or `MANAGE_UNTAGGED_ENI=true`, makes it managed. EFA-only
/// interfaces and cards above 0 are never ours here.
pub fn classify(eni: &EniFacts, instance_id: &str, manage_untagged: bool) -> Role {
    if eni.is_primary {
        return Role::Managed;
    }
    if eni.network_card > 0 {
        return Role::Unmanaged(Unmanaged::OtherNetworkCard(eni.network_card));
    }
    if let Some(value) = eni.tags.get(NO_MANAGE_TAG) {
        if value == "true" {
            return Role::Unmanaged(Unmanaged::NoManageTag);
        }
    } else if !manage_untagged
        && eni.tags.get(INSTANCE_TAG).map(String::as_str) != Some(instance_id)
    {
        return Role::Unmanaged(Unmanaged::Untagged);
    }
    match &eni.interface_type {
        InterfaceType::Interface => Role::Managed,
        InterfaceType::Trunk => Role::Trunk,
        InterfaceType::Efa => Role::Efa,
        other => Role::Unmanaged(Unmanaged::InterfaceType(other.as_str().to_string())),
    }
}

/// Upstream's route table for the ENI at `device_number` on `network_card`: the primary ENI uses
/// main (254); card 0 uses device number + 1; other cards 10000 + device number + 100 × card.
pub fn route_table(device_number: u32, network_card: u32) -> u32 {
    match (device_number, network_card) {
        (0, 0) => 254,
        (device, 0) => device + 1,
        (device, card) => 10_000 + device + 100 * card,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(
        tags: &'a BTreeMap<String, String>,
        interface_type: &str,
        card: u32,
    ) -> EniFacts<'a> {
        EniFacts {
            is_primary: false,
            interface_type: InterfaceType::parse(interface_type),
            network_card: card,
            tags,
        }
    }

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_manage_decides_only_when_exactly_true() {
        let t = tags(&[(NO_MANAGE_TAG, "true")]);
        assert_eq!(
            classify(&facts(&t, "interface", 0), "i-1", true),
            Role::Unmanaged(Unmanaged::NoManageTag)
        );
        // Present but not "true": managed, even when untagged ENIs are not.
        let t = tags(&[(NO_MANAGE_TAG, "false")]);
        assert_eq!(
            classify(&facts(&t, "interface", 0), "i-1", false),
            Role::Managed
        );
        let t = tags(&[(NO_MANAGE_TAG, "TRUE")]);
        assert_eq!(
            classify(&facts(&t, "interface", 0), "i-1", true),
            Role::Managed
        );
    }

    #[test]
    fn untagged_enis_follow_manage_untagged_eni() {
        let none = tags(&[]);
        assert_eq!(
            classify(&facts(&none, "interface", 0), "i-1", true),
            Role::Managed
        );
        assert_eq!(
            classify(&facts(&none, "interface", 0), "i-1", false),
            Role::Unmanaged(Unmanaged::Untagged)
        );
        let ours = tags(&[(INSTANCE_TAG, "i-1")]);
        assert_eq!(
            classify(&facts(&ours, "interface", 0), "i-1", false),
            Role::Managed
        );
        // Another instance's tag is not ours.
        let theirs = tags(&[(INSTANCE_TAG, "i-2")]);
        assert_eq!(
            classify(&facts(&theirs, "interface", 0), "i-1", false),
            Role::Unmanaged(Unmanaged::Untagged)
        );
    }

    #[test]
    fn trunk_and_efa_are_known_efa_only_other_cards_and_strangers_are_not() {
        let none = tags(&[]);
        assert_eq!(
            classify(&facts(&none, "trunk", 0), "i-1", true),
            Role::Trunk
        );
        assert_eq!(classify(&facts(&none, "efa", 0), "i-1", true), Role::Efa);
        assert_eq!(
            classify(&facts(&none, "efa-only", 0), "i-1", true),
            Role::Unmanaged(Unmanaged::InterfaceType("efa-only".into()))
        );
        assert_eq!(
            classify(&facts(&none, "branch", 0), "i-1", true),
            Role::Unmanaged(Unmanaged::InterfaceType("branch".into()))
        );
        assert_eq!(
            classify(&facts(&none, "interface", 1), "i-1", true),
            Role::Unmanaged(Unmanaged::OtherNetworkCard(1))
        );
        assert_eq!(classify(&facts(&none, "", 0), "i-1", true), Role::Managed);
    }

    #[test]
    fn the_primary_eni_is_always_ours() {
        let t = tags(&[(NO_MANAGE_TAG, "true")]);
        let mut f = facts(&t, "interface", 0);
        f.is_primary = true;
        assert_eq!(classify(&f, "i-1", false), Role::Managed);
    }

    #[test]
    fn upstream_route_table_formula() {
        assert_eq!(route_table(0, 0), 254);
        assert_eq!(route_table(1, 0), 2);
        assert_eq!(route_table(1, 1), 10101);
        assert_eq!(route_table(3, 2), 10203);
    }
}
