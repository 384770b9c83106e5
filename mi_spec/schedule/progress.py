"""What a run says on stderr while it works: the file/study, each stage with its time, job progress,
and a summary per study and per command.

On a terminal the current stage is one live line (``\\r``), rewritten in place and ended with the
stage's time. Elsewhere (CI, Slurm, ``| tee``) every line is a plain log line: a stage's start and
its end, and job progress at most once every `LOG_EVERY_S` seconds or each further tenth of the
jobs. ``quiet`` keeps only the summary line per study (errors are the CLI's); ``verbose`` adds a
line per job.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, TextIO

Verbosity = Literal["quiet", "normal", "verbose"]
LOG_EVERY_S = 10.0  # non-terminal output: a progress line at most this often ...
LOG_MIN_S = 1.0  # ... or for each further tenth of the jobs, but not more often than this
REDRAW_S = 0.1  # terminal: redraw the live line at most this often
NAME_WIDTH = 24


@dataclass
class Stage:
    """A stage in progress; ``note`` (set while it runs) is printed after its time."""

    name: str
    started: float
    note: str = ""
    seconds: float = 0.0


@dataclass
class StudyTimes:
    """The stages of one study and its job counts, for the summary line."""

    label: str
    started: float
    stages: list[Stage] = field(default_factory=list)
    jobs: int = 0
    cached: int = 0
    seconds: float = 0.0


class Console:
    """The run's voice on stderr (see the module docstring). ``live`` defaults to whether the
    stream is a terminal; ``clock`` is for tests."""

    def __init__(
        self,
        stream: TextIO | None = None,
        verbosity: Verbosity = "normal",
        live: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.stream = stream or sys.stderr
        self.verbosity = verbosity
        self.live = getattr(self.stream, "isatty", lambda: False)() if live is None else live
        self.clock = clock
        self.t0 = clock()
        self.studies: list[StudyTimes] = []
        self.files = 1  # how many studies the command runs (headers say "file 2 of 3")
        self._drawn = ""  # the live line on screen (terminal only)

    # -- plain lines -------------------------------------------------------------------------

    def say(self, message: str, level: Verbosity = "normal") -> None:
        """Print ``message`` on a line of its own (``level``: the least verbosity that shows it);
        on a terminal the live line is cleared first and drawn again below it."""
        if _RANK[self.verbosity] < _RANK[level]:
            return
        drawn = self._drawn
        if drawn:
            self.draw("")
        self._write(message + "\n")
        if drawn:
            self.draw(drawn)

    def debug(self, message: str) -> None:
        self.say(message, "verbose")

    # -- studies and stages ------------------------------------------------------------------

    def begin_study(self, path: str) -> None:
        """A study starts: say which file (and, with several, which of them)."""
        self.studies.append(StudyTimes(path, self.clock()))
        count = f" (file {len(self.studies)} of {self.files})" if self.files > 1 else ""
        self.say(f"run {path}{count}")

    @contextmanager
    def stage(self, name: str) -> Iterator[Stage]:
        """Announce stage ``name`` now; when the block ends, its time (and the stage's note)."""
        stage = self.begin(name)
        try:
            yield stage
        except BaseException as e:
            stage.note = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            raise
        finally:
            self.end(stage)

    def begin(self, name: str) -> Stage:
        """Announce stage ``name`` (end it with `end`; `stage` does both)."""
        stage = Stage(name, self.clock())
        if self.studies:
            self.studies[-1].stages.append(stage)
        if self.verbosity != "quiet":
            if self.live:
                self.draw(f"  {name} …")
            else:
                self._write(f"  {name} …\n")
        return stage

    def end(self, stage: Stage) -> None:
        """Stage ``stage`` is over: its time and note."""
        stage.seconds = self.clock() - stage.started
        note = f"  {stage.note}" if stage.note else ""
        if self.live and self._drawn:
            self.draw("")
        self.say(f"  {stage.name:<{NAME_WIDTH}} {stage.seconds:6.1f}s{note}")

    def progress(self, total: int, label: str = "jobs") -> Progress:
        """Job progress of the current stage."""
        return Progress(total, label, console=self)

    def end_study(self, name: str, extra: str = "") -> str:
        """The summary line of the study just run (printed even when quiet); returned too."""
        study = self.studies[-1]
        seconds = study.seconds = self.clock() - study.started
        if study.jobs and study.cached == study.jobs:
            jobs = f"cached re-run: {study.jobs} of {study.jobs} jobs from cache"
        else:
            jobs = f"{study.jobs - study.cached} jobs computed, {study.cached} from cache"
        line = f"done: {name} in {seconds:.1f}s ({jobs}){extra}"
        self.say(line, "quiet")
        return line

    def end_command(self) -> None:
        """After several studies: the command's total time."""
        if len(self.studies) > 1:
            total = self.clock() - self.t0
            each = ", ".join(f"{s.label} {s.seconds:.1f}s" for s in self.studies)
            self.say(f"all {len(self.studies)} studies done in {total:.1f}s ({each})", "quiet")

    def close(self) -> None:
        """End a live line left on screen (an error is about to be printed below it)."""
        if self._drawn:
            self._write("\n")
            self._drawn = ""

    # -- output ------------------------------------------------------------------------------

    def draw(self, line: str) -> None:
        """Replace the live line with ``line`` ("" clears it)."""
        pad = " " * max(0, len(self._drawn) - len(line))
        self._write("\r" + line + pad + ("\r" + line if pad else ""))
        self._drawn = line

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


_RANK: dict[Verbosity, int] = {"quiet": 0, "normal": 1, "verbose": 2}


class Progress:
    """Jobs done / total (how many from the cache), elapsed, ETA.

    With a `Console`: a live line on a terminal, rate-limited log lines elsewhere, a line per job
    when verbose, counts kept for the study's summary. Without one (``Progress(n)``, as tests and
    library callers use it): a line on ``stream`` (default stderr) when closed, live on a terminal.
    """

    def __init__(
        self,
        total: int,
        label: str = "jobs",
        stream: TextIO | None = None,
        console: Console | None = None,
    ):
        self.total, self.label, self.done, self.cached = total, label, 0, 0
        self.console = console or Console(stream, live=None)
        self.clock = self.console.clock
        self.t0 = self.clock()
        self.live = self.console.live
        self._shown = self.t0  # when a line was last drawn or logged
        self._tenth = 0  # the tenths of the jobs done when a log line was last printed

    def restart(self) -> None:
        """Time (and the ETA) from now: the jobs start computing (after a cluster's start)."""
        self.t0 = self._shown = self.clock()

    def say(self, message: str) -> None:
        """A message from the runner (dashboard link, waiting for workers), on its own line."""
        self.console.say(message)

    def update(self, n: int = 1, cached: bool = False, what: str | None = None) -> None:
        """``n`` more jobs done (``cached``: found in the cache); ``what`` names them (verbose)."""
        self.done += n
        self.cached += n if cached else 0
        if what is not None:
            self.console.debug(f"    {what}{' (cached)' if cached else ''}")
        if self.console.verbosity == "quiet" or self.done >= self.total:
            return
        now = self.clock()
        if self.live:
            if now - self._shown >= REDRAW_S:
                self._shown = now
                self.console.draw(f"  running {self._line()}")
            return
        tenth = self.done * 10 // max(1, self.total)
        since = now - self._shown
        if since >= LOG_EVERY_S or (tenth > self._tenth and since >= LOG_MIN_S):
            self._shown, self._tenth = now, tenth
            self.console.say(f"  running {self._line()}")

    def close(self) -> None:
        """Record the counts for the study's summary; without a study, print the final line."""
        if self.console.studies:
            study = self.console.studies[-1]
            study.jobs += self.total
            study.cached += self.cached
        else:
            self.console.say(self._line(), "quiet")

    @property
    def summary(self) -> str:
        """``12 computed, 0 from cache`` or, when every job was cached, ``12 of 12 from cache``."""
        if self.total and self.cached == self.total:
            return f"all {self.total} {self.label} from cache"
        return f"{self.done - self.cached} {self.label} computed, {self.cached} from cache"

    def _line(self) -> str:
        elapsed = self.clock() - self.t0
        computed = self.done - self.cached
        left = self.total - self.done
        eta = f", ETA {elapsed / computed * left:.0f}s" if computed and left else ""
        cached = f", {self.cached} from cache" if self.cached else ""
        return f"[{self.done}/{self.total} {self.label}{cached}] {elapsed:.1f}s elapsed{eta}"


def count(n: int, noun: str) -> str:
    """``1 job``, ``3 jobs``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
