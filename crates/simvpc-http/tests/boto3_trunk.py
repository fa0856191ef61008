"""Trunk and branch ENIs through boto3 against `simvpc serve`: the calls of security groups for pods,
their errors as EC2's Query protocol carries them.

Usage: boto3_trunk.py <endpoint> <instance-id (m5.large)> <subnet-id> <other-subnet-id>
"""
import sys

from boto3_ec2 import client, error_code, wait_available

endpoint, instance_id, subnet_id, other_subnet_id = sys.argv[1:5]
ec2 = client(endpoint)



def interface(kind, subnet=subnet_id):
    eni = ec2.create_network_interface(SubnetId=subnet, InterfaceType=kind, Groups=["sg-app"])
    eni = eni["NetworkInterface"]
    assert eni["InterfaceType"] == kind, eni
    return eni["NetworkInterfaceId"]


trunk = interface("trunk")
trunk_attachment = ec2.attach_network_interface(NetworkInterfaceId=trunk, InstanceId=instance_id, DeviceIndex=1)
second_trunk = interface("trunk")
assert error_code(
    ec2.attach_network_interface, NetworkInterfaceId=second_trunk, InstanceId=instance_id, DeviceIndex=2
) == "InvalidParameterValue"
ec2.delete_network_interface(NetworkInterfaceId=second_trunk)

branch = interface("branch")
assert error_code(
    ec2.attach_network_interface, NetworkInterfaceId=branch, InstanceId=instance_id, DeviceIndex=2
) == "InvalidParameterValue"
for vlan in (0, 4095):
    assert error_code(
        ec2.associate_trunk_interface, BranchInterfaceId=branch, TrunkInterfaceId=trunk, VlanId=vlan
    ) == "InvalidParameterValue", vlan
elsewhere = interface("branch", other_subnet_id)
assert error_code(
    ec2.associate_trunk_interface, BranchInterfaceId=elsewhere, TrunkInterfaceId=trunk, VlanId=1
) == "InvalidParameterValue"
ec2.delete_network_interface(NetworkInterfaceId=elsewhere)

first = ec2.associate_trunk_interface(BranchInterfaceId=branch, TrunkInterfaceId=trunk, VlanId=1, ClientToken="pod-1")
association = first["InterfaceAssociation"]
assert association["VlanId"] == 1 and association["InterfaceProtocol"] == "VLAN", first
assert first["ClientToken"] == "pod-1", first
again = ec2.associate_trunk_interface(BranchInterfaceId=branch, TrunkInterfaceId=trunk, VlanId=1, ClientToken="pod-1")
assert again["InterfaceAssociation"]["AssociationId"] == association["AssociationId"], again
assert error_code(
    ec2.associate_trunk_interface, BranchInterfaceId=branch, TrunkInterfaceId=trunk, VlanId=2
) == "InvalidNetworkInterface.InUse"
other = interface("branch")
assert error_code(
    ec2.associate_trunk_interface, BranchInterfaceId=other, TrunkInterfaceId=trunk, VlanId=1
) == "InvalidParameterValue"
assert error_code(ec2.delete_network_interface, NetworkInterfaceId=branch) == "InvalidNetworkInterface.InUse"
assert error_code(
    ec2.detach_network_interface, AttachmentId=trunk_attachment["AttachmentId"]
) == "InvalidNetworkInterface.InUse"

# m5.large carries 9 branches.
branches = [branch]
for vlan in range(2, 10):
    b = interface("branch")
    ec2.associate_trunk_interface(BranchInterfaceId=b, TrunkInterfaceId=trunk, VlanId=vlan)
    branches.append(b)
assert error_code(
    ec2.associate_trunk_interface, BranchInterfaceId=other, TrunkInterfaceId=trunk, VlanId=10
) == "AttachmentLimitExceeded"

listed = ec2.describe_trunk_interface_associations(
    Filters=[{"Name": "trunk-interface-association.trunk-interface-id", "Values": [trunk]}]
)["InterfaceAssociations"]
assert sorted(a["VlanId"] for a in listed) == list(range(1, 10)), listed
assert sorted(a["BranchInterfaceId"] for a in listed) == sorted(branches), listed
assert error_code(
    ec2.describe_trunk_interface_associations, AssociationIds=["trunk-assoc-00000000000000000"]
) == "InvalidAssociationID.NotFound"

for a in listed:
    ec2.disassociate_trunk_interface(AssociationId=a["AssociationId"])
assert error_code(
    ec2.disassociate_trunk_interface, AssociationId=listed[0]["AssociationId"]
) == "InvalidAssociationID.NotFound"
for b in branches + [other]:
    ec2.delete_network_interface(NetworkInterfaceId=b)
ec2.detach_network_interface(AttachmentId=trunk_attachment["AttachmentId"])
wait_available(ec2, trunk)
ec2.delete_network_interface(NetworkInterfaceId=trunk)
print("boto3 trunk ok")
