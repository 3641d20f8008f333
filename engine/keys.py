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

Rules kept here: nothing unwrapped ever touches the disk (keys are unwrapped in memory only);
every write is a temp file + fsync + rename, mode 0600; an existing keyset is never overwritten
by `init`; a KEK that is wrong or unreachable raises a `KekError` (exit code 4) before anything
else happens. The project name is part of the associated data: renaming `project` means the
keyset no longer opens (by design: a keyset cannot be swapped between projects).

The pipeline gets its data keys with one call: `load_data_keys(loaded) -> DataKeys`.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field
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

META_FORMAT = "exitplan-keyset-meta/1"
AUDIT_FORMAT = "exitplan-audit-key/1"


class KeyStoreError(UserError):
    """The keyset or audit key is missing, unreadable or not what it should be (exit code 4)."""

    exit_code = ExitCode.KEY_ERROR


# ---------------------------------------------------------------------------------------------
# Where things are, and what the associated data is
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyFiles:
    keyset: Path
    meta: Path
    audit: Path

    @classmethod
    def of(cls, loaded: LoadedConfig) -> "KeyFiles":
        keyset = loaded.keyset_path
        stem = keyset.name[: -len(".json")] if keyset.name.endswith(".json") else keyset.name
        return cls(keyset, keyset.with_name(f"{stem}.meta.json"), keyset.with_name("audit-key.json"))


def keyset_associated_data(project: str) -> bytes:
    return b"exitplan-keyset|" + project.encode("utf-8")


def audit_associated_data(project: str) -> bytes:
    return b"exitplan-audit-key|" + project.encode("utf-8")


def keyset_object_key(project: str) -> str:
    """Where the wrapped keyset is copied next to the data, in every destination bucket."""
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
        create_key_file(path if path.is_absolute() else loaded.path.parent / path)


def open_project_kek(loaded: LoadedConfig, kek: KekConfig | None = None):
    """The policy check (`check_kek`, exit 3), then the KEK backend (errors: exit 4)."""
    check_kek(loaded)
    return open_kek(resolve_kek(loaded, kek), base_dir=loaded.path.parent)


# ---------------------------------------------------------------------------------------------
# Atomic, private writes
# ---------------------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same directory, fsync, rename), 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # directories cannot be fsynced everywhere; the rename itself is atomic


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


def _unwrap_keyset(wrapped: str, kek, project: str, path: Path) -> tink.KeysetHandle:
    try:
        return json_proto_keyset_format.parse_encrypted(wrapped, kek, keyset_associated_data(project))
    except KekError:
        raise
    except tink.TinkError as exc:
        raise KeyStoreError(f"keyset {path} is not a valid Tink encrypted keyset ({exc}); restore it from a backup") from None


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


# ---------------------------------------------------------------------------------------------
# init / load / rotate / rewrap / show
# ---------------------------------------------------------------------------------------------


def init_keys(loaded: LoadedConfig) -> KeysetReport:
    """Create the project's keyset (one AES256_GCM_HKDF_1MB key) and audit key, wrapped by the KEK.

    Refuses (exit code 2) when a keyset already exists: data written with it would become
    unreadable. With the `local` backend (lab), creates the key file when it does not exist.
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
    _write_private(files.audit, _json_bytes(audit_doc))
    _write_private(files.meta, _json_bytes(meta))
    _write_private(files.keyset, wrapped)
    return show_keys(loaded)


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
    _write_private(files.keyset, wrapped)
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
        _transit_rewrap_file(files.keyset, new)
        if files.audit.exists():
            doc = _read_json(files.audit, "audit key")
            doc["wrapped_private_key"] = base64.b64encode(new.rewrap(base64.b64decode(doc["wrapped_private_key"]))).decode()
            _write_private(files.audit, _json_bytes(doc))
    else:
        old = open_kek(old_cfg, base_dir=loaded.path.parent)
        wrapped = files.keyset.read_text(encoding="utf-8")
        try:
            handle = _unwrap_keyset(wrapped, old, project, files.keyset)
        except KekWrongKey:
            handle = _unwrap_keyset(wrapped, new, project, files.keyset)  # already rewrapped by an earlier run
        _write_private(files.keyset, _wrap_keyset(handle, new, project))
        if files.audit.exists():
            signing = _unwrap_audit_key(files.audit, (old, new), project)
            _write_private(files.audit, _json_bytes(_audit_document(signing, new, new_cfg, project)))
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
    info = doc.get("keysetInfo") or {}
    created = {str(k): v.get("created") for k, v in (meta.get("keys") or {}).items() if isinstance(v, dict)}
    primary = int(info.get("primaryKeyId", 0))
    keys = tuple(
        KeyInfo(
            key_id=int(k.get("keyId", 0)),
            status={"ENABLED": "enabled", "DISABLED": "disabled", "DESTROYED": "destroyed"}.get(k.get("status"), str(k.get("status"))),
            primary=int(k.get("keyId", 0)) == primary,
            created=created.get(str(k.get("keyId"))),
            type_url=str(k.get("typeUrl", "")),
        )
        for k in info.get("keyInfo", [])
    )
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
        primary_id=primary,
        keys=keys,
        audit_public_key_pem=audit_pem,
        verified=verified,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------
# The copy next to the data
# ---------------------------------------------------------------------------------------------


def keyset_copy(loaded: LoadedConfig) -> tuple[str, bytes]:
    """(destination key, bytes) of the wrapped keyset to store next to the data.

    The bytes are the wrapped keyset exactly as on disk (Tink encrypted keyset JSON): useless
    without the KEK, enough with it to read every object back without exitplan.
    """
    files = KeyFiles.of(loaded)
    try:
        data = files.keyset.read_bytes()
    except FileNotFoundError:
        raise KeyStoreError(f"project `{loaded.config.project}` has no keyset at {files.keyset}; run `exitplan keys init` first") from None
    return keyset_object_key(loaded.config.project), data


def publish_keyset(loaded: LoadedConfig, put: Callable[..., object]) -> str:
    """Write the wrapped keyset next to the data with `put(key, data, metadata)` (an `ObjectSink.put`)."""
    key, data = keyset_copy(loaded)
    put(key, data, {"exitplan-format": "tink-encrypted-keyset-json"})
    return key


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


def _transit_rewrap_file(path: Path, kek) -> None:
    """Re-encrypt the wrapped keyset under the transit key's latest version, inside OpenBao."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    wrapped = base64.b64decode(doc["encryptedKeyset"])
    doc["encryptedKeyset"] = base64.b64encode(kek.rewrap(wrapped)).decode("ascii")
    _write_private(path, json.dumps(doc).encode("utf-8"))
