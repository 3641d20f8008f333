#!/usr/bin/env python3
"""Client CPU of one small PUT and one small ranged GET, SDK against lean alternatives.

The small-object path makes two requests per object (an Azure ranged GET, an S3 PUT); this
measures what each costs the client, one thread, on the lab's servers (its own moto and Azurite on
free loopback ports, stopped at the end):

- ``S3Store.put`` as exitplan sends it (a direct request: SigV4 as botocore signs, libcurl,
  ``connectors/s3.py``, ``connectors/signing.py``, ``connectors/curl.py``), the same store with
  its direct path off (through the boto3 client, as before), and a bare ``client.put_object``;
- a lean PUT: the same request signed with botocore's own SigV4 signer (``UNSIGNED-PAYLOAD``,
  Content-MD5 sent and the ETag checked, as the connector does) and sent over a urllib3 pool;
- ``AzureBlobSource.read_range`` as exitplan sends it (a direct request) and with its direct path
  off (azure-core's pipeline through a blob client), next to a bare urllib3 GET and a bare libcurl
  GET of the same range without authentication (Azurite with a public-read container; the floor
  of a client on each).

CPU per request is ``time.thread_time()`` of the one thread doing the requests (servers excluded).
Run: ``.venv/bin/python bench/bench_put.py [--count 1000] [--kib 16]``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_migrate import BUCKET, Lab, s3_client  # noqa: E402
from config.lab import LAB_REGION, LAB_S3_ACCESS_KEY, LAB_S3_SECRET_KEY  # noqa: E402


def timed(label: str, count: int, fn) -> dict:
    fn(-1)  # warm: connection, first-use caches
    t0, w0 = time.thread_time(), time.perf_counter()
    for i in range(count):
        fn(i)
    cpu, wall = time.thread_time() - t0, time.perf_counter() - w0
    row = {"what": label, "cpu_ms": 1000 * cpu / count, "wall_ms": 1000 * wall / count}
    print(f"  {label:58} {row['cpu_ms']:6.3f} CPU ms/request   {row['wall_ms']:6.3f} wall ms", flush=True)
    return row


def lean_put(endpoint: str, bucket: str):
    """A PUT signed by botocore's SigV4 signer, sent over urllib3; returns put(key, body, md5) -> ETag."""
    import urllib3
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    signer = S3SigV4Auth(Credentials(LAB_S3_ACCESS_KEY, LAB_S3_SECRET_KEY), "s3", LAB_REGION)
    pool = urllib3.PoolManager(maxsize=8, retries=False)

    def put(key: str, body: bytes, md5: bytes) -> str:
        url = f"{endpoint}/{bucket}/{key}"
        req = AWSRequest("PUT", url, data=body, headers={
            "Content-MD5": base64.b64encode(md5).decode(), "Content-Type": "application/octet-stream",
            "x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
        signer.add_auth(req)
        resp = pool.request("PUT", url, body=body, headers=dict(req.headers.items()), preload_content=True)
        if resp.status != 200:
            raise RuntimeError(f"PUT {key}: HTTP {resp.status}")
        etag = resp.headers.get("ETag", "").strip('"')
        if etag != md5.hex():
            raise RuntimeError(f"PUT {key}: ETag {etag} is not the MD5 sent")
        return etag

    return put


def main() -> int:
    p = argparse.ArgumentParser(prog="bench_put.py", description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=1000, help="requests per candidate (default 1000)")
    p.add_argument("--kib", type=int, default=16, help="object size in KiB (default 16)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="exitplan-bench-put-"))
    lab = Lab(tmp)
    body = os.urandom(args.kib * 1024)
    md5 = hashlib.md5(body).digest()
    print(f"client CPU per request, {args.count} x {args.kib} KiB, one thread; load {os.getloadavg()[0]:.2f}")
    try:
        lab.restart_moto()
        lab.start_azurite()
        from connectors.base import SinkLimits, WriteMeta, ContentSettings
        from connectors.s3 import S3Store
        from connectors.azure_blob import AzureBlobSource

        meta = WriteMeta(content=ContentSettings(content_type="application/octet-stream"), metadata={})
        store = S3Store(BUCKET, endpoint_url=lab.s3_url, region=LAB_REGION, access_key_id=LAB_S3_ACCESS_KEY,
                        secret_access_key=LAB_S3_SECRET_KEY, limits=SinkLimits(), verify_tls=False)
        client = s3_client(lab.s3_url)
        through_client = S3Store(BUCKET, endpoint_url=lab.s3_url, region=LAB_REGION,
                                 access_key_id=LAB_S3_ACCESS_KEY, secret_access_key=LAB_S3_SECRET_KEY,
                                 limits=SinkLimits(), verify_tls=False)
        through_client._curl = None  # its direct path off
        rows = [
            timed("S3Store.put (the connector: a direct request)", args.count,
                  lambda i: store.put(f"c/{i}", body, len(body), meta, md5)),
            timed("S3Store.put through the boto3 client (direct path off)", args.count,
                  lambda i: through_client.put(f"o/{i}", body, len(body), meta, md5)),
            timed("boto3 put_object (bare, ContentMD5)", args.count,
                  lambda i: client.put_object(Bucket=BUCKET, Key=f"b/{i}", Body=body,
                                              ContentMD5=base64.b64encode(md5).decode())),
        ]
        put = lean_put(lab.s3_url, BUCKET)
        rows.append(timed("lean PUT (botocore SigV4 signer + urllib3)", args.count, lambda i: put(f"l/{i}", body, md5)))

        from azure.storage.blob import BlobServiceClient, PublicAccess

        service = BlobServiceClient.from_connection_string(lab.conn_str)
        container = service.create_container("put-bench", public_access=PublicAccess.CONTAINER)
        container.upload_blob("obj", body)
        etag = container.get_blob_client("obj").get_blob_properties().etag.strip('"')
        source = AzureBlobSource.from_connection_string(lab.conn_str, "put-bench")
        rows.append(timed("AzureBlobSource.read_range (the connector: a direct request)", args.count,
                          lambda i: source.read_range("obj", 0, len(body), if_match=etag)))
        through_sdk = AzureBlobSource.from_connection_string(lab.conn_str, "put-bench")
        through_sdk.use_sdk_only()
        rows.append(timed("AzureBlobSource.read_range through azure-core (direct off)", args.count,
                          lambda i: through_sdk.read_range("obj", 0, len(body), if_match=etag)))
        import urllib3

        pool = urllib3.PoolManager(maxsize=8, retries=False)
        url = f"{container.url}/obj"
        rows.append(timed("bare urllib3 GET of the same range (no auth: the floor)", args.count,
                          lambda i: pool.request("GET", url, headers={"Range": f"bytes=0-{len(body) - 1}",
                                                                     "If-Match": f'"{etag}"'}).data))
        from connectors.curl import CurlSession

        curl = CurlSession(connect_timeout=5, read_timeout=30, verify=False)
        rows.append(timed("bare libcurl GET of the same range (no auth)", args.count,
                          lambda i: curl.request("GET", url, {"Range": f"bytes=0-{len(body) - 1}",
                                                              "If-Match": f'"{etag}"'}).body))
        return 0
    finally:
        lab.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
