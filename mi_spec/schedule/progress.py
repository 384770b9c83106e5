"""A plain progress line on stderr: jobs done / total, elapsed, ETA. Quiet when not a terminal
unless asked, and one final line always."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, label: str = "jobs", stream: TextIO | None = None):
        self.total, self.label, self.done, self.cached = total, label, 0, 0
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.live = getattr(self.stream, "isatty", lambda: False)()

    def update(self, n: int = 1, cached: bool = False) -> None:
        self.done += n
        self.cached += n if cached else 0
        if self.live:
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def close(self) -> None:
        self.stream.write(("\r" if self.live else "") + self._line() + "\n")
        self.stream.flush()

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        computed = self.done - self.cached
        left = self.total - self.done
        eta = elapsed / computed * left if computed else 0.0
        cached = f", {self.cached} from cache" if self.cached else ""
        return (
            f"[{self.done}/{self.total} {self.label}{cached}] "
            f"{elapsed:5.1f}s elapsed, ETA {eta:4.0f}s"
        )
