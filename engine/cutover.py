"""`exitplan cutover`: the last step of a dataset's exit, recorded in the signed audit manifest.

Three checks, in order, each stopping the cutover (exit 1) with the sentence of what failed:

1. **A last delta**: `migrate` of the dataset, every object copied or unchanged (none failed or
   refused).
2. **A deep verify**: every object the dataset must hold read back, decrypted and matched with the
   SHA-256 recorded from the source; the dataset complete.
3. **The source unchanged since**: the source listed again and planned as a migrate would: nothing
   to write (no object added or changed), nothing refused, and as many objects as the dataset must
   hold (fewer: some were removed, found by one more listing: `removed`); each named, up to
   `MAX_NAMED`. A source still being written to cannot be cut over: stop its writers (or make the
   container read-only) first.

Then a `cutover` record is appended to the manifest, signed like a `run_end` (its own signature,
then the run's `run_end` covering it), holding the runs of the delta and the verify, the objects
and bytes the dataset holds and `objects_sha256`, the digest of what they are
(`objects_digest`), and the cutover is kept in the state (`status` shows it).
"""

from __future__ import annotations

import hashlib
import sqlite3
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any, Callable

from config.models import LoadedConfig
from config.policy import destination_profile
from engine import state as st
from engine import verify as engine_verify

from .audit import CUTOVER, RunAudit, audit_signing_key
from .endpoints import close_endpoint, open_source
from .inventory import selected
from .listing import dataset_listing
from .plan import plan
from .private_files import private_directory
from .project import open_state
from .run import migrate

MAX_NAMED = 20  # objects named per kind of change


@dataclass(frozen=True)
class CutoverResult:
    dataset: str
    ok: bool
    step: str  # the step that stopped it ("delta", "verify", "source"), or "recorded"
    sentence: str
    named: tuple[str, ...] = ()  # the objects behind the sentence (first MAX_NAMED)
    record: dict[str, Any] | None = None  # the signed `cutover` record, once written
    notes: tuple[str, ...] = ()  # after the record: what could not be done (the manifest's copy)


def objects_digest(rows) -> tuple[int, int, str]:
    """(objects, bytes, SHA-256 hex) of a dataset's objects at the destination: one line
    `<source key>\\t<source ETag>\\t<size>\\t<plaintext SHA-256>\\n` (UTF-8) per object, in the
    order `StateStore.expected_at_destination` gives them (destination-key byte order)."""
    digest = hashlib.sha256()
    objects = size = 0
    for row in rows:
        digest.update(f"{row.source_key}\t{row.source_etag}\t{row.size}\t{row.sha256}\n".encode("utf-8"))
        objects += 1
        size += row.size
    return objects, size, digest.hexdigest()


def cutover(loaded: LoadedConfig, dataset: str, *, observer, say: Callable[[str], None] = lambda line: None
            ) -> CutoverResult:
    """Cut dataset `dataset` over (see the module docstring). `observer`: the migrate's
    (`engine.run.RunObserver`); `say(line)`: each step as it starts."""
    say(f"{dataset}: 1/3 the last delta (migrate)")
    delta = migrate(loaded, [dataset], observer, count_first=False)
    (copied,) = delta.summaries
    if not delta.all_ok:
        named = tuple(f"{key}: {reason}" for key, reason in copied.failures[:MAX_NAMED])
        return CutoverResult(dataset, False, "delta", f"the last delta did not carry every object: "
                             f"{copied.failed:,} failed or refused; fix them (see `exitplan status`) and run cutover "
                             "again", named)
    say(f"{dataset}: 2/3 a deep verify")
    checked = engine_verify.verify(loaded, [dataset], deep=True)
    (verified,) = checked.datasets
    if not checked.all_ok:
        named = tuple(f"{d.source_key}: {d.kind}: expected {d.expected}, found {d.found}"
                      for d in verified.discrepancies[:MAX_NAMED])
        return CutoverResult(dataset, False, "verify", f"the deep verify did not pass: {verified.status.sentence()}"
                             + (f"; {verified.failed:,} with discrepancies" if verified.failed else ""), named)
    say(f"{dataset}: 3/3 the source listed again, compared with what was copied")
    changed: list[str] = []

    def seen(_dataset: str, planned) -> None:
        if planned.action != "skip" and len(changed) < MAX_NAMED:
            changed.append(f"{planned.source_key}: " + ("added or changed since the delta" if planned.action == "write"
                                                        else planned.reason or "refused"))

    (planned,) = plan(loaded, [dataset], seen)
    expected = verified.status.expected
    problems = []
    if planned.objects:
        problems.append(f"{planned.objects:,} object(s) added or changed since the delta")
    if planned.refused:
        problems.append(f"{planned.refused:,} object(s) now refused")
    # Each object the dataset holds is now skipped (unchanged), written (changed) or refused, or gone;
    # a write may also be a new object, so with writes the count of those gone is a lower bound.
    gone = expected - planned.skipped - planned.objects - planned.refused
    if gone > 0:
        problems.append(f"{'at least ' if planned.objects else ''}{gone:,} object(s) removed since the delta")
        changed += [f"{key}: removed since the delta" for key in removed(loaded, dataset, MAX_NAMED - len(changed))]
    if problems:
        return CutoverResult(dataset, False, "source", "the source changed after the last delta: " + "; ".join(problems)
                             + ". Stop what writes to it (or make the container read-only), then run cutover again",
                             tuple(changed))
    record, notes = _record(loaded, dataset, delta.run_id, checked.run_id)
    return CutoverResult(dataset, True, "recorded", f"cut over: {record['objects']:,} objects, the source unchanged "
                         f"since delta run {delta.run_id} and deep verify run {checked.run_id}; the signed cutover "
                         f"record is line {record['seq'] + 1} of the audit manifest", record=record, notes=tuple(notes))


def removed(loaded: LoadedConfig, dataset: str, limit: int) -> list[str]:
    """The first `limit` source keys of the objects `dataset` holds that a new listing of its
    source no longer has. The listed keys go into a temporary SQLite file in the state directory
    (bounded memory whatever the dataset's size), removed after; only on the path where a cutover
    already found objects missing."""
    if limit <= 0:
        return []
    source = open_source(loaded, dataset)
    ds = loaded.config.datasets[dataset]
    with tempfile.TemporaryDirectory(dir=private_directory(loaded.state_dir), prefix="cutover-") as tmp:
        keys = sqlite3.connect(Path(tmp) / "listed.db")
        try:
            keys.execute("CREATE TABLE listed (key TEXT PRIMARY KEY)")
            listing = (meta.key for meta in selected(dataset_listing(loaded, dataset, source), ds))
            while batch := list(islice(listing, 5000)):
                keys.executemany("INSERT OR IGNORE INTO listed VALUES (?)", ((k,) for k in batch))
            state = open_state(loaded, read_only=True)
            try:
                found: list[str] = []
                for row in state.expected_at_destination(dataset):
                    if keys.execute("SELECT 1 FROM listed WHERE key = ?", (row.source_key,)).fetchone() is None:
                        found.append(row.source_key)
                        if len(found) >= limit:
                            break
                return found
            finally:
                state.close()
        finally:
            keys.close()
            close_endpoint(source, f"dataset `{dataset}`: source")


def _record(loaded: LoadedConfig, dataset: str, delta_run: int, verify_run: int) -> tuple[dict[str, Any], list[str]]:
    """Append the signed `cutover` record in a run of its own, and keep it in the state."""
    ds = loaded.config.datasets[dataset]
    dest = loaded.config.destinations[ds.destination]
    src = loaded.config.sources[ds.source]
    state = open_state(loaded)
    try:
        objects, size, digest = objects_digest(state.expected_at_destination(dataset))
        trail = RunAudit(loaded, "cutover", [dataset], audit_signing_key(loaded, [dataset]), state)
        try:
            profile = destination_profile(loaded, ds.destination)
            record = trail.manifest.append_signed({
                "type": CUTOVER, "run": trail.run_id, "project": loaded.config.project, "dataset": dataset,
                "source": {"kind": src.kind, "name": ds.source, "container": ds.container, "prefix": ds.prefix},
                "destination": {"name": ds.destination, "provider": profile.name,
                                "jurisdiction": profile.jurisdiction, "bucket": dest.bucket,
                                "prefix": ds.dest_prefix},
                "delta_run": delta_run, "verify_run": verify_run, "objects": objects, "bytes": size,
                "objects_sha256": digest,
            }, trail.signing_key)
            state.record_cutover(st.CutoverRecord(trail.run_id, dataset, datetime.now(timezone.utc).replace(tzinfo=None),
                                                  delta_run, verify_run, objects, size, digest, record["seq"]))
            trail.finish("ok", {"objects_total": objects, "bytes_total": size})
        except BaseException:
            trail.abandon()
            raise
        state.finish_run(trail.run_id, "ok")
        _, notes = trail.publish([ds.destination])
        return record, notes
    finally:
        state.close()
