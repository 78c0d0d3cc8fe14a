"""Errors that end a run with one clear line and a documented exit code.

Library code raises these; only the CLI turns them into a message and an exit status.
"""
from __future__ import annotations

import errno

# Exit codes, documented in docs/operations.md ("Exit codes").
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_OUTPUT = 4
EXIT_BUSY = 5
EXIT_RESOURCES = 6
EXIT_INTERRUPTED = 130


class StreamromError(Exception):
    """A failure the user can act on; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_INTERNAL


class UsageError(StreamromError):
    """Arguments that cannot work together (ratio out of range, bad layer list, ...)."""

    exit_code = EXIT_USAGE


class InputError(StreamromError):
    """A source checkpoint, calibration or evaluation input that is missing or unusable."""

    exit_code = EXIT_INPUT


class OutputError(StreamromError):
    """The output folder cannot be written as asked (exists, is the source, ...)."""

    exit_code = EXIT_OUTPUT


class BusyError(StreamromError):
    """Another run holds the output folder's lock."""

    exit_code = EXIT_BUSY


class ResourceError(StreamromError):
    """Not enough disk space or memory, found up front or when a write failed."""

    exit_code = EXIT_RESOURCES


class NumericalError(InputError):
    """NaN or Inf in source weights or in activations."""


def write_failure(exc: OSError, where: object, hint: str = "") -> StreamromError:
    """A failed write as the user's error: exit 6 when the disk is full (with `hint`, e.g. how to
    resume), exit 4 otherwise."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ResourceError(f"no space left writing {exc.filename or where}: {exc.strerror}{hint}")
    return OutputError(f"cannot write {exc.filename or where}: {exc.strerror}")
