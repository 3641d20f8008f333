"""Credentials the configuration names, read at the last moment: an environment variable or a
Prefect block.

The YAML never holds a secret. Each credential is either the *name* of an environment variable
(`*_env` fields) or a reference to a Prefect block (`*_block` fields), written
`<block-type-slug>/<block-name>`, e.g. `secret/ovh-secret-key` or `aws-credentials/ovh-prod`. The
engine and the KEK adapters call `read_secret` when they build a client, hand the value to it and
keep it nowhere else: never in a result, a log, an error message or a repr.

`config` never imports prefect (ARCHITECTURE §2). Reading a block is delegated to a *block reader*
that the `flows` package installs when it is imported (`flows/blocks.py`, with the Prefect client):
`set_block_reader(fn)`, where `fn(block_type_slug, block_name)` returns the block document's data
with its secret fields in clear, raises `BlockNotFound` when there is no such block, and
`BlockUnreachable(reason)` when the Prefect API cannot answer. Which field of the document holds the
credential is decided here (`BLOCK_FIELDS`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConfigFileError

BLOCK_REF = re.compile(r"^([a-z0-9][a-z0-9-]*)/([a-z0-9][a-z0-9-]*)$")

SECRET = "secret"  # Prefect's own Secret block: one value, in its `value` field
AWS_CREDENTIALS = "aws-credentials"  # prefect-aws AwsCredentials
AZURE_BLOB_CREDENTIALS = "azure-blob-storage-credentials"  # prefect-azure AzureBlobStorageCredentials

# Per block type, the document field that holds each kind of credential. A Secret block holds one
# credential of any kind, in `value`.
BLOCK_FIELDS: dict[str, dict[str, str]] = {
    AWS_CREDENTIALS: {
        "access_key_id": "aws_access_key_id",
        "secret_access_key": "aws_secret_access_key",
        "session_token": "aws_session_token",
    },
    AZURE_BLOB_CREDENTIALS: {"connection_string": "connection_string"},
}

BlockReader = Callable[[str, str], Mapping[str, Any]]
_reader: BlockReader | None = None


class BlockNotFound(Exception):
    """Raised by a block reader: no block of that type has that name."""


class BlockUnreachable(Exception):
    """Raised by a block reader: the Prefect API cannot be asked (the argument says why, in a few
    words, naming no secret)."""


def set_block_reader(reader: BlockReader | None) -> BlockReader | None:
    """Install the function that reads a block document (None: uninstall); returns the previous one."""
    global _reader
    previous, _reader = _reader, reader
    return previous


def block_reader() -> BlockReader | None:
    return _reader


def parse_block_ref(text: str, example: str = "secret/NAME") -> tuple[str, str]:
    """`"<block-type-slug>/<block-name>"` → (slug, name); ValueError with a sentence otherwise (that
    never repeats `text`)."""
    m = BLOCK_REF.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(
            "not a Prefect block reference; expected `<block-type-slug>/<block-name>` such as "
            f"`{example}` (lower-case letters, digits and '-'; the value given is not repeated: it may be a secret "
            "pasted in place of the reference)"
        )
    return m.group(1), m.group(2)


def check_block_ref(text: str, allowed: tuple[str, ...], hint: str = "") -> str:
    """`text` if it is a block reference whose type is one of `allowed`; ValueError otherwise."""
    slug, _ = parse_block_ref(text, f"{allowed[0]}/NAME")
    if slug not in allowed:
        kinds = " or ".join(f"`{s}/NAME`" for s in allowed)
        raise ValueError(f"a `{slug}` block cannot hold this credential; expected {kinds}{hint}")
    return text


def block_field(slug: str, item: str) -> str:
    """The document field of a `slug` block that holds credential `item`."""
    if slug == SECRET:
        return "value"
    try:
        return BLOCK_FIELDS[slug][item]
    except KeyError:
        raise ValueError(f"a `{slug}` block does not hold a {item.replace('_', ' ')}") from None


def _prefix(where: Any) -> str:
    """`"<config file>: "` when the config file is known (a LoadedConfig, a path), else nothing."""
    path = getattr(where, "path", where)
    return f"{path}: " if path else ""


# An environment variable's name as people write them: upper-case letters, digits and '_'.
_USUAL_VARIABLE = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")


def shown_variable(var: str) -> str:
    """`var`, the name of an environment variable a config field gives, as a message may show it:
    itself when it reads like a variable's name, else a stand-in. A `*_env` field that holds a
    secret pasted in place of the name (a lower-case hex token is a valid name) must not be
    echoed in the error that says the "variable" is unset."""
    if _USUAL_VARIABLE.match(var):
        return var
    return "(a name that does not read like a variable's: it may be a pasted secret, so it is not repeated)"


def read_env(where: Any, field: str, var: str) -> str:
    """The value of environment variable `var`, which config field `field` names; a config error
    (exit code 2) when it is unset or empty."""
    value = os.environ.get(var)
    if not value:
        raise ConfigFileError(
            f"{_prefix(where)}field `{field}` names the environment variable {shown_variable(var)}, which is not set; "
            "export it before running"
        )
    return value


def read_block(where: Any, field: str, ref: str, item: str = "secret", *, required: bool = True) -> str | None:
    """The credential `item` held by the Prefect block `ref`, which config field `field` names.

    A block that does not exist, a document without that field (or with an empty one), a Prefect
    API that cannot be reached, or no block reader installed: a `ConfigFileError` (exit code 2),
    one sentence naming the field and the block, never a value. `required=False` returns None
    for a field that is absent or empty (an optional session token).
    """
    at = f"{_prefix(where)}field `{field}`"
    slug, name = parse_block_ref(ref)
    try:
        key = block_field(slug, item)
    except ValueError as exc:
        raise ConfigFileError(f"{at}: the Prefect block {ref}: {exc}") from None
    reader = _reader
    if reader is None:
        raise ConfigFileError(
            f"{at}: the Prefect block {ref} cannot be read here (no block reader: run through the `exitplan` "
            "command or the Prefect flows), or use an environment variable instead"
        )
    try:
        data = reader(slug, name)
    except BlockNotFound:
        raise ConfigFileError(
            f"{at}: there is no Prefect block {ref} (type `{slug}`, name `{name}`) on the Prefect API in use; "
            "create it or fix the reference"
        ) from None
    except BlockUnreachable as exc:
        raise ConfigFileError(f"{at}: the Prefect block {ref} cannot be read: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a reader's unexpected failure; its text could hold anything
        raise ConfigFileError(f"{at}: the Prefect block {ref} cannot be read ({type(exc).__name__})") from None
    value = data.get(key) if isinstance(data, Mapping) else None
    if value is None or value == "":
        if not required:
            return None
        raise ConfigFileError(f"{at}: the Prefect block {ref} has no `{key}` value; set it in the block")
    if not isinstance(value, str):
        raise ConfigFileError(f"{at}: the Prefect block {ref} holds a {type(value).__name__} in `{key}`, not a string")
    return value


def read_secret(
    where: Any,
    field: str,
    *,
    env: str | None = None,
    block: str | None = None,
    item: str = "secret",
    required: bool = True,
) -> str | None:
    """One credential, from the environment variable `env` or the Prefect block `block` (exactly
    one of them), at the last moment.

    `where` is the LoadedConfig (or the config file's path) for messages; `field` the config
    field that holds the reference, e.g. `destinations.ovh.credentials.secret_access_key_block`;
    `item` which credential of a multi-credential block is wanted (`access_key_id`,
    `secret_access_key`, `session_token`, `connection_string`; a Secret block has only one).
    Errors are `ConfigFileError`s (exit code 2) naming the field, never the value.
    """
    if (env is None) == (block is None):
        raise ValueError("read_secret: give exactly one of env= or block=")
    if block is not None:
        return read_block(where, field, block, item, required=required)
    if not required:
        return os.environ.get(env) or None
    return read_env(where, field, env)
