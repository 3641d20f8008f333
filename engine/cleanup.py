"""`exitplan cleanup`: the multipart uploads under the datasets' destination prefixes that no state
row refers to (left by a killed run or a lost state store), listed, and aborted on request; and on
SFTP destinations the temporary files a killed run left (untouched for `TEMPORARY_AGE`), listed,
and removed on the same request.

Where the provider does not list multipart uploads (`multipart.list_uploads: false`), the uploads
the state store knows were left (`StateStore.uploads_left`: given up by a restart, or whose abort
failed) are the ones named, and the result says which destinations could not be listed. Where it
cannot abort them (`multipart.abort: false`), they are named and left for the bucket's lifecycle
rule."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from config.models import LoadedConfig
from connectors.base import NotFound, Unsupported

from .endpoints import DestinationSinks
from .errors import call_endpoint
from .project import lock_project, open_state


# A file of an SFTP destination's temporary directory untouched this long is not being written:
# a write in progress touches its file at least every session timeout (120 s).
TEMPORARY_AGE = 3600.0


def _age(when: datetime | None) -> float | None:
    """Seconds since `when` (None: unknown); a naive time is UTC."""
    if when is None:
        return None
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - when).total_seconds()


@dataclass(frozen=True)
class OrphanUpload:
    """A multipart upload open under a dataset's destination prefix that no state row refers to
    (a run killed between CreateMultipartUpload and recording it, or a state store lost)."""

    dataset: str
    destination: str
    key: str
    upload_id: str
    initiated: datetime | None
    aborted: bool = False
    # Known from the state store (the destination cannot list uploads), not from a listing: an
    # upload a run gave up, which the state's rows still name.
    recorded: bool = False
    # False where the provider cannot abort an upload: it stays until the lifecycle rule removes it.
    abortable: bool = True

    @property
    def age_seconds(self) -> float | None:
        return _age(self.initiated)


@dataclass(frozen=True)
class LeftTemporary:
    """A file a killed run left in an SFTP destination's temporary directory (`.exitplan-sftp/tmp/`):
    never under an object's name, but it costs storage until removed."""

    destination: str
    name: str
    size: int
    modified: datetime | None
    removed: bool = False

    @property
    def age_seconds(self) -> float | None:
        return _age(self.modified)


@dataclass(frozen=True)
class CleanupResult:
    """The uploads found (`OrphanUpload`), the destinations that could not be listed (their
    provider does not answer ListMultipartUploads: only what the state recorded is known there),
    and the temporary files killed runs left on SFTP destinations (`LeftTemporary`)."""

    uploads: tuple[OrphanUpload, ...]
    unlisted_destinations: tuple[str, ...] = ()
    temporary: tuple[LeftTemporary, ...] = ()


def cleanup(loaded: LoadedConfig, datasets: list[str], *, abort: bool = False) -> CleanupResult:
    """The multipart uploads under each dataset's destination prefix that no state row refers to
    (uploads a row refers to are kept: an in-progress one is what the next `migrate` resumes).
    With `abort`, each is aborted; otherwise nothing is touched. The state store is only read.

    Aborting holds the project's migration lock (a `RunError` naming the holder when a migration
    runs): a running migration opens uploads and records them as it goes, and an upload it opened
    after the state was read would look unknown here, and be aborted under it."""
    if not abort:
        return _orphans(loaded, datasets, abort=False)
    lock = lock_project(loaded)
    try:
        return _orphans(loaded, datasets, abort=True)
    finally:
        lock.close()


def _orphans(loaded: LoadedConfig, datasets: list[str], *, abort: bool) -> CleanupResult:
    state = open_state(loaded, read_only=True)
    try:
        known = state.upload_ids() if state is not None else set()
        left = {name: state.uploads_left(name) if state is not None else [] for name in datasets}
    finally:
        if state is not None:
            state.close()
    found: list[OrphanUpload] = []
    unlisted: list[str] = []
    seen: set[tuple[str, str]] = set()
    with DestinationSinks(loaded) as sinks:  # one per destination, closed at the end
        for name in datasets:
            ds = loaded.config.datasets[name]
            sink = call_endpoint(f"destination `{ds.destination}`", sinks, ds.destination)
            recorded = not sink.behaviour.list_uploads
            if recorded:
                if ds.destination not in unlisted:
                    unlisted.append(ds.destination)
                pending = [(key, upload_id, None) for key, upload_id in left[name]]
            else:
                pending = [(u.key, u.upload_id, u.initiated) for u in _listed(loaded, name, sink)
                           if u.upload_id not in known]
            for key, upload_id, initiated in pending:
                if (ds.destination, upload_id) in seen:
                    continue
                seen.add((ds.destination, upload_id))
                abortable = sink.behaviour.abort
                if abort and abortable:
                    call_endpoint(f"dataset `{name}`: aborting upload {upload_id} of {key}", _abort, sink, key,
                                  upload_id)
                found.append(OrphanUpload(name, ds.destination, key, upload_id, initiated, abort and abortable,
                                          recorded=recorded, abortable=abortable))
        temporary = [left for destination in dict.fromkeys(loaded.config.datasets[n].destination for n in datasets)
                     for left in _temporary(sinks, destination, abort=abort)]
    return CleanupResult(tuple(found), tuple(unlisted), tuple(temporary))


def _temporary(sinks: DestinationSinks, destination: str, *, abort: bool) -> list[LeftTemporary]:
    """The files of the destination's temporary directory untouched for `TEMPORARY_AGE` (an SFTP
    destination's; other sinks write nothing under a temporary name), removed with `abort`; and
    those whose time the server does not say, named but never removed."""
    sink = call_endpoint(f"destination `{destination}`", sinks, destination)
    if not hasattr(sink, "temporary_files"):
        return []
    files = call_endpoint(f"destination `{destination}`: listing its temporary files", sink.temporary_files)
    left = []
    for f in files:
        age = _age(f.modified)
        if age is not None and age < TEMPORARY_AGE:
            continue
        if abort and age is not None:
            call_endpoint(f"destination `{destination}`: removing the temporary file {f.name}",
                          sink.remove_temporary_file, f.name)
        left.append(LeftTemporary(destination, f.name, f.size, f.modified, removed=abort and age is not None))
    return left


def _listed(loaded: LoadedConfig, dataset: str, sink) -> list:
    """The multipart uploads open under the dataset's destination prefix; a provider that does not
    answer the listing under the default profile is a `RunError` naming the setting to change."""
    ds = loaded.config.datasets[dataset]

    def listing() -> list:
        try:
            return list(sink.list_multipart_uploads(ds.dest_prefix))
        except Unsupported as exc:
            raise Unsupported(
                f"{exc}; if this provider does not list multipart uploads, set `provider_overrides: {{multipart: "
                f"{{list_uploads: false}}}}` on destination `{ds.destination}` in {loaded.path} (cleanup then names "
                "the uploads the state recorded)", key=exc.key, operation=exc.operation) from exc

    return call_endpoint(f"dataset `{dataset}`: listing the multipart uploads of {sink.label}", listing)


def _abort(sink, key: str, upload_id: str) -> None:
    try:
        handle = sink.resume_multipart(key, upload_id)
    except NotFound:
        return  # gone since it was listed (completed or aborted by someone else): nothing to do
    handle.abort()
