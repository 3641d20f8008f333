"""Writing blobs into Azure Blob Storage the ways real uploaders do: for the lab's seed.

exitplan never writes to a real Azure account (it only reads its sources); this writer exists so
the lab can fill Azurite with blobs that look like what exit projects meet: some uploaded in one
Put Blob with a Content-MD5, some as staged blocks without any MD5, with content headers, user
metadata and storage tiers. SDK exceptions are translated to `connectors.base` errors, so the
caller never sees an `azure.*` type.
"""

from __future__ import annotations

import base64
from typing import Iterable, Mapping

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobBlock, BlobServiceClient, BlobType
from azure.storage.blob import ContentSettings as AzureContentSettings

from .base import (
    AuthError,
    ConnectorError,
    ContentSettings,
    InvalidRequest,
    NotFound,
    Throttled,
    TransientError,
)


def _azure_content(content: ContentSettings, md5: bytes | None = None) -> AzureContentSettings:
    return AzureContentSettings(
        content_type=content.content_type,
        content_encoding=content.content_encoding,
        cache_control=content.cache_control,
        content_disposition=content.content_disposition,
        content_language=content.content_language,
        content_md5=bytearray(md5) if md5 else None,
    )


def _block_id(index: int) -> str:
    # Every block id of a blob must have the same length before base64: fixed-width counter.
    return base64.b64encode(f"exitplan-seed-{index:06d}".encode()).decode()


class AzureBlobWriter:
    """Creates containers and writes blobs through one `BlobServiceClient` (thread-safe).

    `retries` bounds the SDK's own retry of one request (default 3), with `initial_backoff`
    seconds (default 0.5) doubling each time: the SDK's defaults (15 s, tripling) would make an
    emulator that is not running look like a hang of several minutes.
    """

    def __init__(self, connection_string: str, *, retries: int = 3, initial_backoff: float = 0.5,
                 connection_timeout: float = 5.0):
        try:
            self._service = BlobServiceClient.from_connection_string(
                connection_string,
                retry_total=retries,
                initial_backoff=initial_backoff,
                increment_base=2,
                connection_timeout=connection_timeout,
            )
        except ValueError as exc:
            raise ConnectorError(f"the Azure connection string is not valid: {exc}") from exc
        self.label = f"azure:{self._service.account_name}"

    def _translate(self, exc: Exception, what: str, key: str | None = None) -> ConnectorError:
        if isinstance(exc, ResourceNotFoundError):
            return NotFound(f"{self.label}: {what}: not found", key=key)
        if isinstance(exc, ClientAuthenticationError):
            return AuthError(f"{self.label}: {what}: the account key was refused ({exc.reason})", key=key)
        if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
            return TransientError(f"{self.label}: {what}: {self._service.url} did not answer ({exc})", key=key)
        if isinstance(exc, HttpResponseError):
            status = exc.status_code or 0
            if status in (429, 503):
                return Throttled(f"{self.label}: {what}: the service asked to slow down (HTTP {status})", key=key)
            if status >= 500:
                return TransientError(f"{self.label}: {what}: HTTP {status} {exc.reason}", key=key)
            return InvalidRequest(f"{self.label}: {what}: HTTP {status} {exc.reason}", key=key)
        return ConnectorError(f"{self.label}: {what}: {exc}", key=key)

    def ensure_container(self, container: str) -> None:
        """Create `container` unless it exists already."""
        try:
            self._service.create_container(container)
        except ResourceExistsError:
            pass
        except Exception as exc:  # noqa: BLE001 - translated, never leaks an SDK type
            raise self._translate(exc, f"creating container {container!r}") from exc

    def put_single(self, container: str, name: str, body: bytes, content: ContentSettings,
                   metadata: Mapping[str, str], md5: bytes) -> None:
        """One Put Blob (overwriting), with `md5` as the blob's Content-MD5 so Azure keeps it."""
        blob = self._service.get_blob_client(container, name)
        try:
            blob.upload_blob(
                body, length=len(body), overwrite=True, metadata=dict(metadata),
                content_settings=_azure_content(content, md5),
            )
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, f"writing {container}/{name}", key=name) from exc

    def put_blocks(self, container: str, name: str, chunks: Iterable[bytes], content: ContentSettings,
                   metadata: Mapping[str, str]) -> int:
        """Put Block per chunk, then Put Block List, deliberately without a Content-MD5 (the blob
        then has none, as on real Azure). Returns the bytes written. An empty blob is a commit
        of an empty block list."""
        blob = self._service.get_blob_client(container, name)
        blocks, written = [], 0
        try:
            for i, chunk in enumerate(chunks):
                block_id = _block_id(i)
                blob.stage_block(block_id, chunk, length=len(chunk))
                blocks.append(BlobBlock(block_id=block_id))
                written += len(chunk)
            blob.commit_block_list(blocks, metadata=dict(metadata), content_settings=_azure_content(content))
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, f"writing {container}/{name} in blocks", key=name) from exc
        return written

    def set_tier(self, container: str, name: str, tier: str) -> None:
        """Set the blob's access tier ("Hot", "Cool", "Cold", "Archive")."""
        try:
            self._service.get_blob_client(container, name).set_standard_blob_tier(tier)
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, f"setting tier {tier} on {container}/{name}", key=name) from exc

    def put_append(self, container: str, name: str, body: bytes) -> None:
        """An append blob holding `body` (replacing one of that name), as Azure writes the change
        feed's Avro files."""
        try:
            self._service.get_blob_client(container, name).upload_blob(body, blob_type=BlobType.AppendBlob,
                                                                       overwrite=True)
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, f"writing append blob {container}/{name}", key=name) from exc

    def names(self, container: str) -> list[str]:
        """The names of the blobs of `container`."""
        try:
            return [b.name for b in self._service.get_container_client(container).list_blobs()]
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, f"listing container {container!r}") from exc

    def delete(self, container: str, name: str) -> None:
        """Delete blob `name` (with its snapshots)."""
        try:
            self._service.get_blob_client(container, name).delete_blob(delete_snapshots="include")
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, f"deleting {container}/{name}", key=name) from exc
