"""A private OpenSSH sshd on 127.0.0.1 serving SFTP: the lab's SFTP server and the tests' fixture.

Everything it needs lives in one directory: its configuration, its host key, the user key that may
log in (key only: no password, no keyboard-interactive, no PAM), a known_hosts file pinning the host
key for clients, and `root/`, the tree the lab's SFTP datasets live in. It logs in as the user that
runs it (root included, by key only), allows SFTP only (`ForceCommand internal-sftp`) and forwards
nothing. Debian's `openssh-server` provides /usr/sbin/sshd; it is run by absolute path, as sshd
requires. No chroot: sshd wants root-owned, non-writable parents, which a lab directory under /tmp
or a home directory does not have; the root is a directory the SFTP datasets name.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from flows.lab_processes import LOOPBACK, SSH_PROBE, LabError, ServerSpec

SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True)
class SshdLayout:
    """The files of one private sshd (all under `directory`)."""

    directory: Path
    port: int

    @property
    def config(self) -> Path:
        return self.directory / "sshd_config"

    @property
    def host_key(self) -> Path:
        return self.directory / "ssh_host_ed25519_key"

    @property
    def user_key(self) -> Path:
        """The private key the lab's user logs in with (no passphrase: a lab key, never a real one)."""
        return self.directory / "id_ed25519"

    @property
    def user_ca_key(self) -> Path:
        """The lab's user certificate authority: a key signed by it logs in as a certificate names
        (`ssh-keygen -s user_ca -n <user> -I <id> key.pub`), without being in authorized_keys."""
        return self.directory / "user_ca"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"

    @property
    def root(self) -> Path:
        return self.directory / "root"

    @property
    def username(self) -> str:
        return login_name()


def login_name() -> str:
    """The user the lab's sshd lets in: the one running it."""
    return pwd.getpwuid(os.getuid()).pw_name


def _keygen(path: Path, comment: str) -> None:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        raise LabError("ssh-keygen was not found: install OpenSSH (Debian/Ubuntu: `apt-get install openssh-server`)")
    result = subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise LabError(f"ssh-keygen could not create {path}: {result.stderr.strip()}")


def prepare_sshd(directory: Path, port: int) -> SshdLayout:
    """Create (or keep) the keys, known_hosts, root and configuration of an sshd on `port`."""
    if not Path(SSHD).exists():
        raise LabError(f"{SSHD} was not found: install OpenSSH's server (Debian/Ubuntu: `apt-get install "
                       "openssh-server`)")
    layout = SshdLayout(Path(directory).resolve(), port)
    layout.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    layout.root.mkdir(exist_ok=True)
    if not layout.host_key.exists():
        _keygen(layout.host_key, "exitplan-lab-host")
    if not layout.user_key.exists():
        _keygen(layout.user_key, "exitplan-lab-user")
    if not layout.user_ca_key.exists():
        _keygen(layout.user_ca_key, "exitplan-lab-user-ca")
    authorized = layout.directory / "authorized_keys"
    authorized.write_text(Path(f"{layout.user_key}.pub").read_text())
    host_pub = Path(f"{layout.host_key}.pub").read_text().split()
    layout.known_hosts.write_text(f"[{LOOPBACK}]:{port} {host_pub[0]} {host_pub[1]}\n")
    layout.config.write_text("\n".join([
        f"ListenAddress {LOOPBACK}",
        f"Port {port}",
        f"HostKey {layout.host_key}",
        f"PidFile {layout.directory / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        f"TrustedUserCAKeys {layout.user_ca_key}.pub",
        f"AllowUsers {layout.username}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        # Keys under /tmp or a lab directory are not root-owned with strict parents.
        "StrictModes no",
        "AllowAgentForwarding no",
        "AllowTcpForwarding no",
        "X11Forwarding no",
        "PermitTTY no",
        "PermitTunnel no",
        "Subsystem sftp internal-sftp",
        "ForceCommand internal-sftp",
        "MaxStartups 64:30:128",
        "MaxSessions 64",
        "LogLevel INFO",
        "",
    ]))
    return layout


def sshd_spec(layout: SshdLayout) -> ServerSpec:
    """`sshd -D -e` on the layout's configuration (sshd needs /run/sshd to exist)."""
    try:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # not root: sshd then says what it lacks, in its log
    return ServerSpec("sftp", layout.port, (SSHD, "-D", "-e", "-f", str(layout.config)), SSH_PROBE,
                      ready_timeout=30.0)
