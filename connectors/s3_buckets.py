"""Creating buckets on an S3-compatible server: for the lab, which provisions its own destination.

In production the destination bucket is created (with its lock, lifecycle and policy) by whoever
owns the account; only the lab creates one, on its local S3 server. SDK errors come back as
`connectors.base` errors.
"""

from __future__ import annotations

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from .base import AuthError, ConnectorError, InvalidRequest, TransientError


def _client(endpoint_url: str, access_key: str, secret_key: str, region: str):
    # "when_required": boto3 ≥ 1.36 otherwise sends CRC32 trailers that some S3-compatible
    # servers store as part of the body (see LAB-NOTES).
    config = Config(
        region_name=region,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, aws_access_key_id=access_key,
        aws_secret_access_key=secret_key, config=config,
    )


def ensure_bucket(endpoint_url: str, bucket: str, *, access_key: str, secret_key: str, region: str) -> bool:
    """Create `bucket` in `region` unless it exists and is ours. Returns True if it was created."""
    s3 = _client(endpoint_url, access_key, secret_key, region)
    kwargs = {"Bucket": bucket}
    if region != "us-east-1":  # S3 refuses an explicit us-east-1 location constraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**kwargs)
        return True
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "BucketAlreadyOwnedByYou":
            return False
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise AuthError(f"{endpoint_url}: creating bucket {bucket!r} was refused ({code})") from exc
        raise InvalidRequest(f"{endpoint_url}: creating bucket {bucket!r} failed ({code or exc})") from exc
    except EndpointConnectionError as exc:
        raise TransientError(f"{endpoint_url} did not answer while creating bucket {bucket!r}") from exc
    except BotoCoreError as exc:
        raise ConnectorError(f"{endpoint_url}: creating bucket {bucket!r} failed: {exc}") from exc
