"""`exitplan deploy`: register the Prefect deployments of `deploy/prefect.yaml` on the configured
Prefect server (ARCHITECTURE.md §8).

`deploy --config F [--pool exitplan] [--deployment NAME]...`:
1. loads and checks the configuration (errors: exit 2; the sovereignty gate refuses a destination
   at load: exit 3);
2. requires a Prefect API (PREFECT_API_URL, or the active Prefect profile) that answers;
3. creates the `process` work pool when it is missing (refuses a pool of another type);
4. creates (or updates) the global concurrency limits the flows take their connections from, one
   per destination provider (`flows.provider_limits`);
5. runs `prefect --no-prompt deploy --all --prefect-file deploy/prefect.yaml` from the repository
   root, with EXITPLAN_CONFIG set to the configuration's absolute path (the deployments' `config_path`
   parameter), no ephemeral server and analytics off; with `--pool` or `--deployment` it deploys a
   copy of the file restricted to those deployments, on that pool;
6. reads back what was registered and prints it, with the command that starts a worker and the
   environment variables the workers need (names only, never values);
7. creates, updates or removes the alerts of the `alerts` section (Prefect automations,
   `flows.alerts`).

The repository is the deployable unit: the workers run the flows from this checkout
(`deploy/prefect.yaml` records its path at deploy time).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

import flows
from config.errors import ConfigFileError, ExitCode, UserError
from config.loader import load_config
from config.models import LoadedConfig
from config.secrets import shown_variable
from config.yaml_files import load_yaml_file
from flows.provider_limits import ensure_provider_limits, provider_limit_name, provider_limits

REPO_ROOT = Path(flows.__file__).resolve().parent.parent
PREFECT_FILE = Path("deploy") / "prefect.yaml"  # relative to REPO_ROOT
DEFAULT_POOL = "exitplan"
# What every Prefect process exitplan starts (and every worker) must have.
QUIET_PREFECT_ENV = {"PREFECT_SERVER_EPHEMERAL_ENABLED": "false", "DO_NOT_TRACK": "1"}
SHARDS_DEPLOYMENT_NAME = "shards"  # started by a run itself (`orchestration.shard_workers`), never alone
DEPLOY_TIMEOUT = 600.0  # seconds for `prefect deploy` (a few deployments take a few seconds)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy", help="register the Prefect deployments (deploy/prefect.yaml) on the configured Prefect server",
        description="Register exitplan's Prefect deployments (on-demand exit plan, nightly delta migration, weekly "
                    "verify) on the Prefect server of PREFECT_API_URL, for a process work pool.",
    )
    p.add_argument("--config", "-c", required=True, metavar="FILE",
                   help="the exitplan YAML configuration; its absolute path, as the workers see it, becomes the "
                        "deployments' config_path parameter")
    p.add_argument("--pool", default=DEFAULT_POOL, metavar="NAME",
                   help=f"the process work pool (created when missing; default: {DEFAULT_POOL})")
    p.add_argument("--deployment", action="append", default=[], metavar="NAME",
                   help="only this deployment of deploy/prefect.yaml (repeatable; default: all of them)")
    p.set_defaults(func=cmd_deploy)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def cmd_deploy(args: argparse.Namespace) -> int:
    loaded = load_config(args.config)  # exit 2 on a bad config, 3 when the sovereignty policy refuses
    config_path = loaded.path.resolve()
    prefect_file = REPO_ROOT / PREFECT_FILE
    spec = _read_prefect_file(prefect_file)
    chosen = _chosen_deployments(spec, args.deployment, prefect_file)
    url = api_url()
    check_api(url)
    _ensure_process_pool(args.pool)

    limits = provider_limits(loaded, list(loaded.config.datasets))
    ensure_provider_limits(limits)
    print("connection limits: " + ", ".join(f"{provider_limit_name(p)} = {n}" for p, n in limits.items()))

    _run_prefect_deploy(spec, chosen, args.pool, prefect_file, config_path, url)
    registered = _read_back(chosen)
    _name_datasets(registered, list(loaded.config.datasets))
    _print_registered(registered, args.pool)
    _ensure_alerts(loaded, spec)
    _print_worker(loaded, args.pool, url)
    return ExitCode.OK


def _read_prefect_file(path: Path) -> dict[str, Any]:
    try:
        spec = load_yaml_file(path, "the deployments file")
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: not found; `exitplan deploy` runs from a checkout of the exitplan "
                              "repository (the deployable unit), not from an installed package") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("deployments"), list) or not spec["deployments"]:
        raise ConfigFileError(f"{path}: expected a `deployments` list")
    return spec


def _chosen_deployments(spec: dict[str, Any], names: list[str], path: Path) -> list[dict[str, Any]]:
    known = [d.get("name") for d in spec["deployments"]]
    for name in names:
        if name not in known:
            raise ConfigFileError(f"{path}: no deployment named {name!r} (deployments: {', '.join(known)}); "
                                  "check --deployment")
    return [d for d in spec["deployments"] if not names or d.get("name") in names]


def api_url() -> str:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise UserError("no Prefect server is configured: set PREFECT_API_URL to its API URL (in the lab: "
                        "`eval \"$(exitplan lab env)\"` after `exitplan lab up`; otherwise e.g. "
                        "http://prefect.example.internal:4200/api)")
    return str(url)


def check_api(url: str) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise UserError(f"the Prefect API at {_shown_url(url)} does not answer ({type(problem).__name__}); start the "
                        "server (in the lab: `exitplan lab up`) or correct PREFECT_API_URL")


def _ensure_process_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=ProcessWorker.type,
                                                   base_job_template=ProcessWorker.get_default_base_job_template(),
                                                   description="exitplan: flows run as processes of the workers"))
            print(f"work pool {name!r} (type process) created")
            return
    if pool.type != ProcessWorker.type:
        raise UserError(f"the work pool {name!r} exists with type {pool.type!r}; exitplan's deployments run on a "
                        "`process` pool: choose another name with --pool")
    print(f"work pool {name!r} (type process) exists")


def _run_prefect_deploy(spec: dict[str, Any], chosen: list[dict[str, Any]], pool: str, prefect_file: Path,
                        config_path: Path, api_url: str) -> None:
    """`prefect --no-prompt deploy --all --prefect-file ...` from the repository root."""
    env = dict(os.environ, EXITPLAN_CONFIG=str(config_path), PREFECT_API_URL=api_url, **QUIET_PREFECT_ENV)
    whole = len(chosen) == len(spec["deployments"]) and all(
        (d.get("work_pool") or {}).get("name") == pool for d in chosen)
    with tempfile.TemporaryDirectory(prefix="exitplan-deploy-") as tmp:
        if whole:
            target = prefect_file
        else:
            # `prefect deploy --all` ignores --pool, and --name selects by pattern: deploy a copy
            # of the file with the chosen deployments on the chosen pool (entrypoints and the
            # recorded checkout stay relative to the working directory, the repository root).
            target = Path(tmp) / "prefect.yaml"
            copy = dict(spec, deployments=[dict(d, work_pool=dict(d.get("work_pool") or {}, name=pool))
                                           for d in chosen])
            target.write_text(yaml.safe_dump(copy, sort_keys=False), encoding="utf-8")
        argv = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(target)]
        print(f"registering {', '.join(d['name'] for d in chosen)} (config_path {config_path}): "
              f"prefect --no-prompt deploy --all --prefect-file {target if not whole else PREFECT_FILE}", flush=True)
        try:
            done = subprocess.run(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=DEPLOY_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise UserError(f"`prefect deploy` did not finish within {DEPLOY_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise UserError(f"`prefect deploy` failed with exit code {done.returncode} (its output is above)")


def _read_back(chosen: list[dict[str, Any]], *, missing_ok: bool = False) -> list[tuple[str, Any]]:
    """(flow/deployment name, deployment) as the server now has them (with `missing_ok`, those it
    has)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.flows import load_flow_from_entrypoint

    out = []
    with get_client(sync_client=True) as client:
        for d in chosen:
            path, _, func = d["entrypoint"].partition(":")
            flow_name = load_flow_from_entrypoint(f"{REPO_ROOT / path}:{func}").name
            full = f"{flow_name}/{d['name']}"
            try:
                out.append((full, client.read_deployment_by_name(full)))
            except ObjectNotFound:
                if not missing_ok:
                    raise
    return out


def _name_datasets(registered: list[tuple[str, Any]], names: list[str]) -> None:
    """The run form's `datasets` field names the configuration's datasets in its description: the
    flows' signature only says "a list of names". (An `enum` of them makes Prefect's form show a
    select with no options: a description it shows as written.)"""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    with get_client(sync_client=True) as client:
        for _, deployment in registered:
            schema = dict(deployment.parameter_openapi_schema or {})
            field = (schema.get("properties") or {}).get("datasets")
            if field is None:
                continue
            described = field.get("description", "").split(" This configuration's: ")[0]
            field = dict(field, description=f"{described} This configuration's: {', '.join(sorted(names))}.")
            schema["properties"] = dict(schema["properties"], datasets=field)
            client.update_deployment(deployment.id, DeploymentUpdate(parameter_openapi_schema=schema))


def _ensure_alerts(loaded: LoadedConfig, spec: dict[str, Any]) -> None:
    """The `alerts` section's automations, watching the runs of every deployment of the file the
    server has (those deployed earlier too), except the shards a run starts itself."""
    from flows.alerts import ensure_alerts

    runs = [d for d in spec.get("deployments") or [] if d.get("name") != SHARDS_DEPLOYMENT_NAME]
    ids = [str(dep.id) for _, dep in _read_back(runs, missing_ok=True)]
    lines = ensure_alerts(loaded, ids)
    if lines:
        print("\n" + "\n".join(lines))


def _print_registered(registered: list[tuple[str, Any]], pool: str) -> None:
    print(f"\nregistered on work pool {pool!r}:")
    for full, dep in registered:
        when = "; ".join(f"cron {s.schedule.cron!r} {s.schedule.timezone}" if getattr(s.schedule, "cron", None)
                         else str(s.schedule) for s in dep.schedules or []) or "on demand"
        if dep.global_concurrency_limit is not None:
            strategy = dep.concurrency_options.collision_strategy.value if dep.concurrency_options else "ENQUEUE"
            when += f", at most {dep.global_concurrency_limit.limit} run at a time ({strategy})"
        params = ", ".join(f"{k}={v}" for k, v in (dep.parameters or {}).items())
        print(f"  {full}: {when}; {params}")
    if registered:
        print(f"\nrun one now: prefect deployment run {shlex.quote(registered[0][0])}")


def _print_worker(loaded: LoadedConfig, pool: str, api_url: str) -> None:
    shown = _shown_url(api_url)
    print("\nstart a worker (from any directory, with this checkout at the same path):")
    print(f"  PREFECT_API_URL={shlex.quote(shown)} exitplan worker --pool {shlex.quote(pool)} "
          f"--config {shlex.quote(str(loaded.path.resolve()))}")
    print("  (a Prefect process worker with private temporary files and a clean stop on SIGTERM; "
          "`prefect worker start --pool ... --type process` works too)")
    required, optional = worker_env_names(loaded)
    if required:
        print("the workers' environment must also hold the variables the configuration names: " + _names(required))
    if optional:
        print("and, where the file's default does not fit: " + _names(optional))


def _names(names: list[str]) -> str:
    """Variable names for the terminal; a name that does not read like one (a secret pasted into a
    `*_env` field is a valid name when it is a hex token) is counted, never shown."""
    shown = [n for n in names if shown_variable(n) == n]
    hidden = len(names) - len(shown)
    more = (f"{' and ' if shown else ''}{hidden} name(s) that do not read like variable names (not shown: check "
            "the `*_env` fields for a value pasted in place of a name)") if hidden else ""
    return ", ".join(shown) + more


def worker_env_names(loaded: LoadedConfig) -> tuple[list[str], list[str]]:
    """The environment variables a worker reads for this configuration, names only: (every `*_env`
    field and every `${VAR}` of the file; the `${VAR:-default}` not among them)."""
    required: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str) and k.endswith("_env") and isinstance(v, str) and v:
                    required.add(v)
                else:
                    walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(loaded.config.model_dump())
    try:
        text = loaded.path.read_text(encoding="utf-8")
    except OSError:
        text = ""
    optional: set[str] = set()
    for name, default in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-)?", text):
        (optional if default else required).add(name)
    return sorted(required), sorted(optional - required)


def _shown_url(url: str) -> str:
    """The URL, or `$PREFECT_API_URL` when it carries user info (never print a credential)."""
    parts = urlsplit(url)
    return "$PREFECT_API_URL" if parts.username or parts.password else url
