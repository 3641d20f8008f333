"""`exitplan cutover` on the lab servers: the last delta, the deep verify, the source found unchanged,
then a signed `cutover` record that `audit verify` checks and `status` shows; refused, with the
objects named and no record, when the source changed after the delta or an object does not arrive."""

from __future__ import annotations

import json

import pytest

from engine import verify as engine_verify
from engine.cutover import objects_digest
from engine.project import open_state
from config.loader import load_config
from tests.integration.test_completeness import BIG_METADATA, cli, project, s3, status_json  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration


def manifest_records(project) -> list[dict]:
    return [json.loads(line) for line in (project.dir / "state" / "audit" / "manifest.jsonl").read_text().splitlines()]


def audit_verify(capsys, project, cfg) -> tuple[int, str, str]:
    code, out, _ = cli(capsys, "keys", "show", "--config", cfg, "--audit-public-key")
    pem = project.dir / "audit.pem"
    pem.write_text(out)
    return cli(capsys, "audit", "verify", project.dir / "state" / "audit" / "manifest.jsonl", "--public-key", pem)


def test_an_unchanged_dataset_is_cut_over_with_a_signed_record(project, capsys):
    for i in range(5):
        project.cc.upload_blob(f"d/{i}.csv", f"row {i}\n".encode() * (i + 1))
    cfg = project.make()
    capsys.readouterr()
    code, out, err = cli(capsys, "cutover", "--config", cfg, "--dataset", "docs")
    assert code == 0, (out, err)
    assert "docs: 1/3 the last delta" in out and "docs: 3/3 the source listed again" in out
    assert "docs: cut over: 5 objects, the source unchanged since delta run" in out

    (record,) = [r for r in manifest_records(project) if r["type"] == "cutover"]
    assert record["dataset"] == "docs" and record["objects"] == 5 and record["signature"]
    assert record["destination"]["prefix"] == f"{project.container}/" and record["source"]["container"] == project.container
    state = open_state(load_config(cfg))
    try:
        assert record["objects_sha256"] == objects_digest(state.expected_at_destination("docs"))[2]
    finally:
        state.close()
    code, out, err = audit_verify(capsys, project, cfg)
    assert code == 0 and f"cutover of dataset `docs` at {record['time']}: 5 objects" in out, (out, err)

    code, status = status_json(capsys, cfg)
    assert status["cut_over"]["objects"] == 5 and status["cut_over"]["manifest_line"] == record["seq"] + 1
    code, out, _ = cli(capsys, "status", "--config", cfg)
    assert f"signed record at line {record['seq'] + 1} of the audit manifest" in out

    # The record's bytes altered (another object count): the check names its line.
    path = project.dir / "state" / "audit" / "manifest.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[record["seq"]] = lines[record["seq"]].replace('"objects":5', '"objects":6')
    path.write_text("".join(lines))
    code, out, err = audit_verify(capsys, project, cfg)
    assert code == 1 and f"line {record['seq'] + 1}" in out + err, (out, err)


def test_a_source_written_to_after_the_delta_is_not_cut_over(project, capsys, monkeypatch):
    project.cc.upload_blob("a.csv", b"a")
    cfg = project.make()
    capsys.readouterr()
    verify = engine_verify.verify

    def then_a_writer(*args, **kwargs):
        result = verify(*args, **kwargs)
        project.cc.upload_blob("late.csv", b"written after the delta")
        project.cc.upload_blob("a.csv", b"changed", overwrite=True)
        return result

    monkeypatch.setattr(engine_verify, "verify", then_a_writer)
    code, out, err = cli(capsys, "cutover", "--config", cfg, "--dataset", "docs")
    assert code == 1, (out, err)
    assert "the source changed after the last delta: 2 object(s) added or changed since the delta. Stop" in err
    assert "  a.csv: added or changed since the delta" in err and "  late.csv: added or changed" in err
    assert "Stop what writes to it" in err
    assert not [r for r in manifest_records(project) if r["type"] == "cutover"]
    code, status = status_json(capsys, cfg)
    assert status["cut_over"] is None


def test_a_blob_deleted_after_the_delta_is_counted_as_removed(project, capsys, monkeypatch):
    for name in ("a.csv", "b.csv", "c.csv"):
        project.cc.upload_blob(name, name.encode())
    cfg = project.make()
    capsys.readouterr()
    verify = engine_verify.verify

    def then_a_deletion(*args, **kwargs):
        result = verify(*args, **kwargs)
        project.cc.delete_blob("b.csv")
        return result

    monkeypatch.setattr(engine_verify, "verify", then_a_deletion)
    code, out, err = cli(capsys, "cutover", "--config", cfg, "--dataset", "docs")
    assert code == 1 and "the source changed after the last delta: 1 object(s) removed since the delta" in err, err
    assert "  b.csv: removed since the delta" in err and not list((project.dir / "state").glob("cutover-*"))
    assert not [r for r in manifest_records(project) if r["type"] == "cutover"]


def test_an_object_the_delta_cannot_carry_stops_the_cutover_at_the_first_step(project, capsys):
    project.cc.upload_blob("ok.csv", b"fine")
    project.cc.upload_blob("fat.csv", b"x", metadata=BIG_METADATA)
    cfg = project.make()
    capsys.readouterr()
    code, out, err = cli(capsys, "cutover", "--config", cfg, "--dataset", "docs")
    assert code == 1 and "the last delta did not carry every object: 1 failed or refused" in err, (out, err)
    assert "  fat.csv: " in err and "2/3" not in out
    assert not [r for r in manifest_records(project) if r["type"] == "cutover"]
