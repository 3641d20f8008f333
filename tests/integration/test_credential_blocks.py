"""Credentials from Prefect blocks, on real servers: Prefect's test harness holds the blocks,
Azurite and the S3 server hold the data, `exitplan migrate` runs in process.

The blocks are real block documents on a real Prefect API: `Secret` blocks saved with Prefect's
own class, and `aws-credentials` / `azure-blob-storage-credentials` documents created through the
Prefect client under the slugs and field names prefect-aws and prefect-azure register (neither
package is installed; exitplan reads the document, not the block class).

Oracles: no environment variable holds the Azurite connection string (only the block does), and a
proxy in front of the S3 server notes the access key id every request was signed with (SigV4's
`Credential=` in the Authorization header): it must be the block's, never the lab's default.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
import yaml

from config.lab import LAB_S3_ACCESS_KEY
from flows.cli import main
from flows import lab_processes as lp
from tests.faultproxy import FaultProxy, _ProxyHandler
from tests.integration.kms_fixtures import start_openbao
from tests.projects import project_name
from tests.s3client import lab_s3_client

pytestmark = pytest.mark.integration

BUCKET = "exitplan-blocks"  # this module's own: each module creates its bucket once


# ---------------------------------------------------------------------------------------------
# Blocks on the harness's Prefect API
# ---------------------------------------------------------------------------------------------

def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def save_secret(name: str, value: str) -> str:
    from prefect.blocks.system import Secret

    Secret(value=value).save(name)
    return f"secret/{name}"


def save_document(slug: str, type_name: str, name: str, data: dict, secret_fields: list[str]) -> str:
    """A block document of type `slug`, created through the Prefect client (type and schema too,
    the first time), as the block's own package would register it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentCreate, BlockSchemaCreate, BlockTypeCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            block_type = client.read_block_type_by_slug(slug)
        except ObjectNotFound:
            block_type = client.create_block_type(BlockTypeCreate(name=type_name, slug=slug))
        schema = client.get_most_recent_block_schema_for_block_type(block_type.id)
        if schema is None:
            fields = {
                "title": type_name.replace(" ", ""), "type": "object",
                "properties": {f: {"title": f, "type": "string"} for f in sorted(set(data) | set(secret_fields))},
                "secret_fields": secret_fields, "block_type_slug": slug, "block_schema_references": {},
            }
            schema = client.create_block_schema(
                BlockSchemaCreate(block_type_id=block_type.id, fields=fields, capabilities=[], version="test")
            )
        client.create_block_document(
            BlockDocumentCreate(name=name, data=data, block_schema_id=schema.id, block_type_id=block_type.id)
        )
    return f"{slug}/{name}"


def save_aws_credentials(name: str, **data) -> str:
    return save_document("aws-credentials", "AWS Credentials", name, data,
                         ["aws_secret_access_key", "aws_session_token"])


def save_azure_credentials(name: str, **data) -> str:
    return save_document("azure-blob-storage-credentials", "Azure Blob Storage Credentials", name, data,
                         ["connection_string"])


# ---------------------------------------------------------------------------------------------
# The lab, and a proxy that notes which key id signed each request
# ---------------------------------------------------------------------------------------------

class SigningProxy(FaultProxy):
    """The tests' reverse proxy, also noting the SigV4 access key id of every request."""

    def start(self) -> "SigningProxy":
        import threading
        from http.server import ThreadingHTTPServer

        proxy = self
        self.key_ids: set[str] = set()

        class Handler(_ProxyHandler):
            owner = proxy

            def _handle(self) -> None:
                m = re.search(r"Credential=([^/,\s]+)/", self.headers.get("Authorization", ""))
                proxy.key_ids.add(m.group(1) if m else "(unsigned)")
                super()._handle()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self


@pytest.fixture(scope="module")
def openbao_server(tmp_path_factory):
    """An OpenBao dev server of this module's own (the shared fixtures belong to test_kek_backends)."""
    server = start_openbao(tmp_path_factory.mktemp("openbao-blocks"), "root-" + uuid.uuid4().hex[:16])
    try:
        yield server
    finally:
        lp.stop_pid(server.pid)


@pytest.fixture(scope="module")
def s3(s3_server):
    return lab_s3_client(s3_server.url, BUCKET)


@pytest.fixture
def proxy(s3, s3_server):
    with SigningProxy("127.0.0.1", s3_server.port) as p:
        yield p


@pytest.fixture
def clean_env(monkeypatch):
    """Nothing in the environment could stand in for a block."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_CONNECTION_STRING",
                "VAULT_TOKEN", "PKCS11_PIN"):
        monkeypatch.delenv(var, raising=False)


def write_config(tmp_path: Path, endpoint: str, source: dict, credentials: dict | None, *,
                 datasets=("claims", "imaging"), prefix: str = "blocks") -> Path:
    dest = {"provider": "lab", "endpoint_url": endpoint, "region": "eu-west-3", "bucket": BUCKET}
    if credentials is not None:
        dest["credentials"] = credentials
    cfg = {
        "version": 1,
        "project": project_name(tmp_path, "blocks"),
        "sources": {"az": {"kind": "azure_blob", **source}},
        "destinations": {"lab": dest},
        "datasets": {c: {"source": "az", "container": c, "destination": "lab", "dest_prefix": f"{prefix}/{c}/"}
                     for c in datasets},
        "transfer": {"concurrency": 4, "part_size": "5MiB", "small_object_cutoff": "4MiB"},
        "state": {"path": str(tmp_path / "state")},
        "keys": {"kek": {"backend": "local", "path": str(tmp_path / "kek.key")}},
    }
    path = tmp_path / "exitplan.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def files_containing(root: Path, *secrets: str) -> list[str]:
    hits = []
    for f in root.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            hits += [f"{f}: {s[:4]}…" for s in secrets if s.encode() in data]
    return hits


def listed(s3, prefix: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


# ---------------------------------------------------------------------------------------------
# Migrations whose credentials come from blocks
# ---------------------------------------------------------------------------------------------

def test_migrate_with_aws_and_azure_credential_blocks(prefect_harness, clean_env, tmp_path, capsys, seeded, proxy, s3,
                                                      azurite_connection_string):
    key_id, secret, token = unique("AKIABLOCK").upper(), uuid.uuid4().hex, uuid.uuid4().hex
    aws = save_aws_credentials(unique("ovh-prod"), aws_access_key_id=key_id, aws_secret_access_key=secret,
                               aws_session_token=token)
    azure = save_azure_credentials(unique("azure-prod"), connection_string=azurite_connection_string)
    prefix = unique("blocks")
    config = write_config(tmp_path, proxy.url, {"connection_string_block": azure}, {"block": aws}, prefix=prefix)

    code, out, err = run(capsys, "keys", "init", "--config", str(config))
    assert code == 0, err
    code, out, err = run(capsys, "migrate", "--config", str(config))
    assert code == 0, err

    expected = {f"{prefix}/{o.container}/{o.name}" for o in seeded if o.container in ("claims", "imaging")}
    assert listed(s3, prefix + "/") == expected
    assert proxy.key_ids == {key_id}, "every request must be signed with the block's key id"
    code, out2, err2 = run(capsys, "verify", "--config", str(config), "--deep")
    assert code == 0, err2
    for text in (out, err, out2, err2):
        assert secret not in text and token not in text and azurite_connection_string not in text
    assert not files_containing(tmp_path, secret, token, azurite_connection_string)


def test_migrate_with_secret_blocks(prefect_harness, clean_env, tmp_path, capsys, seeded, proxy, s3,
                                    azurite_connection_string):
    key_id, secret = unique("AKIASECRET").upper(), uuid.uuid4().hex
    credentials = {
        "access_key_id_block": save_secret(unique("s3-key-id"), key_id),
        "secret_access_key_block": save_secret(unique("s3-secret"), secret),
    }
    source = {"connection_string_block": save_secret(unique("azure-conn"), azurite_connection_string)}
    prefix = unique("secrets")
    config = write_config(tmp_path, proxy.url, source, credentials, datasets=("claims",), prefix=prefix)

    assert run(capsys, "keys", "init", "--config", str(config))[0] == 0
    code, out, err = run(capsys, "migrate", "--config", str(config))
    assert code == 0, err
    expected = {f"{prefix}/claims/{o.name}" for o in seeded if o.container == "claims"}
    assert listed(s3, prefix + "/") == expected
    assert proxy.key_ids == {key_id} and LAB_S3_ACCESS_KEY not in proxy.key_ids
    assert secret not in out + err and azurite_connection_string not in out + err


# ---------------------------------------------------------------------------------------------
# What cannot be read is one sentence, exit 2, naming the field and the block
# ---------------------------------------------------------------------------------------------

def test_missing_destination_block_is_exit_2_and_nothing_is_written(prefect_harness, clean_env, tmp_path, capsys,
                                                                    seeded, proxy, azurite_connection_string):
    source = {"connection_string_block": save_secret(unique("azure-conn"), azurite_connection_string)}
    missing = f"aws-credentials/{unique('nope')}"
    config = write_config(tmp_path, proxy.url, source, {"block": missing})
    assert run(capsys, "keys", "init", "--config", str(config))[0] == 0
    code, out, err = run(capsys, "migrate", "--config", str(config))
    assert code == 2
    assert "destinations.lab.credentials.block" in err and missing in err and "no Prefect block" in err
    assert len(err.strip().splitlines()) == 1
    assert not any(m in ("PUT", "POST") for m, _ in proxy.received), "nothing may be written"


def test_missing_source_block_is_exit_2_when_the_config_loads(prefect_harness, clean_env, tmp_path, capsys, proxy):
    missing = f"secret/{unique('nope')}"
    config = write_config(tmp_path, proxy.url, {"connection_string_block": missing}, None)
    code, out, err = run(capsys, "migrate", "--config", str(config), "--dry-run")
    assert code == 2
    assert "sources.az.connection_string_block" in err and missing in err
    assert proxy.received == []


def test_block_without_the_field_is_exit_2(prefect_harness, clean_env, tmp_path, capsys, seeded, proxy,
                                           azurite_connection_string):
    aws = save_aws_credentials(unique("half"), aws_access_key_id="AKIAHALF")  # no secret access key
    source = {"connection_string_block": save_secret(unique("azure-conn"), azurite_connection_string)}
    config = write_config(tmp_path, proxy.url, source, {"block": aws})
    assert run(capsys, "keys", "init", "--config", str(config))[0] == 0
    code, _, err = run(capsys, "migrate", "--config", str(config))
    assert code == 2
    assert "destinations.lab.credentials.block" in err and aws in err and "aws_secret_access_key" in err


def test_unreachable_prefect_api_is_exit_2(prefect_harness, clean_env, tmp_path, capsys, proxy):
    from prefect.settings import temporary_settings

    config = write_config(tmp_path, proxy.url, {"connection_string_block": "secret/azure-conn"}, None)
    with temporary_settings(updates={"PREFECT_API_URL": f"http://127.0.0.1:{lp.free_port()}/api"}):
        code, _, err = run(capsys, "inventory", "--config", str(config))
    assert code == 2
    assert "sources.az.connection_string_block" in err and "secret/azure-conn" in err and "cannot be reached" in err


def test_env_and_block_for_one_credential_is_exit_2(clean_env, tmp_path, capsys, proxy):
    credentials = {"secret_access_key_env": "S3_SECRET", "secret_access_key_block": "secret/s3-secret"}
    config = write_config(tmp_path, proxy.url, {"connection_string_env": "AZ_CONN", "emulator": "azurite"}, credentials)
    code, _, err = run(capsys, "migrate", "--config", str(config), "--dry-run")
    assert code == 2
    assert "destinations.lab.credentials" in err
    assert "`secret_access_key_env` and `secret_access_key_block` are both set" in err


# ---------------------------------------------------------------------------------------------
# KEK credentials from Secret blocks (OpenBao's token; the PKCS#11 PIN and the Scaleway key take
# the same path, see tests/unit/test_secrets.py)
# ---------------------------------------------------------------------------------------------

def test_openbao_token_from_a_secret_block(prefect_harness, clean_env, openbao_server, tmp_path, capsys, proxy):
    from config.errors import ConfigFileError
    from config.models import OpenBaoKekConfig
    from connectors.kms import open_kek

    ad, data = b"exitplan-test-ad", b"a keyset, say"
    token_block = save_secret(unique("bao-token"), openbao_server.token)
    kek = open_kek(OpenBaoKekConfig(backend="openbao", address=openbao_server.address,
                                    key_name=openbao_server.key_name, token_block=token_block))
    assert kek.decrypt(kek.encrypt(data, ad), ad) == data
    assert kek.token_from == f"the Prefect block {token_block}"

    with pytest.raises(ConfigFileError, match=r"keys\.kek\.token_block.*secret/no-such-token") as info:
        open_kek(OpenBaoKekConfig(backend="openbao", address=openbao_server.address,
                                  key_name=openbao_server.key_name, token_block="secret/no-such-token"))
    assert info.value.exit_code == 2

    # Through the CLI: `keys init` wraps the keyset with the transit key, the token from the block.
    config = write_config(tmp_path, proxy.url, {"connection_string_env": "EP_NO_CONN", "emulator": "azurite"}, None)
    raw = yaml.safe_load(config.read_text())
    raw["keys"] = {"kek": {"backend": "openbao", "address": openbao_server.address,
                           "key_name": openbao_server.key_name, "token_block": token_block}}
    config.write_text(yaml.safe_dump(raw))
    code, out, err = run(capsys, "keys", "init", "--config", str(config))
    assert code == 0, err
    assert openbao_server.token not in out + err
    assert not files_containing(tmp_path, openbao_server.token)
    meta = (tmp_path / "state" / "keyset.meta.json").read_text()
    assert token_block in meta and "token_env" not in meta
