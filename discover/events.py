"""How a long piece of work reports its progress: :class:`Events`.

The runs (:mod:`discover.runs`) and the report (:mod:`discover.report`) call it; the
command line passes a :class:`discover.console.Bar`, which draws it. Also
:class:`discover.runs.Events`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class Tally:
    """What every run counts: images processed, boxes written, images that failed, and
    the seconds it took (the summaries of :mod:`discover.runs` and :mod:`discover.report`
    add their own fields)."""

    images: int = 0
    boxes: int = 0
    failures: int = 0
    elapsed: float = 0.0


class Events:
    """Progress of a run; the default does nothing. Override what you show."""

    def start(self, total: int, description: str) -> None:
        """``total`` images are about to be processed."""

    def advance(self, status: str) -> None:
        """One image is done; ``status`` is a short running summary."""

    def warn(self, text: str) -> None:
        """Something the user should see (a bad file, a resume note)."""

    def info(self, text: str) -> None:
        """A note on what the run does (e.g. what resume found)."""
