"""`exitplan report`: one self-contained HTML file on what moved, what was proven, where it is.

Inline CSS and inline SVG only: no script, no font, no image or style sheet fetched from anywhere,
so the file can be mailed to an auditor or archived as it is. Everything comes from the state
store (read-only), the configuration (the sovereignty verdicts, the KEK), the keyset's public part
and the audit manifest; nothing is unwrapped and no endpoint is contacted.

Sections: per-dataset figures (objects, bytes, verified, not yet verified, failed, whether the
dataset is complete: `StateStore.dataset_status`), the estimate of each dataset's newest listing next
to what was measured (`engine.estimate`, priced at the catalog's and the configuration's unit
prices), the sovereignty summary (provider, legal entity
and seat, jurisdiction, region, bucket, who holds the keys), charts (bytes moved over time from
the copies' finish times, throughput per migrate run, object size distribution, verification
status), the runs, and the manifest's fingerprint (SHA-256 of the file, last record hash, whether
its chain and signatures check).

Memory: the state is read in aggregate queries and one streamed pass over the copied rows (the
time series and the histogram are fixed-size bins), whatever the number of objects.
"""

from __future__ import annotations

import contextlib
import html
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

from config.models import LoadedConfig
from config.policy import check_sovereignty
from config.sizes import format_size, not_carried_lines

from .estimate import HEADERS, detail_lines, estimate, format_duration, listing_tally, table_rows, terms_for
from .plan import size_planner
from .private_files import PRIVATE_DIR, open_private
from .project import open_state
from .state import NEVER_ARRIVED, DatasetFigures, writing_file

TIME_BINS = 48
NAMED_PER_KIND = 200  # objects named per dataset and kind in "Objects that did not arrive"
# Object size bins: upper bounds (exclusive), factors of 16 from 1 KiB; the last is open.
SIZE_BOUNDS = (1, 1 << 10, 1 << 14, 1 << 18, 1 << 22, 1 << 26, 1 << 30, 1 << 34)
SIZE_LABELS = ("0 B", "<1 KiB", "<16 KiB", "<256 KiB", "<4 MiB", "<64 MiB", "<1 GiB", "<16 GiB", "≥16 GiB")

STATUS_COLORS = {"verified": "#2e7d32", "copied, not verified": "#f9a825", "failed": "#c62828"}


@dataclass(frozen=True)
class ManifestFingerprint:
    path: Path
    exists: bool
    file_sha256: str | None = None
    records: int = 0
    last_hash: str | None = None
    verdict: str = ""  # a sentence: checks, or where it breaks
    ok: bool | None = None  # None: not checked (no public key)


@dataclass(frozen=True)
class ReportFile:
    path: Path
    size: int
    objects: int
    manifest_line: str


# ---------------------------------------------------------------------------------------------
# Sovereignty, keys, the manifest
# ---------------------------------------------------------------------------------------------


def key_holder_text(loaded: LoadedConfig, dataset: str) -> str:
    """Who holds a dataset's keys, read from the keyset's public part (nothing is unwrapped)."""
    if loaded.config.datasets[dataset].public:
        return "not encrypted (dataset marked public)"
    from .keys import show_keys

    backend = loaded.config.keys.kek.backend if loaded.config.keys else "none"
    where = {"local": "a local key file (lab only)", "openbao": "OpenBao/Vault transit", "pkcs11": "a PKCS#11 HSM",
             "ovhcloud-kms": "OVHcloud KMS", "scaleway-kms": "Scaleway Key Manager"}.get(backend, backend)
    try:
        keys = show_keys(loaded)
    except Exception as exc:  # no keyset yet, unreadable: the report says so instead of failing
        return f"Tink AES256_GCM_HKDF_1MB; KEK: {where}; keyset not readable ({exc})"
    return (f"Tink AES256_GCM_HKDF_1MB, primary data key {keys.primary_id} ({len(keys.keys)} key"
            f"{'s' if len(keys.keys) != 1 else ''}), keyset wrapped by {where}: {keys.kek}")


def manifest_fingerprint(loaded: LoadedConfig) -> ManifestFingerprint:
    from .audit import load_public_key, manifest_path, verify_manifest

    path = manifest_path(loaded)
    if not path.exists():
        return ManifestFingerprint(path, False, verdict="no manifest yet (nothing was migrated or verified)")
    public_key = None
    if loaded.config.keys is not None:
        try:
            from .keys import audit_public_key_pem

            public_key = load_public_key(audit_public_key_pem(loaded).encode("ascii"))
        except Exception:
            public_key = None
    if public_key is None:
        from .audit import file_sha256

        return ManifestFingerprint(path, True, file_sha256(path), verdict="signatures not checked: no audit public key")
    check = verify_manifest(path, public_key)
    if check.ok:
        verdict = (f"chain intact and {check.runs_signed} run end{'s' if check.runs_signed != 1 else ''} signed "
                   "by the project's audit key")
    else:
        first = check.problems[0]
        verdict = f"does NOT check: {first.sentence()}" + (
            f" (and {len(check.problems) - 1} more problems)" if len(check.problems) > 1 else "")
    if check.runs_without_end:
        verdict += (f"; {len(check.runs_without_end)} run{'s' if len(check.runs_without_end) != 1 else ''} started and "
                    "never ended (`exitplan audit verify` lists them)")
    return ManifestFingerprint(path, True, check.file_sha256, check.records, check.last_hash, verdict, check.ok)


# ---------------------------------------------------------------------------------------------
# SVG charts (inline, no script)
# ---------------------------------------------------------------------------------------------

_E = html.escape
W, H = 540, 240
PAD_L, PAD_R, PAD_T, PAD_B = 64, 16, 16, 48


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return m * exp
    return 10 * exp


def _frame(body: str, y_max: float, y_fmt, title: str) -> str:
    ticks = []
    for k in range(5):
        v = y_max * k / 4
        y = PAD_T + (H - PAD_T - PAD_B) * (1 - k / 4)
        ticks.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{W - PAD_R}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" class="ytick">{_E(y_fmt(v))}</text>')
    return (f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{_E(title)}"'
            f'>{"".join(ticks)}{body}</svg>')


def _empty(title: str) -> str:
    return (f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{_E(title)}"'
            f'><text x="{W / 2}" y="{H / 2}" class="empty">no data yet</text></svg>')


def bar_chart(labels: Sequence[str], values: Sequence[float], y_fmt, title: str, color: str = "#1565c0") -> str:
    if not values or max(values) <= 0:
        return _empty(title)
    y_max = _nice_max(max(values))
    n = len(values)
    slot = (W - PAD_L - PAD_R) / n
    bars = []
    for i, (label, v) in enumerate(zip(labels, values)):
        h = (H - PAD_T - PAD_B) * v / y_max
        x = PAD_L + i * slot + slot * 0.15
        y = H - PAD_B - h
        bars.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" fill="{color}">'
                    f'<title>{_E(label)}: {_E(y_fmt(v))}</title></rect>'
                    f'<text x="{x + slot * 0.35:.1f}" y="{H - PAD_B + 14}" class="xtick">{_E(label)}</text>')
    return _frame("".join(bars), y_max, y_fmt, title)


def line_chart(points: Sequence[tuple[datetime, float]], y_fmt, title: str) -> str:
    if not points:
        return _empty(title)
    y_max = _nice_max(max(v for _, v in points))
    t0, t1 = points[0][0], points[-1][0]
    span = max((t1 - t0).total_seconds(), 1e-3)
    start = t0 - (t1 - t0) / len(points)  # the first bin's start: the curve starts at zero there
    span = max((t1 - start).total_seconds(), span)
    xy = [(PAD_L, H - PAD_B)]
    for t, v in points:
        x = PAD_L + (W - PAD_L - PAD_R) * (t - start).total_seconds() / span
        y = H - PAD_B - (H - PAD_T - PAD_B) * v / y_max
        xy.append((x, y))
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    area = path + f" {xy[-1][0]:.1f},{H - PAD_B} {PAD_L},{H - PAD_B}"
    fmt = "%H:%M:%S" if span < 86400 else "%Y-%m-%d"
    labels = (f'<text x="{PAD_L}" y="{H - PAD_B + 14}" class="xtick" style="text-anchor:start">{_E(start.strftime(fmt))}</text>'
              f'<text x="{W - PAD_R}" y="{H - PAD_B + 14}" class="xtick" style="text-anchor:end">{_E(t1.strftime(fmt))} UTC</text>')
    body = (f'<polygon points="{area}" fill="#bbdefb"/><polyline points="{path}" fill="none" stroke="#1565c0" '
            f'stroke-width="2"/>{labels}')
    return _frame(body, y_max, y_fmt, title)


def status_chart(figures: Sequence[DatasetFigures], title: str) -> str:
    """One horizontal bar per dataset: verified, copied but not verified, failed (share of objects)."""
    if not figures or not any(f.objects for f in figures):
        return _empty(title)
    row_h = 28
    height = PAD_T + row_h * len(figures) + 40
    left = 110
    width = W - left - PAD_R
    parts = []
    for i, f in enumerate(figures):
        y = PAD_T + i * row_h
        x = left
        parts.append(f'<text x="{left - 8}" y="{y + 17}" class="ytick">{_E(f.dataset)}</text>')
        for name, n in (("verified", f.verified), ("copied, not verified", f.unverified), ("failed", f.failed)):
            if not f.objects or not n:
                continue
            w = width * n / f.objects
            parts.append(f'<rect x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" fill="{STATUS_COLORS[name]}">'
                         f'<title>{_E(f.dataset)}: {n:,} {name}</title></rect>')
            x += w
    legend_y = PAD_T + row_h * len(figures) + 22
    lx = left
    for name, color in STATUS_COLORS.items():
        parts.append(f'<rect x="{lx}" y="{legend_y - 10}" width="12" height="12" fill="{color}"/>'
                     f'<text x="{lx + 16}" y="{legend_y}" class="legend">{_E(name)}</text>')
        lx += 26 + 7 * len(name)
    return (f'<svg viewBox="0 0 {W} {height}" width="{W}" height="{height}" role="img" aria-label="{_E(title)}"'
            f'>{"".join(parts)}</svg>')


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1a1a1a;margin:0;background:#f5f6f8}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 10px;border-bottom:2px solid #e3e6ea;padding-bottom:4px}
h3{font-size:14px;margin:0 0 6px;color:#37474f}
.sub{color:#5f6b76;margin:0 0 16px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:16px 0}
.card{flex:1 1 150px;border:1px solid #e3e6ea;border-radius:6px;padding:10px 14px}
.card b{display:block;font-size:20px}.card span{color:#5f6b76;font-size:12px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #e3e6ea;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.ok{color:#2e7d32;font-weight:600}.bad{color:#c62828;font-weight:600}.warn{color:#a66f00;font-weight:600}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(540px,1fr));gap:18px}
.chart{border:1px solid #e3e6ea;border-radius:6px;padding:10px}
svg text{font:11px system-ui,sans-serif;fill:#37474f}
svg .ytick{text-anchor:end}svg .xtick{text-anchor:middle;font-size:10px}svg .grid{stroke:#eceff1}
svg .empty{text-anchor:middle;fill:#90a4ae;font-size:14px}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
footer{margin-top:32px;color:#5f6b76;font-size:12px}
"""


def _table(headers: Sequence[str] | None, rows: Iterable[Sequence[str]], numeric: set[int] = frozenset()) -> str:
    head = "<thead><tr>" + "".join(f"<th>{_E(h)}</th>" for h in headers) + "</tr></thead>" if headers else ""
    body = "".join("<tr>" + "".join(
        f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _t(dt: datetime | None) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S") + " UTC" if dt else "—"


def _completeness_cell(status) -> str:
    if status is None:
        return "no state"
    if status.complete:
        return '<span class="ok">yes</span>'
    return f'<span class="bad">{"no" if status.known else "not known"}</span>'


def _not_arrived_section(statuses: dict) -> list[str]:
    """The objects a dataset must hold that did not arrive (failed, found wrong, pending, never
    attempted), each named with its reason: the first `NAMED_PER_KIND` of each kind per dataset,
    and how many more (`exitplan status --format json` and the state hold them all)."""
    rows, more = [], []
    for d, status in statuses.items():
        for category in NEVER_ARRIVED:
            count = status.count(category)
            rows += [[f"<b>{_E(d)}</b>", _E(e.category), _E(e.reason), f"<code>{_E(e.source_key)}</code>",
                      _E(format_size(e.size))] for e in count.examples]
            if count.objects > len(count.examples):
                more.append(f"{d}: {count.objects - len(count.examples):,} more {category}")
    if not rows:
        return []
    return ["<h2>Objects that did not arrive</h2>",
            _table(["dataset", "status", "reason", "object", "size"], rows),
            *([f'<p class="sub">Not listed here: {_E("; ".join(more))} (<code>exitplan status --format json</code> '
               "names them).</p>"] if more else [])]


def _newest_listings(store, datasets: Sequence[str]) -> dict[str, int]:
    """Per dataset, the newest migrate run that listed it (datasets never listed are left out)."""
    found = {}
    for d in datasets:
        runs = [r.run_id for r in store.run_datasets(d) if r.command == "migrate"]
        if runs:
            found[d] = runs[0]
    return found


def _estimate_section(loaded: LoadedConfig, datasets: Sequence[str], tallies: list, listings: dict[str, int], runs,
                      figures: dict[str, DatasetFigures]) -> list[str]:
    """The estimate of each dataset's newest listing, as if copied from scratch, next to what was
    measured: the bytes stored and the newest migrate run's time and throughput."""
    parts = ["<h2>Estimate and measured</h2>"]
    if not tallies:
        return parts + ['<p class="sub">No listing in the state yet: <code>exitplan migrate --dry-run</code> gives the '
                        "estimate before the first run.</p>"]
    est = estimate(tallies, terms_for(loaded, list(listings), runs))
    parts.append(_table(HEADERS + ["stored (measured)"],
                        [[_E(c) for c in row] + [_E(format_size(figures[row[0]].output_bytes))
                                                  if row[0] in figures else ""] for row in table_rows(est)],
                        numeric=set(range(1, len(HEADERS) + 1)) - {5}))
    migrated = [r for r in runs if r.command == "migrate" and r.finished_at and not r.dry_run]
    measured = ""
    if migrated:
        r = migrated[-1]
        seconds = (r.finished_at - r.started_at).total_seconds()
        measured = (f" Measured: run #{r.id} sent {format_size(r.bytes_sent)} in {format_duration(seconds)}"
                    f" ({r.bytes_sent / max(seconds, 1e-3) / 1e6:,.1f} MB/s).")
    sources = ", ".join(f"{d}: run #{run_id}" for d, run_id in listings.items())
    parts.append(f'<p class="sub">Each dataset\'s newest listing in the state ({_E(sources)}) priced as if copied '
                 f"from scratch: duration, one-off costs at Azure and at the destination, storage per month, and the "
                 f"Archive-tier objects to rehydrate first. <i>stored (measured)</i>: what the destination holds now."
                 f"{_E(measured)}</p>")
    # A self-contained page holds no link: a price's page is named without its scheme.
    parts.append("<details><summary>What the figures rest on</summary><ul>"
                 + "".join(f"<li>{_E(line.strip().replace('https://', ''))}</li>" for line in detail_lines(est))
                 + "</ul></details>")
    return parts


def render(loaded: LoadedConfig, datasets: Sequence[str]) -> tuple[str, int, ManifestFingerprint]:
    """The report's HTML, the number of objects it covers, and the manifest's fingerprint."""
    cfg = loaded.config
    verdicts = {v.name: v for v in check_sovereignty(loaded)}
    store = open_state(loaded, read_only=True)
    try:
        figures = [store.dataset_figures(d) for d in datasets] if store else []
        statuses = {d: store.dataset_status(d, examples=NAMED_PER_KIND) for d in datasets} if store else {}
        timeline = store.moved_over_time(datasets, TIME_BINS) if store else []
        histogram = store.size_histogram(datasets, SIZE_BOUNDS) if store else []
        runs = store.recent_runs(limit=30) if store else []
        listings = _newest_listings(store, datasets) if store else {}
        tallies = [listing_tally(d, store.listed(run_id, d), size_planner(loaded, d)) for d, run_id in listings.items()]
        positions = [(d, store.feed_position(s.listing.run_id, d)) for d, s in statuses.items() if s.listing is not None]
    finally:
        if store is not None:
            store.close()
    fingerprint = manifest_fingerprint(loaded)
    objects = sum(f.objects for f in figures)
    total_bytes = sum(f.bytes for f in figures)
    verified = sum(f.verified for f in figures)
    failed = sum(f.failed for f in figures)
    now = datetime.now(timezone.utc).replace(tzinfo=None)

    complete = sum(s.complete for s in statuses.values())
    cards = [
        (f"{len(datasets)}", "datasets"), (f"{objects:,}", "objects at the destination"), (format_size(total_bytes), "plaintext moved"),
        (f"{(100.0 * verified / objects) if objects else 0:.1f}%", "verified"), (f"{failed:,}", "failed"),
        (f"{complete} of {len(datasets)}", "datasets complete"),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>exitplan report: {_E(cfg.project)}</title>",
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head><body><main>',
        f"<h1>exitplan report: project {_E(cfg.project)}</h1>",
        f'<p class="sub">Generated {_E(_t(now))} from <code>{_E(str(loaded.path))}</code> and its state '
        f"<code>{_E(str(loaded.state_dir))}</code>.</p>",
        '<div class="cards">' + "".join(f"<div class=\"card\"><b>{_E(v)}</b><span>{_E(k)}</span></div>" for v, k in cards) + "</div>",
    ]
    if store is None:
        parts.append('<p class="warn">No state yet: nothing was migrated with this configuration.</p>')

    parts.append("<h2>Datasets</h2>")
    rows = []
    fig_by = {f.dataset: f for f in figures}
    for d in datasets:
        ds = cfg.datasets[d]
        f = fig_by.get(d) or DatasetFigures(d, 0, 0, 0, 0, 0, 0, None)
        rows.append([
            f"<b>{_E(d)}</b>",
            f"{_E(ds.source)}: <code>{_E(ds.container)}/{_E(ds.prefix)}</code>",
            f"{_E(ds.destination)}: <code>{_E(verdicts[ds.destination].bucket)}/{_E(ds.dest_prefix)}</code>",
            f"{f.objects:,}", _E(format_size(f.bytes)), _E(format_size(f.output_bytes)),
            f'<span class="ok">{f.verified:,}</span>', f"{f.unverified:,}",
            f'<span class="{"bad" if f.failed else ""}">{f.failed:,}</span>', _E(_t(f.last_finished)),
            _completeness_cell(statuses.get(d)),
        ])
    parts.append(_table(["dataset", "source", "destination", "objects", "bytes", "stored", "verified", "not verified",
                         "failed", "last copy", "complete"], rows, numeric={3, 4, 5, 6, 7, 8}))
    parts.append('<p class="sub">Per source key, its newest copy: <i>verified</i> by <code>exitplan verify</code>, '
                 "<i>not verified</i> yet, or <i>failed</i> (the copy failed, or verify found it wrong; "
                 "<code>exitplan migrate</code> copies it again). <i>stored</i> counts the encrypted bytes. "
                 "<i>complete</i>: every object of the dataset's newest complete source listing is at the "
                 "destination and verified (<code>exitplan status</code> names those that are not).</p>")
    parts += [f'<p class="warn">{_E(s.sentence())}</p>' for s in statuses.values() if not s.complete]
    parts += [f'<p class="warn">{_E(d)}: not carried: {_E(line)}</p>'
              for d, s in statuses.items() if s.listing is not None
              for line in not_carried_lines(s.listing.not_carried_counts)]
    parts += [f'<p class="sub">{_E(d)}: {_E(p.sentence())}.</p>' for d, p in positions if p is not None]
    parts += _not_arrived_section(statuses)
    parts += _estimate_section(loaded, datasets, tallies, listings, runs, fig_by)

    parts.append("<h2>Where the data is, and who holds the keys</h2>")
    rows = []
    for d in datasets:
        ds = cfg.datasets[d]
        v = verdicts[ds.destination]
        p = v.provider
        rows.append([f"<b>{_E(d)}</b>", _E(p.display_name), _E(p.legal_entity), _E(p.legal_seat),
                     f"<b>{_E(p.jurisdiction)}</b>", f"{_E(v.region)} ({_E(v.location)})", _E(v.place),
                     _E(key_holder_text(loaded, d))])
    parts.append(_table(["dataset", "provider", "operated by", "legal seat", "jurisdiction", "region",
                         "bucket or directory", "encryption and keys"], rows))
    allowed = ", ".join(cfg.policy.allowed_jurisdictions)
    parts.append(f'<p class="sub">Every destination passed the sovereignty policy (allowed jurisdictions: {_E(allowed)}) '
                 "when this report was written.</p>")
    used = {verdicts[cfg.datasets[d].destination].catalog_file for d in datasets} - {None}
    parts += [f'<p class="warn">{_E(f.sentence())}: its jurisdiction and hosts are the operator\'s word.</p>'
              for f in sorted(used, key=lambda f: f.provider)]

    parts.append("<h2>Charts</h2><div class=\"charts\">")
    parts.append('<div class="chart"><h3>Bytes moved over time (plaintext, cumulative)</h3>'
                 + line_chart(timeline, lambda v: format_size(int(v)), "bytes moved over time") + "</div>")
    done_runs = [r for r in runs if r.command == "migrate" and r.finished_at and not r.dry_run]
    rates = [(r.bytes_sent / max((r.finished_at - r.started_at).total_seconds(), 1e-3)) / 1e6 for r in done_runs]
    parts.append('<div class="chart"><h3>Throughput per migrate run (MB/s sent)</h3>'
                 + bar_chart([f"#{r.id}" for r in done_runs], rates, lambda v: f"{v:,.0f}" if v >= 100 else f"{v:.1f}",
                           "throughput per run") + "</div>")
    parts.append('<div class="chart"><h3>Object size distribution (objects at the destination)</h3>'
                 + bar_chart(list(SIZE_LABELS), histogram, lambda v: f"{int(v):,}", "object sizes", "#6a1b9a") + "</div>")
    parts.append('<div class="chart"><h3>Verification status (share of objects)</h3>'
                 + status_chart(figures, "verification status") + "</div></div>")

    parts.append("<h2>Runs</h2>")
    parts.append(_table(
        ["run", "command", "status", "started", "seconds", "objects", "ok", "failed", "skipped", "bytes"],
        [[f"#{r.id}", _E(r.command + (" (dry run)" if r.dry_run else "")),
          f'<span class="{"ok" if r.status == "ok" else "bad" if r.status in ("failed", "interrupted") else ""}">{_E(r.status)}</span>',
          _E(_t(r.started_at)), f"{(r.finished_at - r.started_at).total_seconds():.1f}" if r.finished_at else "—",
          f"{r.objects_total:,}", f"{r.objects_ok:,}", f"{r.objects_failed:,}", f"{r.objects_skipped:,}",
          _E(format_size(r.bytes_sent if r.command == "migrate" else r.bytes_total))] for r in runs],
        numeric={4, 5, 6, 7, 8, 9}))

    parts.append("<h2>Audit manifest</h2>")
    fp = fingerprint
    if fp.exists:
        cls = "ok" if fp.ok else ("bad" if fp.ok is False else "warn")
        parts.append(_table(None, [
            ["file", f"<code>{_E(str(fp.path))}</code>"],
            ["SHA-256 of the file", f'<code class="mono">{_E(fp.file_sha256 or "")}</code>'],
            ["records", f"{fp.records:,}"],
            ["last record hash", f'<code class="mono">{_E(fp.last_hash or "—")}</code>'],
            ["check", f'<span class="{cls}">{_E(fp.verdict)}</span>'],
        ]))
        parts.append('<p class="sub">Keep the last record hash apart from the manifest: it pins everything before it. '
                     "Check the manifest yourself with <code>exitplan audit verify MANIFEST --public-key KEY.pem</code>, "
                     "or with the few lines of Python in the README (cryptography, hashlib, json).</p>")
    else:
        parts.append(f'<p class="warn">{_E(fp.verdict)}</p>')
    parts.append("<footer>Written by exitplan. Self-contained: no script, no external resource.</footer></main></body></html>")
    return "\n".join(parts), objects, fingerprint


def write_report(loaded: LoadedConfig, datasets: Sequence[str], out: Path) -> ReportFile:
    page, objects, fp = render(loaded, datasets)
    tmp = out.with_name(out.name + ".tmp")
    with writing_file(out, "the report", "`--out`"):
        out.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        try:
            with open_private(tmp, "w") as f:
                f.write(page)
            tmp.replace(out)
        except BaseException:
            with contextlib.suppress(OSError):  # a read-only directory keeps it; it is only ever a temporary name
                tmp.unlink(missing_ok=True)
            raise
    line = (f"manifest: {fp.path}: SHA-256 {fp.file_sha256}, last record hash {fp.last_hash}; {fp.verdict}"
            if fp.exists else f"manifest: {fp.verdict}")
    return ReportFile(out, out.stat().st_size, objects, line)
