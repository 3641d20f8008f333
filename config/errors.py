"""Exit codes shared by every command, and the error a user can act on."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # some objects failed, or discrepancies were found (each named)
    USAGE = 2  # usage or configuration error
    REFUSED = 3  # refused by the sovereignty policy
    KEY_ERROR = 4  # key or KMS error (KEK unreachable, wrong key)


class UserError(Exception):
    """An error the user can fix: printed as one sentence, no traceback, with its exit code."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str, exit_code: ExitCode | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigFileError(UserError):
    """The configuration file is missing, unreadable or invalid (exit code 2)."""

    exit_code = ExitCode.USAGE


class PolicyRefusal(UserError):
    """The sovereignty policy refuses a destination (exit code 3)."""

    exit_code = ExitCode.REFUSED
