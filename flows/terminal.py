"""What the CLI's commands print alike: aligned tables and the audit manifest's outcome.

A leaf: it imports nothing of exitplan, so every command module can use it.
"""

from __future__ import annotations

import sys


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A plain aligned table: the first column left-aligned, the figures right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))


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
