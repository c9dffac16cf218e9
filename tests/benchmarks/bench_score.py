"""Batch scoring throughput: our Spark model pass vs a pure-torch bound and vs Spark ALS.

All sides run in this one process/session on the same synthetic inputs:

- viewers: gold/viewer_features-shaped Parquet (L = features.seq_len histories, ~10 %
  cold-start rows, small row groups so Spark splits them like the features stage's files);
- model: an untrained StreamRankModel of the configured size (model.*), 5,000 products,
  run in score.precision (auto: bf16 on CPUs with AMX/AVX512-BF16, as the score stage);
- candidates: 2,000 products of "tomorrow's schedule" (the scale-1 order of magnitude),
  2 % of them new launches scored from their category.

Rows:

- ``score``: scored (viewer, candidate) pairs/s of ``score.score_files``, the score stage's
  model pass (Spark hands out row-group tasks; each Python worker reads its pieces with
  pyarrow, keeps the active viewers, sorts them by history length, runs the encoder,
  matmul, deterministic top-K and the intent head on the top-K; Arrow out to Spark's noop
  sink; median of 3) vs the bound: one process doing ONLY ``states @ cand.T`` + torch.topk
  over the same viewer states and candidate matrix. ratio = ours_rate / bound_rate,
  target >= 0.5. Extra fields say where the time goes: ``inproc_model_pairs_per_s`` is the
  full model pass in one process without Spark, ``spark_efficiency`` ours / that;
  ``dataframe_path_s`` is the same pass with Spark reading, spreading and sorting the
  viewers (``score.score_viewers``, timed alternately with ours), and
  ``dataframe_path_over_ours`` that time over ours.
- ``score_vs_als``: Spark MLlib ALS (rank evaluate.als_rank, implicit) recommendForUserSubset
  for the same viewers and item count, top score.top_k; ratio = als_s / ours_s, target >= 3.
- ``score_scaling``: ours at the small vs the large viewer count (100k -> 400k; quick
  20k -> 80k); ratio = (n_large / n_small) / (t_large / t_small): 1.0 is linear, target >= 0.8.

Run standalone: ``python tests/benchmarks/bench_score.py --quick``.
"""

from __future__ import annotations

import datetime as dt
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from benchmarks_common import alternating
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from streamrank.config import Config
from streamrank.delta import arrow_schema
from streamrank.features import EVENT_TYPES
from streamrank.model import ModelConfig, StreamRankModel
from streamrank.schemas import table_spec
from streamrank.score import (
    Champion,
    Scorer,
    active_viewers,
    arrow_inputs,
    build_candidates,
    build_payload,
    end_of_day,
    inference_precision,
    score_files,
    score_viewers,
)

D = dt.date(2026, 11, 8)
N_PRODUCTS = 5_000
N_CATEGORIES = 50
N_HOSTS = 200
N_CANDIDATES = 2_000
NEW_SHARE = 0.02
COLD_SHARE = 0.10
ROW_GROUP = 8_192
SAMPLE = 8_192  # viewers whose states feed the bound and the in-process reference
ACTIVE_DAYS = 7
REPS = 3  # a pass of the large count takes under a minute: median of 3


def write_viewers(path: Path, n: int, seq_len: int, seed: int) -> Path:
    """n synthetic gold/viewer_features rows of D, written in chunks (memory stays small)."""
    rng = np.random.default_rng(seed)
    schema = arrow_schema(table_spec("gold/viewer_features").schema)
    path.mkdir(parents=True, exist_ok=True)
    end = dt.datetime.combine(D + dt.timedelta(days=1), dt.time(0), tzinfo=dt.UTC)
    with pq.ParquetWriter(path / "part-0.parquet", schema) as writer:
        for start in range(0, n, 50_000):
            m = min(50_000, n - start)
            hist_len = np.where(rng.random(m) < COLD_SHARE, 0, rng.integers(1, seq_len + 1, m)).astype(np.int32)
            valid = np.arange(seq_len)[None, :] >= (seq_len - hist_len)[:, None]
            prod = np.where(valid, rng.integers(2, N_PRODUCTS + 2, (m, seq_len)), 0).astype(np.int32)
            cat = np.where(valid, 2 + prod % N_CATEGORIES, 0).astype(np.int32)
            event = np.where(valid, rng.integers(2, 2 + len(EVENT_TYPES), (m, seq_len)), 0).astype(np.int32)
            dwell = np.where(valid, rng.integers(1, 16, (m, seq_len)), 0).astype(np.int32)
            dt_h = np.where(valid, np.sort(rng.uniform(0, 720, (m, seq_len)), axis=1)[:, ::-1], 0).astype(np.float32)

            offsets = pa.array(np.arange(m + 1, dtype=np.int32) * seq_len)

            def lists(a: np.ndarray, typ: pa.DataType, offsets: pa.Array = offsets) -> pa.Array:
                return pa.ListArray.from_arrays(offsets, pa.array(a.reshape(-1), typ))

            spend = rng.gamma(1.0, 50.0, m)
            cols = {
                "viewer_id": pa.array([f"v{start + i:08d}" for i in range(m)]),
                "recency_days": pa.array(rng.uniform(0, 30, m)), "frequency_7d": pa.array(rng.integers(0, 5, m)),
                "frequency_30d": pa.array(rng.integers(0, 12, m)), "monetary_7d": pa.array(spend / 3),
                "monetary_30d": pa.array(spend), "avg_price_paid": pa.array(rng.uniform(5, 200, m)),
                "price_tier": pa.array(rng.integers(1, 6, m).astype(np.int32)),
                "watch_time_ms": pa.array(rng.integers(0, 10**7, m)), "dwell_ms_total": pa.array(rng.integers(0, 10**7, m)),
                "likes": pa.array(rng.integers(0, 9, m)), "comments": pa.array(rng.integers(0, 9, m)),
                "gifts": pa.array(rng.integers(0, 3, m)), "n_events": pa.array(hist_len.astype(np.int64) + 1),
                "last_event_ts": pa.array([end - dt.timedelta(hours=1)] * m, pa.timestamp("us", tz="UTC")),
                "hist_product": lists(prod, pa.int32()), "hist_category": lists(cat, pa.int32()),
                "hist_event": lists(event, pa.int32()), "hist_dwell": lists(dwell, pa.int32()),
                "hist_dt": lists(dt_h, pa.float32()), "hist_len": pa.array(hist_len),
                "hist_host": lists(np.where(valid, rng.integers(2, N_HOSTS + 2, (m, seq_len)), 0).astype(np.int32),
                                   pa.int32()),
                "hist_hour": lists(np.where(valid, rng.integers(2, 26, (m, seq_len)), 0).astype(np.int32), pa.int32()),
                "as_of_date": pa.array([D] * m, pa.date32()),
            }
            writer.write_table(pa.table(cols).select(schema.names).cast(schema), row_group_size=ROW_GROUP)
    return path


def champion_and_candidates(cfg: Config) -> tuple[Champion, Any, dict[str, dict[str, int]]]:
    """An untrained model of the configured size, its vocabulary, and tomorrow's candidates."""
    torch.manual_seed(0)
    mc = ModelConfig(n_products=N_PRODUCTS + 2, n_categories=N_CATEGORIES + 2, n_event_types=len(EVENT_TYPES) + 2,
                     n_hosts=N_HOSTS + 2, d_model=int(cfg["model.d_model"]), n_heads=int(cfg["model.n_heads"]),
                     n_layers=int(cfg["model.n_layers"]), seq_len=int(cfg["features.seq_len"]))
    product_category = np.concatenate([[0, 1], 2 + np.arange(N_PRODUCTS) % N_CATEGORIES])
    model = StreamRankModel(mc, product_category=product_category)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    vocab = {
        "product": {"<pad>": 0, "<unk>": 1, **{f"p{i:05d}": i + 2 for i in range(N_PRODUCTS)}},
        "category": {"<pad>": 0, "<unk>": 1, **{f"c{i:02d}": i + 2 for i in range(N_CATEGORIES)}},
        "event": {"<pad>": 0, "<unk>": 1, **{t: i + 2 for i, t in enumerate(EVENT_TYPES)}},
        "host": {"<pad>": 0, "<unk>": 1, **{f"h{i:04d}": i + 2 for i in range(N_HOSTS)}},
    }
    champion = Champion("bench", "0", "bench", buf.getvalue(), mc.to_dict(), vocab,
                        {"method": "platt", "a": 1.0, "b": 0.0})
    rng = np.random.default_rng(1)
    n_new = int(N_CANDIDATES * NEW_SHARE)
    known = rng.choice(N_PRODUCTS, N_CANDIDATES - n_new, replace=False)
    slot = dt.datetime.combine(D + dt.timedelta(days=1), dt.time(12), tzinfo=dt.UTC)
    rows = [{"product_id": f"p{i:05d}", "stream_id": f"s{i % 200}", "host_id": f"h{i % N_HOSTS:04d}",
             "slot_start": slot, "slot_hour": 2 + slot.hour, "n_slots": 1,
             "category": f"c{i % N_CATEGORIES:02d}", "list_price": 10.0, "popularity": int(rng.integers(0, 50))}
            for i in known]
    rows += [{"product_id": f"new{j:04d}", "stream_id": f"s{j % 200}", "host_id": f"h{j % N_HOSTS:04d}",
              "slot_start": slot, "slot_hour": 2 + slot.hour, "n_slots": 1,
              "category": f"c{j % N_CATEGORIES:02d}", "list_price": 10.0, "popularity": 0} for j in range(n_new)]
    cands = build_candidates(rows, vocab["product"], vocab["category"], mc.n_products, False, [])
    return champion, cands, vocab


def time_ours(spark: SparkSession, path: Path, bc: Any, batch_size: int) -> float:
    """One full pass of the score stage's model pass (score_files: the workers read the
    files) over the viewers, into Spark's noop sink."""
    files = sorted(str(f) for f in path.glob("*.parquet"))
    since = end_of_day(D) - dt.timedelta(days=ACTIVE_DAYS)
    t0 = time.perf_counter()
    score_files(spark, files, since, bc, batch_size).write.format("noop").mode("overwrite").save()
    return time.perf_counter() - t0


def time_dataframe_path(spark: SparkSession, path: Path, bc: Any, batch_size: int) -> float:
    """The same pass with Spark reading, spreading and sorting the viewers (score_viewers)."""
    viewers: DataFrame = active_viewers(spark.read.parquet(str(path)), D, ACTIVE_DAYS)
    t0 = time.perf_counter()
    score_viewers(viewers, bc, batch_size).write.format("noop").mode("overwrite").save()
    return time.perf_counter() - t0


def in_process(payload: dict[str, Any], path: Path, batch_size: int) -> tuple[torch.Tensor, float, int]:
    """States of the first SAMPLE viewers, and the full model pass over them in one process
    (sorted by history length, as each scoring task sorts its viewers)."""
    scorer = Scorer(payload)
    table = pq.read_table(path / "part-0.parquet").slice(0, SAMPLE)
    table = table.take(pc.sort_indices(table, [("hist_len", "ascending"), ("viewer_id", "ascending")]))
    states, t_full = [], 0.0
    for rb in table.to_batches(max_chunksize=batch_size):
        inputs = arrow_inputs(rb, scorer.seq_len, scorer.n_pp)
        with torch.inference_mode():
            states.append(scorer.model.encode(scorer.tensors(inputs))[0][:, -1].float())
        t0 = time.perf_counter()
        scorer.score(inputs)
        t_full += time.perf_counter() - t0
    return torch.cat(states), t_full, table.num_rows


def time_bound(states: torch.Tensor, cand: torch.Tensor, n: int, k: int, batch_size: int) -> float:
    """Pure torch over n viewers (the sampled states, cycled): matmul + topk, batch by batch."""
    s = states.shape[0]
    with torch.inference_mode():
        t0 = time.perf_counter()
        for start in range(0, n, batch_size):
            rows = torch.arange(start, min(n, start + batch_size)) % s
            torch.topk(states[rows] @ cand.T, k, dim=1)
        return time.perf_counter() - t0


def time_als(spark: SparkSession, cfg: Config, n_users: int, n_items: int, k: int, workdir: Path) -> float:
    """ALS recommendForUserSubset for n_users users over n_items items (training not timed)."""
    from pyspark.ml.recommendation import ALS

    rng = np.random.default_rng(2)
    per_user = 5
    users = np.repeat(np.arange(n_users, dtype=np.int32), per_user)
    items = rng.integers(0, n_items, users.size).astype(np.int32)
    src = workdir / "als_ratings.parquet"
    pq.write_table(pa.table({"user": users, "item": items, "rating": np.ones(users.size, np.float32)}), src)
    ratings = spark.read.parquet(str(src))
    als = ALS(rank=int(cfg["evaluate.als_rank"]), maxIter=2, implicitPrefs=True, userCol="user", itemCol="item",
              ratingCol="rating", seed=7, coldStartStrategy="drop")
    model = als.fit(ratings)
    subset = spark.range(n_users).select(F.col("id").cast("int").alias("user"))
    t0 = time.perf_counter()
    model.recommendForUserSubset(subset, k).write.format("noop").mode("overwrite").save()
    return time.perf_counter() - t0


def run(spark: SparkSession, cfg: Config, workdir: Path, quick: bool) -> list[dict]:
    small, large = (20_000, 80_000) if quick else (100_000, 400_000)
    seq_len, k, batch_size = int(cfg["features.seq_len"]), int(cfg["score.top_k"]), int(cfg["score.batch_size"])
    champion, cands, vocab = champion_and_candidates(cfg)
    precision = inference_precision(cfg["score.precision"])
    payload, _ = build_payload(champion, cands, vocab, k, precision)
    bc = spark.sparkContext.broadcast(payload)
    try:
        paths = {n: write_viewers(workdir / f"viewers_{n}", n, seq_len, seed=n) for n in (2_000, small, large)}
        time_ours(spark, paths[2_000], bc, batch_size)  # warm-up: Python workers start, load the model once
        time_dataframe_path(spark, paths[2_000], bc, batch_size)
        ours = {small: statistics.median(time_ours(spark, paths[small], bc, batch_size) for _ in range(REPS))}
        runs, df_runs = alternating(lambda _: time_ours(spark, paths[large], bc, batch_size),
                                    lambda _: time_dataframe_path(spark, paths[large], bc, batch_size), REPS)
        ours[large], dataframe_s = statistics.median(runs), statistics.median(df_runs)
    finally:
        bc.unpersist()
    states, t_inproc, n_sample = in_process(payload, paths[small], batch_size)
    cand = torch.as_tensor(payload["cand_matrix"])
    n_cand = cands.size
    bound_s = time_bound(states, cand, large, k, batch_size)
    pairs = large * n_cand
    ours_rate, bound_rate = pairs / ours[large], pairs / bound_s
    inproc_rate = n_sample * n_cand / t_inproc
    als_s = time_als(spark, cfg, large, n_cand, k, workdir)
    scaling = (large / small) / (ours[large] / ours[small])
    common = {"n_viewers": large, "n_candidates": n_cand, "k": k, "d_model": int(cfg["model.d_model"]),
              "seq_len": seq_len, "precision": precision, "spark_master": spark.sparkContext.master}
    return [
        {"name": "score", "ours_s": ours[large],
         "reference": f"torch matmul+topk, 1 process ({large} viewers x {n_cand} candidates, d={common['d_model']})",
         "reference_s": bound_s, "ratio": ours_rate / bound_rate, "target": 0.5, "ok": ours_rate / bound_rate >= 0.5,
         **common, "ours_pairs_per_s": ours_rate, "bound_pairs_per_s": bound_rate,
         "inproc_model_pairs_per_s": inproc_rate, "spark_efficiency": ours_rate / inproc_rate,
         "runs_s": runs, "dataframe_path_s": dataframe_s, "dataframe_path_runs_s": df_runs,
         "dataframe_path_over_ours": dataframe_s / ours[large],
         "scaling": [{"n_viewers": n, "ours_s": t, "pairs_per_s": n * n_cand / t} for n, t in sorted(ours.items())]},
        {"name": "score_vs_als", "ours_s": ours[large],
         "reference": f"Spark ALS recommendForUserSubset (rank {cfg['evaluate.als_rank']}, {large} users x {n_cand} items)",
         "reference_s": als_s, "ratio": als_s / ours[large], "target": 3.0, "ok": als_s / ours[large] >= 3.0, **common},
        {"name": "score_scaling", "ours_s": ours[large], "reference": f"ours at {small} viewers (x{large // small} rows)",
         "reference_s": ours[small], "ratio": scaling, "target": 0.8, "ok": scaling >= 0.8, **common},
    ]


if __name__ == "__main__":
    from benchmarks_common import standalone

    sys.exit(standalone(run))
