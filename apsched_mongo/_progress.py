"""Progress of a long command: a bar redrawn in place on a terminal, plain periodic lines
otherwise (a log file or CI output must not fill with carriage returns)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 24


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """Call with ``(done, total)`` as work advances; :meth:`finish` ends the display.

    :param label: what is being counted (``"documents"``)
    :param stream: where to write (stderr by default, so stdout stays the report)
    :param every: seconds between plain lines when ``stream`` is not a terminal
    :param clock: monotonic seconds (a testing aid)
    """

    def __init__(self, label: str, stream: TextIO | None = None, *, every: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.every = every
        self.clock = clock
        self.interactive = self.stream.isatty()
        self.started = clock()
        self._last_line = self.started
        self._drawn = False
        self._done = self._total = 0

    def line(self, done: int, total: int) -> str:
        """``1,200/10,000 documents (12%), 850/s, ETA 10s``."""
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = done / elapsed
        text = f"{done:,}/{total:,} {self.label}"
        if total:
            text += f" ({100 * done // total}%)"
        text += f", {rate:,.0f}/s"
        if rate > 0 and done < total:
            text += f", ETA {_duration((total - done) / rate)}"
        elif done >= total:
            text += f", {_duration(elapsed)}"
        return text

    def __call__(self, done: int, total: int) -> None:
        self._done, self._total = done, total
        if self.interactive:
            filled = BAR_WIDTH * done // total if total else BAR_WIDTH
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            self.stream.write(f"\r[{bar}] {self.line(done, total)}\x1b[K")
            self.stream.flush()
            self._drawn = True
        elif self.clock() - self._last_line >= self.every:
            self._last_line = self.clock()
            print(self.line(done, total), file=self.stream, flush=True)

    def finish(self) -> None:
        """End the bar's line (on a terminal), or print the final count (otherwise)."""
        if self.interactive:
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()
        elif self._total:
            print(self.line(self._done, self._total), file=self.stream, flush=True)
