"""The configuration file, as pydantic models. See the README's "Configuration reference".

Secrets never live in the YAML: every credential is the *name* of an environment variable
(`*_env` fields) or a reference to a Prefect block (`*_block` fields, `<block-type-slug>/<name>`),
read when a connector is built (`config.secrets`), never stored, logged or passed as a parameter.
Plain, non-secret strings may use `${VAR}` or `${VAR:-default}` (expanded by the loader).
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from .errors import ConfigFileError
from .hosts import ambiguous_url
from .secrets import AWS_CREDENTIALS, AZURE_BLOB_CREDENTIALS, SECRET, check_block_ref
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .bandwidth import EXAMPLE as BANDWIDTH_EXAMPLE, BandwidthTimetable, parse_bandwidth
from .price_catalog import (AzurePriceOverrides, DestinationPriceOverrides, PriceError, destination_prices,
                            load_azure_prices, with_overrides)
from .providers import load_catalog
from .sizes import ByteSize

_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
EnvVarName = Annotated[str, Field(pattern=_ENV_NAME.pattern)]


def _block_ref(*allowed: str, hint: str = ""):
    """A Prefect block reference `<block-type-slug>/<block-name>` whose type is one of `allowed`."""
    return Annotated[str, AfterValidator(lambda v: check_block_ref(v, allowed, hint))]


SecretBlockRef = _block_ref(SECRET)  # a Prefect Secret block: `secret/<name>`


def _service_url(v: str, expected: str) -> str:
    """`v` without its trailing `/`, if it is an http(s) URL whose host the gate and the HTTP
    client read alike (`config.hosts.ambiguous_url`); else ValueError saying `expected`."""
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(expected)
    why = ambiguous_url(v)
    if why:
        raise ValueError(f"{why}; {expected}")
    return v.rstrip("/")

_BOTH = "`{env}` and `{block}` are both set; a credential comes from an environment variable or a Prefect block, not both"


def _env_or_block(data, item: str, default_env: str | None = None):
    """Before validation: `<item>_env` and `<item>_block` exclude each other; with neither,
    `<item>_env` takes `default_env`."""
    if not isinstance(data, dict):
        return data
    env, block = f"{item}_env", f"{item}_block"
    if data.get(env) is not None and data.get(block) is not None:
        raise ValueError(_BOTH.format(env=env, block=block))
    if default_env and data.get(env) is None and data.get(block) is None:
        data = {**data, env: default_env}
    return data


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


class AzureBlobSourceConfig(_Model):
    """An Azure Storage account read with one of three credentials.

    Exactly one of: a connection string (e.g. the lab's) in an environment variable
    (`connection_string_env`) or a Prefect block (`connection_string_block`: a Secret, or
    prefect-azure's `azure-blob-storage-credentials`); a SAS token (service or account), from
    `sas_token_env` or `sas_token_block` (a Secret), with `account_url`; or `credential: default`
    with `account_url` (azure-identity's DefaultAzureCredential: managed identity, workload
    identity, az login…).
    """

    kind: Literal["azure_blob"] = "azure_blob"
    account_url: str | None = None
    connection_string_env: EnvVarName | None = None
    connection_string_block: _block_ref(SECRET, AZURE_BLOB_CREDENTIALS) | None = None
    sas_token_env: EnvVarName | None = None
    sas_token_block: SecretBlockRef | None = None
    credential: Literal["default"] | None = None
    # `azurite`: when `connection_string_env` is unset, read the emulator's published development
    # account on 127.0.0.1 (port EXITPLAN_LAB_AZURITE_PORT, default 10000). For the lab only.
    emulator: Literal["azurite"] | None = None
    max_connections: int = Field(32, ge=1, le=1024)
    # Small ranged reads (at most 1 MiB) and listings as direct requests (the SDK's own credential
    # and retry policies, one urllib3 request each; connectors/azure_blob.py `_DirectRequests`);
    # false: every request through the SDK's pipeline.
    direct_requests: bool = True
    # Requests per second to this storage account, shared by every thread and shard process of a
    # run (Azure's published scalability target is 20,000 per account); None: not paced.
    request_rate: float | None = Field(None, gt=0)

    @field_validator("account_url")
    @classmethod
    def _account_url(cls, v: str | None) -> str | None:
        return None if v is None else _service_url(v, "expected the account's blob URL, such as "
                                                       "https://ACCOUNT.blob.core.windows.net")

    @model_validator(mode="after")
    def _one_credential(self):
        for item in ("connection_string", "sas_token"):
            if getattr(self, f"{item}_env") and getattr(self, f"{item}_block"):
                raise ValueError(_BOTH.format(env=f"{item}_env", block=f"{item}_block"))
        chosen = [n for n in ("connection_string_env", "connection_string_block", "sas_token_env", "sas_token_block",
                              "credential") if getattr(self, n)]
        if len(chosen) != 1:
            raise ValueError(
                "set exactly one of `connection_string_env` or `connection_string_block`, `sas_token_env` or "
                "`sas_token_block` (with `account_url`), or `credential: default` (with `account_url`)"
            )
        if self.emulator and chosen[0] != "connection_string_env":
            raise ValueError("`emulator: azurite` goes with `connection_string_env`")
        if not chosen[0].startswith("connection_string_") and not self.account_url:
            raise ValueError(f"`{chosen[0]}` needs `account_url` (https://ACCOUNT.blob.core.windows.net)")
        return self


_FINGERPRINT = r"^SHA256:[A-Za-z0-9+/]{43}$"


class _SftpEndpoint(_Model):
    """An SFTP server (OpenSSH or any SFTP v3 server) reached over SSH: what sources and
    destinations of kind `sftp` share.

    The server's host key is pinned, always: by an OpenSSH
    `known_hosts` file (a path; relative paths from the config file's directory) and/or by
    `host_key_fingerprints` (`SHA256:...` as `ssh-keygen -lf` prints them); an unknown or changed
    host key is refused. Login by key: the private key's text from the environment variable
    `private_key_env` or the Prefect Secret block `private_key_block`, or the key file
    `private_key_file`; its passphrase, if any, from `passphrase_env` / `passphrase_block`; where
    the server trusts a user certificate authority, the key's OpenSSH certificate (`-cert.pub`) from
    `certificate_file`, `certificate_env` or `certificate_block`. A
    password (`password_env` / `password_block`) is used only with `auth: password`. No SSH agent
    is consulted, nothing is forwarded. `connections`: SSH connections opened to the server (one
    SFTP session each; each read or write holds one while it runs). `transport`: what carries
    them: `openssh`, the OpenSSH client (`ssh`, in a process per connection: the SSH protocol in
    C, about half the CPU per GB), `paramiko` (in Python, in exitplan's process), or `auto` (the
    default): OpenSSH when it is installed and the login is by key, paramiko otherwise. Either
    way the host key is checked against the pin by exitplan first (connectors/openssh.py).
    """

    host: str = Field(min_length=1)
    port: int = Field(22, ge=1, le=65535)
    username: str = Field(min_length=1)
    root: str = "/"
    known_hosts: str | None = None
    host_key_fingerprints: tuple[Annotated[str, Field(pattern=_FINGERPRINT)], ...] = ()
    auth: Literal["key", "password"] = "key"
    private_key_env: EnvVarName | None = None
    private_key_block: SecretBlockRef | None = None
    private_key_file: str | None = None
    passphrase_env: EnvVarName | None = None
    passphrase_block: SecretBlockRef | None = None
    certificate_env: EnvVarName | None = None
    certificate_block: SecretBlockRef | None = None
    certificate_file: str | None = None
    password_env: EnvVarName | None = None
    password_block: SecretBlockRef | None = None
    connections: int = Field(8, ge=1, le=64)
    transport: Literal["auto", "openssh", "paramiko"] = "auto"

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("expected an absolute path on the server, such as /srv/deliveries")
        return v.rstrip("/") or "/"

    @model_validator(mode="after")
    def _pinned_and_one_login(self):
        if not self.known_hosts and not self.host_key_fingerprints:
            raise ValueError("the server's host key must be pinned: set `known_hosts` (a known_hosts file) or "
                             "`host_key_fingerprints` (SHA256:... from `ssh-keygen -lf`)")
        for item in ("private_key", "passphrase", "password", "certificate"):
            if getattr(self, f"{item}_env") and getattr(self, f"{item}_block"):
                raise ValueError(_BOTH.format(env=f"{item}_env", block=f"{item}_block"))
        certificates = [n for n in ("certificate_env", "certificate_block", "certificate_file") if getattr(self, n)]
        if len(certificates) > 1:
            raise ValueError(f"set one of {', '.join(f'`{n}`' for n in certificates)}: one certificate per login")
        keys = [n for n in ("private_key_env", "private_key_block", "private_key_file") if getattr(self, n)]
        password = self.password_env or self.password_block
        if self.auth == "key":
            if len(keys) != 1:
                raise ValueError("set exactly one of `private_key_env`, `private_key_block` or `private_key_file` "
                                 "(or `auth: password` with `password_env` / `password_block`)")
            if password:
                raise ValueError("a password is used only with `auth: password`; remove it, or set `auth: password`")
        else:
            if not password:
                raise ValueError("`auth: password` needs `password_env` or `password_block`")
            if keys or self.passphrase_env or self.passphrase_block or certificates:
                raise ValueError("`auth: password` logs in by password only; remove the private key settings")
        return self


class SftpSourceConfig(_SftpEndpoint):
    """A directory tree on an SFTP server, read over SSH (see `_SftpEndpoint` for the login and the
    host key). A dataset's `container` is a directory below `root` (an absolute path on the
    server); its keys are the file paths below that directory."""

    kind: Literal["sftp"]




# ---------------------------------------------------------------------------------------------
# Destinations
# ---------------------------------------------------------------------------------------------


class S3Credentials(_Model):
    """Where the destination's keys are (never the keys).

    Either one prefect-aws `aws-credentials` block holding them all (`block`: its
    `aws_access_key_id`, `aws_secret_access_key` and, if set, `aws_session_token`), or each key on
    its own: an environment variable (`*_env`) or a Prefect Secret block (`*_block`). A key given
    neither way defaults to `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (no session token).
    """

    access_key_id_env: EnvVarName | None = None
    access_key_id_block: SecretBlockRef | None = None
    secret_access_key_env: EnvVarName | None = None
    secret_access_key_block: SecretBlockRef | None = None
    session_token_env: EnvVarName | None = None
    session_token_block: SecretBlockRef | None = None
    block: _block_ref(
        AWS_CREDENTIALS, hint=" (or give each key its own Secret block: `access_key_id_block`, `secret_access_key_block`)"
    ) | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_place_each(cls, data):
        if not isinstance(data, dict):
            return data
        if data.get("block") is not None:
            for item in ("access_key_id", "secret_access_key", "session_token"):
                for field in (f"{item}_env", f"{item}_block"):
                    if data.get(field) is not None:
                        raise ValueError(
                            f"`block` and `{field}` are both set; the `block` holds every key of this destination "
                            "(a credential comes from an environment variable or a Prefect block, not both)"
                        )
            return data
        data = _env_or_block(data, "access_key_id", "AWS_ACCESS_KEY_ID")
        data = _env_or_block(data, "secret_access_key", "AWS_SECRET_ACCESS_KEY")
        return _env_or_block(data, "session_token")

    def reference(self, item: str) -> tuple[str, dict[str, str]] | None:
        """Where key `item` (`access_key_id`, `secret_access_key`, `session_token`) comes from:
        (the config field naming it, `config.secrets.read_secret`'s `env=`/`block=`), or None."""
        if self.block:
            return "block", {"block": self.block}
        if getattr(self, f"{item}_block"):
            return f"{item}_block", {"block": getattr(self, f"{item}_block")}
        if getattr(self, f"{item}_env"):
            return f"{item}_env", {"env": getattr(self, f"{item}_env")}
        return None


class _S3Endpoint(_Model):
    """An S3 service endpoint URL (`endpoint_url`): scheme, host and optional port only."""

    endpoint_url: str

    @field_validator("endpoint_url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme in ("http", "https") and (parts.path not in ("", "/") or parts.query or parts.username):
            raise ValueError("expected the service endpoint only (scheme, host, optional port), no path, query or user")
        return _service_url(v, "expected a URL such as https://s3.gra.io.cloud.ovh.net")

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint_url).hostname or ""

    @property
    def scheme(self) -> str:
        return urlsplit(self.endpoint_url).scheme


class DestinationConfig(_S3Endpoint):
    """An S3-compatible bucket at a catalogued provider.

    `provider` names a file in the provider catalog; `endpoint_url` must be one of that provider's
    known hosts for `region` (checked by the sovereignty gate). `verify_tls: false` is accepted only
    in lab mode.
    """

    kind: Literal["s3"] = "s3"
    provider: str
    region: str
    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    credentials: S3Credentials = S3Credentials()
    storage_class: str | None = None
    addressing_style: Literal["path", "virtual"] | None = None  # default: the provider's
    verify_tls: bool = True
    max_connections: int = Field(32, ge=1, le=1024)
    # Changes to the provider profile's behaviour for this bucket (what `exitplan probe` measured):
    # `limits`, `multipart`, `request_rates`, `flexible_checksums`, `direct_requests`; merged key by key.
    provider_overrides: dict[str, Any] = {}


class S3SourceConfig(_S3Endpoint):
    """An S3-compatible endpoint read as a source (an S3 → SFTP escrow, a move between providers).

    A dataset's `container` is the bucket. Credentials as a destination's (`credentials`);
    `endpoint_url` is the service endpoint (https outside the lab; `verify_tls: false` only in
    the lab). `addressing_style` defaults to path (the form every S3-compatible server answers).
    """

    kind: Literal["s3"]
    region: str
    credentials: S3Credentials = S3Credentials()
    addressing_style: Literal["path", "virtual"] = "path"
    verify_tls: bool = True
    max_connections: int = Field(32, ge=1, le=1024)
    # Requests per second to this endpoint, shared by every thread and shard process of a run; None: not paced.
    request_rate: float | None = Field(None, gt=0)


class SftpDestinationConfig(_SftpEndpoint):
    """A directory tree on an SFTP server at a catalogued provider (an escrow, an on-premises or
    sovereign file store), written over SSH (see `_SftpEndpoint` for the login and the host key).

    `provider` names a file in the provider catalog and `region` one of its `sftp_regions`, whose
    hosts `host` must be one of (the sovereignty gate). Objects land below `root` under their
    destination keys; `<root>/.exitplan-sftp/` holds what SFTP cannot keep with a file (the
    metadata of each object, uploads in progress): connectors/sftp.py.
    """

    kind: Literal["sftp"]
    provider: str
    region: str

    @property
    def bucket(self) -> str:
        """Where the objects go, named where an S3 destination names its bucket: the root directory."""
        return self.root


def _source_kind(value) -> str:
    """A source without `kind` is an Azure Blob account (configs written before other sources)."""
    if isinstance(value, dict):
        return value.get("kind", "azure_blob")
    return getattr(value, "kind", "azure_blob")


SourceConfig = Annotated[
    Annotated[AzureBlobSourceConfig, Tag("azure_blob")] | Annotated[SftpSourceConfig, Tag("sftp")]
    | Annotated[S3SourceConfig, Tag("s3")],
    Discriminator(_source_kind),
]


def _destination_kind(value) -> str:
    """A destination without `kind` is an S3 bucket (configs written before SFTP destinations)."""
    if isinstance(value, dict):
        return value.get("kind", "s3")
    return getattr(value, "kind", "s3")


AnyDestinationConfig = Annotated[
    Annotated[DestinationConfig, Tag("s3")] | Annotated[SftpDestinationConfig, Tag("sftp")],
    Discriminator(_destination_kind),
]


# ---------------------------------------------------------------------------------------------
# Datasets, transfer, state, policy
# ---------------------------------------------------------------------------------------------


class InventoryReportConfig(_Model):
    """An Azure Blob Inventory report that stands for the dataset's listing (issue 16).

    `report`: where the report's manifest is, as ``<container>/<path>``: the folder Azure writes a
    rule's run into (``inventory/2026/11/30/01-00-00/exitplan``, whose manifest is
    ``exitplan-manifest.json``), or the manifest blob itself (``…/exitplan-manifest.json``).
    `source`: the Azure source (under `sources`) whose account holds the report; default: the
    dataset's own source.
    """

    report: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}/[^/].*[^/]$")
    source: str | None = None

    @property
    def container(self) -> str:
        return self.report.split("/", 1)[0]

    @property
    def manifest_path(self) -> str:
        """The manifest blob's name inside `container`."""
        path = self.report.split("/", 1)[1]
        if path.endswith("-manifest.json"):
            return path
        return f"{path}/{path.rsplit('/', 1)[-1]}-manifest.json"


class DatasetConfig(_Model):
    """One dataset: the objects of a source container under a prefix, filtered, going to one place.

    `include`/`exclude` are shell-style globs matched against the key below `prefix` (`*` also
    matches `/`). An object is taken when it matches some include (or includes are empty) and no
    exclude. `public: true` allows writing it unencrypted.
    """

    source: str
    container: str
    prefix: str = ""
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    destination: str
    dest_prefix: str = ""
    public: bool = False
    # Read the dataset's objects from an Azure Blob Inventory report instead of listing the container.
    inventory: InventoryReportConfig | None = None
    # The destination storage class by source tier (Hot, Cool, Cold, Archive), over the provider
    # catalog's `tier_classes` and the destination's `storage_class`; an S3 destination only.
    tier_classes: dict[str, str] = {}
    # Earlier states of blobs (Azure snapshots, earlier versions): `current` carries each blob's
    # current state and names the rest as not carried; `all` carries each as an object of its own
    # (`connectors.base.HISTORY_DIR`). A live listing only: a report's earlier states are counted.
    history: Literal["current", "all"] = "current"
    # How a flow run after the first knows what changed at the source: `listing` lists the whole
    # container again; `feed` starts from the last listing and lists again only the names the
    # storage account's change feed says changed since (an Azure source; engine/listing.py). The
    # CLI's `migrate` and the cutover always list in full.
    changes: Literal["listing", "feed"] = "listing"

    @model_validator(mode="after")
    def _history_listed_live(self):
        if self.history == "all" and self.inventory is not None:
            raise ValueError("`history: all` needs a live listing (it reads each snapshot and version as it is "
                             "listed); remove `inventory` or keep `history: current`")
        if self.changes == "feed" and self.inventory is not None:
            raise ValueError("`changes: feed` starts from the last live listing; a dataset read from an inventory "
                             "report is read from a newer report each run: remove `inventory` or `changes`")
        if self.changes == "feed" and self.history == "all":
            raise ValueError("`changes: feed` cannot keep each snapshot and earlier version in step (the feed names "
                             "a blob, not its earlier states): keep `history: current` or `changes: listing`")
        return self

    def selects(self, key: str) -> bool:
        rel = key[len(self.prefix):] if key.startswith(self.prefix) else key
        if self.include and not any(fnmatch.fnmatchcase(rel, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(rel, p) for p in self.exclude)


class TransferConfig(_Model):
    """How hard and with how much memory to push. See `engine.settings.TransferSettings`."""

    concurrency: int = Field(8, ge=1, le=256)
    object_concurrency: int | None = Field(None, ge=1, le=1024)
    part_size: Literal["auto"] | ByteSize = "auto"
    memory_budget: ByteSize = 128 * 1024**2
    small_object_cutoff: ByteSize = 16 * 1024**2
    max_source_restarts: int = Field(3, ge=0, le=100)
    part_attempts: int = Field(5, ge=1, le=50)
    # Bytes per second across the whole run (every thread and shard process together): one rate
    # (`20M`) or a timetable (`"08:00,50M 19:00,off"`, times in `bandwidth_timezone`); None or `off`:
    # no limit. `exitplan migrate --bwlimit` overrides it. config/bandwidth.py has the forms.
    bandwidth: str | None = None
    bandwidth_timezone: str = "Europe/Paris"

    @field_validator("bandwidth")
    @classmethod
    def _bandwidth(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_bandwidth(v)
            except ValueError as exc:
                raise ValueError(f"{exc}; write a rate or a timetable such as {BANDWIDTH_EXAMPLE}") from None
        return v

    @field_validator("bandwidth_timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not a time zone name; write one such as Europe/Paris or UTC") from None
        return v

    @property
    def bandwidth_timetable(self) -> BandwidthTimetable | None:
        return parse_bandwidth(self.bandwidth) if self.bandwidth is not None else None

    @model_validator(mode="after")
    def _sane(self):
        if self.memory_budget < 8 * 1024**2:
            raise ValueError("`memory_budget` must be at least 8MiB")
        if self.part_size != "auto" and (self.part_size < 1024**2 or self.part_size % 1024**2):
            raise ValueError("`part_size` must be `auto` or a whole number of MiB (parts are runs of 1 MiB segments)")
        return self


class OrchestrationConfig(_Model):
    """How the Prefect flows cut a run into shards and share providers between runs.

    Each dataset is listed into the state store in up to `listing_ranges` ranges at once (split by
    its folders; a killed listing goes on from each range's last page in the next run), and never
    fewer shards than it has ranges. A shard is a run of consecutive listed objects of one dataset
    (of one range), closed when it reaches
    `shard_bytes` or `shard_objects`; each shard is one Prefect task, copied as soon as the listing
    has made it final (copying overlaps the listing). A run keeps to about `max_shards` shards in all
    (Prefect's server loses events beyond about 10k task runs per flow run): as its total is not
    known while it lists, neighbouring shards of a range are merged more and more, twice as many
    each time the run has defined another `max_shards // 10` (`engine.shards.ShardDefiner`). `parallel_shards` shard tasks of a run go at once in
    one worker process; they share its memory budget and transfer threads. With `shard_processes`
    N > 0, shard tasks run instead in N processes of the worker host, one shard at a time each,
    each with its own memory budget and transfer threads (N x the memory formula; the run's
    connections are split between them): for many small objects, whose cost is CPU in the SDKs,
    this is how a run uses more than one core. With `shard_workers` N > 0, each shard is instead a
    flow run of the `exitplan-shards/shards` deployment, at most N at once, taken by any worker of
    the pool (several hosts): the state must then be a shared database (`state.url_env`). A shard with failed
    objects is retried `shard_retries` times (after `shard_retry_delay` seconds) when a failure is
    transient. `provider_connections` caps the connections to a provider over every run at once
    (a Prefect global concurrency limit per provider; a provider not listed gets
    `default_provider_connections`).
    """

    listing_ranges: int = Field(4, ge=1, le=64)
    shard_bytes: ByteSize = 4 * 1024**3
    shard_objects: int = Field(5000, ge=1, le=1_000_000)
    max_shards: int = Field(500, ge=1, le=5000)
    parallel_shards: int = Field(2, ge=1, le=16)
    shard_processes: int = Field(0, ge=0, le=16)
    shard_workers: int = Field(0, ge=0, le=256)
    shard_retries: int = Field(2, ge=0, le=20)
    shard_retry_delay: float = Field(30.0, ge=0, le=3600)
    provider_connections: dict[str, Annotated[int, Field(ge=2, le=4096)]] = {}
    default_provider_connections: int = Field(64, ge=2, le=4096)

    @field_validator("shard_bytes")
    @classmethod
    def _shard_bytes(cls, v: int) -> int:
        if v < 1024**2:
            raise ValueError("`shard_bytes` must be at least 1MiB")
        return v


class StateConfig(_Model):
    """Where the state lives. `path`: a directory (relative to the config file's directory) for the
    key files, the audit manifest and, by default, the state database (SQLite, `state.db`).
    `url_env`: the name of an environment variable holding the SQLAlchemy URL of a PostgreSQL
    database to keep the state in instead (`postgresql+psycopg://user:password@host:5432/db`): a
    database that outlives any worker host, shared by every process of a run."""

    path: str = ".exitplan"
    url_env: EnvVarName | None = None


class PolicyConfig(_Model):
    """The sovereignty policy: destinations must be catalogued providers under these jurisdictions."""

    allowed_jurisdictions: tuple[str, ...] = Field(("EU",), min_length=1)


# ---------------------------------------------------------------------------------------------
# Keys: the key-encryption key (KEK) that wraps the project's keyset
# ---------------------------------------------------------------------------------------------


class LocalKekConfig(_Model):
    """A 32-byte key file on this machine (AES-256-GCM). For the lab and tests only.

    Refused outside lab mode (`config.policy.check_kek`): production keys live in a KMS or HSM.
    `path` (default `<state dir>/kek.key`; relative paths from the config file's directory) is
    created with mode 0600 by `exitplan keys init` when it does not exist.
    """

    backend: Literal["local"]
    path: str | None = None


class OpenBaoKekConfig(_Model):
    """A transit key in OpenBao or HashiCorp Vault (`<mount>/keys/<key_name>`), used through
    `tink.integration.hcvault`.

    The token is read when the key is used, from the environment variable `token_env` (default
    `VAULT_TOKEN`) or the Prefect Secret block `token_block`; it is never stored. `https://` is required outside the lab. `namespace` is Vault Enterprise/OpenBao
    namespaces (sent as X-Vault-Namespace). `ca_cert` is a PEM bundle to verify the server with
    (default: the system store).
    """

    backend: Literal["openbao"]
    address: str
    mount: str = Field("transit", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
    key_name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    token_env: EnvVarName | None = None
    token_block: SecretBlockRef | None = None
    namespace: str | None = None
    ca_cert: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _token(cls, data):
        return _env_or_block(data, "token", "VAULT_TOKEN")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return _service_url(v, "expected the server's URL, such as https://bao.example.eu:8200")


class Pkcs11KekConfig(_Model):
    """An AES key in an HSM reached through PKCS#11 (wrap with CKM_AES_GCM, 12-byte random IV).

    The token is found by its label, the key by its label inside it; the user PIN is read from the
    environment variable `pin_env` (default `PKCS11_PIN`) or the Prefect Secret block `pin_block`. `module` is the vendor's PKCS#11 library (default: SoftHSM2's
    Debian path).
    """

    backend: Literal["pkcs11"]
    module: str = "/usr/lib/softhsm/libsofthsm2.so"
    token_label: str = Field(min_length=1, max_length=32)
    key_label: str = Field(min_length=1)
    pin_env: EnvVarName | None = None
    pin_block: SecretBlockRef | None = None

    @model_validator(mode="before")
    @classmethod
    def _pin(cls, data):
        return _env_or_block(data, "pin", "PKCS11_PIN")


class OvhKmsKekConfig(_Model):
    """A symmetric service key in OVHcloud KMS (OKMS), used through its REST API
    (`POST {endpoint}/api/{okms_id}/v1/servicekey/{key_id}/encrypt|decrypt`).

    Authentication is the OKMS access certificate (mutual TLS): the *paths* of its PEM
    certificate and private key are read from the environment variables `cert_file_env` and
    `key_file_env`. `endpoint` is the KMS's regional URL, e.g. https://eu-west-rbx.okms.ovh.net.
    Not exercised against the real service by the test suite (see docs/KEYS.md).
    """

    backend: Literal["ovhcloud-kms"]
    endpoint: str
    okms_id: str = Field(pattern=r"^[0-9a-fA-F-]{36}$")
    key_id: str = Field(pattern=r"^[0-9a-fA-F-]{36}$")
    cert_file_env: EnvVarName = "OKMS_CERT_FILE"
    key_file_env: EnvVarName = "OKMS_KEY_FILE"
    ca_cert: str | None = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        return _service_url(v, "expected the KMS's regional URL, such as https://eu-west-rbx.okms.ovh.net")


class ScalewayKmsKekConfig(_Model):
    """A symmetric key (aes_256_gcm) in Scaleway Key Manager, used through its REST API
    (`POST {api_url}/key-manager/v1alpha1/regions/{region}/keys/{key_id}/encrypt|decrypt`).

    The API secret key is read from the environment variable `secret_key_env` (default
    `SCW_SECRET_KEY`) or the Prefect Secret block `secret_key_block` (sent as X-Auth-Token). `api_url` is for tests only; leave the default.
    Not exercised against the real service by the test suite (see docs/KEYS.md).
    """

    backend: Literal["scaleway-kms"]
    region: Literal["fr-par", "nl-ams", "pl-waw"] = "fr-par"
    key_id: str = Field(pattern=r"^[0-9a-fA-F-]{36}$")
    secret_key_env: EnvVarName | None = None
    secret_key_block: SecretBlockRef | None = None
    api_url: str = "https://api.scaleway.com"

    @model_validator(mode="before")
    @classmethod
    def _secret_key(cls, data):
        return _env_or_block(data, "secret_key", "SCW_SECRET_KEY")

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, v: str) -> str:
        return _service_url(v, "expected a URL such as https://api.scaleway.com")


KekConfig = Annotated[
    LocalKekConfig | OpenBaoKekConfig | Pkcs11KekConfig | OvhKmsKekConfig | ScalewayKmsKekConfig,
    Field(discriminator="backend"),
]


class KeysConfig(_Model):
    """The project's keys: the KEK that wraps the keyset, and where the wrapped keyset lives.

    `keyset_path` (default `<state dir>/keyset.json`, relative paths from the config file's
    directory) holds Tink's standard encrypted keyset JSON; beside it, `keyset.meta.json` (no
    secret: key ids, creation times, the KEK reference it was wrapped with) and `audit-key.json`
    (the Ed25519 audit-signing key, wrapped by the same KEK).
    """

    kek: KekConfig
    keyset_path: str | None = None


class AlertsConfig(_Model):
    """Prefect automations `exitplan deploy` creates (or updates, or removes when switched off) on
    the server, each sending to the Prefect notification block `notify` names
    (`<block-type-slug>/<block-name>`, e.g. `slack-webhook/ops-oncall`, `custom-webhook/pager`:
    whatever Prefect offers; the block holds the webhook URL or address, never this file).

    `on_failure`: a run of the project's deployments ends Failed or Crashed. `late_after_minutes`:
    a scheduled run has not started that long after Prefect marked it late (no worker, a full pool).
    `running_longer_than_hours`: a run still running after that long. `on_discrepancies`: verify
    found copies that differ from what was recorded (an `exitplan.verify.discrepancies` event).
    """

    notify: str = Field(pattern=r"^[a-z0-9-]+/[A-Za-z0-9_.-]+$")
    on_failure: bool = True
    # Prefect checks a "did not happen within" trigger over at least 10 seconds: the minimums.
    late_after_minutes: float | None = Field(30, ge=0.2, le=7 * 24 * 60)
    running_longer_than_hours: float | None = Field(None, ge=0.003, le=24 * 30)
    on_discrepancies: bool = True


class EstimatePricesConfig(_Model):
    """Figures replacing the price catalog's (`config.price_catalog`), one by one; each is then
    shown as the configuration's. `azure`: the chosen Azure region's; `destinations`: by destination
    name, its provider's."""

    azure: AzurePriceOverrides = AzurePriceOverrides()
    destinations: dict[str, DestinationPriceOverrides] = {}


class EstimateConfig(_Model):
    """What the dry run's estimate (`engine.estimate`) assumes where nothing measured says better."""

    # The storage account's Azure region, for its prices (`config/prices/azure.yaml`).
    azure_region: str = "westeurope"
    # MB/s (10^6 bytes) written, used when no migrate run of this project has been measured yet.
    throughput_mb_s: float | None = Field(None, gt=0, le=1_000_000)
    # The rehydration priority the Archive-tier objects would be rehydrated with.
    rehydrate_priority: Literal["standard", "high"] = "standard"
    # The catalog's currency; the only one the estimate computes in.
    currency: Literal["EUR"] = "EUR"
    prices: EstimatePricesConfig = EstimatePricesConfig()


class ExitplanConfig(_Model):
    version: Literal[1] = 1
    project: str = Field(pattern=_NAME)
    sources: dict[str, SourceConfig] = Field(min_length=1)
    destinations: dict[str, AnyDestinationConfig] = Field(min_length=1)
    datasets: dict[str, DatasetConfig] = Field(min_length=1)
    transfer: TransferConfig = TransferConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    state: StateConfig = StateConfig()
    policy: PolicyConfig = PolicyConfig()
    keys: KeysConfig | None = None  # required by `exitplan keys …` and by encrypted writes
    alerts: AlertsConfig | None = None  # Prefect automations made by `exitplan deploy`
    estimate: EstimateConfig = EstimateConfig()  # the dry run's duration and cost estimate

    def reference_problems(self) -> list[tuple[str, str]]:
        """(field, problem) for names that break the naming rule or point at nothing."""
        problems = []
        for section in ("sources", "destinations", "datasets"):
            for name in getattr(self, section):
                if not re.match(_NAME, name):
                    problems.append((f"{section}.{name}", f"the name {name!r} must be lower-case letters, digits, '-' or '_'"))
        orch = self.orchestration
        if orch.shard_workers and orch.shard_processes:
            problems.append(("orchestration.shard_workers", "shard_workers and shard_processes cannot both be set; "
                             "choose one way of spreading shards"))
        if orch.shard_workers and not self.state.url_env:
            problems.append(("orchestration.shard_workers", "shards on several workers need a state database they "
                             "all reach: set `state.url_env` (PostgreSQL)"))
        for name, ds in self.datasets.items():
            if ds.source not in self.sources:
                problems.append((f"datasets.{name}.source", f"source {ds.source!r} is not defined under `sources` ({', '.join(self.sources)})"))
            if ds.destination not in self.destinations:
                problems.append((f"datasets.{name}.destination",
                                 f"destination {ds.destination!r} is not defined under `destinations` ({', '.join(self.destinations)})"))
            if ds.inventory is not None:
                problems.extend(self._inventory_problems(name, ds))
            src = self.sources.get(ds.source)
            if ds.changes == "feed" and src is not None and src.kind != "azure_blob":
                problems.append((f"datasets.{name}.changes", f"a change feed is an Azure storage account's, but source "
                                 f"`{ds.source}` is {src.kind}; set `changes: listing`"))
        problems.extend(self._shared_key_spaces())
        problems.extend(self._estimate_problems())
        return problems

    def _estimate_problems(self) -> list[tuple[str, str]]:
        """An Azure region the price catalog does not hold, prices set for a destination that does
        not exist."""
        problems = []
        regions = load_azure_prices().regions
        region = self.estimate.azure_region
        if region not in regions:
            problems.append(("estimate.azure_region",
                             f"the price catalog has no Azure region {region!r} ({', '.join(regions)}); "
                             "name the nearest and set the figures that differ under `estimate.prices.azure`"))
        else:
            try:
                with_overrides(regions[region], self.estimate.prices.azure, "estimate.prices.azure")
            except PriceError as exc:
                problems.append((exc.field, exc.problem))
        # The catalog is read only for prices set here (the gate reads it anyway, after these checks).
        profiles = load_catalog() if self.estimate.prices.destinations else {}
        for name, overrides in self.estimate.prices.destinations.items():
            dest = self.destinations.get(name)
            if dest is None:
                problems.append((f"estimate.prices.destinations.{name}",
                                 f"destination {name!r} is not defined under `destinations` ({', '.join(self.destinations)})"))
                continue
            profile = profiles.get(dest.provider)
            try:
                destination_prices(profile.prices if profile else None, overrides, f"estimate.prices.destinations.{name}")
            except PriceError as exc:
                problems.append((exc.field, exc.problem))
        return problems

    def _inventory_problems(self, name: str, ds: DatasetConfig) -> list[tuple[str, str]]:
        """An inventory report is Azure's: the dataset must read an Azure source, and the report
        live in one."""
        problems = []
        field = f"datasets.{name}.inventory"
        src = self.sources.get(ds.source)
        if src is not None and src.kind != "azure_blob":
            problems.append((field, f"an inventory report lists an Azure Blob container, but source `{ds.source}` is "
                                    f"{src.kind}; remove `inventory` (the source is then listed) or read an Azure source"))
        where = ds.inventory.source or ds.source
        report_src = self.sources.get(where)
        if ds.inventory.source is not None and report_src is None:
            problems.append((f"{field}.source", f"source {where!r} is not defined under `sources` ({', '.join(self.sources)})"))
        elif report_src is not None and report_src.kind != "azure_blob":
            problems.append((f"{field}.source", f"the report must be read from an Azure Blob source, and `{where}` is "
                                                f"{report_src.kind}; name the Azure source whose account holds the report"))
        return problems

    def _shared_key_spaces(self) -> list[tuple[str, str]]:
        """Two datasets writing to one destination where one's `dest_prefix` starts the other's:
        a key of one could land on a key of the other (prefix `a/` with key `b/f` and prefix `a/b/`
        with key `f`), and the later copy would replace the earlier without a word."""
        problems = []
        names = sorted(self.datasets)
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                a, b = self.datasets[first], self.datasets[second]
                if a.destination != b.destination:
                    continue
                if a.dest_prefix.startswith(b.dest_prefix) or b.dest_prefix.startswith(a.dest_prefix):
                    how = ("the same dest_prefix" if a.dest_prefix == b.dest_prefix else
                           f"dest_prefix {a.dest_prefix!r} and {b.dest_prefix!r}, one the start of the other")
                    problems.append((
                        f"datasets.{second}.dest_prefix",
                        f"datasets `{first}` and `{second}` write to destination `{a.destination}` with {how}: an "
                        "object of one could overwrite an object of the other; give each its own dest_prefix, none "
                        f"the start of another (e.g. `{first}/` and `{second}/`)"))
        return problems


class LoadedConfig(BaseModel):
    """A validated config together with where it came from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    path: Path
    config: ExitplanConfig
    lab_mode: bool
    not_lab_reason: str | None = None  # why lab mode is off: the first endpoint off loopback

    @property
    def state_dir(self) -> Path:
        p = Path(self.config.state.path)
        return p if p.is_absolute() else (self.path.parent / p)

    @property
    def keyset_path(self) -> Path:
        """Where the wrapped keyset lives: `keys.keyset_path`, else `<state dir>/keyset.json`."""
        custom = self.config.keys.keyset_path if self.config.keys else None
        if not custom:
            return self.state_dir / "keyset.json"
        p = Path(custom)
        return p if p.is_absolute() else (self.path.parent / p)

    def chosen_datasets(self, names: list[str]) -> list[str]:
        """The datasets named (on the command line, or in a flow's parameters), every dataset of
        the file when none is; an unknown name is a `ConfigFileError` listing the known ones."""
        known = list(self.config.datasets)
        for name in names:
            if name not in known:
                raise ConfigFileError(f"{self.path}: no dataset named {name!r} (datasets: {', '.join(known)}); "
                                      "check --dataset")
        return list(names) or known
