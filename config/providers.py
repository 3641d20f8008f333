"""The provider catalog: one YAML file per S3-compatible provider in `config/providers/`.

Provider quirks are data (STYLE.md #3): legal seat and jurisdiction, certifications, known endpoint
hosts per region, part limits, addressing style, storage classes, SSE-C support, list prices.
Adding a provider means adding a file; no code changes. Extra catalogs can be layered on top with
`EXITPLAN_PROVIDERS_DIR` (a directory of the same YAML files; a file there replaces a shipped one
of the same name).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigFileError
from .sizes import ByteSize
from .yaml_files import load_yaml_file

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


class Prices(_Strict):
    """Indicative list prices in EUR excluding VAT; estimates only."""

    storage_eur_per_tb_month: float = Field(ge=0)
    egress_eur_per_gb: float = Field(ge=0)


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
    storage_classes: tuple[str, ...] = ("STANDARD",)
    sse_c: bool = False
    prices: Prices | None = None

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


def _load_file(path: Path) -> ProviderProfile:
    try:
        profile = ProviderProfile.model_validate(load_yaml_file(path, "a provider profile"))
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: the provider profile disappeared while the catalog was read; run again") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigFileError(f"{path}: field `{where}`: {err['msg']}") from None
    if profile.name != path.stem:
        raise ConfigFileError(f"{path}: `name` is {profile.name!r} but the file is named {path.stem!r}; make them equal")
    return profile


@lru_cache(maxsize=4)
def _load_catalog(extra_dir: str | None) -> dict[str, ProviderProfile]:
    catalog: dict[str, ProviderProfile] = {}
    dirs = [CATALOG_DIR] + ([Path(extra_dir)] if extra_dir else [])
    for directory in dirs:
        for path in sorted(directory.glob("*.yaml")):
            catalog[path.stem] = _load_file(path)
    return catalog


def load_catalog() -> dict[str, ProviderProfile]:
    """Every provider profile, by name (shipped catalog plus `EXITPLAN_PROVIDERS_DIR`)."""
    return _load_catalog(os.environ.get("EXITPLAN_PROVIDERS_DIR") or None)
