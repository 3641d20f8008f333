"""`exitplan cleanup`: the multipart uploads under the datasets' destination prefixes that no state
row refers to (left by a killed run or a lost state store), listed, and aborted on request."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from config.models import LoadedConfig
from connectors.base import NotFound

from .endpoints import open_sink
from .errors import call_endpoint
from .project import lock_project, open_state


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

    @property
    def age_seconds(self) -> float | None:
        if self.initiated is None:
            return None
        initiated = self.initiated if self.initiated.tzinfo else self.initiated.replace(tzinfo=timezone.utc)
        return (datetime.now(timezone.utc) - initiated).total_seconds()


def cleanup(loaded: LoadedConfig, datasets: list[str], *, abort: bool = False) -> list[OrphanUpload]:
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


def _orphans(loaded: LoadedConfig, datasets: list[str], *, abort: bool) -> list[OrphanUpload]:
    state = open_state(loaded, read_only=True)
    try:
        known = state.upload_ids() if state is not None else set()
    finally:
        if state is not None:
            state.close()
    found: list[OrphanUpload] = []
    seen: set[tuple[str, str]] = set()
    for name in datasets:
        ds = loaded.config.datasets[name]
        sink = call_endpoint(f"destination `{ds.destination}`", open_sink, loaded, ds.destination)
        pending = call_endpoint(f"dataset `{name}`: listing the multipart uploads of {sink.label}",
                                lambda: list(sink.list_multipart_uploads(ds.dest_prefix)))
        for upload in pending:
            if upload.upload_id in known or (ds.destination, upload.upload_id) in seen:
                continue
            seen.add((ds.destination, upload.upload_id))
            if abort:
                call_endpoint(f"dataset `{name}`: aborting upload {upload.upload_id} of {upload.key}", _abort, sink,
                              upload)
            found.append(OrphanUpload(name, ds.destination, upload.key, upload.upload_id, upload.initiated, abort))
    return found


def _abort(sink, upload) -> None:
    try:
        handle = sink.resume_multipart(upload.key, upload.upload_id)
    except NotFound:
        return  # gone since it was listed (completed or aborted by someone else): nothing to do
    handle.abort()
