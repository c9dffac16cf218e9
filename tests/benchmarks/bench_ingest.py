"""Benchmark: `ingest` of one generated day vs a plain Spark copy of the same event files.

The reference is what a minimal pipeline would do, `spark.read.json(files).write.parquet`;
ingest does more (exact line numbers, raw lines, parse flags, sha256 and gzip checks,
four Delta commits, the exactly-once log), and the target is that all of it costs at
most 1.5x the copy. Both run side by side on the same files in one Spark session, after one untimed
warm-up of each on a tiny day, three repetitions each in alternating order (each ingest
on a fresh warehouse), medians compared.

Run standalone: `python tests/benchmarks/bench_ingest.py [--quick] [--workdir DIR]`.
"""

from __future__ import annotations

import datetime as dt
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks_common import alternating
from pyspark.sql import SparkSession

from streamrank.config import Config
from streamrank.context import Context
from streamrank.generate import generate
from streamrank.ingest import EVENT_SUFFIXES, ingest

DATE = dt.date(2026, 11, 1)
TARGET = 1.5
REPS = 3
WARMUP_SCALE = 0.005


def _landing(workdir: Path, scale: float) -> Path:
    """Generate the day once per scale; later runs of the benchmark reuse it."""
    landing = workdir / f"landing-scale-{scale:g}"
    if not (landing / "_ledger" / "ledger.json").exists():
        shutil.rmtree(landing, ignore_errors=True)
        generate(landing, DATE, 1, scale=scale, faults=True)
    return landing


def _time_ingest(spark: SparkSession, cfg: Config, landing: Path, warehouse: Path) -> float:
    shutil.rmtree(warehouse, ignore_errors=True)
    ctx = Context(cfg.with_overrides({"warehouse.root": str(warehouse), "landing.root": str(landing)}))
    ctx.spark = spark  # the benchmark's session, whatever build_session would pick
    ctx.warehouse  # noqa: B018 - create the empty tables outside the timed part
    t0 = time.perf_counter()
    ingest(ctx, DATE)
    return time.perf_counter() - t0


def _time_reference(spark: SparkSession, files: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    spark.read.json(files).write.parquet(str(out))
    return time.perf_counter() - t0


def run(spark: SparkSession, cfg: Config, workdir: Path, quick: bool) -> list[dict[str, Any]]:
    """Generate one day (scale 1, or 0.2 when quick) and time ingest against the copy."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    landing = _landing(workdir, 0.2 if quick else 1.0)
    folder = landing / "events" / f"date={DATE.isoformat()}"
    files = [str(p) for p in sorted(folder.iterdir()) if p.name.endswith(EVENT_SUFFIXES) and p.stat().st_size > 0]
    # Warm both code paths on a tiny day first (JIT, codegen), so the first timed
    # repetition of neither side pays for the JVM warming up.
    tiny = _landing(workdir, WARMUP_SCALE)
    tiny_folder = tiny / "events" / f"date={DATE.isoformat()}"
    _time_ingest(spark, cfg, tiny, workdir / "bench-ingest-warmup-wh")
    _time_reference(spark, [str(p) for p in tiny_folder.iterdir() if p.stat().st_size > 0], workdir / "bench-ingest-warmup-ref")
    shutil.rmtree(workdir / "bench-ingest-warmup-wh", ignore_errors=True)
    shutil.rmtree(workdir / "bench-ingest-warmup-ref", ignore_errors=True)

    def ours_once(i: int) -> float:
        seconds = _time_ingest(spark, cfg, landing, workdir / f"bench-ingest-wh-{i}")
        shutil.rmtree(workdir / f"bench-ingest-wh-{i}", ignore_errors=True)
        return seconds

    def ref_once(i: int) -> float:
        seconds = _time_reference(spark, files, workdir / f"bench-ingest-ref-{i}")
        shutil.rmtree(workdir / f"bench-ingest-ref-{i}", ignore_errors=True)
        return seconds

    ours, ref = alternating(ours_once, ref_once, REPS)
    ours_s, ref_s = statistics.median(ours), statistics.median(ref)
    ratio = ours_s / ref_s
    return [{
        "name": "ingest", "ours_s": round(ours_s, 3), "reference": "spark.read.json -> write.parquet",
        "reference_s": round(ref_s, 3), "ratio": round(ratio, 3), "target": TARGET, "ok": ratio <= TARGET,
    }]


if __name__ == "__main__":
    from benchmarks_common import standalone

    sys.exit(standalone(run))
