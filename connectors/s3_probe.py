"""What an S3-compatible bucket actually does, measured with raw requests under a throw-away prefix.

`exitplan probe` (engine/probe.py) asks; this module sends the requests and reports each answer as
the server gave it (`Answer`: accepted, or refused with its HTTP status and error code), with one
attempt per request so that no retry hides a refusal. Nothing here judges: whether an answer is
safe for a migration depends on the provider profile, which the engine holds.

Everything written goes below the prefix the caller chose, and is recorded as it is created, so
`BucketProbe.clean` can delete every object and abort every upload on every path (an interrupted
probe included); what it cannot remove it names.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import statistics
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Callable
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError

from config.hosts import is_loopback_host

from .base import ConnectorError
from .s3 import S3Store, _unquote

__all__ = ["Answer", "BucketProbe", "MultipartFacts", "SizeLimit", "Timing"]


@dataclass(frozen=True)
class Answer:
    """How the server answered one request: accepted, or refused with its HTTP status and error
    code (`status` None: no HTTP answer at all, `code` then names the connection failure)."""

    accepted: bool
    status: int | None = None
    code: str = ""

    def __str__(self) -> str:
        if self.accepted:
            return "accepted"
        return "refused: " + " ".join(p for p in (str(self.status) if self.status else "", self.code) if p)


ACCEPTED = Answer(True)


@dataclass(frozen=True)
class MultipartFacts:
    """One multipart upload of `parts` parts sent in parallel, completed, and its answers."""

    parts: int
    part_bytes: int
    seconds: float               # from the first part sent to the last part acknowledged
    part_seconds: float          # the median time of one part
    part_etags_md5: bool         # every part's ETag is the MD5 of its bytes
    list_parts: Answer
    listed_parts: int            # parts ListParts named (0 when refused)
    completed: Answer
    etag: str                    # CompleteMultipartUpload's ETag, unquoted ("" when refused)
    expected_etag: str           # the MD5-of-part-MD5s-N form the parts make

    @property
    def etag_form(self) -> str:
        """`md5` when the completed ETag is the MD5 of the parts' MD5s with `-N`, else `opaque`."""
        return "md5" if self.etag.lower() == self.expected_etag else "opaque"


@dataclass(frozen=True)
class SizeLimit:
    """Where a limit of the server lies: the largest value accepted and the first refused, among
    those tried (None: none was)."""

    largest_accepted: int | None
    first_refused: int | None
    refusal: Answer | None


@dataclass(frozen=True)
class Timing:
    """Small requests timed one after the other: the median latency, and the server's clock against
    this machine's (its Date header minus the local time at the middle of the request, seconds;
    positive: the server is ahead; whole seconds, the Date header's resolution)."""

    samples: int
    median_ms: float
    clock_skew_seconds: float | None


def _answer(exc: Exception) -> Answer:
    if isinstance(exc, ClientError):
        meta = exc.response.get("ResponseMetadata", {})
        code = str(exc.response.get("Error", {}).get("Code") or "")
        return Answer(False, meta.get("HTTPStatusCode"), code if code != str(meta.get("HTTPStatusCode")) else "")
    return Answer(False, None, type(exc).__name__)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class BucketProbe:
    """Raw requests to the bucket of `store`, every object and upload below `prefix`.

    Use `clean()` in a `finally`: it deletes what was written and aborts what was opened, and
    returns a sentence for anything it could not remove.
    """

    def __init__(self, store: S3Store, prefix: str):
        if not prefix.endswith("/"):
            raise ValueError("the probe's prefix must end with '/'")
        self.store = store
        self.bucket = store.bucket
        self.prefix = prefix
        self.client = store.probe_client()
        self._keys: set[str] = set()
        self._uploads: dict[str, str] = {}   # upload id -> key, until completed or aborted

    def _key(self, name: str) -> str:
        key = self.prefix + name
        self._keys.add(key)
        return key

    def _call(self, fn: Callable[..., dict], **params: Any) -> tuple[Answer, dict]:
        try:
            return ACCEPTED, fn(Bucket=self.bucket, **params)
        except (ClientError, BotoCoreError, OSError) as exc:
            return _answer(exc), {}

    # ---- single PUT ---------------------------------------------------------------------------

    def put(self, name: str, body: bytes, *, md5: bytes | None = None, **params: Any) -> tuple[Answer, str]:
        """PUT `body` as `prefix + name` with Content-MD5 `md5` (default: the body's own); returns the
        answer and the ETag (unquoted, "" when refused)."""
        digest = hashlib.md5(body).digest() if md5 is None else md5
        answer, resp = self._call(self.client.put_object, Key=self._key(name), Body=body, ContentMD5=_b64(digest),
                                  **params)
        return answer, _unquote(resp.get("ETag"))

    def read_back(self, name: str) -> bytes | None:
        """The bytes stored at `prefix + name` (None when they cannot be read)."""
        answer, resp = self._call(self.client.get_object, Key=self.prefix + name)
        return resp["Body"].read() if answer.accepted else None

    def put_with_checksum_headers(self, name: str, body: bytes) -> tuple[Answer, bool | None]:
        """PUT `body` the way boto3 does by default since 1.36 (`x-amz-checksum-crc32`, in an
        `aws-chunked` body with a trailer over https); returns the answer and whether the bytes read
        back are the bytes sent (a server that stores the chunk framing raw corrupts the object)."""
        client = self.store.probe_client(checksums=True)
        try:
            client.put_object(Bucket=self.bucket, Key=self._key(name), Body=body, ChecksumAlgorithm="CRC32")
        except (ClientError, BotoCoreError, OSError) as exc:
            return _answer(exc), None
        finally:
            client.close()
        return ACCEPTED, self.read_back(name) == body

    def direct_requests(self, name: str, body: bytes) -> tuple[Answer | None, bool | None]:
        """PUT `body` (with a content type and a metadata header) and read a range of it back with
        the store's direct requests (`S3Store._direct_put` / `_direct_get`), then HEAD it through
        the client: the answer (None: the store cannot send direct requests to this endpoint) and
        whether the object is what a PUT through botocore would have made (bytes, content type,
        metadata)."""
        store = self.store
        if not store._direct_possible():
            return None, None
        key = self._key(name)
        params = {"ContentType": "text/plain", "Metadata": {"exitplan-probe": "direct"}}
        try:
            etag = store._direct_put(key, body, len(body), params, hashlib.md5(body).digest())
            back = store._direct_get(key, 1, len(body), _unquote(etag))
        except ConnectorError as exc:
            cause = exc.__cause__
            return (_answer(cause) if isinstance(cause, ClientError) else Answer(False, None, type(exc).__name__)), None
        answer, head = self._call(self.client.head_object, Key=key)
        intact = (answer.accepted and back == body[1:] and head.get("ContentType") == "text/plain"
                  and head.get("Metadata") == {"exitplan-probe": "direct"})
        return ACCEPTED, intact

    # ---- multipart ----------------------------------------------------------------------------

    def multipart(self, name: str, part_bytes: int, parts: int, pool: Executor) -> MultipartFacts:
        """Upload `parts` parts of `part_bytes` random bytes each in parallel on `pool` (each with its
        Content-MD5), list them, complete the upload."""
        key = self._key(name)
        answer, resp = self._call(self.client.create_multipart_upload, Key=key)
        if not answer.accepted:
            return MultipartFacts(parts, part_bytes, 0.0, 0.0, False, answer, 0, answer, "", "")
        upload_id = resp["UploadId"]
        self._uploads[upload_id] = key
        body = os.urandom(part_bytes)
        md5 = hashlib.md5(body).digest()

        def send(number: int) -> tuple[Answer, str, float]:
            began = time.monotonic()
            answer, resp = self._call(self.client.upload_part, Key=key, UploadId=upload_id, PartNumber=number,
                                      Body=body, ContentMD5=_b64(md5))
            return answer, _unquote(resp.get("ETag")), time.monotonic() - began

        began = time.monotonic()
        futures = [pool.submit(send, n) for n in range(1, parts + 1)]
        sent = [f.result() for f in futures]
        seconds = time.monotonic() - began
        refused = next((a for a, _, _ in sent if not a.accepted), None)
        part_etags_md5 = all(etag.lower() == md5.hex() for _, etag, _ in sent)
        expected = f"{hashlib.md5(md5 * parts).hexdigest()}-{parts}"
        if refused is not None:
            return MultipartFacts(parts, part_bytes, seconds, 0.0, part_etags_md5, refused, 0, refused, "", expected)
        listed, resp = self._call(self.client.list_parts, Key=key, UploadId=upload_id)
        done, resp_done = self._call(
            self.client.complete_multipart_upload, Key=key, UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": f'"{etag}"'} for n, (_, etag, _) in enumerate(sent, 1)]})
        if done.accepted:
            del self._uploads[upload_id]
        return MultipartFacts(parts, part_bytes, seconds, statistics.median(s for _, _, s in sent), part_etags_md5,
                              listed, len(resp.get("Parts", ())), done, _unquote(resp_done.get("ETag")), expected)

    def open_upload(self, name: str) -> tuple[Answer, str | None]:
        """Start a multipart upload of `prefix + name` and leave it open; its id (None if refused)."""
        key = self._key(name)
        answer, resp = self._call(self.client.create_multipart_upload, Key=key)
        if answer.accepted:
            self._uploads[resp["UploadId"]] = key
        return answer, resp.get("UploadId")

    def list_uploads(self, upload_id: str) -> tuple[Answer, bool]:
        """ListMultipartUploads under the prefix; whether it named `upload_id`."""
        answer, resp = self._call(self.client.list_multipart_uploads, Prefix=self.prefix)
        return answer, any(u.get("UploadId") == upload_id for u in resp.get("Uploads", ()))

    def abort(self, upload_id: str) -> tuple[Answer, bool | None]:
        """AbortMultipartUpload; whether the upload is gone afterwards (ListParts answers
        NoSuchUpload or 404: True; it lists the upload: False; None when ListParts itself is
        refused, so nothing tells)."""
        key = self._uploads.get(upload_id, "")
        answer, _ = self._call(self.client.abort_multipart_upload, Key=key, UploadId=upload_id)
        after, _ = self._call(self.client.list_parts, Key=key, UploadId=upload_id)
        gone = False if after.accepted else True if after.code == "NoSuchUpload" or after.status == 404 else None
        if answer.accepted:
            self._uploads.pop(upload_id, None)
        return answer, gone

    # ---- limits -------------------------------------------------------------------------------

    def tag_limit(self, name: str, limit: int) -> SizeLimit:
        """The most tags PutObjectTagging accepts on one object, tried at `limit` and `limit + 1`
        and, when `limit` is refused, searched below it."""
        self.put(name, b"tags")
        key = self.prefix + name

        def tags(n: int) -> Answer:
            return self._call(self.client.put_object_tagging, Key=key,
                              Tagging={"TagSet": [{"Key": f"exitplan-probe-{i}", "Value": "1"} for i in range(n)]})[0]

        return _limit(tags, limit)

    def metadata_limit(self, name: str, limit: int) -> SizeLimit:
        """The most user-metadata bytes (names and values, as S3 counts them) a PUT accepts, tried at
        `limit` and `limit + 1` and, when `limit` is refused, searched below it."""
        field = "exitplan-probe"

        def metadata(n: int) -> Answer:
            return self.put(name, b"", Metadata={field: "m" * max(0, n - len(field))})[0]

        return _limit(metadata, limit, lowest=len(field))

    # ---- the endpoint -------------------------------------------------------------------------

    def addressing(self) -> dict[str, Answer | None]:
        """HeadBucket in path style and in virtual-hosted style (None: not testable, because the
        endpoint is an IP address or a loopback name, where the bucket cannot be a host name)."""
        found: dict[str, Answer | None] = {}
        host = urlsplit(self.store.endpoint_url or "").hostname or ""
        for style in ("path", "virtual"):
            if style == "virtual" and (is_loopback_host(host) or _is_ip(host)):
                found[style] = None
                continue
            client = self.store.probe_client(addressing_style=style)
            try:
                found[style] = self._call_with(client.head_bucket)
            finally:
                client.close()
        return found

    def tls(self) -> tuple[str, Answer | None]:
        """The endpoint's scheme, and (https only) whether a request whose certificate is verified
        against the system's authorities is answered."""
        scheme = urlsplit(self.store.endpoint_url or "").scheme or "https"
        if scheme != "https":
            return scheme, None
        client = self.store.probe_client(verify_tls=True)
        try:
            return scheme, self._call_with(client.head_bucket)
        finally:
            client.close()

    def timing(self, name: str, samples: int) -> Timing:
        """HEAD `prefix + name` `samples` times in a row (it must exist)."""
        latencies: list[float] = []
        skews: list[float] = []
        for _ in range(samples):
            began, began_wall = time.monotonic(), time.time()
            answer, resp = self._call(self.client.head_object, Key=self.prefix + name)
            elapsed = time.monotonic() - began
            if not answer.accepted:
                continue
            latencies.append(elapsed * 1000)
            date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
            if date:
                try:
                    skews.append(parsedate_to_datetime(date).timestamp() - (began_wall + elapsed / 2))
                except (TypeError, ValueError):
                    pass
        return Timing(len(latencies), statistics.median(latencies) if latencies else 0.0,
                      round(statistics.median(skews)) if skews else None)

    def _call_with(self, fn: Callable[..., dict]) -> Answer:
        try:
            fn(Bucket=self.bucket)
            return ACCEPTED
        except (ClientError, BotoCoreError, OSError) as exc:
            return _answer(exc)

    # ---- cleanup ------------------------------------------------------------------------------

    def clean(self) -> list[str]:
        """Abort every upload still open and delete every object below the prefix (those recorded,
        and whatever a listing of the prefix still shows); a sentence for each that remains."""
        left: list[str] = []
        for upload_id, key in list(self._uploads.items()):
            answer, _ = self._call(self.client.abort_multipart_upload, Key=key, UploadId=upload_id)
            if answer.accepted or answer.code == "NoSuchUpload":
                del self._uploads[upload_id]
            else:
                left.append(f"multipart upload {upload_id} of {key!r} could not be aborted ({answer}): its parts stay "
                            "until the bucket's lifecycle rule removes them, or abort it by hand")
        listed, resp = self._call(self.client.list_objects_v2, Prefix=self.prefix)
        keys = self._keys | {o["Key"] for o in resp.get("Contents", ())}
        for key in sorted(keys):
            answer, _ = self._call(self.client.delete_object, Key=key)
            if not answer.accepted and answer.code != "NoSuchKey":
                left.append(f"object {key!r} could not be deleted ({answer}); delete it by hand")
        after, resp = self._call(self.client.list_objects_v2, Prefix=self.prefix)
        if not after.accepted:
            left.append(f"the prefix {self.prefix!r} could not be listed to confirm it is empty ({after}); look at it")
        else:
            named = {s.split("'")[1] for s in left if s.startswith("object ")}
            left += [f"object {o['Key']!r} is still there after its deletion; delete it by hand"
                     for o in resp.get("Contents", ()) if o["Key"] not in named]
        self.client.close()
        return left


def _limit(attempt: Callable[[int], Answer], limit: int, lowest: int = 1) -> SizeLimit:
    """Try `limit`, then `limit + 1` when it was accepted, else search [lowest, limit) for the largest
    value accepted (a handful of requests: a binary search)."""
    at_limit = attempt(limit)
    if at_limit.accepted:
        above = attempt(limit + 1)
        return SizeLimit(limit + 1 if above.accepted else limit, None if above.accepted else limit + 1,
                         None if above.accepted else above)
    low, high = lowest - 1, limit   # low: accepted (or nothing yet), high: refused
    while high - low > 1:
        mid = (low + high) // 2
        if attempt(mid).accepted:
            low = mid
        else:
            high = mid
    return SizeLimit(low if low >= lowest else None, high, at_limit)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False
