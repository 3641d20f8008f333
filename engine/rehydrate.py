"""`exitplan rehydrate`: the Archive-tier blobs of Azure datasets made readable, so that the next
migrate copies them.

Azure keeps an Archive blob offline: reading it fails until it has been rehydrated to an online
tier, which Azure does in up to 15 hours (Standard priority) or about an hour (High, priced
higher). `rehydrate` lists each dataset live (an inventory report's tiers may be stale), asks for
every Archive blob it selects that is not being rehydrated yet (one Set Blob Tier request each, at
`transfer.concurrency` at once), and with `wait` lists again every `poll` seconds until none is
left in the Archive tier or the time is up. A blob whose request failed is named with the reason.
A blob archived after its copy (the state's current copy has its ETag and size, at the key the
dataset would write it to) is not asked for: its copy stands, and rehydrating it would be paid for
nothing. Nothing is copied here: migrate copies a blob once it is readable, and refuses it by name
before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterator

from config.errors import ExitCode, UserError
from config.models import LoadedConfig
from connectors.base import ConnectorError, ObjectMeta

from .endpoints import close_endpoint, open_source
from .errors import call_endpoint
from .estimate import Figures
from .dataset_copy import COPIES_PAGE, copy_holds
from .executors import BoundedTasks, create_pool
from .inventory import selected
from .placement import destination_key
from .project import open_state
from .state import StateStore

PRIORITIES = {"standard": "Standard", "high": "High"}
TIERS = {"hot": "Hot", "cool": "Cool", "cold": "Cold"}
MAX_EXAMPLES = 20


@dataclass
class DatasetRehydration:
    """One dataset's Archive-tier blobs, as one pass found them: `requested` (asked for by this
    pass), `pending` (being rehydrated since an earlier request), `failed` (the request was
    refused: examples with the reason), `copied` (archived after their copy: not asked for)."""

    dataset: str
    listed: int = 0
    requested: Figures = field(default_factory=Figures)
    pending: Figures = field(default_factory=Figures)
    failed: Figures = field(default_factory=Figures)
    copied: Figures = field(default_factory=Figures)
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def archived(self) -> Figures:
        """Every blob still in the Archive tier that migrate needs readable: asked for now, earlier,
        or refused (not those whose copy stands)."""
        return Figures(self.requested.objects + self.pending.objects + self.failed.objects,
                       self.requested.bytes + self.pending.bytes + self.failed.bytes)

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "listed": self.listed,
                **{name: {"objects": t.objects, "bytes": t.bytes}
                   for name, t in (("requested", self.requested), ("pending", self.pending), ("failed", self.failed),
                                   ("copied", self.copied))},
                "failures": [{"key": k, "reason": r} for k, r in self.failures]}


def azure_datasets(loaded: LoadedConfig, datasets: list[str], named: bool) -> tuple[list[str], list[str]]:
    """The datasets read from Azure Blob Storage (the only source with tiers), and the others. A
    dataset named on the command line that is not an Azure one is a `UserError` (exit 2)."""
    azure = [d for d in datasets if loaded.config.sources[loaded.config.datasets[d].source].kind == "azure_blob"]
    others = [d for d in datasets if d not in azure]
    if named and others:
        raise UserError(f"dataset(s) {', '.join(f'`{d}`' for d in others)} do not read from Azure Blob Storage: "
                        "only Azure blobs have an Archive tier to rehydrate; name Azure datasets", ExitCode.USAGE)
    return azure, others


def archived(loaded: LoadedConfig, name: str, source) -> Iterator[ObjectMeta]:
    """The Archive-tier blobs dataset `name` selects, listed live."""
    ds = loaded.config.datasets[name]
    for meta in selected(source.list(ds.prefix), ds):
        if (meta.tier or "").lower() == "archive":
            yield meta


def with_copy_standing(loaded: LoadedConfig, name: str, blobs: Iterator[ObjectMeta], state: StateStore | None
                       ) -> Iterator[tuple[ObjectMeta, bool]]:
    """Each blob, and whether the state holds its current copy: the same ETag and size at the key
    dataset `name` writes it to (`dataset_copy.copy_holds`, where migrate's delta pass starts)."""
    ds = loaded.config.datasets[name]
    while page := list(islice(blobs, COPIES_PAGE)):
        copies = state.current_copies(name, [m.key for m in page]) if state is not None else {}
        for meta in page:
            yield meta, copy_holds(copies.get(meta.key), meta, destination_key(meta.key, ds.prefix, ds.dest_prefix))


def rehydrate(loaded: LoadedConfig, datasets: list[str], *, tier: str = "Hot", priority: str = "Standard",
              dry_run: bool = False) -> list[DatasetRehydration]:
    """One pass: ask for the rehydration of each dataset's Archive blobs not being rehydrated yet
    (`dry_run`: count them, ask nothing)."""
    state = open_state(loaded, read_only=True)
    try:
        return [_rehydrate_dataset(loaded, name, state, tier, priority, dry_run) for name in datasets]
    finally:
        if state is not None:
            state.close()


def _rehydrate_dataset(loaded: LoadedConfig, name: str, state: StateStore | None, tier: str, priority: str,
                       dry_run: bool) -> DatasetRehydration:
    """`rehydrate` for one dataset."""
    workers = loaded.config.transfer.concurrency
    source = call_endpoint(f"dataset `{name}`: source", open_source, loaded, name)
    found = DatasetRehydration(name)

    def asked(meta: ObjectMeta, _result: None) -> None:
        found.requested.add(meta.size)

    def refused(meta: ObjectMeta, exc: BaseException) -> None:
        if not isinstance(exc, ConnectorError):
            raise exc
        found.failed.add(meta.size)
        if len(found.failures) < MAX_EXAMPLES:
            found.failures.append((meta.key, str(exc)))

    def each(tasks: BoundedTasks | None) -> None:
        for meta, copy_standing in with_copy_standing(loaded, name, archived(loaded, name, source), state):
            found.listed += 1
            if copy_standing:
                found.copied.add(meta.size)
            elif meta.rehydrating:
                found.pending.add(meta.size)
            elif tasks is None:
                found.requested.add(meta.size)
            else:
                tasks.submit(meta, source.rehydrate, meta.key, tier, priority)

    def listing() -> None:
        if dry_run:
            each(None)
            return
        with create_pool(workers, "rehydrate") as pool, \
                BoundedTasks(pool, 2 * workers, on_result=asked, on_error=refused) as tasks:
            each(tasks)

    try:
        call_endpoint(f"dataset `{name}`: listing {source.label}", listing)
    finally:
        close_endpoint(source, f"dataset `{name}`: source")
    return found


def wait_readable(loaded: LoadedConfig, datasets: list[str], *, tier: str, priority: str, poll: float,
                  timeout: float, progress: Callable[[list[DatasetRehydration], float], None] | None = None,
                  sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic
                  ) -> list[DatasetRehydration]:
    """`rehydrate` passes every `poll` seconds until none of the datasets' blobs is left in the
    Archive tier, or `timeout` seconds have passed; returns the last pass's figures. Each pass asks
    again for any Archive blob not being rehydrated (one archived since, or one whose request was
    refused). `progress(found, waited)` after every pass."""
    start = clock()
    while True:
        found = rehydrate(loaded, datasets, tier=tier, priority=priority)
        waited = clock() - start
        if progress is not None:
            progress(found, waited)
        if all(f.archived.objects == 0 for f in found) or waited + poll > timeout:
            return found
        sleep(poll)
