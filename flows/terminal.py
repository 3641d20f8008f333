"""What the CLI's commands print alike: aligned tables, the audit manifest's outcome, and what a
dataset still lacks to be complete (verify, restore, status).

A leaf: it imports nothing of exitplan, so every command module can use it.
"""

from __future__ import annotations

import sys


def print_table(headers: list[str], rows: list[list[str]], *, left_columns: int = 1) -> None:
    """A plain aligned table: the first `left_columns` columns (names, words) left-aligned, the
    figures right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells) -> str:
        return "  ".join(str(c).ljust(w) if i < left_columns else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))


def print_estimate_basis(lines: list[str]) -> None:
    """What each figure of the dry run's estimate assumes and where each price comes from, one line
    each (`engine.estimate.detail_lines`), printed above the tables so that `--summary`, which leaves
    them out, ends with the same tables."""
    print("estimate: what the figures of the table at the end rest on")
    for line in lines:
        print(f"  {line}")
    print()


def print_estimate(headers: list[str], rows: list[list[str]]) -> None:
    """The dry run's estimate table (`engine.estimate.table_rows`)."""
    print("\nestimate (EUR excluding VAT; duration and one-off costs of what would be written now, storage per month "
          "of what the destination would hold):")
    print_table(headers, rows)


def print_audit_outcome(a) -> None:
    """What a run appended to the audit manifest, and where its copies went (migrate and verify)."""
    print(f"audit manifest: {a.manifest} ({a.records:,} records this run, run end "
          f"{'signed' if a.signed else 'NOT signed (no audit key)'}; last record hash {a.last_hash})")
    if a.interrupted:
        runs = ", ".join(str(r) for r in a.interrupted)
        print(f"  recorded as interrupted (started, never ended): run{'s' if len(a.interrupted) > 1 else ''} {runs}")
    for repair in a.repairs:
        print(f"  repaired and recorded: {repair}")
    for copy in a.copies:
        print(f"  copied next to the data: {copy}")
    for note in a.notes:
        print(f"  {note}", file=sys.stderr)


def print_incomplete(status, *, only_missing: bool = False) -> None:
    """On stderr, why a dataset (`engine.state.DatasetStatus`) is not complete: its sentence, then
    each object named with its status and reason (the first of each kind), the rest counted.
    `only_missing`: name only the objects that never arrived (a restore brought back the others)."""
    if status.complete:
        return
    print(status.sentence(), file=sys.stderr)
    named = status.missing() if only_missing else status.not_verified()
    for e in named:
        print(f"  {e.category:<18} {e.source_key!r}: {e.reason}", file=sys.stderr)
    kinds = {e.category for e in named}
    more = sum(n.objects - len(n.examples) for c, n in status.counts.items() if c in kinds)
    if more > 0:
        print(f"  … and {more:,} more (`exitplan status --dataset {status.dataset} --examples N` names more)",
              file=sys.stderr)
