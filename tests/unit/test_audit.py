"""The audit manifest: canonical form, the hash chain across runs, signatures, and `exitplan audit
verify` saying where a tampered manifest breaks; the README's auditor snippet does the same checks."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from engine.audit import (
    RUN_END,
    AuditManifest,
    ManifestError,
    canonical,
    line_hash,
    signed_payload,
    verify_manifest,
)
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


def test_a_torn_last_line_is_cut_and_the_chain_goes_on(manifest, key):
    good = manifest.read_bytes()
    with open(manifest, "ab") as f:
        f.write(b'{"type":"transfer","seq":12,"pr')  # a write cut by a kill
    one_run(manifest, key, 3, objects=1)
    assert manifest.read_bytes().startswith(good)
    check = verify_manifest(manifest, key.public_key())
    assert check.ok, check.problems
    assert check.records == 12 + 3  # run_start, one transfer, run_end


def test_a_second_writer_is_refused_while_a_run_holds_the_manifest(manifest, key):
    with AuditManifest(manifest, "proj", key.public_key()):
        with pytest.raises(ManifestError, match="another exitplan run"):
            AuditManifest(manifest, "proj", key.public_key())
    AuditManifest(manifest, "proj", key.public_key()).close()  # free again once the first is closed


# ---- tampering: audit verify fails and says where -----------------------------------------------


def test_an_altered_line_is_found_at_the_next_line(manifest, pem, capsys):
    raw = lines(manifest)
    record = json.loads(raw[3])
    record["source"]["size"] = 999_999  # still canonical: only the chain can tell
    raw[3] = canonical(record).encode()
    write_lines(manifest, raw)
    code, out, err = audit_verify(capsys, manifest, pem)
    assert code == 1
    assert "line 5: prev" in err and "line 4 was changed" in err
    assert err.count("  line ") == 1  # one change, one problem: the check re-anchors on the line as found


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
    assert out.strip() == f"manifest OK: 12 records, last record hash {line_hash(lines(manifest)[-1])}"


@pytest.mark.parametrize("tamper, expected", [
    ("alter", "line 5: the chain breaks here"),
    ("drop", "line 5: the chain breaks here"),
    ("reorder", "line 3: the chain breaks here"),
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
