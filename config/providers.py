"""The provider catalog: one YAML file per S3-compatible provider in `config/providers/`.

Provider quirks are data (STYLE.md #3): legal seat and jurisdiction, certifications, known endpoint
hosts per region, part limits, addressing style, storage classes, SSE-C support, list prices.
Adding a provider means adding a file; no code changes. Extra profiles can be layered on top with
`EXITPLAN_PROVIDERS_DIR` (a directory of the same YAML files): they add providers, never replace a
shipped one (refused, exit code 3), and each is named with its SHA-256 wherever its provider is shown
(`CatalogFile`). Whatever a profile says, a host of a cloud outside the EU is refused by the gate
(`config.hosts.NON_EU_CLOUDS`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigFileError, PolicyRefusal
from .price_catalog import DestinationPrices
from .sizes import ByteSize
from .yaml_files import MAX_FILE_BYTES, parse_yaml

CATALOG_DIR = Path(__file__).resolve().parent / "providers"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Region(_Strict):
    location: str
    hosts: tuple[str, ...] = Field(min_length=1)


class PartLimits(_Strict):
    """Multipart limits of the provider, in bytes (sizes accept 5MiB-style strings)."""

    min_part_size: ByteSize = 5 * 1024**2
    max_part_size: ByteSize = 5 * 1024**3
    max_parts: int = Field(10_000, ge=1)
    max_object_size: ByteSize = 5 * 1024**4
    max_single_put_size: ByteSize = 5 * 1024**3
    # User metadata, names and values, as S3 counts it (2 KB at AWS and most providers).
    max_metadata_bytes: ByteSize = 2048
    # Tags per object (S3's own limit is 10).
    max_tags: int = Field(10, ge=0)
    # The longest a single request may take before the provider cuts it, in seconds (None: not
    # published); a part must be sized so it is sent within it at the measured throughput.
    max_request_seconds: float | None = Field(None, gt=0)


class MultipartBehaviour(_Strict):
    """How the provider's multipart API answers (measured by `exitplan probe`).

    `etag`: `md5` when CompleteMultipartUpload's ETag is the MD5 of the parts' MD5s with `-N` (the
    AWS form, checked after every completion); `opaque` when the provider computes it otherwise
    (several do with server-side encryption): integrity then rests on each part's Content-MD5 being
    accepted, the sizes and the deep read-back. `list_parts`, `abort`, `list_uploads`: whether
    ListParts, AbortMultipartUpload and ListMultipartUploads are answered.
    """

    etag: Literal["md5", "opaque"] = "md5"
    list_parts: bool = True
    abort: bool = True
    list_uploads: bool = True


class RequestRates(_Strict):
    """The provider's published request-rate limits per bucket, in requests per second (None: not
    published). Soft limits: above them a provider answers SlowDown / 503."""

    put: float | None = Field(None, gt=0)
    get: float | None = Field(None, gt=0)
    total: float | None = Field(None, gt=0)


# What a destination's `provider_overrides` may change in its provider's profile: how the service
# behaves, never who runs it or where (legal seat, jurisdiction, hosts are the gate's facts).
OVERRIDABLE = ("limits", "multipart", "request_rates", "flexible_checksums", "direct_requests")


class ProviderProfile(_Strict):
    name: str
    display_name: str
    legal_entity: str
    legal_seat: str
    country: str
    jurisdiction: str
    lab_only: bool = False
    certifications: tuple[str, ...] = ()
    addressing_style: Literal["path", "virtual"] = "virtual"
    regions: dict[str, Region] = Field(min_length=1)
    # The provider's key-management service, by region: where a KEK it holds lives (the gate
    # refuses a KMS endpoint that is not one of these hosts).
    kms_regions: dict[str, Region] = {}
    # The provider's SFTP service, by region: the hosts an SFTP destination at this provider may
    # name. A host written `*.example.eu` stands for any one label below example.eu (per-account
    # hosts such as u12345.your-storagebox.de).
    sftp_regions: dict[str, Region] = {}
    limits: PartLimits = PartLimits()
    multipart: MultipartBehaviour = MultipartBehaviour()
    request_rates: RequestRates = RequestRates()
    # Whether the service accepts the `x-amz-checksum-*` headers boto3 sends by default since 1.36;
    # false: exitplan sends Content-MD5 only (every provider accepts it).
    flexible_checksums: bool = False
    # Whether a PutObject or a ranged GetObject of at most 1 MiB may go as one request signed and
    # sent on botocore's own signer and HTTP session without the rest of botocore's per-request
    # machinery (connectors/s3.py `_direct_put`); false: every request through the boto3 client.
    direct_requests: bool = True
    storage_classes: tuple[str, ...] = ("STANDARD",)
    # The storage class an object lands in, by its tier at the source (Azure's Hot, Cool, Cold,
    # Archive; an S3 source's classes), matched without regard to case; a tier not named lands in
    # the bucket's default class. Only classes read back at once: a class that needs a restore
    # before a GET (GLACIER) would leave deep verify and restore unable to read the object.
    tier_classes: dict[str, str] = {}
    sse_c: bool = False
    # Unit list prices for the estimate (`config.price_catalog.DestinationPrices`), each figure with
    # its page or marked as filed, unconfirmed.
    prices: DestinationPrices | None = None
    # Where the facts above come from: the provider's documentation pages, by topic.
    sources: dict[str, str] = {}

    @model_validator(mode="after")
    def _tier_classes_known(self) -> "ProviderProfile":
        for tier, cls in self.tier_classes.items():
            if cls not in self.storage_classes:
                raise ValueError(f"tier_classes.{tier}: {cls!r} is not one of storage_classes "
                                 f"({', '.join(self.storage_classes)})")
        return self

    def with_overrides(self, overrides: dict, where: str) -> "ProviderProfile":
        """This profile with a destination's `provider_overrides` applied (nested sections merged
        key by key); `ValueError` naming the field (`where`.…) when one is not overridable or invalid."""
        if not overrides:
            return self
        for key in overrides:
            if key not in OVERRIDABLE:
                raise ValueError(f"field `{where}.{key}` cannot be overridden (only {', '.join(OVERRIDABLE)}: "
                                 "the provider's legal facts and hosts come from the catalog)")
        merged = self.model_dump()
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        try:
            return ProviderProfile.model_validate(merged)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"field `{where}.{loc}`: {err['msg']}") from None

    def known_hosts(self, region: str) -> tuple[str, ...]:
        r = self.regions.get(region)
        return r.hosts if r else ()

    def host_matches(self, host: str, region: str, bucket: str | None = None) -> bool:
        """True when `host` is a known endpoint of `region` (or its virtual-hosted bucket form)."""
        host = host.lower().rstrip(".")
        for known in self.known_hosts(region):
            if host == known or (bucket and host == f"{bucket.lower()}.{known}"):
                return True
        return False

    def sftp_host_matches(self, host: str, region: str) -> bool:
        """True when `host` is one of the SFTP hosts of `region` (`*.` entries: one label below)."""
        host = host.lower().rstrip(".")
        r = self.sftp_regions.get(region)
        for known in r.hosts if r else ():
            if known.startswith("*."):
                label, _, rest = host.partition(".")
                if label and rest == known[2:]:
                    return True
            elif host == known:
                return True
        return False


def _load_file(path: Path) -> tuple[ProviderProfile, str]:
    """The profile in `path`, read with the configuration's YAML rules (`config.yaml_files`), and
    the SHA-256 (hex) of the bytes it was read from."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: the provider profile disappeared while the catalog was read; run again") from None
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read the provider profile ({exc.strerror or exc}); check its "
                              "permissions") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigFileError(f"{path}: the provider profile is over {MAX_FILE_BYTES:,} bytes; a profile is a few "
                              "hundred lines at most")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"{path}: the provider profile is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        profile = ProviderProfile.model_validate(parse_yaml(text, path, "a provider profile"))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigFileError(f"{path}: field `{where}`: {err['msg']}") from None
    if profile.name != path.stem:
        raise ConfigFileError(f"{path}: `name` is {profile.name!r} but the file is named {path.stem!r}; make them equal")
    return profile, hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class CatalogFile:
    """A provider profile read from `EXITPLAN_PROVIDERS_DIR`, not shipped with exitplan.

    Its facts (jurisdiction, hosts) are the operator's word, not exitplan's: wherever its provider
    appears (the gate's verdict, the run summary, the audit manifest's `run_start`, the report) the
    file is named with its SHA-256, so a reader can tell which facts were checked against what.
    """

    provider: str
    path: str
    sha256: str

    def sentence(self) -> str:
        return (f"provider profile `{self.provider}` read from {self.path} (SHA-256 {self.sha256}), "
                "not from exitplan's own catalog")

    def as_record(self) -> dict[str, str]:
        return {"provider": self.provider, "file": self.path, "sha256": self.sha256}


@dataclass(frozen=True)
class Catalog:
    profiles: dict[str, ProviderProfile]
    added: dict[str, CatalogFile]  # by provider name: the profiles from EXITPLAN_PROVIDERS_DIR


@lru_cache(maxsize=4)
def _load_catalog(extra_dir: str | None) -> Catalog:
    """The shipped profiles, then those of `extra_dir`, which may add providers but never replace
    one: a replaced profile would change what the gate checks a destination against (its
    jurisdiction, its hosts) while the configuration still names the same provider."""
    catalog = {path.stem: _load_file(path)[0] for path in sorted(CATALOG_DIR.glob("*.yaml"))}
    added: dict[str, CatalogFile] = {}
    if extra_dir:
        for path in sorted(Path(extra_dir).glob("*.yaml")):
            if path.stem in catalog:
                raise PolicyRefusal(
                    f"{path} (in EXITPLAN_PROVIDERS_DIR) would replace exitplan's own provider profile "
                    f"`{path.stem}`, which is refused: a profile from outside may add a provider, never change one; "
                    f"give it another name (e.g. `{path.stem}-custom`, in `name` and the file name) and name that in "
                    "the destinations' `provider`"
                )
            profile, sha256 = _load_file(path)
            catalog[path.stem] = profile
            added[path.stem] = CatalogFile(path.stem, str(path.resolve()), sha256)
    return Catalog(catalog, added)


def _catalog() -> Catalog:
    return _load_catalog(os.environ.get("EXITPLAN_PROVIDERS_DIR") or None)


def load_catalog() -> dict[str, ProviderProfile]:
    """Every provider profile, by name (shipped catalog plus `EXITPLAN_PROVIDERS_DIR`)."""
    return _catalog().profiles


def added_profiles() -> tuple[CatalogFile, ...]:
    """The profiles read from `EXITPLAN_PROVIDERS_DIR` (none without it), by provider name."""
    added = _catalog().added
    return tuple(added[name] for name in sorted(added))


def added_profile(provider: str) -> CatalogFile | None:
    """Where `provider`'s profile came from when it is not shipped with exitplan, else None."""
    return _catalog().added.get(provider)
