"""SFTP sessions carried by the OpenSSH client (`ssh -s ... sftp`), for `connectors.sftp`.

paramiko does the SSH protocol in Python: about 90 µs of CPU per 32 KiB SSH packet, under the
GIL, plus a thread hand-off for every answer (bench/README.md). The OpenSSH client does it in C, in
a process of its own: exitplan's process then only frames SFTP requests (up to the server's
`max-write-length`, 255 KiB with OpenSSH, instead of one SSH packet each) and hands their bytes to
the `ssh` process over a socket pair, without copying them (`SshPipe.send_parts`). paramiko's
`SFTPClient` still speaks SFTP over that pipe, so every operation of the connector is the same on
both transports.

What the `ssh` process is given, and how (`OpenSshLauncher`):

- the host keys: the keys a known_hosts pin holds for the server (then `ssh` makes the first
  login and checks the key itself), or, where the pin is a fingerprint, exactly the key the store
  checked against it with paramiko when it opened (`HostKeyPin`), written as the only known_hosts
  entries, with `StrictHostKeyChecking=yes` and `HostKeyAlgorithms` limited to those keys' types:
  a server presenting any other key is refused by `ssh` as by the store;
- the private key (decrypted when it has a passphrase: `ssh` runs with `BatchMode=yes` and asks
  nothing), the certificate and the known_hosts entry are memory files (`memfd_create`), read by
  `ssh` through `/proc/<pid>/fd/<n>`: no key is ever written to disk, none is in the command line
  or the environment;
- no configuration file (`-F /dev/null`), no agent, no forwarding of any kind, no X11, no
  compression, no local command; `BatchMode=yes`.

Linux only (memory files, /proc); `connectors.sftp` falls back to paramiko elsewhere, when `ssh`
is not installed, for a password login, or where the private key cannot be handed over.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import struct
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from typing import Sequence

from cryptography.hazmat.primitives import serialization

SSH = "ssh"
# How long `ssh` is given to exit once its pipe is closed, then to die once told to.
_EXIT_WAIT = 5.0
# Host key algorithms for a key of each type (an RSA key signs with SHA-2 since OpenSSH 8.8).
_HOST_KEY_ALGORITHMS = {"ssh-rsa": "rsa-sha2-512,rsa-sha2-256"}
_FXP_INIT, _FXP_VERSION = 1, 2
# Sessions multiplexed over one master connection: sshd's MaxSessions is 10 by default, and the
# master's own session counts. Past a server's own limit, `ssh` opens a connection of its own.
SESSIONS_PER_MASTER = 9


class OpenSshUnavailable(Exception):
    """Why the OpenSSH client cannot carry this store's sessions (the store says it and uses paramiko)."""


def openssh_path() -> str | None:
    """The `ssh` client on PATH, where memory files exist to hand it a key (Linux); None otherwise."""
    if not hasattr(os, "memfd_create") or not os.path.isdir(f"/proc/{os.getpid()}/fd"):
        return None
    return shutil.which(SSH)


def _memory_file(name: str, data: bytes) -> int:
    """A file in memory only (never on disk) holding `data`, readable by this user alone."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def unencrypted_key(text: str, passphrase: str | None) -> bytes:
    """The private key in `text` as `ssh` can read it without asking: as given when it has no
    passphrase, otherwise decrypted and written in OpenSSH's format (into a memory file only)."""
    if passphrase is None:
        return text.encode("ascii")
    data, password = text.encode("ascii"), passphrase.encode()
    try:
        key = serialization.load_ssh_private_key(data, password)
    except (ValueError, TypeError, serialization.UnsupportedAlgorithm):
        try:
            key = serialization.load_pem_private_key(data, password)
        except (ValueError, TypeError, serialization.UnsupportedAlgorithm) as exc:
            raise OpenSshUnavailable(f"the private key cannot be handed to ssh ({exc})") from None
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())


class SshPipe:
    """The socket between this process and one `ssh` process, as paramiko's `SFTPClient` uses a
    channel (`send`, `recv`, `settimeout`, `close`), plus `send_parts` (several buffers, no copy)."""

    def __init__(self, sock: socket.socket, process: subprocess.Popen, errors):
        self._sock = sock
        self.process = process
        self._errors = errors  # ssh's stderr (a temporary file)
        self.max_write = 0  # the data one SFTP write request carries at most (the store sets it)
        self._broken = False

    def send(self, data) -> int:
        with self._breaks():
            self._sock.sendall(data)
        return len(data)

    def send_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        """Send every byte of `parts`, in order, in as few system calls as the socket takes."""
        views = [memoryview(p).cast("B") for p in parts]
        with self._breaks():
            while views:
                sent = self._sock.sendmsg(views)
                while views and sent >= views[0].nbytes:
                    sent -= views[0].nbytes
                    views.pop(0)
                if views and sent:
                    views[0] = views[0][sent:]

    def recv(self, n: int) -> bytes:
        with self._breaks():
            data = self._sock.recv(n)
        if not data and n:
            self._broken = True  # the other end closed: the session is over
        return data

    @contextlib.contextmanager
    def _breaks(self):
        """A pipe that failed once (the session's `ssh` or its master gone) is never active again,
        whether or not its `ssh` process has exited yet; a timeout leaves it as it was."""
        try:
            yield
        except socket.timeout:
            raise
        except OSError:
            self._broken = True
            raise

    def settimeout(self, seconds: float | None) -> None:
        self._sock.settimeout(seconds)

    def get_name(self) -> str:
        return "ssh"

    def is_active(self) -> bool:
        return not self._broken and self.process.poll() is None

    def stderr(self) -> str:
        """What `ssh` wrote on its standard error so far (its reason when it exits), one line."""
        try:
            self._errors.seek(0)
            text = self._errors.read(4096).decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        return " ".join(line.strip() for line in text.splitlines() if line.strip())

    def close(self) -> str:
        """Close the pipe, then wait for `ssh` to exit (told to, then killed, if it does not); what
        it wrote on its standard error (its reason, when it failed)."""
        with contextlib.suppress(OSError):
            self._sock.close()
        process = self.process
        try:
            process.wait(_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(_EXIT_WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        words = self.stderr()
        with contextlib.suppress(OSError, ValueError):
            self._errors.close()
        return words


_CONTROL_PREFIX = "exitplan-ssh-"
_STALE = re.compile(re.escape(_CONTROL_PREFIX) + r"(\d+)-(\d+)-\w+")
_swept: set[str] = set()  # the directories this process has swept of stale control directories


def _pid_namespace() -> int:
    """The identity of this process's PID namespace (0 where there is none to tell): a pid means
    a process only within one, and containers may share a temporary directory."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _control_directory() -> str | None:
    """A new directory only this user can enter, for the master's control socket, named after this
    process (`exitplan-ssh-<pid namespace>-<pid>-…`); None where its path would be too long for a
    socket (sessions are then connections of their own). The first time, the directories that
    processes since gone left there are removed (`_sweep`)."""
    for parent in (None, "/tmp"):
        _sweep(parent or tempfile.gettempdir())
        try:
            path = tempfile.mkdtemp(prefix=f"{_CONTROL_PREFIX}{_pid_namespace()}-{os.getpid()}-", dir=parent)
        except OSError:
            continue
        # ssh binds "<ControlPath>.<16 random characters>" first; sun_path holds 107 bytes.
        if len(os.fsencode(path)) + len("/m4294967295") + 17 < 107:
            return path
        os.rmdir(path)
    return None


def _sweep(parent: str) -> None:
    """Remove, once per process, the control directories in `parent` that this user's processes
    left when they were killed (no interpreter exit to remove them): only those of this PID
    namespace whose process, by the number in the name, no longer runs. What a live process holds
    is never touched; a directory whose number is now another process's stays (it goes at a later
    sweep)."""
    if parent in _swept:
        return
    _swept.add(parent)
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    namespace = _pid_namespace()
    for entry in entries:
        match = _STALE.fullmatch(entry.name)
        if match is None or int(match.group(1)) != namespace:
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        if not _running(int(match.group(2))):
            shutil.rmtree(entry.path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or not a number a process has: not ours to judge
    return True


def _sftp_version(pipe: SshPipe) -> None:
    """The SFTP version exchange (SSH_FXP_INIT, version 3; SSH_FXP_VERSION back), nothing more."""
    pipe.send(struct.pack(">IBI", 5, _FXP_INIT, 3))
    header = _read_exactly(pipe, 5)
    length, kind = struct.unpack(">IB", header)
    if kind != _FXP_VERSION or not 5 <= length <= 1 << 16:
        raise ValueError(f"not an SFTP version answer (type {kind}, length {length})")
    _read_exactly(pipe, length - 1)


def _read_exactly(pipe: SshPipe, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = pipe.recv(n - len(data))
        if not chunk:
            raise EOFError("ssh closed the session")
        data += chunk
    return data


@dataclass
class _Master:
    """A master connection: the pipe of its own (unused) session, its control socket, and the
    sessions started over it."""

    pipe: SshPipe
    control: str
    sessions: list[SshPipe] = field(default_factory=list)


class SshSessionFailed(Exception):
    """`ssh` ended before its SFTP session opened; `words` is what it said (its reason)."""

    def __init__(self, words: str):
        super().__init__(words)
        self.words = words


class OpenSshLauncher:
    """Starts `ssh` processes to one server for one user, each carrying one SFTP session (module
    docstring: what it is given). `host_keys`: the keys the server may present (one or more), each
    pinned (a known_hosts pin's) or checked against its pin (the one paramiko saw).

    The sessions share SSH connections, up to `SESSIONS_PER_MASTER` each: an `ssh` logs in as the
    master of a control socket (`ControlMaster`), the sessions are multiplexed over it, each an
    `ssh` process that hands its pipe to the master and waits (no key exchange, no login: ~7 ms
    instead of ~200, one sshd process on the server instead of one per session). The control
    sockets sit in a directory of their own, mode 0700, removed at `close`; who can open one could
    open sessions as this user, which anyone who can read this process's memory files (the same
    user, root) can already."""

    def __init__(self, ssh: str, host: str, port: int, username: str, host_keys: Sequence, private_key: bytes,
                 certificate: str | None, connect_timeout: float):
        self._fds: list[int] = []
        self._lock = threading.Lock()
        self._masters: list[_Master] = []
        self._control_dir: str | None = None
        if not host_keys:
            raise ValueError("ssh is given the host keys to expect: at least one")
        try:
            name = host if port == 22 else f"[{host}]:{port}"
            known = "".join(f"{name} {key.get_name()} {key.get_base64()}\n" for key in host_keys).encode("ascii")
            algorithms = ",".join(dict.fromkeys(_HOST_KEY_ALGORITHMS.get(key.get_name(), key.get_name())
                                                for key in host_keys))
            files = {"IdentityFile": _memory_file("exitplan-ssh-key", private_key),
                     "UserKnownHostsFile": _memory_file("exitplan-known-hosts", known)}
            if certificate is not None:
                files["CertificateFile"] = _memory_file("exitplan-ssh-cert", certificate.strip().encode("ascii") + b"\n")
            self._fds = list(files.values())
        except BaseException:
            self.close()
            raise
        pid = os.getpid()
        options = {
            **{option: f"/proc/{pid}/fd/{fd}" for option, fd in files.items()},
            "BatchMode": "yes", "IdentitiesOnly": "yes", "IdentityAgent": "none", "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no", "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes", "HostKeyAlgorithms": algorithms,
            "CheckHostIP": "no", "UpdateHostKeys": "no", "ForwardAgent": "no", "ForwardX11": "no",
            "ClearAllForwardings": "yes", "PermitLocalCommand": "no", "Compression": "no",
            "ConnectTimeout": str(max(1, round(connect_timeout))), "ServerAliveInterval": "30",
            "ServerAliveCountMax": "4", "LogLevel": "ERROR",
            # AES-GCM first: one pass with AES-NI, no separate MAC (as the paramiko sessions ask).
            "Ciphers": "^aes128-gcm@openssh.com,aes256-gcm@openssh.com",
        }
        self.argv = [ssh, "-F", "/dev/null", "-T", "-x", "-a",
                     *(arg for option, value in options.items() for arg in ("-o", f"{option}={value}")),
                     "-p", str(port), "-l", username, "-s", "--", host, "sftp"]
        # What ssh inherits of the environment: where programs are, nothing else (no agent socket,
        # no askpass program, no display, none of the credentials exitplan's own environment holds).
        self._env = {"PATH": os.environ.get("PATH", os.defpath)}
        # How long a session may take to answer its SFTP version (the login, for a master).
        self._login_timeout = max(30.0, 3 * connect_timeout)
        self._serial = 0
        self._control_dir = _control_directory()
        if self._control_dir is not None:
            # Removed by `close`, or when the launcher is collected or the interpreter exits without it.
            self._remove_control_dir = weakref.finalize(self, shutil.rmtree, self._control_dir, True)

    def start(self) -> SshPipe:
        """One SFTP session: an `ssh` process multiplexed over a master connection with room for
        it (one is started when none has: the first, or one more every `SESSIONS_PER_MASTER`
        sessions, or again when one ended), the pipe to it. The SFTP version exchange is the
        caller's (paramiko's `SFTPClient`); where no control socket can be made, each session is a
        connection of its own."""
        if self._control_dir is None:
            return self._spawn(self.argv)
        with self._lock:
            master = self._master_with_room()
            pipe = self._spawn(self._with("ControlMaster=no", f"ControlPath={master.control}"))
            master.sessions.append(pipe)
        return pipe

    def _with(self, *options: str) -> list[str]:
        at = self.argv.index("-p")
        return [*self.argv[:at], *(arg for option in options for arg in ("-o", option)), *self.argv[at:]]

    def _master_with_room(self) -> "_Master":
        """(Under the lock.) A live master carrying fewer than `SESSIONS_PER_MASTER` live sessions;
        masters that ended are closed and forgotten."""
        for master in list(self._masters):
            if not master.pipe.is_active():
                self._masters.remove(master)
                master.pipe.close()
                continue
            master.sessions = [p for p in master.sessions if p.is_active()]
            if len(master.sessions) < SESSIONS_PER_MASTER:
                return master
        master = self._start_master()
        self._masters.append(master)
        return master

    def _start_master(self) -> "_Master":
        """A connection sessions go over: an `ssh` logged in, listening on a control socket of its
        own, carrying one SFTP session that no one uses; closing that session ends the master and
        every session over it (`ControlPersist=no`), so a master never outlives this process,
        however it ends."""
        self._serial += 1
        control = os.path.join(self._control_dir, f"m{self._serial}")  # a fresh name: none stale
        pipe = self._spawn(self._with("ControlMaster=yes", f"ControlPath={control}", "ControlPersist=no"))
        try:
            _sftp_version(pipe)
        except (OSError, EOFError, ValueError) as exc:
            raise SshSessionFailed(pipe.close() or str(exc)) from None
        return _Master(pipe, control)

    def _spawn(self, argv: list[str]) -> SshPipe:
        ours, theirs = socket.socketpair()
        errors = tempfile.TemporaryFile()
        try:
            process = subprocess.Popen(argv, stdin=theirs, stdout=theirs, stderr=errors, env=self._env,
                                       close_fds=True, start_new_session=True)
        except OSError as exc:
            ours.close()
            errors.close()
            raise OpenSshUnavailable(f"ssh cannot be started ({exc})") from None
        finally:
            theirs.close()
        ours.settimeout(self._login_timeout)
        return SshPipe(ours, process, errors)

    def close(self) -> None:
        """End the master connections (the sessions over them are the store's to close first),
        remove their control sockets, close the memory files."""
        with self._lock:
            masters, self._masters = self._masters, []
        for master in masters:
            master.pipe.close()
        if self._control_dir is not None:
            self._remove_control_dir()
            self._control_dir = None
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
