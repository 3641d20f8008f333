"""The wrapped keyset's copies next to the data: append-only, one object per keyset version.

In each destination bucket that receives encrypted objects, under `_exitplan/<project>/`:

- `keysets/<sha256>.json`: every version of the wrapped keyset a run of the project wrote with,
  named by the SHA-256 (hex) of its bytes. Written once, never overwritten, never deleted by
  exitplan. The listing read just before says whether a name is there; two writers of one name
  write the same bytes, so the race between that listing and the PUT is harmless (no conditional
  write is needed, and not every EU provider documents `If-None-Match` on PUT).
- `keyset.json`: the latest version, for people and tools that look for one file
  (docs/FORMAT.md). Replaced only by a version that holds every key id it holds, and only once
  its own bytes are kept under their hash name (a copy written before versions existed is kept
  that way first): overwriting or losing it never loses a key.

Before a run writes any object (`publish_keysets`), and in a dry run (`check_keysets`), every
such destination's copies are read and their key ids compared with the local keyset's: a key id
the local keyset lacks stops the run (exit code 4), naming the destination, the key ids and
`exitplan keys import`. Key ids are public (Tink's `keysetInfo`): the check needs no KEK.
`exitplan keys init` refuses when a destination already holds copies (`refuse_existing_copies`),
and `exitplan keys import` brings the copies' keyset into the state directory (`import_keyset`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, TypeVar

from config.errors import ConfigFileError, ExitCode, UserError
from config.models import LoadedConfig
from connectors.base import ConnectorError, ContentSettings, NotFound, ObjectMeta, WriteMeta
from connectors.kms import KekWrongKey

from .endpoints import DestinationSinks, close_endpoint, open_sink
from .errors import call_endpoint
from . import keys
from .keys import (KeyFiles, KeysetReport, KeyStoreError, PublicKeysetInfo, id_phrase, check_info_matches,
                   install_keyset, keyset_object_key, load_keyset, local_keyset_info, merge_keysets,
                   open_project_kek, read_keyset_info, show_keys, unwrap_copy, version_name)

COPY_FORMAT = "tink-encrypted-keyset-json"  # the `exitplan-format` metadata of every copy
# Attempts per request when `keys init` looks for copies: a destination that does not answer is
# named in a note (`migrate` checks it again), not waited for.
INIT_CHECK_ATTEMPTS = 2

T = TypeVar("T")


def copies_prefix(project: str) -> str:
    """Every keyset copy of `project` has a key starting with this (the versions and the latest)."""
    return f"_exitplan/{project}/keyset"


def versions_prefix(project: str) -> str:
    return f"_exitplan/{project}/keysets/"


def version_object_key(project: str, wrapped: bytes) -> str:
    """Where one version of the wrapped keyset is kept next to the data: named by its SHA-256."""
    return versions_prefix(project) + version_name(wrapped)


def is_copy_key(project: str, key: str) -> bool:
    rest = key[len(versions_prefix(project)):]
    return key == keyset_object_key(project) or (
        key.startswith(versions_prefix(project)) and rest.endswith(".json") and "/" not in rest)


@dataclass(frozen=True)
class KeysetCopy:
    """One keyset copy in a destination bucket."""

    key: str  # its object key
    data: bytes = field(repr=False)  # the wrapped keyset (Tink encrypted keyset JSON)
    info: PublicKeysetInfo
    last_modified: datetime | None = None

    @property
    def is_latest(self) -> bool:
        """The `keyset.json` copy (the others are versions under their hash)."""
        return "/keysets/" not in self.key


@dataclass(frozen=True)
class DestinationKeysets:
    """The keyset copies of a project in one destination."""

    destination: str
    label: str  # the bucket, for messages: "lab:exitplan-lab"
    copies: tuple[KeysetCopy, ...]

    @property
    def key_ids(self) -> frozenset[int]:
        return frozenset().union(*(c.info.key_ids for c in self.copies))

    def where(self, copy: KeysetCopy) -> str:
        return f"{self.label}/{copy.key}"


def read_keysets(sink, project: str, destination: str) -> DestinationKeysets:
    """Every keyset copy of `project` in `sink` (a listing, then a GET of a few KB per copy).

    A version whose bytes do not hash to its name, or a copy that is not a Tink encrypted keyset,
    is a `KeyStoreError` (exit 4): it was altered, and the version its name promises is not there.
    """
    copies = []
    for meta in sink.list(copies_prefix(project)):
        if not is_copy_key(project, meta.key):
            continue
        what = f"destination `{destination}`: keyset copy {sink.label}/{meta.key}"
        data = _read_whole(sink, meta)
        info = read_keyset_info(data, what)
        if meta.key != keyset_object_key(project) and meta.key != version_object_key(project, data):
            raise _altered(what)
        copies.append(KeysetCopy(meta.key, data, info, meta.last_modified))
    return DestinationKeysets(destination, sink.label, tuple(copies))


def _and_others(copies: list[str]) -> str:
    """The first copy named, the others counted."""
    rest = len(copies) - 1
    return copies[0] + (f" and {rest} other cop{'y' if rest == 1 else 'ies'}" if rest else "")


def _read_whole(sink, meta: ObjectMeta) -> bytes:
    return sink.read_range(meta.key, 0, meta.size, if_match=meta.etag) if meta.size else b""


def refuse_unknown_keys(loaded: LoadedConfig, found: DestinationKeysets, local: PublicKeysetInfo) -> None:
    """Refuse (exit 4) when `found` holds a key id the local keyset lacks: this state directory
    could not read what was written with it, and writing with a keyset the destination's copies do
    not know splits the project's keys between state directories."""
    missing = found.key_ids - local.key_ids
    if not missing:
        return
    holders = [found.where(c) for c in found.copies if c.info.key_ids & missing]
    raise KeyStoreError(
        f"destination `{found.destination}` holds keyset copies of project `{loaded.config.project}` with data "
        f"key(s) {id_phrase(missing)} that the keyset in {KeyFiles.of(loaded).keyset} lacks ({_and_others(holders)}); "
        f"nothing was written. Run `exitplan keys import --config {loaded.path}` to bring the project's keys into "
        "this state directory, then run again")


def publish_copy(loaded: LoadedConfig, sink, found: DestinationKeysets, wrapped: bytes) -> str:
    """Write the local keyset `wrapped` next to the data, append-only; returns where its version is.

    `found` is the destination's copies as read before: the version is written when its name is
    not there; `keyset.json` is replaced when it differs, after its own bytes are kept under their
    hash name. Refuses first (`refuse_unknown_keys`) if `wrapped` lacks a key id of `found`.
    """
    project = loaded.config.project
    refuse_unknown_keys(loaded, found, read_keyset_info(wrapped, f"keyset {KeyFiles.of(loaded).keyset}"))
    present = {c.key: c for c in found.copies}
    version = version_object_key(project, wrapped)
    if version not in present:
        _put_once(sink, version, wrapped)
    latest = present.get(keyset_object_key(project))
    if latest is None or latest.data != wrapped:
        if latest is not None and version_object_key(project, latest.data) not in present:
            _put_once(sink, version_object_key(project, latest.data), latest.data)
        _put(sink, keyset_object_key(project), wrapped)
    return f"{sink.label}/{version}"


def _put_once(sink, key: str, data: bytes) -> None:
    """Write the version `key` unless it is there: a HEAD first (the listing read before may lag
    behind a write on some stores). One already there must hold `data` (its name is their hash)."""
    try:
        meta = sink.head(key)
    except NotFound:
        _put(sink, key, data)
        return
    if _read_whole(sink, meta) != data:
        raise _altered(f"keyset copy {sink.label}/{key}")


def _altered(what: str) -> KeyStoreError:
    return KeyStoreError(f"{what} does not hold the keyset version its name says (the SHA-256 of its bytes): it was "
                         "altered. Put back the bytes of that version (the state directory keeps each one in keysets/ "
                         "under the same name) before the next run")


def _put(sink, key: str, data: bytes) -> None:
    meta = WriteMeta(ContentSettings(content_type="application/json"), {"exitplan-format": COPY_FORMAT})
    sink.put(key, data, len(data), meta, hashlib.md5(data).digest())


# ---------------------------------------------------------------------------------------------
# What a run, a dry run, `keys init` and `keys import` call
# ---------------------------------------------------------------------------------------------


def _at(destination: str, what: str, fn: Callable[..., T], *args) -> T:
    """Call `fn`; a connector error becomes the run's error (exit 2 or 1) naming the destination."""
    return call_endpoint(f"destination `{destination}`: {what}", fn, *args)


def _destination(loaded: LoadedConfig, destination: str, sinks: DestinationSinks):
    """(sink, its keyset copies) of `destination`, its sink from `sinks` (`DestinationSinks`)."""
    sink = _at(destination, "opening it", sinks, destination)
    found = _at(destination, f"reading the keyset copies of project `{loaded.config.project}`",
                read_keysets, sink, loaded.config.project, destination)
    return sink, found


def encrypted_destinations(loaded: LoadedConfig, datasets: list[str]) -> list[str]:
    """The destinations that receive encrypted objects of `datasets` (where a copy belongs)."""
    return sorted({loaded.config.datasets[n].destination for n in datasets if not loaded.config.datasets[n].public})


def check_keysets(loaded: LoadedConfig, datasets: list[str]) -> None:
    """What a dry run does: read each destination's copies and refuse (exit 4) as `migrate` would."""
    with DestinationSinks(loaded) as sinks:
        _checked_destinations(loaded, datasets, sinks)


def publish_keysets(loaded: LoadedConfig, datasets: list[str], sinks: DestinationSinks | None = None) -> list[str]:
    """Check every destination that receives encrypted objects of `datasets`, then write the local
    keyset's copy to each (`publish_copy`); returns where each version is. Nothing is written
    anywhere when one destination refuses. Call after the keyset was unwrapped (it exists).
    `sinks`: the run's (`engine.endpoints.DestinationSinks`), else opened here and closed after."""
    if sinks is None:
        with DestinationSinks(loaded) as own:
            return publish_keysets(loaded, datasets, own)
    wrapped, opened = _checked_destinations(loaded, datasets, sinks)
    return [_at(d, "writing the wrapped keyset next to the data", publish_copy, loaded, sink, found, wrapped)
            for d, (sink, found) in opened.items()]


def _checked_destinations(loaded: LoadedConfig, datasets: list[str], sinks: DestinationSinks):
    """(the local wrapped keyset, {destination: (sink, its copies)}) for the destinations of
    `datasets` that receive encrypted objects, once every one of them passed `refuse_unknown_keys`."""
    destinations = encrypted_destinations(loaded, datasets)
    if not destinations:
        return b"", {}
    path = KeyFiles.of(loaded).keyset
    wrapped = path.read_bytes()
    local = read_keyset_info(wrapped, f"keyset {path}")
    opened = {d: _destination(loaded, d, sinks) for d in destinations}
    for _sink, found in opened.values():
        refuse_unknown_keys(loaded, found, local)
    return wrapped, opened


def init_keys(loaded: LoadedConfig) -> KeysetReport:
    """`exitplan keys init`: the project's keyset and audit key (`engine.keys.init_keys`), refused
    when a destination already holds keyset copies of the project (`refuse_existing_copies`)."""
    return keys.init_keys(loaded, refuse_existing_copies)


def refuse_existing_copies(loaded: LoadedConfig) -> list[str]:
    """`keys init`'s check: refuse (exit 2) when a destination of the configuration already holds
    keyset copies of the project. Returns a note for each destination that could not be read."""
    project = loaded.config.project
    unchecked = []
    for destination in sorted(loaded.config.destinations):
        try:
            sink = open_sink(loaded, destination, max_attempts=INIT_CHECK_ATTEMPTS)
            try:
                held = [m.key for m in sink.list(copies_prefix(project)) if is_copy_key(project, m.key)]
            finally:
                close_endpoint(sink, f"destination `{destination}`")
        except (ConnectorError, UserError) as exc:
            unchecked.append(f"destination `{destination}` could not be checked for keyset copies of project "
                             f"`{project}` ({exc}); `exitplan migrate` checks it before it writes")
            continue
        if held:
            raise UserError(
                f"destination `{destination}` already holds the keyset of project `{project}` "
                f"({_and_others([f'{sink.label}/{k}' for k in held])}): a new keyset would not hold the keys its "
                f"objects were written with. Run `exitplan keys import --config {loaded.path}` to use the project's "
                "keyset here (with the KEK it is wrapped with), or give this configuration another `project` name",
                ExitCode.USAGE,
            )
    return unchecked


# ---------------------------------------------------------------------------------------------
# `exitplan keys import`
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportResult:
    """What `import_keyset` did; `report` is the keyset now in the state directory."""

    report: KeysetReport
    origin: str  # the copy imported, or the copies merged, as a phrase
    changed: bool  # False: the local keyset already held every key id of the copies
    copies: int  # distinct keyset versions read
    destinations: tuple[str, ...]


def import_keyset(loaded: LoadedConfig, destinations: list[str] | None = None, *, merge: bool = False) -> ImportResult:
    """Bring the project's keyset from the copies next to the data into the state directory.

    Reads every copy of `destinations` (default: every destination of the configuration). Without
    `merge`, takes a copy holding every key id of all the copies, that the configured KEK opens
    (exit 4 if none does), and refuses (exit 2) when no single copy holds them all. With `merge`,
    builds one keyset holding the keys of every copy and of the local keyset (a new version, wrapped
    with the configured KEK). Never replaces a local keyset holding a key id the result lacks
    (`install_keyset`); nothing changes when the local keyset already holds every key id.
    """
    project = loaded.config.project
    names = destinations or sorted(loaded.config.destinations)
    for name in names:
        if name not in loaded.config.destinations:
            raise ConfigFileError(f"{loaded.path}: no destination named {name!r} (destinations: "
                                  f"{', '.join(loaded.config.destinations)}); check --destination")
    versions: dict[bytes, tuple[KeysetCopy, str]] = {}  # one entry per distinct wrapped keyset
    with DestinationSinks(loaded) as sinks:
        found_at = {name: _destination(loaded, name, sinks)[1] for name in names}
    for name in names:
        found = found_at[name]
        for copy in found.copies:
            # The same bytes as a version and as `keyset.json`: named by the version (it never changes).
            if copy.data not in versions or versions[copy.data][0].is_latest:
                versions[copy.data] = (copy, found.where(copy))
    if not versions:
        raise KeyStoreError(
            f"no keyset copy of project `{project}` in destination(s) {', '.join(f'`{n}`' for n in names)} (under "
            f"{copies_prefix(project)}…): nothing to import. A project that never wrote objects gets its keyset with "
            "`exitplan keys init`")
    # Most key ids first, then the newest: the copy a rotation wrote last comes first.
    ordered = sorted(versions.values(), key=lambda cw: (-len(cw[0].info.key_ids), -_timestamp(cw[0]), cw[0].is_latest))
    every = frozenset().union(*(c.info.key_ids for c, _ in ordered))
    local = local_keyset_info(loaded)
    if local is not None and every <= local.key_ids:
        return ImportResult(show_keys(loaded, verify=True), f"{len(ordered)} keyset copies", False, len(ordered),
                            tuple(names))
    kek = open_project_kek(loaded)
    if merge:
        handles, origin = _merged_handles(loaded, kek, ordered, every)
        report = install_keyset(loaded, kek, handle=merge_keysets(handles[0], handles[1:]), origin=origin)
        return ImportResult(report, origin, True, len(ordered), tuple(names))
    complete = [(c, where) for c, where in ordered if c.info.key_ids == every]
    if not complete:
        held = "; ".join(f"{where}: {id_phrase(c.info.key_ids)}" for c, where in ordered[:4])
        raise UserError(
            f"the keyset copies of project `{project}` diverge: no single copy holds every data key "
            f"({id_phrase(every)}); {held}{' …' if len(ordered) > 4 else ''}. Run `exitplan keys import --merge "
            f"--config {loaded.path}` to build one keyset holding all of them",
            ExitCode.USAGE,
        )
    copy, where = _first_that_opens(loaded, kek, complete, every)
    report = install_keyset(loaded, kek, wrapped=copy.data, origin=where)
    return ImportResult(report, where, True, len(ordered), tuple(names))


def _timestamp(copy: KeysetCopy) -> float:
    return copy.last_modified.replace(tzinfo=copy.last_modified.tzinfo or timezone.utc).timestamp() \
        if copy.last_modified else 0.0


def _open_copy(loaded: LoadedConfig, kek, copy: KeysetCopy, where: str):
    handle = unwrap_copy(copy.data, kek, loaded.config.project, f"keyset copy {where}")
    check_info_matches(handle, copy.info, f"keyset copy {where}")
    return handle


def _first_that_opens(loaded: LoadedConfig, kek, candidates: list[tuple[KeysetCopy, str]], every: frozenset[int]
                      ) -> tuple[KeysetCopy, str]:
    """The first candidate the configured KEK opens (exit 4 naming them when none does)."""
    refused = None
    for copy, where in candidates:
        try:
            _open_copy(loaded, kek, copy, where)
            return copy, where
        except KekWrongKey as exc:
            refused = exc
    raise KeyStoreError(
        f"the keyset copies of project `{loaded.config.project}` that hold every data key "
        f"({_and_others([w for _, w in candidates])}) do not open with the configured KEK: {refused}. Point "
        "`keys.kek` at the KEK they are wrapped with, import, then `exitplan keys rewrap` if the KEK must change")


def _merged_handles(loaded: LoadedConfig, kek, ordered: list[tuple[KeysetCopy, str]], every: frozenset[int]):
    """Unwrapped keysets covering every key id of the copies and of the local keyset, the one to
    keep the primary of first (the copy with the most keys); and a phrase naming them."""
    handles, covered, used, closed = [], set(), [], []
    for copy, where in ordered:
        if copy.info.key_ids <= covered:
            continue
        try:
            handles.append(_open_copy(loaded, kek, copy, where))
        except KekWrongKey:
            closed.append(where)
            continue
        covered |= copy.info.key_ids
        used.append(where)
    if KeyFiles.of(loaded).keyset.exists():
        local = load_keyset(loaded, kek)
        handles.append(local)
        covered |= local_keyset_info(loaded).key_ids
        used.append(str(KeyFiles.of(loaded).keyset))
    uncovered = every - covered
    if uncovered:
        raise KeyStoreError(
            f"data key(s) {id_phrase(uncovered)} of project `{loaded.config.project}` are only in keyset copies the "
            f"configured KEK ({kek.describe()}) does not open ({', '.join(closed[:3])}); point `keys.kek` at the KEK "
            "they are wrapped with and run the import again")
    return handles, f"{len(used)} keysets merged ({', '.join(used)})"
