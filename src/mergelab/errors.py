"""Exception families raised for user-facing failures.

Every error a user can cause (a typo in a recipe, a broken file, a shape that does not match)
is one of these. Messages are one line and name the file, the tensor and the fix; the CLI
prints them without a traceback and exits non-zero.
"""

from __future__ import annotations


class MergelabError(Exception):
    """Base class of every error mergelab reports to a user."""

    exit_code = 1


class RecipeError(MergelabError):
    """The recipe (YAML or Python) is malformed: unknown keys, bad values, unknown method."""

    exit_code = 2


class ParameterError(RecipeError):
    """A method parameter is unknown or outside its allowed range."""


class CheckpointError(MergelabError):
    """A checkpoint cannot be found, opened or parsed (missing, truncated, corrupt, unsupported)."""

    exit_code = 3


class PlanError(MergelabError):
    """The inputs do not fit together: missing tensors, shape or vocabulary mismatches."""

    exit_code = 4


class InputDataError(MergelabError):
    """Tensor data is unusable (NaN or Inf values) in an input."""

    exit_code = 5


class OutputError(MergelabError):
    """The destination cannot be written (exists without --force, not writable)."""

    exit_code = 6


class OptionError(RecipeError):
    """A command-line option or Python argument is invalid: an unknown device or executor, a thread
    count below 1, an argument of the wrong type."""


class InternalError(MergelabError):
    """Not the user's fault: a method raised unexpectedly or an internal invariant broke (exit 1; a bug
    to report, with the traceback that ``MERGELAB_DEBUG=1`` shows)."""

    exit_code = 1
