"""What the boto3 scripts share: a client for `simvpc serve`, EC2's error code of a call that must
fail, and the wait for a detached ENI to become available."""
import time

import boto3
from botocore.exceptions import ClientError


def client(endpoint):
    return boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name="us-west-2",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def error_code(call, **kwargs):
    try:
        call(**kwargs)
    except ClientError as e:
        return e.response["Error"]["Code"]
    raise AssertionError(f"{call.__name__} should have failed")


def wait_available(ec2, eni_id):
    deadline = time.time() + 10
    while ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]["Status"] != "available":
        assert time.time() < deadline, f"{eni_id} never became available"
        time.sleep(0.2)
