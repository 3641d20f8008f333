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


def test_what_a_command_does_not_import():
    # Start-up kept from growing back (docs/DESIGN.md, "A command's start and end"): the parser
    # does not need the lab's seed module; the connectors need neither boto3 (botocore's session
    # is enough) nor invoke (paramiko's, for ssh_config's `Match exec`).
    code = ("import sys\n"
            "from flows.cli import build_parser\n"
            "build_parser()\n"
            "import engine.run, connectors.s3, connectors.sftp, connectors.azure_blob\n"
            "print(sorted(m for m in ('lab.seed', 'boto3', 's3transfer', 'invoke') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
