"""``mi-spec``: validate, plan, run, compare, ui, schema.

Thin: it parses arguments and calls ``mi_spec.api`` (``compare``/``ui``: ``mi_spec.cli.compare``).

Exit codes: 0 ok, 2 invalid input (the message says file:line:col), 1 runtime failure, 130 Ctrl-C,
143 SIGTERM, 129 SIGHUP (a run ends like Ctrl-C: runs FAILED, finished results cached).
A ``MiSpecError`` prints as a message; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mi_spec.cli.compare import add_commands as add_compare_commands
from mi_spec.errors import MiSpecError

if TYPE_CHECKING:
    from mi_spec.api import RunResult

DEFAULT_SCHEMA_DIR = "schemas"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in ``argv`` (default: the command line); returns the exit code."""
    from mi_spec.cli.signals import Terminated, terminating

    args = _parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if argv is None and args.func in (_validate, _plan):  # the program itself, a short command
        _short_lived()
    try:
        with terminating(enabled=args.func is _run):  # SIGTERM/SIGHUP: like Ctrl-C
            return int(args.func(args) or 0)
    except MiSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated as e:  # "terminated by SIGTERM"; exit 128 + signum
        print(e, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _short_lived() -> None:
    """Switch off Python's cyclic garbage collector for the rest of this process, and freeze
    what is left at exit.

    torch, transformers and a compiled plan make a few hundred thousand objects; each full
    collection walks them all, during the imports, the compile (half the time of a large
    causal-scrubbing plan) and the interpreter's teardown (~0.4 s). A short command frees its
    memory by reference counting alone (`_validate` collects between files). Only when ``main``
    runs as the program: a caller in the same process keeps its collector.
    """
    gc.disable()
    atexit.register(gc.freeze)  # registered first, so run last: after torch's own handlers


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mi-spec", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    def with_file(cmd: argparse.ArgumentParser, many: bool = False) -> None:
        cmd.add_argument("files" if many else "file", nargs="+" if many else None)
        cmd.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="PATH=VALUE",
            help="override a field, e.g. --set experiments.0.samples=512 (repeatable)",
        )

    v = sub.add_parser("validate", help="check hypothesis files: schema, model, data, sites")
    with_file(v, many=True)
    v.add_argument(
        "--static",
        action="store_true",
        help="review an untrusted file without running its code: schema, references found by "
        "name (nothing imported), expressions, variable graph, sites on a meta-device model "
        "where the structure is known; loads no model and no data",
    )
    v.set_defaults(func=_validate)

    pl = sub.add_parser("plan", help="print the compiled plan: jobs, passes, memory")
    with_file(pl)
    pl.add_argument("--json", action="store_true", help="print the plan itself as JSON")
    pl.add_argument(
        "--runner",
        default="local",
        help="runner profile whose workers the jobs must fit (as for `run`; default: local): "
        "rows per pass are lowered to fit its memory, a study that cannot fit is refused",
    )
    pl.set_defaults(func=_plan)

    r = sub.add_parser(
        "run",
        help="run every experiment of each file (on one Dask cluster) and log to MLflow",
        description="Run hypothesis files: stages and times on stderr, results on stdout, one "
        "MLflow parent run per file. Several files share one Dask cluster, started once.",
    )
    with_file(r, many=True)
    r.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        action="append",
        help="run only these experiments of each file (by name; repeatable); their jobs are "
        "those of a whole-file run, so cached results are shared",
    )
    r.add_argument(
        "--emit",
        action="store_true",
        help="write each circuit_discovery's discovered.yaml beside its file, as "
        "<file stem>.<experiment>.discovered.yaml (an edited copy is never overwritten)",
    )
    r.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    r.add_argument(
        "--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or mi_spec)"
    )
    r.add_argument("--cache-dir", default=".mi_spec_cache", help="job result cache")
    r.add_argument("--no-cache", action="store_true", help="recompute every job")
    r.add_argument(
        "--runner",
        default="local",
        help="runner profile: synchronous | local | cluster | slurm, or a YAML file "
        "(default: local, an embedded Dask LocalCluster)",
    )
    r.add_argument(
        "--scheduler", metavar="tcp://HOST:8786", help="run on an existing Dask scheduler"
    )
    loud = r.add_mutually_exclusive_group()
    loud.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only errors and one summary line per study (with its MLflow link)",
    )
    loud.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also a line per job, Dask's and MLflow's own INFO logs",
    )
    r.set_defaults(func=_run)

    add_compare_commands(sub)

    s = sub.add_parser("schema", help="write the JSON Schema of hypothesis files")
    s.add_argument("--out", default=DEFAULT_SCHEMA_DIR, help="output folder")
    s.set_defaults(func=_schema)
    return p


def _validate(args: argparse.Namespace) -> int:
    failed = 0
    for i, f in enumerate(args.files):
        if i and not gc.isenabled():  # see `_short_lived`: the last file's model can go now
            gc.collect()
        try:
            if args.static:  # runs none of the file's code; torch only for a meta-device model
                _validate_static(f, args.overrides)
                continue
            from mi_spec import api

            plan = api.validate(f, args.overrides)
            print(
                f"ok: {f} ({len(plan.experiments)} experiments, {len(plan.jobs)} jobs, "
                f"{len(plan.sites)} sites checked)"
            )
        except MiSpecError as e:
            print(f"{e}", file=sys.stderr)
            failed = max(failed, e.exit_code)
    return failed


def _validate_static(path: str, overrides: list[str]) -> None:
    from mi_spec.compile.static import check_static

    report = check_static(path, overrides)
    print(
        f"ok (static, no code run): {path} ({len(report.references)} references, "
        f"{report.expressions} expressions, {report.sites} sites checked)"
    )
    for ref in report.references:
        print(f"  code it runs: {ref}")
    for note in report.notes:
        print(f"  note: {note}")


def _plan(args: argparse.Namespace) -> int:
    from mi_spec import api
    from mi_spec.plan.summary import summarize

    study, plan = api.compile_file(args.file, args.overrides)
    plan, fit = api.fit_memory(study, plan, args.runner)  # refuses a study that cannot fit
    print(plan.to_json() if args.json else summarize(plan, fit=fit))
    return 0


def _run(args: argparse.Namespace) -> int:
    from mi_spec.schedule.progress import Console  # light: says something before the imports

    verbosity = "quiet" if args.quiet else "verbose" if args.verbose else "normal"
    console = Console(verbosity=verbosity)
    console.files = n = len(args.files)
    where = args.scheduler or args.runner
    console.say(f"mi-spec run: {n} file{'s' if n != 1 else ''}, runner {where}")
    only = (
        [n.strip() for arg in args.only for n in arg.split(",") if n.strip()] if args.only else None
    )
    try:
        with console.stage("importing torch, MLflow"):
            from mi_spec import api
            from mi_spec.schedule.dispatch import RunnerSession
            from mi_spec.tracking.mlflow_tracker import MlflowTracker

            _quiet_libraries(verbose=args.verbose)
        with RunnerSession(args.runner, args.scheduler, console) as session:
            for path in args.files:  # one parent run per file, all in one store
                tracker = MlflowTracker(args.tracking_uri, experiment=args.experiment)
                result = api.run(
                    path,
                    tracker,
                    args.overrides,
                    cache_dir=None if args.no_cache else args.cache_dir,
                    session=session,
                    console=console,
                    only=only,
                )
                link = run_link(tracker)
                if not args.quiet:  # quiet: the summary line (stderr) and the link alone
                    _print_reports(result)
                if args.emit:
                    from mi_spec.experiments.discovered_yaml import emit_beside

                    for line in emit_beside(path, result.reports):
                        print(line, flush=True)
                print(f"{'' if args.quiet else chr(10)}MLflow: {link}", flush=True)
        console.end_command()
    finally:
        console.close()
    return 0


def _quiet_libraries(verbose: bool) -> None:
    """Dask's and MLflow's own logs: INFO with ``-v``; else Dask's errors only (its warnings are
    about its housekeeping: a worker killed at shutdown, a busy event loop) and MLflow's
    warnings. Dask's level goes through the environment, which distributed reads when imported
    (later, when a cluster starts), here and in the worker processes; a level already set there
    wins."""
    level = os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if verbose else "error")
    if "distributed" in sys.modules:  # imported already (by a caller of `main`)
        logging.getLogger("distributed").setLevel(level.upper())
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def run_link(tracker: object) -> str | None:
    """The MLflow page of the study's parent run just made (the runs table if there is none).

    `MlflowTracker.run_url` says how to reach the experiment's runs table (a URL, or for a local
    store the ``mi-spec ui`` command and the page); the run's page is that table's address with
    ``runs/<run id>`` in place of the table.
    """
    url = getattr(tracker, "run_url", lambda: None)()
    run_id = getattr(tracker, "parent_run_id", None)
    table = "/runs?workflowType=machine_learning"
    if url and run_id and table in url:
        return url.replace(table, f"/runs/{run_id}")
    return url


def _print_reports(result: RunResult) -> None:
    for report in result.reports:
        print(f"\n== {report.name}")
        for key, value in report.headline.items():
            if not key.endswith((".ci_low", ".ci_high")):
                low, high = (
                    report.headline.get(f"{key}.ci_low"),
                    report.headline.get(f"{key}.ci_high"),
                )
                ci = f"  [{low:.3f}, {high:.3f}]" if low is not None else ""
                print(f"  {key:<34} {value:8.4f}{ci}")
        for k, v in report.params.items():
            print(f"  {k:<34} {v}")
        for w in report.warnings:
            print(f"  warning: {w}")


def _schema(args: argparse.Namespace) -> int:
    from mi_spec.compile.schema import write_schemas

    for path in write_schemas(Path(args.out)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
