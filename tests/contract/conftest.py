"""Fixtures of the contract suite: one harness per connector kind, the fault proxy, fresh buckets.

`source_harness` runs memory, Azurite, the S3 server (moto), the second S3 server (ministack) and the
SFTP server (OpenSSH's sshd, reached through the OpenSSH client and through paramiko);
`sink_harness` runs the same list and skips
a connector that states ``"sink"`` in its `unsupported` set (Azure). Harnesses live in
contract_support.py.
"""

from __future__ import annotations

import pytest

from tests.contract.contract_support import (
    AzuriteHarness, MemoryHarness, S3Harness, SftpHarness, lab_boto3_client, require, unique_name,
)
from flows import lab_processes as lp

from tests.faultproxy import FaultProxy


def _harness(request, name: str):
    if name == "memory":
        return MemoryHarness()
    if name == "azurite":
        return AzuriteHarness(request.getfixturevalue("azurite_connection_string"))
    if name == "s3":
        return S3Harness(request.getfixturevalue("s3_server").url)
    if name == "ministack":
        return S3Harness(request.getfixturevalue("ministack_server").url, name="ministack")
    if name == "sftp":
        return SftpHarness(request.getfixturevalue("sshd"))
    if name == "sftp-paramiko":
        return SftpHarness(request.getfixturevalue("sshd"), transport="paramiko")
    raise AssertionError(name)


@pytest.fixture(params=["memory", "azurite", "s3", "ministack", "sftp", "sftp-paramiko"])
def source_harness(request):
    """A fresh, empty store of each kind, read through its connector."""
    return _harness(request, request.param)


@pytest.fixture(params=["memory", "azurite", "s3", "ministack", "sftp", "sftp-paramiko"])
def sink_harness(request):
    """A fresh, empty store of each kind that can be a destination (others skip with their reason)."""
    harness = _harness(request, request.param)
    require(harness.sink(), "sink")
    return harness


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the lab S3 server."""
    bucket = unique_name()
    lab_boto3_client(s3_server.url).create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": lp.LAB_REGION})
    return bucket


@pytest.fixture
def azurite_via_proxy(azurite):
    """A `FaultProxy` in front of Azurite: the same proxy the S3 tests use, the protocol is HTTP;
    (the proxy, a connection string to Azurite through it)."""
    with FaultProxy(lp.LOOPBACK, azurite.port) as proxy:
        yield proxy, lp.azurite_connection_string(proxy.port)


@pytest.fixture
def fault_proxy(s3_server):
    """A `FaultProxy` in front of the lab S3 server, for this test only."""
    with FaultProxy(lp.LOOPBACK, s3_server.port) as proxy:
        yield proxy
