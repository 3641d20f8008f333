"""Load, expand and validate a configuration file; decide lab mode; run the sovereignty gate.

Every problem becomes one sentence naming the file, the field and what is expected
(`ConfigFileError`, exit code 2) or, for the sovereignty gate, which destination is refused and
why (`PolicyRefusal`, exit code 3).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from .azure_connection import connection_string_blob_endpoint
from .errors import ConfigFileError
from .hosts import is_loopback_host
from .lab import azurite_connection_string
from .models import AzureBlobSourceConfig, ExitplanConfig, KekConfig, LoadedConfig
from .policy import check_sovereignty
from .secrets import read_block

# ${VAR} or ${VAR:-default}; innermost first, so a default may itself use a variable:
# ${AWS_ENDPOINT_URL:-http://127.0.0.1:${EXITPLAN_LAB_S3_PORT:-5000}}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^{}]*))?\}")

# Field names that would hold a secret in the YAML itself: refused with a pointer to `*_env` / `*_block`.
_SECRET_FIELDS = {
    "access_key_id", "secret_access_key", "session_token", "connection_string", "sas_token",
    "account_key", "password", "secret", "token", "client_secret",
}


# `keys.kek` is a union tagged by `backend`: pydantic puts the tag in an error's location
# (`keys.kek.openbao.token_env`); the file has no such level, so it is dropped.
_KEK_BACKENDS = {
    tag for member in get_args(get_args(KekConfig)[0]) for tag in get_args(member.model_fields["backend"].annotation)
}


def _where(loc: tuple[Any, ...]) -> str:
    if len(loc) > 2 and tuple(loc[:2]) == ("keys", "kek") and loc[2] in _KEK_BACKENDS:
        loc = tuple(loc[:2]) + tuple(loc[3:])
    return ".".join(str(p) for p in loc) or "(top level)"


def _expand(node: Any, loc: tuple[Any, ...], path: Path) -> Any:
    """Expand ${VAR} / ${VAR:-default} in strings; refuse literal secrets."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if isinstance(key, str) and key.lower() in _SECRET_FIELDS:
                raise ConfigFileError(
                    f"{path}: field `{_where(loc + (key,))}`: secrets are never read from the config file; "
                    f"put the value in an environment variable and write `{key}_env: VARIABLE_NAME` instead "
                    "(or in a Prefect block: see the `*_block` fields in the README's configuration reference)"
                )
            out[key] = _expand(value, loc + (key,), path)
        return out
    if isinstance(node, list):
        return [_expand(v, loc + (i,), path) for i, v in enumerate(node)]
    if isinstance(node, str):
        def sub(m: re.Match) -> str:
            value = os.environ.get(m.group(1))
            if value is None or value == "":
                if m.group(2) is not None:
                    return m.group(2)
                raise ConfigFileError(
                    f"{path}: field `{_where(loc)}`: environment variable {m.group(1)} is not set; "
                    f"set it or write ${{{m.group(1)}:-default}}"
                )
            return value
        while True:
            expanded = _VAR.sub(sub, node)
            if expanded == node:
                return expanded
            node = expanded
    return node


def _pydantic_sentence(path: Path, exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = _where(tuple(p for p in err["loc"]))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "is not a known setting (check its spelling and indentation against the README's configuration reference)"
    elif err["type"] == "missing":
        msg = "is required"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    elif err["type"] == "string_pattern_mismatch":
        msg = f"{err.get('input')!r} does not have the expected form ({err['ctx']['pattern']})"
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return f"{path}: field `{where}`: {msg}{more}"


def source_endpoint(src: AzureBlobSourceConfig, *, where=None, name: str = "") -> str | None:
    """The blob endpoint URL a source talks to: its `account_url`, else the one its connection
    string names (read from the environment variable, or the Prefect block, for that purpose
    only). `where` (the config file) and `name` (the source's) are for error messages."""
    if src.account_url:
        return src.account_url
    if src.connection_string_env or src.connection_string_block:
        conn = source_connection_string(src, where=where, name=name)
        field = f"sources.{name}.connection_string_{'block' if src.connection_string_block else 'env'}"
        return connection_string_blob_endpoint(conn, where=where, source=name, field=field) if conn else None
    return None


def source_connection_string(src: AzureBlobSourceConfig, *, where=None, name: str = "") -> str | None:
    """The connection string a source uses: its Prefect block's (a `ConfigFileError` if it cannot
    be read), else its environment variable's, else the emulator's, else None."""
    if src.connection_string_block:
        return read_block(where, f"sources.{name}.connection_string_block", src.connection_string_block, "connection_string")
    conn = os.environ.get(src.connection_string_env or "")
    if conn:
        return conn
    if src.emulator == "azurite":
        return azurite_connection_string()
    return None


def off_loopback(cfg: ExitplanConfig, where=None) -> str | None:
    """Why the config is not in lab mode (the first endpoint off loopback), or None in lab mode.

    Lab mode is not a flag: it is when every endpoint of the configuration is on loopback.
    """
    for name, src in cfg.sources.items():
        url = source_endpoint(src, where=where, name=name)
        if url is None:
            if src.connection_string_env and not os.environ.get(src.connection_string_env):
                why = f"environment variable {src.connection_string_env} is not set"
            else:
                why = "its connection string names no blob endpoint"
            return f"source `{name}` has no known endpoint ({why})"
        if not is_loopback_host(urlsplit(url).hostname):
            return f"source `{name}` is at {urlsplit(url).hostname}"
    for name, dest in cfg.destinations.items():
        if not is_loopback_host(dest.host):
            return f"destination `{name}` is at {dest.host}"
    return None


def load_config(path: str | os.PathLike, *, check_policy: bool = True) -> LoadedConfig:
    """Read `path`, expand variables, validate, decide lab mode and (by default) run the gate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: no such configuration file; pass an existing file with --config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{path}: cannot read the configuration file ({exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigFileError(f"{path}: not valid YAML{at}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigFileError(f"{path}: expected a YAML mapping with `project`, `sources`, `destinations` and `datasets`")
    expanded = _expand(raw, (), path)
    try:
        cfg = ExitplanConfig.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigFileError(_pydantic_sentence(path, exc)) from None
    problems = cfg.reference_problems()
    if problems:
        where, what = problems[0]
        raise ConfigFileError(f"{path}: field `{where}`: {what}")
    not_lab = off_loopback(cfg, path)
    loaded = LoadedConfig(path=path, config=cfg, lab_mode=not_lab is None, not_lab_reason=not_lab)
    if check_policy:
        check_sovereignty(loaded)
    return loaded
