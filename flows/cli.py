"""The `exitplan` command line: runs the engine in process, no Prefect server needed.

Every command exits with the codes of `config.errors.ExitCode`; a `UserError` is printed as one
sentence on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import gc
import sys

from config.errors import ExitCode, UserError
from flows import (audit_cli, commands, cutover_cli, deploy_cli, keys_cli, lab, probe_cli, rehydrate_cli, status_cli,
                   worker)


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, registered here and only here (each module adds its own parsers)."""
    parser = argparse.ArgumentParser(
        prog="exitplan",
        description="Move datasets out of Azure Blob Storage into EU-jurisdiction object storage.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    lab.register(sub)
    commands.register(sub)
    audit_cli.register(sub)
    status_cli.register(sub)
    deploy_cli.register(sub)
    keys_cli.register(sub)
    worker.register(sub)
    probe_cli.register(sub)
    rehydrate_cli.register(sub)
    cutover_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors are exit code 2 already
        return int(exc.code or 0)
    try:
        code = args.func(args)
    except UserError as exc:
        print(f"exitplan: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("exitplan: interrupted", file=sys.stderr)
        return 130
    return int(code if code is not None else ExitCode.OK)


def run() -> None:
    """The `exitplan` console script: `main`, then the process's exit.

    Before the interpreter ends, everything still alive is frozen out of the cyclic collector
    (`gc.freeze`): its finalisation runs a full collection over every object the process holds
    (SQLAlchemy's, botocore's, pydantic's: a few hundred thousand), about 0.13 s of CPU, a tenth
    of a one-object run's (bench/README.md). Every resource is closed by then (the commands close
    what they open); the atexit handlers (logging's flush among them) still run, and reference
    counting still frees what it frees. Not in `main`, which tests call in their own process."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
