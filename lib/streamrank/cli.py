"""The `streamrank` command: argument parsing and exit codes, nothing else.

Each sub-command calls one function of the library; errors carry their exit code
(streamrank.errors) so the scheduler can tell bad input (5) from a failed quality gate
(3) or a model that was not promoted (4).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from streamrank.config import DEFAULT_CONF, parse_date
from streamrank.errors import StreamrankError

Handler = Callable[[argparse.Namespace], int]


def _date(value: str):  # noqa: ANN202 - argparse type
    from streamrank.errors import ConfigError

    try:
        return parse_date(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _context(args: argparse.Namespace):  # noqa: ANN202
    from streamrank.config import load_config
    from streamrank.context import Context

    return Context(load_config(args.conf, args.set or []))


# ----------------------------------------------------------------------------- commands

def cmd_init(args: argparse.Namespace) -> int:
    ctx = _context(args)
    created = ctx.warehouse.create_all()
    print(f"warehouse {ctx.cfg.warehouse} (engine {ctx.warehouse.engine}): created {len(created)} tables")
    for name in created:
        print(f"  {name}")
    for name, cols in ctx.warehouse.upgrade_all().items():
        print(f"  {name}: added columns {', '.join(cols)} (from its schema file)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from streamrank.config import load_config
    from streamrank.generate import generate

    cfg = load_config(args.conf, args.set or [])
    ledger = generate(cfg.landing, args.start, args.days, scale=args.scale, faults=args.faults, seed=args.seed)
    dates = sorted(ledger["dates"])[-args.days:]
    lines = sum(ledger["dates"][d]["lines"] for d in dates)
    print(f"[generate] {args.days} days from {args.start} at scale {args.scale}: {lines} event lines under {cfg.landing}"
          f" (ledger {cfg.landing / '_ledger' / 'ledger.json'})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streamrank.demo import demo

    return demo(_context(args), args.start, args.days, args.scale, args.seed)


def cmd_sql(args: argparse.Namespace) -> int:
    from streamrank.analyst import run_sql

    ctx = _context(args)
    return run_sql(ctx, args.query, as_of_version=args.as_of_version, out=args.out, limit=args.limit)


def cmd_promote(args: argparse.Namespace) -> int:
    """Check the flag combinations (exit 2) before anything is loaded, then run the stage."""
    from streamrank.promote import check_args

    check_args(args)
    return _stage("promote")(args)


def _stage(module: str, func: str = "run") -> Handler:
    """A stage command: `<module>.<func>(ctx, args) -> int`, imported when called."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        ctx = _context(args)
        return getattr(importlib.import_module(f"streamrank.{module}"), func)(ctx, args)

    return handler


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrank", description="Nightly batch ML for live-stream commerce.")
    # --conf/--set are accepted before the command too (`streamrank --conf prod.yaml nightly ...`), as
    # schedulers and shell aliases put them; given in both places, the command's --conf wins and the
    # --set lists are applied in order, the ones before the command first.
    parser.add_argument("--conf", dest="global_conf", metavar="CONF", help="YAML config (default conf/local.yaml)")
    parser.add_argument("--set", dest="global_set", action="append", metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_: str, date: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--conf", help="YAML config (default conf/local.yaml)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        if date:
            p.add_argument("--date", required=True, type=_date, help="the business date D, YYYY-MM-DD")
        p.set_defaults(handler=handler)
        return p

    add("init", cmd_init, "create every warehouse table that does not exist yet")

    p = add("generate", cmd_generate, "write synthetic landing data (events, catalog, schedule) and a fault ledger")
    p.add_argument("--start", required=True, type=_date)
    p.add_argument("--days", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--faults", action="store_true")
    p.add_argument("--seed", type=int, default=7)

    p = add("demo", cmd_demo, "generate a week of synthetic data and run the nightly for each day")
    p.add_argument("--start", required=True, type=_date)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--scale", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=7)

    p = add("sql", cmd_sql, "run Spark SQL over every table (views named <layer>_<table>)")
    p.add_argument("query")
    p.add_argument("--as-of-version", action="append", metavar="TABLE=VERSION",
                   help="read a table at an older Delta version, e.g. gold/user_product_rankings=3")
    p.add_argument("--out", help="write the result to a .csv or .parquet file instead of printing")
    p.add_argument("--limit", type=int, default=1000, help="rows to print (default 1000)")

    for name, module, help_ in STAGES:
        p = add(name, _stage(module), help_, date=True)
        for flag, kwargs in STAGE_FLAGS.get(name, []):
            p.add_argument(flag, **kwargs)

    # promote: --date is optional (forced promotion and rollback need none); the gate picks
    # the latest evaluation of the challenger, or that of D when given.
    p = add("promote", cmd_promote,
            "promotion gate: alias champion to the challenger if it beats the champion (or, first, most-popular)")
    p.add_argument("--date", type=_date, help="read the evaluation of D (default: the challenger's latest); run date in ops/job_runs")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, metavar="N", help="gate (or with --force, promote) model version N instead of the challenger")
    which.add_argument("--rollback", action="store_true", help="champion <- previous, previous <- the current champion")
    p.add_argument("--force", action="store_true", help="skip the gate (needs --version N and --reason TEXT)")
    p.add_argument("--reason", metavar="TEXT", help="why the gate is skipped; tagged on the version with who forced it")

    p = add("maintain", _stage("maintain"),
            "compact small files and vacuum what no snapshot within the retention needs, for every table")
    p.add_argument("--retention-hours", type=float, metavar="H",
                   help="keep files a snapshot of the last H hours needs (default delta.vacuum_retention_hours, 168)")
    p.add_argument("--no-optimize", action="store_true", help="vacuum only, no compaction")
    p.add_argument("--dry-run", action="store_true", help="list what would be compacted and deleted; change nothing")
    p.add_argument("--force", action="store_true", help="allow a retention below 168 hours")

    p = add("import-interactions", _stage("loo", "run_import"),
            "load a CSV interaction log (user, item, timestamp) into datasets/interactions; bad rows are reported")
    p.add_argument("--input", required=True, metavar="F.csv", help="CSV file with a header line")
    p.add_argument("--dataset", required=True, metavar="NAME", help="dataset name (its partition is replaced on re-import)")
    p.add_argument("--user-col", default="user_id", metavar="U", help="user column (default user_id)")
    p.add_argument("--item-col", default="item_id", metavar="I", help="item column (default item_id)")
    p.add_argument("--ts-col", default="timestamp", metavar="T",
                   help="timestamp column: epoch s/ms/us or ISO 8601 (default timestamp)")
    p.add_argument("--event-col", default=None, metavar="E", help="optional event-type column")
    p.add_argument("--sep", default=",", help="field separator (default ,)")

    p = add("benchmark-loo", _stage("loo", "run_benchmark"),
            "leave-one-out benchmark (SASRec protocol) of the model on an imported dataset; prints one JSON line")
    p.add_argument("--dataset", required=True, metavar="NAME")
    p.add_argument("--negatives", type=int, default=100, help="sampled negatives per test item (default 100)")
    p.add_argument("--k", type=int, default=10, help="cut-off of NDCG@k and HR@k (default 10)")
    p.add_argument("--epochs", type=int, default=200, help="maximum epochs; early stopping on validation decides (default 200)")
    p.add_argument("--patience", type=int, default=10, help="epochs without validation gain before stopping (default 10)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="training device (default: cuda if available)")
    p.add_argument("--seed", type=int, default=42, help="seed of the negatives and of training (default 42)")
    return parser


# (command, module, help) for the date-driven stages; each module has run(ctx, args) -> int.
STAGES: list[tuple[str, str, str]] = [
    ("ingest", "ingest", "landing files of D -> bronze tables, exactly once"),
    ("clean", "clean", "bronze of D -> silver + quarantine, behind the GX gate"),
    ("features", "features", "silver up to D -> gold viewer features, training examples, vocabularies"),
    ("train", "train", "Petastorm -> torch -> MLflow: train and register a challenger"),
    ("evaluate", "evaluate", "holdout metrics for challenger, champion and baselines"),
    ("score", "score", "rankings and intent scores for the streams of D+1"),
    ("report", "report", "static HTML report with plots for D"),
    ("nightly", "nightly", "every stage for D in order, resumable, one run per warehouse (a night older "
                            "than the challenger's skips train, evaluate and promote)"),
]
STAGE_FLAGS: dict[str, list[tuple[str, dict]]] = {
    "train": [
        ("--newest-only", {"action": "store_true",
                           "help": "for schedulers running stage by stage: when the challenger was trained as of a later "
                                   "night, train nothing and exit 5 (outcome older_than_challenger), as nightly does"}),
    ],
    "nightly": [
        ("--force", {"action": "store_true", "help": "re-run stages that already succeeded for D"}),
        ("--from", {"dest": "from_stage", "metavar": "STAGE", "help": "restart from this stage"}),
    ],
}


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    given = vars(args)
    args.conf = given.get("conf") or given.get("global_conf") or str(DEFAULT_CONF)
    args.set = (given.get("global_set") or []) + (given.get("set") or [])
    try:
        return int(args.handler(args) or 0)
    except StreamrankError as exc:
        print(f"streamrank {args.command}: error: {exc}", file=sys.stderr)
        if exc.outcome:
            print(f"streamrank {args.command}: outcome: {exc.outcome} (an expected state, not a failure: "
                  "`streamrank nightly` goes on past it)", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
