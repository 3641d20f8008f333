"""Restore onto an SFTP server: `exitplan restore --to sftp://<endpoint>/<directory>`.

The target is a directory below the `root` of an SFTP endpoint the configuration names (a source
or a destination of `kind: sftp`, with its pinned host key and its login). It keeps the promises
of a local `--to DIR` (engine/restore.py) as far as a file server lets a client keep them:

- An object is written into a private directory the restore creates in the target for the run
  (`.exitplan-restore-<random>`, mode 0700), under a name of its own opened with `O_EXCL`
  semantics (`SSH_FXF_EXCL`: never an existing file or link), mode 0600, synced
  (`fsync@openssh.com`), then read back over the same server: the SHA-256 compared with the
  recorded one is the one of the bytes the file holds.
- The final name is given by SFTP's RENAME, which fails when the name exists (the protocol's rule;
  OpenSSH does it with `link()`), so nothing is replaced unless `overwrite`, where
  `posix-rename@openssh.com` replaces a file atomically (never a directory).
- Every directory below the target is looked at with LSTAT before it is used, and a symbolic link
  fails the object with a sentence: a client cannot open paths without following links, so a link
  planted between that look and the write is the one case a local restore closes and this one
  cannot. Directories are created 0700.
- A failed object leaves nothing behind; the private directory is removed at the end.

The properties file (`.exitplan-properties.jsonl`) is appended in memory up to 1 MiB at a time and
written to its temporary file on the server, then synced and renamed like an object.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

from config.errors import ExitCode, UserError
from config.models import LoadedConfig
from connectors.base import ConnectorError, NotFound
from connectors.sftp import SftpFiles, SftpStore, refuse_hostile_key

from .restore import DIR_MODE, FILE_MODE, PRIVATE_PREFIX, READ_BACK, TargetName, TargetRefused, target_name

log = logging.getLogger(__name__)

SCHEME = "sftp://"
NAME_MAX = 255  # SFTP does not say; what every common server file system allows
_APPEND_FLUSH = 1024 * 1024


@dataclass
class SftpTemporary:
    """An object's file while it is written: `path` in the private directory; `pending` holds
    appended bytes not yet written (the properties file), `offset` what was."""

    path: str
    pending: bytearray = field(default_factory=bytearray)
    offset: int = 0


class _SourceFailed(Exception):
    """What the plaintext iterator raised (reading the object back, decrypting it), carried
    through the connector's file operation unchanged and raised again as it was."""

    def __init__(self, error: BaseException):
        self.error = error


def _guarded(plaintext: Iterable[bytes]) -> Iterator[bytes]:
    try:
        yield from plaintext
    except Exception as exc:
        raise _SourceFailed(exc) from exc


def open_sftp_target(loaded: LoadedConfig, to: str, *, overwrite: bool = False) -> "SftpTargetDirectory":
    """The target `sftp://<endpoint>/<directory>` names; exit 2 with a sentence when the endpoint
    is not an SFTP source or destination of the configuration, or the directory cannot be made."""
    from .endpoints import open_sftp
    from .errors import call_endpoint

    name, _, directory = to[len(SCHEME):].partition("/")
    directory = directory.strip("/")
    if directory:
        try:
            refuse_hostile_key(directory, to)
        except ConnectorError as exc:
            raise UserError(f"--to {to}: {exc}; name a directory below the endpoint's root", ExitCode.USAGE) from None
    cfg = loaded.config
    found = [(f"{section}.{name}", entry) for section, entries in (("destinations", cfg.destinations),
                                                                    ("sources", cfg.sources))
             if (entry := entries.get(name)) is not None and getattr(entry, "kind", None) == "sftp"]
    if not found:
        sftp_names = sorted({n for entries in (cfg.destinations, cfg.sources) for n, e in entries.items()
                             if getattr(e, "kind", None) == "sftp"})
        raise UserError(f"--to {to}: {loaded.path} has no SFTP source or destination named {name!r}; "
                        f"write --to sftp://<name>/<directory> with one of: {', '.join(sftp_names) or 'none defined'}",
                        ExitCode.USAGE)
    if not directory:
        raise UserError(f"--to {to}: name a directory below the endpoint's root (sftp://{name}/<directory>), "
                        "never the root itself", ExitCode.USAGE)
    where, entry = found[0]
    store = call_endpoint(f"SFTP server `{where}`", open_sftp, loaded, where, entry, "")
    try:
        return SftpTargetDirectory.open(store, directory, overwrite=overwrite)
    except BaseException:
        store.close()
        raise


def sftp_target_opener(loaded: LoadedConfig, to: str, *, overwrite: bool = False) -> Callable[[], "SftpTargetDirectory"]:
    """What `engine.restore.restore` takes as `to` for an SFTP target: opens it when called."""
    return lambda: open_sftp_target(loaded, to, overwrite=overwrite)


class SftpTargetDirectory:
    """A directory on an SFTP server that one restore writes into (module docstring); the same
    methods as `engine.restore.TargetDirectory`. Thread-safe: each call borrows a session."""

    def __init__(self, store: SftpStore, path: str, private_name: str, *, overwrite: bool):
        self.store = store
        self.files = SftpFiles(store)
        self.path = path
        self.overwrite = overwrite
        self._private_name = private_name
        self._private = f"{path}/{private_name}"
        self._temporaries = itertools.count(1)
        self._label = self.files.label

    @classmethod
    def open(cls, store: SftpStore, directory: str, *, overwrite: bool = False) -> "SftpTargetDirectory":
        """Make `directory` below the store's root (0700, with its missing parents, none a link)
        and the private directory inside it."""
        path = f"{store.root.rstrip('/')}/{directory}"
        target = cls(store, path, PRIVATE_PREFIX + secrets.token_hex(16), overwrite=overwrite)
        try:
            target._directory(tuple(directory.split("/")), create=True, base=store.root.rstrip("/"))
            target.files.mkdir(target._private, DIR_MODE)
        except TargetRefused as exc:
            raise UserError(f"--to {target._label}{path}: {exc}", ExitCode.USAGE) from None
        except ConnectorError as exc:
            raise UserError(f"--to {target._label}{path}: restore cannot create its directories there ({exc}); "
                            "name a directory the SFTP user can create and write to", ExitCode.USAGE) from None
        return target

    def close(self) -> None:
        try:
            self.files.rmdir(self._private)
        except ConnectorError as exc:
            log.warning("restore's private directory could not be removed: %s", exc)
        finally:
            self.store.close()

    def __enter__(self) -> "SftpTargetDirectory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- names ------------------------------------------------------------------------------------

    def name_for(self, rel_key: str, size: int = 0, metadata: Mapping[str, str] | None = None) -> TargetName:
        return target_name(rel_key, size, metadata, name_max=NAME_MAX, private_name=self._private_name,
                           where=self._label + self.path)

    def shown(self, name: TargetName | tuple[str, ...]) -> str:
        parts = name.parts if isinstance(name, TargetName) else name
        return self._label + "/".join((self.path,) + tuple(parts))

    # ---- checks and placing -----------------------------------------------------------------------

    def check_free(self, name: TargetName) -> None:
        """`TargetRefused` before any byte is read when the object could not be placed: a
        directory of its path is a link or a file, or its name is taken (and not `overwrite`)."""
        with self._refusing(self.shown(name)):
            if not self._directory(name.parts if name.directory else name.parts[:-1], create=False):
                return
            if name.directory:
                return
            found = self.files.kind(self._full(name.parts))
            if found is not None and (found == "dir" or not self.overwrite):
                raise TargetRefused(self._taken(found, name.parts))

    @contextmanager
    def temporary(self) -> Iterator[SftpTemporary]:
        """A name of our own in the private directory, removed on leaving (once placed, the final
        name holds the file)."""
        temporary = SftpTemporary(f"{self._private}/{next(self._temporaries)}.partial")
        try:
            yield temporary
        finally:
            try:
                self.files.remove(temporary.path)
            except ConnectorError as exc:
                log.warning("restore's temporary file could not be removed: %s", exc)

    def write_and_read_back(self, temporary: SftpTemporary, plaintext: Iterable[bytes]) -> tuple[int, str, str]:
        """Write `plaintext` to the temporary file (created 0600, never an existing one), sync it,
        and read it back from the server: (bytes written, SHA-256 of what was written, SHA-256 of
        what the file holds). What reading or decrypting the object raises goes through as it is."""
        try:
            with self._refusing(self._label + temporary.path):
                return self.files.write_new(temporary.path, _guarded(plaintext), FILE_MODE, READ_BACK)
        except _SourceFailed as failed:
            raise failed.error from None

    def set_modified(self, temporary: SftpTemporary, when: float) -> None:
        with self._refusing(self._label + temporary.path):
            self.files.set_mtime(temporary.path, when)

    def append(self, temporary: SftpTemporary, data: bytes) -> None:
        temporary.pending += data
        if len(temporary.pending) >= _APPEND_FLUSH:
            self._flush(temporary, sync=False)

    def seal(self, temporary: SftpTemporary) -> None:
        """Everything appended is on the server's disk."""
        self._flush(temporary, sync=True)

    def place(self, temporary: SftpTemporary, name: TargetName) -> None:
        """Give the temporary file its final name: never replacing one unless `overwrite` (then a
        file, atomically; never a directory); directories made 0700, none a link."""
        final = self._full(name.parts)
        with self._refusing(self.shown(name)):
            self._directory(name.parts[:-1], create=True)
            if self.overwrite:
                if self.files.kind(final) == "dir":
                    raise TargetRefused(self._taken("dir", name.parts))
                self.files.rename(temporary.path, final, replace=True)
                return
            try:
                self.files.rename(temporary.path, final, replace=False)  # fails when `final` exists
            except ConnectorError:
                found = self.files.kind(final)
                if found is not None:
                    raise TargetRefused(self._taken(found, name.parts)) from None
                raise

    def make_directory(self, name: TargetName) -> None:
        with self._refusing(self.shown(name)):
            self._directory(name.parts, create=True)

    # ---- internals --------------------------------------------------------------------------------

    @contextmanager
    def _refusing(self, where: str) -> Iterator[None]:
        """What the server answered, as the `TargetRefused` of the object at `where`."""
        try:
            yield
        except NotFound as exc:
            raise TargetRefused(f"writing {where} failed: {exc} (removed meanwhile?)") from None
        except ConnectorError as exc:
            raise TargetRefused(f"writing {where} failed: {exc}") from None

    def _full(self, parts: tuple[str, ...]) -> str:
        return "/".join((self.path,) + parts)

    def _flush(self, temporary: SftpTemporary, *, sync: bool) -> None:
        """Write what was appended since the last flush at the end of the temporary file (created
        by the first flush, never an existing one)."""
        with self._refusing(self._label + temporary.path):
            temporary.offset = self.files.append(temporary.path, bytes(temporary.pending), temporary.offset,
                                                 FILE_MODE, sync=sync)
        temporary.pending.clear()

    def _directory(self, parts: tuple[str, ...], *, create: bool, base: str | None = None) -> bool:
        """Whether the directories `parts` below the target (below `base` while the target itself is
        made) are there, made 0700 when missing if `create`; `TargetRefused` for one that is a link
        or a file."""
        base = self.path if base is None else base
        for i in range(1, len(parts) + 1):
            path = "/".join((base,) + parts[:i])
            found = self.files.kind(path)
            if found is None:
                if not create:
                    return False
                self.files.mkdir(path, DIR_MODE)
                found = self.files.kind(path)
            if found == "link":
                raise TargetRefused(f"{self._label}{path} is a symbolic link; restore never writes through a link: "
                                    "remove it, or restore into an empty directory")
            if found != "dir":
                raise TargetRefused(f"{self._label}{path} is a file, not a directory, so nothing can be written below "
                                    "it (another object of the dataset has that name, or the file was there before)")
        return True

    def _taken(self, found: str, parts: tuple[str, ...]) -> str:
        where = self.shown(parts)
        if found == "dir":
            return (f"{where} is a directory (another object's key continues below this name, or it was there "
                    "before), so the object cannot be written as a file")
        kind = "a symbolic link" if found == "link" else "a file"
        return f"{where} exists already ({kind}); restore never replaces a file unless --overwrite is given"
