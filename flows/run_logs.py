"""What a Prefect run's log says: the engine's lines, and failures without tracebacks.

The engine and the connectors log with the standard `logging` module (retries, restarts, resumed
uploads, internal errors) and know nothing of Prefect; inside a flow or task, `engine_logs_to`
hands those lines to the run's logger so that they show in the run's log in the UI.

A run that ends Failed for a reason exitplan states (a `RunFailure`) must read as a failure, not a
crash: Prefect logs every exception with its traceback, and under a worker its engine raises a
failed run's result once more after the run ended ("Engine execution exited with unexpected
exception"). `quiet_failures` keeps the sentence and drops the rest, for `RunFailure` only.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any


class _RunLogBridge(logging.Handler):
    """Hands the engine's log records to a Prefect run logger. The engine logs from its own
    threads, which carry no Prefect run context; the run logger carries the run's id itself, so the
    lines reach the run's log in the UI."""

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
# Failures that read as failures
# ---------------------------------------------------------------------------------------------


class RunFailure(Exception):
    """A failure exitplan has already stated in one sentence (objects failed, a dataset not
    complete, a configuration, policy or key error): the run ends Failed with that sentence, and
    no traceback is printed for it anywhere. `figures`: what the run did, when it got that far."""

    def __init__(self, message: str, figures: dict[str, Any] | None = None):
        super().__init__(message)
        self.figures = figures


# What Prefect's engine logs when it raises a failed run's exception again after the run ended
# (`python -m prefect.engine` under a worker): the run's state already says it, in our sentence.
_RERAISED = ("Engine execution exited with unexpected exception", "Execution of flow run",
             "Execution exited with unexpected exception")


class _QuietFailures(logging.Filter):
    """On Prefect's run and engine loggers: a `RunFailure` is logged as its sentence, without a
    traceback, and the engine's lines that only raise it again after the run ended are dropped.
    Any other exception keeps its traceback: that one is a bug, and its stack is what fixes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, RunFailure):
            return True
        if isinstance(record.msg, str) and record.msg.startswith(_RERAISED):
            return False
        record.exc_info = None
        record.exc_text = None
        return True


class _NoCompletedTasks(logging.Filter):
    """On Prefect's task-run logger: no "Finished in state Completed()" line per task (half of a
    run's log; the UI shows each task's state). A task that did not complete still says so."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and isinstance(record.msg, str)
                    and record.msg.startswith("Finished in state Completed"))


_QUIET = _QuietFailures()
_NO_COMPLETED = _NoCompletedTasks()


def quiet_failures() -> None:
    """Install the `RunFailure` rule on Prefect's loggers, and drop the completed tasks' lines
    (idempotent; done when the flows load)."""
    for name, filters in (("prefect.flow_runs", [_QUIET]), ("prefect.task_runs", [_QUIET, _NO_COMPLETED]),
                          ("prefect.engine", [_QUIET])):
        logger = logging.getLogger(name)
        for f in filters:
            if f not in logger.filters:
                logger.addFilter(f)
