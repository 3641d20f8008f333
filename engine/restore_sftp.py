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

import errno
import hashlib
import itertools
import logging
import secrets
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping

import paramiko

from config.errors import ExitCode, UserError
from config.models import LoadedConfig
from connectors.base import ConnectorError
from connectors.sftp import PipelinedWriter, SftpStore, open_for_writing, pipelined_read, refuse_hostile_key

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


class SftpTargetDirectory:
    """A directory on an SFTP server that one restore writes into (module docstring); the same
    methods as `engine.restore.TargetDirectory`. Thread-safe: each call borrows a session."""

    def __init__(self, store: SftpStore, path: str, private_name: str, *, overwrite: bool):
        self.store = store
        self.path = path
        self.overwrite = overwrite
        self._private_name = private_name
        self._private = f"{path}/{private_name}"
        self._temporaries = itertools.count(1)
        self._label = f"sftp://{store.host}:{store.port}"

    @classmethod
    def open(cls, store: SftpStore, directory: str, *, overwrite: bool = False) -> "SftpTargetDirectory":
        """Make `directory` below the store's root (0700, with its missing parents, none a link)
        and the private directory inside it."""
        path = f"{store.root.rstrip('/')}/{directory}"
        shown = f"sftp://{store.host}:{store.port}{path}"
        private_name = PRIVATE_PREFIX + secrets.token_hex(16)
        try:
            with store.session() as sftp:
                target = cls(store, path, private_name, overwrite=overwrite)
                target._directory(sftp, tuple(directory.split("/")), create=True, base=store.root.rstrip("/"))
                sftp.mkdir(target._private, DIR_MODE)
        except TargetRefused as exc:
            raise UserError(f"--to {shown}: {exc}", ExitCode.USAGE) from None
        except (OSError, paramiko.SSHException, EOFError, ConnectorError) as exc:
            raise UserError(f"--to {shown}: restore cannot create its directories there ({_reason(exc)}); name a "
                            "directory the SFTP user can create and write to", ExitCode.USAGE) from None
        return target

    def close(self) -> None:
        try:
            with self.store.session() as sftp:
                sftp.rmdir(self._private)
        except (OSError, paramiko.SSHException, EOFError, ConnectorError) as exc:
            log.warning("restore's private directory %s could not be removed: %s", self.shown((self._private_name,)),
                        _reason(exc))
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
        with self._session(name.parts) as sftp:
            if not self._directory(sftp, name.parts if name.directory else name.parts[:-1], create=False):
                return
            if name.directory:
                return
            found = self._lstat(sftp, name.parts)
            if found is not None and (stat.S_ISDIR(found.st_mode or 0) or not self.overwrite):
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
                with self.store.session() as sftp:
                    sftp.remove(temporary.path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("restore's temporary file %s could not be removed: %s", temporary.path, _reason(exc))
            except (paramiko.SSHException, EOFError, ConnectorError) as exc:
                log.warning("restore's temporary file %s could not be removed: %s", temporary.path, _reason(exc))

    def write_and_read_back(self, temporary: SftpTemporary, plaintext: Iterable[bytes]) -> tuple[int, str, str]:
        """Write `plaintext` to the temporary file (created 0600, never an existing one), sync it,
        and read it back from the server: (bytes written, SHA-256 of what was written, SHA-256 of
        what the file holds)."""
        written_digest = hashlib.sha256()
        with self._session((temporary.path,)) as sftp:
            writer = PipelinedWriter(sftp, open_for_writing(sftp, temporary.path, mode=FILE_MODE, existing="refuse"))
            try:
                for chunk in plaintext:
                    written_digest.update(chunk)
                    writer.write(chunk)
            except BaseException:
                writer.abandon()
                raise
            attrs, _ = writer.close(sync=True)
            written = writer.offset
            stored = hashlib.sha256()
            with sftp.open(temporary.path, "rb") as f:
                size = attrs.st_size or 0
                for start in range(0, size, READ_BACK):
                    stored.update(pipelined_read(sftp, f.handle, start, min(start + READ_BACK, size),
                                                 self.store.read_request))
        return written, written_digest.hexdigest(), stored.hexdigest()

    def set_modified(self, temporary: SftpTemporary, when: float) -> None:
        with self._session((temporary.path,)) as sftp:
            sftp.utime(temporary.path, (when, when))

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
        final = "/".join((self.path,) + name.parts)
        with self._session(name.parts) as sftp:
            self._directory(sftp, name.parts[:-1], create=True)
            if self.overwrite:
                found = self._lstat(sftp, name.parts)
                if found is not None and stat.S_ISDIR(found.st_mode or 0):
                    raise TargetRefused(self._taken(found, name.parts))
                sftp.posix_rename(temporary.path, final)
                return
            try:
                sftp.rename(temporary.path, final)  # SSH_FXP_RENAME: fails when `final` exists
            except OSError:
                found = self._lstat(sftp, name.parts)
                if found is not None:
                    raise TargetRefused(self._taken(found, name.parts)) from None
                raise

    def make_directory(self, name: TargetName) -> None:
        with self._session(name.parts) as sftp:
            self._directory(sftp, name.parts, create=True)

    # ---- internals --------------------------------------------------------------------------------

    @contextmanager
    def _session(self, parts: tuple[str, ...]) -> Iterator[paramiko.SFTPClient]:
        """A borrowed session; what the server or the connection answered, as `TargetRefused`
        naming `parts` (an absolute path, or parts below the target). What the caller's own code
        raises inside (reading the object back from the destination, decrypting it) goes through
        as it is."""
        where = self._label + parts[0] if len(parts) == 1 and parts[0].startswith("/") else self.shown(parts)
        lent = False
        try:
            with self.store.session() as sftp:
                lent = True
                yield sftp
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise TargetRefused(f"writing {where} failed: {_reason(exc)}") from None
        except ConnectorError as exc:
            if lent:
                raise
            raise TargetRefused(f"writing {where} failed: {_reason(exc)}") from None

    def _flush(self, temporary: SftpTemporary, *, sync: bool) -> None:
        """Write what was appended since the last flush at the end of the temporary file (created
        by the first flush, never an existing one)."""
        with self._session((temporary.path,)) as sftp:
            handle = open_for_writing(sftp, temporary.path, mode=FILE_MODE,
                                      existing="keep" if temporary.offset else "refuse")
            writer = PipelinedWriter(sftp, handle, temporary.offset)
            try:
                writer.write(temporary.pending)
            except BaseException:
                writer.abandon()
                raise
            writer.close(sync=sync, look=False)
        temporary.offset = writer.offset
        temporary.pending.clear()

    def _lstat(self, sftp: paramiko.SFTPClient, parts: tuple[str, ...]) -> paramiko.SFTPAttributes | None:
        try:
            return sftp.lstat("/".join((self.path,) + parts))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    def _directory(self, sftp: paramiko.SFTPClient, parts: tuple[str, ...], *, create: bool,
                   base: str | None = None) -> bool:
        """Whether the directories `parts` below the target (below `base` while the target itself is
        made) are there, made 0700 when missing if `create`; `TargetRefused` for one that is a link
        or a file."""
        base = self.path if base is None else base
        for i in range(1, len(parts) + 1):
            path = "/".join((base,) + parts[:i])
            try:
                found = sftp.lstat(path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                if not create:
                    return False
                try:
                    sftp.mkdir(path, DIR_MODE)
                except OSError:
                    pass  # made meanwhile by another worker: looked at below
                found = sftp.lstat(path)
            if stat.S_ISLNK(found.st_mode or 0):
                raise TargetRefused(f"{self._label}{path} is a symbolic link; restore never writes through a link: "
                                    "remove it, or restore into an empty directory")
            if not stat.S_ISDIR(found.st_mode or 0):
                raise TargetRefused(f"{self._label}{path} is a file, not a directory, so nothing can be written below "
                                    "it (another object of the dataset has that name, or the file was there before)")
        return True

    def _taken(self, found: paramiko.SFTPAttributes, parts: tuple[str, ...]) -> str:
        where = self.shown(parts)
        if stat.S_ISDIR(found.st_mode or 0):
            return (f"{where} is a directory (another object's key continues below this name, or it was there "
                    "before), so the object cannot be written as a file")
        kind = "a symbolic link" if stat.S_ISLNK(found.st_mode or 0) else "a file"
        return f"{where} exists already ({kind}); restore never replaces a file unless --overwrite is given"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.EACCES:
        return "permission denied by the server"
    if isinstance(exc, OSError) and exc.errno == errno.ENOENT:
        return "no such file or directory"
    return str(exc) or type(exc).__name__
