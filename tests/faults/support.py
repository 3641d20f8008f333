"""A project on the lab servers whose exitplan commands run as processes of their own, to be
killed (tests/faults/killpoint.py) and run again: its source container, its configurations (two
local KEKs, for `keys rewrap` there and back), and what the checks at the end read."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from azure.storage.blob import BlobServiceClient, ContainerClient
from tink import streaming_aead

from config.loader import load_config
from engine import keys as project_keys

ROOT = Path(__file__).resolve().parents[2]
CS_VAR = "EXITPLAN_TEST_AZURE_CS"


@dataclass
class Outcome:
    """One command run as a process: its exit code (-9: killed), its output, the runs it created."""

    argv: tuple[str, ...]
    code: int
    out: str
    err: str
    new_runs: tuple[int, ...] = ()

    @property
    def killed(self) -> bool:
        return self.code == -9


@dataclass
class KillableProject:
    tmp_path: Path
    connection_string: str
    s3_url: str
    bucket: str
    container: str = field(default_factory=lambda: f"kill{uuid.uuid4().hex[:10]}")
    kek: str = "a"  # the KEK the keyset is wrapped with now: the configuration commands run with

    def __post_init__(self) -> None:
        self.source: ContainerClient = BlobServiceClient.from_connection_string(
            self.connection_string).create_container(self.container)
        self.blobs: dict[str, bytes] = {}
        for kek in ("a", "b"):
            cfg = {
                "version": 1,
                "project": self.container,  # a project of its own: the bucket is shared by the session
                "sources": {"az": {"kind": "azure_blob", "connection_string_env": CS_VAR}},
                "destinations": {"lab": {"provider": "lab", "endpoint_url": self.s3_url, "region": "eu-west-3",
                                         "bucket": self.bucket}},
                "datasets": {"files": {"source": "az", "container": self.container, "destination": "lab",
                                       "dest_prefix": f"{self.container}/"}},
                "transfer": {"concurrency": 2, "object_concurrency": 2, "part_size": "5MiB",
                             "small_object_cutoff": "1MiB", "part_attempts": 2},
                "state": {"path": str(self.tmp_path / "state")},
                "keys": {"kek": {"backend": "local", "path": str(self.tmp_path / f"kek-{kek}.key")}},
            }
            self.config_path(kek).write_text(yaml.safe_dump(cfg), encoding="utf-8")

    @classmethod
    def with_keys(cls, tmp_path: Path, monkeypatch, connection_string: str, s3_url: str,
                  bucket: str) -> "KillableProject":
        """A new project in `bucket` (created if needed), `keys init` done. The connection string is
        also set here (`monkeypatch`): the checks at the end load the configuration in the test."""
        from botocore.exceptions import ClientError

        from tests.s3client import lab_s3_client

        monkeypatch.setenv(CS_VAR, connection_string)
        try:
            lab_s3_client(s3_url, bucket)
        except ClientError as exc:  # the S3 server is shared by the session: an earlier test made it
            if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        project = cls(tmp_path, connection_string, s3_url, bucket)
        assert project.exitplan("keys init").code == 0
        return project

    # ---- the source ---------------------------------------------------------------------------

    def put_blob(self, name: str, data: bytes) -> None:
        self.source.upload_blob(name, data, overwrite=True)
        self.blobs[name] = data

    # ---- commands -----------------------------------------------------------------------------

    def config_path(self, kek: str | None = None) -> Path:
        return self.tmp_path / f"exitplan-{kek or self.kek}.yaml"

    def config_elsewhere(self) -> Path:
        """The configuration of the current KEK with a new, empty state directory (another host)."""
        cfg = yaml.safe_load(self.config_path().read_text(encoding="utf-8"))
        cfg["state"]["path"] = str(self.tmp_path / "elsewhere")
        path = self.tmp_path / "exitplan-elsewhere.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        return path

    @property
    def state_db(self) -> Path:
        return self.tmp_path / "state" / "state.db"

    @property
    def manifest(self) -> Path:
        return self.tmp_path / "state" / "audit" / "manifest.jsonl"

    def run(self, *argv: str, kill_at: str | None = None, timeout: float = 180) -> Outcome:
        """`exitplan argv...` in a process of its own (killed at `kill_at`, a killpoint moment)."""
        command = ([sys.executable, "-m", "tests.faults.killpoint", kill_at, "--"] if kill_at
                   else [sys.executable, "-m", "flows.cli"])
        before = self.last_run_id()
        env = dict(os.environ, **{CS_VAR: self.connection_string})
        proc = subprocess.run(command + list(argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert "Traceback" not in proc.stderr, proc.stderr
        return Outcome(tuple(argv), proc.returncode, proc.stdout, proc.stderr,
                       tuple(r for r in self.run_ids() if r > before))

    def exitplan(self, command: str, *extra: str, kill_at: str | None = None) -> Outcome:
        """`exitplan <command> --config <the configuration of the current KEK> extra...`."""
        return self.run(*command.split(), "--config", str(self.config_path()), *extra, kill_at=kill_at)

    # ---- what the state and the keyset say -----------------------------------------------------

    def run_ids(self) -> list[int]:
        return [r for r, _c, _s in self.runs()]

    def last_run_id(self) -> int:
        return max(self.run_ids(), default=0)

    def runs(self) -> list[tuple[int, str, str]]:
        """(id, command, status) of every run in the state store."""
        if not self.state_db.exists():
            return []
        con = sqlite3.connect(f"file:{self.state_db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute("SELECT id, command, status FROM runs ORDER BY id").fetchall()
        except sqlite3.OperationalError:  # no runs table yet
            return []
        finally:
            con.close()

    def key_ids(self, state_dir: str = "state", *, versions: bool = False) -> set[int]:
        """The data key ids of keyset.json in `state_dir` (public keysetInfo only); with `versions`,
        also those of every version kept in its `keysets/`."""
        directory = self.tmp_path / state_dir
        files = [directory / "keyset.json", *(sorted((directory / "keysets").glob("*.json")) if versions else [])]
        ids: set[int] = set()
        for path in files:
            if path.exists():
                info = json.loads(path.read_text(encoding="utf-8")).get("keysetInfo", {})
                ids |= {int(k["keyId"]) for k in info.get("keyInfo", [])}
        return ids

    def tink_decrypt(self, data: bytes, metadata: dict) -> bytes:
        """Decrypt an object with stock tink and the project's keyset (the independent oracle)."""
        handle = project_keys.load_keyset(load_config(self.config_path()))
        primitive = handle.primitive(streaming_aead.StreamingAead)
        with primitive.new_decrypting_stream(io.BytesIO(data), metadata["exitplan-associated-data"].encode()) as stream:
            return stream.read()

    def audit_verify(self) -> tuple[int, dict]:
        """`exitplan audit verify --format json` with the project's public key: (exit code, report)."""
        pem = self.tmp_path / "audit-public-key.pem"
        shown = self.exitplan("keys show", "--audit-public-key")
        assert shown.code == 0, shown.err
        pem.write_text(shown.out, encoding="ascii")
        checked = self.run("audit", "verify", str(self.manifest), "--public-key", str(pem), "--format", "json")
        return checked.code, json.loads(checked.out)
