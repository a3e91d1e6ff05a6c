"""The engine's error hierarchy: what an error means to the person who runs the command.

* :class:`CvsegError`: the base of every error the engine raises on purpose.
* :class:`UserError`: the input, the configuration, the warehouse or the machine needs something
  the message names (a column to map, a key to set, a table to build first, Java to install). The
  command line prints the message alone and exits 2.
* :class:`InternalError`: a broken invariant of the engine itself (a table written against its
  declared schema, a model used before it was fitted): exit 1, with ``--debug`` for the traceback.

Each stage's error keeps a builtin base as well (``class IngestError(UserError, ValueError)``), so
code that catches ``ValueError`` / ``RuntimeError`` keeps working. ``jobs/common.py`` turns these
into exit codes with ``isinstance`` checks: no list of class names to keep in step.
"""
from __future__ import annotations


class CvsegError(Exception):
    """Base of every error the engine raises on purpose."""


class UserError(CvsegError):
    """Something outside the engine needs fixing; the message says what (exit code 2)."""


class InternalError(CvsegError):
    """A broken invariant of the engine itself (exit code 1)."""
