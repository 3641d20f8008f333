"""`exitplan keys …`: create, import, rotate, re-wrap and show the project's keys. Thin: the work is in
`engine/keys.py`.

- `keys init --config F`: a new keyset (one data key) and audit-signing key, wrapped by `keys.kek`;
  refuses to overwrite an existing keyset, and to create one when a destination already holds the
  project's keyset copies (exit 2: `keys import` is the way). In the lab, a `local` KEK file is created.
- `keys import --config F [--destination D] [--merge]`: the project's keyset from the copies next to
  the data (a lost state directory, a second operator): the copy holding every key id, unwrapped
  with `keys.kek`; `--merge` builds one keyset from copies that diverge, or keeps the local keys too.
- `keys rotate --config F`: a new data key becomes primary; older ones keep decrypting.
- `keys rotate --kek --config F`: a new version of the KEK itself (OpenBao transit), then rewrap.
- `keys rewrap --config F [--old-config OLD]`: the same keyset under the KEK now in the config.
  The old KEK is the one recorded in `keyset.meta.json` when the keyset was last wrapped, or the
  `keys.kek` of `--old-config`. Workflow: edit `keys.kek` in the config, then run `keys rewrap`.
- `keys show --config F [--verify] [--audit-public-key]`: key ids, status, primary, creation
  times and the KEK reference (never key material); `--verify` also unwraps the keyset with the
  configured KEK; `--audit-public-key` prints only the audit public key (PEM).

Exit codes: 0 done; 2 usage/config error (no `keys` section, keyset already exists, copies in a
destination that `init` would ignore, copies that diverge or a local key that `import` would drop
without `--merge`); 3 the policy
refuses the KEK (a `local` key file outside the lab, plain HTTP to a KMS); 4 a key operation failed
(KEK unreachable, credentials refused, wrong key, keyset missing or damaged, no copy to import).
"""

from __future__ import annotations

import argparse
import json
import shlex

from config.errors import ExitCode
from config.loader import load_config
from flows.terminal import print_table


def register(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="create, import, rotate, re-wrap and show the project's encryption keys")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    ksub.required = True

    def add(name: str, help: str, func):
        p = ksub.add_parser(name, help=help)
        p.add_argument("--config", "-c", required=True, metavar="FILE", help="the exitplan YAML configuration")
        p.set_defaults(func=func)
        return p

    add("init", "create the keyset and the audit-signing key, wrapped by keys.kek (never overwrites)", cmd_init)
    p = add("import", "bring the project's keyset from its copies next to the data into the state directory "
                      "(never drops a key)", cmd_import)
    p.add_argument("--destination", action="append", default=[], metavar="NAME",
                   help="read the copies of this destination only (repeatable; default: every destination)")
    p.add_argument("--merge", action="store_true",
                   help="build one keyset holding the keys of every copy and of the local keyset (a new version), "
                        "when no single copy holds them all")
    p = add("rotate", "add a data key and make it primary (older keys still decrypt)", cmd_rotate)
    p.add_argument("--kek", action="store_true", help="rotate the KEK itself instead (OpenBao transit: new key version), then rewrap")
    p = add("rewrap", "wrap the same keyset under the KEK now in the config (no object is touched)", cmd_rewrap)
    p.add_argument("--old-config", metavar="FILE",
                   help="a config whose keys.kek is the KEK the keyset is wrapped with now (default: the one recorded "
                        "in keyset.meta.json)")
    p = add("show", "key ids, status, primary, creation times, KEK reference (never key material)", cmd_show)
    p.add_argument("--audit-public-key", action="store_true", help="print only the audit-signing public key (PEM)")
    p.add_argument("--verify", action="store_true", help="also unwrap the keyset with the configured KEK (exit 4 if it fails)")
    p.add_argument("--format", choices=("table", "json"), default="table")


def cmd_init(args: argparse.Namespace) -> int:
    from engine import key_copies

    loaded = load_config(args.config)
    report = key_copies.init_keys(loaded)
    print(f"created the keyset of project `{report.project}`: {report.keyset_path}")
    _print_report(report, args.config)
    print("\nback up keyset.json and audit-key.json: they are useless without the KEK, and the data is unreadable without them. "
          "`exitplan migrate` also copies the wrapped keyset next to the data.")
    return ExitCode.OK


def cmd_import(args: argparse.Namespace) -> int:
    from engine.key_copies import import_keyset

    loaded = load_config(args.config)
    result = import_keyset(loaded, args.destination or None, merge=args.merge)
    report = result.report
    if result.changed:
        print(f"imported the keyset of project `{report.project}` from {result.origin}: {report.keyset_path}")
    else:
        versions = f"{result.copies} version{'s' if result.copies > 1 else ''}"
        print(f"nothing to import: the keyset in {report.keyset_path} already holds every data key of the project's "
              f"keyset copies in {', '.join(f'`{d}`' for d in result.destinations)} ({versions})")
    _print_report(report, args.config)
    return ExitCode.OK


def cmd_rotate(args: argparse.Namespace) -> int:
    from engine import keys

    loaded = load_config(args.config)
    if args.kek:
        report = keys.rotate_kek(loaded)
        print(f"rotated the KEK and re-wrapped the keyset under its latest version: {report.keyset_path}")
    else:
        report = keys.rotate_keys(loaded)
        print(f"added data key {report.primary_id}, now primary; older keys still decrypt: {report.keyset_path}")
    _print_report(report, args.config)
    return ExitCode.OK


def cmd_rewrap(args: argparse.Namespace) -> int:
    from engine import keys

    loaded = load_config(args.config)
    old_kek = None
    if args.old_config:
        old = load_config(args.old_config, check_policy=False)
        if old.config.keys is None:
            from config.errors import ConfigFileError

            raise ConfigFileError(f"{old.path}: field `keys`: is required with --old-config (it names the old KEK)")
        old_kek = keys.resolve_kek(old)
    report = keys.rewrap_keys(loaded, old_kek)
    print(f"re-wrapped the keyset under {report.kek}: {report.keyset_path} (data keys unchanged, no object touched)")
    _print_report(report, args.config)
    return ExitCode.OK


def cmd_show(args: argparse.Namespace) -> int:
    from engine import keys

    loaded = load_config(args.config)
    if args.audit_public_key:
        print(keys.audit_public_key_pem(loaded), end="")
        return ExitCode.OK
    report = keys.show_keys(loaded, verify=args.verify)
    if args.format == "json":
        print(json.dumps({
            "project": report.project,
            "keyset": str(report.keyset_path),
            "kek": report.kek,
            "kek_reference": report.kek_reference,
            "kek_version": report.kek_version,
            "primary_key_id": report.primary_id,
            "keys": [{"id": k.key_id, "status": k.status, "primary": k.primary, "created": k.created,
                      "type_url": k.type_url} for k in report.keys],
            "audit_public_key_pem": report.audit_public_key_pem,
            "verified": report.verified,
            "versions_kept": report.versions_kept,
            "notes": list(report.notes),
        }, indent=2))
        return ExitCode.OK
    print(f"project {report.project}: keyset {report.keyset_path}")
    _print_report(report, args.config)
    return ExitCode.OK


def _print_report(report, config: str) -> None:
    version = f" (key version {report.kek_version})" if report.kek_version else ""
    print(f"wrapped by: {report.kek}{version}")
    if report.verified:
        print("verified: the configured KEK unwraps the keyset")
    print()
    print_table(
        ["key id", "status", "primary", "created"],
        [[str(k.key_id), k.status, "yes" if k.primary else "", k.created or "unknown"] for k in report.keys],
    )
    if report.versions_kept:
        print(f"\nevery version of the wrapped keyset is kept: {report.versions_kept} in {report.versions_dir}")
    if report.audit_public_key_pem:
        print(f"\naudit-signing key: Ed25519 (public key: `exitplan keys show --config {shlex.quote(str(config))} "
              "--audit-public-key`)")
    for note in report.notes:
        print(f"note: {note}")
