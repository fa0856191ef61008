"""An ENI's whole lifecycle through boto3 against `simvpc serve`: proof that the HTTP front speaks
EC2's Query protocol as AWS's own SDK expects it, not just as our client does.

Usage: boto3_lifecycle.py <endpoint> <instance-id> <subnet-id>
"""
import ipaddress
import sys

from boto3_ec2 import client, error_code, wait_available

endpoint, instance_id, subnet_id = sys.argv[1:4]
ec2 = client(endpoint)



reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
instance = reservations[0]["Instances"][0]
assert instance["InstanceType"] == "m5.large", instance
assert len(instance["NetworkInterfaces"]) == 1

types = ec2.describe_instance_types(InstanceTypes=["m5.large"])["InstanceTypes"]
assert types[0]["NetworkInfo"]["MaximumNetworkInterfaces"] == 3, types
assert types[0]["NetworkInfo"]["Ipv4AddressesPerInterface"] == 10, types

subnets = ec2.describe_subnets(Filters=[{"Name": "tag:kubernetes.io/role/cni", "Values": ["1"]}])["Subnets"]
assert [s["SubnetId"] for s in subnets] == [subnet_id], subnets
free_before = subnets[0]["AvailableIpAddressCount"]

eni = ec2.create_network_interface(
    SubnetId=subnet_id,
    Description=f"aws-K8S-{instance_id}",
    Groups=["sg-0000000000000001"],
    SecondaryPrivateIpAddressCount=2,
    TagSpecifications=[{
        "ResourceType": "network-interface",
        "Tags": [{"Key": "node.k8s.amazonaws.com/instance_id", "Value": instance_id}],
    }],
)["NetworkInterface"]
eni_id = eni["NetworkInterfaceId"]
assert eni["Status"] == "available"
assert len(eni["PrivateIpAddresses"]) == 3, eni
assert eni["TagSet"] == [{"Key": "node.k8s.amazonaws.com/instance_id", "Value": instance_id}]

attachment = ec2.attach_network_interface(NetworkInterfaceId=eni_id, InstanceId=instance_id, DeviceIndex=1)
attachment_id = attachment["AttachmentId"]
assert error_code(
    ec2.attach_network_interface, NetworkInterfaceId=eni_id, InstanceId=instance_id, DeviceIndex=2
) == "InvalidNetworkInterface.InUse"
ec2.modify_network_interface_attribute(
    NetworkInterfaceId=eni_id,
    Attachment={"AttachmentId": attachment_id, "DeleteOnTermination": True},
)
assigned = ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, SecondaryPrivateIpAddressCount=3)
new_ips = [a["PrivateIpAddress"] for a in assigned["AssignedPrivateIpAddresses"]]
assert len(new_ips) == 3, assigned

ec2.create_tags(Resources=[eni_id], Tags=[{"Key": "cluster.k8s.amazonaws.com/name", "Value": "demo"}])
found = ec2.describe_network_interfaces(
    Filters=[{"Name": "tag:cluster.k8s.amazonaws.com/name", "Values": ["demo"]}]
)["NetworkInterfaces"]
assert [e["NetworkInterfaceId"] for e in found] == [eni_id], found
assert found[0]["Attachment"]["DeleteOnTermination"] is True
assert found[0]["Attachment"]["DeviceIndex"] == 1
assert len(found[0]["PrivateIpAddresses"]) == 6

# Paginated listing, as the leaked-ENI collector walks it.
pages = list(ec2.get_paginator("describe_network_interfaces").paginate(PaginationConfig={"PageSize": 5}))
assert sum(len(p["NetworkInterfaces"]) for p in pages) == 2, pages

ec2.unassign_private_ip_addresses(NetworkInterfaceId=eni_id, PrivateIpAddresses=new_ips)

# IPv6 prefix delegation: /80s out of the subnet's /64.
block = subnets[0]["Ipv6CidrBlockAssociationSet"][0]
assert block["Ipv6CidrBlockState"]["State"] == "associated", block
block = ipaddress.ip_network(block["Ipv6CidrBlock"])
delegated = ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=2)["AssignedIpv6Prefixes"]
assert len(set(delegated)) == 2, delegated
assert all(ipaddress.ip_network(p).prefixlen == 80 and ipaddress.ip_network(p).subnet_of(block) for p in delegated)
listed = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]["Ipv6Prefixes"]
assert sorted(p["Ipv6Prefix"] for p in listed) == sorted(delegated), listed
released = ec2.unassign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Prefixes=delegated[:1])
assert released["UnassignedIpv6Prefixes"] == delegated[:1], released
assert error_code(
    ec2.unassign_ipv6_addresses, NetworkInterfaceId=eni_id, Ipv6Prefixes=delegated[:1]
) == "InvalidParameterValue"
assert error_code(
    ec2.assign_ipv6_addresses, NetworkInterfaceId=eni_id, Ipv6PrefixCount=10
) == "PrivateIpAddressLimitExceeded"

assert error_code(ec2.delete_network_interface, NetworkInterfaceId=eni_id) == "InvalidNetworkInterface.InUse"
ec2.detach_network_interface(AttachmentId=attachment_id)
wait_available(ec2, eni_id)
ec2.delete_network_interface(NetworkInterfaceId=eni_id)
assert error_code(
    ec2.describe_network_interfaces, NetworkInterfaceIds=[eni_id]
) == "InvalidNetworkInterfaceID.NotFound"
assert error_code(
    ec2.create_network_interface, SubnetId="subnet-nope"
) == "InvalidSubnetID.NotFound"
after = ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"][0]["AvailableIpAddressCount"]
assert after == free_before, (after, free_before)
print("boto3 lifecycle ok")
