"""What ``ftkit run`` says, and how: every line, only the results, or JSON for scripts.

Each thing a run says is an event: a kind (``step``, ``evaluation``, ``trained``, ``done``, ...),
the line a person reads, and for scripts the numbers behind it. :class:`Console` decides what is
shown:

- by default every line on stdout, and during training a live status line on stderr when stderr
  is a terminal (rewritten in place, cleared before each lasting line);
- ``quiet``: warnings, errors and the final results only;
- ``json``: each event as one JSON object per line on stdout, e.g.
  ``{"event": "step", "level": "info", "message": "step 40/240 · loss 0.41 · …", "step": 40, …}``.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable
from typing import Any, TextIO

#: An event's level: ``progress`` (a heartbeat during a long step), ``info``, ``warning``,
#: ``result`` (the final results) or ``error``. ``quiet`` shows only these:
SHOWN_WHEN_QUIET = frozenset({"warning", "result", "error"})


class Console:
    """Where a run's events go; callable with a plain line, as the helpers that take an ``echo`` do."""

    def __init__(self, *, quiet: bool = False, json: bool = False, write: Callable[[str], None] = print,
                 live: bool = True, status: TextIO | None = None) -> None:
        """
        :param quiet: show warnings, errors and results only.
        :param json: one JSON object per event instead of its line.
        :param write: prints one lasting line (stdout).
        :param live: allow a live status line: shown only when ``status`` is a terminal and neither
            ``quiet`` nor ``json`` is set.
        :param status: the live status line's stream; stderr by default.
        """
        self.quiet = quiet
        self.json = json
        self.write = write
        status = sys.stderr if status is None else status
        self.status = status if live and not quiet and not json and status.isatty() else None
        self.live_line = ""

    @property
    def on_terminal(self) -> bool:
        """Whether a live status line shows progress (else a long step prints a plain line now and then)."""
        return self.status is not None

    def __call__(self, message: str) -> None:
        """A plain line: a warning when it starts with ``Warning:``, otherwise information."""
        if message.startswith("Warning: "):
            self.event("warning", message, level="warning")
        else:
            self.event("info", message)

    def event(self, kind: str, message: str, /, *, level: str = "info", **fields: Any) -> None:
        """Say ``message`` (or, with ``json``, the event with its ``fields``) unless ``quiet`` hides ``level``."""
        if self.quiet and level not in SHOWN_WHEN_QUIET:
            return
        if self.json:
            record = {"event": kind, "level": level, "message": message, **fields}
            line = json.dumps(_finite(record), ensure_ascii=False)
        else:
            line = message
        self._erase_live()
        self.write(line)
        self._draw_live()

    def live(self, message: str) -> None:
        """Show ``message`` as the live status line (on a terminal only); ``""`` takes it away."""
        if self.status is None:
            return
        self._erase_live()
        width = shutil.get_terminal_size().columns - 1
        self.live_line = message if len(message) <= width else message[:max(width - 1, 0)] + "…"
        self._draw_live()

    def _erase_live(self) -> None:
        if self.status is not None and self.live_line:
            self.status.write("\r\x1b[K")
            self.status.flush()

    def _draw_live(self) -> None:
        if self.status is not None and self.live_line:
            self.status.write(self.live_line)
            self.status.flush()


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: strict JSON (``jq``, JavaScript) has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def short_number(value: float) -> str:
    """A loss in four significant digits: ``1.783``, ``0.005123``."""
    return f"{value:.4g}"


def scientific(value: float) -> str:
    """A learning rate as people write one: ``1.9e-4``, ``2e-5``, ``0``."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def rate_text(steps_per_second: float) -> str:
    """``7.8 it/s``, or ``2.3 s/it`` when a step takes longer than a second."""
    if steps_per_second >= 1 or steps_per_second <= 0:
        return f"{steps_per_second:.1f} it/s"
    return f"{1 / steps_per_second:.1f} s/it"


def duration_text(seconds: float) -> str:
    """``0:21``, ``12:05``, ``1:02:03``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
