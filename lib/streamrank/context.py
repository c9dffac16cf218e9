"""What every stage gets: the conf, a lazily started Spark session, the warehouse, a run id.

Also the stage recorder: each stage run appends one row to ops/job_runs (status, timing,
Delta versions read and written, MLflow run) and prints one summary line, whatever the
outcome, so a scheduler log and the table tell the same story.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pyspark.sql import SparkSession

from streamrank.config import Config
from streamrank.delta import Warehouse
from streamrank.errors import StreamrankError


class Context:
    """Per-process state shared by the stages of one command."""

    def __init__(self, cfg: Config, run_id: str | None = None) -> None:
        self.cfg = cfg
        self.run_id = run_id or f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"

    @cached_property
    def spark(self) -> SparkSession:
        from streamrank.spark import build_session

        return build_session(self.cfg)

    @cached_property
    def warehouse(self) -> Warehouse:
        wh = Warehouse(self.spark, self.cfg)
        wh.create_all()
        return wh

    def table(self, name: str):  # noqa: ANN201 - DeltaTable
        return self.warehouse.table(name)


@dataclass
class StageRun:
    """Lineage of one stage run, filled in by the stage while it works."""

    stage: str
    run_date: dt.date
    run_id: str
    versions_read: dict[str, int | None] = field(default_factory=dict)
    versions_written: dict[str, int | None] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    message: str = ""

    def read(self, table: str, version: int | None) -> None:
        self.versions_read[table] = version

    def wrote(self, table: str, version: int | None) -> None:
        self.versions_written[table] = version


class PhaseTimer:
    """Wall time per named phase of a stage (time.perf_counter), kept in run.metrics["phases_s"]
    so a slow run says where its time went; a phase entered twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


def _summary(run: StageRun, status: str, seconds: float) -> str:
    wrote = " ".join(f"{t}@v{v}" for t, v in run.versions_written.items())
    metrics = " ".join(f"{k}={v}" for k, v in run.metrics.items() if not isinstance(v, (dict, list)))
    parts = [f"[{run.stage}] date={run.run_date} status={status} {seconds:.1f}s", metrics, f"wrote {wrote}" if wrote else "", run.message]
    return " | ".join(p for p in parts if p)


def successful_runs(ctx: Context, stage: str, days: list[dt.date]) -> list[dict[str, Any]]:
    """ops/job_runs rows of `stage` that succeeded on those run dates.

    Read through delta-rs and pyarrow, and only those run_date partitions: a few dozen
    rows, not worth a Spark job, and not the table's whole history either. A warehouse
    that never recorded a run (no ops/job_runs yet) has none.
    """
    table = ctx.table("ops/job_runs")
    if not table.exists():
        return []
    wanted = set(days)
    return [r for r in table.to_arrow(partitions={"run_date": sorted(wanted)}).to_pylist()
            if r.get("stage") == stage and r.get("status") == "success" and r.get("run_date") in wanted]


@contextmanager
def stage_run(ctx: Context, stage: str, run_date: dt.date) -> Iterator[StageRun]:
    """Record a stage in ops/job_runs and print its summary line, on success and on failure."""
    run = StageRun(stage, run_date, ctx.run_id)
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    status, code = "success", 0
    try:
        from streamrank.publish import recover

        recovered = recover(ctx)  # a killed run's half-published tables go back first (publish.py)
        if recovered:
            run.metrics["recovered"] = recovered
        yield run
    except StreamrankError as exc:
        # an expected state (no champion yet, ...) is recorded as itself, so "failed" rows are the ones to act on
        status, code = exc.outcome or "failed", exc.exit_code
        run.message = run.message or str(exc).splitlines()[0]
        raise
    except BaseException as exc:
        status, code = "failed", 1
        run.message = run.message or f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise
    finally:
        _record(ctx, run, status, code, started, time.perf_counter() - t0)


def record_skipped(ctx: Context, stage: str, run_date: dt.date, message: str) -> None:
    """Record a stage the nightly chose not to run, with why, as a `skipped` row of ops/job_runs.

    A reader of the night's runs (the report, an analyst) then sees the reason where the
    stage's own row would be, not a gap.
    """
    _record(ctx, StageRun(stage, run_date, ctx.run_id, message=message), "skipped", 0, dt.datetime.now(dt.UTC), 0.0)


def _record(ctx: Context, run: StageRun, status: str, code: int, started: dt.datetime, seconds: float) -> None:
    """Append the run's ops/job_runs row (never masking the stage's own error) and print its summary line."""
    row = {
        "run_id": ctx.run_id, "stage": run.stage, "status": status, "exit_code": code,
        "started_at": started, "ended_at": dt.datetime.now(dt.UTC), "duration_s": round(seconds, 3),
        "versions_read": json.dumps(run.versions_read, sort_keys=True),
        "versions_written": json.dumps(run.versions_written, sort_keys=True),
        "mlflow_run_id": run.mlflow_run_id, "metrics": json.dumps(run.metrics, default=str, sort_keys=True),
        "message": run.message[:2000], "host": socket.gethostname(), "pid": os.getpid(), "run_date": run.run_date,
    }
    try:
        ctx.table("ops/job_runs").append_rows([row])
    except Exception as exc:  # noqa: BLE001 - never mask the stage's own error
        print(f"[{run.stage}] warning: could not record ops/job_runs: {exc}", file=sys.stderr)
    print(_summary(run, status, seconds), flush=True)
