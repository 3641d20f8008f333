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
  `verify`), ``run_end``;
- ``seq``: its 0-based line number in the manifest;
- ``prev``: the SHA-256 (hex) of the previous line's bytes (without its newline); null on the first;
- ``time``: when it was written (UTC, ISO 8601, ``Z``).

A ``run_end`` record is signed with the project's Ed25519 audit key (`engine.keys`): ``signature``
is the base64 of the Ed25519 signature over the canonical line of the record *without* its
``signature`` field. Because each record names the hash of the one before, a ``run_end``
signature covers every line before it, including those of an earlier run that was killed before
its own ``run_end``. Lines after the last ``run_end`` are not covered until the next run ends.

What the manifest cannot prove alone: that nothing was cut off after a signed ``run_end`` (drop
whole runs from the end and the rest still checks). Keep the last record hash somewhere else too:
`exitplan report` prints it, and every copy next to the data carries it.

Which objects are recorded: a `transfer` record is written for every state row that reached
uploaded (or verified) and was not recorded yet, in row order, after each dataset of a run and at
its end, read back from the state store (`engine.state` tables; times and digests come from the
rows). Which rows are recorded is kept in the state database (its ``audit_recorded`` table,
`StateStore.unaudited` and `mark_audited`): a run killed before its records were written has them
written by the next run (``late: true``). A kill between a line and its mark can at worst repeat
a record.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from config.errors import ExitCode, UserError
from engine import state as st

if TYPE_CHECKING:
    from config.models import LoadedConfig
    from config.policy import DestinationVerdict
    from connectors.base import HeadReader, ObjectSource

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
RECORD_TYPES = (CHAIN_START, RUN_START, TRANSFER, REMOVAL, VERIFY, RUN_END)


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


class AuditManifest:
    """An open manifest, appended to under a lock (records come from worker threads).

    Opening reads only the file's last line (for `seq` and `prev`). A last line without its
    newline is the torn write of a killed process, never a whole record: it is cut off (and
    logged) so that the chain goes on from the last complete record. An empty or new file starts
    with a `chain_start` record. Each record is written with one `write` and flushed; `sync`
    (called at the end of each run) fsyncs the file. One process at a time appends: an exclusive
    `flock` on `manifest.jsonl.lock` is held from open to close (a second run of the same project,
    a verify during a migrate, gets a `ManifestError` at once instead of forking the chain).
    """

    def __init__(self, path: Path, project: str, public_key: Ed25519PublicKey | None):
        import fcntl

        self.path = path
        self.project = project
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._flock = open(path.with_name(path.name + ".lock"), "a+b")
        try:
            fcntl.flock(self._flock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._flock.close()
            raise ManifestError(f"{path} is being written by another exitplan run of project `{project}` "
                                "(a migrate or verify still going); run this one once it has finished") from None
        try:
            last = _read_last_line(path)
            self._file = open(path, "ab")
        except BaseException:
            self._flock.close()
            raise
        if last is None:
            self.seq = 0
            self.prev: str | None = None
            self.append({
                "type": CHAIN_START, "format": MANIFEST_FORMAT, "project": project,
                "audit_public_key_sha256": public_key_fingerprint(public_key) if public_key else None,
            })
        else:
            try:
                record = json.loads(last)
                self.seq = int(record["seq"]) + 1
            except (ValueError, KeyError, TypeError):
                self._file.close()
                self._flock.close()
                raise ManifestError(f"{path}: the last line is not a manifest record; check the file "
                                    "(`exitplan audit verify`) or move it aside to start a new chain") from None
            self.prev = line_hash(last)

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write `record` with its `type` given, adding `seq`, `prev` and `time` (unless given)."""
        with self._lock:
            full = dict(record, seq=self.seq, prev=self.prev)
            full.setdefault("time", _now())
            line = canonical(full).encode("utf-8")
            self._file.write(line + b"\n")
            self._file.flush()
            self.seq += 1
            self.prev = line_hash(line)
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
            line = canonical(full).encode("utf-8")
            self._file.write(line + b"\n")
            self._file.flush()
            self.seq += 1
            self.prev = line_hash(line)
            return full

    def sync(self) -> None:
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self._flock.close()  # releases the flock

    def __enter__(self) -> "AuditManifest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def _read_last_line(path: Path) -> bytes | None:
    """The last complete line of `path` without its newline (None if the file is empty or absent),
    read from the end; a torn last line (no newline) is truncated away first."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return None
    with f:
        size = f.seek(0, os.SEEK_END)
        last_nl = _rfind_newline(f, size)
        if last_nl != size - 1:  # a torn write: bytes after the last newline
            keep = last_nl + 1
            log.warning("%s: a torn last line (%d bytes, a write cut by a kill) is removed", path, size - keep)
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
            size = keep
        if size == 0:
            return None
        start = _rfind_newline(f, size - 1) + 1
        f.seek(start)
        return f.read(size - 1 - start)


# ---------------------------------------------------------------------------------------------
# Checking a manifest
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestProblem:
    line: int  # 1-based
    message: str


@dataclass(frozen=True)
class ManifestCheck:
    """What `verify_manifest` found. `ok` when the chain holds, every `run_end` signature verifies
    and the last line is a signed `run_end`."""

    path: Path
    records: int
    runs_signed: int
    last_hash: str | None
    file_sha256: str
    problems: tuple[ManifestProblem, ...]
    problems_truncated: bool = False
    counts: Mapping[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def verify_manifest(path: Path, public_key: Ed25519PublicKey, *, max_problems: int = 50) -> ManifestCheck:
    """Check `path` line by line (streamed): canonical form, `seq`, `prev` against the previous
    line's hash, every `run_end` signature with `public_key`, and that nothing follows the last
    `run_end` unsigned. Each problem names its line and what is wrong; the check goes on after
    a problem (the chain is re-anchored on the line as found), so one altered line gives one or
    two problems, not one per line after it."""
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
                else:
                    problem(n, f"prev {record.get('prev')!r} is not the SHA-256 of line {n - 1} ({prev}): line {n - 1} "
                               f"was changed, or lines were removed, inserted or reordered between them")
            if n == 1 and kind != CHAIN_START:
                problem(n, f"the first record is {kind!r}, not {CHAIN_START!r}: the start of the chain is missing")
            if kind not in RECORD_TYPES:
                problem(n, f"unknown record type {kind!r}")
            if kind == RUN_END:
                sig = record.get("signature")
                if not isinstance(sig, str):
                    problem(n, "the run_end record is not signed (signature is null: the project has no audit key)")
                else:
                    try:
                        public_key.verify(base64.b64decode(sig, validate=True), signed_payload(record))
                        runs_signed += 1
                        signed_through = n
                    except (InvalidSignature, ValueError):
                        problem(n, f"the run_end signature does not verify with the given public key "
                                   f"(sha256 {fingerprint[:16]}…): the record was altered or signed by another key")
            prev = line_hash(line)
    if n == 0:
        problem(0, "the manifest is empty")
    elif signed_through < n and kind != RUN_END:  # a last run_end that does not verify is named already
        first = signed_through + 1
        problem(first, f"lines {first}-{n} are not covered by a signed run_end (a run still going, a killed run, "
                       "or the end of the file was cut or altered)" if first < n else
                       f"line {n} is not covered by a signed run_end (a run still going, a killed run, "
                       "or the end of the file was cut or altered)")
    return ManifestCheck(path, n, runs_signed, prev, file_digest.hexdigest(), tuple(problems), truncated, counts)


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
    """The audit trail of one run (migrate or verify): run_start when created, records in between,
    a signed run_end at `finish`, then the copy next to the data (`publish`)."""

    def __init__(self, loaded: "LoadedConfig", command: str, run_id: int, datasets: list[str],
                 signing_key: Ed25519PrivateKey | None, **details: Any):
        self.loaded = loaded
        self.command = command
        self.run_id = run_id
        self.datasets = list(datasets)
        self.signing_key = signing_key
        self.manifest = open_manifest(loaded, signing_key)
        self.first_seq = self.manifest.seq
        self.started = _now()
        self.manifest.append({"type": RUN_START, "run": run_id, "command": command, "project": loaded.config.project,
                              "datasets": self.datasets, **details})
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

    def publish(self, destinations: list[str]) -> tuple[list[str], list[str]]:
        """Copy the manifest to `_exitplan/<project>/manifest.jsonl` in each destination: (written,
        notes on failures). A failure is not the run's: the copy is refreshed by the next run."""
        from connectors.base import ConnectorError, ContentSettings, WriteMeta
        from engine.endpoints import open_sink

        written, notes = [], []
        key = manifest_object_key(self.loaded.config.project)
        meta = WriteMeta(ContentSettings(content_type="application/x-ndjson"), {"exitplan-format": MANIFEST_FORMAT})
        for dest in sorted(set(destinations)):
            try:
                sink = open_sink(self.loaded, dest)
                with open(self.manifest.path, "rb") as body:
                    size = os.fstat(body.fileno()).st_size
                    sink.put(key, body, size, meta, None)
                written.append(f"{sink.label}/{key}")
            except (ConnectorError, OSError) as exc:
                notes.append(f"the manifest could not be copied to destination `{dest}` ({exc}); the next run copies it")
        return written, notes

    def outcome(self, copies: list[str] | None = None, notes: list[str] | None = None) -> AuditOutcome:
        end = self._finished or {}
        return AuditOutcome(self.manifest.path, self.manifest.seq - self.first_seq, self.manifest.prev or "",
                            bool(end.get("signature")), tuple(copies or ()), tuple(notes or ()))


class MigrationAudit(RunAudit):
    """The `migrate` side: transfer records from the state rows (see the module docstring)."""

    def __init__(self, loaded: "LoadedConfig", state: st.StateStore, run_id: int, datasets: list[str],
                 verdicts: Mapping[str, "DestinationVerdict"], key_ids: Mapping[str, int | None],
                 signing_key: Ed25519PrivateKey | None):
        self.state = state
        self.verdicts = verdicts
        self.key_ids = dict(key_ids)
        self._endpoints: dict[str, tuple[ObjectSource | None, HeadReader | None]] = {}
        super().__init__(loaded, "migrate", run_id, datasets, signing_key)

    def end(self, status: str) -> dict[str, Any]:
        """Record what is still unrecorded in the run's datasets (a dataset cut short by an error or
        an interrupt), then the signed run_end with the run's totals from the state store."""
        for name in self.datasets:
            self.record_transfers(name, *self._endpoints.get(name, (None, None)))
        run = self.state.get_run(self.run_id)
        return self.finish(status, {k: getattr(run, k) for k in (
            "objects_total", "objects_ok", "objects_failed", "objects_skipped", "bytes_total", "bytes_sent")})

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
        n = 0
        for row in self.state.unaudited(dataset, st.COPIED):
            key_id = self.key_ids.get(dataset)
            if ds.public:
                encryption = None
            else:
                if row.run_id != self.run_id:
                    key_id = _key_id_at_destination(sink, row.dest_key)
                from engine.crypto.tink_format import FORMAT_ID

                encryption = {"format": FORMAT_ID, "key_id": key_id}
            record = self.manifest.append({
                "type": TRANSFER, "run": row.run_id, "recorded_in_run": self.run_id, "late": row.run_id != self.run_id,
                "dataset": dataset,
                "source": {"kind": src_cfg.kind, "name": ds.source, "account": account, "container": ds.container,
                           "key": row.source_key, "etag": row.source_etag, "size": row.size,
                           "content_md5": row.source_md5, "content_md5_checked": bool(row.md5_checked)},
                "plaintext_sha256": row.sha256,
                "destination": {"name": ds.destination, "provider": verdict.provider.name,
                                "legal_entity": verdict.provider.legal_entity,
                                "jurisdiction": verdict.provider.jurisdiction, "region": verdict.region,
                                "bucket": verdict.bucket, "key": row.dest_key, "etag": row.dest_etag,
                                "size": row.output_size, "parts": row.part_count},
                "encryption": encryption,
                "restarts": row.restarts,
                "started": iso(row.started_at), "finished": iso(row.finished_at),
            })
            self.state.mark_audited(row.id, record["seq"])
            n += 1
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
            self.state.mark_audited(row.id, record["seq"])
            n += 1
        return n


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
