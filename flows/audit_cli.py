"""`exitplan verify`, `exitplan audit verify` and `exitplan report`. Thin: the work is in
`engine/verify.py`, `engine/audit.py` and `engine/report.py`.

- `verify --config F [--dataset N]... [--deep] [--sample FRACTION] [--seed N]`: compare each
  dataset's destination with the state store (quick: listing + HEAD of encrypted objects; deep:
  also read back, decrypt and compare the plaintext SHA-256). Exit 1 when any discrepancy, each
  named (object, expected, found), or while a dataset is not complete (an object of its newest
  complete source listing not verified: failed, pending, never attempted; each named). `--sample`
  implies `--deep`.
- `audit verify MANIFEST --public-key KEY.pem [--format json]`: check a manifest's chain and
  signatures; exit 1 naming the line where it breaks. Either way it lists the runs that started
  and never ended (and which later run recorded each as interrupted) and the repairs of the
  manifest's end: findings, not failures (`engine.audit.ManifestCheck` says why).
- `report --config F --out report.html`: one self-contained HTML file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from config.errors import ExitCode, UserError
from config.loader import load_config
from config.sizes import format_size
from flows.progress import StatusLine
from flows.terminal import print_audit_outcome, print_incomplete, print_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check the destination against the state store (quick, or --deep: decrypt and hash)")
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the exitplan YAML configuration")
    p.add_argument("--dataset", "-d", action="append", default=[], metavar="NAME",
                   help="only this dataset (repeatable; default: every dataset in the config)")
    p.add_argument("--deep", action="store_true",
                   help="also read every object back, decrypt it and compare its plaintext SHA-256 with the one "
                        "recorded from the source stream")
    p.add_argument("--sample", type=float, default=None, metavar="FRACTION",
                   help="deep-check only this fraction of the objects (0 < FRACTION <= 1), picked by --seed; implies --deep")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="the sample's seed: the same seed picks the same objects (default: a random one, printed)")
    p.set_defaults(func=cmd_verify)

    audit = sub.add_parser("audit", help="check an audit manifest (chain and signatures)")
    asub = audit.add_subparsers(dest="audit_command", metavar="ACTION")
    asub.required = True
    p = asub.add_parser("verify", help="check a manifest's hash chain and every run_end signature")
    p.add_argument("manifest", type=Path, metavar="MANIFEST", help="the manifest (manifest.jsonl)")
    p.add_argument("--public-key", required=True, type=Path, metavar="KEY.pem",
                   help="the project's audit public key (`exitplan keys show --config F --audit-public-key`)")
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="json: one JSON object on stdout (ok, problems, runs without an end, repairs)")
    p.set_defaults(func=cmd_audit_verify)

    p = sub.add_parser("report", help="write a self-contained HTML report: datasets, charts, sovereignty, manifest fingerprint")
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the exitplan YAML configuration")
    p.add_argument("--dataset", "-d", action="append", default=[], metavar="NAME",
                   help="only this dataset (repeatable; default: every dataset in the config)")
    p.add_argument("--out", "-o", required=True, type=Path, metavar="FILE", help="where to write the HTML")
    p.set_defaults(func=cmd_report)


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------


class VerifyDisplay(StatusLine):
    """Progress of a verify, on the same status line as migrate's."""

    def dataset_started(self, dataset: str, objects: int) -> None:
        self.started = time.monotonic()
        self.restart(f"{dataset}: verifying {objects:,} objects")

    def progress(self, snap) -> None:
        self.show(lambda now: self._render(now, snap), force=snap.checked >= snap.total)

    def _render(self, now: float, snap) -> str:
        rate = snap.bytes_read / max(now - self.started, 1e-6) / 1e6
        failed = f", {snap.failed:,} with discrepancies" if snap.failed else ""
        read = f", {format_size(snap.bytes_read)} read back ({rate:.1f} MB/s)" if snap.bytes_read else ""
        return f"{snap.dataset}: {snap.checked:,}/{snap.total:,} objects checked{failed}{read}"

    def dataset_finished(self, summary) -> None:
        self.finish()


def cmd_verify(args: argparse.Namespace) -> int:
    from engine.verify import verify

    loaded = load_config(args.config)
    datasets = loaded.chosen_datasets(args.dataset)
    deep = args.deep or args.sample is not None
    sample = 1.0 if args.sample is None else args.sample
    result = verify(loaded, datasets, deep=deep, sample=sample, seed=args.seed, observer=VerifyDisplay())
    print()
    print_table(
        ["dataset", "mode", "checked", "ok", "discrepant", "read back", "bytes read", "not in state", "expected",
         "verified", "never arrived", "complete", "seconds"],
        [[d.dataset, d.mode, f"{d.objects:,}", f"{d.ok:,}", f"{d.failed:,}", f"{d.deep_checked:,}",
          format_size(d.bytes_read), f"{d.unknown:,}", f"{d.status.expected:,}", f"{d.status.verified:,}",
          f"{d.status.never_arrived:,}", "yes" if d.complete else "no", f"{d.elapsed_seconds:.1f}"]
         for d in result.datasets],
    )
    if result.mode == "deep":
        how = "every object" if result.sample >= 1 else f"a {result.sample:.0%} sample (seed {result.seed}; repeat it with --seed {result.seed})"
        print(f"\ndeep: {how} read back, decrypted and its plaintext SHA-256 compared with the one recorded from the source.")
    else:
        print("\nquick: listing (size, ETag) against the state, and the exitplan metadata of each encrypted object "
              "(HEAD); `--deep` also decrypts and hashes.")
    for d in result.datasets:
        if d.etags_opaque:
            print(f"{d.dataset}: ETags are opaque at this destination (multipart.etag: opaque): they were not compared"
                  + ("; the deep check proved the bytes." if d.mode == "deep" else
                     "; only `exitplan verify --deep` proves the bytes."))
    for d in result.datasets:
        if d.unknown:
            print(f"{d.dataset}: {d.unknown:,} objects under the destination prefix are not in the state "
                  f"(not written by exitplan, or their record was lost), e.g. {', '.join(d.unknown_examples[:3])}")
    if result.audit:
        print_audit_outcome(result.audit)
    problems = [p for d in result.datasets for p in d.discrepancies]
    if problems:
        total = sum(d.failed for d in result.datasets)
        print(f"\ndiscrepancies ({total:,} object{'s' if total != 1 else ''}):", file=sys.stderr)
        for p in problems:
            print(f"  {p.dataset}: {p.sentence()}", file=sys.stderr)
        if any(d.discrepancies_truncated for d in result.datasets):
            print("  … more in the audit manifest and the state store (reason 'verify: …')", file=sys.stderr)
        print("the objects found wrong are marked failed: `exitplan migrate` copies them again.", file=sys.stderr)
    print()
    for d in result.datasets:
        print(d.status.sentence())
    for d in result.datasets:
        print_incomplete(d.status)
    if not all(d.complete for d in result.datasets):
        print("a dataset is complete when every object of its newest complete source listing is at the destination "
              "and verified: `exitplan migrate` copies what is missing, then verify again.", file=sys.stderr)
    print(f"state: run {result.run_id}")
    return ExitCode.OK if result.all_ok else ExitCode.FAILED


# ---------------------------------------------------------------------------------------------
# audit verify
# ---------------------------------------------------------------------------------------------


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from engine.audit import load_public_key, verify_manifest

    if not args.manifest.is_file():
        raise UserError(f"{args.manifest}: no such file; name the manifest (e.g. .exitplan/audit/manifest.jsonl)")
    try:
        public_key = load_public_key(args.public_key.read_bytes())
    except OSError as exc:
        raise UserError(f"--public-key {args.public_key}: cannot be read ({exc.strerror})") from None
    except ValueError as exc:
        raise UserError(f"--public-key {args.public_key}: not an Ed25519 public key in PEM ({exc}); export it with "
                        "`exitplan keys show --config F --audit-public-key`") from None
    check = verify_manifest(args.manifest, public_key)
    if args.format == "json":
        print(json.dumps(check.as_json(), indent=2, ensure_ascii=False))
        return ExitCode.OK if check.ok else ExitCode.FAILED
    if check.ok:
        kinds = ", ".join(f"{n:,} {k}" for k, n in sorted(check.counts.items()))
        print(f"{args.manifest}: OK: {check.records:,} records ({kinds}), chain intact, "
              f"{check.runs_signed:,} run ends signed by this key")
    else:
        print(f"{args.manifest}: BROKEN ({check.records:,} records):", file=sys.stderr)
        for p in check.problems:
            print(f"  {p.sentence()}", file=sys.stderr)
        if check.problems_truncated:
            print("  … and more", file=sys.stderr)
    print_manifest_findings(check)
    if check.ok:
        print(f"last record hash: {check.last_hash}")
        print(f"file SHA-256:     {check.file_sha256}")
    return ExitCode.OK if check.ok else ExitCode.FAILED


def print_manifest_findings(check) -> None:
    """The runs without an end and the repairs, whether the manifest checks or not."""
    if check.runs_without_end:
        n = len(check.runs_without_end)
        print(f"runs without a run_end (interrupted): {n}")
        for run in check.runs_without_end:
            print(f"  {run.sentence()}")
    else:
        print("runs without a run_end (interrupted): none")
    if check.repairs:
        print(f"repairs of the manifest's end: {len(check.repairs)}")
        for repair in check.repairs:
            print(f"  line {repair.line}: {repair.sentence}")
    for line, dataset, when, objects, digest in check.cutovers:
        print(f"cutover of dataset `{dataset}` at {when}: {objects:,} objects (objects_sha256 {digest}), signed, "
              f"line {line}")


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from engine.report import write_report

    loaded = load_config(args.config)
    datasets = loaded.chosen_datasets(args.dataset)
    if args.out.is_dir():
        raise UserError(f"--out {args.out}: is a directory; name the HTML file to write")
    report = write_report(loaded, datasets, args.out)
    print(f"report: {args.out} ({format_size(report.size)}): {len(datasets)} datasets, {report.objects:,} objects")
    if report.manifest_line:
        print(report.manifest_line)
    return ExitCode.OK
