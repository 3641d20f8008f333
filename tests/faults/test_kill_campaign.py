"""The kill campaign (issue 10): exitplan SIGKILLed at seeded moments across `migrate`, `keys
rotate`, `keys rewrap`, `verify` and the audit manifest's writes, on the lab servers (Azurite,
the S3 server, a local KEK that `keys rewrap` changes there and back).

Each moment is a named call and its n-th occurrence in the process (tests/faults/killpoint.py),
drawn from a seeded generator: the same seed replays the same moments. A killed command is
followed by the next command an operator runs: the same one again, which must then succeed.
Before each migration the source changes (new blobs, one overwritten), so every run has work
and the data keys rotated meanwhile end up in use. At the end, after a last `migrate` and a
deep `verify`:

- every source object is at the destination and decrypts with stock tink to its source bytes;
  nothing else is there (0 lost, 0 corrupted, 0 extra), no multipart upload is left open;
- the keyset opens with the KEK and holds every data key id it ever held, and so do its copies
  next to the data (`keys import` into an empty state directory);
- `audit verify` passes and lists every run a kill interrupted, each recorded by a later run, and
  the state store says `interrupted` for exactly those runs.

Select it with `-m kill_campaign`; `EXITPLAN_KILL_SEED=N` replays another seed. It prints the
seed, every moment and whether it landed.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass

import pytest

from tests.faults.support import KillableProject
from tests.s3client import keys_below, lab_s3_client

pytestmark = [pytest.mark.integration, pytest.mark.kill_campaign]

BUCKET = "exitplan-kill-campaign"
SEED = int(os.environ.get("EXITPLAN_KILL_SEED", "20261207"))
MiB = 1024 * 1024
KILLS_WANTED = 24  # moments that must land (a moment past the end of its command does not)
MAX_MOMENTS = 40


@dataclass(frozen=True)
class Place:
    """Where a kill can land: the command, the call (module:qualname), its occurrences and phases."""

    commands: tuple[str, ...]
    call: str
    occurrences: range
    phases: tuple[str, ...]


PLACES = {
    "migrate": (
        Place(("migrate",), "connectors.s3:S3Store.put", range(1, 5), ("before", "after")),
        Place(("migrate",), "connectors.s3:S3MultipartUpload.upload_part", range(1, 3), ("before", "after")),
        Place(("migrate",), "connectors.s3:S3MultipartUpload.complete", range(1, 2), ("before", "after")),
        Place(("migrate",), "engine.state.store:StateStore.record_parts", range(1, 3), ("after",)),
        # a new keyset version copied next to the data (after a rotation or a rewrap), then keyset.json
        Place(("migrate",), "engine.key_copies:_put", range(1, 3), ("before", "after")),
    ),
    "manifest": (
        Place(("migrate", "verify"), "engine.audit:AuditManifest.append", range(1, 5), ("torn",)),
        Place(("migrate", "verify"), "engine.audit:AuditManifest.append", range(1, 5), ("before", "after")),
        Place(("migrate", "verify"), "engine.audit:AuditManifest.append_signed", range(1, 2), ("torn",)),
        Place(("migrate", "verify"), "engine.audit:AuditManifest.append_signed", range(1, 2), ("before", "after")),
        Place(("migrate",), "engine.state.store:StateStore.mark_audited", range(1, 4), ("before", "after")),
        Place(("migrate", "verify"), "engine.state.store:StateStore.mark_interrupted", range(1, 2), ("before",)),
    ),
    "verify": (
        Place(("verify", "verify --deep"), "engine.verify:_record_state", range(1, 9), ("before", "after")),
    ),
    "keys rotate": (
        Place(("keys rotate",), "engine.keys:keep_version", range(1, 3), ("before", "after")),
        Place(("keys rotate",), "engine.keys:_write_private", range(1, 3), ("before", "after")),
    ),
    "keys rewrap": (
        Place(("keys rewrap",), "engine.keys:keep_version", range(1, 5), ("before", "after")),
        Place(("keys rewrap",), "engine.keys:_write_private", range(1, 4), ("before", "after")),
    ),
}
# How often each kind of moment comes in a round of the schedule (shuffled per round by the seed).
ROUND = ["migrate"] * 2 + ["manifest"] * 2 + ["verify", "keys rotate", "keys rewrap"]


@dataclass
class Moment:
    number: int
    command: str
    point: str
    landed: bool = False
    killed_runs: tuple[int, ...] = ()
    resumed: int | None = None  # the exit code of the command run again after the kill
    seconds: float = 0.0

    def line(self) -> str:
        what = "killed" if self.landed else "not reached (the command ended first)"
        runs = f" in run {', '.join(map(str, self.killed_runs))}" if self.landed and self.killed_runs else ""
        again = f"; again: exit {self.resumed}" if self.resumed is not None else ""
        return f"{self.number:2d}. {self.command:<13} {self.point:<62} {what}{runs}{again} ({self.seconds:.1f} s)"


def schedule(rng: random.Random):
    """Moments, round after round: each round's kinds shuffled; each kind goes through all of its
    places (in a shuffled order) before it repeats one; the command, occurrence and phase drawn."""
    queued: dict[str, list[Place]] = {kind: [] for kind in PLACES}
    while True:
        kinds = ROUND[:]
        rng.shuffle(kinds)
        for kind in kinds:
            if not queued[kind]:
                queued[kind] = rng.sample(PLACES[kind], len(PLACES[kind]))
            place = queued[kind].pop()
            yield (rng.choice(place.commands),
                   f"{place.call}:{rng.choice(place.occurrences)}:{rng.choice(place.phases)}")


@pytest.fixture
def project(tmp_path, monkeypatch, azurite_connection_string, s3_server) -> KillableProject:
    return KillableProject.with_keys(tmp_path, monkeypatch, azurite_connection_string, s3_server.url, BUCKET)


def change_the_source(project: KillableProject, rng: random.Random, round_no: int) -> None:
    """A delta for the next migration: a multipart-sized blob, two small ones, one small one rewritten."""
    project.put_blob(f"scans/{round_no:02d}.bin", rng.randbytes(5 * MiB + rng.randrange(1, 300_000)))
    for i in range(2):
        project.put_blob(f"claims/{round_no:02d}-{i}.csv", rng.randbytes(rng.randrange(1, 40_000)))
    small = sorted(k for k in project.blobs if k.startswith("claims/"))
    project.put_blob(rng.choice(small), rng.randbytes(rng.randrange(1, 40_000)))


def run_command(project: KillableProject, command: str, kill_at: str | None = None):
    """`command` as an operator runs it; `keys rewrap` moves the keyset to the other local KEK."""
    if command == "keys rewrap":
        target = "b" if project.kek == "a" else "a"
        outcome = project.run("keys", "rewrap", "--config", str(project.config_path(target)), kill_at=kill_at)
        if outcome.code == 0:
            project.kek = target
        return outcome
    command, *extra = command.split(" --")
    return project.exitplan(command, *(f"--{e}" for e in extra), kill_at=kill_at)


def test_kill_campaign(project):
    rng = random.Random(SEED)
    began = time.monotonic()
    for i in range(6):
        project.put_blob(f"claims/first-{i}.csv", rng.randbytes(rng.randrange(1, 40_000)))
    project.put_blob("scans/first.bin", rng.randbytes(6 * MiB))
    moments: list[Moment] = []
    key_ids_seen = project.key_ids()  # every data key id keyset.json ever held
    migrated = False
    for command, point in schedule(rng):
        if sum(m.landed for m in moments) >= KILLS_WANTED or len(moments) >= MAX_MOMENTS:
            break
        if command == "migrate" or not migrated:
            change_the_source(project, rng, len(moments))
        if not migrated and command != "migrate":  # nothing to verify yet: the first migration first
            command, point = "migrate", "connectors.s3:S3Store.put:2:after"
        moment = Moment(len(moments) + 1, command, point)
        started = time.monotonic()
        outcome = run_command(project, command, kill_at=point)
        moment.landed, moment.killed_runs = outcome.killed, outcome.new_runs
        if moment.landed:
            key_ids_seen |= project.key_ids()
            outcome = run_command(project, command)  # the operator runs it again
            moment.resumed = outcome.code
        assert outcome.code == 0, f"{moment.line()}\n{outcome.err}"
        migrated = migrated or command == "migrate"
        key_ids_seen |= project.key_ids()
        moment.seconds = time.monotonic() - started
        moments.append(moment)
        print(moment.line(), flush=True)

    final = run_command(project, "migrate")
    assert final.code == 0, final.err
    deep = run_command(project, "verify --deep")
    assert deep.code == 0, deep.out + deep.err
    landed = [m for m in moments if m.landed]
    interrupted = sorted(r for m in landed for r in m.killed_runs)
    print(f"\nkill campaign: seed {SEED} (EXITPLAN_KILL_SEED={SEED} replays it), {len(landed)} kills landed of "
          f"{len(moments)} moments, {len(interrupted)} runs killed, {time.monotonic() - began:.0f} s")

    # Every source object, and nothing else, decrypts with tink to its source bytes.
    s3 = lab_s3_client(project.s3_url)
    prefix = f"{project.container}/"
    assert keys_below(s3, BUCKET, prefix) == set(project.blobs), "objects lost or extra at the destination"
    used_key_ids = set()
    for name, data in project.blobs.items():
        got = s3.get_object(Bucket=BUCKET, Key=prefix + name)
        assert project.tink_decrypt(got["Body"].read(), got["Metadata"]) == data, f"{name} is corrupted"
        used_key_ids.add(int(got["Metadata"]["exitplan-key-id"]))
    left = s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])
    if left:  # a kill between opening an upload and recording it: what `cleanup --abort` is for
        assert project.exitplan("cleanup", "--abort").code == 0
    assert not s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads")

    # The keyset opens and holds every key id it ever had, and so do its copies next to the data
    # (imported into an empty state directory); the objects use several of the keys. A version kept
    # by a rotation killed before keyset.json was replaced holds a key that never encrypted
    # anything (the rotation run again makes another): counted, and never used by an object.
    shown = project.exitplan("keys show", "--verify")
    assert shown.code == 0, shown.err
    current = project.key_ids()
    assert key_ids_seen <= current and used_key_ids <= current
    assert len(used_key_ids) > 1, "the rotations happened between migrations: objects under several keys"
    imported = project.run("keys", "import", "--config", str(project.config_elsewhere()))
    assert imported.code == 0, imported.err
    assert project.key_ids("elsewhere") == current
    never_current = project.key_ids(versions=True) - current
    assert not never_current & used_key_ids
    versions = len(list((project.tmp_path / "state" / "keysets").glob("*.json")))
    print(f"objects: {len(project.blobs)} at the destination, each decrypted with tink to its source bytes; "
          f"keyset: {len(current)} data keys (objects under {len(used_key_ids)}), {versions} versions kept, "
          f"{len(never_current)} key{'s' if len(never_current) != 1 else ''} only in a version a killed rotation kept")

    # The manifest passes and names every run a kill interrupted before its run_end line was whole
    # (a kill after it, while the manifest was copied next to the data, interrupted no run); each
    # is recorded by a later run. The state agrees: those rows say interrupted, except those of
    # runs killed while writing their run_end, which had closed their row first (it says how their
    # work ended); no row is left running.
    code, report = project.audit_verify()
    assert code == 0 and report["ok"], report["problems"]
    ended = {json.loads(line)["run"] for line in project.manifest.read_bytes().splitlines()
             if b'"type":"run_end"' in line}
    interrupted = sorted(set(interrupted) - ended)
    listed = {r["run"]: r for r in report["runs_without_end"]}
    assert sorted(listed) == interrupted
    assert all(r["recorded_by"] for r in listed.values()), [r for r in listed.values() if not r["recorded_by"]]
    statuses = {run: status for run, _command, status in project.runs()}
    at_run_end = {r for m in landed if ":AuditManifest.append_signed:" in m.point for r in m.killed_runs} - ended
    assert {r: statuses[r] for r in interrupted} == {r: "interrupted" if r not in at_run_end else statuses[r]
                                                    for r in interrupted}
    assert all(statuses[r] in ("ok", "failed") for r in at_run_end)
    assert sorted(r for r, s in statuses.items() if s == "interrupted") == sorted(set(interrupted) - at_run_end)
    assert "running" not in statuses.values()
    print(f"audit verify: OK, {len(listed)} runs without a run_end listed ({', '.join(map(str, listed))}), "
          f"{len(report['repairs'])} repairs; state: {len(set(interrupted) - at_run_end)} runs interrupted")
    torn = [m for m in landed if m.point.endswith(":torn")]
    assert len(report["repairs"]) >= len([m for m in torn if m.killed_runs]) > 0
    assert len(landed) >= 20
