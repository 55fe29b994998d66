"""A real S3-compatible server on localhost for the tests of folders in a bucket: moto's server mode, in a
process of its own, with IAM enforced so that a read-only user exists (tests/test_remote.py,
tests/test_embed_parts.py)."""

import json

import pytest

from scripts.local_s3 import moto_server as local_s3


def moto_server():
    """(A generator for a fixture: tests/conftest.py's `s3`.) The server's endpoint, a bucket, and the
    credentials of a read-write and a read-only user; the tests using it skip without boto3 and moto."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")
    s3fs = pytest.importorskip("s3fs")
    # the first 8 requests unauthenticated (they create the bucket, the users, their policies and keys)
    with local_s3({"INITIAL_NO_AUTH_ACTION_COUNT": "8"}) as endpoint:
        try:
            yield from _users(boto3, endpoint)
        finally:  # an S3 file system a test's in-process CLI run kept would name this server's port, gone
            s3fs.S3FileSystem.clear_instance_cache()


def _users(boto3, endpoint: str):
    setup = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    boto3.client("s3", **setup).create_bucket(Bucket="bkt")
    iam = boto3.client("iam", **setup)

    def user(name: str, actions: list[str]) -> dict:
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    writer, reader = user("writer", ["s3:*"]), user("reader", ["s3:GetObject", "s3:ListBucket"])
    base = {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=writer["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=writer["AWS_SECRET_ACCESS_KEY"])
    yield {"writer": {**base, **writer}, "reader": {**base, **reader}, "base": base, "client": client}


def keys(client, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket="bkt", Prefix=prefix).get("Contents", []))
