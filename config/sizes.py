"""Byte sizes written the way people write them in YAML: 16MiB, 5GiB, 1.5TB, 1048576."""

from __future__ import annotations

import re
from typing import Annotated, Mapping

from pydantic import BeforeValidator, PlainSerializer

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """`16MiB` → 16777216. Integers are bytes. Raises ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 16MiB, 5GiB or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _PATTERN.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f"{value!r} is not a size; write it like 16MiB, 5GiB, 1TB or a number of bytes")


def format_size(n: int | float) -> str:
    """1536 → '1.5 KiB'; for messages and reports."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def classes_text(classes: Mapping[str | None, tuple[int, int]], default: str = "default") -> str:
    """Objects and bytes by the storage class they land in, named classes first, None (the
    bucket's default class) as `default`: "STANDARD_IA 3 (1.0 MiB), default 12 (5.0 MiB)"."""
    return ", ".join(f"{c or default} {n:,} ({format_size(b)})"
                     for c, (n, b) in sorted(classes.items(), key=lambda item: (item[0] is None, item[0] or "")))


def not_carried_lines(counts: Mapping[str, tuple[int, int]]) -> list[str]:
    """What a listing named that is not carried, one "N (size) reason" per reason, in reason order:
    the same words in the CLI, `status`, the summary artifact and the report."""
    return [f"{objects:,} ({format_size(size)}) {reason}" for reason, (objects, size) in sorted(counts.items())]


ByteSize = Annotated[int, BeforeValidator(parse_size), PlainSerializer(int)]
