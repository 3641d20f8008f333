"""`local`: a 32-byte key file, AES-256-GCM with `cryptography`. For the lab and tests only.

The policy (`config.policy.check_kek`) refuses it outside lab mode. Ciphertext layout:
`0x01` (format version) ‖ 12-byte random nonce ‖ AES-256-GCM(ciphertext ‖ 16-byte tag), with the
associated data authenticated by GCM.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tink import aead

from .base import KekAuthError, KekUnavailable, KekWrongKey

_VERSION = b"\x01"
KEY_BYTES = 32


def create_key_file(path: Path) -> bool:
    """Create `path` with 32 random bytes, mode 0600, if it does not exist. True if created.
    A write that fails (a full disk) removes the file: a short key file would be taken for a
    wrong key by every later command."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


class LocalKek(aead.Aead):
    """AES-256-GCM under a key read from a file (read once, held in memory only)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            st = self.path.stat()
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise KekUnavailable(
                f"local KEK file {self.path} does not exist; `exitplan keys init` creates it in the lab, "
                "or restore the file the keyset was wrapped with"
            ) from None
        except OSError as exc:
            raise KekUnavailable(f"local KEK file {self.path} cannot be read ({exc.strerror}); check its permissions") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KekAuthError(
                f"local KEK file {self.path} is accessible to other users (mode {stat.S_IMODE(st.st_mode):o}); "
                f"run `chmod 600 {self.path}`"
            )
        if len(raw) != KEY_BYTES:
            raise KekWrongKey(f"local KEK file {self.path} holds {len(raw)} bytes, not a 32-byte key; point `keys.kek.path` at the right file")
        self._aead = AESGCM(raw)

    def describe(self) -> str:
        return f"local key file {self.path}"

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        nonce = os.urandom(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, associated_data or None)

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes:
        if len(ciphertext) < 1 + 12 + 16 or ciphertext[:1] != _VERSION:
            raise KekWrongKey(f"the data was not wrapped by a local KEK ({self.describe()}); check which KEK wrapped it")
        try:
            return self._aead.decrypt(ciphertext[1:13], ciphertext[13:], associated_data or None)
        except InvalidTag:
            raise KekWrongKey(
                f"{self.describe()} does not open this keyset: another key, another project, or an altered file; "
                "use the KEK the keyset was wrapped with (`exitplan keys show` names it)"
            ) from None
