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

from pydantic import ValidationError

from .azure_connection import connection_string_blob_endpoint
from .errors import ConfigFileError
from .hosts import is_loopback_host
from .lab import azurite_connection_string
from .models import AzureBlobSourceConfig, ExitplanConfig, KekConfig, LoadedConfig
from .policy import check_sovereignty
from .secrets import read_block, shown_variable
from .yaml_files import load_yaml_file

_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The expanded strings of one configuration together, in characters: a configuration is a few
# KiB; the bound stops a variable holding megabytes (or a file repeating one reference) from
# growing the loaded configuration without limit.
MAX_EXPANDED_CHARS = 1024 * 1024
# How deep defaults may nest (`${A:-${B:-${C:-x}}}` is 2): a bound on the parser's recursion.
_MAX_DEFAULT_NESTING = 8

# Field names that would hold a secret in the YAML itself: refused with a pointer to `*_env` / `*_block`.
_SECRET_FIELDS = {
    "access_key_id", "secret_access_key", "session_token", "connection_string", "sas_token",
    "account_key", "password", "secret", "token", "client_secret", "private_key", "passphrase",
}


# `keys.kek` is a union tagged by `backend`: pydantic puts the tag in an error's location
# (`keys.kek.openbao.token_env`); the file has no such level, so it is dropped.
_KEK_BACKENDS = {
    tag for member in get_args(get_args(KekConfig)[0]) for tag in get_args(member.model_fields["backend"].annotation)
}


# `sources.<name>` and `destinations.<name>` are unions tagged by `kind`, which pydantic likewise
# puts in the location.
_ENDPOINT_KINDS = {"azure_blob", "s3", "sftp"}


def _where(loc: tuple[Any, ...]) -> str:
    if len(loc) > 2 and tuple(loc[:2]) == ("keys", "kek") and loc[2] in _KEK_BACKENDS:
        loc = tuple(loc[:2]) + tuple(loc[3:])
    if len(loc) > 2 and loc[0] in ("sources", "destinations") and loc[2] in _ENDPOINT_KINDS:
        loc = tuple(loc[:2]) + tuple(loc[3:])
    return ".".join(str(p) for p in loc) or "(top level)"


class _Expansion:
    """`${VAR}` and `${VAR:-default}` in the strings of one configuration, in one pass.

    A variable's value is inserted as it is, never read again for references: a value holding
    `${OTHER}` stays that text (a file says what it reads; an environment cannot smuggle a
    reference in, nor make a value grow by expanding itself). A default is read only when the
    variable is unset or empty, and may itself use variables:
    `${AWS_ENDPOINT_URL:-http://127.0.0.1:${EXITPLAN_LAB_S3_PORT:-5000}}`. Text that is not a
    complete reference (`${1X}`, `${A:-{x}}`, an unclosed `${`) is kept as written.

    The expanded strings of the whole file hold at most `MAX_EXPANDED_CHARS` characters.
    """

    def __init__(self, path: Path):
        self.path = path
        self.left = MAX_EXPANDED_CHARS

    def node(self, node: Any, loc: tuple[Any, ...]) -> Any:
        """`node` (the file's data) with its strings expanded; literal secrets refused."""
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if isinstance(key, str) and key.lower() in _SECRET_FIELDS:
                    raise ConfigFileError(
                        f"{self.path}: field `{_where(loc + (key,))}`: secrets are never read from the config file; "
                        f"put the value in an environment variable and write `{key}_env: VARIABLE_NAME` instead "
                        "(or in a Prefect block: see the `*_block` fields in the README's configuration reference)"
                    )
                out[key] = self.node(value, loc + (key,))
            return out
        if isinstance(node, list):
            return [self.node(v, loc + (i,)) for i, v in enumerate(node)]
        if isinstance(node, str):
            return self.text(node, loc)
        return node

    def text(self, text: str, loc: tuple[Any, ...]) -> str:
        """`text` (the string at `loc`) with its references replaced, left to right."""
        out: list[str] = []
        pos = 0
        while (start := text.find("${", pos)) >= 0:
            ref = _reference(text, start, 0)
            if ref is None:
                out.append(text[pos:start + 2])
                pos = start + 2
                continue
            out.append(text[pos:start])
            self._value(ref[0], out, loc)
            pos = ref[1]
        out.append(text[pos:])
        return "".join(out)

    def _value(self, ref: tuple[str, list | None], out: list[str], loc: tuple[Any, ...]) -> None:
        name, default = ref
        value = os.environ.get(name)
        if value:
            self._spend(len(value), loc)
            out.append(value)
        elif default is not None:
            for part in default:
                if isinstance(part, str):
                    out.append(part)
                else:
                    self._value(part, out, loc)
        else:
            raise ConfigFileError(
                f"{self.path}: field `{_where(loc)}`: environment variable {name} is not set; "
                f"set it or write ${{{name}:-default}}"
            )

    def _spend(self, chars: int, loc: tuple[Any, ...]) -> None:
        """Count `chars` read from the environment (the file's own text is bounded already)."""
        self.left -= chars
        if self.left < 0:
            raise ConfigFileError(
                f"{self.path}: field `{_where(loc)}`: the configuration holds more than {MAX_EXPANDED_CHARS:,} "
                "characters once its ${VARIABLES} are expanded; a variable it reads holds far more than a setting "
                "(check the variables named at that field)"
            )


def _reference(text: str, start: int, depth: int) -> tuple[tuple[str, list | None], int] | None:
    """The reference `${NAME}` or `${NAME:-default}` at `text[start:]` as ((name, default parts or
    None), end), a default part being literal text or a nested reference; None when the text
    there is not a complete reference."""
    m = _VAR_NAME.match(text, start + 2)
    if m is None:
        return None
    name, i = m.group(0), m.end()
    if text.startswith("}", i):
        return (name, None), i + 1
    if not text.startswith(":-", i) or depth >= _MAX_DEFAULT_NESTING:
        return None
    parts: list = []
    i += 2
    literal = i
    while i < len(text):
        c = text[i]
        if c == "}":
            parts.append(text[literal:i])
            return (name, parts), i + 1
        if text.startswith("${", i):
            inner = _reference(text, i, depth + 1)
            if inner is None:
                return None
            parts.append(text[literal:i])
            parts.append(inner[0])
            i = literal = inner[1]
            continue
        if c == "{":
            return None
        i += 1
    return None


def _names_a_secret(loc: tuple[Any, ...]) -> bool:
    """The field at `loc` names where a secret is (`*_env`, `*_block`) or would hold one: its
    value is never repeated in a message."""
    field = next((p for p in reversed(loc) if isinstance(p, str)), "")
    return field.endswith(("_env", "_block")) or field.lower() in _SECRET_FIELDS


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
    elif err["type"] == "string_pattern_mismatch" and _names_a_secret(err["loc"]):
        # The value may be the secret itself, pasted where its variable's name belongs: never repeat it.
        msg = ("is not the name of an environment variable (letters, digits and '_', not starting with a digit); "
               "write the variable's name here and put the value in the environment (the value given is not repeated)")
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
        if src.kind in ("sftp", "s3"):
            if not is_loopback_host(src.host):
                return f"source `{name}` is at {src.host}"
            continue
        url = source_endpoint(src, where=where, name=name)
        if url is None:
            if src.connection_string_env and not os.environ.get(src.connection_string_env):
                why = f"environment variable {shown_variable(src.connection_string_env)} is not set"
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
        raw = load_yaml_file(path, "the configuration file")
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: no such configuration file; pass an existing file with --config") from None
    if not isinstance(raw, dict):
        raise ConfigFileError(f"{path}: expected a YAML mapping with `project`, `sources`, `destinations` and `datasets`")
    expanded = _Expansion(path).node(raw, ())
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
