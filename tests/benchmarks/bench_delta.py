"""rs-engine Delta write/read vs plain Spark Parquet on the same DataFrame, same run.

The rs engine adds: a move of each file into its partition directory, a footer read per
file for statistics, and one delta-rs commit; reads add a snapshot load. The ratios
show what that costs relative to the work Spark does anyway.

Like bench_ingest and bench_clean: one warm-up of each side, then the two sides in
alternating order (benchmarks_common.alternating), medians compared. Timed one side
after the other, the read's ratio was 1.16 and 1.24 in two full runs; alternating,
1.02 and 0.96. Reads take 5 repetitions: each is about a second, so noise weighs more.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks_common import alternating
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from streamrank.config import Config
from streamrank.delta import Warehouse


def frame(spark: SparkSession, rows: int):
    """A rankings-shaped frame: strings, doubles, a timestamp and a date partition."""
    return spark.range(rows).select(
        F.concat(F.lit("v"), (F.col("id") % (rows // 50 + 1)).cast("string")).alias("viewer_id"),
        (F.col("id") % 50 + 1).cast("int").alias("rank"),
        F.concat(F.lit("p"), (F.col("id") * 7919 % 5000).cast("string")).alias("product_id"),
        F.concat(F.lit("s"), (F.col("id") % 200).cast("string")).alias("stream_id"),
        F.timestamp_seconds(F.lit(1_795_000_000) + F.col("id") % 86400).alias("slot_start"),
        F.rand(1).alias("score"), F.rand(2).alias("purchase_prob"), F.lit("model").alias("strategy"),
        F.lit("3").alias("model_version"), F.lit("bench").alias("run_id"),
        F.expr("date_add(DATE'2026-11-02', cast(id % 2 as int))").alias("score_date"),
    )


def _seconds(fn: Callable[[], object]) -> Callable[[int], float]:
    def timed(_: int) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return timed


def _alternating_medians(ours: Callable[[], object], ref: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median seconds of `ours` and of `ref`, after an untimed run of each, in alternating order."""
    ours()
    ref()
    got_ours, got_ref = alternating(_seconds(ours), _seconds(ref), reps)
    return statistics.median(got_ours), statistics.median(got_ref)


def run(spark: SparkSession, cfg: Config, workdir: Path, quick: bool) -> list[dict]:
    rows = 1_000_000 if quick else 5_000_000
    src = workdir / "delta_src"
    frame(spark, rows).write.mode("overwrite").parquet(str(src))  # materialise once: both sides read the same input
    df = spark.read.parquet(str(src)).cache()
    df.count()
    wh_cfg = cfg.with_overrides({"warehouse.root": str(workdir / "delta_wh")})
    plain = workdir / "delta_plain"
    counter = iter(range(1000))

    def ours_write() -> None:
        shutil.rmtree(workdir / "delta_wh", ignore_errors=True)
        Warehouse(spark, wh_cfg, engine="rs").table("gold/user_product_rankings").append(df)

    def ref_write() -> None:
        shutil.rmtree(plain, ignore_errors=True)
        df.write.partitionBy("score_date").parquet(str(plain / str(next(counter))))

    w_ours, w_ref = _alternating_medians(ours_write, ref_write, 3)
    table = Warehouse(spark, wh_cfg, engine="rs").table("gold/user_product_rankings")
    ref_path = str(plain / str(next(counter)))
    df.write.partitionBy("score_date").parquet(ref_path)
    scan = lambda d: d.agg(F.sum("score"), F.countDistinct("viewer_id"), F.max("slot_start")).collect()  # noqa: E731
    r_ours, r_ref = _alternating_medians(lambda: scan(table.read()), lambda: scan(spark.read.parquet(ref_path)), 5)
    df.unpersist()
    return [
        {"name": "delta_write", "ours_s": w_ours, "reference": f"df.write.parquet ({rows} rows)", "reference_s": w_ref,
         "ratio": w_ours / w_ref, "target": 1.3, "ok": w_ours / w_ref <= 1.3},
        {"name": "delta_read", "ours_s": r_ours, "reference": f"spark.read.parquet + full scan ({rows} rows)", "reference_s": r_ref,
         "ratio": r_ours / r_ref, "target": 1.2, "ok": r_ours / r_ref <= 1.2},
    ]


if __name__ == "__main__":
    from benchmarks_common import standalone

    sys.exit(standalone(run))
