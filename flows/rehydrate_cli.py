"""`exitplan rehydrate --config F [--dataset N]... [--tier hot|cool|cold] [--priority standard|high]
[--wait [--poll S] [--timeout H]] [--dry-run] [--json]`: ask Azure to rehydrate the Archive-tier
blobs of the datasets, and with `--wait` wait until they are readable (engine/rehydrate.py). Exit
code 0 when every request was accepted (with `--wait`: every blob is readable), 1 when a request
was refused or the wait ended with blobs still archived (named), 2 configuration or usage."""

from __future__ import annotations

import argparse
import json
import sys

from config.errors import ExitCode, UserError
from config.loader import load_config
from config.sizes import format_size
from flows.terminal import print_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rehydrate", help="ask Azure to bring the datasets' Archive-tier blobs back online (and wait "
                                         "for it), so that the next migrate copies them")
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the exitplan YAML configuration")
    p.add_argument("--dataset", "-d", action="append", default=[], metavar="NAME",
                   help="only this dataset (repeatable; default: every dataset read from Azure)")
    p.add_argument("--tier", choices=["hot", "cool", "cold"], default="hot",
                   help="the online tier to rehydrate to (default hot; it decides the storage class the copy lands "
                        "in through tier_classes)")
    p.add_argument("--priority", choices=["standard", "high"], default="standard",
                   help="Azure's rehydration priority: standard (up to 15 hours) or high (about an hour for blobs "
                        "under 10 GB, at a higher price; see the dry run's estimate)")
    p.add_argument("--wait", action="store_true", help="list again every --poll seconds until no blob is left in "
                                                       "the Archive tier")
    p.add_argument("--poll", type=float, default=600, metavar="SECONDS", help="with --wait: seconds between "
                                                                              "listings (default 600)")
    p.add_argument("--timeout", type=float, default=24, metavar="HOURS", help="with --wait: give up after this "
                                                                              "long (default 24)")
    p.add_argument("--dry-run", action="store_true", help="count the Archive blobs, ask for nothing")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_rehydrate)


def cmd_rehydrate(args: argparse.Namespace) -> int:
    from engine.estimate import format_duration
    from engine.rehydrate import PRIORITIES, TIERS, azure_datasets, rehydrate, wait_readable

    if args.wait and args.dry_run:
        raise UserError("--wait goes without --dry-run (a dry run asks for nothing to wait for)", ExitCode.USAGE)
    if args.poll <= 0 or args.timeout <= 0:
        raise UserError("--poll and --timeout must be positive", ExitCode.USAGE)
    loaded = load_config(args.config)
    datasets, others = azure_datasets(loaded, loaded.chosen_datasets(args.dataset), named=bool(args.dataset))
    for name in others:
        print(f"dataset `{name}`: not read from Azure Blob Storage, nothing to rehydrate", file=sys.stderr)
    tier, priority = TIERS[args.tier], PRIORITIES[args.priority]

    def progress(found, waited: float) -> None:
        left = sum(f.archived.objects for f in found)
        size = sum(f.archived.bytes for f in found)
        print(f"after {format_duration(waited)}: {left:,} blob(s) ({format_size(size)}) still in the Archive tier",
              file=sys.stderr, flush=True)

    if args.wait:
        found = wait_readable(loaded, datasets, tier=tier, priority=priority, poll=args.poll,
                              timeout=args.timeout * 3600, progress=progress)
    else:
        found = rehydrate(loaded, datasets, tier=tier, priority=priority, dry_run=args.dry_run)
    if args.json:
        json.dump([f.as_dict() for f in found], sys.stdout, ensure_ascii=False, indent=2)
        print()
    else:
        _print(found, args, tier, priority)
    refused = any(f.failed.objects for f in found)
    left = args.wait and any(f.archived.objects for f in found)
    return ExitCode.FAILED if refused or left else ExitCode.OK


def _print(found, args: argparse.Namespace, tier: str, priority: str) -> None:
    def cell(t) -> str:
        return f"{t.objects:,} ({format_size(t.bytes)})"

    asked = "would ask" if args.dry_run else "asked now"
    print_table(["dataset", "in Archive", asked, "rehydrating", "refused", "copied before archived"],
                [[f.dataset, cell(f.archived), cell(f.requested), cell(f.pending), cell(f.failed), cell(f.copied)]
                 for f in found])
    if any(f.copied.objects for f in found):
        print("copied before archived: the state holds their copy with the ETag and size they have now; not asked "
              "for (migrate counts them unchanged)")
    for f in found:
        for key, reason in f.failures:
            print(f"{f.dataset}: refused: {key!r}: {reason}")
        if f.failed.objects > len(f.failures):
            print(f"{f.dataset}: … and {f.failed.objects - len(f.failures):,} more refused")
    archived = sum(f.archived.objects for f in found)
    if args.dry_run:
        print(f"\ndry run: nothing was asked; `exitplan rehydrate --config {args.config}` would ask for "
              f"{sum(f.requested.objects for f in found):,} blob(s) to be rehydrated to {tier} at {priority} priority.")
    elif archived == 0:
        print(f"\nno blob is left in the Archive tier: `exitplan migrate --config {args.config}` copies them all.")
    elif args.wait:
        print(f"\n{archived:,} blob(s) still in the Archive tier after the wait: run `exitplan rehydrate --wait` again "
              "later, or check the refusals above.")
    else:
        print(f"\n{archived:,} blob(s) are being rehydrated to {tier} ({priority} priority, up to "
              f"{'15 hours' if priority == 'Standard' else 'about an hour'}): migrate refuses them by name until they "
              "are readable, then copies them; `--wait` waits for that.")
