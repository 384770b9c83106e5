"""``mi-spec``: validate, plan, run, compare, ui, schema.

Thin: it parses arguments and calls ``mi_spec.api`` (``compare``/``ui``: ``mi_spec.cli.compare``).

Exit codes: 0 ok, 2 invalid input (the message says file:line:col), 1 runtime failure, 130 Ctrl-C,
143 SIGTERM, 129 SIGHUP (a run ends like Ctrl-C: runs FAILED, finished results cached).
A ``MiSpecError`` prints as a message; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
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
    from mi_spec.cli.signals import Terminated, terminating

    args = _parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
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
    pl.set_defaults(func=_plan)

    r = sub.add_parser("run", help="run every experiment of each file and log to MLflow")
    with_file(r, many=True)
    r.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    r.add_argument("--experiment", default="mi_spec", help="MLflow experiment name")
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
    r.set_defaults(func=_run)

    add_compare_commands(sub)

    s = sub.add_parser("schema", help="write the JSON Schema of hypothesis files")
    s.add_argument("--out", default=DEFAULT_SCHEMA_DIR, help="output folder")
    s.set_defaults(func=_schema)
    return p


def _validate(args: argparse.Namespace) -> int:
    from mi_spec import api

    failed = 0
    for f in args.files:
        try:
            if args.static:
                _validate_static(f, args.overrides)
                continue
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

    _, plan = api.compile_file(args.file, args.overrides)
    print(plan.to_json() if args.json else summarize(plan))
    return 0


def _run(args: argparse.Namespace) -> int:
    from mi_spec import api
    from mi_spec.tracking.mlflow_tracker import MlflowTracker

    for path in args.files:  # one parent run per file, all in the same store
        tracker = MlflowTracker(args.tracking_uri, experiment=args.experiment)
        result = api.run(
            path,
            tracker,
            args.overrides,
            cache_dir=None if args.no_cache else args.cache_dir,
            runner=args.runner,
            scheduler=args.scheduler,
        )
        _print_reports(result)
    return 0


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
    print(f"\nMLflow: {result.run_url}")


def _schema(args: argparse.Namespace) -> int:
    from mi_spec.compile.schema import write_schemas

    for path in write_schemas(Path(args.out)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
