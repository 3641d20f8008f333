"""Data keys as the segment encryptor uses them, taken from a Tink keyset held in memory only.

A Tink keyset (the data keys) is only ever stored wrapped by a key-encryption key; once unwrapped
in memory, each `AES256_GCM_HKDF_1MB` key becomes a `DataKey`: its Tink key id and its 32-byte
input keying material. The material never appears in a repr, a log line or an exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tink
from tink import proto_keyset_format, secret_key_access, streaming_aead
from tink.proto import aes_gcm_hkdf_streaming_pb2, tink_pb2

streaming_aead.register()

STREAMING_KEY_TYPE = "type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey"
SEGMENT_SIZE = 1_048_576


class KeysetError(ValueError):
    """The keyset holds no usable key for this format, or not the key asked for."""


@dataclass(frozen=True)
class DataKey:
    key_id: int
    ikm: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.ikm) != 32:
            raise KeysetError(f"data key {self.key_id}: expected 32 bytes of key material")


@dataclass(frozen=True)
class DataKeys:
    """The usable data keys of a keyset: the primary encrypts; every enabled key decrypts."""

    primary_id: int
    keys: dict[int, DataKey] = field(repr=False)

    @property
    def primary(self) -> DataKey:
        return self.keys[self.primary_id]

    def get(self, key_id: int) -> DataKey:
        try:
            return self.keys[key_id]
        except KeyError:
            raise KeysetError(
                f"the keyset has no enabled data key with id {key_id} (it has {', '.join(map(str, sorted(self.keys)))}); "
                "if the project's keyset copies next to the data hold it, `exitplan keys import` brings it into this "
                "state directory"
            ) from None


def data_keys(handle: tink.KeysetHandle) -> DataKeys:
    """Extract the AES256_GCM_HKDF_1MB keys of `handle` (enabled ones only)."""
    keyset = tink_pb2.Keyset.FromString(proto_keyset_format.serialize(handle, secret_key_access.TOKEN))
    keys: dict[int, DataKey] = {}
    for key in keyset.key:
        if key.status != tink_pb2.ENABLED or key.key_data.type_url != STREAMING_KEY_TYPE:
            continue
        proto = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey.FromString(key.key_data.value)
        p = proto.params
        if p.ciphertext_segment_size != SEGMENT_SIZE or p.derived_key_size != 32 or p.hkdf_hash_type != 3:  # SHA256
            raise KeysetError(
                f"data key {key.key_id} is not an AES256_GCM_HKDF_1MB key (segment {p.ciphertext_segment_size}, "
                f"derived key {p.derived_key_size} bytes)"
            )
        keys[key.key_id] = DataKey(key.key_id, bytes(proto.key_value))
    if keyset.primary_key_id not in keys:
        raise KeysetError("the keyset's primary key is not an enabled AES256_GCM_HKDF_1MB key")
    return DataKeys(keyset.primary_key_id, keys)


def new_keyset() -> tink.KeysetHandle:
    """A fresh keyset with one AES256_GCM_HKDF_1MB key, primary."""
    return tink.new_keyset_handle(streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB)
