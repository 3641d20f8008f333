"""OVHcloud KMS and Scaleway Key Manager adapters against a local fake of their REST APIs.

These check the requests we build (paths, headers, JSON fields, base64) and how we read answers
and errors. They do NOT prove the real services behave like the fake: the fakes follow the
published API documents (OKMS OpenAPI 2.x; Scaleway Key Manager v1alpha1). Nothing here has run
against the real services.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from config.models import ScalewayKmsKekConfig
from connectors.kms import KekAuthError, KekError, KekUnavailable, KekWrongKey, open_kek
from connectors.kms.ovhcloud import OvhKmsKek, okms_context
from connectors.kms.scaleway import ScalewayKmsKek

KEY_ID = "11111111-2222-3333-4444-555555555555"
OKMS_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
SCW_SECRET = "scw-secret-" + os.urandom(6).hex()


class FakeKms:
    """Both APIs on one server: AES-GCM under a key per key id; records every request."""

    def __init__(self):
        self.keys = {KEY_ID: AESGCM(os.urandom(32))}
        self.requests: list[tuple[str, dict, dict]] = []
        self.force_status: int | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, dict(self.headers), body))
                status, answer = fake.handle(self.path, dict(self.headers), body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", f"{fake.url}/elsewhere{self.path}")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, path: str, headers: dict, body: dict):
        if self.force_status:
            return self.force_status, {"message": "forced", "errors": ["forced"]}
        parts = path.strip("/").split("/")
        if parts[0] == "key-manager":  # /key-manager/v1alpha1/regions/{region}/keys/{id}/{op}
            if headers.get("X-Auth-Token") != SCW_SECRET:
                return 401, {"message": "authentication is denied"}
            key_id, op = parts[5], parts[6]
            ad = base64.b64decode(body["associated_data"]) if "associated_data" in body else None
            field_in, field_out = ("plaintext", "ciphertext") if op == "encrypt" else ("ciphertext", "plaintext")
        else:  # /api/{okms}/v1/servicekey/{id}/{op}
            assert parts[1] == OKMS_ID
            key_id, op = parts[4], parts[5]
            ad = body.get("context", "").encode() or None
            field_in, field_out = ("plaintext", "ciphertext") if op == "encrypt" else ("ciphertext", "plaintext")
        key = self.keys.get(key_id)
        if key is None:
            return 404, {"message": "key not found", "errors": ["key not found"]}
        data = body[field_in]
        if op == "encrypt":
            nonce = os.urandom(12)
            ct = nonce + key.encrypt(nonce, base64.b64decode(data), ad)
            out = base64.b64encode(ct).decode() if parts[0] == "key-manager" else "jwe." + base64.urlsafe_b64encode(ct).decode()
            return 200, {"key_id": key_id, field_out: out}
        raw = base64.b64decode(data) if parts[0] == "key-manager" else base64.urlsafe_b64decode(data[len("jwe."):])
        try:
            pt = key.decrypt(raw[:12], raw[12:], ad)
        except InvalidTag:
            return 400, {"message": "invalid ciphertext or associated data", "errors": ["decryption failed"]}
        return 200, {"key_id": key_id, field_out: base64.b64encode(pt).decode()}


@pytest.fixture()
def fake():
    kms = FakeKms()
    yield kms
    kms.server.shutdown()
    kms.server.server_close()


AD = b"exitplan-keyset|p"


def test_scaleway_requests_and_roundtrip(fake):
    kek = ScalewayKmsKek(KEY_ID, SCW_SECRET, region="nl-ams", api_url=fake.url)
    ct = kek.encrypt(b"keyset bytes", AD)
    path, headers, body = fake.requests[-1]
    assert path == f"/key-manager/v1alpha1/regions/nl-ams/keys/{KEY_ID}/encrypt"
    assert headers["X-Auth-Token"] == SCW_SECRET and headers["Content-Type"] == "application/json"
    assert base64.b64decode(body["plaintext"]) == b"keyset bytes" and base64.b64decode(body["associated_data"]) == AD
    assert kek.decrypt(ct, AD) == b"keyset bytes"
    assert fake.requests[-1][0].endswith("/decrypt")
    with pytest.raises(KekWrongKey, match="does not open"):
        kek.decrypt(ct, b"exitplan-keyset|q")


def test_scaleway_errors(fake):
    with pytest.raises(KekAuthError, match="HTTP 401"):
        ScalewayKmsKek(KEY_ID, "wrong", api_url=fake.url).encrypt(b"x", AD)
    with pytest.raises(KekWrongKey, match="no such key"):
        ScalewayKmsKek("99999999-2222-3333-4444-555555555555", SCW_SECRET, api_url=fake.url).encrypt(b"x", AD)
    fake.force_status = 503
    with pytest.raises(KekUnavailable, match="retry later"):
        ScalewayKmsKek(KEY_ID, SCW_SECRET, api_url=fake.url).encrypt(b"x", AD)
    with pytest.raises(KekUnavailable, match="unreachable"):
        ScalewayKmsKek(KEY_ID, SCW_SECRET, api_url="http://127.0.0.1:1").encrypt(b"x", AD)


def test_scaleway_secret_never_in_messages(fake):
    fake.force_status = 403
    with pytest.raises(KekAuthError) as info:
        ScalewayKmsKek(KEY_ID, SCW_SECRET, api_url=fake.url).encrypt(b"x", AD)
    assert SCW_SECRET not in str(info.value)


def test_scaleway_through_the_factory(fake, monkeypatch):
    monkeypatch.setenv("EP_SCW_SECRET", SCW_SECRET)
    cfg = ScalewayKmsKekConfig(backend="scaleway-kms", key_id=KEY_ID, secret_key_env="EP_SCW_SECRET", api_url=fake.url)
    kek = open_kek(cfg)
    assert kek.decrypt(kek.encrypt(b"k", AD), AD) == b"k"


def test_ovhcloud_requests_and_roundtrip(fake):
    kek = OvhKmsKek(fake.url, OKMS_ID, KEY_ID)
    ct = kek.encrypt(b"keyset bytes", AD)
    path, _, body = fake.requests[-1]
    assert path == f"/api/{OKMS_ID}/v1/servicekey/{KEY_ID}/encrypt"
    assert set(body) == {"plaintext", "context"} and base64.b64decode(body["plaintext"]) == b"keyset bytes"
    assert body["context"] == okms_context(AD) and len(body["context"]) <= 64
    assert ct.startswith(b"jwe.")
    assert kek.decrypt(ct, AD) == b"keyset bytes"
    path, _, body = fake.requests[-1]
    assert path.endswith("/decrypt") and body["ciphertext"] == ct.decode() and body["context"] == okms_context(AD)
    with pytest.raises(KekWrongKey):
        kek.decrypt(ct, b"exitplan-keyset|q")


def test_ovhcloud_long_associated_data_fits_the_context_limit(fake):
    kek = OvhKmsKek(fake.url, OKMS_ID, KEY_ID)
    long_ad = b"exitplan-keyset|" + b"p" * 63
    assert kek.decrypt(kek.encrypt(b"x", long_ad), long_ad) == b"x"
    assert len(fake.requests[-1][2]["context"]) <= 64


def test_ovhcloud_errors(fake):
    with pytest.raises(KekWrongKey, match="no such key"):
        OvhKmsKek(fake.url, OKMS_ID, "99999999-2222-3333-4444-555555555555").encrypt(b"x", AD)
    fake.force_status = 401
    with pytest.raises(KekAuthError, match="HTTP 401"):
        OvhKmsKek(fake.url, OKMS_ID, KEY_ID).encrypt(b"x", AD)
    fake.force_status = 429
    with pytest.raises(KekUnavailable):
        OvhKmsKek(fake.url, OKMS_ID, KEY_ID).encrypt(b"x", AD)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_kms_redirect_is_not_followed(fake, status):
    """The request holds the keyset to wrap and the credentials: sent once, to the configured host."""
    fake.force_status = status
    for kek in (ScalewayKmsKek(KEY_ID, SCW_SECRET, api_url=fake.url),
                OvhKmsKek(fake.url, OKMS_ID, KEY_ID)):
        before = len(fake.requests)
        with pytest.raises(KekError, match=f"redirect \\(HTTP {status}\\) to 127.0.0.1"):
            kek.encrypt(b"keyset bytes", AD)
        assert len(fake.requests) == before + 1


def test_an_openbao_redirect_is_not_followed():
    """hvac hands a 3xx back as an answer; the adapter's session stops it (a standby's redirect
    would carry the token and the keyset to a host the gate never judged)."""
    from connectors.kms.openbao import OpenBaoKek

    seen: list[tuple[str, str]] = []

    class Redirecting(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self):
            seen.append((self.command, self.path))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.2:1{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        kek = OpenBaoKek(f"http://127.0.0.1:{server.server_address[1]}", "exitplan", "bao-token")
        with pytest.raises(KekError, match=r"read answered with a redirect \(HTTP 307\) to 127.0.0.2"):
            kek.encrypt(b"keyset bytes", AD)
        with pytest.raises(KekError, match=r"decrypt answered with a redirect \(HTTP 307\) to 127.0.0.2"):
            kek.decrypt(b"vault:v1:AAAA", AD)
        assert seen == [("GET", "/v1/transit/keys/exitplan"), ("POST", "/v1/transit/decrypt/exitplan")]
    finally:
        server.shutdown()
        server.server_close()
