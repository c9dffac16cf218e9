"""The whole nightly at two scales, and how its time grows with the data.

Each scale gets its own landing + warehouse: three days are generated; the first two
only build history (ingest and clean, untimed: with no training rows yet the model stages
would skip anyway), and the third night runs the whole nightly, timed. Training runs one
epoch at both scales so its cost grows with the rows as it does in production (the epoch
count is a model choice, not what this measures). If the first model does not beat
most-popular, the night has no champion to score with; the benchmark then does what a
release manager would (promote --force, nightly --from score) and counts that time too,
so both scales always include scoring. The scaling exponent
log(t_big / t_small) / log(big / small) says how time grows with volume: 1.0 is linear,
the target is <= 1.1.
"""

from __future__ import annotations

import datetime as dt
import math
import sys
import time
from pathlib import Path

from pyspark.sql import SparkSession

from streamrank.config import Config
from streamrank.context import Context
from streamrank.generate import generate
from streamrank.nightly import nightly, run_stage
from streamrank.promote import promote
from streamrank.registry import CHALLENGER, CHAMPION, by_alias

START = dt.date(2026, 11, 1)
DAYS = 3


def time_nightly(spark: SparkSession, cfg: Config, workdir: Path, scale: float) -> tuple[float, float]:
    """Seconds of the last of DAYS nights at `scale`, and of a plain JSON->Parquet copy of that day."""
    root = workdir / f"scale_{scale}"
    run_cfg = cfg.with_overrides({"warehouse.root": str(root / "warehouse"), "landing.root": str(root / "landing"),
                                  "train.max_epochs": 1, "train.progress": False})
    generate(run_cfg.landing, START, DAYS, scale=scale, faults=True, seed=11)
    ctx = Context(run_cfg)
    for i in range(DAYS - 1):
        for stage in ("ingest", "clean"):
            run_stage(ctx, stage, START + dt.timedelta(days=i))
    last = START + dt.timedelta(days=DAYS - 1)
    t0 = time.perf_counter()
    nightly(ctx, last)
    if by_alias(run_cfg, CHAMPION) is None and (challenger := by_alias(run_cfg, CHALLENGER)) is not None:
        promote(ctx, date=last, version=challenger.version, force=True, reason="bench: time scoring at every scale")
        nightly(ctx, last, from_stage="score")
    ours = time.perf_counter() - t0
    files = sorted(str(p) for p in (run_cfg.landing / "events" / f"date={last}").glob("*.jsonl*") if p.stat().st_size)
    t0 = time.perf_counter()
    spark.read.json(files).write.mode("overwrite").parquet(str(root / "plain_copy"))
    return ours, time.perf_counter() - t0


def run(spark: SparkSession, cfg: Config, workdir: Path, quick: bool, scales: tuple[float, float] | None = None) -> list[dict]:
    small, big = scales or ((0.05, 0.2) if quick else (1.0, 4.0))
    t_small, copy_small = time_nightly(spark, cfg, workdir, small)
    t_big, _ = time_nightly(spark, cfg, workdir, big)
    exponent = math.log(t_big / t_small) / math.log(big / small)
    return [
        {"name": "nightly_scale_1", "ours_s": t_small, "reference": f"plain JSON->Parquet copy of the day (scale {small})",
         "reference_s": copy_small, "ratio": t_small / copy_small, "target": None, "ok": True},
        {"name": "nightly_scaling", "ours_s": t_big, "reference": f"nightly at scale {small} vs {big}: exponent",
         "reference_s": t_small, "ratio": exponent, "target": 1.1, "ok": exponent <= 1.1},
    ]


if __name__ == "__main__":
    from benchmarks_common import standalone

    sys.exit(standalone(run))
