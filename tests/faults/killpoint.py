"""Run an exitplan command that SIGKILLs itself at a named point: the kill campaign's moments.

    python -m tests.faults.killpoint MODULE:QUALNAME:N:PHASE -- exitplan arguments...

The function or method `QUALNAME` of `MODULE` is wrapped; its `N`-th call in the process (counted
across threads) kills the process with SIGKILL, the signal nothing can catch or clean up after:
- `before`: before the call runs (what it would do never happens);
- `after`: once the call returned (what it did is done; what the caller does next is not);
- `torn`: only for `engine.audit:AuditManifest.append` and `append_signed`: the record is built,
  half of its line is written and flushed, then the kill (a write cut mid-line).

The wrapper lives in this test module and is installed before the command is imported by name
from its module, so exitplan's code holds no test hook. A moment that is never reached (the
command ends first) lets the command end normally: the caller sees its exit code.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
import threading

PHASES = ("before", "after", "torn")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    module_name, qualname, n, phase = point.split(":")
    count, target = int(n), qualname.split(".")
    if phase not in PHASES:
        raise SystemExit(f"killpoint {point}: phase must be one of {', '.join(PHASES)}")
    owner = importlib.import_module(module_name)
    for name in target[:-1]:
        owner = getattr(owner, name)
    original = getattr(owner, target[-1])
    if phase == "torn" and qualname not in ("AuditManifest.append", "AuditManifest.append_signed"):
        raise SystemExit(f"killpoint {point}: `torn` is for AuditManifest.append and append_signed only")
    calls = 0
    lock = threading.Lock()

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        nonlocal calls
        with lock:
            calls += 1
            hit = calls == count
        if hit and phase == "before":
            die()
        if hit and phase == "torn":
            args[0]._file = _TornFile(args[0]._file)  # the manifest's next write is cut mid-line
        result = original(*args, **kwargs)
        if hit and phase == "after":
            die()
        return result

    setattr(owner, target[-1], wrapper)


class _TornFile:
    """The manifest's file, for one write: half of the bytes reach the file, then the kill."""

    def __init__(self, file):
        self._file = file

    def write(self, data: bytes) -> int:
        self._file.write(data[: max(1, len(data) // 2)])
        self._file.flush()
        die()
        return len(data)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        raise SystemExit("usage: python -m tests.faults.killpoint MODULE:QUALNAME:N:PHASE -- exitplan arguments...")
    install(argv[0])
    from flows.cli import main as exitplan

    return exitplan(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
