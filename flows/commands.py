"""The working commands of the CLI: inventory, migrate, demo. Thin: the work is in `engine/`."""

from __future__ import annotations

import argparse
import csv
import json
import sys

from config.errors import ConfigFileError, ExitCode
from config.loader import load_config
from config.models import LoadedConfig
from config.sizes import format_size


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the exitplan YAML configuration")
    p.add_argument(
        "--dataset", "-d", action="append", default=[], metavar="NAME",
        help="only this dataset (repeatable; default: every dataset in the config)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inventory", help="list what each dataset holds and what will not fit the destination")
    _add_config(p)
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.set_defaults(func=cmd_inventory)


def chosen_datasets(loaded: LoadedConfig, names: list[str]) -> list[str]:
    """The datasets named on the command line (all when none), refusing unknown names."""
    known = list(loaded.config.datasets)
    for name in names:
        if name not in known:
            raise ConfigFileError(f"{loaded.path}: no dataset named {name!r} (datasets: {', '.join(known)}); check --dataset")
    return names or known


# ---------------------------------------------------------------------------------------------
# inventory
# ---------------------------------------------------------------------------------------------


def cmd_inventory(args: argparse.Namespace) -> int:
    from engine.endpoints import destination_limits, open_source
    from engine.inventory import inventory_dataset

    loaded = load_config(args.config)
    results = []
    for name in chosen_datasets(loaded, args.dataset):
        ds = loaded.config.datasets[name]
        source = open_source(loaded, name)
        limits = destination_limits(loaded, ds.destination)
        results.append(inventory_dataset(name, ds, source.list(ds.prefix), limits, source_label=source.label))
    if args.format == "json":
        json.dump([r.as_dict() for r in results], sys.stdout, ensure_ascii=False, indent=2)
        print()
    elif args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(["dataset", "source", "destination", "objects", "bytes", "largest_key", "largest_size",
                    "without_md5", "not_hot", "misfits"])
        for r in results:
            w.writerow([r.dataset, r.source, r.destination, r.objects, r.bytes, r.largest_key or "", r.largest_size,
                        r.without_md5, r.not_hot, r.misfit_count])
    else:
        _print_inventory_table(results)
    return ExitCode.OK


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A plain aligned table: the first column left-aligned, the figures right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))


def _print_inventory_table(results) -> None:
    headers = ["dataset", "objects", "size", "largest", "no MD5", "not hot", "won't fit"]
    rows = [
        [r.dataset, f"{r.objects:,}", format_size(r.bytes), format_size(r.largest_size), f"{r.without_md5:,}",
         f"{r.not_hot:,}", f"{r.misfit_count:,}"]
        for r in results
    ]
    if len(results) > 1:
        rows.append(["total", f"{sum(r.objects for r in results):,}", format_size(sum(r.bytes for r in results)),
                     format_size(max(r.largest_size for r in results)), f"{sum(r.without_md5 for r in results):,}",
                     f"{sum(r.not_hot for r in results):,}", f"{sum(r.misfit_count for r in results):,}"])
    print_table(headers, rows)
    for r in results:
        if r.largest_key:
            print(f"\n{r.dataset}: {r.source} -> {r.destination}; largest object {r.largest_key!r}")
        if r.tiers and set(r.tiers) != {"Hot"}:
            print("  tiers: " + ", ".join(f"{t} {n:,}" for t, n in sorted(r.tiers.items())))
        for key, reason in r.misfits:
            print(f"  will not fit: {key!r}: {reason}")
        if r.misfit_count > len(r.misfits):
            print(f"  … and {r.misfit_count - len(r.misfits):,} more that will not fit")
