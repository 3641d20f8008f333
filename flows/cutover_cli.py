"""`exitplan cutover --config F --dataset N`: the last step of a dataset's exit (engine/cutover.py):
a last delta, a deep verify, the source found unchanged since, then a signed `cutover` record in
the audit manifest. Exit code 0 when the dataset was cut over, 1 when a step found it not ready
(the sentence says which and why, and names the objects), 2 configuration, 3 refused by the gate,
4 key/KMS."""

from __future__ import annotations

import argparse
import sys

from config.errors import ExitCode
from config.loader import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cutover", help="the last step of a dataset's exit: a last delta, a deep verify, a check that "
                                       "the source has not changed since, then a signed cutover record")
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the exitplan YAML configuration")
    p.add_argument("--dataset", "-d", required=True, action="append", metavar="NAME",
                   help="the dataset to cut over (repeatable: each is cut over on its own, in order)")
    p.set_defaults(func=cmd_cutover)


def cmd_cutover(args: argparse.Namespace) -> int:
    from engine.cutover import cutover
    from flows.commands import _CliObserver

    loaded = load_config(args.config)
    code = ExitCode.OK
    for dataset in loaded.chosen_datasets(args.dataset):
        result = cutover(loaded, dataset, observer=_CliObserver(), say=lambda line: print(line, flush=True))
        stream = sys.stdout if result.ok else sys.stderr
        print(f"{dataset}: {result.sentence}", file=stream)
        for line in result.named:
            print(f"  {line}", file=stream)
        for note in result.notes:
            print(f"{dataset}: {note}", file=sys.stderr)
        if result.ok:
            record = result.record or {}
            print(f"{dataset}: objects_sha256 {record.get('objects_sha256')}; `exitplan audit verify` checks the "
                  "record's signature")
        else:
            code = ExitCode.FAILED
    return code
