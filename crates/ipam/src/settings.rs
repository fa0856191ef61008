//! The settings the engine reads, taken from `Config` once: the policy's targets, and whether the
//! primary ENI gives pod addresses (custom networking), which the pool's counts depend on.

use crate::config::Config;
use std::time::Duration;

/// The settings the policy reads, taken from `Config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSettings {
    pub warm_eni_target: u32,
    pub warm_ip_target: u32,
    pub minimum_ip_target: u32,
    pub warm_prefix_target: u32,
    pub prefix_delegation: bool,
    pub max_eni: Option<u32>,
    pub ip_cooldown: Duration,
    pub custom_networking: bool,
    pub pod_eni: bool,
    /// With `pod_eni`, the node makes its own trunk ENI (standalone mode); on EKS the VPC resource
    /// controller does, and the slot is only kept free for it.
    pub create_trunk: bool,
    pub subnet_discovery: bool,
    pub manage_enis_non_schedulable: bool,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings::from_config(&Config::default())
    }
}

impl PoolSettings {
    pub fn from_config(c: &Config) -> PoolSettings {
        PoolSettings {
            warm_eni_target: c.warm_eni_target,
            warm_ip_target: c.warm_ip_target,
            minimum_ip_target: c.minimum_ip_target,
            warm_prefix_target: c.warm_prefix_target,
            prefix_delegation: c.prefix_delegation,
            max_eni: c.max_eni,
            ip_cooldown: c.ip_cooldown,
            custom_networking: c.custom_networking,
            pod_eni: c.pod_eni,
            create_trunk: c.pod_eni && c.node_makes_branches,
            subnet_discovery: c.subnet_discovery,
            manage_enis_non_schedulable: c.manage_enis_non_schedulable,
        }
    }

    /// Takes the settings a running daemon may change (`config_map::LIVE`) from `new`, and says
    /// which changed, as `NAME: old -> new`.
    pub fn take_live(&mut self, new: &PoolSettings) -> Vec<String> {
        let mut changed = Vec::new();
        let mut take = |name: &str, old: &mut u32, new: u32| {
            if *old != new {
                changed.push(format!("{name}: {old} -> {new}"));
                *old = new;
            }
        };
        take(
            "WARM_ENI_TARGET",
            &mut self.warm_eni_target,
            new.warm_eni_target,
        );
        take(
            "WARM_IP_TARGET",
            &mut self.warm_ip_target,
            new.warm_ip_target,
        );
        take(
            "MINIMUM_IP_TARGET",
            &mut self.minimum_ip_target,
            new.minimum_ip_target,
        );
        take(
            "WARM_PREFIX_TARGET",
            &mut self.warm_prefix_target,
            new.warm_prefix_target,
        );
        if self.max_eni != new.max_eni {
            changed.push(format!("MAX_ENI: {:?} -> {:?}", self.max_eni, new.max_eni));
            self.max_eni = new.max_eni;
        }
        if self.ip_cooldown != new.ip_cooldown {
            changed.push(format!(
                "IP_COOLDOWN_PERIOD: {} -> {}",
                self.ip_cooldown.as_secs(),
                new.ip_cooldown.as_secs()
            ));
            self.ip_cooldown = new.ip_cooldown;
        }
        changed
    }

    pub fn ip_targets_defined(&self) -> bool {
        self.warm_ip_target != 0 || self.minimum_ip_target != 0
    }
}
