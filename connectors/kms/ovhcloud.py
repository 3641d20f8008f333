"""`ovhcloud-kms`: a symmetric service key in OVHcloud KMS (OKMS), through its REST API.

NOT RUN AGAINST THE REAL SERVICE. Written to the published OKMS REST API (the OpenAPI document
shipped with OVHcloud's `okms-sdk-go`, "OVHcloud KMS REST API" 2.x); the test suite checks the
requests we send and the responses we parse against a local fake server only. Try it on a real
KMS (`exitplan keys init` then `exitplan keys show`) before relying on it.

- encrypt: `POST {endpoint}/api/{okms_id}/v1/servicekey/{key_id}/encrypt`
  body `{"plaintext": base64, "context": str}` → `{"ciphertext": "<JWE compact token>"}`;
- decrypt: `POST …/decrypt` body `{"ciphertext": token, "context": str}` → `{"plaintext": base64}`;
- authentication: the OKMS access certificate (mutual TLS, PEM certificate + private key files);
- limits: plaintext up to about 4 KB (a keyset of about 40 data keys), `context` at most 64
  characters. Our associated data can be longer, so `context` carries
  `"exitplan-ad:" + base64url(SHA-256(b"exitplan-kek-ad|" + ad))` (55 characters); OKMS
  authenticates it as additional data, which binds the ciphertext to the full AD.
- the key must be an `oct` (AES-256) service key with the `encrypt` and `decrypt` operations.
"""

from __future__ import annotations

import base64

import requests
from tink import aead

from ._rest import post_json
from .base import KekError, ad_digest


def okms_context(associated_data: bytes) -> str:
    return "exitplan-ad:" + base64.urlsafe_b64encode(ad_digest(associated_data)).rstrip(b"=").decode("ascii")


class OvhKmsKek(aead.Aead):
    """Service key `key_id` of OKMS domain `okms_id` at the regional `endpoint`."""

    def __init__(
        self,
        endpoint: str,
        okms_id: str,
        key_id: str,
        *,
        cert_file: str | None = None,
        key_file: str | None = None,
        ca_cert: str | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.okms_id = okms_id
        self.key_id = key_id
        self._session = session or requests.Session()
        if cert_file and key_file:
            self._session.cert = (cert_file, key_file)
        if ca_cert:
            self._session.verify = ca_cert
        self._base = f"{self.endpoint}/api/{okms_id}/v1/servicekey/{key_id}"

    def describe(self) -> str:
        return f"ovhcloud-kms service key {self.key_id} (OKMS {self.okms_id}) at {self.endpoint}"

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        body = {"plaintext": base64.b64encode(plaintext).decode("ascii"), "context": okms_context(associated_data)}
        data = post_json(self._session, f"{self._base}/encrypt", body, where=self.describe(), op="encrypt")
        token = data.get("ciphertext")
        if not isinstance(token, str) or not token:
            raise KekError(f"{self.describe()}: encrypt answered without a ciphertext; check the endpoint")
        return token.encode("ascii")

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes:
        body = {"ciphertext": ciphertext.decode("ascii", "replace"), "context": okms_context(associated_data)}
        data = post_json(self._session, f"{self._base}/decrypt", body, where=self.describe(), op="decrypt")
        try:
            return base64.b64decode(data["plaintext"], validate=True)
        except (KeyError, TypeError, ValueError):
            raise KekError(f"{self.describe()}: decrypt answered without a base64 plaintext; check the endpoint") from None
