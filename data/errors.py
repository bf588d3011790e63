"""The project's exception hierarchy.

Every error a user can cause (bad path, missing column, corrupt bundle, ...) derives from
``RecsysError``, so the CLI can turn it into a one-line message and exit code 1, and the HTTP layer
into a 4xx answer. Anything else escaping is a bug and is allowed to show a traceback.
"""

from __future__ import annotations


class RecsysError(Exception):
    """Base class of every error a user can cause and fix."""


class DataError(RecsysError, ValueError):
    """Input data is missing, malformed or inconsistent (the message names the input)."""


class ConfigError(RecsysError, ValueError):
    """A configuration value is invalid or inconsistent."""


class NotFittedError(RecsysError, RuntimeError):
    """A model or component was used before ``fit`` was called."""


class BundleError(RecsysError):
    """A model bundle is missing, corrupt, or does not match its manifest."""
