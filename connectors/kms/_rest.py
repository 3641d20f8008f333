"""One JSON POST to a KMS's REST API, with failures mapped to the KEK errors (shared by the
OVHcloud and Scaleway adapters). Response bodies are never echoed whole: only the service's error
text, which names no secret."""

from __future__ import annotations

from urllib.parse import urlsplit

import requests

from .base import KekAuthError, KekError, KekUnavailable, KekWrongKey


def post_json(session: requests.Session, url: str, body: dict, *, where: str, op: str, timeout: float = 15.0) -> dict:
    try:
        # Never follow a redirect: the body holds the key material (a keyset to wrap) and the
        # headers the credentials, and the sovereignty gate judged only the configured host.
        resp = session.post(url, json=body, timeout=timeout, allow_redirects=False)
    except requests.exceptions.SSLError:
        raise KekUnavailable(f"{where}: TLS failed on {op} (server certificate or client certificate); check the endpoint and the certificate files") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise KekUnavailable(f"{where} is unreachable ({type(exc).__name__}); check the endpoint and the network") from None
    except OSError as exc:  # e.g. a client certificate file that cannot be read
        raise KekAuthError(f"{where}: cannot use the client credentials ({exc.strerror or type(exc).__name__}); check the certificate files") from None
    if resp.status_code in (200, 201):
        try:
            return resp.json()
        except ValueError:
            raise KekError(f"{where}: {op} answered HTTP {resp.status_code} without JSON; check the endpoint URL") from None
    if resp.is_redirect:
        target = urlsplit(resp.headers.get("Location", "")).hostname or "another address"
        raise KekError(
            f"{where}: {op} answered with a redirect (HTTP {resp.status_code}) to {target}, which exitplan does not "
            "follow (the request holds key material and credentials, and only the configured host was checked); "
            "configure the endpoint that answers itself"
        )
    detail = _error_text(resp)
    if resp.status_code in (401, 403):
        raise KekAuthError(f"{where} refused our credentials on {op} (HTTP {resp.status_code}{detail}); check the credentials and the key's permissions")
    if resp.status_code == 404:
        raise KekWrongKey(f"{where}: no such key (HTTP 404{detail}); check the key id and region/endpoint")
    if resp.status_code in (400, 422) and op == "decrypt":
        raise KekWrongKey(
            f"{where} does not open this data (HTTP {resp.status_code}{detail}): another key, another project, or an altered "
            "file; use the KEK the keyset was wrapped with (`exitplan keys show` names it)"
        )
    if resp.status_code == 429 or resp.status_code >= 500:
        raise KekUnavailable(f"{where}: {op} answered HTTP {resp.status_code}{detail}; retry later")
    raise KekError(f"{where}: {op} answered HTTP {resp.status_code}{detail}")


def _error_text(resp: requests.Response) -> str:
    """The service's own error text (OKMS: `errors`; Scaleway: `message`), at most 200 characters."""
    try:
        data = resp.json()
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    parts = data.get("errors") or data.get("message") or []
    if isinstance(parts, str):
        parts = [parts]
    text = "; ".join(str(p) for p in parts if p)[:200] if isinstance(parts, list) else ""
    return f": {text}" if text else ""
