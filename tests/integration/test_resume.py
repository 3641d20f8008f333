"""Resume after SIGKILL, on the lab servers: `exitplan migrate` is run as a subprocess and killed
at seeded random moments, then run again until it finishes.

Every object must end uploaded and decrypt with stock tink to exactly its source; a multipart
upload is continued across kills (its parts are sent once, except those in flight when the
process died); a blob changed between a kill and the resume is detected and copied again under a
new header. The S3 server sits behind the counting fault proxy (tests/faultproxy.py), which sees
every part request, answered or not.
"""

from __future__ import annotations

import io
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from azure.storage.blob import BlobServiceClient
from tink import streaming_aead

from config.loader import load_config
from engine import keys as project_keys
from engine.crypto.tink_format import HEADER_SIZE
from flows.cli import main
from tests.s3client import lab_s3_client
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.integration

CS_VAR = "EXITPLAN_TEST_AZURE_CS"
BUCKET = "exitplan-resume"
MiB = 1024 * 1024
CONCURRENCY = 2
PART_DELAY = 0.8  # seconds each part is held by the proxy: the run is slow enough to be killed mid-object


@pytest.fixture(scope="module")
def s3(s3_server):
    return lab_s3_client(s3_server.url, BUCKET)


@pytest.fixture
def proxy(s3_server):
    host, port = urlsplit(s3_server.url).hostname, urlsplit(s3_server.url).port
    with FaultProxy(host, port) as p:
        p.delay_next(PART_DELAY, method="PUT", pattern=r"partNumber=", times=10**6)
        yield p


@pytest.fixture
def project(tmp_path, monkeypatch, azurite_connection_string, proxy):
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    container = f"res{uuid.uuid4().hex[:10]}"
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).create_container(container)
    cfg = {
        "version": 1,
        "project": container,  # a project of its own: the bucket is shared by the module
        "sources": {"az": {"kind": "azure_blob", "connection_string_env": CS_VAR}},
        "destinations": {"lab": {"provider": "lab", "endpoint_url": proxy.url, "region": "eu-west-3", "bucket": BUCKET}},
        "datasets": {"scans": {"source": "az", "container": container, "destination": "lab",
                               "dest_prefix": f"{container}/"}},
        "transfer": {"concurrency": CONCURRENCY, "object_concurrency": 2, "part_size": "5MiB",
                     "small_object_cutoff": "1MiB", "part_attempts": 2},
        "state": {"path": str(tmp_path / "state")},
        "keys": {"kek": {"backend": "local", "path": str(tmp_path / "kek.key")}},
    }
    path = tmp_path / "exitplan.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["keys", "init", "--config", str(path)]) == 0
    return container, cc, path, tmp_path / "state" / "state.db"


def start_migrate(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "migrate", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))


def wait_for_objects(db: Path, run_no: int, proc: subprocess.Popen, timeout: float = 30.0) -> bool:
    """Wait until run number `run_no` has started copying (a row of its own exists); False if the
    process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if db.exists():
            try:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
                try:
                    row = con.execute("SELECT count(*) FROM objects o JOIN runs r ON o.run_id = r.id "
                                      "WHERE r.id = (SELECT max(id) FROM runs)").fetchone()
                    runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
                finally:
                    con.close()
                if runs >= run_no and row[0] > 0:
                    return True
            except sqlite3.Error:
                pass
        time.sleep(0.02)
    raise AssertionError("the migration did not start copying in time")


def part_requests(proxy: FaultProxy, since: int) -> list[tuple[str, int]]:
    """(upload id, part number) of every part request the proxy received after `since`."""
    out = []
    for method, target in proxy.received[since:]:
        query = parse_qs(urlsplit(target).query)
        if method == "PUT" and "partNumber" in query:
            out.append((query["uploadId"][0], int(query["partNumber"][0])))
    return out


def unanswered_parts(proxy: FaultProxy, received_since: int, log_since: int) -> Counter:
    """Per upload id: part requests received but never answered (in flight when the client died)."""
    received = Counter(part_requests(proxy, received_since))
    answered = Counter()
    for method, target, _status in proxy.log[log_since:]:
        query = parse_qs(urlsplit(target).query)
        if method == "PUT" and "partNumber" in query:
            answered[(query["uploadId"][0], int(query["partNumber"][0]))] += 1
    missing = received - answered
    per_upload: Counter = Counter()
    for (upload_id, _), n in missing.items():
        per_upload[upload_id] += n
    return per_upload


def tink_decrypt(config: Path, data: bytes, metadata: dict) -> bytes:
    handle = project_keys.load_keyset(load_config(config))
    primitive = handle.primitive(streaming_aead.StreamingAead)
    with primitive.new_decrypting_stream(io.BytesIO(data), metadata["exitplan-associated-data"].encode()) as stream:
        return stream.read()


def assert_copied(s3, config: Path, container: str, blobs: dict[str, bytes]) -> None:
    for name, data in blobs.items():
        got = s3.get_object(Bucket=BUCKET, Key=f"{container}/{name}")
        assert tink_decrypt(config, got["Body"].read(), got["Metadata"]) == data, name
    # Every upload the state knows was completed or aborted. Only a kill between
    # CreateMultipartUpload and its record can leave one behind: `cleanup --abort` removes it.
    left = {u["UploadId"] for u in s3.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{container}/").get("Uploads", [])}
    if left:
        assert main(["cleanup", "--config", str(config), "--abort"]) == 0
    assert not s3.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{container}/").get("Uploads")


def finish(config: Path) -> None:
    proc = start_migrate(config)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()


def test_sigkill_at_random_moments_then_resume(project, proxy, s3):
    container, cc, config, db = project
    rng = random.Random(20261129)
    blobs = {f"big-{i}.bin": rng.randbytes(40 * MiB + rng.randrange(MiB)) for i in range(3)}
    blobs.update({f"small/{i:02d}.bin": rng.randbytes(rng.randrange(200_000)) for i in range(8)})
    for name, data in blobs.items():
        cc.upload_blob(name, data)

    kills = 0
    run_no = 0
    in_flight: Counter = Counter()  # upload id -> part requests unanswered when a process died
    while kills < 10:
        run_no += 1
        received_at, log_at = len(proxy.received), len(proxy.log)
        proc = start_migrate(config)
        if not wait_for_objects(db, run_no, proc):
            out, err = proc.communicate()
            assert proc.returncode == 0, err.decode()
            break  # it finished before it could be killed
        time.sleep(rng.uniform(0.1, 1.0))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        kills += 1
        time.sleep(PART_DELAY + 0.1)  # let the proxy forward what it held (the server stores it)
        in_flight.update(unanswered_parts(proxy, received_at, log_at))
    assert kills >= 10, f"only {kills} kills landed before the migration finished; slow it down"
    finish(config)
    assert_copied(s3, config, container, blobs)

    # Each upload's parts were sent once, except those in flight when a process died.
    sent = Counter(part_requests(proxy, 0))
    resent: Counter = Counter()
    for (upload_id, _), n in sent.items():
        resent[upload_id] += n - 1
    completed = {u for u in resent}
    report = {u[:12]: (resent[u], in_flight[u]) for u in completed}
    print(f"\nkills: {kills}; per upload (re-sent parts, parts in flight at kills): {report}")
    for upload_id in completed:
        assert resent[upload_id] <= in_flight[upload_id], report
        assert resent[upload_id] <= CONCURRENCY * kills
    # A big object's upload survived at least one kill and was continued, not restarted.
    con = sqlite3.connect(db)
    continued = con.execute("SELECT source_key, count(DISTINCT run_id) FROM objects WHERE upload_id IS NOT NULL "
                            "GROUP BY source_key, upload_id HAVING count(DISTINCT run_id) > 1").fetchall()
    con.close()
    assert continued, "no upload was continued by a later run"


def test_a_blob_changed_between_kill_and_resume_is_copied_again_under_a_new_header(project, proxy, s3):
    container, cc, config, db = project
    rng = random.Random(7)
    blobs = {"big.bin": rng.randbytes(30 * MiB), "small.bin": b"x" * 1000}
    for name, data in blobs.items():
        cc.upload_blob(name, data)
    proc = start_migrate(config)
    # Kill once the big object's upload is recorded with at least one part.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if db.exists():
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
            try:
                n = con.execute("SELECT count(*) FROM parts p JOIN objects o ON o.id = p.object_id "
                                "WHERE o.source_key = 'big.bin'").fetchone()[0]
            except sqlite3.Error:
                n = 0
            finally:
                con.close()
            if n >= 1:
                break
        assert proc.poll() is None, "the migration ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    con = sqlite3.connect(db)
    upload_id, header = con.execute("SELECT upload_id, header FROM objects WHERE source_key = 'big.bin' "
                                    "ORDER BY id DESC LIMIT 1").fetchone()
    con.close()
    assert upload_id and len(bytes.fromhex(header)) == HEADER_SIZE

    blobs["big.bin"] = rng.randbytes(30 * MiB + 17)
    cc.upload_blob("big.bin", blobs["big.bin"], overwrite=True)
    time.sleep(PART_DELAY + 0.1)
    finish(config)
    assert_copied(s3, config, container, blobs)
    got = s3.get_object(Bucket=BUCKET, Key=f"{container}/big.bin", Range=f"bytes=0-{HEADER_SIZE - 1}")["Body"].read()
    assert got != bytes.fromhex(header), "the changed blob was written under a new header"
    uploads = {u for u, _ in part_requests(proxy, 0)}
    assert upload_id in uploads and len(uploads) == 2, "the old upload was abandoned (aborted), a new one made"


def test_cleanup_lists_uploads_no_state_refers_to_and_aborts_them_only_when_asked(project, s3, capsys):
    from engine import state as st
    from engine.state import StateStore

    container, cc, config, db = project
    orphan = s3.create_multipart_upload(Bucket=BUCKET, Key=f"{container}/orphan.bin")["UploadId"]
    known = s3.create_multipart_upload(Bucket=BUCKET, Key=f"{container}/known.bin")["UploadId"]
    elsewhere = s3.create_multipart_upload(Bucket=BUCKET, Key=f"not-{container}/x.bin")["UploadId"]
    with StateStore(db) as store:  # a killed run's row: its upload is kept for the resume
        run = store.start_run("migrate")
        oid = store.add_object(run, "scans", "known.bin", "e", 10 * MiB, dest_key=f"{container}/known.bin",
                               state=st.IN_PROGRESS)
        store.record_upload(oid, known, bytes([HEADER_SIZE]) + bytes(39), 1)

    def open_ids(prefix: str) -> set[str]:
        return {u["UploadId"] for u in s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])}

    assert main(["cleanup", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert orphan in out and known not in out and elsewhere not in out
    assert "--abort" in out
    assert open_ids(f"{container}/") == {orphan, known}, "listing aborts nothing"

    assert main(["cleanup", "--config", str(config), "--abort"]) == 0
    out = capsys.readouterr().out
    assert orphan in out and "aborted" in out
    assert open_ids(f"{container}/") == {known}
    assert elsewhere in open_ids(f"not-{container}/")
    s3.abort_multipart_upload(Bucket=BUCKET, Key=f"not-{container}/x.bin", UploadId=elsewhere)
    s3.abort_multipart_upload(Bucket=BUCKET, Key=f"{container}/known.bin", UploadId=known)

    assert main(["cleanup", "--config", str(config)]) == 0
    assert "no multipart upload" in capsys.readouterr().out


def test_ctrl_c_mid_run_exits_130_leaves_a_consistent_state_and_the_next_run_completes(project, s3):
    """SIGINT to a running `exitplan migrate` (Ctrl-C): exit 130 with one line, no object starts
    after it, every object the state calls uploaded is at the destination, and the next run
    copies the rest."""
    container, cc, config, db = project
    rng = random.Random(11)
    blobs = {f"big/{i}.bin": rng.randbytes(12 * MiB) for i in range(3)}  # listed first: parts held by the proxy
    blobs.update({f"small/{i:03d}.bin": rng.randbytes(2000) for i in range(60)})
    for name, data in blobs.items():
        cc.upload_blob(name, data)
    # Ctrl-C as a terminal delivers it: SIGINT unblocked and Python's own handler in the child,
    # whatever this test process inherited (a run of the suite in the background starts with
    # SIGINT ignored or blocked, and a child would inherit that).
    proc = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
         "signal.signal(signal.SIGINT, signal.default_int_handler); from flows.cli import main; "
         "sys.exit(main(sys.argv[1:]))", "migrate", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
    assert wait_for_objects(db, 1, proc), "the migration ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert "exitplan: interrupted" in err.decode() and "Traceback" not in err.decode()
    con = sqlite3.connect(db)
    rows = con.execute("SELECT dest_key, state FROM objects").fetchall()
    con.close()
    assert len(rows) < len(blobs), "objects kept starting after the interrupt"
    for key, state in rows:
        if state == "uploaded":
            s3.head_object(Bucket=BUCKET, Key=key)
    finish(config)
    assert_copied(s3, config, container, blobs)
