"""One base class for everything a user can get wrong, so every entry point catches one type.

Each error also derives from the built-in it refines (DVC style: ``ConfigError(MlxInterpError,
ValueError)``), so code that catches ``ValueError`` keeps working. Entry points (``mlx-interp``,
``mlx-interp-chat``, ``mlx-interp-cv``, ``mlx-interp-reproduce``) catch ``MlxInterpError``
and print it as one ``error:`` line with exit status 2 (:func:`report_error`); anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import TextIO

USER_ERROR_EXIT = 2  # exit status of every bad-input failure (argparse uses 2 as well)


class MlxInterpError(Exception):
    """Base of every user-facing error; its message names the problem and the fix."""


class ConfigError(MlxInterpError, ValueError):
    """A config value is of the wrong type, out of range or contradicts another key."""


class DataError(MlxInterpError, ValueError):
    """Input data (a dataset, a direction file, a model file) is missing or malformed."""


class UntrustedResultError(MlxInterpError, ValueError):
    """A number the stage would report cannot be trusted (NaN, inf, zero samples, empty
    answers): the stage stops instead of writing it."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (inner newlines become '; ')."""
    text = str(err).strip() or type(err).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def report_error(err: BaseException, stream: TextIO | None = None) -> int:
    """Print ``error: <message>`` (one line) to ``stream`` (stderr); return the exit status 2."""
    print(f"error: {one_line(err)}", file=stream or sys.stderr, flush=True)
    return USER_ERROR_EXIT
