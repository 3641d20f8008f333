"""The audit manifest: canonical form, the hash chain across runs, signatures, and `exitplan audit
verify` saying where a tampered manifest breaks; the README's auditor snippet does the same checks."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from engine.audit import (
    RUN_END,
    AuditManifest,
    ManifestError,
    RunAudit,
    canonical,
    line_hash,
    signed_payload,
    verify_manifest,
)
from engine.state import StateStore
from flows.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def pem(tmp_path, key) -> Path:
    path = tmp_path / "audit-public-key.pem"
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def one_run(path: Path, key: Ed25519PrivateKey, run: int, objects: int = 3) -> None:
    with AuditManifest(path, "proj", key.public_key()) as m:
        m.append({"type": "run_start", "run": run, "command": "migrate"})
        for i in range(objects):
            m.append({"type": "transfer", "run": run, "source": {"key": f"dossier {i} é.csv", "size": 10 * i},
                      "plaintext_sha256": f"{i:064x}"})
        m.append_signed({"type": RUN_END, "run": run, "status": "ok", "totals": {"objects_ok": objects}}, key)


@pytest.fixture
def manifest(tmp_path, key) -> Path:
    """Two runs, the second appended after the manifest was closed and reopened: 12 lines."""
    path = tmp_path / "audit" / "manifest.jsonl"
    one_run(path, key, 1)
    one_run(path, key, 2, objects=4)
    return path


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, new: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in new))


def audit_verify(capsys, manifest: Path, pem: Path) -> tuple[int, str, str]:
    code = main(["audit", "verify", str(manifest), "--public-key", str(pem)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# ---- canonical form and the chain -------------------------------------------------------------


def test_canonical_form_is_sorted_compact_utf8_and_stable():
    record = {"b": 1, "a": "données é 日本", "c": [1, {"z": None, "y": True}], "d": "tab\there\nnewline"}
    text = canonical(record)
    assert text == '{"a":"données é 日本","b":1,"c":[1,{"y":true,"z":null}],"d":"tab\\there\\nnewline"}'
    assert canonical(json.loads(text)) == text  # a round trip changes nothing
    assert "\n" not in text  # one record, one line, whatever its strings hold


def test_the_chain_holds_across_runs_and_signatures_verify(manifest, key, pem, capsys):
    raw = lines(manifest)
    records = [json.loads(line) for line in raw]
    assert [r["type"] for r in records] == (["chain_start", "run_start"] + ["transfer"] * 3 + ["run_end", "run_start"]
                                            + ["transfer"] * 4 + ["run_end"])
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert records[0]["prev"] is None
    for previous, line, record in zip(raw, raw[1:], records[1:]):
        assert record["prev"] == line_hash(previous)
        assert canonical(record).encode() == line
    for end in (r for r in records if r["type"] == "run_end"):
        key.public_key().verify(base64.b64decode(end["signature"]), signed_payload(end))
    check = verify_manifest(manifest, key.public_key())
    assert check.ok and check.records == 12 and check.runs_signed == 2 and check.last_hash == line_hash(raw[-1])
    code, out, err = audit_verify(capsys, manifest, pem)
    assert code == 0 and "OK: 12 records" in out and line_hash(raw[-1]) in out


def test_concurrent_appends_keep_one_chain(tmp_path, key):
    path = tmp_path / "m.jsonl"
    with AuditManifest(path, "proj", key.public_key()) as m:
        def worker(t: int) -> None:
            for i in range(200):
                m.append({"type": "verify", "worker": t, "i": i})

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m.append_signed({"type": RUN_END, "run": 1}, key)
    check = verify_manifest(path, key.public_key())
    assert check.ok, check.problems
    assert check.records == 1 + 8 * 200 + 1


def test_a_torn_last_line_is_cut_recorded_and_the_chain_goes_on(manifest, key, pem, capsys):
    good = manifest.read_bytes()
    fragment = b'{"type":"transfer","seq":12,"pr'  # a write cut by a kill
    with open(manifest, "ab") as f:
        f.write(fragment)
    one_run(manifest, key, 3, objects=1)
    assert manifest.read_bytes().startswith(good)
    check = verify_manifest(manifest, key.public_key())
    assert check.ok, check.problems
    assert check.records == 12 + 1 + 3  # the repair, then run_start, one transfer, run_end
    repair = json.loads(lines(manifest)[12])
    assert repair["type"] == "repair" and repair["action"] == "cut"
    assert repair["cut_bytes"] == len(fragment) and repair["cut_sha256"] == hashlib.sha256(fragment).hexdigest()
    assert [r.line for r in check.repairs] == [13]
    code, out, err = audit_verify(capsys, manifest, pem)
    assert code == 0 and f"line 13: a torn last line of {len(fragment)} bytes" in out
    assert hashlib.sha256(fragment).hexdigest() in out


def test_a_signed_record_without_its_newline_is_completed_never_deleted(manifest, key, pem, capsys):
    """Issue 18 item 9: the last signed run_end without its trailing newline is a complete record:
    the next opening adds the newline (and records that it did); the record stays."""
    raw = lines(manifest)
    manifest.write_bytes(manifest.read_bytes()[:-1])
    one_run(manifest, key, 3, objects=1)
    after = lines(manifest)
    assert after[:12] == raw, "the signed run_end was kept as it was"
    repair = json.loads(after[12])
    assert repair["type"] == "repair" and repair["action"] == "newline_added" and repair["line_seq"] == 11
    check = verify_manifest(manifest, key.public_key())
    assert check.ok, check.problems
    assert check.runs_signed == 3 and check.counts["run_end"] == 3
    code, out, err = audit_verify(capsys, manifest, pem)
    assert code == 0 and "line 13: line 12 was a complete record without its newline" in out


def test_a_torn_first_line_gives_a_new_chain_start_then_its_repair(tmp_path, key):
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b'{"audit_public_key_sha256":"ab')
    one_run(path, key, 1, objects=1)
    records = [json.loads(line) for line in lines(path)]
    assert [r["type"] for r in records] == ["chain_start", "repair", "run_start", "transfer", "run_end"]
    assert records[1]["cut_bytes"] == len(b'{"audit_public_key_sha256":"ab')
    assert verify_manifest(path, key.public_key()).ok


def test_a_kill_during_the_repair_leaves_a_torn_line_that_the_next_opening_records(manifest, key):
    """The repair record overwrites the torn line in one write, then the file is cut after it;
    killed between the two, the rest of the old fragment is a new torn line: cut and recorded too."""
    fragment = b'{"type":"transfer","seq":12,"source":{"key":"' + b"x" * 500
    with open(manifest, "ab") as f:
        f.write(fragment)
    AuditManifest(manifest, "proj", key.public_key()).close()  # writes the repair record over it
    leftover = fragment[-100:]  # what a kill before the cut leaves after the repair line
    with open(manifest, "ab") as f:
        f.write(leftover)
    one_run(manifest, key, 3, objects=1)
    check = verify_manifest(manifest, key.public_key())
    assert check.ok, check.problems
    assert [r.line for r in check.repairs] == [13, 14]
    assert json.loads(lines(manifest)[13])["cut_sha256"] == hashlib.sha256(leftover).hexdigest()


def test_a_second_writer_is_refused_while_a_run_holds_the_manifest(manifest, key):
    with AuditManifest(manifest, "proj", key.public_key()):
        with pytest.raises(ManifestError, match="another exitplan run"):
            AuditManifest(manifest, "proj", key.public_key())
    AuditManifest(manifest, "proj", key.public_key()).close()  # free again once the first is closed


# ---- runs that started and never ended ----------------------------------------------------------


def project(tmp_path: Path) -> SimpleNamespace:
    """What the run trail reads of a loaded configuration."""
    return SimpleNamespace(state_dir=tmp_path / "state", path=tmp_path / "exitplan.yaml",
                           config=SimpleNamespace(project="proj"))


def killed_run(tmp_path: Path, store: StateStore, key, command: str = "migrate") -> int:
    """A run that wrote its start and a record, then died (its lock released, no run_end)."""
    trail = RunAudit(project(tmp_path), command, ["d"], key, store, exclusive=command == "migrate")
    trail.append({"type": "transfer", "run": trail.run_id, "source": {"key": "a.csv"}})
    trail.manifest.close()
    return trail.run_id


def ending_run(tmp_path: Path, store: StateStore, key, command: str = "migrate") -> RunAudit:
    trail = RunAudit(project(tmp_path), command, ["d"], key, store, exclusive=command == "migrate")
    trail.finish("ok", {"objects_ok": 0})
    store.finish_run(trail.run_id, "ok")
    return trail


def test_killed_runs_are_recorded_by_the_next_run_and_listed_by_audit_verify(tmp_path, key, pem, capsys):
    store = StateStore(tmp_path / "state.db")
    first = ending_run(tmp_path, store, key).run_id
    killed = [killed_run(tmp_path, store, key) for _ in range(3)]
    last = ending_run(tmp_path, store, key)
    assert last.interrupted and [u.run for u in last.interrupted] == killed
    assert {store.get_run(r).status for r in killed} == {"interrupted"}
    assert store.get_run(first).status == "ok" and store.get_run(last.run_id).status == "ok"
    path = tmp_path / "state" / "audit" / "manifest.jsonl"
    records = [json.loads(line) for line in lines(path)]
    recorded = [r for r in records if r["type"] == "run_interrupted" and r["recorded_in_run"] == last.run_id]
    assert [r["run"] for r in recorded] == killed
    for r in recorded:  # each names its run's run_start and its last line
        assert records[r["first_seq"]]["type"] == "run_start" and records[r["first_seq"]]["run"] == r["run"]
        assert records[r["last_seq"] + 1]["type"] == "run_start"
    check = verify_manifest(path, key.public_key())
    assert check.ok, check.problems
    assert [r.run for r in check.runs_without_end] == killed
    assert all(last.run_id in [run for run, _line in r.recorded_by] for r in check.runs_without_end)
    code, out, err = audit_verify(capsys, path, pem)
    assert code == 0 and "runs without a run_end (interrupted): 3" in out
    for r in check.runs_without_end:
        assert f"  run {r.run} (migrate, started {r.started}): lines {r.first_line}-{r.last_line}; recorded as " \
               f"interrupted by" in out and f"run {last.run_id} (line " in out
    code = main(["audit", "verify", str(path), "--public-key", str(pem), "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and [r["run"] for r in report["runs_without_end"]] == killed
    assert all(last.run_id in [b["run"] for b in r["recorded_by"]] for r in report["runs_without_end"])


def test_the_last_run_without_an_end_fails_audit_verify_and_is_listed_as_not_recorded(tmp_path, key, pem, capsys):
    store = StateStore(tmp_path / "state.db")
    ending_run(tmp_path, store, key)
    killed = killed_run(tmp_path, store, key, "verify")
    path = tmp_path / "state" / "audit" / "manifest.jsonl"
    code, out, err = audit_verify(capsys, path, pem)
    assert code == 1 and "lines 4-5 are not covered by a signed run_end" in err
    assert f"run {killed} (verify" in out and "no later run recorded it" in out


def test_a_run_held_as_running_in_the_state_without_lines_is_recorded_by_the_next_run(tmp_path, key):
    """A run killed between its row and its run_start line: with a SQLite state (in the manifest's
    state directory) the next run, whatever its command, records it."""
    store = StateStore(tmp_path / "state.db")
    ending_run(tmp_path, store, key)
    stranded = store.start_run("verify")
    next_run = ending_run(tmp_path, store, key, "verify")
    assert [(u.run, u.command, u.first_seq) for u in next_run.interrupted] == [(stranded, "verify", None)]
    assert store.get_run(stranded).status == "interrupted"
    check = verify_manifest(tmp_path / "state" / "audit" / "manifest.jsonl", key.public_key())
    assert check.ok, check.problems
    [run] = check.runs_without_end
    assert run.run == stranded and run.first_line is None and run.recorded_by[0][0] == next_run.run_id
    assert "no line of its own after the last run_end" in run.sentence()


def test_runs_killed_before_this_version_recorded_interruptions_are_recorded_by_the_first_run(tmp_path, key):
    """A manifest from before: two runs killed, then a run that ended (its run_end follows them), the
    killed rows still running in the state. The next run records them; audit verify matches each
    record to its run_start."""
    store = StateStore(tmp_path / "state.db")
    path = tmp_path / "state" / "audit" / "manifest.jsonl"
    old = []
    with AuditManifest(path, "proj", key.public_key()) as m:
        for _ in range(2):
            old.append(store.start_run("migrate"))
            m.append({"type": "run_start", "run": old[-1], "command": "migrate"})
            m.append({"type": "transfer", "run": old[-1]})
        ended = store.start_run("migrate")
        m.append({"type": "run_start", "run": ended, "command": "migrate"})
        m.append_signed({"type": RUN_END, "run": ended, "status": "ok"}, key)
        store.finish_run(ended, "ok")
    trail = ending_run(tmp_path, store, key, "verify")
    assert [(u.run, u.first_seq) for u in trail.interrupted] == [(old[0], None), (old[1], None)]
    check = verify_manifest(path, key.public_key())
    assert check.ok, check.problems
    assert [(r.run, r.first_line, r.last_line) for r in check.runs_without_end] == [(old[0], 2, 3), (old[1], 4, 5)]
    assert all(r.recorded_by and r.recorded_by[0][0] == trail.run_id for r in check.runs_without_end)
    assert {store.get_run(r).status for r in old} == {"interrupted"}


def test_with_a_shared_state_database_only_a_migrate_records_rows_left_running(tmp_path, key, monkeypatch):
    """A state database other hosts use: a verify cannot tell a dead row from another host's run and
    leaves it alone; a migrate holds the project's lock, so the migrate rows left running are dead."""
    store = StateStore(tmp_path / "state.db")
    monkeypatch.setattr(StateStore, "shared", property(lambda self: True))
    ending_run(tmp_path, store, key)
    stranded_migrate, elsewhere_verify = store.start_run("migrate"), store.start_run("verify")
    verify_run = ending_run(tmp_path, store, key, "verify")
    assert not verify_run.interrupted and store.get_run(stranded_migrate).status == "running"
    migrate_run = ending_run(tmp_path, store, key)
    assert [(u.run, u.first_seq) for u in migrate_run.interrupted] == [(stranded_migrate, None)]
    assert store.get_run(stranded_migrate).status == "interrupted"
    assert store.get_run(elsewhere_verify).status == "running"


def test_a_run_refused_the_manifest_leaves_no_run_row(tmp_path, key):
    """Another run holds the manifest: the refused run must not leave a row that says running forever."""
    store = StateStore(tmp_path / "state.db")
    holder = RunAudit(project(tmp_path), "migrate", ["d"], key, store, exclusive=True)
    with pytest.raises(ManifestError, match="another exitplan run"):
        RunAudit(project(tmp_path), "verify", ["d"], key, store)
    assert [r.id for r in store.running_runs("verify")] == []
    holder.finish("ok", {})


def test_unfinished_runs_reads_back_only_to_the_last_run_end(manifest, key):
    with AuditManifest(manifest, "proj", key.public_key()) as m:
        m.append({"type": "run_start", "run": 3, "command": "migrate"})
        m.append({"type": "transfer", "run": 3})
    with AuditManifest(manifest, "proj", key.public_key()) as m:
        m.append({"type": "run_start", "run": 4, "command": "verify"})
    with open(manifest, "ab") as f:
        f.write(b'{"type":"verify","run":4,"se')  # torn: cut (and recorded) by the next opening
    with AuditManifest(manifest, "proj", key.public_key()) as m:
        found = m.unfinished_runs()
        assert [(u.run, u.command, u.first_seq, u.last_seq) for u in found] == [(3, "migrate", 12, 13),
                                                                                 (4, "verify", 14, 14)]
        m.append_signed({"type": RUN_END, "run": 5}, key)
    with AuditManifest(manifest, "proj", key.public_key()) as m:
        assert m.unfinished_runs() == []


# ---- tampering: audit verify fails and says where -----------------------------------------------


def test_an_altered_line_is_named_first_as_the_line_changed(manifest, pem, capsys):
    raw = lines(manifest)
    record = json.loads(raw[3])
    record["source"]["size"] = 999_999  # still canonical: only the chain can tell
    raw[3] = canonical(record).encode()
    write_lines(manifest, raw)
    code, out, err = audit_verify(capsys, manifest, pem)
    assert code == 1
    problems = [line for line in err.splitlines() if line.startswith("  line ")]
    assert problems[0].startswith("  line 4 was changed: line 5 records another hash for it"), err
    assert len(problems) == 1  # one change, one problem: the check re-anchors on the line as found


def test_an_altered_run_end_is_named_at_its_own_line_first(manifest, pem, capsys):
    raw = lines(manifest)
    record = json.loads(raw[5])
    record["totals"]["objects_ok"] = 30
    raw[5] = canonical(record).encode()
    write_lines(manifest, raw)
    code, out, err = audit_verify(capsys, manifest, pem)
    problems = [line for line in err.splitlines() if line.startswith("  line ")]
    assert code == 1 and all(p.startswith("  line 6") for p in problems) and len(problems) == 2, err
    assert any("line 6 was changed: line 7 records another hash" in p for p in problems)


def test_an_edit_that_breaks_canonical_form_is_named(manifest, pem, capsys):
    raw = lines(manifest)
    raw[2] = raw[2].replace(b'","', b'", "', 1)
    write_lines(manifest, raw)
    code, out, err = audit_verify(capsys, manifest, pem)
    assert code == 1 and "line 3: not in canonical form" in err


def test_a_dropped_line_is_found(manifest, pem, capsys):
    raw = lines(manifest)
    del raw[4]
    write_lines(manifest, raw)
    code, out, err = audit_verify(capsys, manifest, pem)
    assert code == 1
    assert "line 5: seq is 5, expected 4" in err and "line 5: prev" in err


def test_reordered_lines_are_found(manifest, pem, capsys):
    raw = lines(manifest)
    raw[2], raw[3] = raw[3], raw[2]
    write_lines(manifest, raw)
    code, out, err = audit_verify(capsys, manifest, pem)
    assert code == 1
    assert "line 3: seq is 3, expected 2" in err and "line 4: seq is 2, expected 3" in err


def test_a_flipped_signature_is_found(manifest, pem, capsys):
    raw = lines(manifest)
    record = json.loads(raw[5])
    assert record["type"] == "run_end"
    sig = bytearray(base64.b64decode(record["signature"]))
    sig[10] ^= 0x01
    record["signature"] = base64.b64encode(bytes(sig)).decode()
    raw[5] = canonical(record).encode()
    write_lines(manifest, raw)
    code, out, err = audit_verify(capsys, manifest, pem)
    assert code == 1
    assert "line 6: the run_end signature does not verify" in err


def test_a_cut_end_is_not_covered_by_a_signature(manifest, pem, capsys):
    raw = lines(manifest)
    write_lines(manifest, raw[:-1])  # the last run_end removed
    code, out, err = audit_verify(capsys, manifest, pem)
    assert code == 1 and "lines 7-11 are not covered by a signed run_end" in err


def test_another_key_does_not_verify(manifest, tmp_path, capsys):
    other = tmp_path / "other.pem"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    code, out, err = audit_verify(capsys, manifest, other)
    assert code == 1 and "line 6: the run_end signature does not verify" in err and "line 12:" in err


def test_usage_errors_are_exit_2_without_traceback(manifest, tmp_path, capsys):
    assert audit_verify(capsys, tmp_path / "nope.jsonl", manifest)[0] == 2
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    code, out, err = audit_verify(capsys, manifest, bad)
    assert code == 2 and "not an Ed25519 public key" in err


# ---- the README's snippet for auditors -----------------------------------------------------------


def readme_snippet() -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
              if "load_pem_public_key" in b]
    assert len(blocks) == 1
    return blocks[0]


def run_snippet(directory: Path, monkeypatch) -> str:
    monkeypatch.chdir(directory)
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(readme_snippet(), str(README), "exec"), {})
    return out.getvalue()


def test_the_readme_snippet_checks_a_manifest_with_standard_tools(manifest, pem, monkeypatch):
    snippet = readme_snippet()
    assert "import exitplan" not in snippet and "from engine" not in snippet and len(snippet.splitlines()) <= 30
    (manifest.parent / "audit-public-key.pem").write_bytes(pem.read_bytes())
    out = run_snippet(manifest.parent, monkeypatch)
    assert out.splitlines() == [f"manifest OK: 12 records, last record hash {line_hash(lines(manifest)[-1])}",
                                "runs that started and never ended: none"]


def test_the_readme_snippet_lists_interrupted_runs(tmp_path, key, pem, monkeypatch):
    store = StateStore(tmp_path / "state.db")
    killed = [killed_run(tmp_path, store, key) for _ in range(2)]
    ending_run(tmp_path, store, key)
    path = tmp_path / "state" / "audit" / "manifest.jsonl"
    (path.parent / "audit-public-key.pem").write_bytes(pem.read_bytes())
    out = run_snippet(path.parent, monkeypatch)
    assert out.splitlines()[1] == f"runs that started and never ended: {killed}"


@pytest.mark.parametrize("tamper, expected", [
    ("alter", "line 4 was changed: line 5 records another hash for it"),
    ("drop", "line 5: lines were removed, inserted or moved before it"),
    ("reorder", "line 3: lines were removed, inserted or moved before it"),
    ("noncanonical", "line 3 is not in canonical form"),
    ("cut", "lines 7-11 are not covered"),
    ("torn", "does not end with a newline"),
])
def test_the_readme_snippet_finds_tampering(manifest, pem, monkeypatch, tamper, expected):
    (manifest.parent / "audit-public-key.pem").write_bytes(pem.read_bytes())
    raw = lines(manifest)
    if tamper == "alter":
        record = json.loads(raw[3])
        record["plaintext_sha256"] = "0" * 64
        raw[3] = canonical(record).encode()
    elif tamper == "drop":
        del raw[4]
    elif tamper == "reorder":
        raw[2], raw[3] = raw[3], raw[2]
    elif tamper == "noncanonical":
        raw[2] = raw[2].replace(b":", b": ", 1)
    elif tamper == "cut":
        raw = raw[:-1]
    write_lines(manifest, raw)
    if tamper == "torn":
        manifest.write_bytes(manifest.read_bytes()[:-5])
    with pytest.raises(SystemExit, match=re.escape(expected)):
        run_snippet(manifest.parent, monkeypatch)


def test_the_readme_snippet_rejects_a_flipped_signature(manifest, pem, monkeypatch):
    (manifest.parent / "audit-public-key.pem").write_bytes(pem.read_bytes())
    raw = lines(manifest)
    record = json.loads(raw[-1])
    sig = bytearray(base64.b64decode(record["signature"]))
    sig[0] ^= 0x80
    record["signature"] = base64.b64encode(bytes(sig)).decode()
    raw[-1] = canonical(record).encode()
    write_lines(manifest, raw)
    with pytest.raises(InvalidSignature):
        run_snippet(manifest.parent, monkeypatch)
