"""The night in order: ingest -> clean -> features -> train -> evaluate -> promote -> score -> report.

Resumable: a stage that already succeeded for D (ops/job_runs) is skipped unless
--force; --from STAGE restarts there. A promotion gate that says no (exit 4) is not a
failed night: scoring goes on with the current champion. Any other failure stops the
night with that stage's exit code. One nightly per warehouse at a time (lock.py).

Bootstrap: on a new warehouse's first nights there is no history to train on
(InsufficientHistoryError): evaluate and promote are skipped and scoring runs if a
champion exists; with no champion yet (NoChampionError) nothing is scored. Both are
reported in ops/job_runs and the night still succeeds, because the data stages did.

Backfill: the model stages belong to the newest night. When `challenger` was trained as of
a later night than D (re-running a past night, or filling a hole after later nights ran),
train, evaluate and promote are skipped: a model of D would not become the challenger
(train.takes_challenger), and evaluating the newer one on D's holdout scores it on rows it
trained on, which the gate refuses (promote rule 4). The data stages, score and report
still run. `streamrank train --date D` trains D's model on purpose.

Each model stage skipped either way gets a `skipped` row in ops/job_runs saying why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib

from streamrank.context import Context, record_skipped, stage_run
from streamrank.errors import InsufficientHistoryError, ModelGateError, NoChampionError, StreamrankError, UsageError
from streamrank.lock import WarehouseLock
from streamrank.train import backfill_note, newer_challenger

STAGE_ORDER = ["ingest", "clean", "features", "train", "evaluate", "promote", "score", "report"]
MODEL_STAGES = ("train", "evaluate", "promote")


def succeeded_stages(ctx: Context, date: dt.date) -> set[str]:
    """Stages with a success row in ops/job_runs for D (read without Spark)."""
    runs = ctx.table("ops/job_runs").to_arrow(partitions={"run_date": date}).to_pylist()
    return {r["stage"] for r in runs if r["run_date"] == date and r["status"] == "success"}


def plan(done: set[str], force: bool, from_stage: str | None) -> list[tuple[str, bool]]:
    """(stage, run?) for every stage, in order: the pure part of resumption."""
    if from_stage is not None and from_stage not in STAGE_ORDER:
        raise UsageError(f"--from {from_stage!r}: expected one of {', '.join(STAGE_ORDER)}")
    start = STAGE_ORDER.index(from_stage) if from_stage else 0
    out = []
    for i, stage in enumerate(STAGE_ORDER):
        if i < start:
            out.append((stage, False))
        elif force or from_stage is not None:
            out.append((stage, True))
        else:
            out.append((stage, stage not in done))
    return out


def run_stage(ctx: Context, stage: str, date: dt.date) -> int:
    module = importlib.import_module(f"streamrank.{stage}")
    return int(module.run(ctx, argparse.Namespace(date=date, version=None, force=False, reason=None, rollback=False)) or 0)


def nightly(ctx: Context, date: dt.date, force: bool = False, from_stage: str | None = None) -> int:
    with WarehouseLock(ctx.cfg.warehouse, "nightly", ctx.run_id), stage_run(ctx, "nightly", date) as night:
        steps = plan(succeeded_stages(ctx, date), force, from_stage)
        newer = newer_challenger(ctx, date) if any(todo for s, todo in steps if s in MODEL_STAGES) else None
        skip_model: str | None = None  # why the model stages left do not run tonight
        if newer is not None:
            skip_model = night.message = backfill_note(date, newer)
            night.metrics["challenger_trained_as_of"] = str(newer.trained_as_of)
        for stage, todo in steps:
            if skip_model and stage in MODEL_STAGES:
                record_skipped(ctx, stage, date, skip_model)
                night.metrics[stage] = "skipped"
                continue
            if not todo:
                print(f"[nightly] {stage}: already succeeded for {date}, skipped (use --force or --from)")
                night.metrics[stage] = "skipped"
                continue
            try:
                run_stage(ctx, stage, date)
                night.metrics[stage] = "ok"
            except ModelGateError as exc:
                night.metrics[stage] = exc.outcome
                print(f"[nightly] promote: {str(exc).splitlines()[0]} - scoring goes on with the current champion")
            except InsufficientHistoryError as exc:
                # a new warehouse's first nights: nothing to train on yet, the data stages still ran
                night.metrics[stage] = exc.outcome
                print(f"[nightly] {stage}: {str(exc).splitlines()[0]} - model stages skipped tonight")
                skip_model = f"not run: {stage} found too little history for {date} ({exc.outcome})"
            except NoChampionError as exc:
                night.metrics[stage] = exc.outcome
                print(f"[nightly] {stage}: {str(exc).splitlines()[0]} - nothing published tonight")
            except StreamrankError:
                night.metrics[stage] = "failed"
                raise
    return 0


def run(ctx: Context, args: argparse.Namespace) -> int:
    return nightly(ctx, args.date, force=getattr(args, "force", False), from_stage=getattr(args, "from_stage", None))
