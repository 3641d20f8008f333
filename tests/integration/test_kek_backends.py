"""KEK backends on real servers (local file, OpenBao transit, SoftHSM2) and the keyset lifecycle.

For each backend: wrap/unwrap round trip, associated-data binding, wrong key → KekWrongKey,
unreachable → KekUnavailable, refused credentials → KekAuthError. Then the keyset: init, load,
rotate (old and new keys both decrypt, primary changes), rewrap (local → OpenBao, OpenBao key
version rotation, → PKCS#11) with the data keys unchanged; and no secret in any output.
Tink itself (the independent implementation) opens every keyset we write.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import pytest
import tink
import yaml
from tink import json_proto_keyset_format, streaming_aead

from config.errors import ExitCode
from config.loader import load_config
from config.models import OpenBaoKekConfig, Pkcs11KekConfig
from connectors.kms import KekAuthError, KekUnavailable, KekWrongKey, open_kek
from connectors.kms.local import LocalKek, create_key_file
from connectors.kms.openbao import OpenBaoKek, ciphertext_version
from connectors.kms.pkcs11 import Pkcs11Kek
from connectors.memory import MemoryStore
from engine import key_copies, keys
from flows import lab_processes as lp
from flows.cli import main
from tests.integration.kms_fixtures import *  # noqa: F401,F403  (fixtures)
from tests.integration.kms_fixtures import start_openbao

pytestmark = pytest.mark.integration

AD = b"exitplan-keyset|project-a"
SECRET = os.urandom(48)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def local_kek(tmp_path) -> LocalKek:
    path = tmp_path / "kek.key"
    assert create_key_file(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    return LocalKek(path)


@pytest.fixture()
def bao_kek(openbao) -> OpenBaoKek:
    return OpenBaoKek(openbao.address, openbao.key_name, openbao.token)


@pytest.fixture()
def hsm_kek(softhsm) -> Pkcs11Kek:
    return Pkcs11Kek(softhsm.module, softhsm.token_label, softhsm.key_label, softhsm.pin)


@pytest.fixture(params=["local", "openbao", "pkcs11"])
def kek(request):
    return request.getfixturevalue({"local": "local_kek", "openbao": "bao_kek", "pkcs11": "hsm_kek"}[request.param])


def test_roundtrip_and_fresh_ciphertexts(kek):
    c1, c2 = kek.encrypt(SECRET, AD), kek.encrypt(SECRET, AD)
    assert c1 != c2, "each wrap must use a fresh IV"
    assert SECRET not in c1
    assert kek.decrypt(c1, AD) == SECRET and kek.decrypt(c2, AD) == SECRET
    assert kek.decrypt(kek.encrypt(b"x", b""), b"") == b"x"


def test_associated_data_is_bound(kek):
    ct = kek.encrypt(SECRET, AD)
    for other in (b"exitplan-keyset|project-b", b"", AD + b"x"):
        with pytest.raises(KekWrongKey):
            kek.decrypt(ct, other)


def test_tampered_ciphertext_is_refused(kek):
    ct = bytearray(kek.encrypt(SECRET, AD))
    ct[-3] ^= 0x01
    with pytest.raises(KekWrongKey):
        kek.decrypt(bytes(ct), AD)


def test_describe_names_the_key_not_the_secret(kek, request):
    text = kek.describe()
    backend = request.node.callspec.params["kek"]
    assert backend in text
    if backend == "openbao":
        assert request.getfixturevalue("openbao").token not in text
    if backend == "pkcs11":
        assert request.getfixturevalue("softhsm").pin not in text


def test_local_wrong_key(local_kek, tmp_path):
    other_path = tmp_path / "other.key"
    create_key_file(other_path)
    with pytest.raises(KekWrongKey, match="does not open"):
        LocalKek(other_path).decrypt(local_kek.encrypt(SECRET, AD), AD)


def test_local_unavailable_and_loose_permissions(tmp_path):
    with pytest.raises(KekUnavailable, match="does not exist"):
        LocalKek(tmp_path / "missing.key")
    loose = tmp_path / "loose.key"
    create_key_file(loose)
    loose.chmod(0o644)
    with pytest.raises(KekAuthError, match="chmod 600"):
        LocalKek(loose)


def test_openbao_wrong_key(openbao, bao_kek):
    other = OpenBaoKek(openbao.address, openbao.other_key_name, openbao.token)
    with pytest.raises(KekWrongKey):
        other.decrypt(bao_kek.encrypt(SECRET, AD), AD)


def test_openbao_missing_key_is_not_created(openbao):
    ghost = OpenBaoKek(openbao.address, "no-such-key", openbao.token)
    with pytest.raises(KekWrongKey, match="does not exist"):
        ghost.encrypt(SECRET, AD)
    with pytest.raises(Exception):
        openbao.client().secrets.transit.read_key(name="no-such-key")


def test_openbao_unreachable_wrong_port(openbao):
    dead = OpenBaoKek(f"http://{lp.LOOPBACK}:{lp.free_port()}", openbao.key_name, openbao.token, timeout=3)
    with pytest.raises(KekUnavailable, match="unreachable"):
        dead.encrypt(SECRET, AD)


def test_openbao_stopped_server(tmp_path):
    server = start_openbao(tmp_path, "root-stopped")
    try:
        kek = OpenBaoKek(server.address, server.key_name, server.token, timeout=3)
        ct = kek.encrypt(SECRET, AD)
    finally:
        lp.stop_pid(server.pid)
    with pytest.raises(KekUnavailable):
        kek.decrypt(ct, AD)


def test_openbao_wrong_token(openbao, bao_kek):
    ct = bao_kek.encrypt(SECRET, AD)
    bad = OpenBaoKek(openbao.address, openbao.key_name, "not-the-token")
    with pytest.raises(KekAuthError, match="refused the token"):
        bad.decrypt(ct, AD)
    with pytest.raises(KekAuthError):
        bad.encrypt(SECRET, AD)


def test_openbao_rotation_and_transit_rewrap(openbao, bao_kek):
    ct = bao_kek.encrypt(SECRET, AD)
    before = ciphertext_version(ct)
    after = bao_kek.rotate()
    assert after == before + 1
    new_ct = bao_kek.rewrap(ct)
    assert ciphertext_version(new_ct) == after
    assert bao_kek.decrypt(new_ct, AD) == SECRET and bao_kek.decrypt(ct, AD) == SECRET
    with pytest.raises(KekWrongKey):
        bao_kek.decrypt(new_ct, b"exitplan-keyset|project-b")  # the AD binding survives a rewrap


def test_pkcs11_wrong_key(softhsm, hsm_kek):
    other = Pkcs11Kek(softhsm.module, softhsm.token_label, softhsm.other_key_label, softhsm.pin)
    with pytest.raises(KekWrongKey, match="does not open"):
        other.decrypt(hsm_kek.encrypt(SECRET, AD), AD)
    with pytest.raises(KekWrongKey, match="no AES key labelled"):
        Pkcs11Kek(softhsm.module, softhsm.token_label, "no-such-key", softhsm.pin)


def test_pkcs11_wrong_pin(softhsm):
    with pytest.raises(KekAuthError, match="refused the PIN"):
        Pkcs11Kek(softhsm.module, softhsm.token_label, softhsm.key_label, "0000-wrong")


def test_pkcs11_unavailable(softhsm, tmp_path):
    with pytest.raises(KekUnavailable, match="no PKCS#11 token labelled"):
        Pkcs11Kek(softhsm.module, "no-such-token", softhsm.key_label, softhsm.pin)
    with pytest.raises(KekUnavailable, match="does not exist"):
        Pkcs11Kek(str(tmp_path / "missing.so"), softhsm.token_label, softhsm.key_label, softhsm.pin)


def test_open_kek_reads_credentials_from_the_environment(openbao, softhsm, monkeypatch):
    cfg = OpenBaoKekConfig(backend="openbao", address=openbao.address, key_name=openbao.key_name, token_env="EP_TEST_TOKEN")
    monkeypatch.delenv("EP_TEST_TOKEN", raising=False)
    with pytest.raises(KekAuthError, match="EP_TEST_TOKEN is not set"):
        open_kek(cfg)
    monkeypatch.setenv("EP_TEST_TOKEN", openbao.token)
    kek = open_kek(cfg)
    assert kek.decrypt(kek.encrypt(SECRET, AD), AD) == SECRET
    p11 = Pkcs11KekConfig(backend="pkcs11", module=softhsm.module, token_label=softhsm.token_label,
                          key_label=softhsm.key_label, pin_env="EP_TEST_PIN")
    monkeypatch.setenv("EP_TEST_PIN", softhsm.pin)
    kek = open_kek(p11)
    assert kek.decrypt(kek.encrypt(SECRET, AD), AD) == SECRET


# ---------------------------------------------------------------------------------------------
# The keyset: init, load, rotate, rewrap
# ---------------------------------------------------------------------------------------------

LAB = {
    "version": 1,
    "project": "kms-test",
    "sources": {"azurite": {"kind": "azure_blob", "connection_string_env": "EP_TEST_NO_CONN", "emulator": "azurite"}},
    "destinations": {"lab-s3": {"provider": "lab", "endpoint_url": "http://127.0.0.1:5000", "region": "eu-west-3",
                                "bucket": "exitplan-lab"}},
    "datasets": {"claims": {"source": "azurite", "container": "claims", "destination": "lab-s3"}},
}


def write_config(directory: Path, kek: dict, name: str = "exitplan.yaml", project: str = "kms-test") -> Path:
    data = dict(LAB, project=project, keys={"kek": kek})
    path = directory / name
    path.write_text(yaml.safe_dump(data))
    return path


def bao_cfg(openbao, key_name=None) -> dict:
    return {"backend": "openbao", "address": openbao.address, "key_name": key_name or openbao.key_name}


def hsm_cfg(softhsm) -> dict:
    return {"backend": "pkcs11", "module": softhsm.module, "token_label": softhsm.token_label,
            "key_label": softhsm.key_label, "pin_env": "EP_TEST_PIN"}


def material(dk) -> dict[int, bytes]:
    return {i: k.ikm for i, k in dk.keys.items()}


def tink_roundtrip(handle: tink.KeysetHandle) -> None:
    """Tink's own streaming AEAD encrypts and decrypts with the keyset we stored."""
    primitive = handle.primitive(streaming_aead.StreamingAead)
    out = io.BytesIO()
    with primitive.new_encrypting_stream(_NoClose(out), b"ad") as enc:
        enc.write(b"hello")
    with primitive.new_decrypting_stream(io.BytesIO(out.getvalue()), b"ad") as dec:
        assert dec.read() == b"hello"


class _NoClose(io.BytesIO):
    def __init__(self, target: io.BytesIO):
        super().__init__()
        self._target = target

    def write(self, b):
        return self._target.write(b)

    def close(self):
        pass


@pytest.mark.parametrize("backend", ["local", "openbao", "pkcs11"])
def test_keyset_lifecycle(backend, tmp_path, request, monkeypatch):
    if backend == "openbao":
        kek_cfg = bao_cfg(request.getfixturevalue("openbao"))
    elif backend == "pkcs11":
        hsm = request.getfixturevalue("softhsm")
        monkeypatch.setenv("EP_TEST_PIN", hsm.pin)
        kek_cfg = hsm_cfg(hsm)
    else:
        kek_cfg = {"backend": "local"}
    loaded = load_config(write_config(tmp_path, kek_cfg))
    report = key_copies.init_keys(loaded)
    files = keys.KeyFiles.of(loaded)
    for f in (files.keyset, files.meta, files.audit):
        assert f.exists() and (f.stat().st_mode & 0o777) == 0o600
    assert not list(files.keyset.parent.glob("*.tmp"))
    first = keys.load_data_keys(loaded)
    assert first.primary_id == report.primary_id and len(first.keys) == 1

    # The stored file is stock Tink: Tink opens it with the KEK and the documented AD.
    kek = keys.open_project_kek(loaded)
    handle = json_proto_keyset_format.parse_encrypted(files.keyset.read_text(), kek, b"exitplan-keyset|kms-test")
    tink_roundtrip(handle)

    with pytest.raises(Exception, match="already exists"):
        key_copies.init_keys(loaded)

    rotated = keys.rotate_keys(loaded)
    second = keys.load_data_keys(loaded)
    assert second.primary_id != first.primary_id == [k for k in rotated.keys if not k.primary][0].key_id
    assert set(second.keys) == {first.primary_id, second.primary_id}
    assert second.get(first.primary_id).ikm == first.primary.ikm  # old key still decrypts
    assert all(k.status == "enabled" and k.created for k in rotated.keys)

    # Another project's config cannot open this keyset (the AD binds the project).
    other = load_config(write_config(tmp_path, kek_cfg, name="other.yaml", project="other-project"))
    with pytest.raises(KekWrongKey):
        keys.load_data_keys(other)

    signer = keys.load_audit_signing_key(loaded)
    pem = keys.audit_public_key_pem(loaded)
    from cryptography.hazmat.primitives import serialization

    public = serialization.load_pem_public_key(pem.encode())
    public.verify(signer.sign(b"run end"), b"run end")


def test_rewrap_local_to_openbao_to_pkcs11(openbao, softhsm, tmp_path, monkeypatch):
    monkeypatch.setenv("EP_TEST_PIN", softhsm.pin)
    path = write_config(tmp_path, {"backend": "local"})
    loaded = load_config(path)
    key_copies.init_keys(loaded)
    keys.rotate_keys(loaded)
    before = material(keys.load_data_keys(loaded))
    signer_before = keys.load_audit_signing_key(loaded).sign(b"m")

    # The user edits keys.kek, then runs rewrap: the old KEK comes from keyset.meta.json.
    write_config(tmp_path, bao_cfg(openbao))
    loaded = load_config(path)
    report = keys.rewrap_keys(loaded)
    assert report.verified and "openbao" in report.kek and report.kek_version is not None
    assert material(keys.load_data_keys(loaded)) == before
    assert keys.load_audit_signing_key(loaded).sign(b"m") == signer_before  # Ed25519 is deterministic
    with pytest.raises(KekWrongKey):  # the local KEK no longer opens it
        keys.load_keyset(loaded, LocalKek(tmp_path / ".exitplan" / "kek.key"))

    # KEK version rotation in transit: rewrap inside OpenBao, data keys unchanged.
    version = report.kek_version
    report = keys.rotate_kek(loaded)
    assert report.kek_version == version + 1
    assert material(keys.load_data_keys(loaded)) == before

    # OpenBao -> PKCS#11.
    write_config(tmp_path, hsm_cfg(softhsm))
    loaded = load_config(path)
    report = keys.rewrap_keys(loaded)
    assert "pkcs11" in report.kek and report.kek_version is None
    assert material(keys.load_data_keys(loaded)) == before
    assert keys.load_audit_signing_key(loaded).sign(b"m") == signer_before
    meta = json.loads(keys.KeyFiles.of(loaded).meta.read_text())
    assert meta["kek"] == {**hsm_cfg(softhsm)}
    assert softhsm.pin not in keys.KeyFiles.of(loaded).meta.read_text()


def test_rewrap_with_wrong_old_kek_changes_nothing(openbao, tmp_path):
    path = write_config(tmp_path, bao_cfg(openbao))
    loaded = load_config(path)
    key_copies.init_keys(loaded)
    original = keys.KeyFiles.of(loaded).keyset.read_bytes()
    old = write_config(tmp_path, bao_cfg(openbao, openbao.other_key_name), name="old.yaml")
    write_config(tmp_path, {"backend": "local"})
    loaded = load_config(path)
    with pytest.raises(KekWrongKey):
        keys.rewrap_keys(loaded, keys.resolve_kek(load_config(old)))
    assert keys.KeyFiles.of(loaded).keyset.read_bytes() == original


def test_load_with_unreachable_kek_fails_first(openbao, tmp_path):
    path = write_config(tmp_path, bao_cfg(openbao))
    key_copies.init_keys(load_config(path))
    dead = dict(bao_cfg(openbao), address=f"http://127.0.0.1:{lp.free_port()}")
    write_config(tmp_path, dead)
    with pytest.raises(KekUnavailable):
        keys.load_data_keys(load_config(path))


def test_keyset_copy_next_to_the_data(tmp_path):
    loaded = load_config(write_config(tmp_path, {"backend": "local"}))
    key_copies.init_keys(loaded)
    bucket = MemoryStore(label="mem")
    wrapped = keys.KeyFiles.of(loaded).keyset.read_bytes()
    where = key_copies.publish_copy(loaded, bucket, key_copies.read_keysets(bucket, "kms-test", "lab-s3"), wrapped)
    version = f"_exitplan/kms-test/keysets/{hashlib.sha256(wrapped).hexdigest()}.json"
    assert where == f"mem/{version}"
    assert bucket.data("_exitplan/kms-test/keyset.json") == wrapped == bucket.data(version)
    assert bucket.head(version).metadata == {"exitplan-format": "tink-encrypted-keyset-json"}


# ---------------------------------------------------------------------------------------------
# Nothing secret in the output
# ---------------------------------------------------------------------------------------------


def test_cli_prints_no_secret(openbao, softhsm, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("EP_TEST_PIN", softhsm.pin)
    path = write_config(tmp_path, bao_cfg(openbao))
    outputs = []

    def run(*argv) -> int:
        code = main(list(argv))
        out = capsys.readouterr()
        outputs.append(out.out + out.err)
        return code

    assert run("keys", "init", "--config", str(path)) == ExitCode.OK
    assert run("keys", "rotate", "--config", str(path)) == ExitCode.OK
    assert run("keys", "rotate", "--kek", "--config", str(path)) == ExitCode.OK
    assert run("keys", "show", "--verify", "--format", "json", "--config", str(path)) == ExitCode.OK
    write_config(tmp_path, hsm_cfg(softhsm))
    assert run("keys", "rewrap", "--config", str(path)) == ExitCode.OK
    assert run("keys", "show", "--config", str(path)) == ExitCode.OK
    # Failures: a wrong PIN, a wrong OpenBao token.
    monkeypatch.setenv("EP_TEST_PIN", "9999-" + softhsm.pin[::-1])
    wrong_pin = os.environ["EP_TEST_PIN"]
    assert run("keys", "show", "--verify", "--config", str(path)) == ExitCode.KEY_ERROR
    assert "refused the PIN in $EP_TEST_PIN" in outputs[-1]
    write_config(tmp_path, bao_cfg(openbao))
    monkeypatch.setenv("VAULT_TOKEN", "wrong-" + openbao.token)
    assert run("keys", "rotate", "--config", str(path)) == ExitCode.KEY_ERROR
    assert "Traceback" not in outputs[-1]

    loaded = load_config(path)
    monkeypatch.setenv("EP_TEST_PIN", softhsm.pin)
    write_config(tmp_path, hsm_cfg(softhsm))
    dk = keys.load_data_keys(load_config(path))
    forbidden = [openbao.token, softhsm.pin, softhsm.so_pin, wrong_pin, "wrong-" + openbao.token]
    for k in dk.keys.values():
        forbidden += [k.ikm.hex(), base64.b64encode(k.ikm).decode()]
    text = "\n".join(outputs) + "\n".join(r.getMessage() for r in caplog.records)
    for secret in forbidden:
        assert secret not in text
    assert loaded.config.project in text  # the check above looked at real output
