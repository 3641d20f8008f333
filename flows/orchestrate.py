"""The Prefect flows: inventory, migrate, verify, exit_plan, and a shard on a worker (ARCHITECTURE.md §8).

Thin: each flow calls the tasks of `flows/tasks.py` (which call `engine.run` and `engine.verify`,
the functions the CLI calls) and shows their figures (`flows/artifacts.py`). A migration run is
opened once in the flow's process (`engine.run.MigrationRun`): every dataset is listed once into
the state store, cut into shards (consecutive objects, by bytes and count), and each shard is one
task, submitted as soon as the listing has made it final (`ShardsAsListed`): copying overlaps the
listing. Shard tasks run in threads of the flow's process and share its memory budget and transfer
threads, so memory stays within `transfer.memory_budget` however many shards run at once; with
`orchestration.shard_processes` they run instead in processes of the host that attach to the run,
each with its own budget and a share of the connections; with `orchestration.shard_workers`, as
flow runs of the `shards` deployment on any worker. The engine decides how the connections are
shared (`engine.shards.share_connections`) and what each shard's end means for the run
(`MigrationRun.shards_ended`); this module only submits, waits and shows.

What the UI shows: a progress artifact updated as bytes move, table artifacts (the inventory of
each dataset, the shards, the failed objects with their reasons, the verification), and a markdown
summary: objects, bytes, throughput, verified, failed, and where each dataset's bytes went under
which jurisdiction, with who holds the keys. The flow parameters are a config file path, dataset
names and switches: never a credential (the config names environment variables or Prefect blocks).

Connections per provider: before copying, the flow takes, from each provider's Prefect global
concurrency limit (`flows/provider_limits.py`), as many slots as the run opens connections to that
provider, and holds them until its shards are done; the run's transfer threads are capped to the
limit. Several runs at once thus never exceed the configured number.

`deploy/prefect.yaml` names the flow functions of this module as its entrypoints.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import queue
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger, tags
from prefect.artifacts import create_link_artifact, create_progress_artifact, create_table_artifact
from prefect.concurrency.sync import concurrency
from prefect.futures import wait
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Failed
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from config.errors import UserError
from config.sizes import format_size
from config.yaml_files import load_yaml_file
from engine import run as engine_run
from engine.executors import noted
from engine.listing import ListingStopped
from engine.report import write_report
from engine.shards import ConnectionShare, PlannedShard, share_connections
from flows.alerts import discrepancy_event
from flows.artifacts import (MigrateOutcome, artifact_key, cutover_artifact, shard_artifacts, show_progress,
                             summary_artifact, verify_artifacts, verify_summary_artifact)
from flows.provider_limits import provider_limit_name, provider_limits
from flows.run_logs import RunFailure, engine_logs_to
from flows.tasks import (RunProgress, copy_shard, inventory_dataset, list_dataset, load_datasets, plan_datasets,
                         probe_buckets, progress_shown, rehydrate_archived, sovereignty_gate, verify_datasets)

PROGRESS_EVERY = 2.0  # seconds between two updates of the progress artifact
LISTING_POLL = 0.25  # seconds between two looks for new shards while the listing goes on and a place is free
SHARDS_DEPLOYMENT = "exitplan-shards/shards"  # shards as flow runs on any worker (`shard_workers`)


def dataset_tag(dataset: str) -> str:
    """The tag of a dataset's task runs (`dataset:claims`), to filter them in the UI."""
    return f"dataset:{dataset}"


def _run_name(kind: str) -> Callable[[], str]:
    """Flow run names say what they move and when."""
    def name() -> str:
        params = current_flow_run.parameters or {}
        datasets = params.get("datasets") or []
        what = "+".join(datasets) if datasets else "all-datasets"
        try:  # the project's name only: no full load (no gate, no credential read) to name a run
            project = str(load_yaml_file(Path(params["config_path"]), "the configuration file")["project"])
        except Exception:  # the flow itself reports a bad config; the name must not fail
            project = Path(str(params.get("config_path", "config"))).stem
        return f"{kind} {project} {what} {datetime.now(timezone.utc):%Y-%m-%d %H:%M}Z"

    return name


# ---------------------------------------------------------------------------------------------
# Flows
# ---------------------------------------------------------------------------------------------


@flow(name="exitplan-inventory", flow_run_name=_run_name("inventory"), log_prints=False)
def inventory_flow(config_path: str, datasets: list[str] | None = None):
    """What each dataset holds: objects, bytes, largest, without MD5, not hot, won't fit.

    Args:
        config_path: The exitplan configuration file, as an absolute path on the workers.
        datasets: The datasets to work on, by their names in the configuration; empty: all of them.
    """
    try:
        loaded, names = load_datasets(config_path, datasets)
        rows = _every_result([inventory_dataset.with_options(tags={dataset_tag(name)}).submit(config_path, name)
                              for name in names])
    except UserError as exc:
        return _user_failure(exc)
    create_table_artifact(rows, key=artifact_key(loaded.config.project, "inventory"),
                          description=f"Inventory of {', '.join(names)}")
    return rows


@flow(name="exitplan-migrate", flow_run_name=_run_name("migrate"), task_runner=ThreadPoolTaskRunner(max_workers=16))
def migrate_flow(config_path: str, datasets: list[str] | None = None, delete_removed: bool = False,
                 dry_run: bool = False, full_listing: bool = False):
    """Copy the datasets, shard by shard; a failing object fails its shard, the other shards go on.
    With `dry_run`, only a table of what would be written (nothing is written anywhere).

    Args:
        config_path: The exitplan configuration file, as an absolute path on the workers.
        datasets: The datasets to work on, by their names in the configuration; empty: all of them.
        delete_removed: Delete the destination copies of objects gone from the source since they
            were copied (off: they are reported and kept).
        dry_run: Only show what would be written; write nothing anywhere.
        full_listing: List every dataset in full, also those with `changes: feed` (which are
            otherwise listed from the last listing and the storage account's change feed).
    """
    try:
        gate = sovereignty_gate(config_path, datasets)
        if dry_run:
            loaded, _ = load_datasets(config_path, datasets)
            rows = plan_datasets(config_path, datasets)
            create_table_artifact(rows, key=artifact_key(loaded.config.project, "plan"),
                                  description="Dry run: what a migration would write (nothing was written)")
            return rows
        outcome = _migration_in_flow(config_path, datasets, delete_removed, full_listing)
    except UserError as exc:
        return _user_failure(exc)
    summary_artifact(outcome, gate, None)
    return _final(outcome, None)


@flow(name="exitplan-verify", flow_run_name=_run_name("verify"))
def verify_flow(config_path: str, datasets: list[str] | None = None, deep: bool = False, sample: float = 1.0,
                seed: int | None = None):
    """Prove the destinations hold what the state store says was copied (never reads the source).

    Args:
        config_path: The exitplan configuration file, as an absolute path on the workers.
        datasets: The datasets to work on, by their names in the configuration; empty: all of them.
        deep: Also read each object back, decrypt it and compare its SHA-256 (off: listing and HEAD).
        sample: With deep, the fraction of objects read back (0 to 1; 1: every object).
        seed: The sample's seed, to repeat a sample exactly (empty: a new one).
    """
    try:
        loaded, _ = load_datasets(config_path, datasets)
        checked = verify_datasets(config_path, datasets, deep, sample, seed)
    except UserError as exc:
        return _user_failure(exc)
    verify_artifacts(loaded.config.project, checked)
    verify_summary_artifact(loaded.config.project, checked)
    discrepancy_event(loaded.config.project, checked)
    failed = sum(d["failed"] for d in checked["datasets"])
    if failed or checked["incomplete"]:
        return _failed("; ".join(([f"verification found {failed} object(s) with discrepancies (see the table "
                                   "artifact)"] if failed else []) + checked["incomplete"]), checked)
    return checked


@flow(name="exitplan-shards", flow_run_name="shard {shard} of {dataset} (run {run_id})")
def copy_shards_flow(config_path: str, run_id: int, dataset: str, shard: int, connections: int = 0):
    """One shard of a migration run opened by another flow run (`orchestration.shard_workers`), on
    whichever worker takes it: attaches to the run through the shared state database."""
    try:
        orch = load_datasets(config_path, [dataset])[0].config.orchestration
        task = copy_shard.with_options(retries=orch.shard_retries, retry_delay_seconds=orch.shard_retry_delay)
        return task(run_id, dataset, shard, config_path, connections)
    except UserError as exc:
        return _user_failure(exc)


@flow(name="exitplan-cutover", flow_run_name=_run_name("cutover"))
def cutover_flow(config_path: str, datasets: list[str]):
    """The last step of each dataset's exit (`exitplan cutover`): a last delta, a deep verify, the
    source found unchanged since, then a signed `cutover` record in the audit manifest. Failed,
    naming the step and the objects, for a dataset not ready.

    Args:
        config_path: The exitplan configuration file, as an absolute path on the workers.
        datasets: The datasets to cut over, by their names in the configuration, each on its own,
            in order (at least one: a cutover is never of every dataset by default).
    """
    from engine.cutover import cutover

    logger = get_run_logger()
    try:
        if not datasets:
            raise UserError("a cutover names its datasets: set the `datasets` parameter (a cutover is never of "
                            "every dataset by default)")
        loaded, names = load_datasets(config_path, datasets)
        results = []
        with engine_logs_to(logger):
            for name in names:
                results.append(cutover(loaded, name, observer=LoggedMigration(logger), say=logger.info))
    except UserError as exc:
        return _user_failure(exc)
    cutover_artifact(loaded.config.project, results)
    for r in results:
        (logger.info if r.ok else logger.error)("%s: %s", r.dataset, r.sentence)
    figures = [{"dataset": r.dataset, "cut_over": r.ok, "step": r.step,
                "objects_sha256": (r.record or {}).get("objects_sha256")} for r in results]
    not_ready = [r for r in results if not r.ok]
    if not_ready:
        return _failed("; ".join(f"{r.dataset}: not cut over ({r.step}): {r.sentence}" for r in not_ready), figures)
    return figures


class LoggedMigration:
    """A migrate's progress (`engine.run.RunObserver`) as a log line of the flow run every
    `LOG_EVERY` seconds and one at the end."""

    LOG_EVERY = 10.0

    def __init__(self, logger):
        self.logger, self.logged = logger, 0.0

    def counting(self, dataset: str, objects: int, bytes_total: int) -> None:
        pass

    def dataset_started(self, dataset: str, objects: int, bytes_total: int) -> None:
        self.logged = time.monotonic()

    def dataset_counted(self, dataset: str, objects: int, bytes_total: int) -> None:
        pass

    def progress(self, snap) -> None:
        if time.monotonic() - self.logged >= self.LOG_EVERY:
            self.logged = time.monotonic()
            self.logger.info("%s: %s objects gone through (%s unchanged), %s copied%s", snap.dataset,
                             f"{snap.objects_done:,}", f"{snap.objects_skipped:,}", format_size(snap.bytes_done),
                             f", {snap.objects_failed:,} failed" if snap.objects_failed else "")

    def dataset_finished(self, summary) -> None:
        self.logger.info("%s: %s copied, %s unchanged, %s failed", summary.dataset, f"{summary.ok:,}",
                         f"{summary.skipped:,}", f"{summary.failed:,}")


@flow(name="exit-plan", flow_run_name=_run_name("exit-plan"), task_runner=ThreadPoolTaskRunner(max_workers=16))
def exit_plan(config_path: str, datasets: list[str] | None = None, deep_verify: bool = True,
              delete_removed: bool = False, probe: bool = False, rehydrate: bool = False,
              rehydrate_wait_hours: float = 24, rehydrate_poll_minutes: float = 10, full_listing: bool = False):
    """The whole exit: sovereignty gate -> (with `probe`) the destination buckets probed -> inventory
    (the run's listing) -> migrate -> verify -> summary (and the HTML report). The gate goes first: a
    refused destination or KEK costs no listing; so does a bucket the probe finds unfit.

    Args:
        config_path: The exitplan configuration file, as an absolute path on the workers.
        datasets: The datasets to work on, by their names in the configuration; empty: all of them.
        deep_verify: Read every object back, decrypt it and compare its SHA-256 after the copy.
        delete_removed: Delete the destination copies of objects gone from the source since they
            were copied (off: they are reported and kept).
        probe: First measure each destination bucket against its provider profile (`exitplan
            probe`, a few MiB written and removed); the run stops before any listing when a bucket
            cannot hold the migration as configured.
        rehydrate: Before the copy, ask Azure to bring the Archive-tier blobs back online (to Hot,
            standard priority: up to 15 hours) and wait until they are readable, so this run copies
            them (off: they are refused by name, and the run ends Failed).
        rehydrate_wait_hours: With `rehydrate`, how long to wait at most before copying what is
            readable.
        rehydrate_poll_minutes: With `rehydrate`, minutes between two listings while waiting.
        full_listing: List every dataset in full, also those with `changes: feed` (which are
            otherwise listed from the last listing and the storage account's change feed).
    """
    try:
        gate = sovereignty_gate(config_path, datasets)
        if probe:
            unsafe = [r["destination"] for r in probe_buckets(config_path, datasets) if not r["safe"]]
            if unsafe:
                return _failed(f"the probe found that destination(s) {', '.join(unsafe)} cannot hold the migration as "
                               "configured (see the probe artifact and its suggested provider_overrides)")
        if rehydrate:
            rehydrate_archived(config_path, datasets, rehydrate_wait_hours, rehydrate_poll_minutes * 60)
        outcome = _migration_in_flow(config_path, datasets, delete_removed, full_listing)
        checked = verify_datasets(config_path, datasets, deep_verify, 1.0, None)
    except UserError as exc:
        return _user_failure(exc)
    verify_artifacts(outcome.project, checked)
    discrepancy_event(outcome.project, checked)
    outcome.report = _write_report(outcome)
    summary_artifact(outcome, gate, checked)
    return _final(outcome, checked)


# ---------------------------------------------------------------------------------------------
# The migration inside a flow
# ---------------------------------------------------------------------------------------------


def _migration_in_flow(config_path: str, datasets: list[str] | None, delete_removed: bool,
                       full_listing: bool = False) -> MigrateOutcome:
    with engine_logs_to(get_run_logger()):
        return _copy_datasets_in_shards(config_path, datasets, delete_removed, full_listing)


def _copy_datasets_in_shards(config_path: str, datasets: list[str] | None, delete_removed: bool,
                             full_listing: bool = False) -> MigrateOutcome:
    logger = get_run_logger()
    loaded, names = load_datasets(config_path, datasets)
    project = loaded.config.project
    orch = loaded.config.orchestration
    limits = provider_limits(loaded, names)
    share = share_connections(orch, engine_run.transfer_settings(loaded), limits)
    if share.spread == "workers":
        _require_shards_deployment()
    began = time.monotonic()
    run = engine_run.MigrationRun.start(loaded, names, delete_removed=delete_removed, settings=share.settings)
    engine_run.register_run(run)
    logger.info("migration run %d: %s; %d connection(s) per provider%s (limits: %s)", run.run_id, ", ".join(names),
                share.slots, f" over {share.processes} shard {share.spread}" if share.processes else "",
                ", ".join(f"{p} {n}" for p, n in limits.items()))
    try:
        progress = RunProgress(0, listing=True)
        artifact_id = create_progress_artifact(0.0, key=artifact_key(project, "progress"),
                                               description=f"Bytes of run {run.run_id} gone through, of those "
                                                           "listed so far while the listing goes on")
        with progress_shown(run.run_id, progress), \
                concurrency([provider_limit_name(p) for p in limits], occupy=share.slots, strict=True):
            # The listing tasks start once the run holds its connections: none of them is left
            # writing into the run when the artifact or the provider limit fails (the run then
            # closes), and their first requests to the Prefect API do not meet these two.
            listed = ShardsAsListed(run, {})
            try:
                for name in names:  # a submission that fails stops the listings submitted before it
                    listed.listing[name] = list_dataset.with_options(tags={dataset_tag(name)}).submit(
                        run.run_id, name, full_listing)
                futures = _run_shards(run, listed, share, artifact_id, progress)
            except BaseException as exc:
                listed.stop(exc)  # no listing task may still write when the run closes
                raise
        create_table_artifact(listed.inventory_rows, key=artifact_key(project, "inventory"),
                              description=f"Inventory of run {run.run_id}: what each dataset holds at the source")
        show_progress(artifact_id, 100.0, logger)
        plan = run.shard_plan()
        ended = run.shards_ended(plan, lambda dataset, shard: _stopped(futures[(dataset, shard)]))
        for name in ended.unfinished:
            logger.error("%s: a shard stopped on an error; objects gone from the source are not looked for "
                         "in this run", name)
    finally:
        result = run.finish()
    shard_rows, failures = shard_artifacts(project, result.run_id, ended.shards)
    return MigrateOutcome(project, loaded, names, result, listed.inventory_rows, shard_rows, failures,
                          time.monotonic() - began)


class ShardsAsListed:
    """The shards of a run as its datasets' listing tasks make them final
    (`MigrationRun.ready_shards`), for the loop that submits the shard tasks: copying starts on the
    first shard listed, not after the last. Polled by that loop's thread only.

    A listing task that fails stops the run, as it did when copying waited for every listing: no
    shard is submitted once it is seen, the other listings stop at their next page (what they
    stored is kept for the next run), and its error is raised once every listing task ended."""

    def __init__(self, run: engine_run.MigrationRun, listing: dict[str, Any]):
        self.run, self.listing = run, listing
        self.rows: dict[str, dict[str, Any]] = {}  # dataset -> its inventory row, once listed
        self.defined = 0

    @property
    def over(self) -> bool:
        """Every dataset is listed and every shard defined: no more will come."""
        return len(self.rows) == len(self.listing)

    @property
    def inventory_rows(self) -> list[dict[str, Any]]:
        return [self.rows[name] for name in self.listing if name in self.rows]

    def poll(self) -> list[PlannedShard]:
        """The shards made final since the last call. Raises a listing task's error (once every
        listing task ended)."""
        new: list[PlannedShard] = []
        for name, future in self.listing.items():
            if name in self.rows:
                continue
            ended = _ended(future)  # before the shards: a listing that ended has every one final
            if ended and _listing_failed(future):
                self.run.stop_listing()  # the other datasets' listings stop at their next page
                self.wait()
                # This error first: the others' may only say that they were stopped.
                _every_result([future] + [f for f in self.listing.values() if f is not future])
            new += self.run.ready_shards(name)
            if ended:
                self.rows[name] = future.result()
        self.defined += len(new)
        if self.over and self.listing:
            get_run_logger().info("every dataset listed: %d shard(s) in all", self.defined)
        return new

    def listed_bytes(self) -> int:
        """The bytes of the objects listed so far, in every dataset (as the last poll read them)."""
        return self.run.listed_bytes()

    def wait(self) -> None:
        """Until every listing task ended."""
        for future in self.listing.values():
            future.wait()

    def stop(self, error: BaseException) -> None:
        """The run stops on `error` (not a listing's): every dataset still listing stops at its next
        page (kept for the next run), and once every listing task ended, a listing that failed of
        itself meanwhile is noted on `error` (those that say they were stopped are not)."""
        self.run.stop_listing()
        self.wait()
        failed = [_listing_error(f) for f in self.listing.values()]
        noted(error, [e for e in failed if e is not None and not isinstance(e, ListingStopped)], "a listing")


def _ended(future) -> bool:
    wrapped = getattr(future, "wrapped_future", None)
    return wrapped.done() if wrapped is not None else future.state.is_final()


def _listing_failed(future) -> bool:
    return _listing_error(future) is not None


def _listing_error(future) -> BaseException | None:
    """What an ended listing task raised (None: it went through)."""
    try:
        future.result()
    except Exception as exc:
        return exc
    return None


def _run_shards(run: engine_run.MigrationRun, shards: ShardsAsListed, share: ConnectionShare, artifact_id,
                progress: RunProgress) -> dict[tuple[str, int], Any]:
    """Run every shard task of `shards` as the share says: flow runs on workers, shard processes of
    this host (each attaches to the run), or threads of this process. Returns each shard's future."""
    orch = run.loaded.config.orchestration
    shard_task = copy_shard.with_options(retries=orch.shard_retries, retry_delay_seconds=orch.shard_retry_delay)
    elsewhere = {"config_path": str(run.loaded.path), "connections": share.per_process}
    if share.spread == "workers":
        with ThreadPoolExecutor(max_workers=share.processes, thread_name_prefix="shard-run") as pool:
            return _submit_shards(partial(_submit_flow_run, pool, **elsewhere), run.run_id, shards, share.processes,
                                  artifact_id, progress, wait_fn=concurrent.futures.wait)
    if share.processes:
        with ProcessPoolTaskRunner(max_workers=share.processes) as runner:
            return _submit_shards(partial(_submit_to, runner, shard_task, **elsewhere), run.run_id, shards,
                                  share.processes, artifact_id, progress)
    return _submit_shards(shard_task.submit, run.run_id, shards, orch.parallel_shards, artifact_id, progress)


def _submit_to(runner, shard_task, run_id: int, dataset: str, shard: int, *, config_path: str, connections: int):
    """Submit a shard task to a process pool runner (the task attaches to the run there)."""
    return runner.submit(shard_task, {"run_id": run_id, "dataset": dataset, "shard": shard,
                                      "config_path": config_path, "connections": connections})


def _require_shards_deployment() -> None:
    """Shard workers need the `shards` deployment on the server: say so before the run starts."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(SHARDS_DEPLOYMENT)
    except ObjectNotFound:
        raise UserError(f"orchestration.shard_workers runs shards as flow runs of the deployment {SHARDS_DEPLOYMENT}, "
                        "which is not on this Prefect server; register it with `exitplan deploy`") from None


def _submit_flow_run(pool, run_id: int, dataset: str, shard: int, *, config_path: str, connections: int):
    """Run a shard as a flow run of the `exitplan-shards/shards` deployment (any worker of the pool
    takes it); the future's result is the flow run, once it ended."""
    from prefect.deployments import run_deployment

    params = {"config_path": config_path, "run_id": run_id, "dataset": dataset, "shard": shard,
              "connections": connections}
    # In the flow's context (copied to the pool's thread), so that the shard's flow run is a
    # subflow of this one in the UI.
    return pool.submit(contextvars.copy_context().run, run_deployment, SHARDS_DEPLOYMENT, parameters=params,
                       timeout=None)


def _submit_shards(submit, run_id: int, shards, parallel: int, artifact_id, progress: RunProgress,
                   wait_fn=wait, logger=None) -> dict[tuple[str, int], Any]:
    """Submit every shard `shards` gives (`ShardsAsListed`: `poll()` for the new ones, `over` once
    none will come) as `submit(run_id, dataset, shard)`, in the order given, at most `parallel`
    running at once; update the progress artifact every `PROGRESS_EVERY` seconds while waiting
    (an update the API misses is logged to `logger`, the flow run's by default, and the shards go
    on). Returns (dataset, shard) -> its future.

    A shard that ends frees its place at once (each future, as it ends, wakes the loop: a wait
    for every running one, or for the next progress update, would leave the place idle), and
    while the listing goes on with a place free, new shards are looked for every `LISTING_POLL`
    seconds: the first copy starts as soon as the listing made the first shard final."""
    logger = logger or get_run_logger()
    futures: dict[tuple[str, int], Any] = {}
    pending: deque[tuple[str, int]] = deque()
    running: dict = {}
    ended: queue.SimpleQueue = queue.SimpleQueue()  # futures, as each ends (their done callback)
    last, shown_at = -1.0, time.monotonic()
    try:
        while True:
            if not shards.over:
                new = shards.poll()
                progress.add(new)
                pending.extend((s.dataset, s.shard) for s in new)
                with progress.lock:
                    progress.listing = not shards.over
                    progress.total_bytes = shards.listed_bytes()
            if shards.over and not pending and not running:
                break
            while pending and len(running) < parallel:
                name, shard = pending.popleft()
                with tags(dataset_tag(name)):  # the UI filters a dataset's task runs by it
                    f = submit(run_id, name, shard)
                futures[(name, shard)] = f
                running[f] = (name, shard)
                f.add_done_callback(ended.put)
            until_shown = max(0.0, shown_at + PROGRESS_EVERY - time.monotonic())
            looking = not shards.over and len(running) < parallel
            try:
                done = [ended.get(timeout=min(until_shown, LISTING_POLL) if looking else until_shown)]
            except queue.Empty:
                done = []
            while not ended.empty():
                done.append(ended.get())
            for f in done:
                progress.shard_finished(*running.pop(f))
            if time.monotonic() - shown_at >= PROGRESS_EVERY:
                shown_at = time.monotonic()
                pct = progress.percent()
                if pct != last and show_progress(artifact_id, pct, logger):
                    last = pct
    except BaseException:
        # The shards started end before this raises: the caller then closes the run (its state
        # and executors), which must not happen under a shard still copying. How each shard
        # ended is in the state store.
        wait_fn(list(running))
        raise
    return futures


def _every_result(futures: list) -> list:
    """The result of every task future, in order, once every task ended; the first failure is
    raised, with the others noted on it (each is also in its own task run's log)."""
    results, errors = [], []
    for future in futures:
        try:
            results.append(future.result())
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise noted(errors[0], errors[1:], "another task")
    return results


def _stopped(future) -> str:
    """Why a shard task (or shard flow run) ended without going through its objects (crashed,
    cancelled, never ran)."""
    if isinstance(future, concurrent.futures.Future):  # a shard flow run on a worker
        if future.exception() is not None:
            return f"{type(future.exception()).__name__}: {future.exception()}"
        flow_run = future.result()
        state = flow_run.state
        return f"flow run {flow_run.name}: " + (f"{state.name}: {state.message or ''}" if state else "no state")
    wrapped = getattr(future, "wrapped_future", None)
    if wrapped is not None and wrapped.done() and wrapped.exception() is not None:
        exc = wrapped.exception()  # e.g. the shard process died
        return f"{type(exc).__name__}: {exc}"
    state = future.state
    try:
        value = state.result(raise_on_failure=False)
    except Exception as exc:  # the result of a crashed task may be unreadable
        value = exc
    return str(value) if isinstance(value, BaseException) else (state.message or state.name)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def _write_report(outcome: MigrateOutcome) -> Path | None:
    out = outcome.loaded.state_dir / "reports" / f"exit-plan-run-{outcome.result.run_id}.html"
    try:
        write_report(outcome.loaded, outcome.datasets, out)
    except UserError as exc:
        get_run_logger().warning("the HTML report could not be written: %s", exc)
        return None
    link_artifacts(outcome, out)
    return out


def link_artifacts(outcome: MigrateOutcome, report: Path) -> None:
    """The report copied next to the data (`_exitplan/<project>/reports/`), and links in the UI to
    it and to the audit manifest's copies: where an auditor finds them, not a path on a worker's disk."""
    from engine.endpoints import publish_file

    loaded, project = outcome.loaded, outcome.project
    destinations = sorted({loaded.config.datasets[d].destination for d in outcome.datasets})
    written, notes = publish_file(loaded, destinations, report, f"_exitplan/{project}/reports/{report.name}",
                                  "the report", content_type="text/html; charset=utf-8")
    for note in notes:
        get_run_logger().warning("%s", note)
    for label, url in written:
        create_link_artifact(url, link_text=f"report of run {outcome.result.run_id}: {label}",
                             key=artifact_key(project, "report"),
                             description="The HTML report, next to the data (read it with the bucket's credentials)")
    for url in outcome.result.audit.copy_urls if outcome.result.audit is not None else ():
        create_link_artifact(url, link_text=f"audit manifest of project `{project}` next to the data",
                             key=artifact_key(project, "manifest"), description="The signed audit manifest")


def _final(outcome: MigrateOutcome, checked: dict[str, Any] | None):
    """The flow's return value (figures only), or a Failed state naming what failed."""
    r = outcome.result
    failed = sum(s.failed for s in r.summaries)
    bad = sum(d["failed"] for d in checked["datasets"]) if checked else 0
    figures = {"run_id": r.run_id, "objects": sum(s.objects for s in r.summaries),
               "copied": sum(s.ok for s in r.summaries), "unchanged": sum(s.skipped for s in r.summaries),
               "failed": failed, "bytes_copied": sum(s.bytes_copied for s in r.summaries),
               "shards": len(outcome.shards), "failed_shards": outcome.failed_shards,
               "verified": sum(d["ok"] for d in checked["datasets"]) if checked else None,
               "discrepancies": bad, "summary": outcome.markdown}
    incomplete = checked["incomplete"] if checked else []
    figures["complete"] = not incomplete if checked else None
    if failed or bad or outcome.failed_shards or incomplete:
        return _failed("; ".join([f"{failed} object(s) failed in {outcome.failed_shards} shard(s), {bad} "
                                  "discrepancies (see the summary and the failures table)"] + incomplete), figures)
    return figures


def _failed(message: str, figures: dict[str, Any] | None = None):
    """The state a flow ends in when it failed for a reason it states: Failed, `message`, and a
    `RunFailure` carrying `figures` (logged as its sentence, never with a traceback)."""
    return Failed(message=message, data=RunFailure(message, figures))



def _user_failure(exc: UserError):
    """A configuration, policy or key problem: one sentence in the log and the state, no traceback."""
    get_run_logger().error("%s (exit code %d)", exc, int(exc.exit_code))
    return _failed(str(exc))
