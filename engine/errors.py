"""The error a command meets when a source or destination cannot be used, and the one place a
connector's error becomes it (for the run, the dry run, inventory, verify, restore and cleanup)."""

from __future__ import annotations

from typing import Callable, TypeVar

from config.errors import ExitCode, UserError
from connectors.base import AuthError, ConfigError, ConnectorError, NotFound

T = TypeVar("T")


class RunError(UserError):
    """The run could not start or go on: a source or destination unreachable, denied or missing.

    Exit code 2 when the configuration must change (credentials refused, container or bucket
    missing, endpoint unusable), 1 otherwise (the service failed; running again may succeed).
    """

    def __init__(self, message: str, cause: ConnectorError | None = None):
        fix_config = isinstance(cause, (AuthError, ConfigError, NotFound))
        super().__init__(message, ExitCode.USAGE if fix_config else ExitCode.FAILED)


def call_endpoint(what: str, fn: Callable[..., T], *args) -> T:
    """Call `fn(*args)`; a connector error (unreachable, denied, missing) becomes a `RunError`
    saying `what` failed, with the connector's sentence after it."""
    try:
        return fn(*args)
    except ConnectorError as exc:
        raise RunError(f"{what}: {exc}", exc) from None
