"""The Prefect tasks of the flows: each adapts one engine call (arguments in, figures out).

Tasks take and return metadata only (ids, counts, reasons); bytes never travel between tasks, and
no task caches or persists its result. A shard task finds the migration run its flow opened in
this process (`engine.run.active_run`), or, in a shard process or on another worker, attaches to
it through the state store (`engine.run.MigrationRun.attach`).
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact
from prefect.cache_policies import NO_CACHE

from config.loader import load_config
from config.models import LoadedConfig
from config.policy import check_sovereignty
from config.sizes import format_size
from engine import inventory as engine_inventory
from engine import plan as engine_plan
from engine import probe as engine_probe
from engine import run as engine_run
from engine.estimate import format_duration
from engine.settings import within_connections
from engine.shards import PlannedShard, failure_sentence
from engine.verify import verify
from flows.artifacts import (artifact_key, estimate_artifact, inventory_row, plan_rows, probe_artifact,
                             rehydration_artifact, rehydration_row, shard_row, show_progress, verify_figures)
from flows.provider_limits import ensure_provider_limits, provider_limits
from flows.run_logs import RunFailure, engine_logs_to, quiet_failures

quiet_failures()  # wherever the flows or their tasks run: a failure exitplan states prints no traceback


def load_datasets(config_path: str, datasets: list[str] | None) -> tuple[LoadedConfig, list[str]]:
    """The configuration and the datasets a flow's parameters name (every dataset when none)."""
    loaded = load_config(config_path)
    return loaded, loaded.chosen_datasets(list(datasets or []))


# ---------------------------------------------------------------------------------------------
# Progress, shared by the shard tasks of a run and shown by the flow
# ---------------------------------------------------------------------------------------------


@dataclass
class RunProgress:
    """Bytes gone through per shard (copied or found unchanged), summed for the progress artifact.
    Shards are added as the listing makes them final (`add`); `total_bytes` is what the listing
    holds so far (`listing` until every dataset is listed), so the share may go back while it grows."""

    total_bytes: int
    shard_bytes: dict[tuple[str, int], int] = field(default_factory=dict)
    done: dict[tuple[str, int], int] = field(default_factory=dict)
    finished: set[tuple[str, int]] = field(default_factory=set)
    listing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, shards: list[PlannedShard]) -> None:
        with self.lock:
            self.shard_bytes.update({(s.dataset, s.shard): s.bytes for s in shards})

    def callback(self, dataset: str, shard: int):
        def update(snapshot) -> None:
            with self.lock:
                self.done[(dataset, shard)] = snapshot.bytes_done + snapshot.bytes_skipped
        return update

    def shard_finished(self, dataset: str, shard: int) -> None:
        with self.lock:
            self.finished.add((dataset, shard))

    def percent(self) -> float:
        with self.lock:
            if not self.shard_bytes:
                return 0.0 if self.listing else 100.0
            moved = sum(size if k in self.finished else min(self.done.get(k, 0), size)
                        for k, size in self.shard_bytes.items())
            shards_done = len(self.finished) / len(self.shard_bytes)
        most = 99.9 if self.listing else 100.0  # not done while more may be listed
        if self.total_bytes <= 0:
            return 0.0 if self.listing else round(100.0 * shards_done, 1)
        return round(min(most, 100.0 * moved / self.total_bytes), 1)


_PROGRESS: dict[int, RunProgress] = {}  # run id -> progress, for the shard tasks of this process


@contextmanager
def progress_shown(run_id: int, progress: RunProgress) -> Iterator[RunProgress]:
    """While inside, the shard tasks of run `run_id` in this process report their bytes to `progress`."""
    _PROGRESS[run_id] = progress
    try:
        yield progress
    finally:
        _PROGRESS.pop(run_id, None)


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


class ShardFailed(RunFailure):
    """A shard ended with failed objects; `transient` when trying it again may help."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient

    def __reduce__(self):  # a shard process sends it back pickled
        return (type(self), (str(self), self.transient))


def _retry_transient(task, task_run, state) -> bool:
    """Retry a shard only for failures whose cause may pass (the connectors' error classes say so)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:
        return False
    if isinstance(exc, ShardFailed):
        return exc.transient
    return bool(getattr(exc, "retryable", False))


def _verify_run_name() -> str:
    """`verify claims, imaging (deep)`: what a verify task run checks, as the UI lists it."""
    from prefect.runtime import task_run

    params = task_run.parameters
    return f"verify {', '.join(params.get('datasets') or []) or 'every dataset'}{' (deep)' if params.get('deep') else ''}"


@task(name="sovereignty-gate", task_run_name="sovereignty gate", cache_policy=NO_CACHE, persist_result=False)
def sovereignty_gate(config_path: str, datasets: list[str] | None) -> list[dict[str, str]]:
    """Load the configuration (the sovereignty policy refuses a destination before any byte moves)
    and return where each dataset's bytes would go; creates the per-provider connection limits."""
    loaded, names = load_datasets(config_path, datasets)
    verdicts = {v.name: v for v in check_sovereignty(loaded)}
    ensure_provider_limits(provider_limits(loaded, names))
    rows = []
    for name in names:
        v = verdicts[loaded.config.datasets[name].destination]
        p = v.provider
        rows.append({"dataset": name, "destination": v.name, "provider": p.display_name, "operator": p.legal_entity,
                     "seat": p.legal_seat, "jurisdiction": p.jurisdiction, "region": f"{v.region} ({v.location})",
                     "bucket": v.bucket, "place": v.place, "prefix": loaded.config.datasets[name].dest_prefix,
                     "profile": v.catalog_file.sentence() if v.catalog_file else ""})
    get_run_logger().info("sovereignty gate passed for %s", ", ".join(f"{r['dataset']} -> {r['provider']} "
                                                                        f"({r['jurisdiction']})" for r in rows))
    for profile in sorted({r["profile"] for r in rows if r["profile"]}):
        get_run_logger().warning("%s", profile)
    return rows


@task(name="probe-buckets", task_run_name="probe the destination buckets", cache_policy=NO_CACHE,
      persist_result=False)
def probe_buckets(config_path: str, datasets: list[str] | None) -> list[dict[str, Any]]:
    """Measure the S3 buckets the datasets go to against their provider profiles (`engine.probe`,
    what `exitplan probe` does), show the tables as a markdown artifact; returns each report's
    figures (`safe` false: a migration there would fail as configured)."""
    loaded, names = load_datasets(config_path, datasets)
    dests = sorted({loaded.config.datasets[n].destination for n in names
                    if loaded.config.destinations[loaded.config.datasets[n].destination].kind == "s3"})
    reports = engine_probe.probe_destinations(loaded, dests) if dests else []
    probe_artifact(loaded.config.project, reports)
    for r in reports:
        get_run_logger().log(logging.INFO if r.safe else logging.ERROR, "probe of destination `%s`: %s", r.destination,
                             "can hold a migration as configured" if r.safe else "CANNOT hold a migration as configured: "
                             + "; ".join(f"{c.check}: {c.note}" for c in r.checks if c.verdict == "FAIL"))
    return [r.as_dict() for r in reports]


@task(name="list-dataset", task_run_name="list {dataset}", cache_policy=NO_CACHE, persist_result=False)
def list_dataset(run_id: int, dataset: str, full_listing: bool = False) -> dict[str, Any]:
    """List one dataset into the state store, cut into shards; returns its inventory figures.
    `full_listing`: list in full even a dataset with `changes: feed`."""
    run = engine_run.active_run(run_id)
    orch = run.loaded.config.orchestration
    inv, shards = run.list_dataset(dataset, shard_bytes=orch.shard_bytes, shard_objects=orch.shard_objects,
                                   ranges_at_once=orch.listing_ranges, full_listing=full_listing)
    get_run_logger().info("%s: %s objects, %s, cut into %d shard(s)", dataset, f"{inv.objects:,}",
                          format_size(inv.bytes), shards)
    return inventory_row(inv)


@task(name="copy-shard", task_run_name="copy {dataset} shard {shard}", cache_policy=NO_CACHE, persist_result=False,
      retry_condition_fn=_retry_transient)
def copy_shard(run_id: int, dataset: str, shard: int, config_path: str = "", connections: int = 0) -> dict[str, Any]:
    """Copy the objects of one shard; returns its figures. Fails, with the reasons, when an object
    failed (retried when every cause may pass). In the flow's process it uses the open run; in a
    shard process (`orchestration.shard_processes`) it attaches to the run, with at most
    `connections` requests in flight."""
    # The body is a module-level function: in a shard process the task's function is pickled by
    # value, with the globals it names, and this module's shared state must not travel with it.
    return _copy_shard(run_id, dataset, shard, config_path, connections)


def _copy_shard(run_id: int, dataset: str, shard: int, config_path: str, connections: int) -> dict[str, Any]:
    logger = get_run_logger()
    run = engine_run.active_run(run_id, missing_ok=True)
    if run is not None:
        progress = _PROGRESS.get(run_id)
        result = run.copy_shard(dataset, shard, progress.callback(dataset, shard) if progress else None)
    else:
        run = _attached_run(config_path, run_id, dataset, connections)
        with engine_logs_to(logger):
            result = run.copy_shard(dataset, shard)
    if not result.ok:
        sentence = failure_sentence(result)
        logger.error("%s shard %d: %s", dataset, shard, sentence)
        raise ShardFailed(f"{dataset} shard {shard}: {sentence}", result.transient)
    logger.info("%s shard %d: %d copied, %d unchanged, %s in %.1f s", dataset, shard, result.copied,
                result.unchanged, format_size(result.bytes_copied), result.seconds)
    return shard_row(result)


class VerifyProgressShown:
    """A verify's progress in the UI (`engine.verify.VerifyObserver`): a progress artifact
    (`…-verify-progress`: each dataset an equal share, by objects checked of those it must hold) and
    a log line per dataset every `LOG_EVERY` seconds: objects checked of all, bytes read back, rate,
    time left. Called from the verify's threads: each call runs in a copy of the context the
    observer was made in (the task's), since a pool's threads start with none of it — no Prefect
    settings given as a context (the API's URL under `temporary_settings`, as the demo gives it),
    no run context for the run logger: the updates and the log lines failed."""

    LOG_EVERY = 10.0
    UPDATE_EVERY = 2.0

    def __init__(self, project: str, datasets: int, logger):
        self.datasets, self.logger, self.done = max(datasets, 1), logger, 0
        self.artifact = create_progress_artifact(0.0, key=artifact_key(project, "verify-progress"),
                                                 description="Objects checked by the verify, in every dataset")
        self.started = self.logged = self.updated = time.monotonic()
        self.lock = threading.Lock()
        self._context = contextvars.copy_context()

    def progress(self, snap) -> None:
        self._context.copy().run(self._progress, snap)

    def dataset_started(self, dataset: str, objects: int) -> None:
        self.started = time.monotonic()
        self.logger.info("verify %s: %s objects to check", dataset, f"{objects:,}")

    def _progress(self, snap) -> None:
        now = time.monotonic()
        with self.lock:
            if now - self.updated >= self.UPDATE_EVERY:
                self.updated = now
                share = snap.checked / snap.total if snap.total else 1.0
                show_progress(self.artifact, round(100 * (self.done + share) / self.datasets, 1), self.logger)
            if now - self.logged < self.LOG_EVERY:
                return
            self.logged = now
        elapsed = max(now - self.started, 1e-6)
        left = (snap.total - snap.checked) * elapsed / snap.checked if snap.checked else None
        self.logger.info("verify %s: %s of %s objects checked%s, %s read back (%.1f MB/s)%s", snap.dataset,
                         f"{snap.checked:,}", f"{snap.total:,}",
                         f", {snap.failed:,} with discrepancies" if snap.failed else "", format_size(snap.bytes_read),
                         snap.bytes_read / elapsed / 1e6, f", about {format_duration(left)} left" if left else "")

    def dataset_finished(self, summary) -> None:
        with self.lock:
            self.done += 1
            show_progress(self.artifact, round(100 * self.done / self.datasets, 1), self.logger)


@task(name="verify-datasets", task_run_name=_verify_run_name, cache_policy=NO_CACHE, persist_result=False)
def verify_datasets(config_path: str, datasets: list[str] | None, deep: bool, sample: float,
                    seed: int | None) -> dict[str, Any]:
    """Check the destination against the state store (quick: listing + metadata; deep: read back,
    decrypt, SHA-256); records verified / failed per object."""
    loaded, names = load_datasets(config_path, datasets)
    logger = get_run_logger()
    with engine_logs_to(logger):
        result = verify(loaded, names, deep=deep, sample=sample, seed=seed,
                        observer=VerifyProgressShown(loaded.config.project, len(names), logger))
    for d in result.datasets:
        logger.info("verify %s (%s): %d checked, %d ok, %d with discrepancies", d.dataset, d.mode, d.objects, d.ok,
                    d.failed)
        (logger.info if d.complete else logger.warning)("%s", d.status.sentence())
    return verify_figures(result)


@task(name="plan-datasets", task_run_name="dry run", cache_policy=NO_CACHE, persist_result=False)
def plan_datasets(config_path: str, datasets: list[str] | None) -> list[dict[str, Any]]:
    """What a migration would write, per dataset, touching nothing (of the destination only its
    keyset copies are read, the state store only read; the keyset is unwrapped, which proves the
    KEK works). The estimate of its duration and cost goes to an artifact of its own."""
    loaded, names = load_datasets(config_path, datasets)
    summaries, estimate = engine_plan.plan_with_estimate(loaded, names, lambda dataset, planned: None)
    estimate_artifact(loaded.config.project, estimate)
    return plan_rows(summaries)


@task(name="rehydrate-archived", task_run_name="rehydrate the Archive blobs", cache_policy=NO_CACHE,
      persist_result=False)
def rehydrate_archived(config_path: str, datasets: list[str] | None, wait_hours: float = 24,
                       poll_seconds: float = 600) -> list[dict[str, Any]]:
    """Ask Azure to rehydrate (to Hot, standard priority) the Archive-tier blobs of the Azure
    datasets and wait until they are readable or `wait_hours` have passed (`engine.rehydrate`,
    what `exitplan rehydrate --wait` does); each pass is logged, the last one is an artifact."""
    from engine.rehydrate import azure_datasets, wait_readable

    logger = get_run_logger()
    loaded, names = load_datasets(config_path, datasets)
    names, _ = azure_datasets(loaded, names, named=False)

    def progress(found, waited: float) -> None:
        left = sum(f.archived.objects for f in found)
        (logger.info if left == 0 else logger.warning)(
            "rehydration after %.0f min: %s blob(s) (%s) still in the Archive tier%s", waited / 60, f"{left:,}",
            format_size(sum(f.archived.bytes for f in found)),
            "".join(f"; {f.dataset}: {f.failed.objects:,} refused ({f.failures[0][1]})" for f in found if f.failures))

    found = wait_readable(loaded, names, tier="Hot", priority="Standard", poll=poll_seconds,
                          timeout=wait_hours * 3600, progress=progress)
    rows = [rehydration_row(f) for f in found]
    rehydration_artifact(loaded.config.project, rows)
    return rows


@task(name="inventory-dataset", task_run_name="inventory {dataset}", cache_policy=NO_CACHE, persist_result=False)
def inventory_dataset(config_path: str, dataset: str) -> dict[str, Any]:
    """One dataset's inventory (a streamed listing; nothing is written)."""
    loaded, names = load_datasets(config_path, [dataset])
    (inv,) = engine_inventory.inventory(loaded, names)
    return inventory_row(inv)


_ATTACHED: dict[tuple[str, int, str], engine_run.MigrationRun] = {}  # in a shard process


def _attached_run(config_path: str, run_id: int, dataset: str, connections: int) -> engine_run.MigrationRun:
    """This shard process's handle on run `run_id` for `dataset`, attached once (keys unwrapped
    once per process) and closed when the process ends."""
    key = (config_path, run_id, dataset)
    if key not in _ATTACHED:
        loaded, names = load_datasets(config_path, [dataset])
        settings = engine_run.transfer_settings(loaded)
        if connections:
            settings = within_connections(settings, connections)
        run = engine_run.MigrationRun.attach(loaded, names, run_id, settings=settings)
        atexit.register(run.close)
        _ATTACHED[key] = run
    return _ATTACHED[key]
