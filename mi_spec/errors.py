"""The error family. A `MiSpecError` is the user's mistake or the world's (bad file, missing site,
unloadable model): the CLI prints it without a traceback. Anything else is our bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class MiSpecError(Exception):
    """A failure the user can act on. `exit_code` is what the CLI exits with."""

    exit_code = 1


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a hypothesis file, located as precisely as we can."""

    message: str
    path: str = ""  # dotted field path, e.g. "experiments.0.samples"
    file: str | None = None
    line: int | None = None  # 1-based
    col: int | None = None  # 1-based

    def __str__(self) -> str:
        where = ":".join(str(p) for p in (self.file, self.line, self.col) if p is not None)
        parts = [p for p in (where, self.path) if p]
        return ": ".join([*parts, self.message])


class SpecError(MiSpecError):
    """Invalid input: every issue found, not just the first."""

    exit_code = 2

    def __init__(self, issues: Sequence[SpecIssue]):
        self.issues = list(issues)
        n = len(self.issues)
        head = f"{n} problem{'s' if n != 1 else ''} found:" if n > 1 else ""
        super().__init__("\n".join([head, *map(str, self.issues)]).strip())


class ResolveError(MiSpecError):
    """The spec is well-formed but names something that does not exist (site, callable, file).

    ``field`` is the path of the offending field within its section, when known, so the error
    can be located in the hypothesis file.
    """

    exit_code = 2

    def __init__(self, message: str, field: tuple[str | int, ...] = ()):
        super().__init__(message)
        self.field = field


class ExecutionError(MiSpecError):
    """A job failed at run time; results computed before it are kept."""

    exit_code = 1
