"""The `exitplan` console script (`flows.cli.run`): main's exit code, and the process's exit as
Python's (atexit handlers, buffered output), only without the final collection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_console_script_exits_with_mains_code_and_runs_the_exit_handlers(tmp_path):
    written = tmp_path / "written.txt"
    code = (
        "import atexit, sys\n"
        "from flows import cli\n"
        f"out = open({str(written)!r}, 'w')\n"  # left open on purpose: closed by the interpreter's exit
        "out.write('x' * 10000)\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "cli.main = lambda argv=None: (print('buffered', end=''), 3)[1]\n"
        "cli.run()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "bufferedatexit ran\n"
    assert written.read_text() == "x" * 10000


def test_a_usage_error_exits_2_through_the_console_script():
    done = subprocess.run([sys.executable, "-m", "flows.cli", "migrate"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "--config" in done.stderr and "Traceback" not in done.stderr
