"""Restore: read a dataset back from its destination, decrypt it, and write the plaintext where the
user asked, each file checked against the plaintext SHA-256 recorded when it was copied.

The exit is only real if the data can come back. Plaintext touches the disk only under the
directory the user named, first as `NAME.exitplan-partial` (removed on any failure) and renamed
into place once the whole object authenticated and its digest matched. Memory per object is
bounded by the read size (`READ_SEGMENTS` segments), whatever the object's size.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from config.models import LoadedConfig
from connectors.base import ConnectorError, ObjectMeta, ObjectSource

from .crypto.datakeys import DataKeys, KeysetError
from .crypto.tink_format import SEGMENT_SIZE, FormatError, decrypt_object, key_for, read_object_metadata
from .endpoints import open_sink
from .errors import RunError, call_endpoint
from .keys import load_data_keys
from .project import open_state

READ_SEGMENTS = 8  # ciphertext read per request: 8 MiB, whole segments
PARTIAL_SUFFIX = ".exitplan-partial"
CONTROL_PREFIX = "_exitplan/"  # exitplan's own files in a bucket (the keyset copies, the manifest)


@dataclass(frozen=True)
class RestoredObject:
    source_key: str
    dest_key: str
    path: Path | None
    size: int
    status: str  # "ok", "failed"
    reason: str | None = None
    digest_checked: bool = False


@dataclass(frozen=True)
class RestoreSummary:
    dataset: str
    objects: int
    ok: int
    failed: int
    bytes: int
    unchecked: int  # restored, but no recorded digest to compare with (no state for them)
    failures: tuple[tuple[str, str], ...]

    @property
    def all_ok(self) -> bool:
        return self.failed == 0


def safe_relative_path(source_key: str) -> PurePosixPath:
    """The key as a relative path under the target directory; ValueError if it could escape it."""
    parts = source_key.split("/")
    if not source_key or source_key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{source_key!r} cannot be written as a file safely (empty, absolute, '.' or '..' parts)")
    if "\x00" in source_key:
        raise ValueError(f"{source_key!r} contains a NUL byte")
    return PurePosixPath(*parts)


def _ciphertext_chunks(source: ObjectSource, meta: ObjectMeta, size: int) -> Iterator[bytes]:
    step = READ_SEGMENTS * SEGMENT_SIZE
    for start in range(0, size, step):
        yield source.read_range(meta.key, start, min(start + step, size), if_match=meta.etag)


def restore_object(source: ObjectSource, meta: ObjectMeta, *, dataset: str, source_key: str, target: Path,
                   keys: DataKeys | None, expected_sha256: str | None) -> RestoredObject:
    """Restore one object to `target` (a file path); never raises for a failure of that object."""
    partial = target.with_name(target.name + PARTIAL_SUFFIX)

    def failed(reason: str) -> RestoredObject:
        partial.unlink(missing_ok=True)
        return RestoredObject(source_key, meta.key, None, meta.size, "failed", reason)

    try:
        head = source.head(meta.key)
        if keys is not None:
            info = read_object_metadata(head.metadata, what=repr(meta.key))
            # Bind to place: the associated data must be the one of *this* dataset and source key.
            info.check_place(dataset, source_key)
            if head.size != info.ciphertext_size:
                return failed(f"it holds {head.size:,} bytes, but {info.ciphertext_size:,} of ciphertext were written")
            plaintext = decrypt_object(key_for(keys, info), info.associated_data,
                                       _ciphertext_chunks(source, head, head.size), plaintext_size=info.plaintext_size)
        else:
            plaintext = _ciphertext_chunks(source, head, head.size)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        written = 0
        with open(partial, "wb") as out:
            for chunk in plaintext:
                digest.update(chunk)
                out.write(chunk)
                written += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            return failed(f"the restored bytes have SHA-256 {digest.hexdigest()}, but {expected_sha256} was recorded "
                          "from the source when it was copied")
        os.replace(partial, target)
        return RestoredObject(source_key, meta.key, target, written, "ok", digest_checked=expected_sha256 is not None)
    except (FormatError, KeysetError) as exc:
        return failed(str(exc))
    except ConnectorError as exc:
        return failed(f"reading it back failed: {exc}")
    except OSError as exc:
        return failed(f"writing {target} failed: {exc}")


def restore_dataset(loaded: LoadedConfig, dataset: str, to_dir: Path, *, prefix: str = "",
                    keys: DataKeys | None, recorded: Callable[[str], str | None],
                    on_object: Callable[[RestoredObject], None] | None = None) -> RestoreSummary:
    """Restore every object of `dataset` under `prefix` (relative to the dataset) into `to_dir`.

    `recorded(source_key)` gives the plaintext SHA-256 recorded when the object was copied (None
    when unknown). Objects are restored in parallel (`transfer.concurrency`), each streamed.
    """
    ds = loaded.config.datasets[dataset]
    sink = call_endpoint(f"destination `{ds.destination}`", open_sink, loaded, ds.destination)
    to_dir = to_dir.resolve()
    listing_prefix = ds.dest_prefix + prefix
    lock = threading.Lock()
    results = {"objects": 0, "ok": 0, "failed": 0, "bytes": 0, "unchecked": 0}
    failures: list[tuple[str, str]] = []

    def one(meta: ObjectMeta) -> None:
        rel_key = meta.key[len(ds.dest_prefix):]
        source_key = ds.prefix + rel_key
        try:
            target = to_dir / safe_relative_path(rel_key)
        except ValueError as exc:
            result = RestoredObject(source_key, meta.key, None, meta.size, "failed", str(exc))
        else:
            result = restore_object(sink, meta, dataset=dataset, source_key=source_key, target=target, keys=keys,
                                    expected_sha256=recorded(source_key))
        with lock:
            results["objects"] += 1
            if result.status == "ok":
                results["ok"] += 1
                results["bytes"] += result.size
                results["unchecked"] += not result.digest_checked
            else:
                results["failed"] += 1
                if len(failures) < 100:
                    failures.append((meta.key, result.reason or "unknown"))
        if on_object:
            on_object(result)

    try:
        with ThreadPoolExecutor(max_workers=loaded.config.transfer.concurrency, thread_name_prefix="exitplan-restore") as pool:
            in_flight = threading.Semaphore(loaded.config.transfer.concurrency * 2)
            for meta in sink.list(listing_prefix):
                if meta.key.startswith(CONTROL_PREFIX) or meta.key.endswith("/"):
                    continue
                in_flight.acquire()
                pool.submit(one, meta).add_done_callback(lambda _f: in_flight.release())
    except ConnectorError as exc:
        raise RunError(f"listing {sink.label}/{listing_prefix}: {exc}", exc) from None
    return RestoreSummary(dataset, results["objects"], results["ok"], results["failed"], results["bytes"],
                          results["unchecked"], tuple(failures))


def restore(loaded: LoadedConfig, dataset: str, to_dir: Path, *, prefix: str = "",
            on_object: Callable[[RestoredObject], None] | None = None) -> RestoreSummary:
    """Read `dataset` back from its destination into `to_dir`, decrypted and checked against the
    plaintext SHA-256 recorded at copy time (`exitplan restore`). Keys are unwrapped first; the
    state store is only read (without it, nothing is checked against a recorded digest)."""
    keys = None
    if not loaded.config.datasets[dataset].public:
        keys = load_data_keys(loaded)
    state = open_state(loaded, read_only=True)

    def recorded(source_key: str) -> str | None:
        if state is None:
            return None
        row = state.last_copy(dataset, source_key)
        return row.sha256 if row else None

    try:
        return restore_dataset(loaded, dataset, to_dir, prefix=prefix, keys=keys, recorded=recorded,
                               on_object=on_object)
    finally:
        if state is not None:
            state.close()
