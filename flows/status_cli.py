"""`exitplan status --config F [--dataset N]... [--format table|json] [--examples N]`: whether each
dataset is complete, from the state store alone. Thin: the work is in `engine/status.py`.

Per dataset: the objects and bytes it must hold (its newest complete source listing: which run,
when), how many are verified, copied but not verified, failed (permanent / may pass), found wrong
by verify, pending, never attempted, removed at the source since they were copied, the last migrate and verify runs
and their age, and whether it is complete. Exit 0 when every dataset is complete, 1 otherwise,
2 when there is no state yet. Read-only: no state store is created, nothing is contacted.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

from config.errors import ExitCode, UserError
from config.loader import load_config
from config.sizes import format_size, not_carried_lines
from flows.terminal import print_incomplete, print_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="whether each dataset is complete: every object of its source listing at the "
                                      "destination and verified (read from the state only)")
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the exitplan YAML configuration")
    p.add_argument("--dataset", "-d", action="append", default=[], metavar="NAME",
                   help="only this dataset (repeatable; default: every dataset in the config)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--examples", type=int, default=20, metavar="N",
                   help="objects named per kind (failed, pending, never attempted, not verified; default 20)")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from engine import state as st
    from engine.status import dataset_statuses

    loaded = load_config(args.config)
    datasets = loaded.chosen_datasets(args.dataset)
    if args.examples < 0:
        raise UserError(f"--examples {args.examples}: must be 0 or more (the objects named per kind)", ExitCode.USAGE)
    statuses = dataset_statuses(loaded, datasets, examples=args.examples)
    code = ExitCode.OK if all(s.complete for s in statuses) else ExitCode.FAILED
    if args.format == "json":
        json.dump([s.as_dict() for s in statuses], sys.stdout, ensure_ascii=False, indent=2)
        print()
        return code
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    n = lambda s, c: f"{s.count(c).objects:,}"  # noqa: E731
    print_table(
        ["dataset", "expected", "size", "verified", "copied", "failed", "may pass", "found wrong", "pending",
         "never attempted", "removed", "last migrate", "last verify", "complete"],
        [[s.dataset, f"{s.expected:,}", format_size(s.expected_bytes), n(s, st.VERIFIED_COPY), n(s, st.COPIED_COPY),
          n(s, st.FAILED_PERMANENT), n(s, st.FAILED_TRANSIENT), n(s, st.FOUND_WRONG), n(s, st.PENDING_COPY),
          n(s, st.NEVER_ATTEMPTED),
          f"{s.removed_kept + s.removed_deleted:,}", _run(s.last_migrate, now), _run(s.last_verify, now),
          "yes" if s.complete else ("no" if s.known else "not known")] for s in statuses])
    print()
    for s in statuses:
        if s.listing is not None:
            print(f"{s.dataset}: expected = what migrate run {s.listing.run_id} listed "
                  f"({_age(s.listing.through_at, now)}): {s.listing.objects:,} objects, "
                  f"{format_size(s.listing.bytes or 0)}"
                  + (f"; {s.removed_kept:,} gone from the source since they were copied (copies kept)"
                     if s.removed_kept else "")
                  + (f"; {s.removed_deleted:,} removed at the source (copies deleted)" if s.removed_deleted else ""))
            for line in not_carried_lines(s.listing.not_carried_counts):
                print(f"  not carried: {line}")
        if s.cut_over is not None:
            c = s.cut_over
            later = (s.last_migrate is not None and s.last_migrate.run_id > c.run_id)
            print(f"  cut over {_age(c.at, now)} (run {c.run_id}, {c.at:%Y-%m-%d %H:%M}Z): {c.objects:,} objects, "
                  f"{format_size(c.bytes)}, after delta run {c.delta_run} and deep verify run {c.verify_run}; signed "
                  f"record at line {c.manifest_seq + 1} of the audit manifest"
                  + ("; migrate ran again since" if later else ""))
        print(s.sentence())
    for s in statuses:
        print_incomplete(s)
    return code


def _run(r, now: datetime) -> str:
    """A run in a table cell: "7 ok, 2 h ago"."""
    if r is None:
        return "never"
    how = r.run_status if r.went_through or r.run_status != "running" else "running or killed"
    return f"{r.run_id} {how}, {_age(r.started_at, now)}"


def _age(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "?"
    seconds = max((now - when).total_seconds(), 0)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"
