"""The audit manifest: what left Azure and what arrived, in a form an auditor can check alone.

One manifest per migration project, across runs: `<state dir>/audit/manifest.jsonl`, copied at
the end of each run next to the data, to `_exitplan/<project>/manifest.jsonl` in every destination
bucket the run wrote to or checked. ARCHITECTURE.md §6.4; the README's "Audit manifest" section
shows how to check one with `cryptography`, `hashlib` and `json` alone.

The file is JSON lines, append-only. Each line is one record in **canonical form**:
``json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` encoded in
UTF-8, followed by ``\\n``. Records hold only strings, integers, booleans, null, lists and objects
(never floats), so the form is stable across JSON implementations.

Every record carries:

- ``type``: ``chain_start`` (the first line, once per project), ``run_start``, ``transfer`` (one
  per object copied by `migrate`), ``removal`` (one per destination copy `migrate --delete-removed`
  deleted because its object is gone from the source), ``verify`` (one per object checked by
  `verify`), ``run_interrupted`` (one per earlier run that started and never ended, written by the
  next run right after its ``run_start``), ``repair`` (the manifest's end was mended when it was
  opened: a torn last line cut, or a complete last record's missing newline added), ``run_end``;
- ``seq``: its 0-based line number in the manifest;
- ``prev``: the SHA-256 (hex) of the previous line's bytes (without its newline); null on the first;
- ``time``: when it was written (UTC, ISO 8601, ``Z``).

A ``run_start`` names the command, the project and the datasets; when provider profiles were read
from ``EXITPLAN_PROVIDERS_DIR`` (not shipped with exitplan, so their jurisdiction and hosts are the
operator's word), it lists each under ``provider_profiles_added``: ``provider``, ``file`` (its
absolute path) and ``sha256`` (of the bytes read).

A ``run_end`` record is signed with the project's Ed25519 audit key (`engine.keys`): ``signature``
is the base64 of the Ed25519 signature over the canonical line of the record *without* its
``signature`` field. Because each record names the hash of the one before, a ``run_end``
signature covers every line before it, including those of an earlier run that was killed before
its own ``run_end``. Lines after the last ``run_end`` are not covered until the next run ends.

Interrupted runs. Runs append one at a time (the manifest's lock), so a run's lines are its
``run_start`` up to the line before the next run's first line. A run killed before its ``run_end``
leaves a ``run_start`` without one. The next run (holding the lock, so the killed one is dead)
reads the manifest back from its end to the last ``run_end`` and appends, after its own
``run_start``, a ``run_interrupted`` record for every run it finds there without an end (its id,
command, start time, ``first_seq`` and ``last_seq``), and one for every run the state store still
holds as running that is known to be dead (`RunAudit` says which: ``first_seq`` null, its lines,
if any, are before the last ``run_end``); those runs' rows then say ``interrupted``.
So every signed ``run_end`` names, through its run, every run interrupted since the previous
``run_end``. `verify_manifest` lists each run without an end and which runs recorded it.

Repairs. Opening the manifest settles its end first: a last line without its newline that parses
as a JSON object is a complete record whose newline was lost, and gets its newline (never
deleted); one that does not parse is the torn write of a killed process and is replaced, in one
write at the same offset, by a ``repair`` record naming its length and SHA-256. Either repair is
recorded in the chain (``action``: ``newline_added`` or ``cut``), so the next signature covers it
and `audit verify` shows it.

What the manifest cannot prove alone: that nothing was cut off after a signed ``run_end`` (drop
whole runs from the end and the rest still checks). Keep the last record hash somewhere else too:
`exitplan report` prints it, and every copy next to the data carries it.

Which objects are recorded: a `transfer` record is written for every state row that reached
uploaded (or verified) and was not recorded yet, in row order, after each dataset of a run and at
its end, read back from the state store (`engine.state` tables; times and digests come from the
rows). Which rows are recorded is kept in the state database (its ``audit_recorded`` table,
`StateStore.unaudited` and `mark_audited`): a run killed before its records were written has them
written by the next run (``late: true``). The marks are written after their lines, up to 500 rows
per transaction: a kill between lines and their marks can at worst repeat those records.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from config.errors import ExitCode, UserError
from config.providers import added_profiles
from connectors.base import history_of
from engine import state as st
from engine.private_files import open_private, private_directory
from engine.state import writing_file

if TYPE_CHECKING:
    from config.models import LoadedConfig
    from config.policy import DestinationVerdict
    from connectors.base import HeadReader, ObjectSource
    from engine.endpoints import DestinationSinks

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "exitplan-audit-manifest/1"
MANIFEST_DIR = "audit"
MANIFEST_NAME = "manifest.jsonl"
SIGNATURE_ALGORITHM = "Ed25519"

CHAIN_START = "chain_start"
RUN_START = "run_start"
TRANSFER = "transfer"
VERIFY = "verify"
RUN_END = "run_end"
REMOVAL = "removal"
RUN_INTERRUPTED = "run_interrupted"
REPAIR = "repair"
NOT_CARRIED = "not_carried"  # what a dataset's listing named that the run does not carry, by reason
_MANIFEST = "the audit manifest"  # for the sentence of a manifest that cannot be written
# A dataset cut over (`engine.cutover`): signed itself, like a run_end.
CUTOVER = "cutover"
RECORD_TYPES = (CHAIN_START, RUN_START, TRANSFER, REMOVAL, NOT_CARRIED, VERIFY, RUN_INTERRUPTED, REPAIR, CUTOVER,
                RUN_END)
MARKS_PER_TRANSACTION = 500  # rows marked recorded per state transaction (`_Marks`)


# ---------------------------------------------------------------------------------------------
# The canonical form, hashes, signatures
# ---------------------------------------------------------------------------------------------


def canonical(record: Mapping[str, Any]) -> str:
    """The one serialisation of a record: sorted keys, no spaces, UTF-8 (not \\u-escaped)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def line_hash(line: bytes) -> str:
    """SHA-256 (hex) of a manifest line's bytes, without its newline: the next record's `prev`."""
    return hashlib.sha256(line).hexdigest()


def signed_payload(record: Mapping[str, Any]) -> bytes:
    """The bytes a `run_end` signature is over: the canonical record without `signature`."""
    return canonical({k: v for k, v in record.items() if k != "signature"}).encode("utf-8")


def public_key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the public key's DER SubjectPublicKeyInfo (what `openssl pkey -pubin
    -outform DER | sha256sum` prints for the PEM that `exitplan keys show --audit-public-key` gives)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def iso(dt: datetime | None) -> str | None:
    """A state store time (naive UTC) or an aware time as ISO 8601 UTC with milliseconds and `Z`."""
    if dt is None:
        return None
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return dt.isoformat(timespec="milliseconds") + "Z"


def _now() -> str:
    return iso(datetime.now(timezone.utc))  # type: ignore[return-value]


def manifest_path(loaded: "LoadedConfig") -> Path:
    return loaded.state_dir / MANIFEST_DIR / MANIFEST_NAME


def manifest_object_key(project: str) -> str:
    """Where the manifest is copied next to the data, in each destination bucket."""
    return f"_exitplan/{project}/{MANIFEST_NAME}"


# ---------------------------------------------------------------------------------------------
# Appending
# ---------------------------------------------------------------------------------------------


class ManifestError(UserError):
    """The manifest cannot be appended to: another run holds it, or its last line is not a record."""

    exit_code = ExitCode.FAILED


@dataclass(frozen=True)
class UnfinishedRun:
    """A run with a `run_start` and no `run_end` found at the manifest's end when it was opened
    (lines are `seq`, 0-based), or one the state store still holds as running (no lines known)."""

    run: int
    command: str | None
    started: str | None
    first_seq: int | None
    last_seq: int | None

    def record(self, recorded_in_run: int) -> dict[str, Any]:
        return {"type": RUN_INTERRUPTED, "run": self.run, "command": self.command, "started": self.started,
                "first_seq": self.first_seq, "last_seq": self.last_seq, "recorded_in_run": recorded_in_run,
                "reason": ("started and never ended (killed, or its host lost): it wrote no run_end"
                           if self.first_seq is not None else
                           "the state store holds it as started and never ended; no run_start of it follows the "
                           "last run_end (its lines, if any, are before it)")}


def repair_sentence(record: Mapping[str, Any]) -> str:
    """What a `repair` record says was done, for people."""
    if record.get("action") == "cut":
        return (f"a torn last line of {record.get('cut_bytes')} bytes (SHA-256 {record.get('cut_sha256')}) was cut: "
                "a write cut by a kill, never a complete record")
    return f"line {_line_no(record.get('line_seq'))} was a complete record without its newline: the newline was added"


def _line_no(seq: Any) -> Any:
    """The 1-based line number of a record's `seq` (what `audit verify` prints)."""
    return seq + 1 if isinstance(seq, int) else seq


class AuditManifest:
    """An open manifest, appended to under a lock (records come from worker threads).

    Opening settles the file's end (the module docstring's "Repairs"): a complete last record
    whose newline was lost gets it; a torn last line (a write cut by a kill: it does not parse)
    is replaced by a `repair` record naming its length and SHA-256. Then only the last line is
    read (for `seq` and `prev`). An empty or new file starts with a `chain_start` record. Each
    record is written with one `write` and flushed; `sync` (called at the end of each run) fsyncs
    the file. One process at a time appends: an exclusive `flock` on `manifest.jsonl.lock` is held
    from open to close (a second run of the same project, a verify during a migrate, gets a
    `ManifestError` at once instead of forking the chain), so the runs found without an end
    (`unfinished_runs`) are dead.
    """

    def __init__(self, path: Path, project: str, public_key: Ed25519PublicKey | None):
        import fcntl

        self.path = path
        self.project = project
        self._lock = threading.Lock()
        self.repairs: list[dict[str, Any]] = []  # the repair records this opening wrote
        self._public_key = public_key
        with writing_file(path, _MANIFEST):
            private_directory(path.parent)
            self._flock = open_private(path.with_name(path.name + ".lock"), "a+b")
        try:
            fcntl.flock(self._flock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._flock.close()
            raise ManifestError(f"{path} is being written by another exitplan run of project `{project}` "
                                "(a migrate or verify still going); run this one once it has finished") from None
        try:
            with writing_file(path, _MANIFEST):
                self._settle_end()
                self._file = open_private(path, "ab")
        except BaseException:
            self._flock.close()
            raise
        if self.prev is None:
            self.append(self._chain_start())

    def _chain_start(self) -> dict[str, Any]:
        fingerprint = public_key_fingerprint(self._public_key) if self._public_key else None
        return {"type": CHAIN_START, "format": MANIFEST_FORMAT, "project": self.project,
                "audit_public_key_sha256": fingerprint}

    def _follow(self, last: bytes | None) -> None:
        """Go on after `last` (the last complete line, None: an empty file): its seq + 1, its hash."""
        self.seq, self.prev = 0, None
        if last is None:
            return
        try:
            self.seq = int(json.loads(last)["seq"]) + 1
        except (ValueError, KeyError, TypeError):
            raise ManifestError(f"{self.path}: the last line is not a manifest record; check the file "
                                "(`exitplan audit verify`) or move it aside to start a new chain") from None
        self.prev = line_hash(last)

    def _settle_end(self) -> None:
        """Read the end of the file: complete or cut a last line without its newline (each recorded
        with a `repair` record), and set `seq` and `prev` to go on after the last line."""
        try:
            f = open(self.path, "r+b")
        except FileNotFoundError:
            self._follow(None)
            return
        with f:
            size = f.seek(0, os.SEEK_END)
            fragment_at = _rfind_newline(f, size) + 1
            f.seek(fragment_at)
            fragment = f.read(size - fragment_at)
            previous = _line_before(f, fragment_at)
            if not fragment:
                self._follow(previous)
                return
            if _parses_as_record(fragment):  # a whole record whose newline was lost: never deleted
                f.seek(size)
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
                log.warning("%s: the last record had no newline; the newline was added", self.path)
                self._follow(fragment)
                repair = {"action": "newline_added", "line_seq": self.seq - 1,
                          "reason": "the last record was complete but its newline was missing; the newline was added"}
                lines = [self._stamp(dict(repair, type=REPAIR))]
                f.write(lines[0] + b"\n")
            else:
                # A torn write: replaced in place, in one write, by the record of its cut (a kill
                # during this write leaves a new torn line, which the next opening cuts and records).
                self._follow(previous)
                lines = [self._stamp(self._chain_start())] if previous is None else []
                lines.append(self._stamp({
                    "type": REPAIR, "action": "cut", "cut_bytes": len(fragment),
                    "cut_sha256": hashlib.sha256(fragment).hexdigest(),
                    "reason": "a torn last line (a write cut by a kill: not a complete record) was cut"}))
                log.warning("%s: a torn last line (%d bytes, a write cut by a kill) was cut; a repair record names it",
                            self.path, len(fragment))
                f.seek(fragment_at)
                f.write(b"".join(line + b"\n" for line in lines))
                f.truncate()
            f.flush()
            os.fsync(f.fileno())
            self.repairs += [json.loads(line) for line in lines if b'"type":"repair"' in line]

    def _stamp(self, record: Mapping[str, Any]) -> bytes:
        """`record` with `seq`, `prev` and `time` as the next line (canonical bytes); moves the chain on."""
        return self._stamped(record)[1]

    def _stamped(self, record: Mapping[str, Any]) -> tuple[dict[str, Any], bytes]:
        full = dict(record, seq=self.seq, prev=self.prev)
        full.setdefault("time", _now())
        line = canonical(full).encode("utf-8")
        self.seq += 1
        self.prev = line_hash(line)
        return full, line

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write `record` with its `type` given, adding `seq`, `prev` and `time` (unless given)."""
        with self._lock, writing_file(self.path, _MANIFEST):
            full, line = self._stamped(record)
            self._file.write(line + b"\n")
            self._file.flush()
            return full

    def append_signed(self, record: Mapping[str, Any], signing_key: Ed25519PrivateKey | None) -> dict[str, Any]:
        """Append a record signed over its canonical form without `signature` (see the module
        docstring); with no key (a project without `keys`, every dataset public) `signature` is null."""
        with self._lock:
            full = dict(record, seq=self.seq, prev=self.prev, signature_algorithm=SIGNATURE_ALGORITHM)
            full.setdefault("time", _now())
            full["public_key_sha256"] = public_key_fingerprint(signing_key.public_key()) if signing_key else None
            full["signature"] = (base64.b64encode(signing_key.sign(signed_payload(full))).decode("ascii")
                                 if signing_key else None)
            full, line = self._stamped(full)
            with writing_file(self.path, _MANIFEST):
                self._file.write(line + b"\n")
                self._file.flush()
            return full

    def unfinished_runs(self) -> list[UnfinishedRun]:
        """The runs with a `run_start` and no `run_end` after the manifest's last `run_end`, and the
        runs the `run_interrupted` records there name (a run killed after recording them had no
        run_end to sign them), by run id. Read backwards from the end, so it costs the lines
        written since the last run ended. A run's last line is the one before the next run's first
        line (its `repair` or `run_start`)."""
        with self._lock:
            self._file.flush()
            end_seq = self.seq - 1
        found: dict[tuple[int, int | None], UnfinishedRun] = {}
        named: list[UnfinishedRun] = []
        next_first = end_seq + 1
        with open(self.path, "rb") as f:
            for line in _lines_backwards(f):
                if not any(marker in line for marker in _TAIL_MARKERS):
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                kind, seq, run = record.get("type"), record.get("seq"), record.get("run")
                if kind == RUN_END or not isinstance(seq, int):
                    break
                if kind == RUN_START and isinstance(run, int):
                    found[(run, seq)] = UnfinishedRun(run, record.get("command"), record.get("time"), seq,
                                                      next_first - 1)
                elif kind == RUN_INTERRUPTED and isinstance(run, int):
                    named.append(UnfinishedRun(run, record.get("command"), record.get("started"),
                                               record.get("first_seq"), record.get("last_seq")))
                if kind in (RUN_START, REPAIR, CHAIN_START):
                    next_first = seq
        for run in named:
            found.setdefault((run.run, run.first_seq), run)
        return sorted(found.values(), key=lambda u: (u.run, u.first_seq or 0))

    def sync(self) -> None:
        with self._lock, writing_file(self.path, _MANIFEST):
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                try:
                    with writing_file(self.path, _MANIFEST):
                        self._file.flush()
                        os.fsync(self._file.fileno())
                finally:
                    try:
                        self._file.close()
                    except OSError:  # not flushed above either: a torn last line, cut and recorded next time
                        pass
                    self._flock.close()  # releases the flock

    def __enter__(self) -> "AuditManifest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Substrings of the canonical lines that `unfinished_runs` reads (a JSON string holding them would
# escape the quotes, so a hit is always the record's own `type`; each is parsed to be sure).
_TAIL_MARKERS = tuple(f'"type":"{kind}"'.encode() for kind in (RUN_START, RUN_END, REPAIR, CHAIN_START,
                                                                RUN_INTERRUPTED))


def _parses_as_record(line: bytes) -> bool:
    """A line is a complete record when it parses as a JSON object (a torn prefix of a one-line
    object never does: its closing brace is the last byte written)."""
    try:
        return isinstance(json.loads(line.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def _rfind_newline(f, before: int, block: int = 64 * 1024) -> int:
    """Offset of the last ``\\n`` in `f` at an offset below `before`, or -1."""
    pos = before
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        i = f.read(pos - start).rfind(b"\n")
        if i >= 0:
            return start + i
        pos = start
    return -1


def _line_before(f, end: int) -> bytes | None:
    """The complete line ending just before offset `end` (which follows a ``\\n``), without its newline."""
    if end <= 0:
        return None
    start = _rfind_newline(f, end - 1) + 1
    f.seek(start)
    return f.read(end - 1 - start)


def _lines_backwards(f, block: int = 64 * 1024) -> Iterator[bytes]:
    """The complete lines of `f` from the last to the first, without their newlines (a torn tail
    is not a line), read in blocks from the end."""
    end = _rfind_newline(f, f.seek(0, os.SEEK_END)) + 1
    if end == 0:
        return
    pos, head = end - 1, b""  # [0, pos) is still to read; `head` is the start of the line read last
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        parts = (f.read(pos - start) + head).split(b"\n")
        pos, head = start, parts[0]
        yield from reversed(parts[1:])
    yield head


# ---------------------------------------------------------------------------------------------
# Checking a manifest
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestProblem:
    line: int  # 1-based
    message: str

    def sentence(self) -> str:
        """The problem as printed: a message that names its line itself stands alone."""
        return self.message if self.message.startswith(f"line {self.line} ") else f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class RunWithoutEnd:
    """A run the manifest shows started and never ended: a finding, not a problem (see `ManifestCheck`).

    `first_line`/`last_line` (1-based) are its lines; None for a run known only from a
    `run_interrupted` record (the state store held it as running: it wrote no line after the
    last run_end). `recorded_by`: (run id, line) of each `run_interrupted` record naming it."""

    run: int
    command: str | None
    started: str | None
    first_line: int | None
    last_line: int | None
    recorded_by: tuple[tuple[int, int], ...] = ()

    def sentence(self) -> str:
        lines = (f"lines {self.first_line}-{self.last_line}" if self.first_line is not None
                 else "no line of its own after the last run_end (the state store held it as running)")
        what = (f"run {self.run} ({self.command or 'unknown command'}, "
                f"started {self.started or 'at an unknown time'}): {lines}; ")
        if self.recorded_by:
            return what + "recorded as interrupted by " + ", ".join(f"run {r} (line {n})" for r, n in self.recorded_by)
        return what + ("no later run recorded it (the last run: still going, or killed; the next run records it — "
                       "or a manifest written before exitplan recorded interruptions)")

    def as_json(self) -> dict[str, Any]:
        return {"run": self.run, "command": self.command, "started": self.started, "first_line": self.first_line,
                "last_line": self.last_line,
                "recorded_by": [{"run": r, "line": n} for r, n in self.recorded_by]}


@dataclass(frozen=True)
class ManifestRepair:
    """A `repair` record: what opening the manifest mended at its end (a finding, not a problem)."""

    line: int
    sentence: str


@dataclass(frozen=True)
class ManifestCheck:
    """What `verify_manifest` found. `ok` when there is no problem: the chain holds, every
    `run_end` signature verifies and the last line is a signed `run_end`.

    Findings, listed whatever `ok` says: `runs_without_end` (runs that started and never ended,
    and which later runs recorded them as interrupted) and `repairs`. An interrupted run before the
    last `run_end` does not make a manifest fail: its lines are in the chain and signed by the
    next `run_end`, and the copies it made were recorded by the next run (`late`); the interruption
    is an event of the migration that the auditor reads here, not damage to the record. A run
    without an end at the end of the file does fail: its lines are not covered by a signature yet."""

    path: Path
    records: int
    runs_signed: int
    last_hash: str | None
    file_sha256: str
    problems: tuple[ManifestProblem, ...]
    problems_truncated: bool = False
    counts: Mapping[str, int] = field(default_factory=dict)
    runs_without_end: tuple[RunWithoutEnd, ...] = ()
    repairs: tuple[ManifestRepair, ...] = ()
    # The `cutover` records whose signature verifies: (line, dataset, time, objects, objects_sha256).
    cutovers: tuple[tuple[int, str, str, int, str], ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"manifest": str(self.path), "ok": self.ok, "records": self.records, "counts": dict(self.counts),
                "runs_signed": self.runs_signed, "last_hash": self.last_hash, "file_sha256": self.file_sha256,
                "problems": [{"line": p.line, "message": p.sentence()} for p in self.problems],
                "problems_truncated": self.problems_truncated,
                "runs_without_end": [r.as_json() for r in self.runs_without_end],
                "repairs": [{"line": r.line, "repair": r.sentence} for r in self.repairs],
                "cutovers": [{"line": n, "dataset": d, "time": t, "objects": o, "objects_sha256": h}
                             for n, d, t, o, h in self.cutovers]}


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


class _RunSpans:
    """The runs of a manifest as it is read line by line: where each starts and ends, and the
    `run_interrupted` records, matched to the runs they name once every line is read."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.by_first_line: dict[int, dict[str, Any]] = {}
        self.current: dict[str, Any] | None = None
        self.interruptions: list[tuple[int, dict[str, Any]]] = []

    def line(self, n: int, kind: Any, record: dict[str, Any]) -> None:
        if kind == RUN_START:
            self.current = {"run": record.get("run"), "command": record.get("command"), "started": record.get("time"),
                            "first": n, "last": n, "ended": False, "recorded_by": []}
            self.spans.append(self.current)
            self.by_first_line[n] = self.current
            return
        if kind in (REPAIR, CHAIN_START):  # written by the next opener: the run before ended its lines
            self.current = None
            return
        if self.current is not None:
            self.current["last"] = n
            if kind == RUN_END and record.get("run") == self.current["run"]:
                self.current["ended"] = True
                self.current = None
        if kind == RUN_INTERRUPTED:
            self.interruptions.append((n, record))

    def without_end(self, problem: Callable[[int, str], None]) -> tuple[RunWithoutEnd, ...]:
        """Every run without a run_end, by run id, with the records naming it (a record that names no
        such run is a problem)."""
        known_only: list[dict[str, Any]] = []
        for n, record in self.interruptions:
            first_seq = record.get("first_seq")
            if isinstance(first_seq, int):
                span = self.by_first_line.get(first_seq + 1)
                if span is None or span["run"] != record.get("run") or span["ended"]:
                    problem(n, f"the run_interrupted record names run {record.get('run')!r} at line {first_seq + 1}, "
                               "but that line is not the run_start of a run without an end")
                    continue
            else:
                span = next((s for s in reversed(self.spans) if s["run"] == record.get("run") and not s["ended"]
                             and s["first"] < n), None)
                if span is None:
                    span = next((s for s in known_only if s["run"] == record.get("run")), None)
                if span is None:
                    span = {"run": record.get("run"), "command": record.get("command"),
                            "started": record.get("started"), "first": None, "last": None, "ended": False,
                            "recorded_by": [], "at": n}
                    known_only.append(span)
            span["recorded_by"].append((record.get("recorded_in_run"), n))
        found = [s for s in self.spans if not s["ended"]] + known_only
        found.sort(key=lambda s: (s["run"] if isinstance(s["run"], int) else -1, s["first"] or s["at"]))
        return tuple(RunWithoutEnd(s["run"], s["command"], s["started"], s["first"], s["last"], tuple(s["recorded_by"]))
                     for s in found)


def verify_manifest(path: Path, public_key: Ed25519PublicKey, *, max_problems: int = 50) -> ManifestCheck:
    """Check `path` line by line (streamed): canonical form, `seq`, `prev` against the previous
    line's hash, every `run_end` signature with `public_key`, and that nothing follows the last
    `run_end` unsigned. Each problem names its line and what is wrong, in line order; the check
    goes on after a problem (the chain is re-anchored on the line as found), so one altered line
    gives one problem, about that line, not one per line after it. Also lists the findings:
    runs without an end and repairs (`ManifestCheck`)."""
    problems: list[ManifestProblem] = []
    truncated = False
    fingerprint = public_key_fingerprint(public_key)
    file_digest = hashlib.sha256()
    prev: str | None = None
    n = 0
    signed_through = 0
    runs_signed = 0
    counts: dict[str, int] = {}
    kind = None
    runs = _RunSpans()
    repairs: list[ManifestRepair] = []
    cutovers: list[tuple[int, str, str, int, str]] = []

    def problem(line: int, message: str) -> None:
        nonlocal truncated
        if len(problems) < max_problems:
            problems.append(ManifestProblem(line, message))
        else:
            truncated = True

    with open(path, "rb") as f:
        for raw in f:
            file_digest.update(raw)
            n += 1
            if not raw.endswith(b"\n"):
                problem(n, "the last line has no newline: a torn write, or the file was cut")
            line = raw[:-1] if raw.endswith(b"\n") else raw
            try:
                record = json.loads(line.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (UnicodeDecodeError, ValueError) as exc:
                problem(n, f"not a JSON record ({exc})")
                prev = line_hash(line)
                continue
            kind = record.get("type")
            counts[str(kind)] = counts.get(str(kind), 0) + 1
            if canonical(record).encode("utf-8") != line:
                problem(n, "not in canonical form (sorted keys, no spaces, UTF-8): the line was edited")
            if record.get("seq") != n - 1:
                problem(n, f"seq is {record.get('seq')!r}, expected {n - 1}: a line was removed, inserted or moved")
            if record.get("prev") != prev:
                if n == 1:
                    problem(n, f"prev is {record.get('prev')!r}, expected null on the first line: lines before it were removed")
                elif record.get("seq") == n - 1:  # in its place: the line before is not what was hashed
                    problem(n - 1, f"line {n - 1} was changed: line {n} records another hash for it (prev "
                                   f"{_short(record.get('prev'))}, line {n - 1} as found hashes to {_short(prev)}; "
                                   f"or line {n}'s prev was edited); signatures after it cover the line as it was "
                                   "written")
                else:
                    problem(n, f"prev {record.get('prev')!r} is not the SHA-256 of line {n - 1} ({prev}): lines were "
                               f"removed, inserted or reordered before line {n}")
            if n == 1 and kind != CHAIN_START:
                problem(n, f"the first record is {kind!r}, not {CHAIN_START!r}: the start of the chain is missing")
            if kind not in RECORD_TYPES:
                problem(n, f"unknown record type {kind!r}")
            if kind in (RUN_END, CUTOVER):
                sig = record.get("signature")
                if not isinstance(sig, str):
                    problem(n, f"the {kind} record is not signed (signature is null: the project has no audit key)")
                else:
                    try:
                        public_key.verify(base64.b64decode(sig, validate=True), signed_payload(record))
                        if kind == RUN_END:
                            runs_signed += 1
                            signed_through = n
                        else:
                            cutovers.append((n, str(record.get("dataset")), str(record.get("time")),
                                             int(record.get("objects") or 0), str(record.get("objects_sha256"))))
                    except (InvalidSignature, ValueError):
                        problem(n, f"the {kind} signature does not verify with the given public key "
                                   f"(sha256 {fingerprint[:16]}…): the record was altered or signed by another key")
            if kind == REPAIR:
                repairs.append(ManifestRepair(n, repair_sentence(record)))
            runs.line(n, kind, record)
            prev = line_hash(line)
    if n == 0:
        problem(0, "the manifest is empty")
    elif signed_through < n and kind != RUN_END:  # a last run_end that does not verify is named already
        first = signed_through + 1
        problem(first, f"lines {first}-{n} are not covered by a signed run_end (a run still going, a killed run, "
                       "or the end of the file was cut or altered)" if first < n else
                       f"line {n} is not covered by a signed run_end (a run still going, a killed run, "
                       "or the end of the file was cut or altered)")
    without_end = runs.without_end(problem)
    problems.sort(key=lambda p: p.line)  # stable: a line's own problems keep their order
    return ManifestCheck(path, n, runs_signed, prev, file_digest.hexdigest(), tuple(problems), truncated, counts,
                         without_end, tuple(repairs), tuple(cutovers))


def _short(digest: Any) -> str:
    return f"{digest[:16]}…" if isinstance(digest, str) else repr(digest)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The hooks a run uses
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditOutcome:
    """The end of a run's audit trail, for the summary."""

    manifest: Path
    records: int  # records this run wrote (run_start and run_end included)
    last_hash: str
    signed: bool
    copies: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    interrupted: tuple[int, ...] = ()  # earlier runs this run recorded as started and never ended
    repairs: tuple[str, ...] = ()  # what opening the manifest mended at its end, as sentences
    copy_urls: tuple[str, ...] = ()  # the copies next to the data, as URLs (`endpoints.object_url`)


def audit_signing_key(loaded: "LoadedConfig", datasets: list[str] | None = None) -> Ed25519PrivateKey | None:
    """The project's audit-signing key (unwrapped with the KEK: errors are exit code 4).

    None, and the run's `run_end` unsigned (which `audit verify` reports), when the project has
    no `keys`, or has not run `keys init` and every dataset of the run (`datasets`) is public: a
    run that needs no key does not start needing one for its audit trail."""
    if loaded.config.keys is None:
        return None
    from engine.keys import KeyFiles, load_audit_signing_key

    if datasets is not None and all(loaded.config.datasets[d].public for d in datasets) \
            and not KeyFiles.of(loaded).audit.exists():
        return None
    return load_audit_signing_key(loaded)


def open_manifest(loaded: "LoadedConfig", signing_key: Ed25519PrivateKey | None) -> AuditManifest:
    return AuditManifest(manifest_path(loaded), loaded.config.project,
                         signing_key.public_key() if signing_key else None)


class RunAudit:
    """The audit trail of one run (migrate or verify), and the run itself: created, it opens the
    manifest (its lock), then the run's row in the state store (`run_id`), appends `run_start`
    and a `run_interrupted` record for each earlier run found without an end, whose rows then say
    `interrupted`; records in between; a signed run_end at `finish`, then the copy next to the data
    (`publish`).

    The manifest is opened before the run's row exists, so a run refused the manifest (another run
    holds it) leaves no row. Which rows still running are dead, and recorded with the runs found
    without an end: with a SQLite state (it lives in the manifest's state directory, and every
    process that opens a run there holds the manifest's lock first), every one but this run's;
    with a shared state database, only those of `command` when `exclusive` says the caller holds
    the project's lock for it (migrate): a verify on another host has a manifest of its own."""

    def __init__(self, loaded: "LoadedConfig", command: str, datasets: list[str],
                 signing_key: Ed25519PrivateKey | None, state: st.StateStore, *, exclusive: bool = False,
                 **details: Any):
        self.loaded = loaded
        self.command = command
        self.datasets = list(datasets)
        self.signing_key = signing_key
        self.copy_urls: list[str] = []  # where `publish` copied the manifest
        self.manifest = open_manifest(loaded, signing_key)
        try:
            unfinished = self.manifest.unfinished_runs()
            self.run_id = state.start_run(command, loaded.path)
            self.first_seq = self.manifest.seq
            self.started = _now()
            # Provider profiles from EXITPLAN_PROVIDERS_DIR: their facts are the operator's, not exitplan's.
            added = [f.as_record() for f in added_profiles()]
            self.manifest.append({"type": RUN_START, "run": self.run_id, "command": command,
                                  "project": loaded.config.project, "datasets": self.datasets,
                                  **({"provider_profiles_added": added} if added else {}), **details})
            if exclusive or not state.shared:
                seen = {u.run for u in unfinished}
                unfinished += [UnfinishedRun(r.id, r.command, iso(r.started_at), None, None)
                               for r in state.running_runs(command if state.shared else None)
                               if r.id != self.run_id and r.id not in seen]
                unfinished.sort(key=lambda u: (u.run, u.first_seq or 0))
            for run in unfinished:
                self.manifest.append(run.record(self.run_id))
            self.interrupted = tuple(unfinished)
            state.mark_interrupted([u.run for u in unfinished])
        except BaseException:
            self.manifest.close()
            raise
        self._finished: dict[str, Any] | None = None

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return self.manifest.append(record)

    def finish(self, status: str, totals: Mapping[str, int]) -> dict[str, Any]:
        """Append the signed run_end and fsync. `totals` are plain counters (ints)."""
        records = self.manifest.seq - self.first_seq + 1
        self._finished = self.manifest.append_signed({
            "type": RUN_END, "run": self.run_id, "command": self.command, "project": self.loaded.config.project,
            "status": status, "started": self.started, "records": records, "totals": dict(totals),
        }, self.signing_key)
        self.manifest.close()
        return self._finished

    def abandon(self) -> None:
        """Close the manifest without a run_end, as a kill would leave it: the state or the
        manifest cannot be written (`StateUnwritable`), so the next run records this one as
        interrupted. What is still buffered and cannot be written is a torn last line, which the
        next opening cuts and records."""
        with contextlib.suppress(st.StateUnwritable):
            self.manifest.close()

    def publish(self, destinations: list[str], sinks: "DestinationSinks | None" = None) -> tuple[list[str], list[str]]:
        """Copy the manifest to `_exitplan/<project>/manifest.jsonl` in each destination: (written,
        notes on failures). A failure is not the run's: the copy is refreshed by the next run.
        `sinks`: the run's open sinks (else opened for this and closed)."""
        from engine.endpoints import publish_file

        written, notes = publish_file(self.loaded, destinations, self.manifest.path,
                                      manifest_object_key(self.loaded.config.project), "the manifest",
                                      content_type="application/x-ndjson",
                                      metadata={"exitplan-format": MANIFEST_FORMAT}, sinks=sinks)
        self.copy_urls = [url for _, url in written]
        return [label for label, _ in written], notes

    def outcome(self, copies: list[str] | None = None, notes: list[str] | None = None) -> AuditOutcome:
        end = self._finished or {}
        return AuditOutcome(self.manifest.path, self.manifest.seq - self.first_seq, self.manifest.prev or "",
                            bool(end.get("signature")), tuple(copies or ()), tuple(notes or ()),
                            tuple(u.run for u in self.interrupted),
                            tuple(repair_sentence(r) for r in self.manifest.repairs), tuple(self.copy_urls))


class MigrationAudit(RunAudit):
    """The `migrate` side: transfer records from the state rows (see the module docstring)."""

    def __init__(self, loaded: "LoadedConfig", state: st.StateStore, datasets: list[str],
                 verdicts: Mapping[str, "DestinationVerdict"], key_ids: Mapping[str, int | None],
                 signing_key: Ed25519PrivateKey | None):
        """Opens the migration run (see `RunAudit`); the caller holds the project's migration lock."""
        self.state = state
        self.verdicts = verdicts
        self.key_ids = dict(key_ids)
        self._endpoints: dict[str, tuple[ObjectSource | None, HeadReader | None]] = {}
        super().__init__(loaded, "migrate", datasets, signing_key, state, exclusive=True)

    def end(self, status: str) -> dict[str, Any]:
        """Record what is still unrecorded in the run's datasets (a dataset cut short by an error or
        an interrupt), then the signed run_end with the run's totals from the state store."""
        for name in self.datasets:
            self.record_transfers(name, *self._endpoints.get(name, (None, None)))
        run = self.state.get_run(self.run_id)
        return self.finish(status, {k: getattr(run, k) for k in (
            "objects_total", "objects_ok", "objects_failed", "objects_skipped", "bytes_total", "bytes_sent")})

    def record_not_carried(self, dataset: str, counts: Mapping[str, tuple[int, int]]) -> None:
        """A `not_carried` record for `dataset`: what this run's listing of it named and the run does
        not carry (snapshots, earlier versions, rows of an inventory report), objects and bytes per
        reason. Nothing when the listing named nothing of the kind."""
        if not counts:
            return
        ds = self.loaded.config.datasets[dataset]
        self.manifest.append({
            "type": NOT_CARRIED, "run": self.run_id, "dataset": dataset,
            "source": {"kind": self.loaded.config.sources[ds.source].kind, "name": ds.source,
                       "container": ds.container, "prefix": ds.prefix},
            "not_carried": [{"reason": reason, "objects": objects, "bytes": size}
                            for reason, (objects, size) in sorted(counts.items())],
        })

    def record_transfers(self, dataset: str, source: ObjectSource | None = None, sink: HeadReader | None = None) -> int:
        """Append a transfer record for each copied row of `dataset` not recorded yet; returns how many.
        `source` (the dataset's `ObjectSource`) names the Azure account; `sink` is used to read the
        key id of rows from earlier runs (one HEAD each: rare, a killed run's rows)."""
        if source is not None or sink is not None:
            self._endpoints[dataset] = (source, sink)
        ds = self.loaded.config.datasets[dataset]
        src_cfg = self.loaded.config.sources[ds.source]
        account = getattr(source, "account", None) or _account_of(src_cfg)
        verdict = self.verdicts[ds.destination]
        marks = _Marks(self.state)
        for row in self.state.unaudited(dataset, st.COPIED):
            key_id = self.key_ids.get(dataset)
            if ds.public:
                encryption = None
            else:
                if row.run_id != self.run_id:
                    key_id = _key_id_at_destination(sink, row.dest_key)
                from engine.crypto.tink_format import FORMAT_ID

                encryption = {"format": FORMAT_ID, "key_id": key_id}
            source = {"kind": src_cfg.kind, "name": ds.source, "account": account, "container": ds.container,
                      "key": row.source_key, "etag": row.source_etag, "size": row.size,
                      "content_md5": row.source_md5, "content_md5_checked": bool(row.md5_checked)}
            earlier = history_of(row.source_key) if ds.history == "all" else None
            if earlier is not None:  # a snapshot or an earlier version, carried under its history key
                source.update({"blob": earlier[0], "snapshot" if earlier[1] == "snapshot" else "version_id": earlier[2]})
            record = self.manifest.append({
                "type": TRANSFER, "run": row.run_id, "recorded_in_run": self.run_id, "late": row.run_id != self.run_id,
                "dataset": dataset, "source": source,
                "plaintext_sha256": row.sha256,
                "destination": {"name": ds.destination, "provider": verdict.provider.name,
                                "legal_entity": verdict.provider.legal_entity,
                                "jurisdiction": verdict.provider.jurisdiction, "region": verdict.region,
                                "bucket": verdict.bucket, "key": row.dest_key, "etag": row.dest_etag,
                                "size": row.output_size, "parts": row.part_count,
                                **({"storage_class": row.storage_class} if row.storage_class else {}),
                                # False: the destination's ETags are opaque, only a deep verify proves the bytes
                                "etag_checked": row.etag_checked},
                "encryption": encryption,
                "restarts": row.restarts,
                "started": iso(row.started_at), "finished": iso(row.finished_at),
            })
            marks.add(row.id, record["seq"])
        marks.flush()  # before reading the removals: the same table decides what they are
        for row in self.state.unaudited(dataset, (st.REMOVED,)):
            record = self.manifest.append({
                "type": REMOVAL, "run": row.run_id, "recorded_in_run": self.run_id,
                "late": row.run_id != self.run_id, "dataset": dataset,
                "source": {"kind": src_cfg.kind, "name": ds.source, "account": account, "container": ds.container,
                           "key": row.source_key, "etag": row.source_etag, "size": row.size},
                "destination": {"name": ds.destination, "provider": verdict.provider.name,
                                "bucket": verdict.bucket, "key": row.dest_key},
                "reason": "gone from the source since it was copied; the destination copy was deleted "
                          "(migrate --delete-removed)",
                "deleted": iso(row.finished_at or row.updated_at),
            })
            marks.add(row.id, record["seq"])
        marks.flush()
        return marks.count


class _Marks:
    """Which manifest line records which state row, written `MARKS_PER_TRANSACTION` at a time
    (one transaction per row cost as much as the row's copy, for small objects). The lines are
    written and flushed first: a kill before a batch's marks makes the next run record those rows
    again (at worst repeated records, never a row left unrecorded)."""

    def __init__(self, state: Any):
        self.state = state
        self.pending: list[tuple[int, int]] = []
        self.count = 0

    def add(self, object_id: int, seq: int) -> None:
        self.pending.append((object_id, seq))
        self.count += 1
        if len(self.pending) >= MARKS_PER_TRANSACTION:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.state.mark_audited(lines=self.pending)
            self.pending = []


def _account_of(src_cfg: Any) -> str | None:
    url = getattr(src_cfg, "account_url", None)
    if url:
        from urllib.parse import urlsplit

        return (urlsplit(url).hostname or "").split(".")[0] or None
    return None


def _key_id_at_destination(sink: HeadReader | None, dest_key: str | None) -> int | None:
    if sink is None or not dest_key:
        return None
    from connectors.base import ConnectorError
    from engine.crypto.tink_format import FormatError, read_object_metadata

    try:
        return read_object_metadata(sink.head(dest_key).metadata, what=repr(dest_key)).key_id
    except (ConnectorError, FormatError):
        return None
