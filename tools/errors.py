"""User-facing errors.

Every error a user can cause derives from :class:`HesscError`. Its message names the problem and
the fix in one line; the CLI prints exactly that line and exits non-zero, without a traceback.
"""

from __future__ import annotations


class HesscError(Exception):
    """A problem with the user's input or request, with a message that says how to fix it."""

    exit_code = 2


class InputError(HesscError):
    """The model, calibration data or an option cannot be used as given."""


class UnsupportedError(HesscError):
    """The request is well formed but hessc (or the target runtime) cannot carry it out."""


class VerificationError(HesscError):
    """A produced model failed its check against the reference model."""

    exit_code = 3
