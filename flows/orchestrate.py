"""The Prefect flows: inventory, migrate, verify and exit_plan (ARCHITECTURE.md §8).

Thin wrappers over `engine.run` and `engine.verify`, the functions the CLI calls. A migration run is
opened once in the flow's process (`engine.run.MigrationRun`): every dataset is listed once into
the state store, cut into shards (consecutive objects, by bytes and count), and each shard is one
task. Shard tasks run in threads of the flow's process and share its memory budget and transfer
threads, so memory stays within `transfer.memory_budget` however many shards run at once; with
`orchestration.shard_processes` they run instead in processes of the host that attach to the run,
each with its own budget and a share of the connections. Tasks
take and return metadata only (ids, counts, reasons); bytes never travel between tasks, and
transfer tasks neither cache nor persist results.

What the UI shows: a progress artifact updated as bytes move, table artifacts (the inventory of
each dataset, the shards, the failed objects with their reasons, the verification), and a markdown
summary: objects, bytes, throughput, verified, failed, and where each dataset's bytes went under
which jurisdiction, with who holds the keys. The flow parameters are a config file path, dataset
names and switches: never a credential (the config names environment variables or Prefect blocks).

Connections per provider: before copying, the flow takes, from a Prefect global concurrency limit
named `exitplan-provider-<provider>` (created by exitplan, `strict=True`), as many slots as the run
opens connections to that provider, and holds them until its shards are done; the run's transfer
threads are capped to the limit. Several runs at once thus never exceed the configured number.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.futures import wait
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Failed
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from config.errors import UserError
from config.loader import load_config
from config.models import LoadedConfig
from config.sizes import format_size
from engine import run as engine_run
from engine.settings import within_connections

PROGRESS_EVERY = 2.0  # seconds between two updates of the progress artifact
SHARDS_DEPLOYMENT = "exitplan-shards/shards"  # shards as flow runs on any worker (`shard_workers`)


# ---------------------------------------------------------------------------------------------
# Names: runs say what they move and when; artifact keys follow Prefect's rules
# ---------------------------------------------------------------------------------------------


def _run_name(kind: str) -> Callable[[], str]:
    def name() -> str:
        params = current_flow_run.parameters or {}
        datasets = params.get("datasets") or []
        what = "+".join(datasets) if datasets else "all-datasets"
        try:  # the project's name only: no full load (no gate, no credential read) to name a run
            project = str(yaml.safe_load(Path(params["config_path"]).read_text(encoding="utf-8"))["project"])
        except Exception:  # the flow itself reports a bad config; the name must not fail
            project = Path(str(params.get("config_path", "config"))).stem
        return f"{kind} {project} {what} {datetime.now(timezone.utc):%Y-%m-%d %H:%M}Z"

    return name


def artifact_key(project: str, what: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    raw = f"exitplan-{project}-{what}".lower()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in raw)


def provider_limit_name(provider: str) -> str:
    return f"exitplan-provider-{provider}"


# ---------------------------------------------------------------------------------------------
# Connections per provider
# ---------------------------------------------------------------------------------------------


def provider_limits(loaded: LoadedConfig, datasets: list[str]) -> dict[str, int]:
    """provider -> the connection limit the configuration sets for it (for the datasets' destinations)."""
    orch = loaded.config.orchestration
    providers = {loaded.config.destinations[loaded.config.datasets[d].destination].provider for d in datasets}
    return {p: orch.provider_connections.get(p, orch.default_provider_connections) for p in sorted(providers)}


def ensure_provider_limits(limits: dict[str, int]) -> None:
    """Create (or update) the Prefect global concurrency limit of each provider."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for provider, limit in limits.items():
            client.upsert_global_concurrency_limit_by_name(provider_limit_name(provider), limit)


# ---------------------------------------------------------------------------------------------
# The engine's log lines in the run's log
# ---------------------------------------------------------------------------------------------


class _RunLogBridge(logging.Handler):
    """Hands the engine's log records (retries, restarts, resumed uploads, internal errors) to a
    Prefect run logger. The engine logs from its own threads, which carry no Prefect run context;
    the run logger carries the run's id itself, so the lines reach the run's log in the UI."""

    def __init__(self, run_logger):
        super().__init__(logging.INFO)
        self.run_logger = run_logger
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.run_logger.log(record.levelno, "%s", self.format(record))
        except Exception:  # a log line must never fail the copy
            self.handleError(record)


@contextmanager
def engine_logs_to(run_logger):
    """While inside, INFO and above of the `engine` and `connectors` loggers also go to `run_logger`."""
    bridge = _RunLogBridge(run_logger)
    loggers = [logging.getLogger(name) for name in ("engine", "connectors")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(bridge)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(bridge)
            lg.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Progress, shared by the shard tasks of a run and shown by the flow
# ---------------------------------------------------------------------------------------------


@dataclass
class RunProgress:
    """Bytes gone through per shard (copied or found unchanged), summed for the progress artifact."""

    total_bytes: int
    shard_bytes: dict[tuple[str, int], int] = field(default_factory=dict)
    done: dict[tuple[str, int], int] = field(default_factory=dict)
    finished: set[tuple[str, int]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

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
                return 100.0
            moved = sum(size if k in self.finished else min(self.done.get(k, 0), size)
                        for k, size in self.shard_bytes.items())
            shards_done = len(self.finished) / len(self.shard_bytes)
        if self.total_bytes <= 0:
            return round(100.0 * shards_done, 1)
        return round(min(100.0, 100.0 * moved / self.total_bytes), 1)


_PROGRESS: dict[int, RunProgress] = {}  # run id -> progress, for the shard tasks of this process


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


class ShardFailed(Exception):
    """A shard ended with failed objects; `transient` when trying it again may help."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


def _retry_transient(task, task_run, state) -> bool:
    """Retry a shard only for failures whose cause may pass (the connectors' error classes say so)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:
        return False
    if isinstance(exc, ShardFailed):
        return exc.transient
    return bool(getattr(exc, "retryable", False))


@task(name="sovereignty-gate", cache_policy=NO_CACHE, persist_result=False)
def sovereignty_gate(config_path: str, datasets: list[str] | None) -> list[dict[str, str]]:
    """Load the configuration (the sovereignty policy refuses a destination before any byte moves)
    and return where each dataset's bytes would go; creates the per-provider connection limits."""
    loaded, names = _load(config_path, datasets)
    from config.policy import check_sovereignty

    verdicts = {v.name: v for v in check_sovereignty(loaded)}
    ensure_provider_limits(provider_limits(loaded, names))
    rows = []
    for name in names:
        v = verdicts[loaded.config.datasets[name].destination]
        p = v.provider
        rows.append({"dataset": name, "destination": v.name, "provider": p.display_name, "operator": p.legal_entity,
                     "seat": p.legal_seat, "jurisdiction": p.jurisdiction, "region": f"{v.region} ({v.location})",
                     "bucket": v.bucket})
    get_run_logger().info("sovereignty gate passed for %s", ", ".join(f"{r['dataset']} -> {r['provider']} "
                                                                        f"({r['jurisdiction']})" for r in rows))
    return rows


@task(name="list-dataset", cache_policy=NO_CACHE, persist_result=False)
def list_dataset(run_id: int, dataset: str) -> dict[str, Any]:
    """List one dataset into the state store, cut into shards; returns its inventory figures."""
    run = engine_run.active_run(run_id)
    orch = run.loaded.config.orchestration
    inv, shards = run.list_dataset(dataset, shard_bytes=orch.shard_bytes, shard_objects=orch.shard_objects)
    get_run_logger().info("%s: %s objects, %s, cut into %d shard(s)", dataset, f"{inv.objects:,}",
                          format_size(inv.bytes), shards)
    return _inventory_row(inv)


@task(name="copy-shard", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_retry_transient)
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
        sentence = engine_run.failure_sentence(result)
        logger.error("%s shard %d: %s", dataset, shard, sentence)
        raise ShardFailed(f"{dataset} shard {shard}: {sentence}", result.transient)
    logger.info("%s shard %d: %d copied, %d unchanged, %s in %.1f s", dataset, shard, result.copied,
                result.unchanged, format_size(result.bytes_copied), result.seconds)
    return _shard_row(result)


@task(name="verify-datasets", cache_policy=NO_CACHE, persist_result=False)
def verify_datasets(config_path: str, datasets: list[str] | None, deep: bool, sample: float,
                    seed: int | None) -> dict[str, Any]:
    """Check the destination against the state store (quick: listing + metadata; deep: read back,
    decrypt, SHA-256); records verified / failed per object."""
    from engine.verify import verify

    loaded, names = _load(config_path, datasets)
    logger = get_run_logger()
    with engine_logs_to(logger):
        result = verify(loaded, names, deep=deep, sample=sample, seed=seed)
    for d in result.datasets:
        logger.info("verify %s (%s): %d checked, %d ok, %d with discrepancies", d.dataset, d.mode, d.objects, d.ok,
                    d.failed)
    return {
        "run_id": result.run_id, "mode": result.mode, "seed": result.seed,
        "datasets": [{"dataset": d.dataset, "objects": d.objects, "ok": d.ok, "failed": d.failed,
                      "read_back": d.deep_checked, "bytes_read": d.bytes_read, "unknown": d.unknown}
                     for d in result.datasets],
        "discrepancies": [{"dataset": x.dataset, "object": x.dest_key, "source": x.source_key, "kind": x.kind,
                           "expected": x.expected, "found": x.found}
                          for d in result.datasets for x in d.discrepancies],
        "last_hash": result.audit.last_hash if result.audit else None,
    }


@task(name="plan-datasets", cache_policy=NO_CACHE, persist_result=False)
def plan_datasets(config_path: str, datasets: list[str] | None) -> list[dict[str, Any]]:
    """What a migration would write, per dataset, touching nothing (of the destination only its
    keyset copies are read, the state store only read; the keyset is unwrapped, which proves the
    KEK works)."""
    loaded, names = _load(config_path, datasets)
    summaries = engine_run.plan(loaded, names, lambda dataset, planned: None)
    return [{"dataset": s.dataset, "objects_to_write": s.objects, "size": format_size(s.bytes), "bytes": s.bytes,
             "written": format_size(s.output_bytes), "requests": s.parts, "multipart": s.multipart_objects,
             "unchanged": s.skipped, "refused": s.refused,
             "refusals": "; ".join(f"{key}: {reason}" for key, reason in s.refusals[:5])} for s in summaries]


@task(name="inventory-dataset", cache_policy=NO_CACHE, persist_result=False)
def inventory_dataset(config_path: str, dataset: str) -> dict[str, Any]:
    """One dataset's inventory (a streamed listing; nothing is written)."""
    loaded, names = _load(config_path, [dataset])
    (inv,) = engine_run.inventory(loaded, names)
    return _inventory_row(inv)


_ATTACHED: dict[tuple[str, int, str], engine_run.MigrationRun] = {}  # in a shard process


def _attached_run(config_path: str, run_id: int, dataset: str, connections: int) -> engine_run.MigrationRun:
    """This shard process's handle on run `run_id` for `dataset`, attached once (keys unwrapped
    once per process) and closed when the process ends."""
    key = (config_path, run_id, dataset)
    if key not in _ATTACHED:
        import atexit

        loaded, names = _load(config_path, [dataset])
        settings = engine_run.transfer_settings(loaded)
        if connections:
            settings = within_connections(settings, connections)
        run = engine_run.MigrationRun.attach(loaded, names, run_id, settings=settings)
        atexit.register(run.close)
        _ATTACHED[key] = run
    return _ATTACHED[key]


# ---------------------------------------------------------------------------------------------
# Flows
# ---------------------------------------------------------------------------------------------


@flow(name="exitplan-inventory", flow_run_name=_run_name("inventory"), log_prints=False)
def inventory_flow(config_path: str, datasets: list[str] | None = None):
    """What each dataset holds: objects, bytes, largest, without MD5, not hot, won't fit."""
    try:
        loaded, names = _load(config_path, datasets)
        futures = [inventory_dataset.submit(config_path, name) for name in names]
        rows = [f.result() for f in futures]
    except UserError as exc:
        return _user_failure(exc)
    create_table_artifact(rows, key=artifact_key(loaded.config.project, "inventory"),
                          description=f"Inventory of {', '.join(names)}")
    return rows


@flow(name="exitplan-migrate", flow_run_name=_run_name("migrate"), task_runner=ThreadPoolTaskRunner(max_workers=16))
def migrate_flow(config_path: str, datasets: list[str] | None = None, delete_removed: bool = False,
                 dry_run: bool = False):
    """Copy the datasets, shard by shard; a failing object fails its shard, the other shards go on.
    With `dry_run`, only a table of what would be written (nothing is written anywhere)."""
    try:
        gate = sovereignty_gate(config_path, datasets)
        if dry_run:
            loaded, _ = _load(config_path, datasets)
            rows = plan_datasets(config_path, datasets)
            create_table_artifact(rows, key=artifact_key(loaded.config.project, "plan"),
                                  description="Dry run: what a migration would write (nothing was written)")
            return rows
        outcome = _migrate(config_path, datasets, delete_removed)
    except UserError as exc:
        return _user_failure(exc)
    _summary_artifact(outcome, gate, None)
    return _final(outcome, None)


@flow(name="exitplan-verify", flow_run_name=_run_name("verify"))
def verify_flow(config_path: str, datasets: list[str] | None = None, deep: bool = False, sample: float = 1.0,
                seed: int | None = None):
    """Prove the destinations hold what the state store says was copied (never reads the source)."""
    try:
        loaded, _ = _load(config_path, datasets)
        checked = verify_datasets(config_path, datasets, deep, sample, seed)
    except UserError as exc:
        return _user_failure(exc)
    _verify_artifacts(loaded.config.project, checked)
    create_markdown_artifact(verify_markdown(loaded.config.project, checked),
                             key=artifact_key(loaded.config.project, "verify-summary"),
                             description=f"Summary of verify run {checked['run_id']}")
    failed = sum(d["failed"] for d in checked["datasets"])
    if failed:
        return Failed(message=f"verification found {failed} object(s) with discrepancies (see the table artifact)")
    return checked


@flow(name="exitplan-shards", flow_run_name="shard {shard} of {dataset} (run {run_id})")
def copy_shards_flow(config_path: str, run_id: int, dataset: str, shard: int, connections: int = 0):
    """One shard of a migration run opened by another flow run (`orchestration.shard_workers`), on
    whichever worker takes it: attaches to the run through the shared state database."""
    try:
        orch = _load(config_path, [dataset])[0].config.orchestration
        task = copy_shard.with_options(retries=orch.shard_retries, retry_delay_seconds=orch.shard_retry_delay)
        return task(run_id, dataset, shard, config_path, connections)
    except UserError as exc:
        return _user_failure(exc)


@flow(name="exit-plan", flow_run_name=_run_name("exit-plan"), task_runner=ThreadPoolTaskRunner(max_workers=16))
def exit_plan(config_path: str, datasets: list[str] | None = None, deep_verify: bool = True,
              delete_removed: bool = False):
    """The whole exit: sovereignty gate -> inventory (the run's listing) -> migrate -> verify -> summary
    (and the HTML report). The gate goes first: a refused destination or KEK costs no listing."""
    try:
        gate = sovereignty_gate(config_path, datasets)
        outcome = _migrate(config_path, datasets, delete_removed)
        checked = verify_datasets(config_path, datasets, deep_verify, 1.0, None)
    except UserError as exc:
        return _user_failure(exc)
    _verify_artifacts(outcome.project, checked)
    outcome.report = _write_report(outcome)
    _summary_artifact(outcome, gate, checked)
    return _final(outcome, checked)


# ---------------------------------------------------------------------------------------------
# The migration inside a flow
# ---------------------------------------------------------------------------------------------


@dataclass
class MigrateOutcome:
    """What `_migrate` hands to the summary: figures only."""

    project: str
    loaded: LoadedConfig
    datasets: list[str]
    result: Any  # engine.run.MigrationResult
    inventory: list[dict[str, Any]]
    shards: list[dict[str, Any]]
    failures: list[dict[str, str]]
    seconds: float
    report: Path | None = None
    markdown: str = ""

    @property
    def failed_shards(self) -> int:
        return sum(1 for s in self.shards if s["status"] != "ok")


def _migrate(config_path: str, datasets: list[str] | None, delete_removed: bool) -> MigrateOutcome:
    with engine_logs_to(get_run_logger()):
        return _migrate_run(config_path, datasets, delete_removed)


def _migrate_run(config_path: str, datasets: list[str] | None, delete_removed: bool) -> MigrateOutcome:
    logger = get_run_logger()
    loaded, names = _load(config_path, datasets)
    project = loaded.config.project
    orch = loaded.config.orchestration
    limits = provider_limits(loaded, names)
    cap = min(limits.values())
    # Shard processes (or shard flow runs on workers) each open as many connections as their
    # settings allow: the cap is split between them.
    spread = "processes" if orch.shard_processes else "workers" if orch.shard_workers else None
    processes = min(orch.shard_processes or orch.shard_workers, cap // 2)
    per_process = cap // processes if processes else cap
    if spread == "workers":
        _require_shards_deployment()
    began = time.monotonic()
    run = engine_run.MigrationRun.start(loaded, names, delete_removed=delete_removed,
                                        settings=within_connections(engine_run.transfer_settings(loaded), per_process))
    engine_run.register_run(run)
    slots = run.settings.requests_in_flight * max(1, processes)
    logger.info("migration run %d: %s; %d connection(s) per provider%s (limits: %s)", run.run_id, ", ".join(names),
                slots, f" over {processes} shard {spread}" if processes else "",
                ", ".join(f"{p} {n}" for p, n in limits.items()))
    inventory_rows: list[dict[str, Any]] = []
    shard_rows: list[dict[str, Any]] = []
    try:
        listed = {name: list_dataset.submit(run.run_id, name) for name in names}
        wait(list(listed.values()))
        inventory_rows = [f.result() for f in listed.values()]
        per_dataset = {name: {"shards": [(s.shard, s.objects, s.bytes) for s in shards]}
                       for name, shards in run.define_shards(orch.max_shards).items()}
        logger.info("%d shard(s) in all (at most about %d per run)", sum(len(d["shards"]) for d in per_dataset.values()),
                    orch.max_shards)
        create_table_artifact(inventory_rows, key=artifact_key(project, "inventory"),
                              description=f"Inventory of run {run.run_id}: what each dataset holds at the source")
        progress = RunProgress(sum(r["bytes"] for r in inventory_rows))
        for name, d in per_dataset.items():
            for shard, _, size in d["shards"]:
                progress.shard_bytes[(name, shard)] = size
        _PROGRESS[run.run_id] = progress
        artifact_id = create_progress_artifact(0.0, key=artifact_key(project, "progress"),
                                               description=f"Bytes of run {run.run_id} gone through "
                                                           f"({format_size(progress.total_bytes)} in all)")
        shard_task = copy_shard.with_options(retries=orch.shard_retries, retry_delay_seconds=orch.shard_retry_delay)
        with concurrency([provider_limit_name(p) for p in limits], occupy=slots, strict=True):
            if spread == "workers":
                with ThreadPoolExecutor(max_workers=processes, thread_name_prefix="shard-run") as pool:
                    submit = partial(_submit_flow_run, pool, config_path=str(loaded.path),
                                     connections=run.settings.requests_in_flight)
                    futures = _submit_shards(submit, run.run_id, per_dataset, processes, artifact_id, progress,
                                             wait_fn=concurrent.futures.wait)
            elif processes:
                with ProcessPoolTaskRunner(max_workers=processes) as runner:
                    submit = partial(_submit_to, runner, shard_task, config_path=str(loaded.path),
                                     connections=run.settings.requests_in_flight)
                    futures = _submit_shards(submit, run.run_id, per_dataset, processes, artifact_id, progress)
            else:
                futures = _submit_shards(shard_task.submit, run.run_id, per_dataset, orch.parallel_shards,
                                         artifact_id, progress)
        update_progress_artifact(artifact_id, 100.0)
        for name in names:
            records = [run.state.shard(run.run_id, name, shard) for shard, _, _ in per_dataset[name]["shards"]]
            # A shard went through when its task ended on its objects (ok, or some failed), not on an error.
            if all(r.status in ("ok", "failed") for r in records):
                run.dataset_done(name)  # objects gone from the source, and the dataset's audit records
            else:
                logger.error("%s: a shard stopped on an error; objects gone from the source are not looked for "
                             "in this run", name)
            for record, f in zip(records, futures[name]):
                row = _shard_row(run.shard_result(name, record.shard, record.seconds or 0.0))
                through = record.status in ("ok", "failed")
                row["status"] = record.status if through else "error"
                row["reason"] = record.reason or ("" if through else _stopped(f))
                row["worker"] = record.worker or ""
                shard_rows.append(row)
                if not through:  # stopped in a shard process, or never ran: the run failed
                    run.shard_errors.setdefault((name, record.shard), row["reason"])
        run.completed = True
    finally:
        _PROGRESS.pop(run.run_id, None)
        result = run.finish()
    failures = [{"dataset": r["dataset"], "shard": str(r["shard"]), "object": key, "reason": reason}
                for r in shard_rows for key, reason in r.pop("_failures", ())]
    create_table_artifact(shard_rows, key=artifact_key(project, "shards"),
                          description=f"Shards of run {result.run_id}: one task each")
    if failures:
        create_table_artifact(failures, key=artifact_key(project, "failures"),
                              description=f"Objects that failed in run {result.run_id}, with the reason")
    return MigrateOutcome(project, loaded, names, result, inventory_rows, shard_rows, failures,
                          time.monotonic() - began)


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


def _submit_shards(submit, run_id: int, per_dataset: dict[str, dict], parallel: int, artifact_id,
                   progress: RunProgress, wait_fn=wait) -> dict[str, list]:
    """Submit every shard (`submit(run_id, dataset, shard)`), at most `parallel` running at once;
    update the progress artifact while waiting."""
    futures: dict[str, list] = {name: [] for name in per_dataset}
    pending = [(name, shard) for name, d in per_dataset.items() for shard, _, _ in d["shards"]]
    running: dict = {}
    last = -1.0
    while pending or running:
        while pending and len(running) < parallel:
            name, shard = pending.pop(0)
            f = submit(run_id, name, shard)
            futures[name].append(f)
            running[f] = (name, shard)
        done, _ = wait_fn(list(running), timeout=PROGRESS_EVERY)
        for f in done:
            progress.shard_finished(*running.pop(f))
        pct = progress.percent()
        if pct != last:
            update_progress_artifact(artifact_id, pct)
            last = pct
    return futures


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
# Artifacts and results
# ---------------------------------------------------------------------------------------------


def _inventory_row(inv) -> dict[str, Any]:
    return {"dataset": inv.dataset, "source": inv.source, "destination": inv.destination, "objects": inv.objects,
            "bytes": inv.bytes, "size": format_size(inv.bytes), "largest": format_size(inv.largest_size),
            "without_md5": inv.without_md5, "not_hot": inv.not_hot, "will_not_fit": inv.misfit_count}


def _shard_row(result) -> dict[str, Any]:
    rate = result.bytes_copied / result.seconds / 1e6 if result.seconds > 0 else 0.0
    return {"dataset": result.dataset, "shard": result.shard, "objects": result.objects,
            "size": format_size(result.bytes), "copied": result.copied, "unchanged": result.unchanged,
            "failed": result.failed, "bytes_copied": result.bytes_copied, "seconds": round(result.seconds, 1),
            "mb_per_s": round(rate, 1), "attempts": result.attempt, "status": "ok" if result.ok else "failed",
            "reason": "" if result.ok else engine_run.failure_sentence(result), "_failures": result.failures}


def _verify_artifacts(project: str, checked: dict[str, Any]) -> None:
    create_table_artifact(checked["datasets"], key=artifact_key(project, "verify"),
                          description=f"Verification ({checked['mode']}), run {checked['run_id']}")
    if checked["discrepancies"]:
        create_table_artifact(checked["discrepancies"], key=artifact_key(project, "discrepancies"),
                              description="Objects whose destination copy differs from what was recorded")


def _write_report(outcome: MigrateOutcome) -> Path | None:
    from engine.report import write_report

    out = outcome.loaded.state_dir / "reports" / f"exit-plan-run-{outcome.result.run_id}.html"
    try:
        write_report(outcome.loaded, outcome.datasets, out)
    except UserError as exc:
        get_run_logger().warning("the HTML report could not be written: %s", exc)
        return None
    return out


def summary_markdown(outcome: MigrateOutcome, gate: list[dict[str, str]], checked: dict[str, Any] | None) -> str:
    """The run's summary as markdown (the flow's summary artifact; the demo prints it too)."""
    r = outcome.result
    objects = sum(s.objects for s in r.summaries)
    copied = sum(s.ok for s in r.summaries)
    unchanged = sum(s.skipped for s in r.summaries)
    failed = sum(s.failed for s in r.summaries)
    moved = sum(s.bytes_copied for s in r.summaries)
    total = sum(row["bytes"] for row in outcome.inventory)
    rate = moved / outcome.seconds / 1e6 if outcome.seconds > 0 else 0.0
    lines = [f"# Exit plan `{outcome.project}`: migration run {r.run_id}", ""]
    status = "completed" if r.all_ok and not outcome.failed_shards else "completed with failures"
    lines += [f"**{status}** in {outcome.seconds:.1f} s: {objects:,} objects ({format_size(total)}) listed, "
              f"{copied:,} copied ({format_size(moved)}, {rate:.1f} MB/s), {unchanged:,} unchanged since an "
              f"earlier run, **{failed:,} failed**; {len(outcome.shards)} shard(s), {outcome.failed_shards} failed.", ""]
    if checked is not None:
        ok = sum(d["ok"] for d in checked["datasets"])
        bad = sum(d["failed"] for d in checked["datasets"])
        read = sum(d["read_back"] for d in checked["datasets"])
        lines += [f"**Verified** ({checked['mode']}): {ok:,} objects match what was recorded"
                  + (f", {read:,} read back, decrypted and their SHA-256 compared" if read else "")
                  + f"; **{bad:,} with discrepancies**.", ""]
    lines += ["## Where the bytes went", "",
              "| dataset | provider | operator | legal seat | jurisdiction | region | bucket |",
              "|---|---|---|---|---|---|---|"]
    for g in gate:
        lines.append(f"| {g['dataset']} | {g['provider']} | {g['operator']} | {g['seat']} | **{g['jurisdiction']}** "
                     f"| {g['region']} | {g['bucket']} |")
    lines += ["", "## Who holds the keys", ""]
    by_holder: dict[str, list[str]] = {}
    for g in gate:
        by_holder.setdefault(r.key_holders.get(g["dataset"], ""), []).append(g["dataset"])
    lines += [f"- {', '.join(names)}: {holder}" for holder, names in by_holder.items()]
    lines += ["", "## Datasets", "", "| dataset | objects | copied | unchanged | failed | size copied |",
              "|---|---:|---:|---:|---:|---:|"]
    for s in r.summaries:
        lines.append(f"| {s.dataset} | {s.objects:,} | {s.ok:,} | {s.skipped:,} | {s.failed:,} | "
                     f"{format_size(s.bytes_copied)} |")
    if outcome.failures:
        lines += ["", f"## Failed objects ({len(outcome.failures):,} shown)", ""]
        lines += [f"- `{f['dataset']}` `{f['object']}`: {f['reason']}" for f in outcome.failures[:20]]
    for removed in r.removed:
        if removed.count:
            lines += ["", f"{removed.dataset}: {removed.count:,} object(s) gone from the source since they were "
                          f"copied; {removed.deleted:,} destination copies deleted."]
    if r.audit:
        lines += ["", f"Audit manifest: `{r.audit.manifest}`, {r.audit.records:,} records this run, last record hash "
                      f"`{r.audit.last_hash}`" + ("" if r.audit.signed else " (run end NOT signed)") + "."]
    if checked is not None and checked.get("last_hash"):
        lines.append(f"After verification, last record hash `{checked['last_hash']}`.")
    if outcome.report:
        lines += ["", f"HTML report: `{outcome.report}`"]
    lines += ["", f"State: `{r.state_path}`"]
    return "\n".join(lines)


def verify_markdown(project: str, checked: dict[str, Any]) -> str:
    """A verify run as markdown (the verify flow's summary artifact)."""
    ok = sum(d["ok"] for d in checked["datasets"])
    bad = sum(d["failed"] for d in checked["datasets"])
    read = sum(d["read_back"] for d in checked["datasets"])
    how = "listing and metadata of every object" if checked["mode"] == "quick" else (
        f"listing and metadata of every object; {read:,} read back, decrypted and their SHA-256 compared"
        + (f" (sample seed {checked['seed']})" if checked.get("seed") is not None else ""))
    lines = [f"# Verify `{project}`: run {checked['run_id']} ({checked['mode']})", "",
             f"**{ok:,} objects match** what was recorded at copy time, **{bad:,} with discrepancies**; {how}.",
             "The source was not read.", "",
             "| dataset | checked | ok | discrepancies | read back | not in the state |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {d['dataset']} | {d['objects']:,} | {d['ok']:,} | {d['failed']:,} | {d['read_back']:,} | "
              f"{d['unknown']:,} |" for d in checked["datasets"]]
    if checked["discrepancies"]:
        lines += ["", "## Discrepancies (first 20)", ""]
        lines += [f"- `{x['object']}` (source `{x['source']}`): {x['kind']}: expected {x['expected']}, "
                  f"found {x['found']}" for x in checked["discrepancies"][:20]]
    if checked.get("last_hash"):
        lines += ["", f"Audit manifest: last record hash `{checked['last_hash']}`."]
    return "\n".join(lines)


def _summary_artifact(outcome: MigrateOutcome, gate: list[dict[str, str]], checked: dict[str, Any] | None) -> None:
    outcome.markdown = summary_markdown(outcome, gate, checked)
    create_markdown_artifact(outcome.markdown, key=artifact_key(outcome.project, "summary"),
                             description=f"Summary of run {outcome.result.run_id}")


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
    if failed or bad or outcome.failed_shards:
        return Failed(message=f"{failed} object(s) failed in {outcome.failed_shards} shard(s), {bad} discrepancies "
                              "(see the summary and the failures table)", data=figures)
    return figures


def _load(config_path: str, datasets: list[str] | None) -> tuple[LoadedConfig, list[str]]:
    from flows.commands import chosen_datasets

    loaded = load_config(config_path)
    return loaded, chosen_datasets(loaded, list(datasets or []))


def _user_failure(exc: UserError):
    """A configuration, policy or key problem: one sentence in the log and the state, no traceback."""
    get_run_logger().error("%s (exit code %d)", exc, int(exc.exit_code))
    return Failed(message=str(exc))
