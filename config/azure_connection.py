"""Azure Storage connection strings, read exactly the way the Azure SDK reads them.

Lab mode is decided from the endpoint each source talks to (`config.loader.off_loopback`); for a
connection string that must be the endpoint azure-storage-blob derives from it, not another reading
of the same text. This module is the one parser of connection strings in exitplan, and it follows
the SDK's (`parse_connection_str` in `azure.storage.blob._shared.base_client`, then
`_parse_url` for the account URL, azure-storage-blob 12.x):

- the text loses its trailing `;`s, then splits on `;`; every part must hold a `=`;
- keys are compared by `str.upper()`, untrimmed (`blobendpoint`, `BLOBENDPOINT` and `BlobEndpoınt`
  with a dotless ı are one key; ` BlobEndpoint` with a space is another); the SDK keeps the *last*
  of a repeated key, so a repeated key is refused here: its first value is what a person reads;
- `UseDevelopmentStorage=true` (exactly `true`) means the emulator on 127.0.0.1:10000;
- else `BlobEndpoint`, else `DefaultEndpointsProtocol://AccountName.blob.EndpointSuffix` when all
  three are set, else `https://AccountName.blob.EndpointSuffix` (default `core.windows.net`); an
  empty `BlobEndpoint` counts as absent, and a `BlobSecondaryEndpoint` alone is an error;
- an endpoint not starting with `http` gets `https://` in front.

config imports no SDK (tests/unit/test_layout.py), so the rules are written out here and
tests/unit/test_azure_sdk_private_api.py runs this parser and the SDK's side by side, offline, and
fails on the first SDK version where they part (pyproject.toml bounds azure-storage-blob).
The connector checks again, at run time, that the SDK's client talks to the host parsed here
(`connectors.azure_blob.AzureBlobSource.from_connection_string`).

Nothing here keeps or repeats a value: a connection string holds the account key, so errors name
keys and positions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ConfigFileError, PolicyRefusal
from .hosts import ambiguous_url, is_loopback_host

# What `UseDevelopmentStorage=true` stands for in the SDK (`_get_development_storage_endpoint`).
DEVELOPMENT_STORAGE_BLOB_ENDPOINT = "http://127.0.0.1:10000/devstoreaccount1"
DEFAULT_ENDPOINT_SUFFIX = "core.windows.net"


class ConnectionStringError(ValueError):
    """The connection string cannot be used; the message names the key or the part, never a value."""


@dataclass(frozen=True)
class BlobEndpoints:
    """Where a connection string sends the Blob service's requests (no credential is kept).

    `primary`: the account URL the SDK's client is built with (scheme, host, optional port and
    path). `secondary`: the string's `BlobSecondaryEndpoint`, or None. exitplan's connector never
    reads from a secondary (its retry policy does not retry to one: pinned in
    tests/unit/test_azure_sdk_private_api.py), and a string whose two endpoints are not both on
    loopback or both off it is refused, so the primary alone decides lab mode.
    """

    primary: str
    secondary: str | None

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host named: the primary's, then the secondary's."""
        hosts = [urlsplit(self.primary).hostname or ""]
        if self.secondary:
            hosts.append(urlsplit(self.secondary if "//" in self.secondary else "//" + self.secondary).hostname or "")
        return tuple(hosts)


def _settings(conn_str: str) -> dict[str, str]:
    """The key/value pairs by upper-cased key, as the SDK builds them; a repeated key is refused."""
    parts = conn_str.rstrip(";").split(";")
    settings: dict[str, str] = {}
    spelled: dict[str, str] = {}
    for number, part in enumerate(parts, start=1):
        key, eq, value = part.partition("=")
        if not eq:
            raise ConnectionStringError(
                "the connection string is blank or malformed" if not conn_str.strip()
                else f"part {number} of the connection string (counting `;`-separated parts) has no `=`; "
                     "write KEY=VALUE pairs separated by `;`"
            )
        upper = key.upper()
        if upper in settings:
            also = (f" (as `{spelled[upper]}` and `{key}`: the SDK ignores case in keys)"
                    if spelled[upper] != key else "")
            raise ConnectionStringError(
                f"the connection string sets `{spelled[upper]}` twice{also}: the Azure SDK would use the last one "
                "and ignore the first; keep one"
            )
        settings[upper], spelled[upper] = value, key
    return settings


def _account_url(url: str) -> str:
    """The SDK's reading of an account URL: `https://` in front of one not starting with `http`."""
    return url if url.lower().startswith("http") else "https://" + url


def blob_endpoints(conn_str: str) -> BlobEndpoints:
    """Where the SDK will send Blob requests for `conn_str` (see the module docstring);
    `ConnectionStringError` for a string the SDK would refuse, a repeated key, or an endpoint whose
    host the gate and the HTTP client could read differently."""
    settings = _settings(conn_str)
    if settings.get("USEDEVELOPMENTSTORAGE") == "true":
        return BlobEndpoints(DEVELOPMENT_STORAGE_BLOB_ENDPOINT, None)
    primary = secondary = None
    if "BLOBENDPOINT" in settings:
        primary = settings["BLOBENDPOINT"]
        secondary = settings.get("BLOBSECONDARYENDPOINT")
    elif "BLOBSECONDARYENDPOINT" in settings:
        raise ConnectionStringError("the connection string sets `BlobSecondaryEndpoint` without `BlobEndpoint`; "
                                    "set `BlobEndpoint` too, or neither")
    elif all(k in settings for k in ("DEFAULTENDPOINTSPROTOCOL", "ACCOUNTNAME", "ENDPOINTSUFFIX")):
        protocol, account, suffix = (settings[k] for k in ("DEFAULTENDPOINTSPROTOCOL", "ACCOUNTNAME", "ENDPOINTSUFFIX"))
        primary = f"{protocol}://{account}.blob.{suffix}"
    if not primary:
        if "ACCOUNTNAME" not in settings:
            raise ConnectionStringError("the connection string names no blob endpoint: set `BlobEndpoint`, or "
                                        "`AccountName` (with `AccountKey` or `SharedAccessSignature`)")
        primary = f"https://{settings['ACCOUNTNAME']}.blob.{settings.get('ENDPOINTSUFFIX', DEFAULT_ENDPOINT_SUFFIX)}"
    primary = _account_url(primary)
    given = "BLOBENDPOINT" in settings and settings["BLOBENDPOINT"]
    for name, url in (("`BlobEndpoint`" if given else "the blob endpoint its `AccountName` and `EndpointSuffix` make",
                       primary),
                      ("`BlobSecondaryEndpoint`", secondary and _account_url(secondary))):
        why = url and ambiguous_url(url)
        if why:
            raise ConnectionStringError(f"the connection string's {name} is refused: {why}")
    endpoints = BlobEndpoints(primary, secondary)
    local = [is_loopback_host(h) for h in endpoints.hosts]
    if len(set(local)) > 1:
        raise ConnectionStringError(
            f"the connection string's blob endpoints are {' and '.join(endpoints.hosts)}: one on loopback, one not; "
            "set both to the local emulator (the lab) or both to the account"
        )
    return endpoints


def connection_string_blob_endpoint(conn_str: str, *, where: object, source: str, field: str) -> str:
    """The account URL the SDK will use for source `source`'s connection string `conn_str`
    (`blob_endpoints(...).primary`).

    A string refused by `blob_endpoints` is a `ConfigFileError` (exit 2) naming `where` (the config
    file) and `field` (the setting it came from). Plain HTTP to a host off loopback is a
    `PolicyRefusal` (exit 3) here already: outside lab mode the policy refuses it, and in lab mode
    every endpoint is on loopback, so no configuration may use it.
    """
    try:
        endpoint = blob_endpoints(conn_str).primary
    except ConnectionStringError as exc:
        raise ConfigFileError(f"{where}: field `{field}`: {exc}") from None
    url = urlsplit(endpoint)
    if url.scheme.lower() != "https" and not is_loopback_host(url.hostname):
        raise PolicyRefusal(
            f"source `{source}` in {where} is refused: its connection string sends requests to {url.hostname} over "
            "plain HTTP, which is allowed only in the lab (every endpoint on loopback); use https "
            "(`DefaultEndpointsProtocol=https`, or an https:// `BlobEndpoint`)"
        )
    return endpoint
