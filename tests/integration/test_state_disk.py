"""The real CLI with its state directory on a small tmpfs (issue 18, item 7): a disk that fills
during a run, a filesystem remounted read-only, a report written to a full disk. Each is one
sentence naming the path and the cause, no traceback, the exit code of the cause; and a run
after the space is freed ends the migration (nothing lost).

Mounting needs root (the test machines run as root); elsewhere these tests say so and skip."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from azure.storage.blob import BlobServiceClient

from engine.audit import AuditManifest
from engine.state import StateUnwritable
from tests.s3client import lab_s3_client

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BLOBS = 400
BUCKET = "exitplan-state-disk"  # this module's own: the S3 server is shared by the session


def mount_tmpfs(directory: Path, size: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """Mounts tmpfs filesystems under `tmp_path` on request: `small_disk(name, size)`."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        directory = tmp_path / name
        mount_tmpfs(directory, size)
        mounted.append(directory)
        return directory

    yield mount
    for directory in reversed(mounted):
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(directory: Path, keep: int) -> Path:
    """Fill `directory`'s filesystem but for about `keep` bytes; the filler file's path."""
    filler = directory / "filler"
    vfs = os.statvfs(directory)
    with open(filler, "wb") as f:
        f.write(b"\0" * max(vfs.f_bavail * vfs.f_frsize - keep, 0))
    return filler


@pytest.fixture(scope="module")
def bucket(s3_server):
    lab_s3_client(s3_server.url, BUCKET)


@pytest.fixture
def project(tmp_path, small_disk, azurite_connection_string, s3_server, bucket):
    """(config path, state directory on an 8 MiB tmpfs, container, environment)."""
    container = "disk" + uuid.uuid4().hex[:12]
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).create_container(container)
    for i in range(BLOBS):
        cc.upload_blob(f"b/{i:04d}.txt", f"record {i}\n".encode() * 20)
    state = small_disk("state", "8m")
    cfg = {"version": 1, "project": container,
           "sources": {"az": {"kind": "azure_blob", "connection_string_env": "EXITPLAN_TEST_CS"}},
           "destinations": {"lab": {"provider": "lab", "endpoint_url": s3_server.url, "region": "eu-west-3",
                                    "bucket": BUCKET}},
           "datasets": {"d": {"source": "az", "container": container, "destination": "lab",
                              "dest_prefix": f"{container}/"}},
           "transfer": {"concurrency": 8},
           "state": {"path": str(state)},
           "keys": {"kek": {"backend": "local", "path": str(tmp_path / "kek.json")}}}
    path = tmp_path / "exitplan.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = {**os.environ, "EXITPLAN_TEST_CS": azurite_connection_string, "PYTHONPATH": str(REPO)}
    assert exitplan(env, "keys", "init", "--config", str(path))[0] == 0
    return path, state, container, env


def exitplan(env: dict, *argv: str) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-m", "flows.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=600)
    return done.returncode, done.stdout, done.stderr


def the_sentence(err: str) -> str:
    """The one `exitplan:` line of stderr (progress lines aside), with no traceback anywhere."""
    assert "Traceback" not in err and "sqlalchemy" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("exitplan:")]
    assert len(lines) == 1 and len(err.splitlines()) <= 4, err[-3000:]
    return lines[0]


def copies(s3_server, container: str) -> int:
    s3 = lab_s3_client(s3_server.url)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{container}/b/")
    return sum(len(page.get("Contents", [])) for page in pages)


def test_a_disk_that_fills_during_a_run_stops_it_in_one_sentence_and_a_rerun_ends_it(project, s3_server):
    config, state, container, env = project
    filler = fill(state, keep=400 * 1024)

    code, _, err = exitplan(env, "migrate", "--config", str(config))
    assert code == 1
    sentence = the_sentence(err)
    assert f"the state store {state / 'state.db'} cannot be written (the disk is full" in sentence
    assert "free space there" in sentence
    assert 0 < copies(s3_server, container) < BLOBS  # stopped part-way

    filler.unlink()
    code, out, err = exitplan(env, "migrate", "--config", str(config))
    assert code == 0, err[-3000:]
    assert "recorded as interrupted" in out  # the stopped run, as a killed one
    assert copies(s3_server, container) == BLOBS
    code, _, err = exitplan(env, "verify", "--config", str(config))
    assert code == 0, err[-3000:]


def test_a_read_only_state_directory_is_one_sentence_and_exit_2(project, s3_server):
    config, state, container, env = project
    assert exitplan(env, "migrate", "--config", str(config))[0] == 0
    subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)

    for command in ("migrate", "verify"):
        code, _, err = exitplan(env, command, "--config", str(config))
        assert code == 2, (command, err[-3000:])
        sentence = the_sentence(err)
        assert str(state) in sentence and "(its filesystem is read-only)" in sentence, sentence
        assert "remount it read-write" in sentence

    subprocess.run(["mount", "-o", "remount,rw", str(state)], check=True)
    assert exitplan(env, "verify", "--config", str(config))[0] == 0


def test_a_report_written_to_a_full_disk_is_one_sentence_and_leaves_nothing_behind(project, small_disk):
    config, state, container, env = project
    assert exitplan(env, "migrate", "--config", str(config))[0] == 0
    out_dir = small_disk("reports", "64k")
    fill(out_dir, keep=4096)

    code, _, err = exitplan(env, "report", "--config", str(config), "--out", str(out_dir / "report.html"))
    assert code == 1
    sentence = the_sentence(err)
    assert f"the report {out_dir / 'report.html'} cannot be written (the disk is full" in sentence
    assert "`--out`" in sentence
    assert sorted(p.name for p in out_dir.iterdir()) == ["filler"]


def test_an_audit_manifest_on_a_full_disk_is_one_sentence_and_the_next_opening_repairs_it(small_disk):
    directory = small_disk("audit", "64k")
    path = directory / "manifest.jsonl"
    manifest = AuditManifest(path, "p", None)
    fill(directory, keep=0)
    with pytest.raises(StateUnwritable) as caught:
        for i in range(10_000):
            manifest.append({"type": "transfer", "key": f"k{i}", "pad": "x" * 200})
    with contextlib.suppress(StateUnwritable):  # what is still buffered cannot be written either
        manifest.close()
    assert caught.value.exit_code == 1
    assert str(caught.value).startswith(f"the audit manifest {path} cannot be written (the disk is full")

    (directory / "filler").unlink()
    with AuditManifest(path, "p", None) as reopened:  # a torn last line, if any, is cut and recorded
        reopened.append({"type": "transfer", "key": "after"})
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert records[-1]["key"] == "after"


def test_a_disk_that_fills_during_a_verify_stops_it_in_one_sentence_and_a_rerun_ends_it(project):
    config, state, container, env = project
    assert exitplan(env, "migrate", "--config", str(config))[0] == 0
    filler = fill(state, keep=300 * 1024)  # room for the run's start, not for its 400 verdicts

    code, out, err = exitplan(env, "verify", "--config", str(config))
    assert code == 1
    sentence = the_sentence(err)
    assert "cannot be written (the disk is full" in sentence and str(state) in sentence
    assert "objects verified" not in out  # stopped, not summarised

    filler.unlink()
    code, out, err = exitplan(env, "verify", "--config", str(config))
    assert code == 0, err[-3000:]
    assert "recorded as interrupted" in out


def test_keys_init_on_a_full_disk_is_one_sentence_and_leaves_no_short_key_file(tmp_path, small_disk, s3_server, bucket):
    state = small_disk("keys", "64k")
    cfg = {"version": 1, "project": "disk-keys",
           "sources": {"az": {"kind": "azure_blob", "connection_string_env": "EXITPLAN_TEST_CS", "emulator": "azurite"}},
           "destinations": {"lab": {"provider": "lab", "endpoint_url": s3_server.url, "region": "eu-west-3",
                                    "bucket": BUCKET}},
           "datasets": {"d": {"source": "az", "container": "d", "destination": "lab"}},
           "state": {"path": str(state)},
           "keys": {"kek": {"backend": "local"}}}
    config = tmp_path / "exitplan.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "EXITPLAN_TEST_CS"} | {"PYTHONPATH": str(REPO)}
    filler = fill(state, keep=0)

    code, _, err = exitplan(env, "keys", "init", "--config", str(config))
    assert code == 1
    sentence = the_sentence(err)
    assert f"the local KEK file {state / 'kek.key'} cannot be written (the disk is full" in sentence
    assert not (state / "kek.key").exists()  # a short key file would be "a wrong key" ever after

    filler.unlink()
    code, _, err = exitplan(env, "keys", "init", "--config", str(config))
    assert code == 0, err[-3000:]
    assert (state / "kek.key").stat().st_size == 32
