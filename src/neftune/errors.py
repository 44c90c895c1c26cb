"""Errors a user is meant to read.

Every failure caused by the user's input (a file, a config field, a flag) is raised as a
:class:`NeftuneError` subclass whose message is one line naming the file, line or field.  The CLI
prints that line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class NeftuneError(Exception):
    """Base class for errors caused by user input or environment, shown as one line."""


class ConfigError(NeftuneError, ValueError):
    """A configuration field, YAML file or command-line flag is invalid."""


class DataError(NeftuneError, ValueError):
    """A data file or record is malformed (message names the file and line or record)."""


class ModelError(NeftuneError):
    """A model path, alias or file cannot be loaded."""


class JudgeError(NeftuneError):
    """A judge backend failed or answered something unusable."""
