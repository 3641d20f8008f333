"""`exitplan probe`: measure each destination bucket against its provider profile before the first
migration (engine/probe.py). Exit code 0 when every bucket can hold a migration as configured, 1 when
one cannot (the table says which check failed and why), 2 configuration, 3 refused by the gate."""

from __future__ import annotations

import argparse
import json
import sys

from config.errors import ExitCode
from config.loader import load_config
from flows.terminal import print_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="measure what a destination bucket does (ETags, multipart API, limits, TLS, "
                                     "clock, speed) and compare it with the provider profile")
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the exitplan YAML configuration")
    p.add_argument("--destination", "-D", action="append", default=[], metavar="NAME",
                   help="only this destination (repeatable; default: every S3 destination in the config)")
    p.add_argument("--throughput-mib", type=int, default=None, metavar="N",
                   help="MiB sent as parallel parts to measure throughput (default: 10; at least two parts of the "
                        "provider's minimum part size)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.set_defaults(func=cmd_probe)


def cmd_probe(args: argparse.Namespace) -> int:
    from engine.probe import DEFAULT_THROUGHPUT_MIB, ProbeInterrupted, probe_destinations

    loaded = load_config(args.config)  # the sovereignty gate runs here: no request before it
    quiet = args.json or not sys.stderr.isatty()

    def step(destination: str, check: str) -> None:
        if not quiet:
            print(f"\rprobing {destination}: {check:<24}", end="", file=sys.stderr, flush=True)

    try:
        reports = probe_destinations(loaded, args.destination or None,
                                     throughput_mib=args.throughput_mib or DEFAULT_THROUGHPUT_MIB, step=step)
    except ProbeInterrupted as exc:
        print(f"\nexitplan: {exc}", file=sys.stderr)
        return 130
    if not quiet:
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
    if args.json:
        json.dump([r.as_dict() for r in reports], sys.stdout, indent=2)
        print()
    else:
        for report in reports:
            print_probe_report(report)
    return max((r.exit_code for r in reports), default=ExitCode.OK)


def print_probe_report(report) -> None:
    """The table, the notes of the rows that are not `ok`, the overrides to paste, the verdict."""
    print(f"destination `{report.destination}`: provider {report.provider}, bucket {report.bucket} at "
          f"{report.endpoint} (probed under {report.prefix}, {report.seconds:.1f} s)\n")
    print_table(["check", "measured", "catalog says", "verdict"],
                [[c.check, c.measured, c.catalog, c.verdict] for c in report.checks], left_columns=4)
    notes = [c for c in report.checks if c.note and c.verdict != "ok"]
    if notes:
        print()
        for c in notes:
            print(f"  {c.check} ({c.verdict}): {c.note}")
    if report.suggested_overrides:
        print("\nsuggested provider_overrides (paste into the configuration, then probe again):\n")
        print("  " + report.overrides_yaml().rstrip("\n").replace("\n", "\n  "))
    for left in report.left_behind:
        print(f"\nleft behind: {left}", file=sys.stderr)
    print("\n" + ("the bucket can hold a migration as configured" if report.safe else
                  "the bucket CANNOT hold a migration safely as configured (see the FAIL rows)") + "\n")
