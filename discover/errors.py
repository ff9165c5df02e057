"""Exceptions raised by regdiscover.

Every error the package raises on purpose derives from :class:`RegdiscoverError`, so a
caller (the CLI in particular) can catch them all and print one clear line.
"""

from __future__ import annotations


class RegdiscoverError(Exception):
    """Base class of every error raised on purpose by regdiscover."""


class WeightsError(RegdiscoverError):
    """Model weights are missing, unreadable or do not match the expected architecture."""


class DatasetError(RegdiscoverError):
    """A dataset is missing, malformed or inconsistent."""


class ImageError(RegdiscoverError):
    """An image cannot be read or has an unusable shape."""


class UsageError(RegdiscoverError):
    """A bad option, path or combination: reported as one line, before any work.

    (Also :class:`discover.runs.UsageError`, where the runs raise it.)"""


class Interrupted(Exception):  # noqa: N818 - what the user did, not an error
    """Ctrl-C stopped a run: the message says what was kept; the CLI exits with 130."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none.

    What every one-line error report of the package shows (tracebacks and multi-line
    messages from libraries never reach the user's terminal whole).
    """
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
