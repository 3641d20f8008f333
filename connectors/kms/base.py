"""What every key-encryption-key (KEK) backend is and how it fails.

A KEK backend is a `tink.aead.Aead` (`encrypt(plaintext, associated_data)` /
`decrypt(ciphertext, associated_data)`) plus `describe()`: one line naming the backend and the key
reference, never key material, tokens or PINs. It wraps exactly two small things: the project's
Tink keyset and the audit-signing key.

Failures are our own small hierarchy, classified by what the user does about them; every message
is a sentence naming the key and the fix. They are `UserError`s with exit code 4, so the CLI prints
them without a traceback. SDK exceptions never leak past a backend (they are not chained either:
an hvac or requests exception can carry a URL with a token in it).
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

from config.errors import ExitCode, UserError


class KekError(UserError):
    """The KEK could not be used (exit code 4). The message says which key, why, and the fix."""

    exit_code = ExitCode.KEY_ERROR


class KekUnavailable(KekError):
    """The KMS/HSM/key file cannot be reached or loaded: a retry later, or a fixed address, can help."""


class KekAuthError(KekError):
    """The KMS/HSM refused our credentials (token, PIN, certificate) or permissions."""


class KekWrongKey(KekError):
    """The key exists but does not open this ciphertext (another key, another associated data,
    an altered file), or the named key does not exist."""


@runtime_checkable
class KeyEncryptionKey(Protocol):
    """A Tink `Aead` with a printable reference. Implementations subclass `tink.aead.Aead`."""

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes: ...

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes: ...

    def describe(self) -> str: ...


def ad_digest(associated_data: bytes) -> bytes:
    """SHA-256 of the associated data, for backends that cannot take it (or not at full length)."""
    return hashlib.sha256(b"exitplan-kek-ad|" + associated_data).digest()
