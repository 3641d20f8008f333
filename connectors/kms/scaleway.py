"""`scaleway-kms`: a symmetric key (`aes_256_gcm`) in Scaleway Key Manager, through its REST API.

NOT RUN AGAINST THE REAL SERVICE. Written to Scaleway's published Key Manager API v1alpha1 (the
same calls the `scaleway` SDK and the `scaleway-tink` package make); the test suite checks the
requests we send and the responses we parse against a local fake server only. Try it on a real key
(`exitplan keys init` then `exitplan keys show`) before relying on it.

- encrypt: `POST {api_url}/key-manager/v1alpha1/regions/{region}/keys/{key_id}/encrypt`
  body `{"plaintext": base64, "associated_data": base64}` → `{"key_id", "ciphertext": base64}`;
- decrypt: `POST …/decrypt` body `{"ciphertext": base64, "associated_data": base64}` →
  `{"key_id", "plaintext": base64}`;
- authentication: header `X-Auth-Token: <API secret key>`;
- limits: plaintext 1 to 65,535 bytes; associated data is supported natively.
We call the REST API with `requests` (already a dependency through hvac) rather than requiring
`scaleway-tink` + `scaleway`: the two calls are small, and the error mapping stays ours.
"""

from __future__ import annotations

import base64

import requests
from tink import aead

from ._rest import post_json
from .base import KekError


class ScalewayKmsKek(aead.Aead):
    """Key `key_id` in Scaleway Key Manager, region `region`."""

    def __init__(
        self,
        key_id: str,
        secret_key: str,
        *,
        region: str = "fr-par",
        api_url: str = "https://api.scaleway.com",
        session: requests.Session | None = None,
    ) -> None:
        self.key_id = key_id
        self.region = region
        self.api_url = api_url.rstrip("/")
        self._session = session or requests.Session()
        self._session.headers["X-Auth-Token"] = secret_key
        self._base = f"{self.api_url}/key-manager/v1alpha1/regions/{region}/keys/{key_id}"

    def describe(self) -> str:
        return f"scaleway-kms key {self.key_id} in {self.region}"

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        body = {"plaintext": _b64(plaintext)}
        if associated_data:
            body["associated_data"] = _b64(associated_data)
        data = post_json(self._session, f"{self._base}/encrypt", body, where=self.describe(), op="encrypt")
        try:
            return base64.b64decode(data["ciphertext"], validate=True)
        except (KeyError, TypeError, ValueError):
            raise KekError(f"{self.describe()}: encrypt answered without a base64 ciphertext; check `api_url`") from None

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes:
        body = {"ciphertext": _b64(ciphertext)}
        if associated_data:
            body["associated_data"] = _b64(associated_data)
        data = post_json(self._session, f"{self._base}/decrypt", body, where=self.describe(), op="decrypt")
        try:
            return base64.b64decode(data["plaintext"], validate=True)
        except (KeyError, TypeError, ValueError):
            raise KekError(f"{self.describe()}: decrypt answered without a base64 plaintext; check `api_url`") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
