"""The engine's log lines in a Prefect run's log.

The engine and the connectors log with the standard `logging` module (retries, restarts, resumed
uploads, internal errors) and know nothing of Prefect; inside a flow or task, `engine_logs_to`
hands those lines to the run's logger so that they show in the run's log in the UI.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager


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
