"""`exitplan worker`: a Prefect process worker for exitplan's deployments, kept private and
stopped cleanly.

Two things Prefect's process worker does that an exit cannot live with, measured on Prefect 3.9:

- For every flow run it writes the run's whole environment, credentials named by the
  configuration's `*_env` fields included, to `prefect-workspace-attempt-*/workspace.json` under
  the temporary directory (0600, in a 0700 directory). The directory is removed when the run
  ends, but stays on disk, credentials and all, when the worker is killed.
- SIGTERM (or Ctrl-C) stops the worker within a second or two by killing the process of the flow
  run it is executing, and that run stays `Running` in the UI until someone changes its state.

`exitplan worker` starts `prefect worker start --type process` and around it:

- gives it a private temporary directory (`TMPDIR`) of its own, under `--work-dir` (0700, one
  worker at a time per directory), so those files never land in a shared `/tmp`, and empties it
  before the worker starts and after it stops: nothing a killed worker left behind stays;
- with `--config`, names (never shows) the credentials those configurations read from the
  environment, and how to move them into Prefect blocks, which the run reads from the API
  itself, so that they are not in the worker's environment at all;
- on SIGTERM or SIGINT, first cancels the flow runs this worker is executing (Prefect stops their
  processes and marks them `Cancelled`; the next run continues their multipart uploads from the
  recorded parts), waits for them up to `--stop-timeout`, then stops the worker. A second signal
  stops it at once.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from config.errors import ExitCode, UserError
from config.loader import load_config

from flows.deploy_cli import DEFAULT_POOL, QUIET_PREFECT_ENV, api_url, check_api

WORKER_DIR_ENV = "EXITPLAN_WORKER_DIR"
DEFAULT_STOP_TIMEOUT = 120.0  # seconds the cancelled runs get to stop before the worker is stopped
WORKER_EXIT_TIMEOUT = 30.0  # seconds `prefect worker start` gets to exit once signalled
POLL_SECONDS = 0.5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker", help="start a Prefect process worker for exitplan's deployments (private temporary files, clean stop)",
        description="Start `prefect worker start --type process` on a work pool, with a private temporary directory "
                    "that is emptied before and after, and a clean stop: SIGTERM/Ctrl-C cancels the runs it executes "
                    "(the next run continues them), then stops the worker.",
    )
    p.add_argument("--pool", default=DEFAULT_POOL, metavar="NAME", help=f"the process work pool (default: {DEFAULT_POOL})")
    p.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                   help="a configuration this worker runs (repeatable): the credentials it reads from the environment "
                        "are named, with how to keep them out of it")
    p.add_argument("--work-dir", type=Path, default=None, metavar="DIR",
                   help=f"the worker's private directory (default: ${WORKER_DIR_ENV}, or ~/.local/state/exitplan/worker)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="flow runs executed at once (default: no limit)")
    p.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long the cancelled runs get to stop before the worker is stopped "
                        f"(default: {DEFAULT_STOP_TIMEOUT:.0f})")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    for path in args.config:
        _name_environment_credentials(load_config(path))
    url = api_url()
    check_api(url)
    work_dir = WorkerDirectory(args.work_dir or default_work_dir())
    with work_dir:
        removed = work_dir.empty_tmp()
        if removed:
            print(f"removed {removed} temporary entr{'y' if removed == 1 else 'ies'} left in {work_dir.tmp} by a worker "
                  "that was killed (they can hold a run's environment)", flush=True)
        try:
            return _supervise(args, work_dir)
        finally:
            work_dir.empty_tmp()


def default_work_dir() -> Path:
    if os.environ.get(WORKER_DIR_ENV):
        return Path(os.environ[WORKER_DIR_ENV]).expanduser()
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "exitplan" / "worker"


# ---------------------------------------------------------------------------------------------
# The private directory
# ---------------------------------------------------------------------------------------------


class WorkerDirectory:
    """`DIR` (0700, owned by this user) with `DIR/tmp`, the worker's TMPDIR, held by one worker at a
    time (an exclusive `flock` on `DIR/worker.lock`): emptying `tmp` is then never someone else's loss."""

    def __init__(self, path: Path):
        self.path = path.resolve()
        self.tmp = self.path / "tmp"
        self._lock = None

    def __enter__(self) -> "WorkerDirectory":
        for d in (self.path, self.tmp):
            _private_directory(d)
        self._lock = open(self.path / "worker.lock", "a+")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise UserError(f"another exitplan worker uses {self.path}; give this one a directory of its own "
                            "with --work-dir") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.close()

    def empty_tmp(self) -> int:
        """Remove everything in `tmp` (what the worker's runs left); returns how many entries."""
        removed = 0
        for entry in self.tmp.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        return removed


def _private_directory(path: Path) -> None:
    """Create `path` 0700, or check an existing one: a directory (not a link) of this user, which
    then is made 0700."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"--work-dir: {path} is not a directory; name a directory for the worker's private files")
    if st.st_uid != os.getuid():
        raise UserError(f"--work-dir: {path} belongs to another user (uid {st.st_uid}); the worker's temporary files "
                        "hold its runs' environment: give it a directory of its own")
    if st.st_mode & stat.S_ISVTX:
        raise UserError(f"--work-dir: {path} is a shared directory (sticky bit, like /tmp); the worker's temporary "
                        "files hold its runs' environment: name a directory of its own (e.g. below it)")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


# ---------------------------------------------------------------------------------------------
# Credentials in the environment
# ---------------------------------------------------------------------------------------------


def environment_credentials(config: Any) -> list[tuple[str, str]]:
    """(field, variable) of every `*_env` field of a configuration whose variable is set in this
    environment: what a flow run of it reads from the worker's environment."""
    found: list[tuple[str, str]] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                field = f"{where}.{k}" if where else str(k)
                if isinstance(k, str) and k.endswith("_env") and isinstance(v, str) and v:
                    if os.environ.get(v):
                        found.append((field, v))
                else:
                    walk(v, field)

    walk(config.model_dump(), "")
    return found


def _name_environment_credentials(loaded) -> None:
    found = environment_credentials(loaded.config)
    if not found:
        return
    print(f"{loaded.path}: the runs read {', '.join(sorted({v for _, v in found}))} from this worker's environment "
          f"({', '.join(f for f, _ in found)}). Prefect writes a run's environment into its temporary workspace "
          "file (kept private here, and removed); to keep credentials out of the worker entirely, store them in "
          "Prefect blocks and name those in the configuration (`*_block` fields; README, \"Credentials from "
          "Prefect blocks\").", flush=True)


# ---------------------------------------------------------------------------------------------
# The worker process and a clean stop
# ---------------------------------------------------------------------------------------------


def _supervise(args: argparse.Namespace, work_dir: WorkerDirectory) -> int:
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", args.pool, "--type", "process"]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    env = dict(os.environ, TMPDIR=str(work_dir.tmp), **QUIET_PREFECT_ENV)
    signals: list[int] = []
    wake = threading.Event()

    def on_signal(signum, _frame) -> None:
        signals.append(signum)
        wake.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"starting the process worker of pool {args.pool!r} (temporary files in {work_dir.tmp})", flush=True)
        # A session of its own: a terminal's Ctrl-C reaches this process only, which stops the
        # runs first and the worker then.
        worker = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            while worker.poll() is None and not signals:
                wake.wait(POLL_SECONDS)
            if worker.poll() is not None:
                return worker.returncode
            _stop(worker, args.pool, args.stop_timeout, signals)
            return ExitCode.OK
        except BaseException:
            _kill(worker)
            raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop(worker: subprocess.Popen, pool: str, timeout: float, signals: list[int]) -> None:
    """Cancel the runs `worker` executes and wait for them (until `timeout`, or a second signal),
    then stop the worker itself."""
    runs = _runs_of(worker.pid, pool)
    if runs:
        print(f"stopping: cancelling {len(runs)} flow run(s) this worker executes ({', '.join(r.name for r in runs)}); "
              "the next run of their deployment continues their work", flush=True)
        _cancel(runs)
        deadline = time.monotonic() + timeout
        while len(signals) < 2 and time.monotonic() < deadline and worker.poll() is None:
            if not _still_running(runs):
                break
            time.sleep(POLL_SECONDS)
        left = _still_running(runs)
        if left:
            print(f"{len(left)} run(s) did not stop within {timeout:.0f} s ({', '.join(r.name for r in left)}); "
                  "stopping the worker anyway: set their state in the UI", file=sys.stderr, flush=True)
    print("stopping the worker", flush=True)
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=WORKER_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill(worker)


def _kill(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        worker.wait()


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _runs_of(worker_pid: int, pool: str) -> list[Any]:
    """The pool's pending and running flow runs whose process is one of this worker's."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                WorkPoolFilter, WorkPoolFilterName)
    from prefect.client.schemas.objects import StateType

    mine = {str(pid) for pid in descendants(worker_pid)}
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.RUNNING, StateType.PENDING]))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])))
    return [r for r in runs if r.infrastructure_pid and r.infrastructure_pid.rpartition(":")[2] in mine]


def _cancel(runs: Iterable[Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        for run in runs:
            client.set_flow_run_state(run.id, Cancelling(message="its worker is stopping (exitplan worker); the "
                                                                 "next run continues its work"), force=True)


def _still_running(runs: Iterable[Any]) -> list[Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [r for r in runs if not client.read_flow_run(r.id).state.is_final()]
