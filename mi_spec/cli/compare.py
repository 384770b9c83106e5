"""``mi-spec compare`` and ``mi-spec ui``: look at what ``mi-spec run`` logged."""

from __future__ import annotations

import argparse
import sys

TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
EXPERIMENT_HELP = "MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME or mi_spec)"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``compare`` and ``ui`` on the ``mi-spec`` subparsers."""
    c = sub.add_parser(
        "compare",
        help="print logged experiment runs with their headline metrics and CIs",
        description="One row per experiment run, newest first: run, hypothesis, kind, status, "
        "start time, headline metrics as 'estimate [ci_low, ci_high]', parent run id.",
    )
    c.add_argument("--tracking-uri", help=TRACKING_HELP)
    c.add_argument("--experiment", help=EXPERIMENT_HELP)
    c.add_argument(
        "--hypothesis",
        dest="hypotheses",
        action="append",
        default=[],
        metavar="NAME",
        help="only this hypothesis (a name or a glob; repeatable)",
    )
    c.add_argument(
        "--kind",
        dest="kinds",
        action="append",
        default=[],
        metavar="KIND",
        help="only this experiment kind, e.g. causal_scrubbing (repeatable)",
    )
    c.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only runs with this tag, e.g. mi_spec.git_commit=abc123 (repeatable, all must match)",
    )
    c.add_argument(
        "--metric",
        dest="metrics",
        action="append",
        default=[],
        metavar="GLOB",
        help="show these metrics instead of the headline ones, e.g. 'patch.effect.L1*' (repeatable)",
    )
    c.add_argument("--all-metrics", action="store_true", help="show every metric of each run")
    c.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="output format"
    )
    c.set_defaults(func=_compare)

    u = sub.add_parser("ui", help="start the MLflow UI on the tracking store and print its URL")
    u.add_argument("--tracking-uri", help=TRACKING_HELP)
    u.add_argument("--experiment", help=EXPERIMENT_HELP)
    u.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default: 127.0.0.1, this machine only)",
    )
    u.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    u.set_defaults(func=_ui)


def _compare(args: argparse.Namespace) -> int:
    from mi_spec.tracking.compare import Query, fetch_rows, parse_tags, render
    from mi_spec.tracking.mlflow_tracker import resolve_experiment, resolve_tracking_uri

    experiment = resolve_experiment(args.experiment)
    query = Query(
        experiment=experiment,
        hypotheses=args.hypotheses,
        kinds=args.kinds,
        tags=parse_tags(args.tags),
        metrics=args.metrics,
        all_metrics=args.all_metrics,
    )
    rows = fetch_rows(args.tracking_uri, query)
    if not rows:
        where = f"experiment {experiment!r} of {resolve_tracking_uri(args.tracking_uri)}"
        print(f"no experiment runs in {where}" + _filters_note(args), file=sys.stderr)
        if args.format == "json":
            print("[]")
        return 0
    print(render(rows, args.format))
    return 0


def _filters_note(args: argparse.Namespace) -> str:
    given = [f"--hypothesis {h}" for h in args.hypotheses] + [f"--kind {k}" for k in args.kinds]
    given += [f"--tag {t}" for t in args.tags]
    return f" matching {' '.join(given)}" if given else ""


def _ui(args: argparse.Namespace) -> int:
    from mi_spec.tracking.mlflow_tracker import resolve_experiment
    from mi_spec.tracking.ui import serve

    experiment = resolve_experiment(args.experiment)
    return serve(args.tracking_uri, host=args.host, port=args.port, experiment=experiment)
