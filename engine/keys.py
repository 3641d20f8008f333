"""The project's keys: the wrapped Tink keyset (the data keys) and the audit-signing key.

On disk, beside each other (default: the state directory, `.exitplan/` beside the config):

- `keyset.json`: Tink's standard **encrypted keyset JSON**
  (`tink.json_proto_keyset_format.serialize_encrypted`), wrapped by the KEK with associated data
  `b"exitplan-keyset|" + project`. Any Tink with the KEK can open it; exitplan is not needed.
- `keyset.meta.json`: nothing secret: the project, the KEK reference the keyset is wrapped with
  (backend, key location, *names* of credential variables), and when each data key was created.
  `exitplan keys rewrap` reads the old KEK from here.
- `audit-key.json`: the Ed25519 audit-signing key: its raw private key wrapped by the same KEK
  (associated data `b"exitplan-audit-key|" + project`) and its public key in PEM.

Key material is write-once. Beside them, `keysets/<sha256>.json` and `audit-keys/<sha256>.json`
keep every version of `keyset.json` and `audit-key.json` ever written here, each named by the
SHA-256 (hex) of its bytes and never replaced: `rotate`, `rewrap` and `import` replace the current
file only after both its old and its new bytes are kept there, so a rotation interrupted or
regretted, or a rewrap under the wrong KEK, never loses a key. The copies next to the data are
`engine.key_copies`.

Rules kept here: nothing unwrapped ever touches the disk (keys are unwrapped in memory only);
every write is a temp file + fsync + rename (a kept version: + link, which never replaces), mode
0600; an existing keyset is never overwritten by `init`, nor created when a destination already
holds the project's keyset copies; a KEK that is wrong or unreachable raises a `KekError` (exit
code 4) before anything else happens. The project name is part of the associated data: renaming
`project` means the keyset no longer opens (by design: a keyset cannot be swapped between
projects).

The pipeline gets its data keys with one call: `load_data_keys(loaded) -> DataKeys`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import tink
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import TypeAdapter, ValidationError
from tink import json_proto_keyset_format, proto_keyset_format, secret_key_access, streaming_aead
from tink.proto import tink_pb2

from config.errors import ConfigFileError, ExitCode, UserError
from config.models import KekConfig, KeysConfig, LoadedConfig, LocalKekConfig, OpenBaoKekConfig
from config.policy import check_kek
from connectors.kms import KekError, KekWrongKey, kek_reference, open_kek
from engine.crypto.datakeys import DataKeys, KeysetError, data_keys, new_keyset
from engine.private_files import private_directory
from engine.state import writing_file

META_FORMAT = "exitplan-keyset-meta/1"
AUDIT_FORMAT = "exitplan-audit-key/1"
_KEY_FILE = "the key file"  # for the sentence of a key file that cannot be written


class KeyStoreError(UserError):
    """The keyset or audit key is missing, unreadable or not what it should be (exit code 4)."""

    exit_code = ExitCode.KEY_ERROR


# ---------------------------------------------------------------------------------------------
# Where things are, and what the associated data is
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyFiles:
    """The project's key files, and the directories that keep every version of the wrapped ones."""

    keyset: Path
    meta: Path
    audit: Path
    keyset_versions: Path  # every keyset.json ever written here, as <sha256>.json
    audit_versions: Path  # every audit-key.json ever written here, as <sha256>.json

    @classmethod
    def of(cls, loaded: LoadedConfig) -> "KeyFiles":
        keyset = loaded.keyset_path
        stem = keyset.name[: -len(".json")] if keyset.name.endswith(".json") else keyset.name
        return cls(keyset, keyset.with_name(f"{stem}.meta.json"), keyset.with_name("audit-key.json"),
                   keyset.with_name("keysets"), keyset.with_name("audit-keys"))


# What a state directory holds of the project's keys, by name (with the lab's `local` KEK file at
# its default place): what must never be deleted with the rest of a state directory.
KEY_FILE_NAMES = frozenset({"keyset.json", "keyset.meta.json", "audit-key.json", "keysets", "audit-keys", "kek.key"})


def keyset_associated_data(project: str) -> bytes:
    return b"exitplan-keyset|" + project.encode("utf-8")


def audit_associated_data(project: str) -> bytes:
    return b"exitplan-audit-key|" + project.encode("utf-8")


def keyset_object_key(project: str) -> str:
    """The latest copy of the wrapped keyset next to the data, in every destination bucket (each
    version is also kept under its hash: `engine.key_copies`)."""
    return f"_exitplan/{project}/keyset.json"


def _keys_config(loaded: LoadedConfig) -> KeysConfig:
    keys = loaded.config.keys
    if keys is None:
        raise ConfigFileError(
            f"{loaded.path}: field `keys`: is required for encryption keys; add a `keys:` section with the "
            "key-encryption key (`kek:` with `backend: openbao|pkcs11|ovhcloud-kms|scaleway-kms`, or `local` in the lab)"
        )
    return keys


def resolve_kek(loaded: LoadedConfig, kek: KekConfig | None = None) -> KekConfig:
    """`kek` (default: the config's) with the local key file's default path filled in."""
    kek = kek or _keys_config(loaded).kek
    if isinstance(kek, LocalKekConfig) and kek.path is None:
        # Relative to the config file's directory, like every path in the config.
        kek = kek.model_copy(update={"path": str(Path(loaded.config.state.path) / "kek.key")})
    return kek


def _create_local_key(loaded: LoadedConfig, kek: KekConfig) -> None:
    """In the lab, a `local` KEK file that does not exist yet is created (0600). `check_kek` has
    already refused a local KEK outside the lab."""
    if isinstance(kek, LocalKekConfig) and kek.path:
        from connectors.kms.local import create_key_file

        path = Path(kek.path).expanduser()
        path = path if path.is_absolute() else loaded.path.parent / path
        with writing_file(path, "the local KEK file"):
            create_key_file(path)


def open_project_kek(loaded: LoadedConfig, kek: KekConfig | None = None):
    """The policy check (`check_kek`, exit 3), then the KEK backend (errors: exit 4)."""
    check_kek(loaded)
    return open_kek(resolve_kek(loaded, kek), base_dir=loaded.path.parent)


# ---------------------------------------------------------------------------------------------
# Atomic, private writes
# ---------------------------------------------------------------------------------------------


def _private_temp_file(directory: Path, name: str, data: bytes) -> str:
    """A temp file in `directory` holding `data`, mode 0600, on disk (fsync); the caller renames
    or links it into place. A full disk or a read-only directory is a `StateUnwritable`."""
    with writing_file(directory / name, _KEY_FILE):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
    return tmp


def _fsync_directory(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # directories cannot be fsynced everywhere; the rename or link itself is atomic


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same directory, fsync, rename), 0600."""
    with writing_file(path, _KEY_FILE):
        private_directory(path.parent)
        tmp = _private_temp_file(path.parent, path.name, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    _fsync_directory(path.parent)


def version_name(data: bytes) -> str:
    """The name a version of a wrapped key file is kept under: the SHA-256 (hex) of its bytes."""
    return f"{hashlib.sha256(data).hexdigest()}.json"


def keep_version(directory: Path, data: bytes) -> Path:
    """Keep `data` as `directory/<sha256>.json` (0600, directory 0700), written once: a version
    already there is left as it is (its name says it holds the same bytes; if it does not, it was
    altered and this refuses). The file is complete before its name appears (temp file, fsync,
    then a hard link, which unlike a rename never replaces an existing name)."""
    path = directory / version_name(data)
    if not path.exists():
        private_directory(directory)
        tmp = _private_temp_file(directory, path.name, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # written meanwhile by another process: checked below like any existing version
        finally:
            os.unlink(tmp)
        _fsync_directory(directory)
    if path.read_bytes() != data:
        raise KeyStoreError(f"{path} does not hold the bytes its name is the SHA-256 of: the kept version was altered; "
                            "restore it from a backup or from the destination bucket's copy of the same name")
    return path


def _write_keyset(files: KeyFiles, wrapped: bytes) -> None:
    """Make `wrapped` the keyset: the current keyset.json (if any) and the new one are kept in
    `keysets/` first, so replacing the file can never lose a version."""
    _replace_versioned(files.keyset, files.keyset_versions, wrapped)


def _write_audit(files: KeyFiles, document: bytes) -> None:
    """Make `document` the audit key file, keeping the current and the new one in `audit-keys/` first."""
    _replace_versioned(files.audit, files.audit_versions, document)


def _replace_versioned(path: Path, versions: Path, data: bytes) -> None:
    if path.exists():
        keep_version(versions, path.read_bytes())
    keep_version(versions, data)
    _write_private(path, data)


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeyStoreError(f"{what} {path} does not exist; run `exitplan keys init --config …` first") from None
    except (OSError, ValueError) as exc:
        raise KeyStoreError(f"{what} {path} cannot be read ({exc.__class__.__name__}); restore it from a backup or from the copy in the destination bucket") from None
    if not isinstance(data, dict):
        raise KeyStoreError(f"{what} {path} is not a JSON object; restore it from a backup")
    return data


# ---------------------------------------------------------------------------------------------
# Keyset proto helpers (tink-py has no keyset manager)
# ---------------------------------------------------------------------------------------------


def _to_proto(handle: tink.KeysetHandle) -> tink_pb2.Keyset:
    return tink_pb2.Keyset.FromString(proto_keyset_format.serialize(handle, secret_key_access.TOKEN))


def _from_proto(keyset: tink_pb2.Keyset) -> tink.KeysetHandle:
    return proto_keyset_format.parse(keyset.SerializeToString(), secret_key_access.TOKEN)


def _unused_key_id(keyset: tink_pb2.Keyset) -> int:
    taken = {k.key_id for k in keyset.key}
    while True:
        # Positive 31-bit ids: Tink Java reads key ids as signed ints.
        key_id = secrets.randbelow(2**31 - 1) + 1
        if key_id not in taken:
            return key_id


def _wrap_keyset(handle: tink.KeysetHandle, kek, project: str) -> bytes:
    try:
        return json_proto_keyset_format.serialize_encrypted(handle, kek, keyset_associated_data(project)).encode("utf-8")
    except KekError:
        raise
    except tink.TinkError as exc:
        raise KeyStoreError(f"wrapping the keyset with {_describe(kek)} failed ({exc}); check the KEK") from None


def _unwrap_keyset(wrapped: str, kek, project: str, where: Path | str) -> tink.KeysetHandle:
    """`where`: the keyset's path, or a sentence naming a copy."""
    try:
        return json_proto_keyset_format.parse_encrypted(wrapped, kek, keyset_associated_data(project))
    except KekError:
        raise
    except tink.TinkError as exc:
        what = f"keyset {where}" if isinstance(where, Path) else where
        raise KeyStoreError(f"{what} is not a valid Tink encrypted keyset ({exc}); restore it from a backup") from None


def _describe(kek) -> str:
    return kek.describe() if hasattr(kek, "describe") else type(kek).__name__


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    key_id: int
    status: str
    primary: bool
    created: str | None
    type_url: str


@dataclass(frozen=True)
class KeysetReport:
    """What `exitplan keys show` prints; nothing in it is secret."""

    project: str
    keyset_path: Path
    kek: str  # the KEK the keyset is wrapped with (from keyset.meta.json), as a sentence
    kek_reference: dict
    kek_version: int | None  # OpenBao transit key version in the wrapped keyset, when known
    primary_id: int
    keys: tuple[KeyInfo, ...]
    audit_public_key_pem: str | None
    verified: bool = False  # True when the keyset was unwrapped with the configured KEK
    notes: tuple[str, ...] = field(default_factory=tuple)
    versions_dir: Path | None = None  # where every version of the wrapped keyset is kept
    versions_kept: int = 0


# ---------------------------------------------------------------------------------------------
# init / load / rotate / rewrap / show
# ---------------------------------------------------------------------------------------------


def init_keys(loaded: LoadedConfig, existing_copies: Callable[[LoadedConfig], list[str]]) -> KeysetReport:
    """Create the project's keyset (one AES256_GCM_HKDF_1MB key) and audit key, wrapped by the KEK.

    Refuses (exit code 2) when a keyset already exists: data written with it would become
    unreadable; and when `existing_copies` refuses, i.e. a destination of the configuration already
    holds keyset copies of the project (`engine.key_copies.init_keys` passes
    `refuse_existing_copies`: the project's keyset exists, `exitplan keys import` brings it here).
    The notes it returns (destinations that could not be read) end up in the report's; `migrate`
    checks those again before it writes. With the `local` backend (lab), creates the key file when
    it does not exist.
    """
    files = KeyFiles.of(loaded)
    project = loaded.config.project
    if files.keyset.exists():
        raise UserError(
            f"a keyset already exists at {files.keyset} for project `{project}`; it is never overwritten (objects "
            "written with it would become unreadable). `exitplan keys rotate` adds a data key, `exitplan keys rewrap` "
            "changes the KEK",
            ExitCode.USAGE,
        )
    check_kek(loaded)
    unchecked = existing_copies(loaded)
    kek_cfg = resolve_kek(loaded)
    _create_local_key(loaded, kek_cfg)
    kek = open_kek(kek_cfg, base_dir=loaded.path.parent)

    handle = new_keyset()
    wrapped = _wrap_keyset(handle, kek, project)
    signing = Ed25519PrivateKey.generate()
    audit_doc = _audit_document(signing, kek, kek_cfg, project)
    created = _now()
    meta = {
        "format": META_FORMAT,
        "project": project,
        "kek": kek_reference(kek_cfg),
        "kek_description": kek.describe(),
        "keys": {str(k.key_id): {"created": created} for k in _to_proto(handle).key},
        "updated": created,
    }
    # The keyset is written last: its presence means init completed.
    _write_audit(files, _json_bytes(audit_doc))
    _write_private(files.meta, _json_bytes(meta))
    _write_keyset(files, wrapped)
    report = show_keys(loaded)
    return replace(report, notes=report.notes + tuple(unchecked))


def load_keyset(loaded: LoadedConfig, kek=None) -> tink.KeysetHandle:
    """The project's keyset, unwrapped in memory with the configured KEK (or `kek`)."""
    files = KeyFiles.of(loaded)
    if not files.keyset.exists():
        raise KeyStoreError(
            f"project `{loaded.config.project}` has no keyset at {files.keyset}; run `exitplan keys init --config "
            f"{loaded.path}` (or restore keyset.json from a backup or from the destination bucket's "
            f"{keyset_object_key(loaded.config.project)})"
        )
    kek = kek or open_project_kek(loaded)
    try:
        wrapped = files.keyset.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyStoreError(f"keyset {files.keyset} cannot be read ({exc.strerror}); check its permissions") from None
    return _unwrap_keyset(wrapped, kek, loaded.config.project, files.keyset)


def load_data_keys(loaded: LoadedConfig) -> DataKeys:
    """The data keys the pipeline encrypts (primary) and decrypts (every enabled key) with.

    One call, before any byte moves: a missing keyset, a wrong or unreachable KEK raises a
    `UserError` with exit code 4 (or 3 for a KEK the policy refuses).
    """
    try:
        return data_keys(load_keyset(loaded))
    except KeysetError as exc:
        raise KeyStoreError(f"keyset {KeyFiles.of(loaded).keyset}: {exc}") from None


def rotate_keys(loaded: LoadedConfig) -> KeysetReport:
    """Add a new AES256_GCM_HKDF_1MB data key and make it primary; older keys stay enabled for
    decryption. Objects already written are not touched (each records its key id)."""
    files = KeyFiles.of(loaded)
    kek = open_project_kek(loaded)
    keyset = _to_proto(load_keyset(loaded, kek))
    template = streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB
    fresh = _to_proto(tink.new_keyset_handle(template)).key[0]
    fresh.key_id = _unused_key_id(keyset)
    fresh.status = tink_pb2.ENABLED
    keyset.key.append(fresh)
    keyset.primary_key_id = fresh.key_id
    handle = _from_proto(keyset)
    data_keys(handle)  # the new keyset must still be one the pipeline can use
    wrapped = _wrap_keyset(handle, kek, loaded.config.project)
    meta = _read_meta(files, loaded)
    meta.setdefault("keys", {})[str(fresh.key_id)] = {"created": _now()}
    meta["updated"] = _now()
    _write_keyset(files, wrapped)
    _write_private(files.meta, _json_bytes(meta))
    return show_keys(loaded)


def rewrap_keys(loaded: LoadedConfig, old_kek: KekConfig | None = None) -> KeysetReport:
    """Wrap the same keyset (and audit key) under the KEK now in the config; no object is touched.

    The old KEK is `old_kek` if given (e.g. from `--old-config`), else the reference recorded in
    `keyset.meta.json`. When old and new are the same OpenBao transit key, the wrapped keyset is
    re-encrypted under the key's latest version inside OpenBao (transit/rewrap): the keyset is not
    even unwrapped here. Otherwise it is unwrapped in memory with the old KEK and wrapped with the
    new one. Safe to re-run after an interruption: a file already under the new KEK is left as is.
    """
    files = KeyFiles.of(loaded)
    project = loaded.config.project
    meta = _read_meta(files, loaded)
    if old_kek is None:
        try:
            old_kek = TypeAdapter(KekConfig).validate_python(meta.get("kek"))
        except ValidationError:
            raise KeyStoreError(
                f"{files.meta} does not record a usable KEK reference; pass the old KEK's config with --old-config"
            ) from None
    new_cfg = resolve_kek(loaded)
    old_cfg = resolve_kek(loaded, old_kek)
    check_kek(loaded)
    _create_local_key(loaded, new_cfg)
    new = open_kek(new_cfg, base_dir=loaded.path.parent)
    same_transit_key = (
        isinstance(new_cfg, OpenBaoKekConfig) and kek_reference(new_cfg) == kek_reference(old_cfg)
    )
    if same_transit_key:
        _write_keyset(files, _transit_rewrapped(files.keyset, new))
        if files.audit.exists():
            doc = _read_json(files.audit, "audit key")
            doc["wrapped_private_key"] = base64.b64encode(new.rewrap(base64.b64decode(doc["wrapped_private_key"]))).decode()
            _write_audit(files, _json_bytes(doc))
    else:
        old = open_kek(old_cfg, base_dir=loaded.path.parent)
        wrapped = files.keyset.read_text(encoding="utf-8")
        try:
            handle = _unwrap_keyset(wrapped, old, project, files.keyset)
        except KekWrongKey:
            handle = _unwrap_keyset(wrapped, new, project, files.keyset)  # already rewrapped by an earlier run
        _write_keyset(files, _wrap_keyset(handle, new, project))
        if files.audit.exists():
            signing = _unwrap_audit_key(files.audit, (old, new), project)
            _write_audit(files, _json_bytes(_audit_document(signing, new, new_cfg, project)))
    meta["kek"] = kek_reference(new_cfg)
    meta["kek_description"] = new.describe()
    meta["updated"] = _now()
    _write_private(files.meta, _json_bytes(meta))
    return show_keys(loaded, verify_with=new)


def rotate_kek(loaded: LoadedConfig) -> KeysetReport:
    """Add a version to the KEK itself and rewrap under it (OpenBao transit only).

    Other backends have no key versions we can add: create a new key in the KMS/HSM, point
    `keys.kek` at it and run `exitplan keys rewrap`.
    """
    kek_cfg = resolve_kek(loaded)
    if not isinstance(kek_cfg, OpenBaoKekConfig):
        raise UserError(
            f"backend `{kek_cfg.backend}` has no key versions exitplan can add; create a new key in the KMS/HSM, "
            "point `keys.kek` at it and run `exitplan keys rewrap --config …`",
            ExitCode.USAGE,
        )
    kek = open_project_kek(loaded)
    load_keyset(loaded, kek)  # the keyset must open before the KEK changes
    kek.rotate()
    return rewrap_keys(loaded, kek_cfg)


def show_keys(loaded: LoadedConfig, *, verify: bool = False, verify_with=None) -> KeysetReport:
    """Ids, status, primary, creation time and the KEK reference; never key material.

    Reads the keyset's public `keysetInfo` only; with `verify`, also unwraps it in memory with
    the configured KEK (exit code 4 if that fails).
    """
    files = KeyFiles.of(loaded)
    doc = _read_json(files.keyset, "keyset")
    meta = _read_meta(files, loaded, required=False)
    info = keyset_info(doc, f"keyset {files.keyset}")
    created = {str(k): v.get("created") for k, v in (meta.get("keys") or {}).items() if isinstance(v, dict)}
    keys = tuple(replace(k, created=created.get(str(k.key_id))) for k in info.keys)
    version = None
    try:
        from connectors.kms.openbao import ciphertext_version

        version = ciphertext_version(base64.b64decode(doc.get("encryptedKeyset", "")))
    except (ValueError, TypeError):
        pass
    verified = False
    if verify or verify_with is not None:
        data_keys(load_keyset(loaded, verify_with))
        verified = True
    audit_pem = None
    if files.audit.exists():
        audit_pem = _read_json(files.audit, "audit key").get("public_key_pem")
    notes = []
    configured = kek_reference(resolve_kek(loaded)) if loaded.config.keys else None
    if meta.get("kek") and configured and meta["kek"] != configured:
        notes.append("the KEK in the config differs from the one the keyset is wrapped with: run `exitplan keys rewrap`")
    return KeysetReport(
        project=loaded.config.project,
        keyset_path=files.keyset,
        kek=str(meta.get("kek_description") or "unknown (no keyset.meta.json)"),
        kek_reference=meta.get("kek") or {},
        kek_version=version,
        primary_id=info.primary_id,
        keys=keys,
        audit_public_key_pem=audit_pem,
        verified=verified,
        notes=tuple(notes),
        versions_dir=files.keyset_versions,
        versions_kept=len(list(files.keyset_versions.glob("*.json"))) if files.keyset_versions.is_dir() else 0,
    )


# ---------------------------------------------------------------------------------------------
# What a wrapped keyset says in clear: its key ids
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublicKeysetInfo:
    """Tink's `keysetInfo` of a wrapped keyset: ids, status, primary; readable without the KEK.

    Not authenticated by the wrap: whoever can write the file can change it. Decisions that must
    not be fooled compare it with the unwrapped keyset (`check_info_matches`)."""

    primary_id: int
    keys: tuple[KeyInfo, ...]

    @property
    def key_ids(self) -> frozenset[int]:
        return frozenset(k.key_id for k in self.keys)


_STATUS = {"ENABLED": "enabled", "DISABLED": "disabled", "DESTROYED": "destroyed"}


def keyset_info(doc: object, what: str) -> PublicKeysetInfo:
    """The public `keysetInfo` of a Tink encrypted keyset JSON document; `what` names it in errors."""
    info = doc.get("keysetInfo") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or not isinstance(doc.get("encryptedKeyset"), str) or not isinstance(info, dict):
        raise KeyStoreError(f"{what} is not a Tink encrypted keyset (it needs `encryptedKeyset` and `keysetInfo`); "
                            "restore it from a backup")
    try:
        primary = int(info.get("primaryKeyId", 0))
        keys = tuple(
            KeyInfo(key_id=int(k["keyId"]), status=_STATUS.get(k.get("status"), str(k.get("status"))),
                    primary=int(k["keyId"]) == primary, created=None, type_url=str(k.get("typeUrl", "")))
            for k in info.get("keyInfo", [])
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise KeyStoreError(f"{what}: its `keysetInfo` does not list key ids; restore it from a backup") from None
    if not keys:
        raise KeyStoreError(f"{what}: its `keysetInfo` lists no key; restore it from a backup")
    return PublicKeysetInfo(primary, keys)


def read_keyset_info(data: bytes, what: str) -> PublicKeysetInfo:
    """`keyset_info` of the bytes of a wrapped keyset file or copy."""
    try:
        doc = json.loads(data)
    except ValueError:
        raise KeyStoreError(f"{what} is not JSON, so not a Tink encrypted keyset; restore it from a backup") from None
    return keyset_info(doc, what)


def local_keyset_info(loaded: LoadedConfig) -> PublicKeysetInfo | None:
    """The public info of the state directory's keyset; None when there is none."""
    files = KeyFiles.of(loaded)
    if not files.keyset.exists():
        return None
    return keyset_info(_read_json(files.keyset, "keyset"), f"keyset {files.keyset}")


def check_info_matches(handle: tink.KeysetHandle, info: PublicKeysetInfo, what: str) -> None:
    """Refuse a wrapped keyset whose clear `keysetInfo` does not name the keys it actually holds."""
    proto = _to_proto(handle)
    if {k.key_id for k in proto.key} != set(info.key_ids) or proto.primary_key_id != info.primary_id:
        raise KeyStoreError(f"{what}: its `keysetInfo` does not describe the keys it holds (it was altered); "
                            "do not use it, import another copy")


# ---------------------------------------------------------------------------------------------
# Bringing a keyset in (`exitplan keys import`, `engine.key_copies`): the local side
# ---------------------------------------------------------------------------------------------


def unwrap_copy(data: bytes, kek, project: str, what: str) -> tink.KeysetHandle:
    """A wrapped keyset from elsewhere (a copy next to the data), unwrapped in memory with `kek`;
    `KekWrongKey` when `kek` is not the key it is wrapped with."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyStoreError(f"{what} is not UTF-8 JSON, so not a Tink encrypted keyset") from None
    return _unwrap_keyset(text, kek, project, what)


def merge_keysets(base: tink.KeysetHandle, others: list[tink.KeysetHandle]) -> tink.KeysetHandle:
    """`base` with every key of `others` it lacks added (status as in the keyset it came from);
    the primary stays `base`'s. Two keys with one id but different material cannot be merged."""
    merged = _to_proto(base)
    held = {k.key_id: k for k in merged.key}
    for other in others:
        for key in _to_proto(other).key:
            if key.key_id not in held:
                merged.key.append(key)
                held[key.key_id] = key
            elif held[key.key_id].key_data != key.key_data:
                raise KeyStoreError(f"two keysets hold different data keys under the same id {key.key_id}; they cannot "
                                    "be merged: keep both wrapped files and report this")
    handle = _from_proto(merged)
    data_keys(handle)
    return handle


def install_keyset(loaded: LoadedConfig, kek, *, wrapped: bytes | None = None,
                   handle: tink.KeysetHandle | None = None, origin: str) -> KeysetReport:
    """Make a keyset brought from elsewhere the state directory's keyset: `wrapped` as is (it
    opens with `kek`), or `handle` wrapped anew with `kek` (a merge: a new version).

    Refuses (exit code 2) when the local keyset holds a key id the new one lacks: that key would
    only survive in `keysets/`. Every version stays in `keysets/`; `keyset.meta.json` records the
    configured KEK and, for each key new here, where it came from. When the state directory has no
    audit key, a new one is created (the audit key is not copied next to the data): a note says so.
    """
    files = KeyFiles.of(loaded)
    project = loaded.config.project
    if handle is None:
        handle = unwrap_copy(wrapped, kek, project, origin)
    else:
        wrapped = _wrap_keyset(handle, kek, project)
    ids = {k.key_id for k in _to_proto(handle).key}
    local = local_keyset_info(loaded)
    lacking = sorted(local.key_ids - ids) if local else []
    if lacking:
        raise UserError(
            f"the keyset in {files.keyset} holds data key(s) {id_phrase(lacking)} that {origin} lacks; it is not "
            f"replaced. If objects were written with them, run `exitplan keys import --merge --config {loaded.path}` "
            "to keep them with the imported keys",
            ExitCode.USAGE,
        )
    data_keys(handle)  # a keyset the pipeline can use, before anything is written
    kek_cfg = resolve_kek(loaded)
    notes = []
    if not files.audit.exists():
        signing = Ed25519PrivateKey.generate()
        _write_audit(files, _json_bytes(_audit_document(signing, kek, kek_cfg, project)))
        notes.append(f"created a new audit-signing key for this state directory ({files.audit}): the audit key is not "
                     "copied next to the data; if you have a backup of the project's audit-key.json, put it there "
                     "instead before the next run")
    meta = _read_meta(files, loaded, required=False) or {"format": META_FORMAT, "project": project, "keys": {}}
    now = _now()
    for key_id in sorted(ids):
        meta.setdefault("keys", {}).setdefault(str(key_id), {"imported": now, "from": origin})
    meta.update({"kek": kek_reference(kek_cfg), "kek_description": kek.describe(), "updated": now})
    _write_private(files.meta, _json_bytes(meta))
    _write_keyset(files, wrapped)
    report = show_keys(loaded, verify_with=kek)
    return replace(report, notes=report.notes + tuple(notes))


def id_phrase(ids) -> str:
    """Key ids for a sentence: `1, 2 and 3`."""
    ids = [str(i) for i in sorted(ids)]
    return ids[0] if len(ids) == 1 else f"{', '.join(ids[:-1])} and {ids[-1]}"


# ---------------------------------------------------------------------------------------------
# The audit-signing key
# ---------------------------------------------------------------------------------------------


def _audit_document(signing: Ed25519PrivateKey, kek, kek_cfg: KekConfig, project: str) -> dict:
    raw = signing.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    wrapped = kek.encrypt(raw, audit_associated_data(project))
    pem = signing.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {
        "format": AUDIT_FORMAT,
        "project": project,
        "algorithm": "Ed25519",
        "kek": kek_reference(kek_cfg),
        "wrapped_private_key": base64.b64encode(wrapped).decode("ascii"),
        "public_key_pem": pem.decode("ascii"),
    }


def _unwrap_audit_key(path: Path, keks, project: str) -> Ed25519PrivateKey:
    doc = _read_json(path, "audit key")
    try:
        wrapped = base64.b64decode(doc["wrapped_private_key"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise KeyStoreError(f"audit key {path} has no wrapped private key; restore it from a backup") from None
    last: KekError | None = None
    for kek in keks:
        try:
            raw = kek.decrypt(wrapped, audit_associated_data(project))
            break
        except KekWrongKey as exc:
            last = exc
    else:
        raise last  # type: ignore[misc]
    key = Ed25519PrivateKey.from_private_bytes(raw)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    if pem != doc.get("public_key_pem"):
        raise KeyStoreError(f"audit key {path}: the public key does not match the wrapped private key; restore it from a backup")
    return key


def load_audit_signing_key(loaded: LoadedConfig) -> Ed25519PrivateKey:
    """The project's Ed25519 audit-signing key, unwrapped in memory with the configured KEK."""
    return _unwrap_audit_key(KeyFiles.of(loaded).audit, (open_project_kek(loaded),), loaded.config.project)


def audit_public_key_pem(loaded: LoadedConfig) -> str:
    """The audit public key (PEM, SubjectPublicKeyInfo); reading it needs no KEK."""
    pem = _read_json(KeyFiles.of(loaded).audit, "audit key").get("public_key_pem")
    if not isinstance(pem, str):
        raise KeyStoreError(f"audit key {KeyFiles.of(loaded).audit} has no public key; restore it from a backup")
    return pem


# ---------------------------------------------------------------------------------------------


def _read_meta(files: KeyFiles, loaded: LoadedConfig, *, required: bool = True) -> dict:
    if not files.meta.exists() and not required:
        return {}
    meta = _read_json(files.meta, "keyset metadata")
    if meta.get("project") not in (None, loaded.config.project):
        raise KeyStoreError(
            f"{files.meta} belongs to project `{meta.get('project')}`, not `{loaded.config.project}`; "
            "check `project` and `keys.keyset_path` in the config"
        )
    return meta


def _json_bytes(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _transit_rewrapped(path: Path, kek) -> bytes:
    """The wrapped keyset at `path` re-encrypted under the transit key's latest version, inside OpenBao."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    wrapped = base64.b64decode(doc["encryptedKeyset"])
    doc["encryptedKeyset"] = base64.b64encode(kek.rewrap(wrapped)).decode("ascii")
    return json.dumps(doc).encode("utf-8")
