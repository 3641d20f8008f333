"""A boto3 client for the tests' S3 server, the independent oracle that reads what exitplan wrote."""

from __future__ import annotations

import boto3
from botocore.config import Config


def lab_s3_client(url: str, bucket: str | None = None, region: str = "eu-west-3"):
    """A client for the S3 server at `url` (checksums only when required, as exitplan's own);
    creates `bucket` when given, unless an earlier module on the same server already did."""
    client = boto3.client(
        "s3", endpoint_url=url, region_name=region, aws_access_key_id="t", aws_secret_access_key="t",
        config=Config(request_checksum_calculation="when_required", response_checksum_validation="when_required"),
    )
    if bucket:
        try:
            client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass  # a module-scoped fixture imported into a second module asks again
    return client


def keys_below(client, bucket: str, prefix: str) -> set[str]:
    """The keys under `prefix` in `bucket`, without the prefix (every page of the listing)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}
