"""A migration run cut into shards: how a listing is cut, how the shards share the connections a
provider allows, and how each shard's task ended.

The Prefect flows run one task per shard (threads of the flow's process, processes of the host, or
flow runs on workers); what they decide with is here: a `ConnectionShare` before the run opens,
the shards as the listing makes them final (`ShardDefiner`, through
`engine.run.MigrationRun.ready_shards`), a `ShardPlan` of them all and a `ShardOutcome` per shard
once every task has ended (`MigrationRun.shard_plan` and `shards_ended`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from config.models import OrchestrationConfig

from . import state as st
from .settings import TransferSettings, within_connections
from .state.schema import listing_shard

# The shard statuses of a task that ended on its objects (all copied, or some failed); any other
# status means the task stopped on an error, crashed, or never ran.
WENT_THROUGH = ("ok", "failed")


class ShardCutter:
    """Cuts a listing into shards as it streams by: a shard closes once it holds `max_bytes` or
    `max_objects` (an object larger than `max_bytes` is a shard of its own)."""

    def __init__(self, max_bytes: int, max_objects: int):
        self.max_bytes, self.max_objects = max_bytes, max_objects
        self.current = 0
        self.objects = self.bytes = 0

    @property
    def shards(self) -> int:
        return self.current + (1 if self.objects else 0)

    def shard_of(self, size: int) -> int:
        if self.objects and (self.objects >= self.max_objects or self.bytes + size > self.max_bytes):
            self.current += 1
            self.objects = self.bytes = 0
        self.objects += 1
        self.bytes += size
        return self.current


# ---------------------------------------------------------------------------------------------
# Connections: a provider's limit shared between the processes that copy shards
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionShare:
    """How a run's shards share the connections it may open to each provider it writes to."""

    spread: str | None  # "processes" (of this host), "workers" (flow runs on any worker), None (threads here)
    processes: int  # shard processes (or worker flow runs) at once; 0 when shards run in threads here
    settings: TransferSettings  # each process's transfer settings, cut to its share of the connections

    @property
    def per_process(self) -> int:
        """The most connections one process (the flow's, or a shard process) opens to a provider."""
        return self.settings.requests_in_flight

    @property
    def slots(self) -> int:
        """The slots the run takes from each provider's limit: every process at its most, together."""
        return self.settings.requests_in_flight * max(1, self.processes)


def share_connections(orchestration: OrchestrationConfig, settings: TransferSettings,
                      limits: dict[str, int]) -> ConnectionShare:
    """Share the connections of a run between its shard processes (`orchestration.shard_processes`)
    or shard flow runs (`orchestration.shard_workers`), each getting `settings` cut to its share.

    `limits`: provider -> the most connections all runs together may open to it. Every process
    writes to every provider of the run with the same settings, so the smallest limit bounds the
    run. Each process needs at least 2 connections (one transfer worker, one object driver), so
    there are never more processes than half that limit.
    """
    cap = min(limits.values())
    spread = "processes" if orchestration.shard_processes else "workers" if orchestration.shard_workers else None
    processes = min(orchestration.shard_processes or orchestration.shard_workers, cap // 2)
    per_process = cap // processes if processes else cap
    return ConnectionShare(spread, processes, within_connections(settings, per_process))


# ---------------------------------------------------------------------------------------------
# The run's shards, defined as the listing goes on
# ---------------------------------------------------------------------------------------------


class ShardDefiner:
    """Defines a run's shards while its datasets list, so that copying starts before the listing
    ends (engine/listing.py: the rows of a range's n-th cut shard hold `listing_shard(range, n)`).

    A cut shard is final once its range's cutter has moved past it, or its range is done:
    `ready` then defines it, merged with the next final ones of its range into one shard of
    `factor` cut shards, numbered 0, 1, ... per dataset in the order defined. The run's total is
    not known while it lists, so shards grow as the run defines them: `factor` doubles each time
    the run has defined another `max_shards // 10` shards. A run of C cut shards has about
    `max_shards / 10 × log2(C / (max_shards / 10))` shards: at the defaults (500 shards of 5,000
    objects), every shard alone up to 250,000 objects, about `max_shards` shards for 2.5 × 10^8
    objects, a few more beyond.

    The rows a dataset's listing holds with their numbers already (a listing taken over from a run
    that had defined some of its shards; a listing made from an earlier one and the change feed,
    whose range is recorded only once it is whole) are defined as they are, the first time the
    dataset has ranges. One thread calls `ready`."""

    def __init__(self, state: st.StateStore, run_id: int, max_shards: int):
        self.state, self.run_id = state, run_id
        self.step = max(1, max_shards // 10)
        self.defined = 0  # shards this run defined
        self.listed_bytes: dict[str, int] = {}  # dataset -> the bytes its listing held at the last `ready`
        self._next: dict[str, int] = {}  # dataset -> its next shard number
        self._cut: dict[tuple[str, int], int | None] = {}  # (dataset, range) -> its first cut shard not defined

    @property
    def factor(self) -> int:
        return 2 ** min(self.defined // self.step, 20)

    def ready(self, dataset: str) -> list[st.ShardRecord]:
        """Define the shards of `dataset` that are final and not defined yet; returns them. Once
        its listing went through (every range done), that is every shard left."""
        ranges = self.state.listing_ranges(self.run_id, dataset)
        self.listed_bytes[dataset] = sum(r.bytes for r in ranges)
        if not ranges:  # not begun, or made from the change feed and not whole yet
            return []
        new: list[st.ShardRecord] = []
        if dataset not in self._next:
            new += self.state.adopt_shards(self.run_id, dataset)
            self._next[dataset] = max((r.shard for r in new), default=-1) + 1
            self.defined += len(new)
        for r in ranges:
            where = (dataset, r.range_no)
            if where not in self._cut:
                first = self.state.first_cut_undefined(self.run_id, dataset, r.range_no)
                self._cut[where] = first if first is not None else None if r.done else r.cut_shard
            first = self._cut[where]
            while first is not None:
                last = first + self.factor - 1
                if r.done:
                    if first > r.cut_shard:
                        break
                    last = min(last, r.cut_shard)
                elif last >= r.cut_shard:  # the cutter still fills its current shard
                    break
                shard = self.state.define_shard(self.run_id, dataset, (listing_shard(r.range_no, first),
                                                                       listing_shard(r.range_no, last)),
                                                self._next[dataset])
                first = last + 1
                if shard is not None:
                    new.append(shard)
                    self._next[dataset] += 1
                    self.defined += 1
            self._cut[where] = first
        return new


@dataclass(frozen=True)
class PlannedShard:
    """One shard of a run: consecutive listed objects of a dataset."""

    dataset: str
    shard: int  # its number within the dataset, from 0
    objects: int
    bytes: int  # the source bytes of its objects


@dataclass(frozen=True)
class ShardPlan:
    """Every shard of a run, dataset by dataset in the order they were listed, each in listing
    order: the order in which the flows submit their tasks."""

    datasets: tuple[str, ...]  # every dataset listed, in that order (an empty one has no shard)
    shards: tuple[PlannedShard, ...]

    def of(self, dataset: str) -> tuple[PlannedShard, ...]:
        return tuple(s for s in self.shards if s.dataset == dataset)


# ---------------------------------------------------------------------------------------------
# What a shard's task made of its objects, and how the task ended
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardResult:
    """What a shard's task made of its objects (this run's rows for them, over every attempt)."""

    run_id: int
    dataset: str
    shard: int
    objects: int
    bytes: int
    copied: int
    unchanged: int
    failed: int
    bytes_copied: int
    bytes_written: int  # output bytes at the destination (ciphertext for encrypted datasets)
    seconds: float
    attempt: int
    failures: tuple[tuple[str, str], ...]  # the first (source key, reason) pairs
    transient: bool  # some failure's cause may pass: trying the shard again can succeed
    transient_keys: frozenset[str] = frozenset()  # which of `failures` may pass; the others are permanent

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.copied + self.unchanged == self.objects


def failure_sentence(result: ShardResult) -> str:
    """A shard's failures in one sentence (the first three named)."""
    shown = "; ".join(f"{key}: {reason}" for key, reason in result.failures[:3])
    more = f" (and {result.failed - 3} more)" if result.failed > 3 else ""
    return f"{result.failed} of {result.objects} objects failed: {shown}{more}"


@dataclass(frozen=True)
class ShardOutcome:
    """How one shard's task ended, with the shard's figures: a row of the run's shards table."""

    result: ShardResult
    status: str  # "ok", "failed" (some objects failed), or "error" (the task stopped, crashed or never ran)
    reason: str  # why it failed or stopped ("" when ok)
    worker: str  # host:pid of the process that last ran it ("" when it never started)

    @property
    def went_through(self) -> bool:
        """The task ended on its objects (each copied, unchanged or failed), not on an error."""
        return self.status != "error"


def shard_outcome(record: st.ShardRecord, result: ShardResult, why_stopped: Callable[[], str]) -> ShardOutcome:
    """A shard's outcome from its row in the state store once its task has ended. A task that did
    not go through its objects records no reason when its process died or it never ran:
    `why_stopped()` says what the orchestrator saw instead."""
    if record.status in WENT_THROUGH:
        return ShardOutcome(result, record.status, record.reason or "", record.worker or "")
    return ShardOutcome(result, "error", record.reason or why_stopped(), record.worker or "")


@dataclass(frozen=True)
class ShardsEnded:
    """Every shard task of a run has ended: each shard's outcome, in the plan's order, and the
    datasets not gone through (a shard stopped on an error: objects gone from the source were not
    looked for, nor the dataset's transfers recorded in the audit trail)."""

    shards: tuple[ShardOutcome, ...]
    unfinished: tuple[str, ...]
