"""User-facing errors.

An :class:`IntraSliceError` is a problem with the user's input (unknown architecture, bad
ratio, missing data...). The CLI prints its message on one line and exits non-zero
without a traceback; anything else is a bug and keeps its traceback.
"""


class IntraSliceError(Exception):
    """A user error with a one-line, actionable message."""


class NonFiniteError(IntraSliceError):
    """NaN or Inf found in activations or statistics."""
