//! Trunk and branch ENIs (security groups for pods): a trunk ENI (`InterfaceType=trunk`) attached
//! to an instance of a trunk-capable type carries branch ENIs (`InterfaceType=branch`), each with
//! its own security groups, under a VLAN id. Branches are associated, never attached; an instance
//! carries at most its type's branch limit (`ipam::limits::branch_interfaces`).

use super::{codes, Ec2Error, NetworkInterface, Op, Reply, SimVpc};
use ipam::time::Time;

/// VLAN ids a branch may take on a trunk (802.1Q's usable range).
pub const VLAN_IDS: std::ops::RangeInclusive<u16> = 1..=4094;

/// An association of a branch ENI with a trunk ENI, as DescribeTrunkInterfaceAssociations shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrunkAssociation {
    pub id: String,
    pub branch_id: String,
    pub trunk_id: String,
    pub vlan_id: u16,
}

fn invalid(message: String) -> Ec2Error {
    Ec2Error::new(codes::INVALID_PARAMETER, message)
}

impl SimVpc {
    /// Whether `eni_id` is a branch associated with a trunk (it is in use, though never attached).
    pub fn is_associated_branch(&self, eni_id: &str) -> bool {
        self.associations.values().any(|a| a.branch_id == eni_id)
    }

    /// Every association of a branch with a trunk (the fabric wires them).
    pub fn associations(&self) -> impl Iterator<Item = &TrunkAssociation> {
        self.associations.values()
    }

    /// The associations of `trunk_id`'s branches.
    fn associations_of<'a>(
        &'a self,
        trunk_id: &'a str,
    ) -> impl Iterator<Item = &'a TrunkAssociation> + 'a {
        self.associations
            .values()
            .filter(move |a| a.trunk_id == trunk_id)
    }

    /// Why `eni` cannot be deleted or detached while branches hang on it or it is one: `None` when
    /// it can.
    pub(super) fn trunk_in_use(&self, eni: &NetworkInterface) -> Option<Ec2Error> {
        let associated = self
            .associations
            .values()
            .find(|a| a.branch_id == eni.id || a.trunk_id == eni.id)?;
        Some(Ec2Error::new(
            codes::ENI_IN_USE,
            format!(
                "The network interface '{}' is in use by trunk association '{}'.",
                eni.id, associated.id
            ),
        ))
    }

    /// Whether `eni` may be attached to an instance of `instance_type` that already carries the
    /// ENIs `on_instance`: branches are never attached, and a trunk goes only on a trunk-capable
    /// type, one per instance.
    pub(super) fn check_trunk_attach(
        &self,
        eni: &NetworkInterface,
        instance_type: &str,
        on_instance: &[String],
    ) -> Result<(), Ec2Error> {
        match eni.interface_type.as_str() {
            "branch" => Err(invalid(format!(
                "The network interface '{}' is a branch interface: associate it with a trunk (AssociateTrunkInterface) instead.",
                eni.id
            ))),
            "trunk" if ipam::limits::branch_interfaces(instance_type) == 0 => Err(invalid(format!(
                "Instance type {instance_type} does not support trunk interfaces."
            ))),
            "trunk"
                if on_instance.iter().any(|id| {
                    self.enis
                        .get(id)
                        .is_some_and(|e| e.interface_type == "trunk")
                }) =>
            {
                Err(invalid(
                    "The instance already has a trunk interface attached.".to_string(),
                ))
            }
            _ => Ok(()),
        }
    }

    /// AssociateTrunkInterface with a VLAN id. A repeat with the same client token returns the
    /// association the first call made.
    pub fn associate_trunk_interface(
        &mut self,
        now: Time,
        branch_id: &str,
        trunk_id: &str,
        vlan_id: u16,
        client_token: Option<&str>,
    ) -> Reply<TrunkAssociation> {
        self.call(Op::AssociateTrunkInterface, now, |vpc| {
            if let Some(made) = client_token
                .and_then(|t| vpc.association_tokens.get(t))
                .and_then(|id| vpc.associations.get(id))
            {
                return Ok(made.clone());
            }
            let trunk = vpc.eni(trunk_id)?;
            if trunk.interface_type != "trunk" {
                return Err(invalid(format!(
                    "The network interface '{trunk_id}' is not a trunk interface."
                )));
            }
            let Some(instance) = trunk
                .attachment
                .as_ref()
                .and_then(|a| vpc.instances.get(&a.instance_id))
            else {
                return Err(invalid(format!(
                    "The trunk interface '{trunk_id}' is not attached to an instance."
                )));
            };
            let branch = vpc.eni(branch_id)?;
            if branch.interface_type != "branch" {
                return Err(invalid(format!(
                    "The network interface '{branch_id}' is not a branch interface."
                )));
            }
            if let Some(a) = vpc.associations.values().find(|a| a.branch_id == branch_id) {
                return Err(Ec2Error::new(
                    codes::ENI_IN_USE,
                    format!(
                        "The branch interface '{branch_id}' is already associated ('{}').",
                        a.id
                    ),
                ));
            }
            if branch.subnet_id != trunk.subnet_id {
                return Err(invalid(format!(
                    "The branch interface '{branch_id}' is in subnet '{}', the trunk in '{}': they must share a subnet.",
                    branch.subnet_id, trunk.subnet_id
                )));
            }
            if !VLAN_IDS.contains(&vlan_id) {
                return Err(invalid(format!(
                    "The VLAN ID {vlan_id} is not valid: use {} to {}.",
                    VLAN_IDS.start(),
                    VLAN_IDS.end()
                )));
            }
            if let Some(a) = vpc.associations_of(trunk_id).find(|a| a.vlan_id == vlan_id) {
                return Err(invalid(format!(
                    "The VLAN ID {vlan_id} is in use on trunk '{trunk_id}' by '{}'.",
                    a.branch_id
                )));
            }
            let limit = ipam::limits::branch_interfaces(&instance.instance_type);
            if vpc.associations_of(trunk_id).count() as u32 >= limit {
                return Err(Ec2Error::new(
                    codes::ATTACHMENT_LIMIT,
                    format!(
                        "The trunk interface '{trunk_id}' carries {limit} branch interfaces, the limit for {}.",
                        instance.instance_type
                    ),
                ));
            }
            let association = TrunkAssociation {
                id: vpc.id("trunk-assoc"),
                branch_id: branch_id.into(),
                trunk_id: trunk_id.into(),
                vlan_id,
            };
            if let Some(token) = client_token {
                vpc.association_tokens
                    .insert(token.into(), association.id.clone());
            }
            vpc.associations
                .insert(association.id.clone(), association.clone());
            Ok(association)
        })
    }

    pub fn disassociate_trunk_interface(&mut self, now: Time, association_id: &str) -> Reply<()> {
        self.call(Op::DisassociateTrunkInterface, now, |vpc| {
            vpc.associations
                .remove(association_id)
                .map(|_| ())
                .ok_or_else(|| {
                    Ec2Error::new(
                        codes::ASSOCIATION_NOT_FOUND,
                        format!("The association ID '{association_id}' does not exist"),
                    )
                })
        })
    }

    /// DescribeTrunkInterfaceAssociations: by id (all when none), and then by trunk.
    pub fn describe_trunk_interface_associations(
        &mut self,
        now: Time,
        ids: &[String],
        trunk_id: Option<&str>,
    ) -> Reply<Vec<TrunkAssociation>> {
        self.call(Op::DescribeTrunkInterfaceAssociations, now, |vpc| {
            if let Some(missing) = ids.iter().find(|id| !vpc.associations.contains_key(*id)) {
                return Err(Ec2Error::new(
                    codes::ASSOCIATION_NOT_FOUND,
                    format!("The association ID '{missing}' does not exist"),
                ));
            }
            Ok(vpc
                .associations
                .values()
                .filter(|a| ids.is_empty() || ids.contains(&a.id))
                .filter(|a| trunk_id.is_none_or(|t| a.trunk_id == t))
                .cloned()
                .collect())
        })
    }

    /// The associations of branches on trunks attached to `instance_id`, which end with it.
    pub(super) fn drop_associations_of_instance(&mut self, enis: &[String]) {
        self.associations.retain(|_, a| !enis.contains(&a.trunk_id));
    }
}

#[cfg(test)]
mod tests {
    use crate::{codes, CreateEniRequest, SimConfig, SimVpc};
    use ipam::net::Ipv4Cidr;
    use ipam::time::Time;

    fn eni(vpc: &mut SimVpc, subnet: &str, kind: &str) -> String {
        vpc.create_network_interface(
            Time::ZERO,
            CreateEniRequest {
                subnet_id: subnet.into(),
                interface_type: Some(kind.into()),
                ..CreateEniRequest::default()
            },
        )
        .result
        .unwrap()
        .id
    }

    fn code<T: std::fmt::Debug>(r: crate::Reply<T>) -> &'static str {
        r.result.unwrap_err().code
    }

    #[test]
    fn branches_hang_on_a_trunk_within_the_instances_limits() {
        let cidr: Ipv4Cidr = "10.0.0.0/16".parse().unwrap();
        let mut vpc = SimVpc::new(cidr, SimConfig::default());
        let a = vpc
            .add_subnet("10.0.0.0/20".parse().unwrap(), "us-west-2a", &[])
            .unwrap();
        let b = vpc
            .add_subnet("10.0.16.0/20".parse().unwrap(), "us-west-2a", &[])
            .unwrap();
        let node = vpc.launch_instance("m5.large", &a, &["sg-nodes"]).unwrap();
        let old = vpc.launch_instance("m4.large", &a, &["sg-nodes"]).unwrap();
        let t = Time::ZERO;
        let trunk = eni(&mut vpc, &a, "trunk");
        assert_eq!(
            code(vpc.attach_network_interface(t, &trunk, &old, 1, 0)),
            codes::INVALID_PARAMETER
        );
        vpc.attach_network_interface(t, &trunk, &node, 1, 0)
            .result
            .unwrap();
        let second = eni(&mut vpc, &a, "trunk");
        assert_eq!(
            code(vpc.attach_network_interface(t, &second, &node, 2, 0)),
            codes::INVALID_PARAMETER
        );

        let branch = eni(&mut vpc, &a, "branch");
        assert_eq!(
            code(vpc.attach_network_interface(t, &branch, &node, 2, 0)),
            codes::INVALID_PARAMETER
        );
        for vlan in [0, 4095] {
            assert_eq!(
                code(vpc.associate_trunk_interface(t, &branch, &trunk, vlan, None)),
                codes::INVALID_PARAMETER
            );
        }
        let other = eni(&mut vpc, &b, "branch");
        assert_eq!(
            code(vpc.associate_trunk_interface(t, &other, &trunk, 1, None)),
            codes::INVALID_PARAMETER
        );
        let first = vpc
            .associate_trunk_interface(t, &branch, &trunk, 1, Some("tok"))
            .result
            .unwrap();
        // The same token: the same association, not a second one.
        let again = vpc
            .associate_trunk_interface(t, &branch, &trunk, 1, Some("tok"))
            .result
            .unwrap();
        assert_eq!(first, again);
        assert_eq!(
            code(vpc.associate_trunk_interface(t, &branch, &trunk, 2, None)),
            codes::ENI_IN_USE
        );
        let next = eni(&mut vpc, &a, "branch");
        assert_eq!(
            code(vpc.associate_trunk_interface(t, &next, &trunk, 1, None)),
            codes::INVALID_PARAMETER
        );
        // An associated branch (and its trunk) cannot be deleted.
        assert_eq!(
            code(vpc.delete_network_interface(t, &branch)),
            codes::ENI_IN_USE
        );
        // m5.large carries 9 branches: the tenth is refused.
        for vlan in 2..=9 {
            let b = eni(&mut vpc, &a, "branch");
            vpc.associate_trunk_interface(t, &b, &trunk, vlan, None)
                .result
                .unwrap();
        }
        assert_eq!(
            code(vpc.associate_trunk_interface(t, &next, &trunk, 10, None)),
            codes::ATTACHMENT_LIMIT
        );
        let listed = vpc
            .describe_trunk_interface_associations(t, &[], Some(&trunk))
            .result
            .unwrap();
        assert_eq!(listed.len(), 9);
        assert_eq!(
            code(vpc.describe_trunk_interface_associations(t, &["trunk-assoc-x".into()], None)),
            codes::ASSOCIATION_NOT_FOUND
        );
        vpc.disassociate_trunk_interface(t, &first.id)
            .result
            .unwrap();
        assert_eq!(
            code(vpc.disassociate_trunk_interface(t, &first.id)),
            codes::ASSOCIATION_NOT_FOUND
        );
        vpc.delete_network_interface(t, &branch).result.unwrap();
        vpc.associate_trunk_interface(t, &next, &trunk, 1, None)
            .result
            .unwrap();
        // The instance ends: its trunk's associations end with it, and the branches can go.
        vpc.terminate_instance(&node);
        assert!(vpc
            .describe_trunk_interface_associations(t, &[], None)
            .result
            .unwrap()
            .is_empty());
        vpc.delete_network_interface(t, &next).result.unwrap();
    }
}
