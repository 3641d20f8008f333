"""The Prefect block reader behind the configuration's `*_block` credentials (`config.secrets`).

`config`, `engine` and `connectors` never import prefect: they call `config.secrets.read_secret`,
which asks the reader installed here. `install()` runs when the `flows` package is imported (the
CLI, the Prefect flows); prefect itself is imported only when a block is actually read.

The reader reads the block *document* by block type slug and name with the Prefect client of the
current settings (PREFECT_API_URL, PREFECT_API_KEY; inside a flow run, the run's client), secret
fields included, and returns its data. It needs none of the blocks' own packages: an
`aws-credentials` (prefect-aws) or `azure-blob-storage-credentials` (prefect-azure) block is read
without prefect-aws or prefect-azure installed. Which field holds the credential is decided in
`config.secrets.BLOCK_FIELDS`. Nothing read here is logged, cached or put in an error.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from config.secrets import BlockNotFound, BlockUnreachable, block_reader, set_block_reader


def _api_label(url: str | None) -> str:
    """The API URL without user info or query (it could carry a credential)."""
    if not url:
        return "the Prefect API"
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"the Prefect API at {parts.scheme}://{host}{port}{parts.path}"


def read_block_document(block_type_slug: str, block_name: str) -> dict[str, Any]:
    """The data of block `block_type_slug/block_name`, secrets in clear.

    Raises `BlockNotFound` (no such block, or no such block type) or `BlockUnreachable` (no API
    configured, unreachable, refused), never with a value or a response body in the message.
    """
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    api = PREFECT_API_URL.value()
    if not api and not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        raise BlockUnreachable("no Prefect API is configured; set PREFECT_API_URL to the Prefect server that holds the block")
    where = _api_label(api)
    try:
        with get_client(sync_client=True) as client:
            document = client.read_block_document_by_name(
                name=block_name, block_type_slug=block_type_slug, include_secrets=True
            )
    except ObjectNotFound:
        raise BlockNotFound() from None
    except httpx.HTTPStatusError as exc:
        raise BlockUnreachable(
            f"{where} answered HTTP {exc.response.status_code}; check PREFECT_API_URL and PREFECT_API_KEY"
        ) from None
    except (httpx.HTTPError, OSError) as exc:
        raise BlockUnreachable(f"{where} cannot be reached ({type(exc).__name__}); start it or fix PREFECT_API_URL") from None
    return dict(document.data or {})


def install() -> None:
    """Make `config.secrets` read blocks through the Prefect client (unless a reader is installed)."""
    if block_reader() is None:
        set_block_reader(read_block_document)
