"""What the Prefect UI shows of a run: table rows, markdown summaries and their artifacts.

Rows are plain dicts of figures (they are also what the tasks return, and the flows' results);
the artifact keys follow Prefect's rules. Nothing here decides anything about the run: the figures
come from the engine's results (`engine.shards.ShardOutcome`, `engine.run.MigrationResult`,
`engine.verify`'s result).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact, update_progress_artifact

from config.models import LoadedConfig
from config.sizes import classes_text, format_size, not_carried_lines
from engine.estimate import HEADERS, detail_lines, table_rows
from engine.shards import ShardOutcome, ShardResult, failure_sentence
from engine.state import STATUS_CATEGORIES


def show_progress(artifact_id, percent: float, logger: logging.Logger | logging.LoggerAdapter) -> bool:
    """Set a progress artifact; False, with a warning, when the Prefect API did not take it. A
    progress bar is for display: a run of weeks never stops because the server missed one update
    (the next one tries again; what was copied is in the state store and the run's log)."""
    try:
        update_progress_artifact(artifact_id, percent)
    except Exception as exc:  # noqa: BLE001 - the API's failures are many kinds; each is said
        logger.warning("the progress artifact could not be updated to %.1f%% (%s: %s); the run goes on and the "
                       "next update tries again", percent, type(exc).__name__, exc)
        return False
    return True


def artifact_key(project: str, what: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    raw = f"exitplan-{project}-{what}".lower()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in raw)


@dataclass
class MigrateOutcome:
    """What a migration inside a flow hands to the summary: figures only."""

    project: str
    loaded: LoadedConfig
    datasets: list[str]
    result: Any  # engine.run.MigrationResult
    inventory: list[dict[str, Any]]
    shards: list[dict[str, Any]]
    failures: list[dict[str, str]]
    seconds: float
    report: Path | None = None
    markdown: str = ""

    @property
    def failed_shards(self) -> int:
        return sum(1 for s in self.shards if s["status"] != "ok")


# ---------------------------------------------------------------------------------------------
# Table rows
# ---------------------------------------------------------------------------------------------


def inventory_row(inv) -> dict[str, Any]:
    """One dataset's inventory (`engine.inventory.DatasetInventory`) as a table row."""
    return {"dataset": inv.dataset, "source": inv.source, "destination": inv.destination, "objects": inv.objects,
            "bytes": inv.bytes, "size": format_size(inv.bytes), "largest": format_size(inv.largest_size),
            "without_md5": inv.without_md5, "not_hot": inv.not_hot, "will_not_fit": inv.misfit_count,
            "not_restorable_as_files": inv.unrestorable_count,
            "not_carried": sum(n for n, _ in inv.not_copied.values()),
            "storage_classes": classes_text(inv.classes),
            "listed_from": inv.listed_from or "a live listing"}



def rehydration_row(found) -> dict[str, Any]:
    """One dataset's rehydration pass (`engine.rehydrate.DatasetRehydration`) as a table row."""
    return {"dataset": found.dataset, "still_in_archive": found.archived.objects,
            "size": format_size(found.archived.bytes), "asked_now": found.requested.objects,
            "rehydrating": found.pending.objects, "refused": found.failed.objects,
            "copied_before_archived": found.copied.objects,
            "refusals": "; ".join(f"{key}: {reason}" for key, reason in found.failures[:5])}


def rehydration_artifact(project: str, rows: list[dict[str, Any]]) -> None:
    create_table_artifact(key=artifact_key(project, "rehydration"), table=rows,
                          description="Archive-tier blobs: still archived after the wait, asked for, refused")


def shard_row(result: ShardResult) -> dict[str, Any]:
    """A shard's figures as a row; `_failures` carries its failed objects to the failures table."""
    rate = result.bytes_copied / result.seconds / 1e6 if result.seconds > 0 else 0.0
    # Status and reason first: a long object name in the reason must not push the figures away.
    return {"dataset": result.dataset, "shard": result.shard, "status": "ok" if result.ok else "failed",
            "objects": result.objects, "size": format_size(result.bytes), "copied": result.copied,
            "unchanged": result.unchanged, "failed": result.failed, "bytes_copied": result.bytes_copied,
            "seconds": round(result.seconds, 1), "mb_per_s": round(rate, 1), "attempts": result.attempt,
            "reason": "" if result.ok else failure_sentence(result),
            "_failures": [(key, reason, key in result.transient_keys) for key, reason in result.failures]}


def ended_shard_row(outcome: ShardOutcome) -> dict[str, Any]:
    """A row of the run's shards table: the shard's figures, how its task ended, and where it ran."""
    row = shard_row(outcome.result)
    row.update(status=outcome.status, reason=outcome.reason, worker=outcome.worker)
    return row


def plan_rows(summaries) -> list[dict[str, Any]]:
    """A dry run's table (`engine.dataset_copy.DryRunSummary` per dataset)."""
    return [{"dataset": s.dataset, "objects_to_write": s.objects, "size": format_size(s.bytes), "bytes": s.bytes,
             "written": format_size(s.output_bytes), "requests": s.parts, "multipart": s.multipart_objects,
             "unchanged": s.skipped, "refused": s.refused, "storage_classes": classes_text(s.classes),
             "refusals": "; ".join(f"{key}: {reason}" for key, reason in s.refusals[:5])} for s in summaries]


def verify_figures(result) -> dict[str, Any]:
    """A verify run's figures (`engine.verify`'s result): the datasets' rows, the discrepancies,
    and whether each dataset is complete (its status row, the objects not verified, and a sentence
    for each dataset that is not)."""
    return {
        "run_id": result.run_id, "mode": result.mode, "seed": result.seed,
        "datasets": [{"dataset": d.dataset, "objects": d.objects, "ok": d.ok, "failed": d.failed,
                      "read_back": d.deep_checked, "bytes_read": d.bytes_read, "unknown": d.unknown,
                      "expected": d.status.expected, "verified": d.status.verified,
                      "never_arrived": d.status.never_arrived, "complete": d.complete,
                      "etags_opaque": d.etags_opaque}
                     for d in result.datasets],
        "discrepancies": [{"dataset": x.dataset, "object": x.dest_key, "source": x.source_key, "kind": x.kind,
                           "expected": x.expected, "found": x.found}
                          for d in result.datasets for x in d.discrepancies],
        "status": [status_row(d.status) for d in result.datasets],
        "not_verified": [{"dataset": d.dataset, "object": e.source_key, "status": e.category, "reason": e.reason}
                         for d in result.datasets for e in d.status.not_verified()],
        "incomplete": [d.status.sentence() for d in result.datasets if not d.complete],
        "last_hash": result.audit.last_hash if result.audit else None,
    }


def status_row(status) -> dict[str, Any]:
    """A dataset's completeness (`engine.state.DatasetStatus`) as a row of the status table."""
    row = {"dataset": status.dataset, "complete": "yes" if status.complete else ("no" if status.known else "not known"),
           "expected": status.expected, "size": format_size(status.expected_bytes),
           "listing_run": status.listing.run_id if status.listing else None}
    row.update({category: status.count(category).objects for category in STATUS_CATEGORIES})
    row["removed_at_source"] = status.removed_kept + status.removed_deleted
    row["not_known_because"] = "; ".join(status.unknown)
    return row


# ---------------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------------


# Whether running again can help an object that failed, by whether its cause may pass.
RERUN = {True: "may pass: the next run tries it again",
         False: "permanent: fix it at the source (or exclude it), then migrate"}


def shard_artifacts(project: str, run_id: int, ended: tuple[ShardOutcome, ...]
                    ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The shards table and, when objects failed, the failures table (each with its reason);
    returns their rows."""
    rows = [ended_shard_row(o) for o in ended]
    # The reason before the object: keys can be 1,024 bytes long and would push it off-screen.
    failures = [{"reason": reason, "again": RERUN[transient], "dataset": r["dataset"], "shard": str(r["shard"]),
                 "object": key} for r in rows for key, reason, transient in r.pop("_failures", ())]
    create_table_artifact(rows, key=artifact_key(project, "shards"), description=f"Shards of run {run_id}: one task each")
    if failures:
        create_table_artifact(failures, key=artifact_key(project, "failures"),
                              description=f"Objects that failed in run {run_id}, with the reason")
    return rows, failures


def verify_artifacts(project: str, checked: dict[str, Any]) -> None:
    """The verification table, the status table (whether each dataset is complete) and, when there
    are any, the discrepancies and the objects not verified, each with its reason."""
    create_table_artifact(checked["datasets"], key=artifact_key(project, "verify"),
                          description=f"Verification ({checked['mode']}), run {checked['run_id']}")
    create_table_artifact(checked["status"], key=artifact_key(project, "status"),
                          description="Whether each dataset is complete: every object of its newest complete source "
                                      "listing at the destination and verified")
    if checked["discrepancies"]:
        create_table_artifact(checked["discrepancies"], key=artifact_key(project, "discrepancies"),
                              description="Objects whose destination copy differs from what was recorded")
    if checked["not_verified"]:
        create_table_artifact(checked["not_verified"], key=artifact_key(project, "not-verified"),
                              description="Objects a dataset must hold that are not verified (the first of each kind)")


def summary_artifact(outcome: MigrateOutcome, gate: list[dict[str, str]], checked: dict[str, Any] | None) -> None:
    """The run's summary (kept in `outcome.markdown` for the flow's result) as a markdown artifact."""
    outcome.markdown = summary_markdown(outcome, gate, checked)
    create_markdown_artifact(outcome.markdown, key=artifact_key(outcome.project, "summary"),
                             description=f"Summary of run {outcome.result.run_id}")


def verify_summary_artifact(project: str, checked: dict[str, Any]) -> None:
    create_markdown_artifact(verify_markdown(project, checked), key=artifact_key(project, "verify-summary"),
                             description=f"Summary of verify run {checked['run_id']}")


def cutover_artifact(project: str, results: list) -> None:
    """What each cutover of the flow run found (`engine.cutover.CutoverResult`): cut over, with
    its record's digest, or the step that stopped it, its sentence and the objects behind it."""
    lines = [f"# Cutover of {project}", ""]
    for r in results:
        if r.ok:
            record = r.record or {}
            lines += [f"## {r.dataset}: cut over", "", r.sentence, "",
                      f"- objects: {record.get('objects', 0):,}, {format_size(record.get('bytes', 0))}",
                      f"- `objects_sha256`: `{record.get('objects_sha256')}`",
                      "- the signed `cutover` record is in the audit manifest (`exitplan audit verify` checks it)"]
        else:
            lines += [f"## {r.dataset}: not cut over (step: {r.step})", "", r.sentence]
            if r.named:
                lines += [""] + [f"- `{line}`" for line in r.named]
        lines += [f"- note: {note}" for note in r.notes] + [""]
    create_markdown_artifact("\n".join(lines), key=artifact_key(project, "cutover"),
                             description="Cutover: a last delta, a deep verify, the source unchanged, a signed record")


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def summary_markdown(outcome: MigrateOutcome, gate: list[dict[str, str]], checked: dict[str, Any] | None) -> str:
    """The run's summary as markdown (the flow's summary artifact; the demo prints it too)."""
    r = outcome.result
    objects = sum(s.objects for s in r.summaries)
    copied = sum(s.ok for s in r.summaries)
    unchanged = sum(s.skipped for s in r.summaries)
    failed = sum(s.failed for s in r.summaries)
    moved = sum(s.bytes_copied for s in r.summaries)
    total = sum(row["bytes"] for row in outcome.inventory)
    rate = moved / outcome.seconds / 1e6 if outcome.seconds > 0 else 0.0
    lines = [f"# Exit plan `{outcome.project}`: migration run {r.run_id}", ""]
    status = "completed" if r.all_ok and not outcome.failed_shards else "completed with failures"
    lines += [f"**{status}** in {outcome.seconds:.1f} s: {objects:,} objects ({format_size(total)}) listed, "
              f"{copied:,} copied ({format_size(moved)}, {rate:.1f} MB/s), {unchanged:,} unchanged since an "
              f"earlier run, **{failed:,} failed**; {len(outcome.shards)} shard(s), {outcome.failed_shards} failed.", ""]
    if checked is not None:
        ok = sum(d["ok"] for d in checked["datasets"])
        bad = sum(d["failed"] for d in checked["datasets"])
        read = sum(d["read_back"] for d in checked["datasets"])
        lines += [f"**Verified** ({checked['mode']}): {ok:,} objects match what was recorded"
                  + (f", {read:,} read back, decrypted and their SHA-256 compared" if read else "")
                  + f"; **{bad:,} with discrepancies**.", ""]
        lines += completeness_markdown(checked)
    lines += ["## Where the bytes went", "",
              "| dataset | provider | operator | legal seat | jurisdiction | region | bucket or directory | prefix |",
              "|---|---|---|---|---|---|---|---|"]
    for g in gate:
        lines.append(f"| {g['dataset']} | {g['provider']} | {g['operator']} | {g['seat']} | **{g['jurisdiction']}** "
                     f"| {g['region']} | {g.get('place') or g['bucket']} | `{g.get('prefix') or '/'}` |")
    # A provider profile from EXITPLAN_PROVIDERS_DIR: its facts are the operator's, named with the file's hash.
    for profile in sorted({g["profile"] for g in gate if g.get("profile")}):
        lines += ["", f"**{profile}**"]
    lines += ["", "## Who holds the keys", ""]
    by_holder: dict[str, list[str]] = {}
    for g in gate:
        by_holder.setdefault(r.key_holders.get(g["dataset"], ""), []).append(g["dataset"])
    lines += [f"- {', '.join(names)}: {holder}" for holder, names in by_holder.items()]
    lines += ["", "## Datasets", "", "| dataset | objects | copied | unchanged | failed | size copied |",
              "|---|---:|---:|---:|---:|---:|"]
    for s in r.summaries:
        lines.append(f"| {s.dataset} | {s.objects:,} | {s.ok:,} | {s.skipped:,} | {s.failed:,} | "
                     f"{format_size(s.bytes_copied)} |")
    if outcome.failures:
        lines += ["", f"## Failed objects ({len(outcome.failures):,} shown)", ""]
        lines += [f"- `{f['dataset']}` `{f['object']}`: {f['reason']}" for f in outcome.failures[:20]]
    for dataset, counts in r.not_carried.items():
        lines += [""] + [f"{dataset}: **not carried**: {line}" for line in not_carried_lines(counts)]
    for removed in r.removed:
        if removed.count:
            lines += ["", f"{removed.dataset}: {removed.count:,} object(s) gone from the source since they were "
                          f"copied; {removed.deleted:,} destination copies deleted."]
    if r.audit:
        lines += ["", f"Audit manifest: `{r.audit.manifest}`, {r.audit.records:,} records this run, last record hash "
                      f"`{r.audit.last_hash}`" + ("" if r.audit.signed else " (run end NOT signed)") + "."]
    if checked is not None and checked.get("last_hash"):
        lines.append(f"After verification, last record hash `{checked['last_hash']}`.")
    if outcome.report:
        lines += ["", f"HTML report: `{outcome.report}`"]
    lines += ["", f"State: `{r.state_path}`"]
    return "\n".join(lines)


def verify_markdown(project: str, checked: dict[str, Any]) -> str:
    """A verify run as markdown (the verify flow's summary artifact)."""
    ok = sum(d["ok"] for d in checked["datasets"])
    bad = sum(d["failed"] for d in checked["datasets"])
    read = sum(d["read_back"] for d in checked["datasets"])
    how = "listing and metadata of every object" if checked["mode"] == "quick" else (
        f"listing and metadata of every object; {read:,} read back, decrypted and their SHA-256 compared"
        + (f" (sample seed {checked['seed']})" if checked.get("seed") is not None else ""))
    lines = [f"# Verify `{project}`: run {checked['run_id']} ({checked['mode']})", "",
             f"**{ok:,} objects match** what was recorded at copy time, **{bad:,} with discrepancies**; {how}.",
             "The source was not read.", "",
             "| dataset | checked | ok | discrepancies | read back | not in the state |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {d['dataset']} | {d['objects']:,} | {d['ok']:,} | {d['failed']:,} | {d['read_back']:,} | "
              f"{d['unknown']:,} |" for d in checked["datasets"]]
    lines += [""] + completeness_markdown(checked)
    if checked["discrepancies"]:
        lines += ["", "## Discrepancies (first 20)", ""]
        lines += [f"- `{x['object']}` (source `{x['source']}`): {x['kind']}: expected {x['expected']}, "
                  f"found {x['found']}" for x in checked["discrepancies"][:20]]
    if checked.get("last_hash"):
        lines += ["", f"Audit manifest: last record hash `{checked['last_hash']}`."]
    return "\n".join(lines)


def completeness_markdown(checked: dict[str, Any]) -> list[str]:
    """Whether each dataset is complete (every object of its newest complete source listing at the
    destination and verified), and the first objects that are not, as markdown lines."""
    lines = ["## Complete?", "", "| dataset | complete | expected | verified | never arrived |", "|---|---|---:|---:|---:|"]
    lines += [f"| {d['dataset']} | {'yes' if d['complete'] else '**no**'} | {d['expected']:,} | {d['verified']:,} | "
              f"{d['never_arrived']:,} |" for d in checked["datasets"]]
    if checked["incomplete"]:
        lines += [""] + [f"- {sentence}" for sentence in checked["incomplete"]]
        lines += [f"  - `{e['object']}` ({e['dataset']}): {e['status']}: {e['reason']}" for e in checked["not_verified"][:20]]
    lines.append("")
    return lines


def estimate_markdown(estimate) -> str:
    """The dry run's estimate (`engine.estimate.Estimate`): its table, then what each figure rests on."""
    lines = ["# Estimate: how long and how much", "",
             "EUR excluding VAT: duration and one-off costs of what would be written now, storage per month of what "
             "the destination would hold.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(estimate)]
    lines += ["", "## What the figures rest on", ""] + [f"- {line.strip()}" for line in detail_lines(estimate)]
    return "\n".join(lines)


def estimate_artifact(project: str, estimate) -> None:
    create_markdown_artifact(estimate_markdown(estimate), key=artifact_key(project, "estimate"),
                             description="Dry run: how long the migration would take and what it would cost")


def probe_artifact(project: str, reports) -> None:
    """The probe's tables (`engine.probe.ProbeReport` per destination) as one markdown artifact."""
    if reports:
        create_markdown_artifact(probe_markdown(reports), key=artifact_key(project, "probe"),
                                 description="What the destination buckets do, against their provider profiles")


def probe_markdown(reports) -> str:
    """Each destination's probe: the table, the notes of the rows that are not ok, the overrides."""
    lines = [f"# Probe of the destination bucket{'s' if len(reports) > 1 else ''}", ""]
    for r in reports:
        verdict = "can hold a migration as configured" if r.safe else "**cannot hold a migration as configured**"
        lines += [f"## `{r.destination}`: {r.provider}, bucket `{r.bucket}`", "",
                  f"The bucket {verdict} (probed under `{r.prefix}` in {r.seconds:.1f} s).", "",
                  "| check | measured | catalog says | verdict |", "|---|---|---|---|"]
        lines += [f"| {c.check} | {c.measured} | {c.catalog} | {'**FAIL**' if c.verdict == 'FAIL' else c.verdict} |"
                  for c in r.checks]
        notes = [c for c in r.checks if c.note and c.verdict != "ok"]
        if notes:
            lines += [""] + [f"- {c.check} ({c.verdict}): {c.note}" for c in notes]
        if r.suggested_overrides:
            lines += ["", "Suggested `provider_overrides` (paste into the configuration, then probe again):", "",
                      "```yaml", r.overrides_yaml().rstrip("\n"), "```"]
        lines += [""] + [f"- left behind: {left}" for left in r.left_behind]
    return "\n".join(lines)
