"""What a run says on stderr: stages with times in order, a live line on a terminal, rate-limited
log lines elsewhere, quiet and verbose, a cached re-run said to be one (a fake clock, no model)."""

from __future__ import annotations

import io
import re

from mi_spec.schedule.progress import LOG_EVERY_S, Console, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def study(console: Console, clock: Clock, jobs: int, cached: int, step: float = 0.5) -> None:
    """One study: three stages of 1, 2 and 3 s around ``jobs`` jobs (``cached`` from the cache)."""
    console.begin_study("a.yaml")
    with console.stage("loading model") as stage:
        clock.now += 1.0
        stage.note = "toy, 16 rows"
    with console.stage("compiling"):
        clock.now += 2.0
    progress = console.progress(jobs)
    for i in range(jobs):
        clock.now += 0 if i < cached else step
        progress.update(cached=i < cached, what=f"job {i}")
    progress.close()
    with console.stage("analysing"):
        clock.now += 3.0
    console.end_study("a")


def test_stages_in_order_with_their_times_then_the_summary():
    clock, out = Clock(), io.StringIO()
    console = Console(out, clock=clock)
    study(console, clock, jobs=4, cached=1)
    lines = out.getvalue().splitlines()
    assert lines[0] == "run a.yaml"
    assert lines[1:3] == ["  loading model …", "  loading model               1.0s  toy, 16 rows"]
    assert lines[3:5] == ["  compiling …", "  compiling                   2.0s"]
    assert lines[-3:] == [
        "  analysing …",
        "  analysing                   3.0s",
        "done: a in 7.5s (3 jobs computed, 1 from cache)",  # 1 + 2 + 3 + 3 jobs x 0.5 s
    ]
    assert "\r" not in out.getvalue()  # not a terminal: plain lines


def test_terminal_rewrites_one_live_line():
    clock, out = Clock(), Tty()
    console = Console(out, clock=clock)
    assert console.live
    study(console, clock, jobs=4, cached=0)
    text = out.getvalue()
    # the stage's start is drawn with \r and replaced by its final line (the time)
    assert "\r  loading model …" in text and "loading model …\n" not in text
    assert re.search(r"\r {2}running \[\d/4 jobs\] [\d.]+s elapsed, ETA \d+s", text)
    final = [line.split("\r")[-1] for line in text.split("\n") if line]
    assert final[1].startswith("  loading model ") and final[1].endswith("toy, 16 rows")
    assert final[-1].startswith("done: a in 8.0s")


def test_non_terminal_progress_lines_are_rate_limited():
    """1000 jobs of 0.05 s (50 s): a line per further tenth at most, and per LOG_EVERY_S."""
    clock, out = Clock(), io.StringIO()
    console = Console(out, clock=clock)
    progress = console.progress(1000)
    for _ in range(1000):
        clock.now += 0.05
        progress.update()
    lines = [line for line in out.getvalue().splitlines() if "running" in line]
    assert 5 <= len(lines) <= 10, lines
    done = [int(re.search(r"\[(\d+)/1000", line).group(1)) for line in lines]
    assert done == sorted(done) and done[0] == 100  # the first tenth

    # slow jobs: a line every LOG_EVERY_S even within one tenth
    clock, out = Clock(), io.StringIO()
    progress = Console(out, clock=clock).progress(1000)
    for _ in range(40):
        clock.now += LOG_EVERY_S / 4
        progress.update()
    assert len(out.getvalue().splitlines()) == 10


def test_quiet_prints_only_the_summary_and_verbose_each_job():
    clock, out = Clock(), io.StringIO()
    study(Console(out, verbosity="quiet", clock=clock), clock, jobs=3, cached=0)
    assert out.getvalue().splitlines() == ["done: a in 7.5s (3 jobs computed, 0 from cache)"]

    clock, out = Clock(), io.StringIO()
    study(Console(out, verbosity="verbose", clock=clock), clock, jobs=3, cached=1)
    assert "    job 0 (cached)" in out.getvalue().splitlines()
    assert "    job 2" in out.getvalue().splitlines()


def test_a_fully_cached_rerun_says_so():
    clock, out = Clock(), io.StringIO()
    study(Console(out, clock=clock), clock, jobs=5, cached=5)
    assert out.getvalue().splitlines()[-1] == (
        "done: a in 6.0s (cached re-run: 5 of 5 jobs from cache)"
    )


def test_several_studies_end_with_the_total():
    clock, out = Clock(), io.StringIO()
    console = Console(out, clock=clock)
    console.files = 2
    study(console, clock, jobs=1, cached=0)
    study(console, clock, jobs=1, cached=1)
    console.end_command()
    lines = out.getvalue().splitlines()
    assert "run a.yaml (file 1 of 2)" in lines and "run a.yaml (file 2 of 2)" in lines
    assert lines[-1] == "all 2 studies done in 12.5s (a.yaml 6.5s, a.yaml 6.0s)"


def test_progress_without_a_console_prints_its_final_line(capsys):
    progress = Progress(2)
    progress.update()
    progress.update(cached=True)
    progress.close()
    assert re.fullmatch(r"\[2/2 jobs, 1 from cache\] [\d.]+s elapsed\n", capsys.readouterr().err)
