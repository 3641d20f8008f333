"""`pkcs11`: an AES key in an HSM (or SoftHSM2) through `python-pkcs11`, CKM_AES_GCM.

The token is found by its label, the key by its label in that token, the user PIN comes from the
environment. Each wrap draws a fresh 12-byte IV from `os.urandom` and authenticates the
associated data with GCM (128-bit tag). Ciphertext layout: `0x01` ‖ IV (12) ‖ ciphertext ‖ tag.

A session is opened (and logged in) per operation and closed after it, which also logs out: the
PIN is checked when the KEK is opened (a wrong PIN fails before anything else happens) and no
login state outlives a call. The module is loaded once per process (PKCS#11's C_Initialize is
process-wide).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import pkcs11
from pkcs11 import KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams
from tink import aead

from .base import KekAuthError, KekError, KekUnavailable, KekWrongKey

_VERSION = b"\x01"
_LIBS: dict[str, "pkcs11.lib"] = {}
_LIBS_LOCK = threading.Lock()


def load_module(module: str):
    """The loaded PKCS#11 library at `module` (once per process)."""
    with _LIBS_LOCK:
        lib = _LIBS.get(module)
        if lib is None:
            if not Path(module).exists():
                raise KekUnavailable(
                    f"PKCS#11 module {module} does not exist; install the HSM vendor's library "
                    "(SoftHSM2: `apt-get install softhsm2`) or fix `keys.kek.module`"
                )
            try:
                lib = pkcs11.lib(module)
            except p11.PKCS11Error as exc:
                raise KekUnavailable(f"PKCS#11 module {module} cannot be loaded ({type(exc).__name__}); check `keys.kek.module`") from None
            _LIBS[module] = lib
        return lib


class Pkcs11Kek(aead.Aead):
    """AES-GCM with the AES secret key `key_label` of token `token_label`."""

    def __init__(self, module: str, token_label: str, key_label: str, pin: str, *, pin_from: str = "the PIN variable") -> None:
        self.module = module
        self.token_label = token_label
        self.key_label = key_label
        self.pin_from = pin_from  # where the PIN came from, for messages: `$PKCS11_PIN`, a Prefect block
        self._pin = pin
        lib = load_module(module)
        try:
            self._token = lib.get_token(token_label=token_label)
        except p11.NoSuchToken:
            raise KekUnavailable(
                f"no PKCS#11 token labelled {token_label!r} in {module}; check `keys.kek.token_label` "
                "(`softhsm2-util --show-slots` lists SoftHSM2's) and that the HSM is connected"
            ) from None
        except p11.MultipleTokensReturned:
            raise KekWrongKey(f"several PKCS#11 tokens are labelled {token_label!r} in {module}; give each token a distinct label") from None
        except p11.PKCS11Error as exc:
            raise self._translate(exc, "open") from None
        with self._session() as session:  # checks the PIN and that the key exists, now
            self._find_key(session)

    def describe(self) -> str:
        return f"pkcs11 key {self.key_label!r} in token {self.token_label!r} ({self.module})"

    @contextmanager
    def _session(self):
        try:
            session = self._token.open(user_pin=self._pin)
        except p11.PKCS11Error as exc:
            raise self._translate(exc, "login") from None
        try:
            yield session
        finally:
            try:
                session.close()
            except p11.PKCS11Error:
                pass

    def _find_key(self, session):
        try:
            return session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=self.key_label)
        except p11.NoSuchKey:
            raise KekWrongKey(
                f"token {self.token_label!r} has no AES key labelled {self.key_label!r}; check `keys.kek.key_label` "
                "(`pkcs11-tool --list-objects --login` lists them)"
            ) from None
        except p11.MultipleObjectsReturned:
            raise KekWrongKey(f"token {self.token_label!r} has several AES keys labelled {self.key_label!r}; labels must be unique") from None

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        iv = os.urandom(12)
        with self._session() as session:
            key = self._find_key(session)
            try:
                out = key.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, associated_data or None, 128))
            except p11.PKCS11Error as exc:
                raise self._translate(exc, "encrypt") from None
        return _VERSION + iv + bytes(out)

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes:
        if len(ciphertext) < 1 + 12 + 16 or ciphertext[:1] != _VERSION:
            raise KekWrongKey(f"the data was not wrapped by a PKCS#11 KEK ({self.describe()}); check which KEK wrapped it")
        iv, body = ciphertext[1:13], ciphertext[13:]
        with self._session() as session:
            key = self._find_key(session)
            try:
                return bytes(key.decrypt(body, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, associated_data or None, 128)))
            # SoftHSM2 reports a failed GCM tag as CKR_GENERAL_ERROR; HSMs say CKR_ENCRYPTED_DATA_INVALID.
            except (p11.EncryptedDataInvalid, p11.EncryptedDataLenRange, p11.DataInvalid, p11.FunctionFailed, p11.GeneralError):
                raise KekWrongKey(
                    f"{self.describe()} does not open this data: another key, another project, or an altered file; "
                    "use the KEK the keyset was wrapped with (`exitplan keys show` names it)"
                ) from None
            except p11.PKCS11Error as exc:
                raise self._translate(exc, "decrypt") from None

    def _translate(self, exc: BaseException, op: str) -> KekError:
        where = self.describe()
        if isinstance(exc, (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange)):
            return KekAuthError(f"{where}: the token refused the PIN in {self.pin_from} ({type(exc).__name__}); set the user PIN there")
        if isinstance(exc, (p11.PinLocked, p11.PinExpired)):
            return KekAuthError(f"{where}: the user PIN is {'locked' if isinstance(exc, p11.PinLocked) else 'expired'}; the token's security officer must reset it")
        if isinstance(exc, (p11.DeviceRemoved, p11.DeviceError, p11.TokenNotPresent, p11.SessionCount)):
            return KekUnavailable(f"{where}: the token is not usable now ({type(exc).__name__}); check the HSM and retry")
        if isinstance(exc, (p11.MechanismInvalid, p11.KeyTypeInconsistent)):
            return KekWrongKey(f"{where}: the key does not allow AES-GCM {op} ({type(exc).__name__}); create it with encrypt/decrypt allowed")
        return KekError(f"{where}: {op} failed ({type(exc).__name__})")
