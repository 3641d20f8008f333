"""Host names and URLs as the policy sees them.

The gate reads a URL with Python's `urllib.parse`; the SDKs send requests through urllib3, which
reads some URLs differently (`http://a.example\\@127.0.0.1/` is 127.0.0.1 to the first, a.example
to the second). `ambiguous_url` refuses every URL whose host the two could disagree on, so the
host the gate judges is the host the request goes to.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit


def is_loopback_host(host: str | None) -> bool:
    """True for localhost and any loopback address (127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# A host name (ASCII labels) or a bracketed IPv6 literal, then an optional port: nothing else
# (no user, no `@`, no percent-escapes) may stand between `//` and the path.
_PLAIN_AUTHORITY = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


def ambiguous_url(url: str) -> str | None:
    """Why the host of `url` could be read differently by the gate and by the HTTP client, or None.

    Refused: a backslash, a space or a control character anywhere (urllib drops tabs and newlines
    and stops the host at `/` only; urllib3 stops it at a backslash), and an authority that is not
    a plain `host[:port]` (a user part, `@`, a percent-escape, a non-ASCII host).
    """
    if "\\" in url:
        return "it holds a backslash"
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        return "it holds a space or a control character"
    if not _PLAIN_AUTHORITY.match(urlsplit(url).netloc):
        return "its host part is not a plain host name or IP address with an optional port (no user part, no `@`)"
    return None
