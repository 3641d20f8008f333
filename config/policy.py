"""The sovereignty gate (ARCHITECTURE §10), run when the config loads, before any byte moves.

Refused, each with a sentence saying which destination and why (exit code 3):
- a provider that is not in the catalog, or whose jurisdiction is not allowed (default: EU);
- the lab's S3 server outside lab mode;
- a region the provider does not have, or an endpoint host that is not a known host of that
  provider and region (for an SFTP destination: one of the provider's `sftp_regions` hosts);
- an endpoint host of a cloud outside the EU (`config.hosts.NON_EU_CLOUDS`), whatever the provider
  catalog says of it (destinations and KMS endpoints; checked after the catalog's own checks so
  their sentences stay the most precise), and, outside lab mode, a public IP address as a
  destination or KMS host (it names no operator); a PKCS#11 module that is a non-EU cloud HSM's
  client library;
- plain HTTP, or TLS verification switched off, outside lab mode (sources included);
- (`check_kek`) a `local` key-encryption key outside lab mode, a KMS reached over plain HTTP, or a
  provider KMS (OVHcloud KMS, Scaleway Key Manager) whose endpoint is not one of the catalogued KMS
  hosts of that provider, or whose provider is not under an allowed jurisdiction: the keys must be
  held where the data may be.

A provider profile from `EXITPLAN_PROVIDERS_DIR` may add a provider, never replace a shipped one
(`config.providers`); a verdict names the file it came from, with its SHA-256.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .errors import ConfigFileError, PolicyRefusal
from .hosts import is_loopback_host, non_eu_cloud, non_eu_cloud_pkcs11_module, public_ip_literal
from .providers import CatalogFile, ProviderProfile, added_profile, load_catalog

if TYPE_CHECKING:
    from .models import LoadedConfig


@dataclass(frozen=True)
class DestinationVerdict:
    """What the plan and the report say about one destination."""

    name: str
    provider: ProviderProfile
    region: str
    location: str
    bucket: str
    # The provider's profile when it is not shipped with exitplan (from EXITPLAN_PROVIDERS_DIR):
    # shown with the verdict wherever it is shown.
    catalog_file: CatalogFile | None = None
    sftp_host: str | None = None  # an SFTP destination's server (`bucket` is then its root directory)

    @property
    def place(self) -> str:
        """Where at the provider the data goes, as a person reads it: a bucket, or a directory on
        an SFTP server."""
        return f"directory {self.bucket} on SFTP server {self.sftp_host}" if self.sftp_host else f"bucket {self.bucket}"


def _refuse(loaded: "LoadedConfig", what: str, why: str, fix: str) -> PolicyRefusal:
    return PolicyRefusal(f"{what} in {loaded.path} is refused: {why}; {fix}")


def destination_profile(loaded: "LoadedConfig", name: str) -> ProviderProfile:
    dest = loaded.config.destinations[name]
    profile = load_catalog().get(dest.provider)
    if profile is None:
        raise _refuse(
            loaded, f"destination `{name}`",
            f"provider `{dest.provider}` is not in the provider catalog (known: {', '.join(sorted(load_catalog()))})",
            "choose a catalogued provider, or add its profile to the catalog (see the README)",
        )
    overrides = getattr(dest, "provider_overrides", None)
    if overrides:
        try:
            return profile.with_overrides(overrides, f"destinations.{name}.provider_overrides")
        except ValueError as exc:
            raise ConfigFileError(f"{loaded.path}: {exc}") from None
    return profile


def _check_tier_classes(loaded: "LoadedConfig", destination: str, profile: ProviderProfile) -> None:
    """Refuse (exit 2) a dataset's `tier_classes` naming a class destination `destination` has not."""
    sftp = loaded.config.destinations[destination].kind == "sftp"
    known = () if sftp else profile.storage_classes
    for ds_name, ds in loaded.config.datasets.items():
        unknown = sorted({c for c in ds.tier_classes.values() if c not in known})
        if ds.destination == destination and unknown:
            has = (f"destination `{destination}` is an SFTP server, which has no storage classes" if sftp else
                   f"{profile.display_name} has no storage class {', '.join(map(repr, unknown))} "
                   f"(known: {', '.join(known)})")
            raise ConfigFileError(f"{loaded.path}: field `datasets.{ds_name}.tier_classes`: {has}; remove it or "
                                  "name one of the known classes")


def check_sovereignty(loaded: "LoadedConfig") -> list[DestinationVerdict]:
    """Raise `PolicyRefusal` for the first destination or source the policy refuses."""
    cfg = loaded.config
    allowed = set(cfg.policy.allowed_jurisdictions)
    verdicts = []
    for name, dest in cfg.destinations.items():
        what = f"destination `{name}`"
        profile = destination_profile(loaded, name)
        if profile.lab_only:
            if not loaded.lab_mode:
                raise _refuse(
                    loaded, what,
                    f"provider `{profile.name}` is the local lab's S3 server, usable only when every endpoint is on "
                    f"loopback, and {loaded.not_lab_reason}",
                    "run `exitplan lab up` and `eval \"$(exitplan lab env)\"` for the lab, or use a production provider",
                )
        elif profile.jurisdiction not in allowed:
            raise _refuse(
                loaded, what,
                f"provider {profile.display_name} is under jurisdiction {profile.jurisdiction}, "
                f"not one of the allowed jurisdictions ({', '.join(sorted(allowed))})",
                "choose a provider under an allowed jurisdiction",
            )
        _check_tier_classes(loaded, name, profile)
        if dest.kind == "sftp":
            verdicts.append(_check_sftp_destination(loaded, name, dest, profile))
            continue
        region = profile.regions.get(dest.region)
        if region is None:
            raise _refuse(
                loaded, what,
                f"{profile.display_name} has no region `{dest.region}` (known: {', '.join(profile.regions)})",
                "check `region`",
            )
        if not profile.host_matches(dest.host, dest.region, dest.bucket):
            raise _refuse(
                loaded, what,
                f"endpoint host `{dest.host}` is not a known {profile.display_name} host for region `{dest.region}` "
                f"(known: {', '.join(region.hosts)})",
                "check `endpoint_url`",
            )
        _refuse_unjudgeable_host(loaded, what, dest.host, profile, "endpoint_url")
        if not loaded.lab_mode and dest.scheme != "https":
            raise _refuse(loaded, what, "plain HTTP is allowed only in the lab", "use an https:// `endpoint_url`")
        if not loaded.lab_mode and not dest.verify_tls:
            raise _refuse(loaded, what, "TLS verification may be switched off only in the lab", "remove `verify_tls: false`")
        if dest.storage_class and dest.storage_class not in profile.storage_classes:
            raise ConfigFileError(
                f"{loaded.path}: field `destinations.{name}.storage_class`: {profile.display_name} has no storage class "
                f"{dest.storage_class!r} (known: {', '.join(profile.storage_classes)})"
            )
        verdicts.append(DestinationVerdict(name, profile, dest.region, region.location, dest.bucket,
                                           added_profile(profile.name)))
    if not loaded.lab_mode:
        for name, src in cfg.sources.items():
            if src.kind == "azure_blob" and src.account_url and urlsplit(src.account_url).scheme != "https":
                raise _refuse(loaded, f"source `{name}`", "plain HTTP is allowed only in the lab", "use an https:// `account_url`")
            if src.kind == "s3" and src.scheme != "https":
                raise _refuse(loaded, f"source `{name}`", "plain HTTP is allowed only in the lab",
                              "use an https:// `endpoint_url`")
            if src.kind == "s3" and not src.verify_tls:
                raise _refuse(loaded, f"source `{name}`", "TLS verification may be switched off only in the lab",
                              "remove `verify_tls: false`")
    check_kek(loaded)
    if cfg.keys is None:
        for name, ds in cfg.datasets.items():
            if not ds.public:
                raise _refuse(
                    loaded, f"dataset `{name}`",
                    "it would be written unencrypted, and only datasets marked `public: true` may be",
                    "add a `keys` section (see docs/KEYS.md) or mark the dataset `public: true`",
                )
    return verdicts


def _check_sftp_destination(loaded: "LoadedConfig", name: str, dest, profile: ProviderProfile) -> DestinationVerdict:
    """An SFTP destination's host must be one of its provider's SFTP hosts for its region. (SSH
    is always encrypted; the host key is pinned by the configuration itself.)"""
    what = f"destination `{name}`"
    region = profile.sftp_regions.get(dest.region)
    if region is None:
        known = ", ".join(profile.sftp_regions) or "none: it offers no SFTP service in the catalog"
        raise _refuse(loaded, what, f"{profile.display_name} has no SFTP region `{dest.region}` (known: {known})",
                      "check `region`, or add the provider's SFTP hosts to the catalog (`sftp_regions`)")
    if not profile.sftp_host_matches(dest.host, dest.region):
        raise _refuse(
            loaded, what,
            f"host `{dest.host}` is not a known {profile.display_name} SFTP host for region `{dest.region}` "
            f"(known: {', '.join(region.hosts)})",
            "check `host`",
        )
    _refuse_unjudgeable_host(loaded, what, dest.host, profile, "host")
    return DestinationVerdict(name, profile, dest.region, region.location, dest.root, added_profile(profile.name),
                              sftp_host=dest.host)


def _refuse_unjudgeable_host(loaded: "LoadedConfig", what: str, host: str, profile: ProviderProfile,
                             field: str) -> None:
    """After the catalog's own checks: a host of a cloud outside the EU whatever the profile says,
    and outside the lab a public IP address (it names no operator the policy could judge)."""
    cloud = non_eu_cloud(host)
    if cloud:
        raise _refuse(loaded, what, _non_eu_host(host, cloud, profile.name), f"check `{field}`")
    if not loaded.lab_mode and public_ip_literal(host):
        raise _refuse(loaded, what, f"endpoint host `{host}` is a public IP address, which names no operator "
                                    "the policy could judge", f"use the provider's host name in `{field}`")


def _non_eu_host(host: str, cloud: str, provider: str) -> str:
    return (f"endpoint host `{host}` belongs to {cloud}, a cloud outside the EU, whatever the provider profile "
            f"`{provider}` says of it (exitplan's built-in list, which no catalog file changes)")


def check_kek(loaded: "LoadedConfig") -> None:
    """Raise `PolicyRefusal` (exit code 3) if the configured KEK is not allowed here.

    Refused: the `local` key file outside lab mode (production keys live in a KMS or HSM), and a
    KMS reached over plain HTTP anywhere but on loopback in the lab (its token and the keyset
    would cross the network in clear). Exit code 3, not 4: this is a decision taken on the
    configuration before any key is touched; 4 is kept for a key operation that was attempted and
    failed (unreachable, denied, wrong key).
    """
    keys = loaded.config.keys
    if keys is None:
        return
    kek = keys.kek
    what = f"the key-encryption key (`keys.kek`, backend `{kek.backend}`)"
    if kek.backend == "local" and not loaded.lab_mode:
        raise _refuse(
            loaded, what,
            f"a local key file is for the lab only (every endpoint on loopback), and {loaded.not_lab_reason}",
            "keep production keys in a KMS or HSM: set `keys.kek.backend` to openbao, pkcs11, ovhcloud-kms or "
            "scaleway-kms and run `exitplan keys rewrap` (see docs/KEYS.md)",
        )
    if kek.backend == "pkcs11" and non_eu_cloud_pkcs11_module(kek.module):
        raise _refuse(loaded, what, f"`keys.kek.module` {kek.module} is the client library of "
                                    f"{non_eu_cloud_pkcs11_module(kek.module)}, a cloud HSM outside the EU: the keys "
                                    "must be held where the data may be", "use an HSM under an allowed jurisdiction")
    field = {"openbao": "address", "ovhcloud-kms": "endpoint", "scaleway-kms": "api_url"}.get(kek.backend)
    if field:
        url = urlsplit(getattr(kek, field))
        cloud = non_eu_cloud(url.hostname)
        if cloud:
            raise _refuse(loaded, what, f"`keys.kek.{field}` host `{url.hostname}` belongs to {cloud}, a cloud outside "
                                        "the EU: the keys must be held where the data may be",
                          "run the KMS under an allowed jurisdiction")
        if not loaded.lab_mode and public_ip_literal(url.hostname):
            raise _refuse(loaded, what, f"`keys.kek.{field}` host `{url.hostname}` is a public IP address, which names "
                                        "no operator the policy could judge", f"use the KMS's host name in `keys.kek.{field}`")
        if url.scheme != "https" and not (loaded.lab_mode and is_loopback_host(url.hostname)):
            raise _refuse(
                loaded, what, "plain HTTP to a KMS is allowed only on loopback in the lab",
                f"use an https:// `keys.kek.{field}`",
            )
        provider = {"ovhcloud-kms": "ovhcloud", "scaleway-kms": "scaleway"}.get(kek.backend)
        if provider and not (loaded.lab_mode and is_loopback_host(url.hostname)):
            _check_kms_host(loaded, what, provider, field, url.hostname or "",
                            getattr(kek, "region", None))


def _check_kms_host(loaded: "LoadedConfig", what: str, provider: str, field: str, host: str,
                    region: str | None) -> None:
    """A provider KMS must be a catalogued KMS host (and region) of a provider under an allowed
    jurisdiction."""
    profile = load_catalog().get(provider)
    allowed = set(loaded.config.policy.allowed_jurisdictions)
    if profile is None or profile.jurisdiction not in allowed:
        raise _refuse(loaded, what, f"provider `{provider}` is not catalogued under an allowed jurisdiction "
                                    f"({', '.join(sorted(allowed))})", "use a KMS under an allowed jurisdiction")
    regions = {name: r for name, r in profile.kms_regions.items() if region is None or name == region}
    if not any(host in r.hosts for r in regions.values()):
        known = ", ".join(sorted({h for r in profile.kms_regions.values() for h in r.hosts}))
        raise _refuse(
            loaded, what,
            f"`keys.kek.{field}` host `{host}` is not a catalogued {profile.display_name} KMS host"
            + (f" for region `{region}`" if region else "") + f" (known: {known or 'none'}): the keys must be held in a "
            "region the policy allows",
            "use one of those hosts, or add the region to the provider catalog if it is under an allowed jurisdiction",
        )
