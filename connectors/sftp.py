"""An SFTP server as `ObjectSource` and `ObjectSink` (paramiko, on OpenSSH or any SFTP v3 server).

One `SftpStore` serves one directory tree of one server (`root`): the object key `a/b.csv` is the
file `<root>/a/b.csv`. Every paramiko and socket exception is translated into the connectors' error
classes (`connectors.base`) and never leaks.

Security. The server's host key is pinned: it must be in the given known_hosts file or match one of
the given SHA256 fingerprints, otherwise the connection is refused (`HostKeyRefused`) before any
credential is sent; an unknown or changed key is never accepted. Authentication is by key (a private
key given as text, with its passphrase if any) or, only when the caller passes one explicitly, by
password. No agent is consulted and nothing is forwarded.

What SFTP has and has not, and what this connector does about it:

- No ETag. The change marker of a file is its size and modification time (`s<size>-t<mtime>`, the
  mtime in whole seconds as SFTP v3 carries it): a rewrite that keeps the size within the same
  second is not seen. A ranged read pinned to a marker checks it before and after reading, so a file
  changed during the read raises `SourceChanged` (the engine then starts the object over).
- No object metadata. What a sink writes with an object (content settings, user metadata, the
  encrypted format's metadata, the MD5 of a single write) goes into a sidecar JSON file under
  `<root>/.exitplan-sftp/meta/`, which records the marker of the file it describes and is believed
  only while the file still has that marker: a file changed by anyone else has no metadata.
- No multipart upload. An upload is a directory `<root>/.exitplan-sftp/uploads/<id>/` holding the
  object's bytes in one file, `data`, each part written in place at its offset (the engine gives
  it) and synced (`fsync@openssh.com`), then an empty marker file `part-<n>-<tag>-<offset>-<size>`
  (removed before a part is written again), so a listed part is whole, and its tag names that
  write: the part's MD5 when the caller announced one (checked against the bytes sent), else a
  random name (the engine announces none, `part_md5`: the SSH channel checks every byte on the way,
  and MD5 was the costliest step of writing a part); completing checks the markers against the
  parts (contiguous, as sent), and renames `data` over the final name (`posix-rename@openssh.com`):
  no byte is copied on the server, no reader ever sees a half-written file under its final name,
  and a killed run resumes from its whole parts. `etag_is_md5` is False: a receipt is compared
  only with the receipt recorded for the same write.
- Listing. SFTP directories come unordered and whole: each directory is read and sorted on its own
  (memory grows with the largest directory, not the tree), and the tree is walked in key order,
  each directory's next `list_ahead` subdirectories read at once over sessions of their own (far
  away, a directory costs round trips: one at a time, a tree of many small directories was listed
  at one directory per four round trips).
  Symbolic links are not followed: each is listed with `not_copyable` set (placement refuses it by
  name, so inventory, migrate and the exit code say so), kept in `skipped_links` and logged.
  `.exitplan-sftp/` at the root is the connector's own and never listed. A source's listing
  (`source_details`) of a tree this connector wrote carries what each file's metadata file says
  (as `head` gives it), the metadata files of a directory read at once (`read_small_files`).
- Names. A key that would leave the root or cannot be a file name (`..` or `.` segments, an empty
  segment, a leading `/`, a NUL or other control character) is refused by name (`InvalidRequest`).

Throughput: several SSH connections (`connections`), one SFTP session each, used by one thread at a
time; reads of a range are pipelined (`pipelined_read`, bounded by the range the engine asked for,
which its memory budget already counts) behind a look at the file, and a second look and the close
are sent behind the last read (a file is read in two round trips; three where the server does not
state the most it answers to a read, `limits@openssh.com`: a short answer is then asked again
before the close); writes are pipelined too (`PipelinedWriter`), and the sync, a look at the file
and its close ride in the same round trip. A file is put in ten requests
over four round trips (the file and its metadata file opened; the writes with sync/fstat/close; the
metadata written and closed with the file's rename; the metadata file's rename, once it is whole);
the directories a store has made or found are not looked for again.

What carries the sessions (`transport`): the OpenSSH client, an `ssh` process per connection
(connectors/openssh.py: the SSH protocol in C, each write request as large as the server takes,
255 KiB with OpenSSH, its bytes handed over uncopied), or paramiko in this process (each write
request sized to fit one 32 KiB SSH packet; TCP_NODELAY; about 0.15 ms of CPU per request and 3
CPU-s per GB written under the GIL, so one process writes at most about 150 MB/s). `auto` takes
OpenSSH where it is installed and the login is by key. With OpenSSH and a known_hosts pin, `ssh`
logs in first, given the pinned keys as its only known hosts (it checks the server's key);
otherwise (fingerprints, or that first `ssh` failed) paramiko's connection checks the host key
against the pin and the login first, wording any refusal, and the `ssh` processes are given that
very host key as their only known host (`SftpStore._openssh_first`; bench/README.md has the
figures).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import errno
import hashlib
import importlib
import io
import itertools
import json
import logging
import posixpath
import queue
import socket
import stat as stat_mode
import sys
import struct
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar


def _import_paramiko() -> None:
    """Import paramiko without invoke. paramiko's `config` module imports invoke, for `Match exec`
    in an OpenSSH client configuration file, which exitplan never reads: 45 ms of CPU of every
    SFTP run's start-up (bench/README.md). With invoke refused for that one import, paramiko keeps
    the import error and raises it only if `Match exec` is used. Where either is imported already,
    nothing changes; a later `import invoke` works."""
    if "paramiko" in sys.modules or "invoke" in sys.modules:
        return
    sys.modules["invoke"] = None  # type: ignore[assignment]  # an ImportError for this import only
    try:
        importlib.import_module("paramiko")
    finally:
        del sys.modules["invoke"]


_import_paramiko()

import paramiko  # noqa: E402
from paramiko.sftp import (  # noqa: E402
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_OPEN,
    CMD_READ,
    CMD_STATUS,
    CMD_WRITE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_READ,
    SFTP_FLAG_TRUNC,
    SFTP_FLAG_WRITE,
    int64,
)

from .openssh import OpenSshLauncher, OpenSshUnavailable, SshPipe, SshSessionFailed, openssh_path, unencrypted_key
from .base import (
    FILE_CONTROL_DIR,
    AuthError,
    BodyDigestMismatch,
    ConfigError,
    ConnectorError,
    ContentSettings,
    InvalidRequest,
    NotFound,
    ObjectMeta,
    PartBody,
    PartReceipt,
    PendingUpload,
    SinkBehaviour,
    SinkLimits,
    SourceChanged,
    TransientError,
    WriteMeta,
    file_path_problem,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# The connector's own directory at the root: sidecar metadata, uploads in progress, temporary files.
CONTROL_DIR = FILE_CONTROL_DIR
# Bytes taken from a streamed body at a time.
_WRITE_CHUNK = 1024 * 1024
# Writes: how many SFTP write requests are in flight per session (each fits one SSH packet, about
# 32 KiB with OpenSSH: 2 MiB in flight, the SSH channel's window).
_WRITE_WINDOW = 64
# An SFTP write request's bytes besides its data: length, type, request id, handle length, offset,
# data length. paramiko's channel sends at most the peer's maximum packet size less 64 bytes per
# SSH packet.
_WRITE_HEADER = 4 + 1 + 4 + 4 + 8 + 4
_CHANNEL_MARGIN = 64
# Reads: the size of one SFTP read request at most (paramiko's default is 32 KiB; a server that
# states a lower limit, OpenSSH's 261,120 bytes, gets that: `server_limits`) and how many are in
# flight per session. The window bounds what a read buffers beyond the range asked for: nothing
# (requests never reach past the range).
_READ_REQUEST = 256 * 1024
_READ_WINDOW = 32
# Writes over an OpenSSH client's pipe (connectors/openssh.py): each request as large as the server
# takes (`max-write-length`: 261,120 bytes with OpenSSH; 32 KiB where a server does not say), and
# about this many bytes in flight per session.
_PIPE_WRITE_DEFAULT = 32 * 1024
_PIPE_WRITE_IN_FLIGHT = 4 * 1024 * 1024
TRANSPORTS = ("auto", "openssh", "paramiko")
_CONNECT_TIMEOUT = 20.0


class HostKeyRefused(ConfigError):
    """The server's host key is not the pinned one (unknown or changed): nothing was sent to it."""


@dataclass(frozen=True)
class HostKeyPin:
    """What the server's host key must be: entries of an OpenSSH known_hosts file, or fingerprints
    as `ssh-keygen -lf` prints them (`SHA256:<base64 without padding>`). At least one is needed."""

    known_hosts: str | None = None  # path of a known_hosts file
    fingerprints: tuple[str, ...] = ()

    def pinned_types(self, host: str, port: int) -> list[str]:
        """The host key types known_hosts pins for this server: asked for first, so that a server
        with several host keys presents the pinned one (not, say, its RSA key beside a pinned Ed25519)."""
        return [key.get_name() for key in self.pinned_keys(host, port)]

    def pinned_keys(self, host: str, port: int) -> list[paramiko.PKey]:
        """The keys known_hosts pins for this server (none: no file, an unreadable one, no entry
        for the server; `check` then says which)."""
        if not self.known_hosts:
            return []
        try:
            entry = paramiko.HostKeys(self.known_hosts).lookup(host if port == 22 else f"[{host}]:{port}")
        except OSError:
            return []
        return list(entry.values()) if entry else []

    def check(self, host: str, port: int, key: paramiko.PKey, where: str) -> None:
        fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
        if fingerprint in self.fingerprints:
            return
        names = [host] if port == 22 else [f"[{host}]:{port}"]
        if self.known_hosts:
            try:
                known = paramiko.HostKeys(self.known_hosts)
            except OSError as exc:
                raise ConfigError(f"{where}: cannot read the known_hosts file {self.known_hosts} ({exc}); "
                                  "check `known_hosts`") from None
            for name in names:
                entry = known.lookup(name)
                if entry is None:
                    continue
                pinned = entry.get(key.get_name())
                if pinned is not None and pinned.asbytes() == key.asbytes():
                    return
                if entry:
                    raise HostKeyRefused(
                        f"{where}: the server's {key.get_name()} host key {fingerprint} is NOT the one pinned for "
                        f"{name} in {self.known_hosts}: the key changed or someone is in the middle; refused. "
                        "Check the new key with the server's administrator before replacing the pin")
        pinned_in = " and ".join(filter(None, [f"known_hosts {self.known_hosts}" if self.known_hosts else "",
                                               "`host_key_fingerprints`" if self.fingerprints else ""]))
        raise HostKeyRefused(
            f"{where}: the server's {key.get_name()} host key {fingerprint} is unknown ({pinned_in or 'nothing'} "
            f"does not pin it for {names[0]}); refused. Check the key with the server's administrator and add it "
            "to `known_hosts` or `host_key_fingerprints`")


@dataclass(frozen=True)
class SftpLogin:
    """Who logs in and how. `private_key`: the key's text (OpenSSH or PEM), `passphrase` if it is
    encrypted, `certificate` the OpenSSH certificate of that key (the text of its `-cert.pub` file)
    when the server trusts a user CA instead of listing keys; `password` only when password
    authentication was asked for explicitly."""

    username: str
    private_key: str | None = None
    passphrase: str | None = None
    password: str | None = None
    certificate: str | None = None


def load_private_key(text: str, passphrase: str | None, where: str) -> paramiko.PKey:
    """The private key in `text` (Ed25519, ECDSA or RSA); `AuthError` naming `where` otherwise."""
    problems = []
    for kind in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return kind.from_private_key(io.StringIO(text), password=passphrase)
        except paramiko.PasswordRequiredException:
            raise AuthError(f"{where}: the private key is encrypted and no passphrase was given; set the "
                            "passphrase's variable or block") from None
        except (paramiko.SSHException, ValueError) as exc:
            problems.append(str(exc))
    raise AuthError(f"{where}: the private key cannot be read (not an Ed25519, ECDSA or RSA key, or a wrong "
                    f"passphrase: {problems[0] if problems else 'empty'})")


def attach_certificate(key: paramiko.PKey, certificate: str, where: str) -> None:
    """Log in with `key` presented by its OpenSSH `certificate` (the `-cert.pub` line); `AuthError`
    naming `where` when it is not a certificate of that key."""
    try:
        blob = paramiko.PublicBlob.from_string(certificate.strip())
    except (ValueError, paramiko.SSHException, IndexError) as exc:
        raise AuthError(f"{where}: the SSH certificate cannot be read ({exc}); give the text of the `-cert.pub` "
                        "file that `ssh-keygen -s` wrote") from None
    if "-cert-" not in blob.key_type or not blob.key_type.startswith(key.get_name()):
        raise AuthError(f"{where}: the SSH certificate is a {blob.key_type}, not a certificate of the "
                        f"{key.get_name()} private key; give the `-cert.pub` file written for this very key")
    key.public_blob = blob  # paramiko then offers the certificate instead of the bare key


class _Sessions:
    """Up to `size` SSH connections, one SFTP session each, lent to one thread at a time.

    A session that failed (its connection dropped) is closed instead of being given back; the
    next borrower opens a fresh one.
    """

    def __init__(self, connect: Callable[[], tuple[paramiko.Transport, paramiko.SFTPClient]], size: int):
        self._connect = connect
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._all: list[tuple[paramiko.Transport, paramiko.SFTPClient]] = []

    @contextlib.contextmanager
    def borrow(self) -> Iterator[paramiko.SFTPClient]:
        self._slots.acquire()
        try:
            try:
                session = self._idle.get_nowait()
            except queue.Empty:
                session = self._connect()
                with self._lock:
                    self._all.append(session)
            healthy = False
            try:
                yield session[1]
                healthy = True
            except (OSError, ConnectorError) as exc:
                # An SFTP status (missing file, permission) leaves the session usable; a timeout
                # leaves answers in flight that the next borrower would read as its own.
                healthy = session[0].is_active() and not isinstance(exc, (socket.timeout, TimeoutError))
                raise
            finally:
                if healthy and session[0].is_active():
                    self._idle.put(session)
                else:
                    self._discard(session)
        finally:
            self._slots.release()

    def _discard(self, session) -> None:
        with self._lock:
            if session in self._all:
                self._all.remove(session)
        with contextlib.suppress(Exception):
            session[1].close()
        with contextlib.suppress(Exception):
            session[0].close()

    def close(self) -> None:
        with self._lock:
            sessions, self._all = self._all, []
        for transport, client in sessions:
            with contextlib.suppress(Exception):
                client.close()
            with contextlib.suppress(Exception):
                transport.close()


def change_marker(attrs: paramiko.SFTPAttributes) -> str:
    """The ETag an SFTP file gets: its size and whole-second mtime (SFTP v3 has nothing finer)."""
    return f"s{attrs.st_size}-t{int(attrs.st_mtime or 0)}"


def refuse_hostile_key(key: str, where: str) -> None:
    """`InvalidRequest` naming `key` when it would leave the root or is not a file name."""
    why = file_path_problem(key)
    if why:
        raise InvalidRequest(f"{where}: the name {key!r} is refused: {why}", key=key)


def _hashed(chunks: Iterable[bytes | bytearray | memoryview], digest) -> Iterator[bytes | bytearray | memoryview]:
    """`chunks`, each added to `digest` as it goes by."""
    for chunk in chunks:
        digest.update(chunk)
        yield chunk


def _translated(exc: BaseException, where: str, key: str | None) -> ConnectorError:
    """What paramiko or the socket raised at `where` ("label: what was done"), as a connector
    error: a dropped connection or a timeout is transient, a missing file `NotFound`, a refusal
    `AuthError`, any other status of the server transient."""
    if isinstance(exc, (EOFError, socket.timeout, paramiko.SSHException)):
        return TransientError(f"{where}: the connection failed ({exc or type(exc).__name__})", key=key)
    code = getattr(exc, "errno", None)
    if code == errno.ENOENT:
        return NotFound(f"{where}: no such file or directory", key=key)
    if code == errno.EACCES:
        return AuthError(f"{where}: permission denied by the server", key=key)
    return TransientError(f"{where}: {exc}", key=key)


_LIST_AHEAD = 8
_SIDECARS_AT_ONCE = 64  # metadata files opened at once (`SftpStore._sidecars`)
_SMALL_FILE_MAX = 1024 * 1024  # what `read_small_files` reads of a file at most (a metadata file is a few KiB)
_METADATA_UNREADABLE = ("its metadata file in .exitplan-sftp/meta/ is not a JSON object: the content headers and "
                        "metadata exitplan wrote for it cannot be carried (repair or remove that metadata file)")
_LINK_NOT_FOLLOWED = ("a symbolic link at the source, not followed (copy what it points to under a name of its own, "
                      "or exclude it)")


class _Level:
    """One directory of a listing's walk: its entries in key order, and the listings of its next
    `ahead` subdirectories already asked for (`read(key)` asks; `listing(key)` is the one asked
    for the subdirectory the walk has reached)."""

    def __init__(self, found: list, read: Callable[[str], Future], ahead: int):
        self.read = read
        self._items = collections.deque(found)
        self._dirs = collections.deque(e[0] for e in found if e[0].endswith("/"))
        self._asked: dict[str, Future] = {}
        self._ahead = ahead
        self._ask()

    def _ask(self) -> None:
        for key in itertools.islice(self._dirs, self._ahead):
            if key not in self._asked:
                self._asked[key] = self.read(key)

    def next(self) -> tuple | None:
        return self._items.popleft() if self._items else None

    def listing(self, key: str) -> Future:
        """The listing of subdirectory `key`, the next one in order; the one `ahead` after it asked for."""
        if self._dirs and self._dirs[0] == key:
            self._dirs.popleft()
        future = self._asked.pop(key, None) or self.read(key)
        self._ask()
        return future


def _is_missing(exc: BaseException) -> bool:
    return isinstance(exc, (IOError, OSError)) and getattr(exc, "errno", None) == errno.ENOENT


def _remove_if_there(sftp: paramiko.SFTPClient, path: str) -> None:
    """Remove the file `path`; a missing one is not an error."""
    try:
        sftp.remove(path)
    except IOError as exc:
        if not _is_missing(exc):
            raise


@dataclass(frozen=True)
class TemporaryFile:
    """A file in an SFTP store's temporary directory: its name there, size and modification time."""

    name: str
    size: int
    modified: datetime | None


class SftpStore:
    """One directory tree on one SFTP server, as a source and as a sink (module docstring)."""

    unsupported: frozenset[str] = frozenset({
        # A directory is read whole (SFTP has no ordered, resumable listing): files added to a
        # directory while it is being listed are not seen by that listing.
        "listing-pages",
        # No storage tiers on a file server.
        "tiers",
    })
    etag_is_md5 = False
    behaviour = SinkBehaviour()
    # A whole file's body is hashed as it is written (its MD5 goes into its metadata file): the
    # engine need not. A part is not hashed at all unless the caller announces its MD5: the SSH
    # channel's MAC checks every byte on the way, the ETags are no MD5s to compare, and a part's
    # receipt names its write (`SftpUpload.upload_part`).
    hashes_writes = True
    part_md5 = False

    def __init__(self, host: str, port: int, root: str, login: SftpLogin, pin: HostKeyPin, *,
                 limits: SinkLimits | None = None, connections: int = 4, label: str | None = None,
                 connect_timeout: float = _CONNECT_TIMEOUT, transport: str = "auto", tree_root: str | None = None):
        if not root.startswith("/"):
            raise ConfigError(f"sftp://{host}:{port}: the root {root!r} must be an absolute path on the server")
        if not (pin.known_hosts or pin.fingerprints):
            raise ConfigError(f"sftp://{host}:{port}: no host key is pinned; set `known_hosts` or "
                              "`host_key_fingerprints` (an unpinned server is never trusted)")
        self.host, self.port, self.root = host, port, posixpath.normpath(root)
        self.limits = limits or SinkLimits()
        self.label = label or f"sftp:{host}:{port}{self.root}"
        self.account = f"{host}:{port}"  # what the audit manifest names as the source account
        self.skipped_links: list[str] = []
        # A source's listing carries what the files' metadata files hold, in a tree this connector
        # wrote (the opener of a source sets it; a destination's listings need sizes and markers only).
        # They are looked for from the root up to `tree_root` (a source's configured root: a
        # dataset's directory below it may be part of a tree written from there).
        self.source_details = False
        self._tree_root = posixpath.normpath(tree_root) if tree_root else self.root
        if not (self.root == self._tree_root or self.root.startswith(self._tree_root.rstrip("/") + "/")):
            raise ConfigError(f"{self.label}: {self._tree_root} does not hold the root {self.root}")
        self._found_meta: str | None = None  # where a source's metadata files are (`_source_meta`), once found
        self._login = login
        self._pin = pin
        self._timeout = connect_timeout
        self._pkey = load_private_key(login.private_key, login.passphrase, self.label) if login.private_key else None
        if login.certificate is not None:
            if self._pkey is None:
                raise AuthError(f"{self.label}: an SSH certificate was given without its private key")
            attach_certificate(self._pkey, login.certificate, self.label)
        if self._pkey is None and login.password is None:
            raise AuthError(f"{self.label}: no private key and no password given; set the key's variable or block")
        if transport not in TRANSPORTS:
            raise ConfigError(f"{self.label}: unknown SSH transport {transport!r}; use one of {', '.join(TRANSPORTS)}")
        self._sessions = _Sessions(self._connect, connections)
        # Directories a listing reads ahead of the one it is in, each over a session of its own.
        self.list_ahead = max(1, min(_LIST_AHEAD, connections // 2))
        self._launcher: OpenSshLauncher | None = None
        self._host_key: paramiko.PKey | None = None  # the server's, as checked against the pin
        self.read_request = _READ_REQUEST  # what one read asks for: the server's limit once known
        self.max_write = 0  # what one write request of an OpenSSH session carries (0: not stated)
        self._limits_asked = False
        self._close_early = False  # a read's close goes with its reads (the server states its read limit)
        self._fsync_offered = True  # likewise
        self._prefix = uuid.uuid4().hex[:12] + "-"
        self._names = itertools.count()
        self._dirs: set[str] = set()  # directories this store made or found (never looked for again)
        # Connect now: a refused host key or a wrong key is a configuration error at open time.
        if transport == "paramiko" or not self._openssh_first(connections):
            with self._sessions.borrow():
                pass
            if transport != "paramiko":
                self._use_openssh(transport == "openssh", connections)

    @property
    def transport(self) -> str:
        """What carries the SSH connections: "openssh" (the `ssh` client) or "paramiko"."""
        return "openssh" if self._launcher is not None else "paramiko"

    # ---- connections ------------------------------------------------------------------------

    def _openssh_first(self, connections: int) -> bool:
        """Where known_hosts pins keys for this server and the login is a key, the OpenSSH client
        makes the first connection itself, given the pinned keys to check the server's against
        (no paramiko login first: one key exchange and login instead of two at every open, ~60 ms
        of CPU and as many round trips). True once `ssh` carries the sessions.

        False where this does not apply (no key of the server in known_hosts, a password, no
        `ssh`), or where that first `ssh` failed: then the paramiko-first path runs as it always
        did. It words a refused host key or login as before (the pin check's sentence, the
        login's fix), accepts a key pinned by fingerprint only (one being rotated in, beside the
        old key in known_hosts), and hands `ssh` the key it checked (`_use_openssh`)."""
        keys = self._pin.pinned_keys(self.host, self.port)
        ssh = openssh_path()
        if not keys or ssh is None or self._pkey is None:
            return False
        try:
            launcher = self._openssh_launcher(ssh, keys)
        except OpenSshUnavailable:
            return False
        failed = self._carried_by(launcher, connections)
        if failed is not None:
            log.info("%s: ssh's first login failed (%s); paramiko connects first", self.label, failed)
        return failed is None

    def _openssh_launcher(self, ssh: str, host_keys: Sequence[paramiko.PKey]) -> OpenSshLauncher:
        """`ssh` processes to this store's server, logged in as its user, expecting `host_keys`."""
        key = unencrypted_key(self._login.private_key, self._login.passphrase)
        return OpenSshLauncher(ssh, self.host, self.port, self._login.username, host_keys, key,
                               self._login.certificate, self._timeout)

    def _carried_by(self, launcher: OpenSshLauncher, connections: int) -> ConnectorError | None:
        """Carry the sessions with `launcher` from now on, once its first session opened (the
        sessions before are closed): None. Otherwise what stopped that session, with the store's
        sessions left as they were and the launcher closed."""
        before, self._sessions = self._sessions, _Sessions(self._connect, connections)
        self._launcher = launcher
        try:
            with self._sessions.borrow():
                pass
        except ConnectorError as exc:
            self._sessions.close()
            self._sessions, self._launcher = before, None
            launcher.close()
            return exc
        before.close()
        return None

    def _use_openssh(self, required: bool, connections: int) -> None:
        """Carry the sessions with the OpenSSH client from now on (connectors/openssh.py), once the
        paramiko session opened first has checked the host key and the login: its sessions are
        closed. Where `ssh` cannot be used or fails to log in, paramiko goes on (said in the log),
        or, when the configuration asks for OpenSSH (`required`), the error says why; a host key
        other than the one checked is refused either way."""
        ssh = openssh_path()
        why = None
        if ssh is None:
            why = "the OpenSSH client (`ssh`) is not installed (Debian: apt-get install openssh-client), or this is not Linux"
        elif self._pkey is None:
            why = "a password login is made by paramiko only"
        else:
            try:
                launcher = self._openssh_launcher(ssh, [self._host_key])
            except OpenSshUnavailable as exc:
                why = str(exc)
        if why is None:
            failed = self._carried_by(launcher, connections)
            if failed is not None:
                if required or isinstance(failed, HostKeyRefused):  # another host key than paramiko saw: never passed over
                    raise failed
                log.warning("%s: the OpenSSH client could not open an SFTP session; paramiko carries them (%s)",
                            self.label, failed)
            return
        if required:
            raise ConfigError(f"{self.label}: `transport: openssh` cannot be used: {why}; or set `transport: paramiko`")
        log.info("%s: SSH sessions carried by paramiko (%s)", self.label, why)

    def _connect(self) -> tuple[paramiko.Transport | SshPipe, paramiko.SFTPClient]:
        if self._launcher is not None:
            return self._connect_openssh(self._launcher)
        where = self.label
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self._timeout)
        except OSError as exc:
            raise TransientError(f"{where}: cannot connect to {self.host}:{self.port} ({exc})") from None
        # Un-pipelined SFTP requests wait on Nagle's algorithm otherwise (about 1 MB/s instead of 150).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        try:
            options = transport.get_security_options()
            fast = [c for c in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com") if c in options.ciphers]
            options.ciphers = tuple(fast + [c for c in options.ciphers if c not in fast])
            pinned = [t for t in self._pin.pinned_types(self.host, self.port) if t in options.key_types]
            if pinned:
                options.key_types = tuple(pinned + [t for t in options.key_types if t not in pinned])
            transport.start_client(timeout=self._timeout)
            self._pin.check(self.host, self.port, transport.get_remote_server_key(), where)
            self._host_key = transport.get_remote_server_key()
            if self._pkey is not None:
                transport.auth_publickey(self._login.username, self._pkey)
            else:
                transport.auth_password(self._login.username, self._login.password)
            client = paramiko.SFTPClient.from_transport(transport)
            if client is None:
                raise TransientError(f"{where}: the server opened no SFTP session")
            client.get_channel().settimeout(120.0)
            self._ask_limits(client)
            return transport, client
        except paramiko.AuthenticationException as exc:
            transport.close()
            raise AuthError(f"{where}: the server refused the login of {self._login.username!r} ({exc}); check the "
                            "user name and that its public key is in the server's authorized_keys") from None
        except ConnectorError:
            transport.close()
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport.close()
            raise TransientError(f"{where}: SSH connection failed ({exc})") from None

    def _ask_limits(self, client: paramiko.SFTPClient) -> None:
        """The server's limits, asked once, by the store's first session (an ask that failed with
        its session is asked again by the next)."""
        if not self._limits_asked:
            max_read, self.max_write = server_limits(client)
            self.read_request = min(_READ_REQUEST, max_read) if max_read > 0 else _READ_REQUEST
            self._close_early = max_read > 0
            self._limits_asked = True

    def _connect_openssh(self, launcher: OpenSshLauncher) -> tuple[SshPipe, paramiko.SFTPClient]:
        """One SFTP session through a new `ssh` process; what `ssh` said, translated, when it
        could not open one (a refused login or host key stops here as at the first connection)."""
        try:
            pipe = launcher.start()
            try:
                client = paramiko.SFTPClient(pipe)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise SshSessionFailed(pipe.close() or str(exc)) from None
        except OpenSshUnavailable as exc:
            raise TransientError(f"{self.label}: {exc}") from None
        except SshSessionFailed as exc:
            words, where = exc.words, f"{self.label}: ssh"
            if "Permission denied" in words:
                raise AuthError(f"{where}: the server refused the login of {self._login.username!r} ({words})") from None
            if "host key" in words.lower() or "HOST IDENTIFICATION" in words:
                raise HostKeyRefused(f"{where}: the server's host key is not one ssh was given to expect (the keys "
                                     f"pinned, or the one checked at the first connection) ({words}); refused") from None
            raise TransientError(f"{where}: no SFTP session ({words})") from None
        pipe.settimeout(120.0)
        try:
            self._ask_limits(client)  # the first session's, where no paramiko session asked them
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TransientError(f"{self.label}: ssh: the server's limits could not be asked "
                                 f"({pipe.close() or exc})") from None
        pipe.max_write = min(self.max_write, 255 * 1024) if self.max_write > 0 else _PIPE_WRITE_DEFAULT
        return pipe, client

    def close(self) -> None:
        self._sessions.close()
        if self._launcher is not None:
            self._launcher.close()

    def session(self) -> contextlib.AbstractContextManager[paramiko.SFTPClient]:
        """One SFTP session of the pool, lent to this thread (what paramiko raises is the
        caller's to translate)."""
        return self._sessions.borrow()

    def __enter__(self) -> "SftpStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, fn: Callable[[paramiko.SFTPClient], T], key: str | None, what: str) -> T:
        """Run `fn` with a borrowed session; translate what paramiko raises. A write that finds a
        directory missing which this store had made or seen (someone removed it since) runs once
        more, looking for every directory again."""
        try:
            with self._sessions.borrow() as sftp:
                try:
                    return fn(sftp)
                except IOError as exc:
                    if not (_is_missing(exc) and self._dirs):
                        raise
                    self._dirs.clear()
                    return fn(sftp)
        except ConnectorError:
            raise
        except (EOFError, socket.timeout, paramiko.SSHException, IOError, OSError) as exc:
            raise _translated(exc, f"{self.label}: {what}", key) from None

    # ---- paths ------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        refuse_hostile_key(key, self.label)
        return f"{self.root}/{key}"

    def _control(self, *parts: str) -> str:
        return "/".join((self.root, CONTROL_DIR) + parts)

    def _sidecar_path(self, key: str) -> str:
        return self._control("meta", key + ".json")

    def _root_missing(self, sftp: paramiko.SFTPClient) -> NotFound | None:
        try:
            sftp.stat(self.root)
        except IOError as exc:
            if _is_missing(exc):
                return NotFound(f"{self.label}: the root directory {self.root} does not exist on the server; "
                                "check `root`")
            raise
        return None

    def _not_found(self, sftp: paramiko.SFTPClient, key: str) -> NotFound:
        return self._root_missing(sftp) or NotFound(f"{self.label}: {key!r} does not exist", key=key)

    # ---- reading ----------------------------------------------------------------------------

    def list(self, prefix: str = "", *, details: bool | None = None) -> Iterator[ObjectMeta]:
        """Every file under `prefix` in key order, directory by directory (module docstring);
        `details` overrides `source_details` for this listing."""
        head_dir, _, start = prefix.rpartition("/")
        if head_dir:
            refuse_hostile_key(head_dir, self.label)

        def entries(rel_dir: str) -> list[tuple[str, paramiko.SFTPAttributes, str | None, dict[str, Any] | None]]:
            # Runs on the listing's own threads too: nothing here touches the store's state.
            path = f"{self.root}/{rel_dir}" if rel_dir else self.root

            def read(sftp: paramiko.SFTPClient):
                try:
                    return sftp.listdir_attr(path)
                except IOError as exc:
                    if _is_missing(exc):
                        missing = self._root_missing(sftp)
                        if missing:
                            raise missing from None
                        return []
                    raise
            found: list = []
            for attrs in self._call(read, None, f"listing {path}"):
                name = attrs.filename
                if not rel_dir and name == CONTROL_DIR:
                    continue
                key = f"{rel_dir}/{name}" if rel_dir else name
                mode = attrs.st_mode or 0
                if stat_mode.S_ISLNK(mode):
                    found.append((key, attrs, _LINK_NOT_FOLLOWED))
                elif stat_mode.S_ISDIR(mode):
                    found.append((key + "/", attrs, None))
                elif stat_mode.S_ISREG(mode):
                    found.append((key, attrs, None))
                else:  # a socket, a FIFO, a device: no bytes to copy, named rather than left out
                    found.append((key, attrs, "not a regular file at the source (a socket, FIFO or device); "
                                              "exclude it"))
            # A directory sorts as its name plus `/`: the walk then yields keys in plain string order.
            found.sort(key=lambda item: item[0])
            sidecars: dict[str, dict[str, Any]] = {}
            unreadable: set[str] = set()
            if meta_dir is not None:
                files = [e[0] for e in found if e[2] is None and not e[0].endswith("/")]
                sidecars, unreadable = self._call(lambda sftp: self._sidecars(sftp, files, meta_dir), None,
                                                  f"reading the metadata files of {path}")
            return [(key, attrs, why or (_METADATA_UNREADABLE if key in unreadable else None), sidecars.get(key))
                    for key, attrs, why in found]

        # The walk reads each directory's subdirectories ahead of it, up to `list_ahead` of them
        # at a time per level (over a far server a directory costs round trips, not CPU: one at a
        # time made the listing the pace of a tree of many small directories), and still yields
        # the keys in order, each directory whole; memory: `list_ahead` directories per level.
        # A tree this connector wrote (`.exitplan-sftp/meta/` at the root, or above it up to
        # `tree_root`) lists, for a source (`source_details`), what each file's metadata file holds.
        meta_dir = (self._call(self._source_meta, None, "looking for metadata files")
                    if (self.source_details if details is None else details) else None)
        pool = ThreadPoolExecutor(self.list_ahead, thread_name_prefix="sftp-list")
        try:
            top = [e for e in entries(head_dir) if e[0][len(head_dir) + 1 if head_dir else 0:].startswith(start)]
            stack = [_Level(top, lambda d: pool.submit(entries, d[:-1]), self.list_ahead)]
            while stack:
                item = stack[-1].next()
                if item is None:
                    stack.pop()
                    continue
                key, attrs, not_copyable, sidecar = item
                if key.endswith("/"):
                    stack.append(_Level(stack[-1].listing(key).result(), stack[-1].read, self.list_ahead))
                    continue
                if not_copyable is _LINK_NOT_FOLLOWED:
                    log.warning("%s: %r is a symbolic link; not followed", self.label, key)
                    self.skipped_links.append(key)
                if not_copyable:
                    yield ObjectMeta(key=key, size=0, etag=change_marker(attrs), last_modified=_mtime(attrs),
                                     not_copyable=not_copyable)
                else:
                    yield self._described(key, attrs, sidecar)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def head(self, key: str) -> ObjectMeta:
        path = self._path(key)

        def head(sftp: paramiko.SFTPClient) -> ObjectMeta:
            try:
                attrs = sftp.stat(path)
            except IOError as exc:
                if _is_missing(exc):
                    raise self._not_found(sftp, key) from None
                raise
            if not stat_mode.S_ISREG(attrs.st_mode or 0):
                raise NotFound(f"{self.label}: {key!r} is not a regular file", key=key)
            meta_dir = self._source_meta(sftp) if self.source_details else self._control("meta")
            sidecar = self._sidecars(sftp, [key], meta_dir)[0].get(key) if meta_dir is not None else None
            return self._described(key, attrs, sidecar)
        return self._call(head, key, f"head of {key!r}")

    def _source_meta(self, sftp: paramiko.SFTPClient) -> str | None:
        """Where a source's files have their metadata files: `<d>/.exitplan-sftp/meta/<the root
        below d>` for the nearest `d` from the root up to `tree_root` that has that directory (a
        tree written from `d`); None: nowhere (files a partner put there). A look per level, once:
        found, it is kept for the store's life."""
        if self._found_meta is not None:
            return self._found_meta
        d = self.root
        while True:
            meta = f"{d.rstrip('/')}/{CONTROL_DIR}/meta"
            if _is_directory(sftp, meta):
                below = self.root[len(d):].strip("/")
                self._found_meta = f"{meta}/{below}" if below else meta
                return self._found_meta
            if d == self._tree_root or d == "/":
                return None
            d = posixpath.dirname(d)

    def _described(self, key: str, attrs: paramiko.SFTPAttributes, sidecar: dict[str, Any] | None) -> ObjectMeta:
        """The file `key` with `attrs`, and what its metadata file `sidecar` says when it describes
        this very file (its marker is the file's: a file changed since has no metadata)."""
        marker = change_marker(attrs)
        if sidecar is None or sidecar.get("marker") != marker:
            return ObjectMeta(key=key, size=attrs.st_size or 0, etag=marker, last_modified=_mtime(attrs))
        md5 = sidecar.get("content_md5")
        return ObjectMeta(
            key=key, size=attrs.st_size or 0, etag=marker, last_modified=_mtime(attrs),
            content_md5=bytes.fromhex(md5) if md5 else None,
            content=ContentSettings(**sidecar.get("content", {})), metadata=dict(sidecar.get("metadata", {})),
        )

    def _sidecars(self, sftp: paramiko.SFTPClient, keys: Sequence[str],
                  meta_dir: str) -> tuple[dict[str, dict[str, Any]], set[str]]:
        """The metadata files of `keys` below `meta_dir` that exist, read as JSON, and the keys
        whose metadata file is there but not a JSON object (logged; a source's listing refuses
        those by name): two round trips per `_SIDECARS_AT_ONCE` files (the opens; the reads and
        closes)."""
        found: dict[str, dict[str, Any]] = {}
        unreadable: set[str] = set()
        for at in range(0, len(keys), _SIDECARS_AT_ONCE):
            chunk = keys[at:at + _SIDECARS_AT_ONCE]
            texts = read_small_files(sftp, [f"{meta_dir}/{k}.json" for k in chunk], self.read_request)
            for key, raw in zip(chunk, texts):
                if raw is None:
                    continue
                try:
                    value = json.loads(raw)
                except ValueError:
                    value = None
                if isinstance(value, dict):
                    found[key] = value
                else:
                    unreadable.add(key)
                    log.warning("%s: the metadata file of %r is not a JSON object", self.label, key)
        return found, unreadable

    def read_range(self, key: str, start: int, end: int, *, if_match: str | None = None) -> bytes:
        """Bytes `start .. end-1`, checked against `if_match` before and after the read."""
        path = self._path(key)

        if start < 0 or end < start:
            raise InvalidRequest(f"{self.label}: invalid range {start}-{end} for {key!r}", key=key)

        def read(sftp: paramiko.SFTPClient, early: bool = True) -> bytes:
            try:
                handle = open_for_reading(sftp, path)
            except IOError as exc:
                if _is_missing(exc):
                    raise self._not_found(sftp, key) from None
                raise
            # Two round trips: the open; a look at the file, the reads, a second look and the
            # close, sent at once. The answers to requests on one handle come in order, so the
            # bytes are those of the file between the two looks. The close goes with the reads
            # only where the server stated the most it answers to a read (every read asks no
            # more, so only the end of the file answers short); elsewhere a short answer is asked
            # again and the second look and the close follow the reads (three round trips).
            batch = _Batch(sftp)
            tail: dict[str, int] = {}

            def look_and_close() -> None:
                tail["look"] = batch.send(CMD_FSTAT, handle)
                tail["close"] = batch.send(CMD_CLOSE, handle)

            short = False
            try:
                first = batch.send(CMD_FSTAT, handle)
                data, failure = b"", None
                if start != end:
                    try:
                        data = pipelined_read(sftp, handle, start, end, self.read_request,
                                              sent_all=look_and_close if early and self._close_early else None)
                    except _AnsweredShort:
                        short = True
                    except (IOError, EOFError) as exc:
                        failure = exc
                before = batch.attrs(first)
                if if_match is not None and change_marker(before) != if_match:
                    raise SourceChanged(f"{self.label}: {key!r} changed (now {change_marker(before)}, "
                                        f"pinned {if_match})", key=key)
                size = before.st_size or 0
                if end > size or (start == size and start != end) or start > size:
                    raise InvalidRequest(f"{self.label}: range {start}-{end} is outside {key!r} ({size} bytes)", key=key)
                if failure is not None:
                    raise failure
                if start == end:
                    return b""
                if "look" not in tail:
                    look_and_close()
            finally:
                if "close" not in tail:
                    tail["close"] = batch.send(CMD_CLOSE, handle)
                batch.collect()
            if short:
                # A read answered short inside the file though the server stated its limit: this
                # store asks again from now on, and this range is read again so.
                log.info("%s: the server answers reads shorter than it states; the rest of a short read is asked "
                         "again from now on", self.label)
                self._close_early = False
                return read(sftp, early=False)
            after = batch.attrs(tail["look"])
            batch.status(tail["close"])
            if if_match is not None and change_marker(after) != if_match:
                # Written while we read it: the bytes may mix two versions.
                raise SourceChanged(f"{self.label}: {key!r} changed while it was read (now {change_marker(after)}, "
                                    f"pinned {if_match})", key=key)
            if len(data) != end - start:
                raise TransientError(f"{self.label}: short read of {key!r}: {len(data)} bytes for range {start}-{end}",
                                     key=key)
            return data
        return self._call(read, key, f"read of {key!r}")

    # ---- writing ----------------------------------------------------------------------------

    def _makedirs(self, sftp: paramiko.SFTPClient, directory: str) -> None:
        """Create `directory` and its missing parents (below the root, which must exist); a
        directory made or found once is not looked for again (`_call` forgets them all when one
        has gone)."""
        if directory in self._dirs:
            return
        missing = []
        current = directory
        # Up to the nearest directory made or found before (the root too, once found): each
        # directory looked at is a round trip.
        while current != self.root and len(current) > len(self.root) and current not in self._dirs:
            try:
                found = sftp.stat(current)
                if not stat_mode.S_ISDIR(found.st_mode or 0):
                    below = directory[len(self.root) + 1:]
                    raise InvalidRequest(f"{self.label}: {current[len(self.root) + 1:]!r} is a file, so the directory "
                                         f"{below!r} cannot be made below it (a key and a key below it, as a file "
                                         "system cannot hold both)")
                break
            except IOError as exc:
                if not _is_missing(exc):
                    raise
                missing.append(current)
                current = posixpath.dirname(current)
        if current == self.root and current not in self._dirs:
            missing_root = self._root_missing(sftp)
            if missing_root:
                raise missing_root
        for path in reversed(missing):
            try:
                sftp.mkdir(path)
            except IOError:
                # Another thread made it first; anything else shows on the next call.
                sftp.stat(path)
        while len(directory) > len(self.root):
            self._dirs.add(directory)
            directory = posixpath.dirname(directory)
        self._dirs.add(self.root)

    def _makedirs_for(self, sftp: paramiko.SFTPClient, *paths: str) -> None:
        """The directories of `paths`, each made as `_makedirs` makes it (once each)."""
        for directory in dict.fromkeys(posixpath.dirname(p) for p in paths):
            self._makedirs(sftp, directory)

    def _write_file(self, sftp: paramiko.SFTPClient, path: str, body: PartBody, size: int, key: str,
                    md5: bytes | None, offset: int | None = None, *, handle: bytes | None = None,
                    hashed: bool = True) -> tuple[bytes | None, paramiko.SFTPAttributes]:
        """Write exactly `size` bytes of `body` to `path` (created or truncated; with `offset`,
        created if missing and written from there, the rest of the file kept; with `handle`, the
        file the caller opened there), synced where the server offers `fsync@openssh.com`: the MD5
        of the bytes written (None when not `hashed` and no `md5` was announced), which must be
        `md5` when the caller announces one (an S3 server checks Content-MD5; here the bytes are
        hashed as they are sent), and the file's attributes once written. Two round trips: the
        open, then the writes with the sync, a look at the file and the close."""
        digest = hashlib.md5() if hashed or md5 is not None else None
        if isinstance(body, (bytes, bytearray, memoryview)) and len(memoryview(body)) != size:
            if handle is not None:
                with contextlib.suppress(Exception):
                    PipelinedWriter(sftp, handle).abandon()
            raise TransientError(f"{self.label}: the body of {key!r} is {len(memoryview(body))} bytes, {size} "
                                 "announced", key=key)
        start = offset or 0
        if handle is None:
            handle = open_for_writing(sftp, path) if offset is None else open_for_writing(sftp, path, existing="keep")
        writer = PipelinedWriter(sftp, handle, start)

        def chunks() -> Iterator[bytes | memoryview]:
            if isinstance(body, (bytes, bytearray, memoryview)):
                yield memoryview(body)
                return
            while writer.offset - start < size:
                chunk = body.read(min(_WRITE_CHUNK, size - (writer.offset - start)))
                if not chunk:
                    raise TransientError(f"{self.label}: the body of {key!r} ended after {writer.offset - start} "
                                         f"bytes, {size} announced", key=key)
                yield chunk

        writer.write_all(_hashed(chunks(), digest) if digest is not None else chunks())
        attrs = self._close_written(sftp, writer, path)
        if attrs.st_size != size if offset is None else (attrs.st_size or 0) < start + size:
            raise TransientError(f"{self.label}: {key!r}: the server holds {attrs.st_size} bytes after writing "
                                 f"{size} at {start}", key=key)
        sent = digest.digest() if digest is not None else None
        if md5 is not None and sent != md5:
            raise BodyDigestMismatch(f"{self.label}: the bytes written for {key!r} have MD5 {sent.hex()}, the "
                                     f"caller announced {md5.hex()}", key=key, computed=sent, announced=md5)
        return sent, attrs

    def _close_written(self, sftp: paramiko.SFTPClient, writer: "PipelinedWriter",
                       path: str) -> paramiko.SFTPAttributes:
        """Every write acknowledged, the file synced, looked at and closed; its attributes. Without
        `fsync@openssh.com` the file is looked at by name once closed (a server may still be
        writing it back before the close)."""
        attrs, synced = writer.close(sync=self._fsync_offered)
        if self._fsync_offered and not synced:
            log.info("%s: the server does not offer fsync@openssh.com; files are renamed into place without "
                     "being synced first", self.label)
            self._fsync_offered = False
        return attrs if synced else sftp.stat(path)

    def _temp_path(self) -> str:
        """A new name in the store's temporary directory, where every file is written before it is
        renamed into place (the only place a killed write leaves anything: `temporary_files`)."""
        return self._control("tmp", self._unique())

    def temporary_files(self) -> list["TemporaryFile"]:
        """The files in the temporary directory (`.exitplan-sftp/tmp/`): writes in progress, and
        what killed runs left (`exitplan cleanup` removes those untouched for long)."""
        path = self._control("tmp")

        def read(sftp: paramiko.SFTPClient) -> list[paramiko.SFTPAttributes]:
            try:
                return sftp.listdir_attr(path)
            except IOError as exc:
                if _is_missing(exc):
                    return []
                raise
        return sorted((TemporaryFile(a.filename, a.st_size or 0, _mtime(a))
                       for a in self._call(read, None, f"listing {path}") if stat_mode.S_ISREG(a.st_mode or 0)),
                      key=lambda f: f.name)

    def remove_temporary_file(self, name: str) -> None:
        """Remove `name` from the temporary directory (gone already: nothing to do)."""
        if not name or "/" in name or name in (".", ".."):
            raise InvalidRequest(f"{self.label}: {name!r} is not a file name of the temporary directory")
        path = self._control("tmp", name)
        self._call(lambda sftp: _remove_if_there(sftp, path), None, f"removing {path}")

    def _unique(self) -> str:
        """A name no other writer of the directory uses: this store's random prefix and a count."""
        return f"{self._prefix}{next(self._names):x}"

    def _sidecar(self, meta: WriteMeta, content_md5: bytes | None, attrs: paramiko.SFTPAttributes) -> bytes:
        """The metadata file of an object written with `meta`, whose file has `attrs`."""
        sidecar = {"marker": change_marker(attrs), "content": {k: v for k, v in vars(meta.content).items()
                                                               if v is not None},
                   "metadata": dict(meta.metadata)}
        if content_md5 is not None:
            sidecar["content_md5"] = content_md5.hex()
        return json.dumps(sidecar, sort_keys=True).encode()

    def _publish(self, sftp: paramiko.SFTPClient, temp: str, key: str, meta: WriteMeta,
                 content_md5: bytes | None, attrs: paramiko.SFTPAttributes) -> str:
        """Rename `temp` (whose attributes are `attrs`: a rename keeps them) over `key`, atomically,
        then record its metadata; its marker (the ETag)."""
        final = self._path(key)
        self._makedirs(sftp, posixpath.dirname(final))
        sftp.posix_rename(temp, final)
        self._write_small(sftp, self._sidecar_path(key), self._sidecar(meta, content_md5, attrs))
        return change_marker(attrs)

    def _write_small(self, sftp: paramiko.SFTPClient, path: str, data: bytes) -> None:
        """A small control file, written whole under a temporary name then renamed."""
        temp = self._temp_path()
        self._makedirs_for(sftp, temp, path)
        writer = PipelinedWriter(sftp, open_for_writing(sftp, temp))
        writer.write_all((data,))
        writer.close(sync=False, look=False)
        sftp.posix_rename(temp, path)

    def put(self, key: str, body: PartBody, size: int, meta: WriteMeta, md5: bytes | None) -> str:
        self._path(key)

        def put(sftp: paramiko.SFTPClient) -> str:
            # Four round trips: both files opened; the data written, synced, looked at and closed;
            # the metadata file written and closed, and the data renamed into place, at once (none
            # of them depends on another); then the metadata file renamed, once it is whole.
            temp, final, side = self._temp_path(), self._path(key), self._sidecar_path(key)
            side_temp = self._temp_path()
            self._makedirs_for(sftp, temp, final, side)
            try:
                handle, side_handle = open_all_for_writing(sftp, (temp, side_temp))
                try:
                    sent, attrs = self._write_file(sftp, temp, body, size, key, md5, handle=handle)
                except BaseException:
                    with contextlib.suppress(Exception):  # what failed the write is what is raised
                        PipelinedWriter(sftp, side_handle).abandon()
                    raise
                batch = _Batch(sftp)
                writer = PipelinedWriter(sftp, side_handle)
                try:
                    writer.write_all((self._sidecar(meta, sent, attrs),))
                    renamed = batch.send(CMD_EXTENDED, "posix-rename@openssh.com", temp, final)
                    writer.close(sync=False, look=False)
                    batch.status(renamed)
                finally:
                    batch.collect()
                sftp.posix_rename(side_temp, side)
                return change_marker(attrs)
            except BaseException:
                for path in (temp, side_temp):
                    with contextlib.suppress(Exception):
                        sftp.remove(path)
                raise
        return self._call(put, key, f"write of {key!r}")

    def delete(self, key: str) -> None:
        path = self._path(key)

        def delete(sftp: paramiko.SFTPClient) -> None:
            for p in (path, self._sidecar_path(key)):
                _remove_if_there(sftp, p)
        self._call(delete, key, f"delete of {key!r}")

    # ---- uploads in parts -------------------------------------------------------------------

    def open_multipart(self, key: str, meta: WriteMeta) -> "SftpUpload":
        self._path(key)
        upload_id = uuid.uuid4().hex
        record = {"key": key, "content": {k: v for k, v in vars(meta.content).items() if v is not None},
                  "metadata": dict(meta.metadata)}
        self._call(lambda sftp: self._write_small(sftp, self._control("uploads", upload_id, "upload.json"),
                                                  json.dumps(record, sort_keys=True).encode()),
                   key, f"opening an upload of {key!r}")
        return SftpUpload(self, key, upload_id, meta, fresh=True)

    def resume_multipart(self, key: str, upload_id: str) -> "SftpUpload":
        self._path(key)
        record = self._upload_record(upload_id, key)
        if record is None or record.get("key") != key:
            raise NotFound(f"{self.label}: no upload {upload_id!r} of {key!r}", key=key)
        meta = WriteMeta(ContentSettings(**record.get("content", {})), dict(record.get("metadata", {})))
        return SftpUpload(self, key, upload_id, meta)

    def _upload_record(self, upload_id: str, key: str | None) -> dict[str, Any] | None:
        if not upload_id.isalnum():
            return None

        def read(sftp: paramiko.SFTPClient):
            try:
                with sftp.open(self._control("uploads", upload_id, "upload.json"), "rb") as f:
                    return json.loads(f.read(1024 * 1024)), f.stat()
            except IOError as exc:
                if _is_missing(exc):
                    return None
                raise
        found = self._call(read, key, f"reading upload {upload_id}")
        return found[0] if found else None

    def list_multipart_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        def ids(sftp: paramiko.SFTPClient):
            try:
                return sorted(sftp.listdir_attr(self._control("uploads")), key=lambda a: a.filename)
            except IOError as exc:
                if _is_missing(exc):
                    return []
                raise
        for attrs in self._call(ids, None, "listing uploads"):
            record = self._upload_record(attrs.filename, None)
            if record and str(record.get("key", "")).startswith(prefix):
                yield PendingUpload(record["key"], attrs.filename, _mtime(attrs))


class SftpFiles:
    """Plain file operations on an `SftpStore`'s server, by absolute path, for a caller that
    manages files itself (a restore onto an SFTP server, engine/restore_sftp.py). Each call borrows
    a session; what the server answers becomes a connector error (`NotFound`, `AuthError` for
    "permission denied", `TransientError` for the rest, each naming the path). Exceptions raised by
    a caller's iterator inside `write_new` go through unchanged."""

    def __init__(self, store: SftpStore):
        self.store = store
        self.label = f"sftp://{store.host}:{store.port}"

    def _do(self, path: str, what: str, fn: Callable[[paramiko.SFTPClient], T]) -> T:
        try:
            with self.store.session() as sftp:
                return fn(sftp)
        except ConnectorError:
            raise
        except (EOFError, socket.timeout, paramiko.SSHException, IOError, OSError) as exc:
            raise _translated(exc, f"{self.label}{path}: {what}", path) from None

    def kind(self, path: str) -> str | None:
        """What `path` is, not following a link: "dir", "file", "link", "other", or None (missing)."""
        def look(sftp: paramiko.SFTPClient) -> str | None:
            try:
                mode = sftp.lstat(path).st_mode or 0
            except IOError as exc:
                if _is_missing(exc):
                    return None
                raise
            return ("dir" if stat_mode.S_ISDIR(mode) else "link" if stat_mode.S_ISLNK(mode)
                    else "file" if stat_mode.S_ISREG(mode) else "other")
        return self._do(path, "looking at it", look)

    def mkdir(self, path: str, mode: int) -> None:
        """Create the directory `path`; one already there (made meanwhile) is not an error."""
        def make(sftp: paramiko.SFTPClient) -> None:
            try:
                sftp.mkdir(path, mode)
            except IOError:
                if not stat_mode.S_ISDIR(sftp.lstat(path).st_mode or 0):
                    raise
        self._do(path, "creating the directory", make)

    def write_new(self, path: str, chunks: Iterable[bytes], mode: int, read_back: int) -> tuple[int, str, str]:
        """Create `path` (never an existing file or link: `SSH_FXF_EXCL`) with permissions `mode`,
        write `chunks`, sync it, and read it back from the server `read_back` bytes at a time:
        (bytes written, SHA-256 of what was written, SHA-256 of what the file holds)."""
        def write(sftp: paramiko.SFTPClient) -> tuple[int, str, str]:
            sent = hashlib.sha256()
            writer = PipelinedWriter(sftp, open_for_writing(sftp, path, mode=mode, existing="refuse"))
            writer.write_all(_hashed(chunks, sent))
            attrs, _ = writer.close(sync=True)
            stored = hashlib.sha256()
            size = attrs.st_size or 0
            with sftp.open(path, "rb") as f:
                for start in range(0, size, read_back):
                    stored.update(pipelined_read(sftp, f.handle, start, min(start + read_back, size),
                                                 self.store.read_request))
            return writer.offset, sent.hexdigest(), stored.hexdigest()
        return self._do(path, "writing", write)

    def append(self, path: str, data: bytes, offset: int, mode: int, *, sync: bool) -> int:
        """Write `data` at `offset` of `path` (created by the first call, offset 0: never an
        existing file); the offset reached."""
        def write(sftp: paramiko.SFTPClient) -> int:
            writer = PipelinedWriter(sftp, open_for_writing(sftp, path, mode=mode,
                                                            existing="keep" if offset else "refuse"), offset)
            writer.write_all((data,))
            writer.close(sync=sync, look=False)
            return writer.offset
        return self._do(path, "writing", write)

    def set_mtime(self, path: str, when: float) -> None:
        self._do(path, "setting its modification time", lambda sftp: sftp.utime(path, (when, when)))

    def rename(self, source: str, target: str, *, replace: bool) -> None:
        """Give `source` the name `target`: SFTP's RENAME, which fails when `target` exists, or with
        `replace`, `posix-rename@openssh.com`, which replaces a file atomically."""
        self._do(target, "renaming into place",
                 lambda sftp: (sftp.posix_rename if replace else sftp.rename)(source, target))

    def remove(self, path: str) -> None:
        """Remove the file `path`; a missing one is not an error."""
        self._do(path, "removing it", lambda sftp: _remove_if_there(sftp, path))

    def rmdir(self, path: str) -> None:
        self._do(path, "removing the directory", lambda sftp: sftp.rmdir(path))


class SftpUpload:
    """An upload in parts to an `SftpStore` (its module docstring says how it is kept): the parts
    written in place into one `data` file at their offsets, a marker file per part once its bytes
    are synced, the file renamed into place when complete."""

    def __init__(self, store: SftpStore, key: str, upload_id: str, meta: WriteMeta, *, fresh: bool = False):
        self.store, self.key, self.upload_id, self.meta = store, key, upload_id, meta
        self._dir = store._control("uploads", upload_id)
        self._data = f"{self._dir}/data"
        # An upload this object opened holds only the markers of its own attempts: a part number
        # never tried yet has none to remove, and its directory is not listed first (four round
        # trips). A resumed upload, and a part tried before, are listed.
        self._fresh = fresh
        self._tried: set[int] = set()

    def _parts(self, sftp: paramiko.SFTPClient) -> dict[int, tuple[str, int, PartReceipt]]:
        """number -> (marker name, offset, receipt) of every part the upload holds."""
        try:
            listed = sftp.listdir(self._dir)
        except IOError as exc:
            if _is_missing(exc):
                raise NotFound(f"{self.store.label}: the upload {self.upload_id} of {self.key!r} is gone",
                               key=self.key) from None
            raise
        parts = {}
        for name in listed:
            fields = name.split("-")
            if len(fields) == 5 and fields[0] == "part" and all(f.isdigit() for f in fields[1:2] + fields[3:]):
                number, offset, size = int(fields[1]), int(fields[3]), int(fields[4])
                parts[number] = (name, offset, PartReceipt(number, fields[2], size))
        return parts

    def upload_part(self, number: int, body: PartBody, size: int, md5: bytes | None,
                    offset: int | None = None) -> PartReceipt:
        if offset is None or offset < 0:
            raise InvalidRequest(f"{self.store.label}: part {number} of {self.key!r} was sent without its offset "
                                 "in the object: an SFTP upload writes each part in place", key=self.key)

        def upload(sftp: paramiko.SFTPClient) -> PartReceipt:
            first_try = self._fresh and number not in self._tried
            self._tried.add(number)
            if not first_try:
                before = self._parts(sftp)  # NotFound when the upload was aborted
                old = before.get(number)
                if old is not None:  # its bytes are about to change: no marker may vouch for them meanwhile
                    sftp.remove(f"{self._dir}/{old[0]}")
            sent, _ = self.store._write_file(sftp, self._data, body, size, self.key, md5, offset=offset, hashed=False)
            tag = sent.hex() if sent is not None else uuid.uuid4().hex
            _create_empty(sftp, f"{self._dir}/part-{number:05d}-{tag}-{offset}-{size}")
            return PartReceipt(number, tag, size)
        return self.store._call(upload, self.key, f"part {number} of {self.key!r}")

    def list_parts(self) -> list[PartReceipt]:
        parts = self.store._call(self._parts, self.key, f"listing the parts of {self.key!r}")
        return [parts[n][2] for n in sorted(parts)]

    def complete(self, parts: Sequence[PartReceipt]) -> str:
        store = self.store

        def complete(sftp: paramiko.SFTPClient) -> str:
            held = self._parts(sftp)
            end = 0
            for i, part in enumerate(parts):
                mine = held.get(part.number)
                if mine is None or mine[2].etag != part.etag.strip('"') or mine[2].size != part.size:
                    raise InvalidRequest(f"{store.label}: part {part.number} of {self.key!r} is not held as sent",
                                         key=self.key)
                if mine[1] != end:
                    raise InvalidRequest(f"{store.label}: part {part.number} of {self.key!r} was written at byte "
                                         f"{mine[1]:,}, not after the parts before it ({end:,})", key=self.key)
                if i < len(parts) - 1 and part.size < store.limits.min_part_size:
                    raise InvalidRequest(f"{store.label}: part {part.number} of {self.key!r} is {part.size} bytes, "
                                         f"below the minimum of {store.limits.min_part_size} for a part that is not "
                                         "the last", key=self.key)
                end += part.size
            try:
                attrs: paramiko.SFTPAttributes | None = sftp.stat(self._data)
            except IOError as exc:
                if not _is_missing(exc):
                    raise
                attrs = None
            held_bytes = attrs.st_size or 0 if attrs is not None else 0
            if held_bytes < end:  # never made up by growing the file: it would hold zeros where parts are
                raise InvalidRequest(f"{store.label}: the upload of {self.key!r} holds {held_bytes:,} bytes of data, "
                                     f"its parts {end:,}", key=self.key)
            if attrs is None:  # an upload of no part: an empty object
                _create_empty(sftp, self._data)
                attrs = sftp.stat(self._data)
            elif held_bytes > end:  # bytes past the parts: an attempt with other parts wrote them
                sftp.truncate(self._data, end)
                attrs = sftp.stat(self._data)
            # The markers go first: killed after the rename, the upload holds no part and no data
            # (the next run sends the parts again), never parts whose data is gone.
            for name, _, _ in held.values():
                sftp.remove(f"{self._dir}/{name}")
            etag = store._publish(sftp, self._data, self.key, self.meta, None, attrs)
            self._remove(sftp)
            return etag
        return store._call(complete, self.key, f"completing {self.key!r}")

    def _remove(self, sftp: paramiko.SFTPClient) -> None:
        try:
            names = sftp.listdir(self._dir)
        except IOError as exc:
            if _is_missing(exc):
                return
            raise
        for name in names:
            with contextlib.suppress(IOError):
                sftp.remove(f"{self._dir}/{name}")
        with contextlib.suppress(IOError):
            sftp.rmdir(self._dir)

    def abort(self) -> None:
        self.store._call(self._remove, self.key, f"aborting the upload of {self.key!r}")


def _create_empty(sftp: paramiko.SFTPClient, path: str) -> None:
    """An empty file at `path` (emptied if it is there): one round trip for the open, one for the close."""
    PipelinedWriter(sftp, open_for_writing(sftp, path)).close(sync=False, look=False)


def _mtime(attrs: paramiko.SFTPAttributes) -> datetime | None:
    return datetime.fromtimestamp(attrs.st_mtime, tz=timezone.utc) if attrs.st_mtime is not None else None


class _Replies:
    """Collects the answers to pipelined read requests by request number (paramiko hands each
    answer to the object registered with its request)."""

    def __init__(self):
        self.by_number: dict[int, tuple[int, Any]] = {}

    def _async_response(self, t: int, msg: Any, num: int) -> None:
        self.by_number[num] = (t, msg)


def server_limits(sftp: paramiko.SFTPClient) -> tuple[int, int]:
    """The most bytes the server answers to one read and takes in one write, as it says them
    (`limits@openssh.com`; 0: not stated). OpenSSH answers at most 261,120 bytes: asking it for
    256 KiB made every answer short and cost a second request, waited for at once, per read."""
    try:
        t, msg = sftp._request(CMD_EXTENDED, "limits@openssh.com")
    except IOError:  # a server without the extension: it answers what it answers (short reads are asked again)
        return 0, 0
    if t != CMD_EXTENDED_REPLY:
        return 0, 0
    msg.get_int64()  # max-packet-length
    max_read = msg.get_int64()
    return max_read, msg.get_int64()


class _AnsweredShort(Exception):
    """A read was answered with fewer bytes than asked after `pipelined_read`'s `sent_all` ran:
    the rest cannot be asked for on that handle any more."""


def pipelined_read(sftp: paramiko.SFTPClient, handle: bytes, start: int, end: int,
                   request: int = _READ_REQUEST, *, sent_all: Callable[[], None] | None = None) -> bytearray:
    """Bytes `start .. end-1` of the open file `handle`, with up to `_READ_WINDOW` read requests in
    flight, into one buffer handed over as is (a copy would hold the range twice, outside the
    memory budget that counts it once). paramiko's own `readv`/prefetch slows down quadratically
    on large ranges and buffers without bound; this asks for exactly the range and nothing more.

    `sent_all`, when given, runs once every read of the range has been sent, before their answers
    are waited for (to send what follows the reads, the file's close among them): a read answered
    short from then on raises `_AnsweredShort`, every answer due read first."""
    out = bytearray(end - start)
    replies = _Replies()
    pending: list[tuple[int, int, int]] = []  # (request number, offset, length), oldest first
    pos = start
    closing = False
    while pos < end or pending:
        while pos < end and len(pending) < _READ_WINDOW:
            n = min(request, end - pos)
            pending.append((sftp._async_request(replies, CMD_READ, handle, int64(pos), n), pos, n))
            pos += n
        if sent_all is not None and pos >= end:
            sent_all()
            sent_all, closing = None, True
        num, offset, n = pending.pop(0)
        while num not in replies.by_number:
            sftp._read_response()
        t, msg = replies.by_number.pop(num)
        if t == CMD_STATUS:
            sftp._convert_status(msg)  # raises: EOF (the file shrank), or the server's error
            raise EOFError(f"no data at offset {offset}")
        if t != CMD_DATA:
            raise paramiko.SSHException(f"unexpected SFTP answer {t} to a read")
        data = msg.get_string()
        got = len(data)
        out[offset - start:offset - start + got] = data
        if got < n:
            if closing:
                for due, _, _ in pending:
                    while due not in replies.by_number:
                        sftp._read_response()
                raise _AnsweredShort(f"{got} bytes of {n} at offset {offset}")
            # A server may answer a read with fewer bytes than asked: ask again for the rest.
            pending.insert(0, (sftp._async_request(replies, CMD_READ, handle, int64(offset + got), n - got),
                               offset + got, n - got))
    return out


class _Batch:
    """Requests sent without waiting, their answers collected by request number: every answer is
    read (`collect`) before the session is given back, whatever was raised meanwhile."""

    def __init__(self, sftp: paramiko.SFTPClient):
        self.sftp = sftp
        self._replies = _Replies()
        self._due: set[int] = set()

    def send(self, t: int, *args: Any) -> int:
        num = self.sftp._async_request(self._replies, t, *args)
        self._due.add(num)
        return num

    def register(self) -> int:
        """A request number whose answer comes to this batch, for a request the caller frames and
        sends itself (registered as paramiko registers its own in `SFTPClient._async_request`)."""
        sftp = self.sftp
        with sftp._lock:
            num = sftp.request_number
            sftp._expecting[num] = self._replies
            sftp.request_number += 1
        self._due.add(num)
        return num

    def answer(self, num: int) -> tuple[int, Any]:
        replies = self._replies.by_number
        while num not in replies:
            self.sftp._read_response()
        self._due.discard(num)
        return replies.pop(num)

    def collect(self) -> None:
        """Read every answer still due (they stay for `answer`, `attrs` and `status`)."""
        replies = self._replies.by_number
        for num in sorted(self._due):
            while num not in replies:
                self.sftp._read_response()

    def attrs(self, num: int) -> paramiko.SFTPAttributes:
        t, msg = self.answer(num)
        if t == CMD_STATUS:
            self.sftp._convert_status(msg)
        if t != CMD_ATTRS:
            raise paramiko.SSHException(f"unexpected SFTP answer {t} to an fstat")
        return paramiko.SFTPAttributes._from_msg(msg)

    def status(self, num: int) -> None:
        t, msg = self.answer(num)
        if t != CMD_STATUS:
            raise paramiko.SSHException(f"unexpected SFTP answer {t}")
        self.sftp._convert_status(msg)  # raises on anything but OK


def read_small_files(sftp: paramiko.SFTPClient, paths: Sequence[str], request: int) -> list[bytes | None]:
    """The whole content of each of `paths` (None: no such file), in two round trips: the opens
    sent at once, then each file's read of `request` bytes and its close. A file whose read comes
    back `request` bytes long may hold more: it is read on its own, the usual way, up to
    `_SMALL_FILE_MAX` bytes (what a larger file holds is cut there)."""
    handles = _open_all(sftp, paths, SFTP_FLAG_READ, missing_ok=True)
    batch = _Batch(sftp)
    try:
        reads = {}
        for i, handle in enumerate(handles):
            if handle is not None:
                reads[i] = batch.send(CMD_READ, handle, int64(0), request)
                batch.send(CMD_CLOSE, handle)
        out: list[bytes | None] = [None] * len(paths)
        for i, num in reads.items():
            t, msg = batch.answer(num)
            if t == CMD_DATA:
                out[i] = msg.get_string()
            elif t == CMD_STATUS:
                try:
                    sftp._convert_status(msg)
                except EOFError:
                    out[i] = b""  # an empty file
            else:
                raise paramiko.SSHException(f"unexpected SFTP answer {t} to a read")
            if len(out[i]) >= request:
                with sftp.open(paths[i], "rb") as f:
                    out[i] = f.read(_SMALL_FILE_MAX)
        return out
    finally:
        batch.collect()


def _is_directory(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        return stat_mode.S_ISDIR(sftp.stat(path).st_mode or 0)
    except IOError as exc:
        if _is_missing(exc):
            return False
        raise


def open_for_reading(sftp: paramiko.SFTPClient, path: str) -> bytes:
    """Open `path` for reading; its handle."""
    t, msg = sftp._request(CMD_OPEN, path, SFTP_FLAG_READ, paramiko.SFTPAttributes())
    if t != CMD_HANDLE:
        raise paramiko.SSHException(f"unexpected SFTP answer {t} to an open")
    return msg.get_binary()


def open_all_for_writing(sftp: paramiko.SFTPClient, paths: Sequence[str]) -> list[bytes]:
    """Open each of `paths` for writing (created, emptied), the opens sent at once; their handles.
    If any open is refused, the files that did open are closed and the first refusal raises."""
    return _open_all(sftp, paths, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC)  # none missing: it raises


def _open_all(sftp: paramiko.SFTPClient, paths: Sequence[str], flags: int, *,
              missing_ok: bool = False) -> list[bytes | None]:
    """Open each of `paths` with `flags`, the opens sent at once; their handles (None: no such
    file, where `missing_ok`). If any open is refused, the files that did open are closed and the
    first refusal raises."""
    batch = _Batch(sftp)
    nums = [batch.send(CMD_OPEN, path, flags, paramiko.SFTPAttributes()) for path in paths]
    handles: list[bytes | None] = []
    error: BaseException | None = None
    for num in nums:
        try:
            t, msg = batch.answer(num)
            if t == CMD_STATUS:
                sftp._convert_status(msg)
            if t != CMD_HANDLE:
                raise paramiko.SSHException(f"unexpected SFTP answer {t} to an open")
            handles.append(msg.get_binary())
        except (IOError, EOFError, paramiko.SSHException) as exc:
            handles.append(None)
            if not (missing_ok and _is_missing(exc)):
                error = error or exc
    if error is not None:
        for handle in handles:
            if handle is not None:
                with contextlib.suppress(Exception):  # the refusal is what is raised
                    PipelinedWriter(sftp, handle).abandon()
        raise error
    return handles


def open_for_writing(sftp: paramiko.SFTPClient, path: str, *, mode: int | None = None,
                     existing: str = "truncate") -> bytes:
    """Open `path` for writing, created if missing with permissions `mode`; its handle. An
    existing file is emptied (`existing="truncate"`), refused, as is a link (`"refuse"`:
    SSH_FXF_EXCL), or kept as it is (`"keep"`: to write on past what it holds)."""
    attrs = paramiko.SFTPAttributes()
    if mode is not None:
        attrs.st_mode = mode
    flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | {"truncate": SFTP_FLAG_TRUNC, "refuse": SFTP_FLAG_EXCL,
                                                  "keep": 0}[existing]
    t, msg = sftp._request(CMD_OPEN, path, flags, attrs)
    if t != CMD_HANDLE:
        raise paramiko.SSHException(f"unexpected SFTP answer {t} to an open")
    return msg.get_binary()


class PipelinedWriter:
    """Writes at increasing offsets of the open file `handle`, up to `_WRITE_WINDOW` requests in
    flight, each sized to fit one SSH packet (paramiko's own writes of 32 KiB take two packets,
    the second of a few bytes: twice the per-packet cost), then the file synced, looked at and
    closed in the same round trip (requests on one handle are answered in order). Every answer is
    read and checked here, by request number: paramiko's pipelined writes hand their answers to
    whichever request of the session reads next, which lost refusals."""

    def __init__(self, sftp: paramiko.SFTPClient, handle: bytes, offset: int = 0):
        self.sftp, self.handle, self.offset = sftp, handle, offset
        pipe = sftp.sock if isinstance(sftp.sock, SshPipe) else None
        self._pipe = pipe
        if pipe is not None:  # an OpenSSH session: requests as large as the server takes, sent uncopied
            self.request = pipe.max_write
            self._window = max(2, _PIPE_WRITE_IN_FLIGHT // self.request)
            self._handle_field = struct.pack(">I", len(handle)) + handle
        else:
            self.request = max(4096, sftp.get_channel().out_max_packet_size - _CHANNEL_MARGIN - _WRITE_HEADER
                               - len(handle))
            self._window = _WRITE_WINDOW
        self._batch = _Batch(sftp)
        self._pending: collections.deque[int] = collections.deque()
        self._closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), self.request):
            if len(self._pending) >= self._window:
                try:
                    self._status(self._pending.popleft())
                except (IOError, EOFError):
                    self._drain()
                    raise
            if self._pipe is not None:
                chunk = view[start:start + self.request]
                self._pending.append(self._send_write(chunk))
            else:
                chunk = bytes(view[start:start + self.request])
                self._pending.append(self._send(CMD_WRITE, self.handle, int64(self.offset), chunk))
            self.offset += len(chunk)

    def _send_write(self, chunk: memoryview) -> int:
        """An SFTP write request of `chunk` at the current offset, framed here and handed to the
        `ssh` process as it is (no copy); its request number."""
        num = self._batch.register()
        n = chunk.nbytes
        header = (struct.pack(">IBI", 1 + 4 + len(self._handle_field) + 12 + n, CMD_WRITE, num) + self._handle_field
                  + struct.pack(">QI", self.offset, n))
        self._pipe.send_parts((header, chunk))
        return num

    def write_all(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        """Write each of `chunks` in turn; on any failure (a refused write, or the caller's
        iterator) every answer due is read and the file closed before the exception goes on."""
        try:
            for chunk in chunks:
                self.write(chunk)
        except BaseException:
            self.abandon()
            raise

    def wait(self) -> None:
        """Wait for every write's answer; the first refusal raises once all have been read (the
        session is then left with nothing in flight)."""
        error = self._drain()
        if error is not None:
            raise error

    def close(self, sync: bool, look: bool = True) -> tuple[paramiko.SFTPAttributes | None, bool]:
        """After the writes: `fsync@openssh.com` (with `sync`), FSTAT (with `look`) and CLOSE, sent
        at once. The file's attributes (None without `look`), and whether it was synced (False: not
        asked, or the server lacks the extension). A refused write raises, the file closed all the
        same."""
        fsync = self._send(CMD_EXTENDED, "fsync@openssh.com", self.handle) if sync else None
        fstat = self._send(CMD_FSTAT, self.handle) if look else None
        close = self._send(CMD_CLOSE, self.handle)
        self._closed = True
        error = self._drain()
        synced = False
        if fsync is not None:
            try:
                self._status(fsync)
                synced = True
            except IOError as exc:
                log.debug("fsync@openssh.com unavailable (%s)", exc)
        attrs = None
        try:
            if fstat is not None:
                attrs = self._batch.attrs(fstat)
        except (IOError, EOFError) as exc:
            error = error or exc
        try:
            self._status(close)
        except (IOError, EOFError) as exc:
            error = error or exc
        if error is not None:
            raise error
        return attrs, synced

    def abandon(self) -> None:
        """Read what is still due and close the file, whatever they answer (a write failed or the
        body did: the caller raises that)."""
        with contextlib.suppress(IOError, EOFError):
            self._drain()
            if not self._closed:
                self._closed = True
                self._status(self._send(CMD_CLOSE, self.handle))

    def _send(self, t: int, *args: Any) -> int:
        return self._batch.send(t, *args)

    def _drain(self) -> BaseException | None:
        """Read every write answer still due; the first refusal among them."""
        error: BaseException | None = None
        while self._pending:
            try:
                self._status(self._pending.popleft())
            except (IOError, EOFError) as exc:
                error = error or exc
        return error

    def _status(self, num: int) -> None:
        self._batch.status(num)
