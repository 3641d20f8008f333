"""Key-encryption-key (KEK) backends: each a `tink.aead.Aead` with `describe()`.

`open_kek(kek_config)` builds the backend a `keys.kek` section names, reading its credential from
the environment variable or the Prefect block the config names (`config.secrets`; never from the
config itself). Backends and their status:

| backend        | module        | tested against                                   |
| -------------- | ------------- | ------------------------------------------------ |
| `local`        | `local.py`    | itself (lab and tests only; refused outside lab) |
| `openbao`      | `openbao.py`  | a real OpenBao dev server (transit)              |
| `pkcs11`       | `pkcs11.py`   | a real SoftHSM2 token                            |
| `ovhcloud-kms` | `ovhcloud.py` | a local fake of its REST API only                |
| `scaleway-kms` | `scaleway.py` | a local fake of its REST API only                |

Backends import their SDK lazily, so a missing optional library only matters to whoever uses it.
"""

from __future__ import annotations

import os
from pathlib import Path

from tink import aead

from config.models import (
    LocalKekConfig,
    OpenBaoKekConfig,
    OvhKmsKekConfig,
    Pkcs11KekConfig,
    ScalewayKmsKekConfig,
)
from config.secrets import read_block, shown_variable

from .base import KekAuthError, KekError, KekUnavailable, KekWrongKey, KeyEncryptionKey

__all__ = [
    "KekAuthError", "KekError", "KekUnavailable", "KekWrongKey", "KeyEncryptionKey", "open_kek", "kek_reference",
]


def _secret(var: str, what: str, backend: str) -> str:
    value = os.environ.get(var)
    if not value:
        raise KekAuthError(f"{backend}: environment variable {shown_variable(var)} is not set; "
                           f"export the {what} there (see `keys.kek`)")
    return value


def _credential(kek, item: str, what: str) -> tuple[str, str]:
    """(value, where it came from) of credential `item` of a KEK config: the Prefect block
    `<item>_block` (a config error, exit 2, when it cannot be read) or the environment variable
    `<item>_env` (exit 4 when it is unset)."""
    block = getattr(kek, f"{item}_block", None)
    if block:
        return read_block(None, f"keys.kek.{item}_block", block), f"the Prefect block {block}"
    var = getattr(kek, f"{item}_env")
    return _secret(var, what, kek.backend), f"${shown_variable(var)}"


def open_kek(kek, *, base_dir: Path | None = None) -> aead.Aead:
    """The KEK backend `kek` (a `keys.kek` config model) describes; relative paths from `base_dir`.

    Raises a `KekError` subclass (exit code 4) when the key cannot be opened: a missing
    credential variable, an unreachable HSM, a wrong PIN, a key that does not exist.
    """
    base = Path(base_dir) if base_dir else Path.cwd()

    def path(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    if isinstance(kek, LocalKekConfig):
        from .local import LocalKek

        if kek.path is None:
            raise KekUnavailable("local KEK: no key file path was given (`keys.kek.path`)")
        return LocalKek(path(kek.path))
    if isinstance(kek, OpenBaoKekConfig):
        from .openbao import OpenBaoKek

        token, token_from = _credential(kek, "token", "OpenBao/Vault token")
        return OpenBaoKek(
            kek.address, kek.key_name, token, mount=kek.mount, namespace=kek.namespace,
            verify=str(path(kek.ca_cert)) if kek.ca_cert else True, token_from=token_from,
        )
    if isinstance(kek, Pkcs11KekConfig):
        from .pkcs11 import Pkcs11Kek

        pin, pin_from = _credential(kek, "pin", "token's user PIN")
        return Pkcs11Kek(kek.module, kek.token_label, kek.key_label, pin, pin_from=pin_from)
    if isinstance(kek, OvhKmsKekConfig):
        from .ovhcloud import OvhKmsKek

        cert = _secret(kek.cert_file_env, "path of the OKMS access certificate (PEM)", "ovhcloud-kms")
        key = _secret(kek.key_file_env, "path of the OKMS access certificate's private key (PEM)", "ovhcloud-kms")
        return OvhKmsKek(
            kek.endpoint, kek.okms_id, kek.key_id, cert_file=str(path(cert)), key_file=str(path(key)),
            ca_cert=str(path(kek.ca_cert)) if kek.ca_cert else None,
        )
    if isinstance(kek, ScalewayKmsKekConfig):
        from .scaleway import ScalewayKmsKek

        secret, _ = _credential(kek, "secret_key", "Scaleway API secret key")
        return ScalewayKmsKek(kek.key_id, secret, region=kek.region, api_url=kek.api_url)
    raise KekError(f"unknown KEK backend {getattr(kek, 'backend', kek)!r}")


def kek_reference(kek) -> dict:
    """The non-secret reference of a KEK config (what `keyset.meta.json` records): backend, key
    location and the *names* of the credential variables or blocks; never a credential."""
    return kek.model_dump(mode="json", exclude_none=True)
