"""Restore: read a dataset back from its destination, decrypt it, and write the plaintext where the
user asked, each file checked against the plaintext SHA-256 recorded when it was copied.

The exit is only real if the data can come back. Plaintext touches the disk only under the
directory the user named (`--to DIR`), and restore treats that directory as ground it does not
trust (it may hold links and files planted by others, and the dataset's keys may be hostile):

- Every path component below DIR is opened from its parent's descriptor without following a
  symbolic link (`O_NOFOLLOW | O_DIRECTORY`, `*at` calls): a link planted below DIR fails the
  object whose path goes through it; it is never followed.
- An object is written first into a private directory that restore creates inside DIR for the
  run (``.exitplan-restore-<random>``, mode 0700, `O_EXCL` names of its own, removed at the end):
  no object's temporary file can ever be another object's file, whatever the keys are. A failed
  object leaves nothing behind.
- Once the whole object authenticated, the file is flushed to disk and read back through the same
  descriptor: the SHA-256 compared with the recorded one is the one of the bytes the final name
  then holds (the file is ours, mode 0600, in a directory only we can enter).
- The final name is made with `link()`, which never replaces a name: an existing file (or link, or
  directory) fails the object with a sentence, unless `overwrite`, where `rename()` replaces a
  file or a link atomically (never a directory, never writing through a link).
- Files are created 0600 and directories 0700 (the umask can only take bits away).
- A key that cannot be a file name (a component longer than the filesystem allows, `a//b`, a key
  ending in `/` that holds bytes, the file `a` beside `a/b` in the same dataset: the directory
  wins, `placement.restore_path` and `FileBesideDirectory`) fails that object with a sentence, and
  is counted. A directory marker (0 bytes, named `x/` or carrying `hdi_isfolder=true`) becomes a
  directory.

Memory per object is bounded by the read size (`READ_SEGMENTS` segments), whatever its size.

`--to sftp://ENDPOINT/DIR` restores onto an SFTP server instead (engine/restore_sftp.py: the same
methods, the same rules as far as the protocol lets a client keep them).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import json
import logging
import os
import secrets
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping

from config.bandwidth import BandwidthTimetable
from config.errors import ExitCode, UserError
from config.models import LoadedConfig
from connectors.base import ConnectorError, ContentSettings, NotFound, ObjectMeta, ObjectSource, TagReader

from .crypto.datakeys import DataKeys, KeysetError
from .crypto.tink_format import SEGMENT_SIZE, FormatError, content_of, decrypt_object, key_for, read_object_metadata
from .endpoints import close_endpoint, open_sink
from .errors import RunError, call_endpoint
from .executors import BoundedTasks, create_pool
from .keys import load_data_keys
from .pacing import LocalLeaser, RunPacing, run_bandwidth
from .placement import (CONTROL_PREFIX, FileBesideDirectory, NotAPath, SourceProperties, clash_sentence,
                        dest_key_prefix, relative_key, restore_path, source_key_of, source_properties)
from .project import open_state

log = logging.getLogger(__name__)

READ_SEGMENTS = 8  # ciphertext read per request: 8 MiB, whole segments
READ_BACK = 1024 * 1024  # bytes per read when a restored file is hashed back from the disk
PRIVATE_PREFIX = ".exitplan-restore-"  # + 32 random hex digits: the run's private directory in DIR
FILE_MODE = 0o600
DIR_MODE = 0o700
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# link() fails with these where the filesystem has no hard links (FAT, exFAT, some FUSE mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK}
# The file in DIR listing, per restored object, the properties a file cannot hold (docs/FORMAT.md).
SIDECAR = ".exitplan-properties.jsonl"


@dataclass(frozen=True)
class RestoredObject:
    source_key: str
    dest_key: str
    path: Path | str | None  # str: on an SFTP server (`sftp://host:port/path`)
    size: int
    status: str  # "ok", "failed"
    reason: str | None = None
    digest_checked: bool = False
    # The object's line in the sidecar (`sidecar_record`): what a file cannot hold of it.
    properties: dict | None = None


@dataclass(frozen=True)
class RestoreSummary:
    dataset: str
    objects: int
    ok: int
    failed: int
    bytes: int
    unchecked: int  # restored, but no recorded digest to compare with (no state for them)
    failures: tuple[tuple[str, str], ...]
    # Where the restored objects' other properties were written (`SIDECAR`), or why they were not.
    sidecar: Path | str | None = None
    sidecar_problem: str | None = None

    @property
    def all_ok(self) -> bool:
        return self.failed == 0 and self.sidecar_problem is None


class TargetRefused(Exception):
    """One object cannot be written under the target directory; the message is the sentence."""


@dataclass(frozen=True)
class TargetName:
    """Where one object goes below the target directory: its path components, and whether it is
    a directory marker (a key ending in ``/``, restored as a directory)."""

    parts: tuple[str, ...]
    directory: bool = False


@dataclass(frozen=True)
class Temporary:
    """An object's file while it is written: `name` in the private directory, open as `file`."""

    name: str
    file: BinaryIO


def target_name(rel_key: str, size: int, metadata: Mapping[str, str] | None, *, name_max: int, private_name: str,
                where: str) -> TargetName:
    """Where the object whose key below the dataset is `rel_key` (`size` plaintext bytes,
    `metadata` its user metadata) goes below the target `where`: a directory for a directory
    marker, else a file (`placement.restore_path`, the rule inventory applies too); `TargetRefused`
    when the key cannot be a path below the directory (escapes it, a component longer than
    `name_max` bytes, the run's private directory or the properties file)."""
    try:
        parts, directory = restore_path(rel_key, size, metadata or {})
    except NotAPath as exc:
        raise TargetRefused(str(exc)) from None
    for part in parts:
        length = len(os.fsencode(part))
        if length > name_max:
            raise TargetRefused(f"the name {_short(part)} is {length:,} bytes long, and the filesystem of "
                                f"{where} allows at most {name_max} bytes per name")
    if parts[0] == private_name:
        raise TargetRefused(f"{parts[0]} is the name of restore's own private directory in this run")
    if parts == (SIDECAR,):
        raise TargetRefused(f"{SIDECAR} is the name of the file where restore lists the objects' properties; "
                            "restore this object with --prefix into another directory")
    return TargetName(parts, directory)


class TargetDirectory:
    """The directory one restore writes into, held open by descriptor for the whole restore, with
    the run's private directory inside it. See the module docstring for what it guarantees.

    `overwrite`: replace a file or link already at an object's name (default: the object fails).
    Thread-safe: objects are placed from the restore's worker threads."""

    def __init__(self, path: Path, root_fd: int, private_name: str, private_fd: int, *, overwrite: bool):
        self.path = path
        self.overwrite = overwrite
        self._root_fd = root_fd
        self._private_name = private_name
        self._private_fd = private_fd
        self._name_max = os.fpathconf(root_fd, "PC_NAME_MAX")
        self._temporaries = itertools.count(1)
        self._no_links_lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, *, overwrite: bool = False) -> TargetDirectory:
        """Open `path` (created 0700 with its missing parents), and create the private directory.
        `path` itself may be a link the user chose; nothing below it is followed."""
        path = Path(os.path.abspath(path))
        try:
            missing = []
            parent = path
            while not os.path.lexists(parent):
                missing.append(parent)
                parent = parent.parent
            for directory in reversed(missing):
                try:
                    os.mkdir(directory, DIR_MODE)
                except FileExistsError:
                    pass
            root_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise UserError(f"--to {path}: {(exc.strerror or str(exc)).lower()}; name a directory you can create "
                            "and write to", ExitCode.USAGE) from None
        private_name = PRIVATE_PREFIX + secrets.token_hex(16)
        try:
            os.mkdir(private_name, DIR_MODE, dir_fd=root_fd)
            private_fd = os.open(private_name, _DIR_FLAGS, dir_fd=root_fd)
        except OSError as exc:
            os.close(root_fd)
            raise UserError(f"--to {path}: restore cannot create its private directory there "
                            f"({(exc.strerror or str(exc)).lower()}); name a directory you can write to",
                            ExitCode.USAGE) from None
        return cls(path.resolve(), root_fd, private_name, private_fd, overwrite=overwrite)

    def close(self) -> None:
        """Remove the private directory (empty: every object removes its temporary file) and close."""
        try:
            os.rmdir(self._private_name, dir_fd=self._root_fd)
        except OSError as exc:
            log.warning("restore's private directory %s could not be removed: %s", self.path / self._private_name,
                        exc.strerror)
        finally:
            os.close(self._private_fd)
            os.close(self._root_fd)

    def __enter__(self) -> TargetDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- names ------------------------------------------------------------------------------------

    def name_for(self, rel_key: str, size: int = 0, metadata: Mapping[str, str] | None = None) -> TargetName:
        """Where the object whose key below the dataset is `rel_key` goes (`target_name`)."""
        return target_name(rel_key, size, metadata, name_max=self._name_max, private_name=self._private_name,
                           where=str(self.path))

    def shown(self, name: TargetName | tuple[str, ...]) -> Path:
        """The path a user reads for `name` (nothing is resolved)."""
        parts = name.parts if isinstance(name, TargetName) else name
        return self.path.joinpath(*parts)

    # ---- checks and placing -----------------------------------------------------------------------

    def check_free(self, name: TargetName) -> None:
        """`TargetRefused` now, before any byte is read, when the object could not be placed: a
        component of its path is a link or a file, or its name is taken (and not `overwrite`)."""
        parent = self._directory(name.parts if name.directory else name.parts[:-1], create=False)
        if parent is None or name.directory:
            if parent is not None:
                os.close(parent)
            return
        try:
            found = os.stat(name.parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise TargetRefused(self._os_sentence(exc, name.parts)) from None
        finally:
            os.close(parent)
        if stat.S_ISDIR(found.st_mode) or not self.overwrite:
            raise TargetRefused(self._taken(found, name.parts))

    @contextmanager
    def temporary(self) -> Iterator[Temporary]:
        """A new file of our own in the private directory (0600, opened read-write), removed on
        leaving (once placed, the final name holds it)."""
        name = f"{next(self._temporaries)}.partial"
        fd = os.open(name, _TEMP_FLAGS, FILE_MODE, dir_fd=self._private_fd)
        try:
            with os.fdopen(fd, "w+b") as file:
                yield Temporary(name, file)
        finally:
            try:
                os.unlink(name, dir_fd=self._private_fd)
            except FileNotFoundError:
                pass  # renamed into place

    @staticmethod
    def write_and_read_back(temporary: Temporary, plaintext: Iterable[bytes]) -> tuple[int, str, str]:
        """Write `plaintext` to the temporary file, flush it to the disk, and read it back through
        the same descriptor: (bytes written, SHA-256 of what was written, SHA-256 of what the
        file holds)."""
        return _write_and_read_back(temporary.file, plaintext)

    @staticmethod
    def set_modified(temporary: Temporary, when: float) -> None:
        os.utime(temporary.file.fileno(), (when, when))

    @staticmethod
    def append(temporary: Temporary, data: bytes) -> None:
        temporary.file.write(data)

    @staticmethod
    def seal(temporary: Temporary) -> None:
        """Everything appended is on the disk."""
        temporary.file.flush()
        os.fsync(temporary.file.fileno())

    def place(self, temporary: Temporary, name: TargetName) -> None:
        """Give the `temporary` file its final name: never replacing a name unless `overwrite`,
        never through a link; missing directories created 0700."""
        parent = self._directory(name.parts[:-1], create=True)
        final = name.parts[-1]
        source = temporary.name
        try:
            if self.overwrite:
                try:
                    os.replace(source, final, src_dir_fd=self._private_fd, dst_dir_fd=parent)
                except OSError as exc:
                    raise TargetRefused(self._os_sentence(exc, name.parts, parent)) from None
                return
            try:
                os.link(source, final, src_dir_fd=self._private_fd, dst_dir_fd=parent, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise TargetRefused(self._os_sentence(exc, name.parts, parent)) from None
                # No hard links here: look, then rename, under a lock so that no two objects of
                # this restore can take one name (e.g. `A` and `a` on a case-insensitive disk).
                with self._no_links_lock:
                    try:
                        found = os.stat(final, dir_fd=parent, follow_symlinks=False)
                    except FileNotFoundError:
                        os.rename(source, final, src_dir_fd=self._private_fd, dst_dir_fd=parent)
                    else:
                        raise TargetRefused(self._taken(found, name.parts)) from None
        finally:
            os.close(parent)

    def make_directory(self, name: TargetName) -> None:
        """Create the directory of a directory marker (0700), or find it there (not a link)."""
        os.close(self._directory(name.parts, create=True))

    # ---- internals --------------------------------------------------------------------------------

    def _directory(self, parts: tuple[str, ...], *, create: bool) -> int | None:
        """A descriptor on DIR/parts (the caller closes it), each component opened from its parent
        without following a link, and created 0700 when missing if `create`; None when one is
        missing and not `create`."""
        fd = os.dup(self._root_fd)
        try:
            for i, part in enumerate(parts):
                if create:
                    try:
                        os.mkdir(part, DIR_MODE, dir_fd=fd)
                    except FileExistsError:
                        pass
                    except OSError as exc:
                        raise TargetRefused(self._os_sentence(exc, parts[:i + 1], fd)) from None
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if create:
                        raise TargetRefused(f"{self.shown(parts[:i + 1])} disappeared while it was being "
                                            "created") from None
                    os.close(fd)
                    return None
                except OSError as exc:
                    raise TargetRefused(self._os_sentence(exc, parts[:i + 1], fd)) from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _os_sentence(self, exc: OSError, parts: tuple[str, ...], parent: int | None = None) -> str:
        """The sentence for `exc`, met at DIR/parts (whose parent directory is open as `parent`)."""
        where = self.shown(parts)
        if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.EEXIST, errno.EISDIR, errno.ENOTEMPTY) \
                and parent is not None:
            try:
                found = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            except OSError:
                pass
            else:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):  # the name itself is taken
                    return self._taken(found, parts)
                if stat.S_ISLNK(found.st_mode):
                    return (f"{where} is a symbolic link; restore never follows a link below {self.path}: "
                            "remove it, or restore into an empty directory")
                return (f"{where} is a file, not a directory, so nothing can be written below it "
                        "(another object of the dataset has that name, or the file was there before)")
        if exc.errno == errno.ENAMETOOLONG:
            return f"{where} is a name longer than the filesystem of {self.path} allows"
        if exc.errno == errno.EXDEV:
            return f"{where} is on another filesystem than {self.path} (a mount point below it); restore there directly"
        return f"writing {where} failed: {exc.strerror}"

    def _taken(self, found: os.stat_result, parts: tuple[str, ...]) -> str:
        where = self.shown(parts)
        if stat.S_ISDIR(found.st_mode):
            return (f"{where} is a directory (another object's key continues below this name, or it was there "
                    "before), so the object cannot be written as a file")
        kind = "a symbolic link" if stat.S_ISLNK(found.st_mode) else "a file"
        return f"{where} exists already ({kind}); restore never replaces a file unless --overwrite is given"


def _short(name: str) -> str:
    return repr(name) if len(name) <= 60 else repr(name[:40] + "…" + name[-12:])


def _ciphertext_chunks(source: ObjectSource, meta: ObjectMeta, size: int) -> Iterator[bytes]:
    step = READ_SEGMENTS * SEGMENT_SIZE
    for start in range(0, size, step):
        yield source.read_range(meta.key, start, min(start + step, size), if_match=meta.etag)


def _write_and_read_back(file: BinaryIO, plaintext: Iterable[bytes]) -> tuple[int, str, str]:
    """Write `plaintext` to `file`, flush it to the disk, and read it back through the same
    descriptor: (bytes written, SHA-256 of what was written, SHA-256 of what the file holds)."""
    written_digest = hashlib.sha256()
    written = 0
    for chunk in plaintext:
        written_digest.update(chunk)
        file.write(chunk)
        written += len(chunk)
    file.flush()
    os.fsync(file.fileno())
    file.seek(0)
    on_disk = hashlib.sha256()
    buffer = bytearray(READ_BACK)
    view = memoryview(buffer)
    while n := file.readinto(buffer):
        on_disk.update(view[:n])
    return written, written_digest.hexdigest(), on_disk.hexdigest()


def restore_object(source: ObjectSource, meta: ObjectMeta, *, dataset: str, source_key: str, rel_key: str,
                   target, keys: DataKeys | None, expected_sha256: str | None,
                   below: str | None = None) -> RestoredObject:
    """Restore one object to `rel_key` below `target` (a `TargetDirectory`, or an
    `SftpTargetDirectory`); never raises for a failure of that object
    (the `RestoredObject` says why), and a failed object leaves no file behind. `below`: another
    key of the dataset that continues below `rel_key` (`FileBesideDirectory`): the object can then
    only be a directory marker."""
    shown: Path | str | None = None

    def failed(reason: str) -> RestoredObject:
        return RestoredObject(source_key, meta.key, None, meta.size, "failed", reason)

    try:
        head = source.head(meta.key)
        info = None
        size = head.size
        if keys is not None:
            info = read_object_metadata(head.metadata, what=repr(meta.key))
            # Bind to place: the associated data must be the one of *this* dataset and source key.
            info.check_place(dataset, source_key)
            if head.size != info.ciphertext_size:
                return failed(f"it holds {head.size:,} bytes, but {info.ciphertext_size:,} of ciphertext were written")
            size = info.plaintext_size
        tags, tags_unreadable = {}, None
        if isinstance(source, TagReader):
            try:
                tags = source.tags(meta.key)
            except NotFound:
                raise
            except ConnectorError as exc:  # a provider without the tagging API: the bytes still come back
                tags_unreadable = f"the destination did not give the object's tags: {exc}"
        properties = source_properties(head.metadata, tags)
        name = target.name_for(rel_key, size, properties.metadata)
        shown = target.shown(name)
        record = sidecar_record(source_key, name, size, content_of(head.metadata) if keys is not None else head.content,
                                properties)
        if tags_unreadable:
            record["tags_unreadable"] = tags_unreadable
        if below is not None and not name.directory:
            return failed(clash_sentence(rel_key, below))
        target.check_free(name)
        if info is not None:
            plaintext = decrypt_object(key_for(keys, info), info.associated_data,
                                       _ciphertext_chunks(source, head, head.size), plaintext_size=size)
        else:
            plaintext = _ciphertext_chunks(source, head, head.size)
        if name.directory:
            found = sum(len(chunk) for chunk in plaintext)
            if found:
                return failed(f"it is a directory marker, so it can only be restored as the directory {shown}, "
                              f"but it holds {found:,} bytes")
            digest = hashlib.sha256(b"").hexdigest()
            if expected_sha256 is not None and digest != expected_sha256:
                return failed(f"it is empty, but the source's SHA-256 {expected_sha256} was recorded when it was copied")
            target.make_directory(name)
            return RestoredObject(source_key, meta.key, shown, 0, "ok", digest_checked=expected_sha256 is not None,
                                  properties=record)
        with target.temporary() as temporary:
            written, sent, on_disk = target.write_and_read_back(temporary, plaintext)
            if written != size:
                return failed(f"{written:,} bytes were restored, but the object holds {size:,}")
            if on_disk != sent:
                return failed(f"the file written holds SHA-256 {on_disk}, not the {sent} of the bytes written to it")
            if expected_sha256 is not None and on_disk != expected_sha256:
                return failed(f"the restored bytes have SHA-256 {on_disk}, but {expected_sha256} was recorded "
                              "from the source when it was copied")
            modified = _timestamp(properties.last_modified)
            if modified is not None:  # the source's last-modified time, as the file's
                target.set_modified(temporary, modified)
            target.place(temporary, name)
        return RestoredObject(source_key, meta.key, shown, written, "ok", digest_checked=expected_sha256 is not None,
                              properties=record)
    except TargetRefused as exc:
        return failed(str(exc))
    except (FormatError, KeysetError) as exc:
        return failed(str(exc))
    except ConnectorError as exc:
        return failed(f"reading it back failed: {exc}")
    except OSError as exc:
        return failed(f"writing {shown or rel_key} failed: {exc.strerror or exc}")


def sidecar_record(source_key: str, name: TargetName, size: int, content: ContentSettings,
                   properties: SourceProperties) -> dict:
    """One object's line in the sidecar (docs/FORMAT.md): its path below DIR and what a file does
    not hold of the source blob (content headers, metadata with the source's names, tags, times,
    ETag). Empty fields are left out."""
    record: dict = {"key": source_key, "path": "/".join(name.parts) + ("/" if name.directory else ""), "size": size}
    headers = {k: v for k, v in dataclasses.asdict(content).items() if v is not None}
    source = {"created": properties.created, "last_modified": properties.last_modified, "etag": properties.etag,
              "kind": properties.kind, "tier": properties.tier}
    for field_name, value in (("content", headers), ("metadata", properties.metadata), ("tags", properties.tags),
                              ("source", {k: v for k, v in source.items() if v is not None})):
        if value:
            record[field_name] = value
    return record


def _timestamp(iso: str | None) -> float | None:
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() if iso else None
    except ValueError:
        return None


def open_target(to: Path | Callable[[], Any], *, overwrite: bool = False):
    """The directory `--to` names: a local one (`TargetDirectory`), or, given as the callable that
    opens it, another kind (`engine.restore_sftp.sftp_target_opener`: a directory on an SFTP server)."""
    if callable(to):
        return to()
    return TargetDirectory.open(Path(to), overwrite=overwrite)


def restore_dataset(loaded: LoadedConfig, dataset: str, to_dir: Path | Callable[[], Any], *, prefix: str = "",
                    keys: DataKeys | None, recorded: Callable[[str], str | None],
                    on_object: Callable[[RestoredObject], None] | None = None,
                    overwrite: bool = False, bandwidth: BandwidthTimetable | None = None) -> RestoreSummary:
    """Restore every object of `dataset` under `prefix` (relative to the dataset) into `to_dir`.

    `recorded(source_key)` gives the plaintext SHA-256 recorded when the object was copied (None
    when unknown). Objects are restored in parallel (`transfer.concurrency`, at most twice that
    many listed ahead), each streamed; `on_object` gets each one's outcome, in this thread. An
    object whose restore raised (a defect, not a refusal) is counted as failed with the exception.
    `overwrite`: replace files already at objects' names (default: such an object fails).
    `bandwidth`: bytes per second read from the destination (default: `transfer.bandwidth`).
    """
    ds = loaded.config.datasets[dataset]
    concurrency = loaded.config.transfer.concurrency
    # One process: the request rates and the bandwidth are paced here, not through the state
    # (a restore only reads it); the rates are the destination's, as for a migration.
    pacing = RunPacing(loaded, LocalLeaser(), concurrency,
                       bandwidth=run_bandwidth(loaded, bandwidth or loaded.config.transfer.bandwidth_timetable))
    sink = call_endpoint(f"destination `{ds.destination}`", partial(open_sink, pacer=pacing.for_sink(ds.destination)),
                         loaded, ds.destination)
    try:
        listing_prefix = dest_key_prefix(ds.dest_prefix) + prefix
        totals = {"objects": 0, "ok": 0, "failed": 0, "bytes": 0, "unchecked": 0}
        failures: list[tuple[str, str]] = []

        sidecar: Temporary | None = None

        def counted(meta: ObjectMeta, result: RestoredObject) -> None:
            totals["objects"] += 1
            if result.status == "ok":
                totals["ok"] += 1
                totals["bytes"] += result.size
                totals["unchecked"] += not result.digest_checked
                if result.properties is not None and sidecar is not None:
                    line = json.dumps(result.properties, ensure_ascii=False, sort_keys=True).encode() + b"\n"
                    target.append(sidecar, line)
            else:
                totals["failed"] += 1
                if len(failures) < 100:
                    failures.append((meta.key, result.reason or "unknown"))
            if on_object:
                on_object(result)

        def lost(meta: ObjectMeta, exc: BaseException) -> None:
            log.error("restoring %s failed", meta.key, exc_info=(type(exc), exc, exc.__traceback__))
            counted(meta, RestoredObject(source_key_of(meta.key, ds.prefix, ds.dest_prefix), meta.key, None, meta.size,
                                         "failed", f"internal error: {type(exc).__name__}: {exc}"))

        def rel_key_of(meta: ObjectMeta) -> tuple[str, str]:
            source_key = source_key_of(meta.key, ds.prefix, ds.dest_prefix)
            return source_key, relative_key(source_key, ds.prefix)

        def one(meta: ObjectMeta, target, below: str | None) -> RestoredObject:
            source_key, rel_key = rel_key_of(meta)
            return restore_object(sink, meta, dataset=dataset, source_key=source_key, rel_key=rel_key, target=target,
                                  keys=keys, expected_sha256=recorded(source_key), below=below)

        sidecar_path: Path | str | None = None
        sidecar_problem: str | None = None
        with open_target(to_dir, overwrite=overwrite) as target, target.temporary() as sidecar:
            try:
                with create_pool(concurrency, "exitplan-restore") as pool, \
                        BoundedTasks(pool, concurrency * 2, on_result=counted, on_error=lost) as tasks:
                    # A file whose name other keys continue below is held until the listing passes that
                    # name: the directory wins, whichever object a worker would have reached first.
                    clashes = FileBesideDirectory()
                    for meta in sink.list(listing_prefix):
                        if meta.key.startswith(CONTROL_PREFIX):
                            continue
                        for held, below in clashes.add(rel_key_of(meta)[1], meta, file=True):
                            tasks.submit(held, one, held, target, below)
                    for held, below in clashes.finish():
                        tasks.submit(held, one, held, target, below)
            except ConnectorError as exc:
                raise RunError(f"listing {sink.label}/{listing_prefix}: {exc}", exc) from None
            target.seal(sidecar)
            name = TargetName((SIDECAR,))
            try:
                target.place(sidecar, name)
                sidecar_path = target.shown(name)
            except TargetRefused as exc:
                sidecar_problem = (f"the objects' properties (content headers, metadata, tags, source times) were not "
                                   f"written: {exc}; restore again with --overwrite, or into another directory")
    finally:
        close_endpoint(sink, f"destination `{ds.destination}`")
    return RestoreSummary(dataset, totals["objects"], totals["ok"], totals["failed"], totals["bytes"],
                          totals["unchecked"], tuple(failures), sidecar_path, sidecar_problem)


def restore(loaded: LoadedConfig, dataset: str, to_dir: Path | Callable[[], Any], *, prefix: str = "",
            on_object: Callable[[RestoredObject], None] | None = None, overwrite: bool = False,
            bandwidth: BandwidthTimetable | None = None) -> RestoreSummary:
    """Read `dataset` back from its destination into `to_dir`, decrypted and checked against the
    plaintext SHA-256 recorded at copy time (`exitplan restore`). Keys are unwrapped first; the
    state store is only read (without it, nothing is checked against a recorded digest).
    `overwrite`: replace files already there (default: an object whose name is taken fails).
    `bandwidth`: the command line's `--bwlimit` (default: `transfer.bandwidth`)."""
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
                               on_object=on_object, overwrite=overwrite, bandwidth=bandwidth)
    finally:
        if state is not None:
            state.close()
