"""`openbao`: a transit key in OpenBao (or HashiCorp Vault) through `tink.integration.hcvault`.

Associated data. Tink's hcvault AEAD accepts only *empty* associated data (hvac's transit
`encrypt_data` has no `associated_data` parameter; Tink always sends an empty derivation context).
We bind the associated data ourselves, inside the plaintext the transit key encrypts:

    transit plaintext = b"EPAD1" ‖ SHA-256(b"exitplan-kek-ad|" ‖ associated_data) ‖ plaintext

Transit's AES-256-GCM authenticates that whole plaintext, so nobody without the transit key can
change the digest; on decrypt the digest must equal the digest of the associated data we are
given (compared in constant time), else `KekWrongKey`. Effect: a keyset wrapped for project A
does not open as project B's, exactly as with a backend that authenticates AD natively. What it
does not give: someone holding a token with `decrypt` on the key can read the plaintext whatever
the AD — as with any KMS where the AD is public.

Versions. Transit keys are versioned: `rotate()` adds a version (new encryptions use it, older
ones still decrypt); `rewrap(ciphertext)` asks transit to re-encrypt a ciphertext under the
latest version without the plaintext leaving the server. The version is visible in the
ciphertext (`vault:v3:…`), see `ciphertext_version`.

A transit `encrypt` on a key that does not exist *creates* it (when the token may). Before the
first encryption we read the key (`GET <mount>/keys/<name>`) and refuse a missing key, so a typo
in `key_name` cannot silently create a new KEK; a token without `read` on the key skips the check.
"""

from __future__ import annotations

import hmac
import re
from urllib.parse import urlsplit

import hvac
import hvac.exceptions as hvac_errors
import requests
import tink
from tink import aead
from tink.integration import hcvault

from .base import KekAuthError, KekError, KekUnavailable, KekWrongKey, ad_digest

_MAGIC = b"EPAD1"
_VERSION = re.compile(rb"^vault:v(\d+):")


def ciphertext_version(ciphertext: bytes) -> int | None:
    """The transit key version a ciphertext was made with (`vault:vN:…`), or None."""
    m = _VERSION.match(ciphertext)
    return int(m.group(1)) if m else None


class RedirectRefused(requests.exceptions.RequestException):
    """OpenBao answered with a redirect, which is never followed."""

    def __init__(self, status: int, target: str):
        super().__init__(f"HTTP {status} redirect to {target}")
        self.status, self.target = status, target


def _refuse_redirect(response: requests.Response, *args, **kwargs) -> None:
    if response.is_redirect:
        raise RedirectRefused(response.status_code, urlsplit(response.headers.get("Location", "")).hostname
                              or "another address")


class OpenBaoKek(aead.Aead):
    """A transit key `<mount>/keys/<key_name>` at `address`, authenticated with `token`."""

    def __init__(
        self,
        address: str,
        key_name: str,
        token: str,
        *,
        mount: str = "transit",
        namespace: str | None = None,
        verify: bool | str = True,
        timeout: float = 10.0,
        token_from: str = "the token",
    ) -> None:
        self.address = address.rstrip("/")
        self.mount = mount.strip("/")
        self.key_name = key_name
        self.token_from = token_from  # where the token came from, for messages: `$VAULT_TOKEN`, a Prefect block
        # No redirects: a standby's redirect to the active node would carry the token and the
        # keyset to a host the sovereignty gate never judged (point `address` at the active node,
        # or let standbys forward requests, OpenBao's default). hvac hands a 3xx back as if it
        # were an answer, so the session's hook stops it.
        session = requests.Session()
        session.hooks["response"].append(_refuse_redirect)
        self._client = hvac.Client(url=self.address, token=token, namespace=namespace, verify=verify, timeout=timeout,
                                   allow_redirects=False, session=session)
        self._aead = hcvault.new_aead(f"{self.mount}/keys/{self.key_name}", self._client)
        self._checked = False

    # -- reference ------------------------------------------------------------------------------

    @property
    def key_uri(self) -> str:
        return f"hcvault://{self.mount}/keys/{self.key_name}"

    def describe(self) -> str:
        return f"openbao transit key {self.mount}/keys/{self.key_name} at {self.address}"

    # -- Aead -----------------------------------------------------------------------------------

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        if not self._checked:
            self.latest_version()  # raises KekWrongKey for a key that does not exist
        inner = _MAGIC + ad_digest(associated_data) + plaintext
        try:
            return self._aead.encrypt(inner, b"")
        except tink.TinkError as exc:
            raise self._translate(exc, "encrypt") from None

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes:
        try:
            inner = self._aead.decrypt(ciphertext, b"")
        except tink.TinkError as exc:
            raise self._translate(exc, "decrypt") from None
        head = len(_MAGIC) + 32
        if len(inner) < head or inner[: len(_MAGIC)] != _MAGIC:
            raise KekWrongKey(f"{self.describe()} decrypted the data, but it was not wrapped by exitplan; check which KEK wrapped it")
        if not hmac.compare_digest(inner[len(_MAGIC):head], ad_digest(associated_data)):
            raise KekWrongKey(
                f"{self.describe()} opened the data, but it belongs to something else (another project or file); "
                "use the keyset that belongs to this project"
            )
        return inner[head:]

    # -- versions -------------------------------------------------------------------------------

    def latest_version(self) -> int | None:
        """The key's latest version, or None when the token may not read the key's metadata."""
        try:
            info = self._client.secrets.transit.read_key(name=self.key_name, mount_point=self.mount)
        except hvac_errors.Forbidden:
            self._checked = True
            return None
        except Exception as exc:  # noqa: BLE001 - mapped below, never leaked
            raise self._translate(exc, "read") from None
        self._checked = True
        return int(info["data"]["latest_version"])

    def rotate(self) -> int | None:
        """Add a new version of the transit key (new wraps use it); returns the latest version."""
        try:
            self._client.secrets.transit.rotate_key(name=self.key_name, mount_point=self.mount)
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, "rotate") from None
        return self.latest_version()

    def rewrap(self, ciphertext: bytes) -> bytes:
        """Re-encrypt `ciphertext` under the key's latest version, inside OpenBao (transit/rewrap)."""
        try:
            resp = self._client.secrets.transit.rewrap_data(
                name=self.key_name, ciphertext=ciphertext.decode("ascii"), mount_point=self.mount
            )
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc, "rewrap") from None
        return resp["data"]["ciphertext"].encode("ascii")

    # -- errors ---------------------------------------------------------------------------------

    def _translate(self, exc: BaseException, op: str) -> KekError:
        cause = exc.args[0] if isinstance(exc, tink.TinkError) and exc.args else exc
        where = self.describe()
        if isinstance(cause, RedirectRefused):
            return KekError(
                f"{where}: {op} answered with a redirect (HTTP {cause.status}) to {cause.target}, which exitplan does "
                "not follow (the request holds the token and key material, and only `keys.kek.address` was checked); "
                "point `keys.kek.address` at the active node, or let standby nodes forward requests"
            )
        if isinstance(cause, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return KekUnavailable(
                f"{where} is unreachable ({type(cause).__name__}); check that the server runs and `keys.kek.address`"
            )
        if isinstance(cause, requests.exceptions.SSLError):
            return KekUnavailable(f"{where}: TLS verification failed; check `keys.kek.address` and `keys.kek.ca_cert`")
        if isinstance(cause, (hvac_errors.Forbidden, hvac_errors.Unauthorized)):
            return KekAuthError(
                f"{where} refused the token in {self.token_from} ({op}: permission denied); check the token and that "
                f"its policy allows update on {self.mount}/encrypt/{self.key_name} and {self.mount}/decrypt/{self.key_name}"
            )
        if isinstance(cause, hvac_errors.VaultDown):
            return KekUnavailable(f"{where} is sealed or in maintenance; unseal it and retry")
        if isinstance(cause, (hvac_errors.InternalServerError, hvac_errors.BadGateway)):
            return KekUnavailable(f"{where} answered with a server error on {op}; retry, or check the server's log")
        if isinstance(cause, hvac_errors.InvalidPath):
            return KekWrongKey(
                f"{where} does not exist (no such key or mount); create it with "
                f"`bao write -f {self.mount}/keys/{self.key_name}` or fix `keys.kek.mount`/`keys.kek.key_name`"
            )
        if isinstance(cause, hvac_errors.InvalidRequest):
            text = " ".join(getattr(cause, "errors", None) or [str(cause)]).lower()
            if "not found" in text:
                return KekWrongKey(
                    f"{where} does not exist; create it with `bao write -f {self.mount}/keys/{self.key_name}` "
                    "or fix `keys.kek.key_name`"
                )
            if "min_decryption_version" in text or "archived" in text:
                return KekWrongKey(f"{where}: the key version this was wrapped with is no longer allowed to decrypt (min_decryption_version)")
            return KekWrongKey(
                f"{where} does not open this data: another key, another OpenBao, or an altered file; "
                "use the KEK the keyset was wrapped with (`exitplan keys show` names it)"
            )
        if isinstance(cause, hvac_errors.VaultError):
            return KekError(f"{where}: {op} failed ({type(cause).__name__}); check the server's log")
        return KekError(f"{where}: {op} failed ({type(cause).__name__})")
