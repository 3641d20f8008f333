"""The working commands of the CLI: inventory, migrate, restore, cleanup, demo. Thin: the work is in `engine/`."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Mapping
from pathlib import Path

from config.bandwidth import EXAMPLE as BANDWIDTH_EXAMPLE, BandwidthTimetable, parse_bandwidth
from config.errors import ExitCode, UserError
from config.lab import SEED_PROFILES
from config.loader import load_config
from config.models import LoadedConfig
from config.policy import check_sovereignty
from config.sizes import classes_text, format_size, not_carried_lines
from flows import keys_cli, lab
from flows.progress import ProgressDisplay, RestoreDisplay
from flows.terminal import print_audit_outcome, print_estimate, print_estimate_basis, print_incomplete, print_table


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the exitplan YAML configuration")
    p.add_argument(
        "--dataset", "-d", action="append", default=[], metavar="NAME",
        help="only this dataset (repeatable; default: every dataset in the config)",
    )


def _add_bwlimit(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--bwlimit", metavar="RATE|TIMETABLE",
                   help=f"bytes per second of the {what}, across every thread: a rate (20M) or a timetable in "
                        f"`transfer.bandwidth_timezone` (\"08:00,50M 19:00,off\"); overrides `transfer.bandwidth`")


def _bwlimit(args: argparse.Namespace) -> BandwidthTimetable | None:
    """The `--bwlimit` given, read; a `UserError` (exit 2) naming the flag and an example otherwise."""
    if args.bwlimit is None:
        return None
    try:
        return parse_bandwidth(args.bwlimit)
    except ValueError as exc:
        raise UserError(f"--bwlimit {args.bwlimit!r}: {exc}; write a rate or a timetable such as "
                        f"{BANDWIDTH_EXAMPLE}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inventory", help="list what each dataset holds and what will not fit the destination")
    _add_config(p)
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.set_defaults(func=cmd_inventory)

    p = sub.add_parser("migrate", help="copy the datasets to their destinations, verified part by part")
    _add_config(p)
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be written (objects, bytes, parts, destination keys); write nothing anywhere")
    p.add_argument("--summary", action="store_true",
                   help="with --dry-run: only the table per dataset, not a line per object (refused objects "
                        "are still named)")
    p.add_argument("--delete-removed", action="store_true",
                   help="delete the destination copies of objects that are gone from the source since they were "
                        "copied (default: only report them)")
    _add_bwlimit(p, "uploads")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("restore", help="read a dataset back from its destination, decrypt it, write the plaintext to a directory")
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the exitplan YAML configuration")
    p.add_argument("--dataset", "-d", required=True, metavar="NAME", help="the dataset to restore")
    p.add_argument("--prefix", default="", metavar="P", help="only objects whose key (below the dataset's prefix) starts with P")
    p.add_argument("--to", required=True, metavar="DIR",
                   help="where to write the plaintext (the only place exitplan ever writes plaintext): a local "
                        "directory, or sftp://ENDPOINT/DIR, a directory below the root of an SFTP source or "
                        "destination of the configuration; links below it are never followed, files are "
                        "created 0600 and directories 0700")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files already at objects' names under DIR (default: such an object fails and is "
                        "named; nothing there is touched)")
    _add_bwlimit(p, "downloads")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("cleanup", help="list multipart uploads under the destination prefixes that no state refers to, "
                                       "and the temporary files killed runs left on SFTP destinations; abort and "
                                       "remove them with --abort")
    _add_config(p)
    p.add_argument("--abort", action="store_true",
                   help="abort the uploads listed and remove the temporary files listed (default: only list them; "
                        "uploads the state refers to, and temporary files touched within the hour, are never touched)")
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("demo", help="start the lab, seed it, migrate and deep-verify every lab dataset, write the report")
    p.add_argument("--profile", choices=SEED_PROFILES, default="standard",
                   help="seed profile (default: standard, about 0.6 GiB)")
    p.set_defaults(func=cmd_demo)


# ---------------------------------------------------------------------------------------------
# inventory
# ---------------------------------------------------------------------------------------------


def cmd_inventory(args: argparse.Namespace) -> int:
    from engine.inventory import inventory

    loaded = load_config(args.config)
    results = inventory(loaded, loaded.chosen_datasets(args.dataset))
    if args.format == "json":
        json.dump([r.as_dict() for r in results], sys.stdout, ensure_ascii=False, indent=2)
        print()
    elif args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(["dataset", "source", "destination", "objects", "bytes", "largest_key", "largest_size",
                    "without_md5", "not_hot", "misfits", "directory_markers", "not_restorable_as_files",
                    "not_carried_objects", "not_carried_bytes"])
        for r in results:
            w.writerow([r.dataset, r.source, r.destination, r.objects, r.bytes, r.largest_key or "", r.largest_size,
                        r.without_md5, r.not_hot, r.misfit_count, r.directory_markers, r.unrestorable_count,
                        sum(n for n, _ in r.not_copied.values()), sum(b for _, b in r.not_copied.values())])
    else:
        _print_inventory_table(results)
    return ExitCode.OK


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
        _print_listed_from(r.dataset, r.listed_from, r.not_copied)
        if r.tiers and set(r.tiers) != {"Hot"}:
            print("  tiers: " + ", ".join(f"{t} {n:,}" for t, n in sorted(r.tiers.items()))
                  + " (a tier other than Hot is kept as exitplan metadata)")
        print_classes(f"  {r.dataset}", r.classes, "will land")
        if r.earlier_states:
            print("  earlier states carried as objects of their own (history: all, under .exitplan-history/): "
                  + ", ".join(f"{kind} {n:,}" for kind, n in sorted(r.earlier_states.items())))
        if set(r.kinds) - {"block"}:
            print("  blob kinds: " + ", ".join(f"{k} {n:,}" for k, n in sorted(r.kinds.items()))
                  + " (bytes copied as read, page blobs' empty ranges as zeros; the kind kept as exitplan metadata)")
        for key, reason in r.misfits:
            print(f"  will not fit: {key!r}: {reason}")
        if r.misfit_count > len(r.misfits):
            print(f"  … and {r.misfit_count - len(r.misfits):,} more that will not fit")
        if r.directory_markers:
            print(f"  directory markers: {r.directory_markers:,} (carried as they are; restore makes directories of them)")
        for key, reason in r.unrestorable:
            print(f"  carried, but not restorable as a file: {key!r}: {reason}")
        if r.unrestorable_count > len(r.unrestorable):
            print(f"  … and {r.unrestorable_count - len(r.unrestorable):,} more carried but not restorable as files")


# ---------------------------------------------------------------------------------------------
# migrate
# ---------------------------------------------------------------------------------------------


class _CliObserver:
    """Feeds a `ProgressDisplay` from the engine's run observer calls."""

    def __init__(self) -> None:
        self.display = ProgressDisplay()

    def counting(self, dataset: str, objects: int, bytes_total: int) -> None:
        self.display.counting(dataset, objects, bytes_total)

    def dataset_started(self, dataset: str, objects: int, bytes_total: int) -> None:
        self.display.start(dataset, objects, bytes_total)

    def dataset_counted(self, dataset: str, objects: int, bytes_total: int) -> None:
        self.display.counted(dataset, objects, bytes_total)

    def progress(self, snapshot) -> None:
        self.display.update(snapshot.bytes_done, snapshot.objects_done, snapshot.objects_failed,
                            bytes_skipped=snapshot.bytes_skipped, objects_skipped=snapshot.objects_skipped,
                            throttling=snapshot.throttling)

    def dataset_finished(self, summary) -> None:
        # Every byte has gone through: copied, or unchanged, failed or refused (named in the summary).
        self.display.update(summary.bytes_copied, summary.ok + summary.skipped, summary.failed,
                            bytes_skipped=summary.bytes_total - summary.bytes_copied,
                            objects_skipped=summary.skipped, force=True)
        self.display.finish()


def cmd_migrate(args: argparse.Namespace) -> int:
    from engine.endpoints import OpenedAhead

    loaded = load_config(args.config)
    datasets = loaded.chosen_datasets(args.dataset)
    if args.summary and not args.dry_run:
        raise UserError("--summary goes with --dry-run (a migration prints its summary anyway)")
    bandwidth = _bwlimit(args)
    if args.dry_run:
        return _dry_run(loaded, datasets, summary_only=args.summary)
    # SSH logins to the run's SFTP servers start now and wait on the servers while the engine is
    # imported (a fifth of a second) and the run checks its keys; the run takes them over.
    with OpenedAhead(loaded, datasets) as ahead:
        from engine import run

        observer = _CliObserver()
        # Totals for an ETA cost a listing pass: worth it for a person watching, not for a log.
        result = run.migrate(loaded, datasets, observer, count_first=observer.display.tty,
                             delete_removed=args.delete_removed, bandwidth=bandwidth, ahead=ahead)
    print_migration_summary(result)
    return ExitCode.OK if result.all_ok else ExitCode.FAILED


def _dry_run(loaded: LoadedConfig, datasets: list[str], *, summary_only: bool = False) -> int:
    from engine.estimate import HEADERS, detail_lines, table_rows
    from engine.plan import plan_with_estimate

    def show(dataset: str, planned) -> None:
        if summary_only and planned.action != "refuse":
            return
        if planned.action == "write":
            how = "1 PUT" if planned.single_put else f"{planned.parts} parts"
            how += f", {planned.storage_class}" if planned.storage_class else ""
            print(f"would write  {dataset}: {planned.dest_key}  ({format_size(planned.output_size)}, {how})")
        elif planned.action == "skip":
            print(f"would skip   {dataset}: {planned.source_key}  ({planned.reason})")
        else:
            print(f"would refuse {dataset}: {planned.source_key}  ({planned.reason})")

    summaries, estimate = plan_with_estimate(loaded, datasets, show)
    print()
    if not summary_only:
        print_estimate_basis(detail_lines(estimate))
    for verdict in check_sovereignty(loaded):
        if verdict.catalog_file and any(loaded.config.datasets[d].destination == verdict.name for d in datasets):
            print(f"destination `{verdict.name}`: {verdict.catalog_file.sentence()}")
    print_table(
        ["dataset", "objects", "size", "written", "requests", "multipart", "skipped", "refused", "destination"],
        [[s.dataset, f"{s.objects:,}", format_size(s.bytes), format_size(s.output_bytes), f"{s.parts:,}",
          f"{s.multipart_objects:,}", f"{s.skipped:,}", f"{s.refused:,}", _where_to(loaded, s.dataset)]
         for s in summaries],
    )
    for s in summaries:
        _print_listed_from(s.dataset, s.listed_from, s.not_copied)
        print_classes(s.dataset, s.classes, "would land")
    print_estimate(HEADERS, table_rows(estimate))
    print("\ndry run: nothing was written (no object, no multipart upload, no state).")
    return ExitCode.OK


def _print_listed_from(dataset: str, listed_from: str | None, not_copied: Mapping[str, tuple[int, int]]) -> None:
    """Say that a dataset's plan comes from an inventory report, not a live listing, and what its
    listing named that is not carried (snapshots, earlier versions, report rows that are no objects)."""
    if listed_from is not None:
        print(f"\n{dataset}: from {listed_from}, not a live listing: objects created since are not in it, and each "
              "object is read pinned to the report's ETag (changed since: re-read at its current version; deleted "
              "since: named as failed)")
    print_not_carried(dataset, not_copied)


def print_not_carried(dataset: str, not_carried: Mapping[str, tuple[int, int]]) -> None:
    """One line per reason: what a dataset's listing named that is not carried, objects and bytes."""
    for line in not_carried_lines(not_carried):
        print(f"{dataset}: not carried: {line}")


def print_classes(dataset: str, classes: Mapping[str | None, tuple[int, int]], verb: str) -> None:
    """The storage classes a dataset's objects land in (objects and bytes), when any is named;
    nothing when every object lands in the bucket's default class."""
    if any(c is not None for c in classes):
        print(f"{dataset}: {verb} in storage classes: {classes_text(classes, 'the bucket default')}")


def _where_to(loaded: LoadedConfig, dataset: str) -> str:
    ds = loaded.config.datasets[dataset]
    dest = loaded.config.destinations[ds.destination]
    return f"{dest.provider}:{dest.bucket}/{ds.dest_prefix}"


def print_migration_summary(result) -> None:
    fs = format_size
    rows = []
    for s in result.summaries:
        rate = s.bytes_copied / s.elapsed_seconds / 1e6 if s.elapsed_seconds > 0 else 0.0
        rows.append([s.dataset, f"{s.objects:,}", f"{s.ok:,}", f"{s.skipped:,}", f"{s.failed:,}", fs(s.bytes_copied),
                     fs(s.bytes_sent), f"{s.parts:,}", f"{rate:.1f}", f"{s.elapsed_seconds:.1f}"])
    print()
    print_table(["dataset", "objects", "copied", "unchanged", "failed", "size", "sent", "requests", "MB/s", "seconds"], rows)
    copied = sum(s.ok for s in result.summaries)
    moved = sum(s.bytes_copied for s in result.summaries)
    rate = moved / result.elapsed_seconds / 1e6 if result.elapsed_seconds else 0.0
    print(f"\n{copied:,} objects, {fs(moved)} copied in {result.elapsed_seconds:.1f} s ({rate:.1f} MB/s).")
    retried = sum(s.requests_retried for s in result.summaries)
    resent = sum(s.bodies_resent for s in result.summaries) + result.bodies_resent_by_sdk
    if retried or resent:
        print(f"recovered from faults: {resent:,} parts or objects re-sent ({result.bodies_resent_by_sdk:,} by the S3 "
              f"SDK's own retries), {retried:,} requests retried by exitplan.")
    opaque = [s.dataset for s in result.summaries if result.destinations[s.dataset].provider.multipart.etag == "opaque"]
    etags = "the destination ETag verified" if not opaque else "the destination ETag verified where ETags are MD5s"
    print(f"checked: every copied object's size and plaintext SHA-256 recorded, every part's Content-MD5 and {etags}; "
          f"{result.md5_checked:,} matched the source's stored Content-MD5.")
    if opaque:
        print(f"ETags are opaque at the destination of {', '.join(opaque)} (multipart.etag: opaque): there no ETag "
              "was compared; each write rests on the server accepting its Content-MD5 and on the object's size, and "
              "only `exitplan verify --deep` proves the bytes.")
    restarted = sum(s.uploads_restarted for s in result.summaries)
    if restarted:
        print(f"{restarted:,} object{' was' if restarted == 1 else 's were'} started over: the provider does not list the parts of an upload "
              "(multipart.list_parts: false), so the uploads an earlier run left could not be continued.")
    print("where the data went:")
    by_place: dict[tuple, list[str]] = {}
    for s in result.summaries:
        v = result.destinations[s.dataset]
        by_place.setdefault((v.name, v.bucket, v.region, v.location), []).append(s.dataset)
    for (name, _, region, location), datasets in by_place.items():
        v = result.destinations[datasets[0]]
        p = v.provider
        print(f"  {', '.join(datasets)} -> {v.place} at {p.display_name}, region {region} ({location}); "
              f"operated by {p.legal_entity}, {p.legal_seat}; jurisdiction {p.jurisdiction}")
        if v.catalog_file:
            print(f"    {v.catalog_file.sentence()}")
    print("who holds the keys:")
    by_holder: dict[str, list[str]] = {}
    for s in result.summaries:
        by_holder.setdefault(result.key_holders[s.dataset], []).append(s.dataset)
    for holder, datasets in by_holder.items():
        print(f"  {', '.join(datasets)}: {holder}")
    for copy in result.keyset_copies:
        print(f"  wrapped keyset copied next to the data: {copy}")
    for dataset, counts in result.not_carried.items():
        print_not_carried(dataset, counts)
    for r in result.removed:
        if r.not_looked_for:
            print(f"{r.dataset}: {r.not_looked_for}", file=sys.stderr)
        if not r.count:
            continue
        if r.deleted or r.failures:
            print(f"{r.dataset}: {r.count:,} object(s) gone from the source since they were copied; "
                  f"{r.deleted:,} destination copies deleted (--delete-removed)")
        else:
            print(f"{r.dataset}: {r.count:,} object(s) gone from the source since they were copied; their "
                  "destination copies are kept (`--delete-removed` deletes them):")
        for key in r.examples:
            print(f"  {key}")
        if r.count > len(r.examples):
            print(f"  … and {r.count - len(r.examples):,} more")
        for key, reason in r.failures:
            print(f"  could not delete {key!r}: {reason}", file=sys.stderr)
    failures = [(s.dataset, key, reason) for s in result.summaries for key, reason in s.failures]
    if failures:
        print(f"\nfailed objects ({sum(s.failed for s in result.summaries):,}):", file=sys.stderr)
        for dataset, key, reason in failures:
            print(f"  {dataset}: {key!r}: {reason}", file=sys.stderr)
        if any(s.failures_truncated for s in result.summaries):
            print(f"  … more in the state store ({result.state_path}, run {result.run_id})", file=sys.stderr)
    if result.audit:
        print_audit_outcome(result.audit)
    print(f"state: {result.state_path} (run {result.run_id})")


# ---------------------------------------------------------------------------------------------
# restore
# ---------------------------------------------------------------------------------------------


def cmd_restore(args: argparse.Namespace) -> int:
    from engine.restore import restore

    loaded = load_config(args.config)
    (dataset,) = loaded.chosen_datasets([args.dataset])
    bandwidth = _bwlimit(args)
    if args.to.startswith("sftp://"):
        from engine.restore_sftp import sftp_target_opener

        to = sftp_target_opener(loaded, args.to, overwrite=args.overwrite)
    else:
        to = Path(args.to)
    if isinstance(to, Path) and to.exists() and not to.is_dir():
        raise UserError(f"--to {args.to}: exists and is not a directory; name a directory for the restored files")

    from engine.status import restore_shortfall

    status = restore_shortfall(loaded, dataset, args.prefix)
    display = RestoreDisplay(dataset, status.expected if status is not None and status.known else None)

    def show(result) -> None:
        if result.status != "ok":
            display.note(f"failed   {result.dest_key}: {result.reason}")
        display.object_done(result.status == "ok", result.size)

    try:
        summary = restore(loaded, dataset, to, prefix=args.prefix, on_object=show, overwrite=args.overwrite,
                          bandwidth=bandwidth)
    finally:
        display.finish()
    checked = summary.ok - summary.unchecked
    print(f"{dataset}: restored {summary.ok:,} of {summary.objects:,} objects ({format_size(summary.bytes)}) into {args.to}; "
          f"{checked:,} matched the SHA-256 recorded at copy time"
          + (f", {summary.unchecked:,} had no recorded digest (no state for them)" if summary.unchecked else "")
          + (f"; {summary.failed:,} failed" if summary.failed else ""))
    if summary.sidecar:
        print(f"{dataset}: content headers, metadata, tags and source times of the restored objects: {summary.sidecar}")
    if summary.sidecar_problem:
        print(f"{dataset}: {summary.sidecar_problem}", file=sys.stderr)
    code = ExitCode.OK if summary.all_ok and summary.objects else (
        ExitCode.FAILED if summary.failed or summary.sidecar_problem else ExitCode.OK)
    return max(code, _never_arrived(dataset, status))


def _never_arrived(dataset: str, status) -> int:
    """Name the objects a restore could not bring back because no copy is at the destination (the
    dataset's status: failed, pending, never attempted); exit 1 while there are any, or while what
    the dataset must hold is not known. A copy verify found wrong is restored, and judged, by the
    restore itself. `status`: the dataset's (`engine.status.restore_shortfall`), None without state."""
    if status is None:
        print(f"{dataset}: no state here, so what the dataset must hold is not known: only what the destination "
              "holds was restored", file=sys.stderr)
        return ExitCode.OK
    if status.not_at_destination:
        print(f"{dataset}: {status.not_at_destination:,} object(s) of the dataset's newest complete source listing "
              "could not be restored: they never arrived at the destination", file=sys.stderr)
    if status.not_at_destination or not status.known:
        print_incomplete(status, only_missing=True)
        return ExitCode.FAILED
    return ExitCode.OK


# ---------------------------------------------------------------------------------------------
# cleanup
# ---------------------------------------------------------------------------------------------


def cmd_cleanup(args: argparse.Namespace) -> int:
    from engine.cleanup import cleanup

    loaded = load_config(args.config)
    result = cleanup(loaded, loaded.chosen_datasets(args.dataset), abort=args.abort)
    for name in result.unlisted_destinations:
        print(f"destination `{name}`: the provider does not list multipart uploads (multipart.list_uploads: false): "
              "only the uploads the state store recorded as left open are known; one opened by a run killed before "
              "it recorded it, or named by a lost state store, cannot be seen: an AbortIncompleteMultipartUpload "
              "lifecycle rule on the bucket removes those.")
    _print_orphan_uploads(result)
    left = result.temporary
    if left:
        print()
        print_table(["destination", "temporary file", "bytes", "age", "status"],
                    [[t.destination, t.name, f"{t.size:,}", _age_text(t.age_seconds), "removed" if t.removed else "left"]
                     for t in left])
        removed = [t for t in left if t.removed]
        dated = [t for t in left if not t.removed and t.modified is not None]
        undated = [t for t in left if t.modified is None]
        if removed:
            print(f"\nremoved {len(removed):,} temporary files ({sum(t.size for t in removed):,} bytes) that killed "
                  "runs left in SFTP destinations' .exitplan-sftp/tmp/.")
        if dated:
            print(f"\n{len(dated):,} temporary files ({sum(t.size for t in dated):,} bytes) that killed runs left in "
                  "SFTP destinations' .exitplan-sftp/tmp/ (untouched for an hour or more; never under an object's "
                  "name) cost storage until removed: run again with --abort.")
        if undated:
            print(f"\n{len(undated):,} temporary files in SFTP destinations' .exitplan-sftp/tmp/ have no modification "
                  "time the server tells: cleanup cannot know whether a migration is writing them, and leaves them; "
                  "remove them by hand while no migration writes to that server.")
    return ExitCode.OK


def _age_text(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds / 86400:.1f} d" if seconds >= 86400 else f"{seconds / 3600:.1f} h"


def _print_orphan_uploads(result) -> None:
    """The multipart uploads part of `cleanup`'s output (`result`: an `engine.cleanup.CleanupResult`)."""
    found = result.uploads
    if not found:
        print("no multipart upload under the datasets' destination prefixes is unknown to the state."
              if not result.unlisted_destinations else "the state store records no multipart upload left open.")
        return

    def status(o) -> str:
        return "aborted" if o.aborted else "open" if o.abortable else "open (cannot be aborted)"

    print_table(["dataset", "key", "upload id", "age", "status"],
                [[o.dataset, o.key, o.upload_id, _age_text(o.age_seconds), status(o)] for o in found])
    aborted = [o for o in found if o.aborted]
    if aborted:
        print(f"\naborted {len(aborted):,} multipart uploads that no state row referred to"
              + (" or that earlier runs left." if any(o.recorded for o in aborted) else "."))
    unabortable = [o for o in found if not o.abortable]
    if unabortable:
        print(f"\n{len(unabortable):,} multipart uploads cannot be aborted: the provider does not answer "
              "AbortMultipartUpload (multipart.abort: false); they cost storage until the bucket's lifecycle rule "
              "(AbortIncompleteMultipartUpload) removes them.")
    waiting = [o for o in found if o.abortable and not o.aborted]
    if any(not o.recorded for o in waiting):
        print(f"\n{sum(not o.recorded for o in waiting):,} multipart uploads are not referred to by the state (a run "
              "killed right after opening them, or a lost state store); they cost storage until aborted: run again "
              "with --abort.")
    if any(o.recorded for o in waiting):
        print(f"\n{sum(o.recorded for o in waiting):,} multipart uploads were left open by earlier runs (the state "
              "records them); they cost storage until aborted: run again with --abort.")


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


def run_exit_plan_flow(config: str) -> int:
    """Run the `exit_plan` flow on the lab's Prefect server (a flow run visible in its UI); print its
    summary and the run's URL. Exit code 0 when the run completed, 1 when it failed."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, ui = lab.prefect_api_url(), lab.prefect_ui_url()
    if api is None:
        raise UserError("the lab's Prefect server is not running; start the lab with `exitplan lab up`")
    print(f"\n== the exit_plan flow on the lab's Prefect server ({ui}): inventory -> sovereignty gate -> "
          "migrate (shard by shard) -> deep verify -> summary\n", flush=True)
    with temporary_settings(updates={PREFECT_API_URL: api}):
        from flows.orchestrate import exit_plan  # the flows import prefect: only the demo pays for it

        state = exit_plan(config_path=config, return_state=True)
    figures = state.result(raise_on_failure=False)  # a failed run still carries its figures
    summary = figures.get("summary") if isinstance(figures, dict) else None
    print()
    if summary:
        print(summary)
    from prefect.client.orchestration import get_client

    run_id = state.state_details.flow_run_id
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        name = client.read_flow_run(run_id).name
    print(f"\nflow run '{name}': {state.name}, {ui}/runs/flow-run/{run_id}")
    if not state.is_completed():
        print(f"the run did not complete: {state.message}", file=sys.stderr)
        return ExitCode.FAILED
    return ExitCode.OK


def cmd_demo(args: argparse.Namespace) -> int:
    """lab up + seed + the exit_plan flow on the lab's Prefect server + the report, with a fresh
    state of its own."""
    import os
    import shutil
    from importlib import resources

    print("== exitplan demo: the whole exit, rehearsed on the local lab (127.0.0.1 only)\n", flush=True)
    code = lab.cmd_up(argparse.Namespace())
    if code:
        return code
    print(flush=True)
    code = lab.cmd_seed(argparse.Namespace(profile=args.profile, connection_string=None, workers=8))
    if code:
        return code
    # The lab's servers keep data in memory: a state left by an earlier lab would claim objects
    # are already there. The demo's state lives in the lab directory and starts empty, but for its
    # keys: the lab's bucket may hold objects and keyset copies of an earlier demo written with them.
    from engine.keys import KEY_FILE_NAMES

    state_dir = lab.lab_dir() / "demo-state"
    for path in state_dir.iterdir() if state_dir.is_dir() else ():
        if path.name not in KEY_FILE_NAMES:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.environ["EXITPLAN_STATE_DIR"] = str(state_dir)
    # Where the lab's SFTP server, its key and known_hosts are (the SFTP dataset of lab.yaml).
    exports, _ = lab.env_exports(lab.lab_dir())
    os.environ.update({k: v for k, v in exports.items() if k.startswith("EXITPLAN_LAB_SFTP_")})
    config = resources.files("config") / "examples" / "lab.yaml"
    if (state_dir / "keyset.json").exists():
        print(f"\n== keys: the keyset of an earlier demo, kept in {state_dir}\n", flush=True)
    else:
        print(f"\n== keys init --config {config}  (lab KEK: a local key file in the demo's state)\n", flush=True)
        code = keys_cli.cmd_init(argparse.Namespace(config=str(config)))
        if code:
            return code
    code = run_exit_plan_flow(str(config))
    print(
        "\nLook around:\n"
        f"  {lab.prefect_ui_url()}   # the Prefect UI: the flow run, its shards, progress, tables and summary\n"
        f"  {state_dir}/reports/   # the HTML report: where the data is, who holds the keys, the manifest's fingerprint\n"
        f"  {state_dir}/audit/manifest.jsonl   # the signed audit manifest\n"
        f"  exitplan restore --config {config} --dataset imaging --to /tmp/imaging   # bring data back\n"
        f"  eval \"$(exitplan lab env)\"   # point the Azure SDK / boto3 / rclone / prefect at the lab\n"
        "  exitplan lab down   # stop the lab (Azurite and the S3 server keep their data in memory)"
    )
    return code
