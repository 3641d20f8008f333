"""Verify: prove that the destination holds what the state store says was copied (ARCHITECTURE §6.3).

It never reads the source again. What each dataset is expected to hold comes from the state
store (`StateStore.expected_at_destination`): per source key, the newest row that says a version
is at the destination (uploaded or verified, or failed by an earlier verify: a discrepancy stays
named until `migrate` copies the object again), with its destination key and ETag, its output
size and its plaintext SHA-256.

**Quick** (default): the dataset's destination prefix is listed (ListObjectsV2: size and ETag for
1,000 keys a request) and merged with the expected rows, both in key order (UTF-8 byte order,
S3's listing order), so memory stays bounded by the page size whatever the dataset's size. Then:
missing at the destination, size differs from the output size, ETag differs from the one the
upload returned (not where the provider's ETags are opaque, `multipart.etag: opaque`: an ETag
there proves nothing about the bytes, the output says so, and only a deep check proves them). An encrypted object also gets one HEAD, because its exitplan metadata must match
too: format, key id (known to the project's keyset), associated data (bound to this dataset and
source key: `check_place`), plaintext size (= the state's) and the ciphertext size it implies.

**Deep** (`deep=True`): quick, and for each sampled object (all of them unless `sample` < 1) the
object is read back, decrypted (segments authenticated, the end marker checked) and its plaintext
SHA-256 compared with the digest taken from the source stream when it was copied. The sample is a
deterministic function of (seed, dataset, source key): the same seed picks the same objects, in
any order and at any concurrency.

Outcomes: an object that passes moves to `verified` (`StateStore.transition`; its copy's finish
time is kept). A definite discrepancy (missing, size, ETag, metadata, decryption, digest) moves it
to `failed` with a reason starting ``verify:``, so that the next `migrate` copies it again, and it
keeps being checked (and named) until then. An object that could not be checked (the destination
did not answer) is named, but its state is left as it was. Objects under the prefix that the state
does not know are counted (not a discrepancy: exitplan may not have written them). Each object
checked gets a `verify` record in the audit manifest; the run ends with a signed `run_end`.

Completeness: checking the copies the state claims says nothing of the objects that never
arrived. After the check, each dataset's status (`StateStore.dataset_status`, the one definition of
"complete" shared with restore, status and the flows) counts every object the dataset's newest
complete source listing holds: verified, copied but not verified (not checkable now), failed,
pending, never attempted. A dataset is complete when every one of them is verified and no newer
migrate run stopped part-way through its listing; verify exits 1 until then, naming the objects.

Concurrency: `transfer.concurrency` checks at once (HEAD and reads), at most twice that many
queued. Memory: a deep check holds at most `READ_SIZE` of ciphertext plus one segment of
plaintext per worker (about 5 MiB; 40 MiB with the default 8 workers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from config.errors import ExitCode, UserError
from config.models import LoadedConfig
from config.policy import destination_profile
from connectors.base import ConnectorError, NotFound, ObjectMeta, ObjectReader

from . import state as st
from .audit import VERIFY, RunAudit, audit_signing_key
from .crypto.tink_format import SEGMENT_SIZE, FormatError, decrypt_object, key_for, read_object_metadata
from .endpoints import DestinationSinks
from .errors import call_endpoint
from .executors import BoundedTasks, create_pool
from .placement import CONTROL_PREFIX
from .project import open_state

log = logging.getLogger(__name__)

READ_SIZE = 4 * SEGMENT_SIZE  # ciphertext per read request in a deep check: whole segments


class VerifyError(UserError):
    """Verify cannot start (no state yet) or the destination cannot be listed."""


@dataclass(frozen=True)
class Discrepancy:
    """One thing wrong with one object: what was expected, what was found."""

    dataset: str
    source_key: str
    dest_key: str
    kind: str  # missing, size, etag, storage class, metadata, key, place, decrypt, sha256, unreadable
    expected: str
    found: str

    @property
    def definite(self) -> bool:
        """A finding about the object (not a failure to look at it)."""
        return self.kind != "unreadable"

    def sentence(self) -> str:
        return f"{self.dest_key} (source {self.source_key!r}): {self.kind}: expected {self.expected}, found {self.found}"


@dataclass(frozen=True)
class CheckedObject:
    dataset: str
    source_key: str
    dest_key: str
    checks: tuple[str, ...]  # listing, metadata, plaintext_sha256
    problems: tuple[Discrepancy, ...]
    plaintext_sha256: str | None = None  # recomputed (deep)
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class DatasetVerification:
    dataset: str
    mode: str
    objects: int  # objects checked (the state's expected rows)
    ok: int
    failed: int
    deep_checked: int  # objects read back and decrypted
    bytes_read: int
    unknown: int  # objects under the prefix the state does not know
    unknown_examples: tuple[str, ...]
    discrepancies: tuple[Discrepancy, ...]  # the first `max_reported`
    discrepancies_truncated: bool
    elapsed_seconds: float
    # Whether the dataset is complete after this check: every object its newest complete source
    # listing holds is at the destination and verified (`StateStore.dataset_status`).
    status: st.DatasetStatus | None = None
    # The destination's ETags are opaque (`multipart.etag: opaque`): they were not compared, and
    # only a deep check proves the bytes.
    etags_opaque: bool = False

    @property
    def complete(self) -> bool:
        return self.status is not None and self.status.complete

    @property
    def all_ok(self) -> bool:
        """No discrepancy, and every object the dataset must hold is verified."""
        return self.failed == 0 and self.complete


@dataclass(frozen=True)
class VerifyResult:
    run_id: int
    mode: str
    sample: float
    seed: int | None
    datasets: tuple[DatasetVerification, ...]
    elapsed_seconds: float
    audit: Any = None  # engine.audit.AuditOutcome

    @property
    def all_ok(self) -> bool:
        return all(d.all_ok for d in self.datasets)


@dataclass(frozen=True)
class VerifyProgress:
    dataset: str
    checked: int
    total: int
    failed: int
    bytes_read: int


class VerifyObserver(Protocol):
    def dataset_started(self, dataset: str, objects: int) -> None: ...
    def progress(self, snapshot: VerifyProgress) -> None: ...
    def dataset_finished(self, summary: DatasetVerification) -> None: ...


def in_sample(seed: int, dataset: str, source_key: str, fraction: float) -> bool:
    """Whether an object is in the seeded sample: a hash of (seed, dataset, key) below `fraction`
    of the 64-bit range. Deterministic, order-free, no memory."""
    if fraction >= 1.0:
        return True
    h = hashlib.sha256(f"{seed}\x00{dataset}\x00{source_key}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") < fraction * 2**64


# ---------------------------------------------------------------------------------------------
# Checking one object
# ---------------------------------------------------------------------------------------------


class _Checker:
    def __init__(self, dataset: str, sink: ObjectReader, *, encrypted: bool, known_key_ids: frozenset[int] | None,
                 keys: Any, deep: bool, sample: float, seed: int, etags_opaque: bool = False):
        self.dataset = dataset
        self.etags_opaque = etags_opaque
        self.sink = sink
        self.encrypted = encrypted
        self.known_key_ids = known_key_ids
        self.keys = keys
        self.deep = deep
        self.sample = sample
        self.seed = seed

    def check(self, row: st.ObjectRecord, listed: ObjectMeta | None) -> CheckedObject:
        problems: list[Discrepancy] = []
        checks = ["listing"]

        def bad(kind: str, expected: Any, found: Any) -> None:
            problems.append(Discrepancy(self.dataset, row.source_key, row.dest_key or "", kind, str(expected), str(found)))

        def done(**kw) -> CheckedObject:
            return CheckedObject(self.dataset, row.source_key, row.dest_key or "", tuple(checks), tuple(problems), **kw)

        if listed is None:
            bad("missing", f"an object of {row.output_size:,} bytes with ETag {row.dest_etag}", "no such object")
            return done()
        if row.output_size is not None and listed.size != row.output_size:
            bad("size", f"{row.output_size:,} bytes", f"{listed.size:,} bytes")
        if row.dest_etag and listed.etag != row.dest_etag and not self.etags_opaque:
            bad("etag", row.dest_etag, listed.etag)
        if row.storage_class and listed.tier and listed.tier != row.storage_class:
            bad("storage class", f"storage class {row.storage_class}", f"storage class {listed.tier}")
        info = None
        try:
            if self.encrypted:
                checks.append("metadata")
                head = self.sink.head(row.dest_key)
                try:
                    info = read_object_metadata(head.metadata, what="the object")
                except FormatError as exc:
                    bad("metadata", "exitplan's encrypted-object metadata", str(exc))
                if info is not None:
                    try:
                        info.check_place(self.dataset, row.source_key)
                    except FormatError as exc:
                        bad("place", f"associated data for dataset {self.dataset!r} and this source key", str(exc))
                    if info.plaintext_size != row.size:
                        bad("metadata", f"exitplan-plaintext-size {row.size}", f"exitplan-plaintext-size {info.plaintext_size}")
                    elif row.output_size is not None and info.ciphertext_size != row.output_size:
                        bad("metadata", f"a ciphertext of {row.output_size:,} bytes",
                            f"metadata implying {info.ciphertext_size:,} bytes")
                    if self.known_key_ids is not None and info.key_id not in self.known_key_ids:
                        bad("key", "a key id of the project's keyset",
                            f"key id {info.key_id} (not in this state directory's keyset: `exitplan keys import` brings "
                            "the keys of the project's keyset copies next to the data)")
            if self.deep and in_sample(self.seed, self.dataset, row.source_key, self.sample):
                # Read back even when the ETag differs (it tells a rewritten object from a damaged
                # one), but not what cannot be decrypted anyway: wrong size, unreadable metadata.
                if any(p.kind == "size" for p in problems) or (self.encrypted and info is None):
                    return done()
                checks.append("plaintext_sha256")
                try:
                    digest, n = self._read_back(row, listed, info)
                except _Decrypt as exc:
                    bad("decrypt", "an object that decrypts and authenticates", str(exc))
                    return done()
                if row.sha256 and digest != row.sha256:
                    bad("sha256", f"plaintext SHA-256 {row.sha256} (recorded from the source stream)", digest)
                return done(plaintext_sha256=digest, bytes_read=n)
        except NotFound:
            bad("missing", "the object (it was listed)", "no such object when read")
        except ConnectorError as exc:
            bad("unreadable", "a readable object", f"{type(exc).__name__}: {exc}")
        return done()

    def _read_back(self, row: st.ObjectRecord, listed: ObjectMeta, info) -> tuple[str, int]:
        """(plaintext SHA-256, bytes read) of the object read back, decrypted when encrypted;
        `_Decrypt` when it does not decrypt or authenticate."""
        read = 0

        def chunks() -> Iterator[bytes]:
            nonlocal read
            for start in range(0, listed.size, READ_SIZE):
                data = self.sink.read_range(listed.key, start, min(start + READ_SIZE, listed.size), if_match=listed.etag)
                read += len(data)
                yield data

        digest = hashlib.sha256()
        if self.encrypted:
            try:
                plaintext = decrypt_object(key_for(self.keys, info), info.associated_data, chunks(),
                                           plaintext_size=info.plaintext_size)
                for piece in plaintext:
                    digest.update(piece)
            except (FormatError, ValueError) as exc:  # KeysetError is a ValueError
                raise _Decrypt(str(exc)) from None
        else:
            for piece in chunks():
                digest.update(piece)
        return digest.hexdigest(), read


class _Decrypt(Exception):
    """The object read back does not decrypt or authenticate (the message says why)."""


# ---------------------------------------------------------------------------------------------
# A dataset, and a whole verify run
# ---------------------------------------------------------------------------------------------


def _listing(sink: ObjectReader, prefix: str) -> Iterator[ObjectMeta]:
    """The destination's objects under `prefix` but exitplan's own files. A key ending in `/` (a
    "folder" blob) is an object like any other: migrate copies it, and it must be found."""
    for meta in sink.list(prefix):
        if meta.key.startswith(CONTROL_PREFIX):
            continue
        yield meta


def verify_dataset(loaded: LoadedConfig, dataset: str, store: st.StateStore, sink: ObjectReader, *, deep: bool,
                   sample: float, seed: int, keys: Any, known_key_ids: frozenset[int] | None,
                   on_checked: Callable[[st.ObjectRecord, CheckedObject], None],
                   observer: VerifyObserver | None = None, max_reported: int = 100,
                   progress_interval: float = 0.5) -> DatasetVerification:
    """Check every expected object of `dataset` (see the module docstring); `on_checked` is called
    from worker threads with each row and its result (the caller records state and audit)."""
    ds = loaded.config.datasets[dataset]
    started = time.monotonic()
    concurrency = loaded.config.transfer.concurrency
    etags_opaque = destination_profile(loaded, ds.destination).multipart.etag == "opaque"
    checker = _Checker(dataset, sink, encrypted=not ds.public, known_key_ids=known_key_ids, keys=keys, deep=deep,
                       sample=sample, seed=seed, etags_opaque=etags_opaque)
    total = store.count_expected_at_destination(dataset)
    if observer:
        observer.dataset_started(dataset, total)
    lock = threading.Lock()
    tally = {"objects": 0, "ok": 0, "failed": 0, "deep": 0, "bytes": 0}
    discrepancies: list[Discrepancy] = []
    truncated = False
    unknown: list[str] = []
    unknown_count = 0
    last_emit = [0.0]

    def emit(force: bool = False) -> None:
        if observer is None:
            return
        now = time.monotonic()
        with lock:
            if not force and now - last_emit[0] < progress_interval:
                return
            last_emit[0] = now
            snap = VerifyProgress(dataset, tally["objects"], total, tally["failed"], tally["bytes"])
            observer.progress(snap)

    # The first `StateUnwritable` a check met (the state or the manifest cannot be written): no
    # more checks start, those in flight end without a word, and it is raised once, at the end.
    stopped: list[st.StateUnwritable] = []

    def one(row: st.ObjectRecord, listed: ObjectMeta | None) -> None:
        nonlocal truncated
        if stopped:
            return
        result = checker.check(row, listed)
        try:
            on_checked(row, result)
        except st.StateUnwritable as exc:
            stopped.append(exc)
            return
        with lock:
            tally["objects"] += 1
            tally["bytes"] += result.bytes_read
            tally["deep"] += "plaintext_sha256" in result.checks
            if result.ok:
                tally["ok"] += 1
            else:
                tally["failed"] += 1
                for d in result.problems:
                    if len(discrepancies) < max_reported:
                        discrepancies.append(d)
                    else:
                        truncated = True
        emit()

    def unknown_object(meta: ObjectMeta) -> None:
        nonlocal unknown_count
        unknown_count += 1
        if len(unknown) < 10:
            unknown.append(meta.key)

    prefix = ds.dest_prefix
    try:
        # A check that raises (the state store or the audit trail failed) is the command's error:
        # nothing more is submitted, and the checks in flight end before it is raised.
        with create_pool(concurrency, "exitplan-verify") as pool, BoundedTasks(pool, concurrency * 2) as tasks:
            listing = _listing(sink, prefix)
            current = next(listing, None)
            for row in store.expected_at_destination(dataset):
                if stopped:
                    break
                key = row.dest_key or ""
                if not key.startswith(prefix):  # written under an earlier dest_prefix: not in this listing
                    try:
                        listed = sink.head(key)
                    except NotFound:
                        listed = None
                    tasks.submit(row, one, row, listed)
                    continue
                while current is not None and current.key < key:
                    unknown_object(current)
                    current = next(listing, None)
                if current is not None and current.key == key:
                    tasks.submit(row, one, row, current)
                    current = next(listing, None)
                else:
                    tasks.submit(row, one, row, None)
            while current is not None:
                unknown_object(current)
                current = next(listing, None)
    except ConnectorError as exc:
        raise VerifyError(f"dataset `{dataset}`: listing {sink.label}/{prefix}: {exc}",
                          ExitCode.USAGE if exc.__class__.__name__ in ("AuthError", "ConfigError", "BucketNotFound")
                          else ExitCode.FAILED) from None
    if stopped:
        raise stopped[0]
    emit(force=True)
    return DatasetVerification(
        dataset, "deep" if deep else "quick", tally["objects"], tally["ok"], tally["failed"], tally["deep"],
        tally["bytes"], unknown_count, tuple(unknown), tuple(discrepancies), truncated, time.monotonic() - started,
        etags_opaque=etags_opaque)


def verify(loaded: LoadedConfig, datasets: list[str], *, deep: bool = False, sample: float = 1.0,
           seed: int | None = None, observer: VerifyObserver | None = None, max_reported: int = 20) -> VerifyResult:
    """Verify `datasets` against the state store; record each object's outcome (state, audit).

    Besides the discrepancies, each dataset's `status` says whether it is complete: every object
    its newest complete source listing holds is verified (failed, pending and never attempted
    objects are named, the first `max_reported` of each kind); `all_ok` needs both.

    `sample` (0 < sample ≤ 1) is the fraction of objects read back in deep mode; `seed` picks
    them (a random seed is drawn, and returned, when None). Keys: deep mode unwraps the data
    keys (exit code 4 if the KEK fails); quick mode reads only the keyset's public key ids. The
    audit key is unwrapped to sign the run's end.
    """
    if not 0 < sample <= 1:
        raise UserError(f"--sample {sample}: must be a fraction above 0 and at most 1 (e.g. 0.1 for 10%)", ExitCode.USAGE)
    seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    existing = open_state(loaded, read_only=True)
    if existing is None:
        raise VerifyError(f"no state at {loaded.state_dir}: nothing was migrated with this configuration yet; "
                          f"run `exitplan migrate --config {loaded.path}` first", ExitCode.USAGE)
    existing.close()
    encrypted = [d for d in datasets if not loaded.config.datasets[d].public]
    keys = known_ids = None
    if encrypted:
        from .keys import load_data_keys, show_keys

        if deep:
            keys = load_data_keys(loaded)
            known_ids = frozenset(keys.keys)
        else:
            known_ids = frozenset(k.key_id for k in show_keys(loaded).keys if k.status != "destroyed")
    signing = audit_signing_key(loaded, datasets)
    started = time.monotonic()
    store = open_state(loaded)
    mode = "deep" if deep else "quick"
    details: dict[str, Any] = {"mode": mode}
    if deep:
        details.update(sample_ppm=round(sample * 1_000_000), seed=seed)
    try:
        trail = RunAudit(loaded, "verify", datasets, signing, store, **details)  # opens the run
    except BaseException:
        store.close()
        raise
    run_id = trail.run_id

    def on_checked(row: st.ObjectRecord, result: CheckedObject) -> None:
        _record_state(store, row, result)
        trail.append({
            "type": VERIFY, "run": run_id, "mode": mode, "dataset": result.dataset, "source_key": row.source_key,
            "copied_in_run": row.run_id,
            "destination": {"bucket": loaded.config.destinations[loaded.config.datasets[result.dataset].destination].bucket,
                            "key": row.dest_key, "etag": row.dest_etag, "size": row.output_size},
            "checks": list(result.checks), "result": "ok" if result.ok else "failed",
            "plaintext_sha256": result.plaintext_sha256,
            "problems": [{"kind": d.kind, "expected": d.expected, "found": d.found} for d in result.problems],
        })

    summaries: list[DatasetVerification] = []
    status = "interrupted"
    sinks = DestinationSinks(loaded)  # one per destination, for the checks and the manifest's copy
    try:
        try:
            for name in datasets:
                ds = loaded.config.datasets[name]
                sink = call_endpoint(f"destination `{ds.destination}`", sinks, ds.destination)
                store.dataset_started(run_id, name)
                try:
                    summary = verify_dataset(loaded, name, store, sink, deep=deep, sample=sample, seed=seed, keys=keys,
                                             known_key_ids=known_ids, on_checked=on_checked, observer=observer)
                except BaseException as exc:
                    _record_stop(store, run_id, name, exc)
                    raise
                store.dataset_through(run_id, name, summary.objects, summary.bytes_read)
                # After the check, which moved what passed to verified: the one definition of complete.
                summary = dataclasses.replace(summary, status=store.dataset_status(name, examples=max_reported))
                summaries.append(summary)
                if observer:
                    observer.dataset_finished(summary)
            status = "ok" if all(s.all_ok for s in summaries) else "failed"
        finally:
            if store.unwritable is not None:  # left as a kill leaves it: the next run records it as interrupted
                store.close()
                trail.abandon()
                raise store.unwritable
            totals = dict(objects_total=sum(s.objects for s in summaries), objects_ok=sum(s.ok for s in summaries),
                          objects_failed=sum(s.failed for s in summaries),
                          bytes_total=sum(s.bytes_read for s in summaries))
            store.finish_run(run_id, status, **totals)
            store.close()
            try:
                trail.finish(status, dict(totals, objects_deep_checked=sum(s.deep_checked for s in summaries)))
            except st.StateUnwritable:  # the manifest's disk, this time
                trail.abandon()
                raise
        copies, notes = trail.publish([loaded.config.datasets[d].destination for d in datasets], sinks)
    finally:
        sinks.close()
    return VerifyResult(run_id, mode, sample, seed if deep else None, tuple(summaries), time.monotonic() - started,
                        trail.outcome(copies, notes))


def _record_stop(store: st.StateStore, run_id: int, dataset: str, exc: BaseException) -> None:
    """Record why the verify run stopped before it went through `dataset`; `exc` goes on whatever
    happens here (the state store may be what failed)."""
    if isinstance(exc, st.StateUnwritable):  # nothing can be recorded; the next run says interrupted
        return
    try:
        store.dataset_stopped(run_id, dataset, "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc))
    except Exception:
        log.warning("recording that verify run %d stopped on dataset %s failed", run_id, dataset, exc_info=True)


def _record_state(store: st.StateStore, row: st.ObjectRecord, result: CheckedObject) -> None:
    """verified, or failed with a `verify:` reason; nothing for a check that could not be made.
    The copy's finish time is kept (the report plots it)."""
    definite = [d for d in result.problems if d.definite]
    try:
        if result.ok and row.state == st.UPLOADED:
            store.transition(row.id, st.VERIFIED, finished_at=row.finished_at)
        elif definite and row.state in st.COPIED:
            reason = st.VERIFY_REASON + "; ".join(f"{d.kind}: expected {d.expected}, found {d.found}" for d in definite)
            store.transition(row.id, st.FAILED, reason=reason[:2000], finished_at=row.finished_at)
    except st.InvalidTransition:
        pass  # a concurrent migrate moved the row on: its new state stands
