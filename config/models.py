"""The configuration file, as pydantic models. See the README's "Configuration reference".

Secrets never live in the YAML: every credential is the *name* of an environment variable
(`*_env` fields), read when a connector is built, never stored, logged or passed as a parameter.
Plain, non-secret strings may use `${VAR}` or `${VAR:-default}` (expanded by the loader).
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .sizes import ByteSize

_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
EnvVarName = Annotated[str, Field(pattern=_ENV_NAME.pattern)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


class AzureBlobSourceConfig(_Model):
    """An Azure Storage account read with one of three credentials.

    Exactly one of: `connection_string_env` (a connection string, e.g. the lab's), `sas_token_env`
    with `account_url` (a SAS token, service or account), or `credential: default` with
    `account_url` (azure-identity's DefaultAzureCredential: managed identity, workload identity,
    az login…).
    """

    kind: Literal["azure_blob"] = "azure_blob"
    account_url: str | None = None
    connection_string_env: EnvVarName | None = None
    sas_token_env: EnvVarName | None = None
    credential: Literal["default"] | None = None
    # `azurite`: when `connection_string_env` is unset, read the emulator's published development
    # account on 127.0.0.1 (port EXITPLAN_LAB_AZURITE_PORT, default 10000). For the lab only.
    emulator: Literal["azurite"] | None = None
    max_connections: int = Field(32, ge=1, le=1024)

    @model_validator(mode="after")
    def _one_credential(self):
        chosen = [n for n in ("connection_string_env", "sas_token_env", "credential") if getattr(self, n)]
        if len(chosen) != 1:
            raise ValueError(
                "set exactly one of `connection_string_env`, `sas_token_env` (with `account_url`) "
                "or `credential: default` (with `account_url`)"
            )
        if self.emulator and chosen[0] != "connection_string_env":
            raise ValueError("`emulator: azurite` goes with `connection_string_env`")
        if chosen[0] != "connection_string_env" and not self.account_url:
            raise ValueError(f"`{chosen[0]}` needs `account_url` (https://ACCOUNT.blob.core.windows.net)")
        return self


# ---------------------------------------------------------------------------------------------
# Destinations
# ---------------------------------------------------------------------------------------------


class S3Credentials(_Model):
    """Names of the environment variables holding the destination's keys (never the keys)."""

    access_key_id_env: EnvVarName = "AWS_ACCESS_KEY_ID"
    secret_access_key_env: EnvVarName = "AWS_SECRET_ACCESS_KEY"
    session_token_env: EnvVarName | None = None


class DestinationConfig(_Model):
    """An S3-compatible bucket at a catalogued provider.

    `provider` names a file in the provider catalog; `endpoint_url` must be one of that provider's
    known hosts for `region` (checked by the sovereignty gate). `verify_tls: false` is accepted only
    in lab mode.
    """

    provider: str
    endpoint_url: str
    region: str
    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    credentials: S3Credentials = S3Credentials()
    storage_class: str | None = None
    addressing_style: Literal["path", "virtual"] | None = None  # default: the provider's
    verify_tls: bool = True
    max_connections: int = Field(32, ge=1, le=1024)

    @field_validator("endpoint_url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected a URL such as https://s3.gra.io.cloud.ovh.net")
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise ValueError("expected the service endpoint only (scheme, host, optional port), no path, query or user")
        return v.rstrip("/")

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint_url).hostname or ""

    @property
    def scheme(self) -> str:
        return urlsplit(self.endpoint_url).scheme


# ---------------------------------------------------------------------------------------------
# Datasets, transfer, state, policy
# ---------------------------------------------------------------------------------------------


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
    memory_budget: ByteSize = 256 * 1024**2
    small_object_cutoff: ByteSize = 16 * 1024**2
    max_source_restarts: int = Field(3, ge=0, le=100)
    part_attempts: int = Field(5, ge=1, le=50)

    @model_validator(mode="after")
    def _sane(self):
        if self.memory_budget < 8 * 1024**2:
            raise ValueError("`memory_budget` must be at least 8MiB")
        if self.part_size != "auto" and (self.part_size < 1024**2 or self.part_size % 1024**2):
            raise ValueError("`part_size` must be `auto` or a whole number of MiB (parts are runs of 1 MiB segments)")
        return self


class StateConfig(_Model):
    """Where the state store lives: a directory (relative to the config file's directory)."""

    path: str = ".exitplan"


class PolicyConfig(_Model):
    """The sovereignty policy: destinations must be catalogued providers under these jurisdictions."""

    allowed_jurisdictions: tuple[str, ...] = Field(("EU",), min_length=1)


class ExitplanConfig(_Model):
    version: Literal[1] = 1
    project: str = Field(pattern=_NAME)
    sources: dict[str, AzureBlobSourceConfig] = Field(min_length=1)
    destinations: dict[str, DestinationConfig] = Field(min_length=1)
    datasets: dict[str, DatasetConfig] = Field(min_length=1)
    transfer: TransferConfig = TransferConfig()
    state: StateConfig = StateConfig()
    policy: PolicyConfig = PolicyConfig()

    def reference_problems(self) -> list[tuple[str, str]]:
        """(field, problem) for names that break the naming rule or point at nothing."""
        problems = []
        for section in ("sources", "destinations", "datasets"):
            for name in getattr(self, section):
                if not re.match(_NAME, name):
                    problems.append((f"{section}.{name}", f"the name {name!r} must be lower-case letters, digits, '-' or '_'"))
        for name, ds in self.datasets.items():
            if ds.source not in self.sources:
                problems.append((f"datasets.{name}.source", f"source {ds.source!r} is not defined under `sources` ({', '.join(self.sources)})"))
            if ds.destination not in self.destinations:
                problems.append((f"datasets.{name}.destination",
                                 f"destination {ds.destination!r} is not defined under `destinations` ({', '.join(self.destinations)})"))
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
