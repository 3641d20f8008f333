"""An SFTP source end to end, on the test's OpenSSH sshd and the lab S3 server: a partner's
delivery directory is migrated encrypted, deep-verified and restored byte for byte; a file changed
at the source is copied again; a source whose host key is not the pinned one is refused before any
byte moves (exit code 2)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from config.errors import ExitCode
from connectors.base import WriteMeta
from engine.restore import SIDECAR
from flows.cli import main
from flows import lab_processes as lp
from tests.contract.test_sftp_specific import _fingerprint as fingerprint_of
from tests.integration.test_encryption_e2e import restored_files
from tests.s3client import lab_s3_client

pytestmark = pytest.mark.integration

BUCKET = "exitplan-sftp"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3(s3_server):
    return lab_s3_client(s3_server.url, BUCKET)


@pytest.fixture
def delivery(sshd, s3_server, s3, tmp_path):
    """A partner delivery on the sshd (nested directories, a non-ASCII name, an empty file, one
    file large enough for parts) and a config reading it over SFTP."""
    top = sshd.root / f"partner-{uuid.uuid4().hex[:10]}"
    files = {
        "2026-11/claims.csv": b"id,amount\n" + b"".join(b"%d,%d\n" % (i, i * 7) for i in range(5000)),
        "2026-11/empty.txt": b"",
        "2026-12/Zürich données.txt": "données de santé\n".encode() * 300,
        "2026-12/scans/big.bin": os.urandom(6 * MiB + 321),
    }
    for key, data in files.items():
        path = top / "deliveries" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def config(known_hosts: Path = sshd.known_hosts) -> Path:
        cfg = {
            "version": 1,
            "project": top.name,
            "sources": {"partner": {
                "kind": "sftp", "host": "127.0.0.1", "port": sshd.port, "username": sshd.username,
                "root": str(top), "known_hosts": str(known_hosts), "private_key_file": str(sshd.user_key),
                "connections": 3,
            }},
            "destinations": {"lab": {"provider": "lab", "endpoint_url": s3_server.url, "region": "eu-west-3",
                                     "bucket": BUCKET}},
            "datasets": {"deliveries": {"source": "partner", "container": "deliveries", "destination": "lab",
                                        "dest_prefix": f"{top.name}/"}},
            "transfer": {"concurrency": 4, "part_size": "5MiB", "small_object_cutoff": "1MiB"},
            "state": {"path": str(tmp_path / "state")},
            "keys": {"kek": {"backend": "local", "path": str(tmp_path / "kek.key")}},
        }
        path = tmp_path / "exitplan.yaml"
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
        return path

    return top, files, config


def _logins(sshd) -> int:
    return (sshd.directory / "sshd.log").read_text().count("Accepted publickey")


def _ssh_children() -> list[int]:
    """This process's `ssh` children still running."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                comm, rest = f.read().split(") ", 1)
        except OSError:
            continue
        state, ppid = rest.split()[:2]
        if comm.endswith("(ssh") and int(ppid) == os.getpid() and state != "Z":
            found.append(int(pid))
    return found


def sftp_destination(sshd, root: Path, port: int | None = None) -> dict:
    """An SFTP destination on the test's sshd: `root` below its root, its host key pinned, the
    test user's key (`port`: another one, where no server answers)."""
    return {"kind": "sftp", "provider": "lab", "region": "lab", "host": "127.0.0.1", "port": port or sshd.port,
            "username": sshd.username, "root": str(root), "known_hosts": str(sshd.known_hosts),
            "private_key_file": str(sshd.user_key)}


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_sftp_to_s3_encrypted_verify_deep_restore(tmp_path, capsys, delivery, s3):
    top, files, config = delivery
    cfg = config()
    assert cli(capsys, "keys", "init", "--config", cfg)[0] == 0

    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err + out
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{top.name}/")["Contents"]
    assert sorted(o["Key"][len(top.name) + 1:] for o in listed) == sorted(files)
    big = s3.head_object(Bucket=BUCKET, Key=f"{top.name}/2026-12/scans/big.bin")
    assert big["Metadata"]["exitplan-format"] == "tink-aes256-gcm-hkdf-1mb"
    assert big["ETag"].strip('"').endswith("-2")  # written in parts
    # Encrypted at rest: no plaintext at the destination.
    body = s3.get_object(Bucket=BUCKET, Key=f"{top.name}/2026-11/claims.csv")["Body"].read()
    assert files["2026-11/claims.csv"][:200] not in body

    code, out, err = cli(capsys, "verify", "--config", cfg, "--deep")
    assert code == 0, err + out

    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "deliveries", "--to", tmp_path / "back")
    assert code == 0, err + out
    back = tmp_path / "back"
    assert restored_files(back) == files

    # The partner re-delivers one file: the next run copies it again, and only it.
    changed = b"id,amount\n1,2\n"
    (top / "deliveries" / "2026-11" / "claims.csv").write_bytes(changed)
    before = {o["Key"]: o["ETag"] for o in listed}
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err + out
    after = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{top.name}/")["Contents"]}
    assert [k for k in after if after[k] != before[k]] == [f"{top.name}/2026-11/claims.csv"]
    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "deliveries", "--to", tmp_path / "again")
    assert code == 0, err + out
    assert (tmp_path / "again" / "2026-11" / "claims.csv").read_bytes() == changed


def test_restore_to_an_sftp_server(tmp_path, capsys, delivery, s3):
    """`restore --to sftp://partner/restored`: the delivery comes back onto the partner's server,
    decrypted and checked (files 0600 in 0700 directories, the properties file beside them, no
    private directory left); a second restore replaces nothing without --overwrite and names every
    file; a symbolic link planted in the target is never written through; an unknown endpoint and
    a hostile directory are exit 2."""
    top, files, config = delivery
    cfg = config()
    assert cli(capsys, "keys", "init", "--config", cfg)[0] == 0
    assert cli(capsys, "migrate", "--config", cfg)[0] == 0

    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "deliveries", "--to",
                         "sftp://partner/restored/2026")
    assert code == 0, err + out
    back = top / "restored" / "2026"
    assert "sftp://127.0.0.1:" in out and "restored/2026" in out
    assert restored_files(back) == files
    assert [p.name for p in back.iterdir() if p.name.startswith(".exitplan-restore-")] == []
    assert (back / "2026-12" / "scans" / "big.bin").stat().st_mode & 0o777 == 0o600
    assert (back / "2026-12" / "scans").stat().st_mode & 0o777 == 0o700

    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "deliveries", "--to",
                         "sftp://partner/restored/2026")
    assert code == ExitCode.FAILED
    assert err.count("exists already") == len(files) + 1  # and the properties file
    assert "restore again with --overwrite" in err
    assert restored_files(back) == files

    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "deliveries", "--to",
                         "sftp://partner/restored/2026", "--overwrite")
    assert code == 0, err + out

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (top / "linked").mkdir()
    (top / "linked" / "2026-11").symlink_to(elsewhere)
    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "deliveries", "--to", "sftp://partner/linked")
    assert code == ExitCode.FAILED
    assert "2026-11 is a symbolic link" in err
    assert list(elsewhere.iterdir()) == []
    assert (top / "linked" / "2026-12" / "Zürich données.txt").read_bytes() == files["2026-12/Zürich données.txt"]

    for to, words in (("sftp://nobody/x", "no SFTP source or destination named 'nobody'"),
                      ("sftp://partner/../escape", "name a directory below"),
                      ("sftp://partner", "never the root itself")):
        code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "deliveries", "--to", to)
        assert code == ExitCode.USAGE and words in err, (to, err)
    assert not (top.parent / "escape").exists()


def test_a_source_whose_host_key_is_not_pinned_is_refused(tmp_path, capsys, delivery, s3):
    top, files, config = delivery
    wrong = tmp_path / "known_hosts"
    wrong.write_text("")
    cfg = config(known_hosts=wrong)
    assert cli(capsys, "keys", "init", "--config", cfg)[0] == 0

    code, out, err = cli(capsys, "migrate", "--config", cfg)

    assert code == ExitCode.USAGE
    assert "host key" in err and "refused" in err
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{top.name}/").get("KeyCount", 0) == 0


def test_a_source_opened_ahead_of_a_refused_destination_is_closed(tmp_path, capsys, delivery, s3):
    """The first dataset's SFTP source logs in while the destinations are checked: when the check
    fails, the run stops on the destination's error, and the source's sessions end with it."""
    top, files, config = delivery
    cfg = yaml.safe_load(config().read_text())
    cfg["destinations"]["lab"]["bucket"] = f"missing-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    assert cli(capsys, "keys", "init", "--config", path)[0] == 0
    running = _ssh_children()

    code, out, err = cli(capsys, "migrate", "--config", path)

    assert code == ExitCode.USAGE and "bucket" in err and "host key" not in err
    assert not [t for t in threading.enumerate() if t.name.startswith("open-ahead")]  # waited for, then closed
    assert _ssh_children() == running


@pytest.mark.parametrize("reachable", [True, False], ids=["reachable", "no-server"])
def test_sftp_servers_opened_ahead_are_closed_when_the_run_cannot_start(tmp_path, capsys, delivery, sshd, reachable):
    """`migrate` starts the SSH logins to its SFTP source and destination before the run checks
    its keys: when the keys stop it (exit 4), that is the error said, even if a server does not
    answer, and the logins made end with the command."""
    top, files, config = delivery
    cfg = yaml.safe_load(config().read_text())
    escrow = sshd.root / f"escrow-{uuid.uuid4().hex[:8]}"
    escrow.mkdir()
    cfg["destinations"] = {"escrow": sftp_destination(sshd, escrow, None if reachable else lp.free_port())}
    cfg["datasets"]["deliveries"]["destination"] = "escrow"
    path = tmp_path / "no-keys.yaml"  # `keys init` never run: no KEK
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    running, logins = _ssh_children(), _logins(sshd)

    code, out, err = cli(capsys, "migrate", "--config", path)

    assert code == ExitCode.KEY_ERROR, err + out
    assert "has no keyset" in err and "connect" not in err.lower()
    assert not [t for t in threading.enumerate() if t.name.startswith("open-ahead")]
    assert _ssh_children() == running
    assert _logins(sshd) - logins == (2 if reachable else 1)  # the source's, and the destination's
    assert not list(escrow.iterdir())

    # Keys there, but another migration of the project holds its lock: the same.
    from config.loader import load_config
    from engine.project import lock_project

    assert cli(capsys, "keys", "init", "--config", path)[0] == 0
    held = lock_project(load_config(path))
    try:
        code, out, err = cli(capsys, "migrate", "--config", path)
    finally:
        held.close()
    assert code != ExitCode.OK and "another migration" in err, err + out
    assert not [t for t in threading.enumerate() if t.name.startswith("open-ahead")]
    assert _ssh_children() == running
    assert not list(escrow.iterdir())


def test_a_kill_mid_file_resumes_the_upload(tmp_path, sshd, s3_server, s3):
    """SIGKILL while a large delivered file is being copied in parts: the next run re-attaches to
    the upload (the file's size and mtime, its change marker, did not move), keeps the parts the
    destination holds and finishes; the object decrypts to the delivered bytes."""
    import signal
    import subprocess
    import sys
    import time
    from urllib.parse import parse_qs, urlsplit

    from tests.faultproxy import FaultProxy
    from tests.integration.test_resume import tink_decrypt

    top = sshd.root / f"killed-{uuid.uuid4().hex[:10]}"
    (top / "in").mkdir(parents=True)
    data = os.urandom(30 * MiB + 77)
    (top / "in" / "archive.tar").write_bytes(data)
    with FaultProxy("127.0.0.1", urlsplit(s3_server.url).port) as proxy:
        proxy.delay_next(0.5, method="PUT", pattern=r"partNumber=", times=10**6)
        cfg = {
            "version": 1, "project": top.name,
            "sources": {"partner": {"kind": "sftp", "host": "127.0.0.1", "port": sshd.port,
                                    "username": sshd.username, "root": str(top),
                                    "known_hosts": str(sshd.known_hosts), "private_key_file": str(sshd.user_key)}},
            "destinations": {"lab": {"provider": "lab", "endpoint_url": proxy.url, "region": "eu-west-3",
                                     "bucket": BUCKET}},
            "datasets": {"in": {"source": "partner", "container": "in", "destination": "lab",
                                "dest_prefix": f"{top.name}/"}},
            "transfer": {"concurrency": 2, "part_size": "5MiB", "small_object_cutoff": "1MiB"},
            "state": {"path": str(tmp_path / "state")},
            "keys": {"kek": {"backend": "local", "path": str(tmp_path / "kek.key")}},
        }
        config = tmp_path / "exitplan.yaml"
        config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        assert main(["keys", "init", "--config", str(config)]) == 0

        def parts_answered() -> list[tuple[str, int]]:
            found = []
            for method, target, status in list(proxy.log):
                query = parse_qs(urlsplit(target).query)
                if method == "PUT" and "partNumber" in query and status == 200:
                    found.append((query["uploadId"][0], int(query["partNumber"][0])))
            return found

        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "migrate", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(parts_answered()) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the migration ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.6)  # what the proxy still held reaches the server
        before = parts_answered()
        [upload_id] = {u for u, _ in before}

        proc = subprocess.run([sys.executable, "-m", "flows.cli", "migrate", "--config", str(config)],
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr

        after = parts_answered()[len(before):]
        # The same upload was continued, and the parts it held were not sent again.
        assert {u for u, _ in after} == {upload_id}
        assert not {n for _, n in before} & {n for _, n in after}
    got = s3.get_object(Bucket=BUCKET, Key=f"{top.name}/archive.tar")
    assert tink_decrypt(config, got["Body"].read(), got["Metadata"]) == data


def test_a_source_logs_in_with_an_ssh_certificate(tmp_path, capsys, delivery, sshd):
    """A key the server does not list, certified by the user CA it trusts: `certificate_file` (or
    `certificate_env`) next to the key logs in; without it the login is refused (exit 2)."""
    import subprocess

    top, files, config = delivery
    key = tmp_path / "certified"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-s", str(sshd.user_ca_key), "-I", "partner", "-n", sshd.username,
                    "-V", "-5m:+1h", f"{key}.pub"], check=True, capture_output=True)
    path = config()
    data = yaml.safe_load(path.read_text())
    data["sources"]["partner"]["private_key_file"] = str(key)
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    code, out, err = cli(capsys, "inventory", "--config", path)
    assert code == ExitCode.USAGE and "refused the login" in err

    data["sources"]["partner"]["certificate_file"] = "certified-cert.pub"  # relative to the config file
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    code, out, err = cli(capsys, "inventory", "--config", path)
    assert code == ExitCode.OK, err
    assert str(len(files)) in out


def test_azure_to_sftp_encrypted_verify_restore(tmp_path, capsys, sshd, azurite_connection_string, monkeypatch):
    """An escrow copy on an SFTP server: Azure blobs (content settings and metadata included) are
    written encrypted below the destination root, published whole under their names; verify (quick
    and deep) is clean, restore gives the bytes back; a file damaged at the destination is named by
    quick verify."""
    import json

    from azure.storage.blob import BlobServiceClient, ContentSettings

    monkeypatch.setenv("EXITPLAN_TEST_AZURE_CS", azurite_connection_string)
    container = f"esc{uuid.uuid4().hex[:10]}"
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).create_container(container)
    blobs = {"a/claims.csv": b"x,y\n" * 10_000, "b/empty": b"", "c/big.bin": os.urandom(11 * MiB + 5),
             "d/Zürich.txt": "grüezi\n".encode()}
    for name, data in blobs.items():
        cc.upload_blob(name, data, content_settings=ContentSettings(content_type="text/csv"),
                       metadata={"owner": "claims-team"})
    escrow = sshd.root / f"escrow-{uuid.uuid4().hex[:8]}"
    escrow.mkdir()
    cfg = {
        "version": 1, "project": container,
        "sources": {"az": {"kind": "azure_blob", "connection_string_env": "EXITPLAN_TEST_AZURE_CS"}},
        "destinations": {"escrow": sftp_destination(sshd, escrow)},
        "datasets": {"claims": {"source": "az", "container": container, "destination": "escrow",
                                "dest_prefix": "claims/"}},
        "transfer": {"concurrency": 4, "part_size": "5MiB", "small_object_cutoff": "1MiB"},
        "state": {"path": str(tmp_path / "state")},
        "keys": {"kek": {"backend": "local", "path": str(tmp_path / "kek.key")}},
    }
    config = tmp_path / "exitplan.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    assert cli(capsys, "keys", "init", "--config", config)[0] == 0

    code, out, err = cli(capsys, "migrate", "--config", config)
    assert code == 0, err + out
    written = {p.relative_to(escrow / "claims").as_posix() for p in (escrow / "claims").rglob("*") if p.is_file()}
    assert written == set(blobs)
    assert blobs["a/claims.csv"][:100] not in (escrow / "claims" / "a" / "claims.csv").read_bytes()
    sidecar = json.loads((escrow / ".exitplan-sftp" / "meta" / "claims" / "c" / "big.bin.json").read_text())
    assert sidecar["metadata"]["exitplan-format"] == "tink-aes256-gcm-hkdf-1mb"
    # the ciphertext is bytes; the source's content type travels in exitplan's metadata
    assert sidecar["metadata"]["owner"] == "claims-team" and sidecar["metadata"]["exitplan-content-type"] == "text/csv"
    assert sidecar["content"]["content_type"] == "application/octet-stream"
    assert any((escrow / "_exitplan").rglob("*keyset*")), "the wrapped keyset is copied next to the data"
    assert not list((escrow / ".exitplan-sftp" / "tmp").iterdir())
    assert not (escrow / ".exitplan-sftp" / "uploads").exists() or not list((escrow / ".exitplan-sftp" / "uploads").iterdir())

    assert cli(capsys, "verify", "--config", config)[0] == 0
    code, out, err = cli(capsys, "verify", "--config", config, "--deep")
    assert code == 0, err + out
    code, out, err = cli(capsys, "restore", "--config", config, "--dataset", "claims", "--to", tmp_path / "back")
    assert code == 0, err + out
    back = tmp_path / "back"
    assert restored_files(back) == blobs

    damaged = escrow / "claims" / "a" / "claims.csv"
    damaged.write_bytes(damaged.read_bytes()[:-1])
    code, out, err = cli(capsys, "verify", "--config", config)
    assert code == ExitCode.FAILED
    assert "a/claims.csv" in out + err

    # An upload a killed run opened before recording it: `cleanup` lists it, `--abort` removes it.
    from config.loader import load_config
    from engine.endpoints import open_sink

    with open_sink(load_config(config), "escrow") as sink:
        orphan = sink.open_multipart("claims/c/orphan.bin", WriteMeta())
        orphan.upload_part(1, b"x" * 100, 100, None, offset=0)
    code, out, err = cli(capsys, "cleanup", "--config", config)
    assert code == 0 and orphan.upload_id in out, err + out
    assert (escrow / ".exitplan-sftp" / "uploads" / orphan.upload_id).exists()
    code, out, err = cli(capsys, "cleanup", "--config", config, "--abort")
    assert code == 0, err + out
    assert not (escrow / ".exitplan-sftp" / "uploads" / orphan.upload_id).exists()

    # Temporary files: one a killed run left two hours ago, one a write in progress would hold.
    # Listed, then removed only with --abort; the recent one is never touched.
    temporary = escrow / ".exitplan-sftp" / "tmp"
    (temporary / "killed-0").write_bytes(b"k" * 1234)
    two_hours_ago = time.time() - 7200
    os.utime(temporary / "killed-0", (two_hours_ago, two_hours_ago))
    (temporary / "writing-1").write_bytes(b"w")
    code, out, err = cli(capsys, "cleanup", "--config", config)
    assert code == 0, err + out
    assert "killed-0" in out and "1,234" in out and "writing-1" not in out and "run again with --abort" in out
    assert (temporary / "killed-0").exists()
    code, out, err = cli(capsys, "cleanup", "--config", config, "--abort")
    assert code == 0, err + out
    assert "removed 1 temporary files (1,234 bytes)" in out
    assert sorted(p.name for p in temporary.iterdir()) == ["writing-1"]


def test_a_source_blob_whose_stored_md5_is_wrong_is_not_published_on_sftp(tmp_path, capsys, sshd,
                                                                        azurite_connection_string, monkeypatch):
    """A plain copy to SFTP: the connector hashes each file as it writes it and checks the source's
    stored MD5 there (the engine does not hash it again). A blob whose bytes do not match its
    Content-MD5 fails by name, with nothing under its name and no temporary file left;
    the others are copied, and the exit code says one failed."""
    from azure.storage.blob import BlobServiceClient, ContentSettings

    monkeypatch.setenv("EXITPLAN_TEST_AZURE_CS", azurite_connection_string)
    container = f"md5{uuid.uuid4().hex[:10]}"
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).create_container(container)
    good, bad = b"id,amount\n" + b"1,2\n" * 5000, b"not what the MD5 says\n" * 100
    cc.upload_blob("good.csv", good)
    cc.upload_blob("bad.csv", bad)
    cc.get_blob_client("bad.csv").set_http_headers(ContentSettings(content_md5=hashlib.md5(b"other").digest()))
    out_dir = sshd.root / f"plain-{uuid.uuid4().hex[:8]}"
    out_dir.mkdir()
    cfg = {
        "version": 1, "project": container,
        "sources": {"az": {"kind": "azure_blob", "connection_string_env": "EXITPLAN_TEST_AZURE_CS"}},
        "destinations": {"files": sftp_destination(sshd, out_dir)},
        "datasets": {"open": {"source": "az", "container": container, "destination": "files", "public": True}},
        "state": {"path": str(tmp_path / "state")},
    }
    config = tmp_path / "exitplan.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    code, out, err = cli(capsys, "migrate", "--config", config)
    assert code == ExitCode.FAILED, err + out
    assert "bad.csv" in err + out and "corrupt or its stored MD5 is wrong" in err + out
    assert (out_dir / "good.csv").read_bytes() == good
    assert not (out_dir / "bad.csv").exists()
    assert not list((out_dir / ".exitplan-sftp" / "tmp").iterdir())


def test_an_sftp_destination_off_the_catalog_is_refused(tmp_path, capsys, sshd):
    cfg = {
        "version": 1, "project": "refused",
        "sources": {"az": {"kind": "azure_blob", "connection_string_env": "EXITPLAN_TEST_AZURE_CS"}},
        "destinations": {"escrow": {"kind": "sftp", "provider": "ovhcloud", "region": "gra", "host": "sftp.example.com",
                                    "username": "u", "root": "/escrow", "known_hosts": str(sshd.known_hosts),
                                    "private_key_env": "KEY"}},
        "datasets": {"claims": {"source": "az", "container": "c", "destination": "escrow"}},
        "keys": {"kek": {"backend": "openbao", "address": "https://bao.example.eu", "key_name": "k"}},
    }
    config = tmp_path / "exitplan.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    code, out, err = cli(capsys, "migrate", "--config", config)
    assert code == ExitCode.REFUSED
    assert "destination `escrow`" in err and "SFTP region `gra`" in err


def test_s3_to_sftp_escrow_encrypted_verify_restore(tmp_path, capsys, sshd, s3_server, s3, monkeypatch):
    """S3 → SFTP: objects of a bucket (read through the S3 source) are written encrypted to an SFTP
    escrow, deep-verified and restored byte for byte; a re-run copies nothing again."""
    from flows import lab_processes as lp

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", lp.LAB_S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", lp.LAB_S3_SECRET_KEY)
    prefix = f"src-{uuid.uuid4().hex[:8]}/"
    objects = {"exports/2026/a.parquet": os.urandom(300_000), "exports/2026/big.bin": os.urandom(7 * MiB + 9),
               "exports/empty": b"", "exports/names with spaces & ü.txt": b"hello\n"}
    for key, data in objects.items():
        s3.put_object(Bucket=BUCKET, Key=prefix + key, Body=data, ContentType="application/octet-stream")
    # An object's content headers, user metadata and tags are carried from an S3 source too.
    s3.put_object(Bucket=BUCKET, Key=prefix + "exports/2026/a.parquet", Body=objects["exports/2026/a.parquet"],
                  ContentType="application/vnd.apache.parquet", CacheControl="no-cache",
                  Metadata={"cohort": "b7"}, Tagging="dept=cardio")
    escrow = sshd.root / f"s3-escrow-{uuid.uuid4().hex[:8]}"
    escrow.mkdir()
    cfg = {
        "version": 1, "project": escrow.name,
        "sources": {"bucket": {"kind": "s3", "endpoint_url": s3_server.url, "region": "eu-west-3"}},
        "destinations": {"escrow": {"kind": "sftp", "provider": "lab", "region": "lab", "host": "127.0.0.1",
                                    "port": sshd.port, "username": sshd.username, "root": str(escrow),
                                    "host_key_fingerprints": [fingerprint_of(f"{sshd.host_key}.pub")],
                                    "private_key_env": "EXITPLAN_TEST_SFTP_KEY"}},
        "datasets": {"exports": {"source": "bucket", "container": BUCKET, "prefix": prefix, "destination": "escrow",
                                 "dest_prefix": "exports/"}},
        "transfer": {"concurrency": 4, "part_size": "5MiB", "small_object_cutoff": "1MiB"},
        "state": {"path": str(tmp_path / "state")},
        "keys": {"kek": {"backend": "local", "path": str(tmp_path / "kek.key")}},
    }
    monkeypatch.setenv("EXITPLAN_TEST_SFTP_KEY", sshd.user_key.read_text())
    config = tmp_path / "exitplan.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    assert cli(capsys, "keys", "init", "--config", config)[0] == 0

    logins, running = _logins(sshd), _ssh_children()
    code, out, err = cli(capsys, "migrate", "--config", config)
    assert code == 0, err + out
    written = {p.relative_to(escrow / "exports").as_posix() for p in (escrow / "exports").rglob("*") if p.is_file()}
    assert written == set(objects)
    # One SFTP store for the whole run (its check, keyset copy, objects and manifest copy): two
    # logins, the host-key check and the connection its sessions share; no `ssh` left after it.
    assert _logins(sshd) - logins == 2
    assert _ssh_children() == running
    assert f"exports -> directory {escrow} on SFTP server 127.0.0.1 at exitplan lab" in out
    code, out, err = cli(capsys, "verify", "--config", config, "--deep")
    assert code == 0, err + out
    code, out, err = cli(capsys, "restore", "--config", config, "--dataset", "exports", "--to", tmp_path / "back")
    assert code == 0, err + out
    back = tmp_path / "back"
    assert restored_files(back) == objects
    properties = {r["path"]: r for r in map(json.loads, (back / SIDECAR).read_text().splitlines())}
    parquet = properties["exports/2026/a.parquet"]
    assert parquet["content"] == {"content_type": "application/vnd.apache.parquet", "cache_control": "no-cache"}
    assert parquet["metadata"] == {"cohort": "b7"} and parquet["tags"] == {"dept": "cardio"}
    stamps = {p: p.stat().st_mtime_ns for p in (escrow / "exports").rglob("*") if p.is_file()}
    code, out, err = cli(capsys, "migrate", "--config", config)
    assert code == 0, err + out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing written again

    # The encrypted escrow read as a source: its files carry exitplan's own metadata, which a
    # migration refuses by name (bring it back with `restore`), never copied as bare ciphertext.
    onward = dict(cfg, project=f"{escrow.name}-onward", state={"path": str(tmp_path / "onward-state")})
    onward["sources"] = {"escrow": {"kind": "sftp", "host": "127.0.0.1", "port": sshd.port,
                                    "username": sshd.username, "root": str(escrow),
                                    "known_hosts": str(sshd.known_hosts), "private_key_env": "EXITPLAN_TEST_SFTP_KEY"}}
    onward["destinations"] = {"lab": {"provider": "lab", "endpoint_url": s3_server.url, "region": "eu-west-3",
                                      "bucket": BUCKET}}
    onward["datasets"] = {"again": {"source": "escrow", "container": "exports", "destination": "lab",
                                    "dest_prefix": f"onward-{escrow.name}/", "public": True}}
    path = tmp_path / "onward.yaml"
    path.write_text(yaml.safe_dump(onward, allow_unicode=True), encoding="utf-8")
    code, out, err = cli(capsys, "migrate", "--config", path)
    assert code == ExitCode.FAILED, err + out
    assert "reserved by exitplan; the object is one exitplan wrote" in err + out and "exitplan restore" in err + out
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=f"onward-{escrow.name}/").get("KeyCount", 0) == 0


def test_an_escrow_exitplan_wrote_is_carried_onward_with_its_metadata(tmp_path, capsys, delivery, s3):
    """A tree exitplan wrote to an SFTP server (the metadata files beside it) read as a source:
    each file's content headers and metadata reach the next destination, as from any source; a
    file changed since its metadata file was written goes bare, as a file a partner delivered."""
    from connectors.base import ContentSettings
    from connectors.sftp import HostKeyPin, SftpLogin, SftpStore
    from flows import lab_processes as lp

    top, _, config = delivery
    cfg = yaml.safe_load(config().read_text())
    src = cfg["sources"]["partner"]
    escrow = top / "deliveries" / "escrow"
    escrow.mkdir()
    with SftpStore(lp.LOOPBACK, src["port"], str(escrow), SftpLogin(src["username"],
                   Path(src["private_key_file"]).read_text()), HostKeyPin(known_hosts=src["known_hosts"])) as writer:
        csv = b"a,b\n1,2\n"
        writer.put("2026/claims.csv", csv, len(csv),
                   WriteMeta(ContentSettings(content_type="text/csv", cache_control="no-cache"), {"cohort": "b7"}), None)
        writer.put("2026/notes.txt", b"x", 1, WriteMeta(ContentSettings(content_type="text/plain"), {"k": "v"}), None)
    (escrow / "2026" / "notes.txt").write_bytes(b"rewritten by hand")
    cfg["datasets"]["deliveries"].update(container="deliveries/escrow", public=True)
    path = tmp_path / "onward.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")

    code, out, err = cli(capsys, "migrate", "--config", path)
    assert code == 0, err + out
    claims = s3.head_object(Bucket=BUCKET, Key=f"{top.name}/2026/claims.csv")
    assert (claims["ContentType"], claims["CacheControl"], claims["Metadata"]["cohort"]) == ("text/csv", "no-cache",
                                                                                            "b7")
    notes = s3.head_object(Bucket=BUCKET, Key=f"{top.name}/2026/notes.txt")
    assert notes["ContentType"] != "text/plain" and "k" not in notes["Metadata"]
