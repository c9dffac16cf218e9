"""`streamrank score --date D`: per-viewer rankings and intent for the streams of D+1.

What is scored, and why it is built this way:

- Model: the registry's ``champion`` alias (no champion: NoChampionError, exit 5). Its
  artifacts (model.pt, model_config.json, vocab.json, calibrator.json) are downloaded once
  on the driver and shipped to the executors as ONE broadcast of bytes; each Python
  worker rebuilds the model once and keeps it in a module-level cache keyed by model
  version (plus the night's new-product extension), so no task or batch reloads it.
- Viewers: gold/viewer_features of D whose last_event_ts lies within ``score.active_days``
  of the end of D (D+1 00:00 UTC). The workers read them: Spark hands out tasks of
  (file, row group, row range) pieces of the snapshot's files of D, and each Python
  worker reads its pieces with pyarrow, keeps the active viewers and sorts them by
  history length (score_files; a partition whose files carry deletion vectors, or a
  table with column mapping, is read through the Delta engine instead, score_viewers).
  Per ``score.batch_size`` viewers a ``mapInArrow`` computes the encoder output once,
  ranking scores = viewer_state @ candidate_matrix.T (one matmul), a deterministic top-K
  and the intent head on those K candidates only (each candidate's target-attention
  query is computed once per worker and gathered per pair). Nothing about viewers
  reaches the driver.
- Candidates: the products of bronze/stream_products snapshot_date = D+1 (no rows:
  MissingInputError, exit 5, naming the table and the landing file). A product shown in
  several slots keeps its EARLIEST slot (ties: smallest stream_id), because a
  recommendation is most useful before the first time the product is live; a slot without
  slot_start_ts falls back to its stream's start_ts (bronze/streams of D+1). Candidates
  are numbered in product_id order, and every tie in the top-K goes to the smaller
  number, so a re-run gives identical rankings.
- Id spaces: gold/viewer_features holds ids of the vocabulary of D (gold/vocabularies),
  the model knows the ids of the vocabulary it was trained with (vocab.json). Product
  ids are dense ranks of sorted tokens, so a single new product shifts every later id;
  histories are therefore remapped token-wise (D id -> token -> model id, unknown -> 1).
- New products (not in the model's vocabulary, e.g. launched today): the unknown product
  embedding (id 1) plus the embedding of their catalog category (latest bronze/products
  snapshot on or before D+1) and, when the model carries product price tiers, of their
  list-price tier. The model instance is extended with one extra id per new product so
  both the ranking tower and the intent head see that category - a new product gets a
  real score from its category and price instead of silently ranking last.
- Cold start (hist_len = 0): tomorrow's most popular candidates - add_to_cart + purchase
  events of the last 7 days (D-6 .. D) in silver/viewer_events, ties by the number of
  D+1 slots, then product_id - with strategy ``cold_start`` and score = that 7-day
  count. Their purchase_prob still comes from the model's intent head, which is defined
  for an empty history (a learned "null" attention slot plus purchase-power features).
- purchase_prob: the intent head's per-candidate probability, passed through the
  calibrator of the model (model.apply_calibration). Training fits that Platt calibrator
  on the viewer-level intent logit, the only one it fits; it is monotone, so the order
  of a viewer's probabilities is unchanged. intent_score: the calibrated viewer-level
  P(purchase tomorrow), pooled by the model over the viewer's K ranked candidates plus
  its background term (training pooled over ~features.cand_size schedule candidates).
  purchase_power: monetary_30d, the viewer's spend over the 30 days up to D.
- Publishing (write, audit, publish): the per-viewer result is cached once, so both
  writes reuse it without re-running the model. Both tables' files are staged (written,
  invisible), and the two expectation suites read those staged files, so the gate
  audits exactly what would be published; their results go to ops/dq_results. A
  critical failure raises QualityGateError (exit 3): the staged files are deleted and
  nothing is published. Otherwise each table's score_date = D+1 partition is replaced
  in one Delta commit per table, journaled so that a crash between the two leaves both
  tables at their previous versions once the next stage run recovers (publish).
- Precision (``score.precision``): the encoder and the intent head run in bfloat16 when
  the driver's CPU multiplies bf16 natively (AMX or AVX512-BF16; ``auto``), else float32.
  Measured with a model trained on the scale-1 week (holdout of 114,704 rows): NDCG@10
  0.4530 vs 0.4527 in float32, AUC 0.6414 vs 0.6415; bench_score (400k viewers x 2,000
  candidates, local[2]) 36.6 s vs 59.1 s. The ranking matmul and top-K stay float32
  (viewer state cast up, candidate matrix computed in float32 on the driver): bf16's
  8-bit mantissa would otherwise turn near-equal scores into ties. The driver decides
  and ships the choice in the broadcast, so every executor computes the same way
  (``auto`` judges the driver's CPU: where the executors' CPUs differ, set it
  explicitly). ``fp32`` reproduces evaluate's and training's figures to the last bit.
  The MLflow pyfunc stays float32 (it is served elsewhere).
- Determinism: eval mode (no dropout), seeded torch, batches fixed by the tasks (cut
  from the sorted file list and its row groups) and the sort inside each, ties ordered by
  candidate index: a re-run for D writes identical rows
  (except run_id, which names the run that wrote them).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import hashlib
import io
import itertools
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from streamrank.allocator import keep_freed_memory
from streamrank.config import CHOICES, parse_date
from streamrank.context import Context, PhaseTimer, stage_run
from streamrank.delta import NotPlainParquetError, arrow_schema
from streamrank.errors import ConfigError, MissingInputError, NoChampionError
from streamrank.features import first_slots, hour_token, known_by, price_thresholds
from streamrank.model import (
    PAD_ID,
    UNK_ID,
    ModelConfig,
    StreamRankModel,
    apply_calibration,
    load_model,
)
from streamrank.publish import StagedTables
from streamrank.schemas import table_spec

log = logging.getLogger(__name__)

STAGE = "score"
VIEWER_FEATURES = "gold/viewer_features"
VOCAB = "gold/vocabularies"
STREAM_PRODUCTS = "bronze/stream_products"
STREAMS = "bronze/streams"
PRODUCTS = "bronze/products"
SILVER = "silver/viewer_events"
RANKINGS = "gold/user_product_rankings"
INTENT = "gold/user_intent_scores"
RANKINGS_SUITE = "gold_user_product_rankings"
INTENT_SUITE = "gold_user_intent_scores"

STRATEGY_MODEL, STRATEGY_COLD = "model", "cold_start"
POPULARITY_DAYS = 7

#: score.precision -> the dtype of the model on the executors.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX512-BF16).

    Without it torch emulates bf16 and is slower than float32, so ``auto`` keeps float32.
    """
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def inference_precision(value: str) -> str:
    """Resolve ``score.precision`` (auto | fp32 | bf16) to fp32 or bf16; ConfigError otherwise."""
    name = str(value).strip().lower()
    if name == "auto":
        return "bf16" if native_bf16() else "fp32"
    if name not in PRECISIONS:
        raise ConfigError(f"config key 'score.precision': expected one of {', '.join(CHOICES['score.precision'])}, got {value!r}")
    return name

POPULAR_EVENTS = ("add_to_cart", "purchase")
DEFAULT_PRICE_TIER = 3  # features.py: a price level without signal gets the middle tier
ARTIFACTS = ("model.pt", "model_config.json", "vocab.json", "calibrator.json")

#: The per-viewer result of the model pass (what mapInArrow emits and what is cached).
SCORED_SCHEMA = T.StructType([
    T.StructField("viewer_id", T.StringType()),
    T.StructField("strategy", T.StringType()),
    T.StructField("intent_score", T.DoubleType()),
    T.StructField("purchase_power", T.DoubleType()),
    T.StructField("top_idx", T.ArrayType(T.IntegerType())),
    T.StructField("top_score", T.ArrayType(T.DoubleType())),
    T.StructField("top_prob", T.ArrayType(T.DoubleType())),
])
_SCORED_ARROW = pa.schema([
    pa.field("viewer_id", pa.string()), pa.field("strategy", pa.string()),
    pa.field("intent_score", pa.float64()), pa.field("purchase_power", pa.float64()),
    pa.field("top_idx", pa.list_(pa.int32())), pa.field("top_score", pa.list_(pa.float64())),
    pa.field("top_prob", pa.list_(pa.float64())),
])
#: Viewer feature columns the worker reads; the 8 pp_features are derived from them in
#: the order features.with_purchase_power uses for training.
VIEWER_COLUMNS = (
    "viewer_id", "hist_product", "hist_category", "hist_event", "hist_dwell", "hist_dt", "hist_len", "hist_host", "hist_hour",
    "recency_days", "frequency_7d", "frequency_30d", "monetary_7d", "monetary_30d", "avg_price_paid",
    "price_tier", "n_events",
)


# ----------------------------------------------------------------------------- pure DataFrame pieces

def end_of_day(day: dt.date) -> dt.datetime:
    """The instant D ends (D+1 00:00 UTC): the feature cutoff, and the anchor of `active_days`."""
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tzinfo=dt.UTC)


def active_viewers(features: DataFrame, day: dt.date, active_days: int) -> DataFrame:
    """Viewer feature rows of D whose last event is within `active_days` of the end of D.

    Dormant viewers are not scored: their rankings would be stale guesses nobody sees.
    """
    since = end_of_day(day) - dt.timedelta(days=int(active_days))
    return features.filter((F.col("as_of_date") == F.lit(day)) & (F.col("last_event_ts") >= F.lit(since)))


def schedule_slots(stream_products: DataFrame, streams: DataFrame, tomorrow: dt.date) -> DataFrame:
    """One row per product on the streams of `tomorrow`: its earliest slot and slot count.

    product_id, stream_id, host_id, slot_start (slot_start_ts, else the stream's start_ts),
    n_slots - features.first_slots of that day, the very slot the model's candidate context
    was trained with. The recommendation points at the first time the product is live;
    n_slots feeds the cold-start popularity fallback.
    """
    day = F.col("snapshot_date") == F.lit(tomorrow)
    return first_slots(stream_products.filter(day), streams.filter(day)).drop("snapshot_date")


def latest_catalog(products: DataFrame, as_of: dt.date) -> DataFrame:
    """product_id -> category, list_price from the newest snapshot on or before `as_of`.

    A product launched for tomorrow's streams is only in tomorrow's catalog, so D+1 is
    the natural bound; an older snapshot still describes products that left the catalog.
    """
    return (
        products.filter((F.col("snapshot_date") <= F.lit(as_of)) & F.col("product_id").isNotNull())
        .groupBy("product_id")
        .agg(F.max_by("category", "snapshot_date").alias("category"),
             F.max_by("list_price", "snapshot_date").alias("list_price"))
    )


def popularity(silver: DataFrame, day: dt.date, days: int = POPULARITY_DAYS) -> DataFrame:
    """product_id -> carts + purchases over the `days` days ending with D (cold-start order),
    of the rows ingested by D (`known_by`)."""
    lo = day - dt.timedelta(days=days - 1)
    return (
        known_by(silver, day)
        .filter(F.col("event_date").between(F.lit(lo), F.lit(day)) & F.col("event_type").isin(*POPULAR_EVENTS)
                & F.col("product_id").isNotNull())
        .groupBy("product_id").agg(F.count(F.lit(1)).alias("popularity"))
    )


def candidate_frame(slots: DataFrame, catalog: DataFrame, pop: DataFrame | None) -> DataFrame:
    """Tomorrow's candidates with everything the driver needs, one row per product."""
    out = slots.join(catalog, "product_id", "left")
    if pop is not None:
        out = out.join(pop, "product_id", "left")
    else:
        out = out.withColumn("popularity", F.lit(0))
    return out.select("product_id", "stream_id", "host_id", "slot_start",
                      hour_token(F.unix_micros("slot_start")).alias("slot_hour"), "n_slots", "category", "list_price",
                      F.coalesce(F.col("popularity"), F.lit(0)).cast("long").alias("popularity"))


def rankings_frame(scored: DataFrame, candidates: DataFrame, tomorrow: dt.date, model_version: str,
                   run_id: str) -> DataFrame:
    """gold/user_product_rankings rows: the per-viewer top-K arrays exploded, rank 1..K.

    `candidates` is the small (cand_idx, product_id, stream_id, slot_start) frame,
    broadcast to the join so no shuffle of the viewers happens.
    """
    z = scored.select("viewer_id", "strategy",
                      F.posexplode(F.arrays_zip("top_idx", "top_score", "top_prob")).alias("pos", "t"))
    return z.join(F.broadcast(candidates), F.col("t.top_idx") == F.col("cand_idx")).select(
        "viewer_id",
        (F.col("pos") + 1).cast("int").alias("rank"),
        "product_id", "stream_id", "slot_start",
        F.col("t.top_score").alias("score"),
        F.col("t.top_prob").alias("purchase_prob"),
        "strategy",
        F.lit(model_version).alias("model_version"),
        F.lit(run_id).alias("run_id"),
        F.lit(tomorrow).alias("score_date"),
    )


def intent_frame(scored: DataFrame, tomorrow: dt.date, model_version: str, run_id: str) -> DataFrame:
    """gold/user_intent_scores rows: one per scored viewer."""
    return scored.select(
        "viewer_id", "intent_score", "purchase_power",
        F.lit(model_version).alias("model_version"), F.lit(run_id).alias("run_id"),
        F.lit(tomorrow).alias("score_date"),
    )


# ----------------------------------------------------------------------------- pure numpy / torch pieces

def id_remap(source: Mapping[str, int], target: Mapping[str, int]) -> np.ndarray:
    """Array mapping ids of vocabulary `source` to ids of `target` through their tokens.

    0 (padding) stays 0, 1 and every token `target` does not know become 1 (unknown).
    """
    size = max([UNK_ID, *source.values()]) + 1
    out = np.full(size, UNK_ID, dtype=np.int64)
    out[PAD_ID] = PAD_ID
    for token, idx in source.items():
        if idx > UNK_ID:
            out[idx] = int(target.get(token, UNK_ID))
    return out


def price_tier(list_price: float | None, thresholds: Sequence[float]) -> int:
    """1 + number of catalog quintile boundaries below the price (features.py's tiers)."""
    if list_price is None or not np.isfinite(list_price) or not thresholds:
        return DEFAULT_PRICE_TIER
    return 1 + sum(1 for q in thresholds if list_price > q)


@dataclass(frozen=True)
class CandidateSet:
    """Tomorrow's candidates in product_id order; index i is what the top-K arrays hold."""

    product_id: list[str]
    stream_id: list[str | None]
    slot_start: list[dt.datetime | None]
    model_ids: np.ndarray  # ids in the (extended) model: known products keep theirs
    new_categories: np.ndarray  # category ids of the new products, in extension order
    new_tiers: np.ndarray  # price tiers of the new products (0 when the model has none)
    popularity: np.ndarray
    n_slots: np.ndarray
    host_id: list[str | None]  # host of the first slot
    slot_hour: np.ndarray  # hour token of the first slot (features.hour_token)

    def context(self, host_vocab: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
        """Model host ids and hour tokens of the candidates' first slots (unknown host 1, none 0)."""
        host = [PAD_ID if h is None else int(host_vocab.get(str(h), UNK_ID)) for h in self.host_id]
        return np.asarray(host, dtype=np.int64), self.slot_hour

    @property
    def size(self) -> int:
        return len(self.product_id)

    @property
    def n_new(self) -> int:
        return int(self.new_categories.shape[0])

    def cold_order(self) -> np.ndarray:
        """Candidate indices by popularity, then slot count, then product_id (all deterministic)."""
        return np.lexsort((np.arange(self.size), -self.n_slots, -self.popularity)).astype(np.int64)


def build_candidates(rows: Sequence[Mapping[str, Any]], product_vocab: Mapping[str, int],
                     category_vocab: Mapping[str, int], n_products: int, use_tiers: bool,
                     thresholds: Sequence[float]) -> CandidateSet:
    """Number the candidates and give every product an id of the extended model.

    Known products keep their model id; product k-th new product (not in the model's
    vocabulary) gets n_products + k, whose embedding will be the unknown product's plus its
    category's (and price tier's) - see extend_model.
    """
    rows = sorted(rows, key=lambda r: str(r["product_id"]))
    model_ids, new_cats, new_tiers = [], [], []
    for r in rows:
        known = product_vocab.get(str(r["product_id"]))
        if known is not None and known > UNK_ID and known < n_products:
            model_ids.append(int(known))
            continue
        model_ids.append(n_products + len(new_cats))
        new_cats.append(int(category_vocab.get(str(r.get("category")), UNK_ID)) if r.get("category") is not None else UNK_ID)
        new_tiers.append(price_tier(r.get("list_price"), thresholds) if use_tiers else PAD_ID)
    return CandidateSet(
        product_id=[str(r["product_id"]) for r in rows],
        stream_id=[r.get("stream_id") for r in rows],
        slot_start=[r.get("slot_start") for r in rows],
        model_ids=np.asarray(model_ids, dtype=np.int64),
        new_categories=np.asarray(new_cats, dtype=np.int64),
        new_tiers=np.asarray(new_tiers, dtype=np.int64),
        popularity=np.asarray([int(r.get("popularity") or 0) for r in rows], dtype=np.int64),
        n_slots=np.asarray([int(r.get("n_slots") or 0) for r in rows], dtype=np.int64),
        host_id=[r.get("host_id") for r in rows],
        slot_hour=np.asarray([int(r.get("slot_hour") or PAD_ID) for r in rows], dtype=np.int64),
    )


def extend_model(model: StreamRankModel, new_categories: np.ndarray, new_tiers: np.ndarray) -> StreamRankModel:
    """Append one product id per new product: unknown-product embedding, own category and tier.

    Done on a model instance (model.py is untouched), so both the item tower used for
    ranking and the intent head's target attention see the new product's category.
    """
    n_new = int(len(new_categories))
    if n_new == 0:
        return model
    n, d = model.product_emb.weight.shape
    with torch.no_grad():
        weight = torch.cat([model.product_emb.weight, model.product_emb.weight[UNK_ID].expand(n_new, d)])
    emb = torch.nn.Embedding(n + n_new, d, padding_idx=PAD_ID)
    emb.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    model.product_emb = emb
    cats = torch.as_tensor(np.clip(new_categories, 0, model.cfg.n_categories - 1), dtype=torch.long)
    tiers = torch.as_tensor(np.clip(new_tiers, 0, model.cfg.n_price_tiers - 1), dtype=torch.long)
    model.product_category = torch.cat([model.product_category, cats])
    model.product_price_tier = torch.cat([model.product_price_tier, tiers])
    model.cfg = dataclasses.replace(model.cfg, n_products=n + n_new)
    return model


def model_has_tiers(model_pt: bytes) -> bool:
    """Whether training gave products price tiers (else every product has tier 0 = none)."""
    state = torch.load(io.BytesIO(model_pt), map_location="cpu", weights_only=True)
    tiers = state.get("product_price_tier")
    return tiers is not None and bool((tiers[UNK_ID + 1:] != PAD_ID).any())


def deterministic_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row, best first, equal scores ordered by the smaller column index.

    torch.topk does not promise which of equal scores it returns (new products of one
    category have identical vectors, hence identical scores). The top k+1 say which rows
    are ambiguous: only where the (k+1)-th score equals the k-th can a left-out column tie
    with a kept one, and those rows are re-done with a stable full sort; the rest only
    have their k results reordered. (Counting ``scores >= kth`` instead costs a compare,
    a cast and a sum over every [rows, candidates] score: a third of the top-K's time.)
    """
    n = scores.shape[1]
    k = min(int(k), n)
    if k == 0 or scores.shape[0] == 0:
        return scores.new_zeros((scores.shape[0], k)), torch.zeros((scores.shape[0], k), dtype=torch.long)
    vals, idx = torch.topk(scores, min(k + 1, n), dim=1, sorted=True)
    boundary = vals[:, k] == vals[:, k - 1] if k < n else torch.zeros(scores.shape[0], dtype=torch.bool)
    vals, idx = vals[:, :k], idx[:, :k]
    order = torch.argsort(idx, dim=1)
    idx, vals = idx.gather(1, order), vals.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    idx, vals = idx.gather(1, order), vals.gather(1, order)
    if bool(boundary.any()):
        rows = boundary.nonzero().squeeze(1)
        s_vals, s_idx = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        vals[rows], idx[rows] = s_vals[:, :k], s_idx[:, :k]
    return vals, idx


def pp_features(cols: Mapping[str, np.ndarray], n_pp: int) -> np.ndarray:
    """The 8 purchase-power inputs in training order (features.with_purchase_power); NaN -> 0."""
    f64 = {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}
    with np.errstate(invalid="ignore", divide="ignore"):
        pp = np.stack([
            np.log1p(f64["recency_days"]), np.log1p(f64["frequency_7d"]), np.log1p(f64["frequency_30d"]),
            np.log1p(f64["monetary_7d"]), np.log1p(f64["monetary_30d"]), np.log1p(f64["avg_price_paid"]),
            f64["price_tier"] / 5.0, np.log1p(f64["n_events"]),
        ], axis=1).astype(np.float32)
    pp = np.nan_to_num(pp, nan=0.0, posinf=0.0, neginf=0.0)
    out = np.zeros((pp.shape[0], n_pp), dtype=np.float32)
    out[:, : min(n_pp, pp.shape[1])] = pp[:, : min(n_pp, pp.shape[1])]
    return out


class Scorer:
    """Everything one worker needs to score batches; built from the broadcast payload."""

    def __init__(self, payload: Mapping[str, Any]) -> None:
        keep_freed_memory()  # batch activations reuse heap memory instead of faulting in fresh pages
        self.model = cached_model(payload)
        self.seq_len = self.model.cfg.seq_len
        self.n_pp = self.model.cfg.n_pp_features
        self.k = int(payload["k"])
        self.calibrator = payload.get("calibrator")
        self.cand_matrix = torch.as_tensor(payload["cand_matrix"])  # [N, D] float32, for the ranking matmul
        # the same vectors in the encoder's dtype, gathered per viewer for the intent head
        self.cand_vecs = self.cand_matrix.to(self.model.final_ln.weight.dtype)
        with torch.inference_mode():
            self.cand_queries = self.model.candidate_queries(self.cand_vecs)  # once, gathered per batch
        self.cand_ids = torch.as_tensor(payload["cand_model_ids"])  # [N]
        self.cand_host = torch.as_tensor(payload["cand_host"])  # [N] slot context of each candidate
        self.cand_hour = torch.as_tensor(payload["cand_hour"])
        cold = np.asarray(payload["cold_order"], dtype=np.int64)[: self.k]
        self.cold_idx = torch.as_tensor(cold)
        self.cold_scores = torch.as_tensor(np.asarray(payload["cold_scores"], dtype=np.float64)[cold])
        self.remap = {k: torch.as_tensor(v) for k, v in payload["remap"].items()}

    def _remap(self, kind: str, ids: np.ndarray) -> torch.Tensor:
        table = self.remap[kind]
        t = torch.as_tensor(ids, dtype=torch.long)
        inside = (t >= 0) & (t < table.shape[0])
        return torch.where(inside, table[t.clamp(0, table.shape[0] - 1)], torch.full_like(t, UNK_ID))

    def tensors(self, inputs: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Model batch from viewer-feature arrays of the vocabulary of D (ids remapped).

        Histories are left-padded, so columns that are padding for every viewer of the
        batch are dropped: the encoder masks padded keys and the positions of the kept
        columns are unchanged (encode() numbers them from the right), so the states are
        the same while a batch of short histories costs a fraction of L = seq_len.
        """
        full = inputs["hist_product"].shape[1]
        hist_len = torch.as_tensor(inputs["hist_len"], dtype=torch.long).clamp(0, full)
        length = max(1, int(hist_len.max())) if hist_len.numel() else 1
        cut = full - length
        pos = torch.arange(length)
        valid = pos.unsqueeze(0) >= (length - hist_len).unsqueeze(1)
        batch = {
            "hist_product": self._remap("product", inputs["hist_product"][:, cut:]) * valid,
            "hist_category": self._remap("category", inputs["hist_category"][:, cut:]) * valid,
            "hist_event": self._remap("event", inputs["hist_event"][:, cut:]) * valid,
            "hist_dwell": torch.as_tensor(inputs["hist_dwell"][:, cut:], dtype=torch.long) * valid,
            "hist_dt": torch.as_tensor(inputs["hist_dt"][:, cut:], dtype=torch.float32) * valid,
            "hist_host": self._remap("host", inputs["hist_host"][:, cut:]) * valid,
            "hist_hour": torch.as_tensor(inputs["hist_hour"][:, cut:], dtype=torch.long) * valid,
            "hist_len": hist_len,
            "pp_features": torch.as_tensor(inputs["pp_features"], dtype=torch.float32),
        }
        return batch

    @torch.inference_mode()
    def score(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Top-K candidate indices, scores, probabilities and the viewer intent of one batch."""
        batch = self.tensors(inputs)
        b = batch["hist_len"].shape[0]
        h, _ = self.model.encode(batch)
        state = h[:, -1].float()  # the ranking matmul is float32 whatever the encoder's precision
        vals, idx = deterministic_topk(self.model.rank_scores(state, self.cand_matrix), self.k)
        vals = vals.double()
        cold = batch["hist_len"] == 0
        if bool(cold.any()):
            k = idx.shape[1]
            idx[cold] = self.cold_idx[:k].expand(int(cold.sum()), k)
            vals[cold] = self.cold_scores[:k].expand(int(cold.sum()), k)
        none = torch.zeros((b, 0), dtype=torch.long)
        cand = self.cand_ids[idx] if idx.numel() else none
        c_host = self.cand_host[idx] if idx.numel() else none
        c_hour = self.cand_hour[idx] if idx.numel() else none
        # reuse h: the encoder is the costliest step
        gathered = idx.numel() > 0
        cand_logit, viewer_logit = self.model._intent_from_encoded(
            h, batch, cand, c_host, c_hour, cand_vecs=self.cand_vecs[idx] if gathered else None,
            cand_queries=tuple(t[idx] for t in self.cand_queries) if gathered else None)
        cand_p, viewer_p = torch.sigmoid(cand_logit.float()), torch.sigmoid(viewer_logit.float())
        probs = apply_calibration(cand_p.numpy(), self.calibrator) if cand_p.numel() else cand_p.double().numpy()
        return {
            "top_idx": idx.numpy().astype(np.int32),
            "top_score": vals.numpy(),
            "top_prob": np.asarray(probs, dtype=np.float64).reshape(b, -1),
            "intent_score": np.asarray(apply_calibration(viewer_p.numpy(), self.calibrator), dtype=np.float64),
            "cold": cold.numpy(),
        }


# ----------------------------------------------------------------------------- model loading (driver and workers)

#: Loaded models per worker process, keyed by model version (+ the night's extension).
_MODELS: dict[str, StreamRankModel] = {}


def build_model(payload: Mapping[str, Any]) -> StreamRankModel:
    """The champion from its bytes, extended with the night's new products, in eval mode."""
    torch.manual_seed(0)  # nothing random runs in eval mode; seeded anyway for reproducibility
    model = load_model(io.BytesIO(payload["model_pt"]), ModelConfig.from_dict(payload["model_config"]))  # type: ignore[arg-type]
    model = extend_model(model, np.asarray(payload["new_categories"]), np.asarray(payload["new_tiers"]))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def cached_model(payload: Mapping[str, Any]) -> StreamRankModel:
    """Build the model once per worker process and keep it: tasks and batches reuse it."""
    key = str(payload["cache_key"])
    model = _MODELS.get(key)
    if model is None:
        _MODELS.clear()  # one night's model at a time; an old one is never used again
        model = _MODELS[key] = build_model(payload).to(PRECISIONS[payload.get("precision", "fp32")])
    return model


# ----------------------------------------------------------------------------- Arrow <-> arrays (workers)

def _list_matrix(col: pa.Array, width: int, dtype: Any) -> np.ndarray:
    """[rows, width] array from a list column, keeping each list's LAST `width` values,
    left-padded with 0 (histories are left-padded, most recent last)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    out = np.zeros((n, width), dtype=dtype)
    if n == 0:
        return out
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.fill_null(col.flatten(), 0).to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    if lengths.size and (lengths == lengths[0]).all():
        m = values.reshape(n, int(lengths[0]))
        keep = min(width, m.shape[1])
        if keep:
            out[:, width - keep:] = m[:, m.shape[1] - keep:]
        return out
    ends = np.cumsum(lengths)
    for i in range(n):
        row = values[ends[i] - lengths[i]: ends[i]][-width:]
        if row.size:
            out[i, width - row.size:] = row
    return out


def _numbers(col: pa.Array) -> np.ndarray:
    return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)


def arrow_inputs(rb: pa.RecordBatch, seq_len: int, n_pp: int) -> dict[str, np.ndarray]:
    """Model-ready arrays from a record batch of gold/viewer_features columns."""
    col = {name: rb.column(rb.schema.get_field_index(name)) for name in VIEWER_COLUMNS}
    hist_len = pc.fill_null(col["hist_len"], 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return {
        "hist_product": _list_matrix(col["hist_product"], seq_len, np.int64),
        "hist_category": _list_matrix(col["hist_category"], seq_len, np.int64),
        "hist_event": _list_matrix(col["hist_event"], seq_len, np.int64),
        "hist_dwell": _list_matrix(col["hist_dwell"], seq_len, np.int64),
        "hist_dt": np.nan_to_num(_list_matrix(col["hist_dt"], seq_len, np.float32)),
        "hist_host": _list_matrix(col["hist_host"], seq_len, np.int64),
        "hist_hour": _list_matrix(col["hist_hour"], seq_len, np.int64),
        "hist_len": np.minimum(hist_len, seq_len),
        "pp_features": pp_features({k: _numbers(col[k]) for k in (
            "recency_days", "frequency_7d", "frequency_30d", "monetary_7d", "monetary_30d", "avg_price_paid",
            "price_tier", "n_events")}, n_pp),
        "purchase_power": _numbers(col["monetary_30d"]),
    }


def _to_record_batch(viewer_id: pa.Array, inputs: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> pa.RecordBatch:
    b, k = out["top_idx"].shape
    offsets = pa.array(np.arange(b + 1, dtype=np.int32) * k, pa.int32())
    power = inputs["purchase_power"]
    return pa.RecordBatch.from_arrays([
        viewer_id.cast(pa.string()),
        pa.array(np.where(out["cold"], STRATEGY_COLD, STRATEGY_MODEL).tolist(), pa.string()),
        pa.array(out["intent_score"], pa.float64()),
        pa.array(power, pa.float64(), mask=np.isnan(power)),
        pa.ListArray.from_arrays(offsets, pa.array(out["top_idx"].reshape(-1), pa.int32())),
        pa.ListArray.from_arrays(offsets, pa.array(out["top_score"].reshape(-1), pa.float64())),
        pa.ListArray.from_arrays(offsets, pa.array(out["top_prob"].reshape(-1), pa.float64())),
    ], schema=_SCORED_ARROW)


def score_rows(scorer: Scorer, rb: pa.RecordBatch, order: np.ndarray, batch_size: int) -> Iterator[pa.RecordBatch]:
    """Score the rows `order` of `rb`, `batch_size` at a time, in that order.

    The inputs are converted once for the whole record batch and each model batch gathers
    its rows from them, so a task that sorts its viewers never copies the list columns.
    """
    if not order.size:
        return
    inputs = arrow_inputs(rb, scorer.seq_len, scorer.n_pp)
    viewer_id = rb.column(rb.schema.get_field_index("viewer_id"))
    whole = order.size == rb.num_rows and bool((order == np.arange(rb.num_rows)).all())
    for start in range(0, order.size, batch_size):
        rows = order[start:start + batch_size]
        part = ({k: v[start:start + rows.size] for k, v in inputs.items()} if whole
                else {k: v[rows] for k, v in inputs.items()})
        ids = viewer_id.slice(start, rows.size) if whole else viewer_id.take(pa.array(rows))
        yield _to_record_batch(ids, part, scorer.score(part))


def score_partition(batches: Iterator[pa.RecordBatch], bc: Any, batch_size: int) -> Iterator[pa.RecordBatch]:
    """mapInArrow body of the DataFrame path: score each record batch in the order it comes."""
    scorer = Scorer(bc.value)
    for rb in batches:
        yield from score_rows(scorer, rb, np.arange(rb.num_rows), batch_size)


def score_viewers(viewers: DataFrame, bc: Any, batch_size: int) -> DataFrame:
    """The distributed model pass over a DataFrame: one row per viewer with its top-K arrays and intent.

    The path for viewers that are not plain Parquet files (the score stage itself reads
    its files directly: score_files). Fewer input partitions than task slots are spread by
    viewer_id. Inside each partition viewers are sorted by (hist_len, viewer_id): batches
    then hold histories of similar length, so Scorer.tensors can drop most padding (the
    encoder is ~90 % of the cost), and the batches - hence the float results - are the
    same on every re-run.
    """
    spark = viewers.sparkSession
    frame = viewers.select(*VIEWER_COLUMNS)
    slots = max(1, spark.sparkContext.defaultParallelism)
    if frame.rdd.getNumPartitions() < slots:
        frame = frame.repartition(slots, "viewer_id")
    frame = frame.sortWithinPartitions(F.coalesce(F.col("hist_len"), F.lit(0)), "viewer_id")
    return frame.mapInArrow(functools.partial(score_partition, bc=bc, batch_size=int(batch_size)), SCORED_SCHEMA)


# ----------------------------------------------------------------------------- the direct path (files -> workers)

#: The most viewers one task of score_files holds: its inputs are converted at once
#: (about 4 KiB a viewer at seq_len 50, Arrow and numpy), so a task holds about 256 MiB.
TASK_ROWS = 65_536

#: One task's share of the input: (file URI, row group, first row, end row) pieces.
Piece = tuple[str, int, int, int]


def row_groups(files: Sequence[str]) -> list[tuple[str, int, int]]:
    """(file, row group, rows) of every row group of `files`, in file order: Parquet footers only."""
    out = []
    for uri in files:
        fs, path = _filesystem(uri)
        with fs.open_input_file(path) as fh:
            meta = pq.ParquetFile(fh).metadata
        out.extend((uri, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups))
    return out


def split_tasks(groups: Sequence[tuple[str, int, int]], slots: int, task_rows: int = TASK_ROWS) -> list[list[Piece]]:
    """Cut the row groups, in order, into tasks of equal row counts (within one row).

    The task count is a multiple of `slots` (all of them busy until the end) with no task
    above `task_rows`; a row group that straddles two tasks is split by row range, and
    both tasks decode it (Parquet decodes whole pages; the model costs ~50x the decode).
    The same files give the same tasks, hence the same batches and scores on a re-run.
    """
    total = sum(n for _, _, n in groups)
    slots, task_rows = max(1, int(slots)), max(1, int(task_rows))
    n_tasks = slots * -(-total // (slots * task_rows))
    bounds = [total * i // n_tasks for i in range(n_tasks + 1)] if n_tasks else [0]
    tasks: list[list[Piece]] = []
    first = 0  # global row number of the first row of groups[g]
    g = 0
    for lo, hi in itertools.pairwise(bounds):
        pieces: list[Piece] = []
        while g < len(groups) and first < hi:
            uri, group, n = groups[g]
            start, stop = max(lo, first) - first, min(hi, first + n) - first
            if stop > start:
                pieces.append((uri, group, start, stop))
            if first + n > hi:
                break  # the rest of this row group belongs to the next task
            first, g = first + n, g + 1
        if pieces:
            tasks.append(pieces)
    return tasks


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem and path for a file as the engines name it: file:///x (delta-rs),
    file:/x (Spark's inputFiles), s3://... on a cluster, or a local path."""
    return pafs.FileSystem.from_uri(uri if urlparse(uri).scheme else str(Path(uri).resolve()))


@functools.cache
def _viewer_schema() -> pa.Schema:
    full = arrow_schema(table_spec(VIEWER_FEATURES).schema)
    return pa.schema([full.field(c) for c in (*VIEWER_COLUMNS, "last_event_ts")])


def read_pieces(pieces: Sequence[Piece]) -> pa.Table:
    """The scoring columns (and last_event_ts) of `pieces`, as one table of the contract's types.

    A column the file lacks (written before the schema gained it) reads as null, as
    Spark's reader gives it; files of different writers name list children differently,
    so every piece is cast to the contract's Arrow schema.
    """
    schema = _viewer_schema()
    parts = []
    for uri, group, start, stop in pieces:
        fs, path = _filesystem(uri)
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            present = [c for c in schema.names if c in pf.schema_arrow.names]
            part = pf.read_row_group(group, columns=present).slice(start, stop - start)
        for field in schema:
            if field.name not in present:
                part = part.append_column(field.name, pa.nulls(part.num_rows, field.type))
        parts.append(part.select(schema.names).cast(schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def active_order(table: pa.Table, since: dt.datetime) -> np.ndarray:
    """Rows of active viewers (last_event_ts >= since) in (hist_len, viewer_id) order.

    The same selection as active_viewers and the same order score_viewers sorts each
    partition into, as row indices: the list columns are gathered per batch, never copied.
    """
    ts = table.column("last_event_ts")
    active = pc.fill_null(pc.greater_equal(ts, pa.scalar(since, ts.type)), False)
    rows = np.flatnonzero(active.to_numpy(zero_copy_only=False))
    key = pa.table({"hist_len": pc.fill_null(table.column("hist_len"), 0).take(pa.array(rows)),
                    "viewer_id": table.column("viewer_id").take(pa.array(rows))})
    return rows[pc.sort_indices(key, [("hist_len", "ascending"), ("viewer_id", "ascending")]).to_numpy()]


def score_tasks(task_ids: Iterator[pa.RecordBatch], tasks: Sequence[Sequence[Piece]], since: dt.datetime, bc: Any,
                batch_size: int) -> Iterator[pa.RecordBatch]:
    """mapInArrow body of the direct path: each incoming task id names the pieces to read and score."""
    scorer = Scorer(bc.value)
    for ids in task_ids:
        for task in ids.column(0).to_pylist():
            table = read_pieces(tasks[task]).combine_chunks()
            order = active_order(table, since)
            for rb in table.to_batches():  # one batch after combine_chunks (none when empty)
                yield from score_rows(scorer, rb, order, batch_size)


def score_files(spark: SparkSession, files: Sequence[str], since: dt.datetime, bc: Any, batch_size: int) -> DataFrame:
    """The distributed model pass over viewer-feature Parquet files (one partition's snapshot files).

    Spark only hands out tasks - (file, row group, row range) pieces - and collects the
    results; each Python worker reads its pieces with pyarrow, keeps the viewers active
    since `since`, sorts them by (hist_len, viewer_id) and scores them. Reading through
    Spark instead cost the JVM a quarter of the CPU on a 2-core machine: decoding the list
    columns, shuffling them to spread one file over the cores, sorting, and converting
    them to Arrow for Python (docs/performance.md, "Where scoring's time goes").
    """
    slots = max(1, spark.sparkContext.defaultParallelism)
    tasks = split_tasks(row_groups(sorted(files)), slots, TASK_ROWS)
    if not tasks:
        return spark.createDataFrame([], SCORED_SCHEMA)
    ids = spark.range(0, len(tasks), 1, numPartitions=len(tasks))
    return ids.mapInArrow(functools.partial(score_tasks, tasks=tasks, since=since, bc=bc, batch_size=int(batch_size)),
                          SCORED_SCHEMA)


# ----------------------------------------------------------------------------- driver side

@dataclass
class Champion:
    """The downloaded champion: registry coordinates and the artifact bytes to broadcast."""

    name: str
    version: str
    run_id: str
    model_pt: bytes
    model_config: dict[str, Any]
    vocab: dict[str, Any]
    calibrator: dict[str, Any] | None


def champion_ref(cfg: Any) -> Any:
    """The registry version holding `champion`; NoChampionError (exit 5) when none does.

    Looked up before any data is read: without a model there is nothing to do.
    """
    from streamrank.registry import CHAMPION, by_alias

    ref = by_alias(cfg, CHAMPION)
    if ref is None:
        raise NoChampionError(
            f"no version of model {cfg['mlflow.model_name']!r} holds the alias {CHAMPION!r} in the registry "
            f"{cfg.mlflow_registry_uri}: nothing to score with. Train and promote one first "
            "(`streamrank train --date D` then `streamrank promote --date D`, or `streamrank promote --version N`)")
    return ref


def load_champion(ref: Any) -> Champion:
    """Download the champion's artifacts once, on the driver; the executors get their bytes."""
    import mlflow

    tmp = Path(tempfile.mkdtemp(prefix="score-model-"))
    try:
        try:
            root = Path(mlflow.artifacts.download_artifacts(f"runs:/{ref.run_id}/model/artifacts", dst_path=str(tmp / "a")))
        except Exception:  # noqa: BLE001 - MLflow 3 may keep the model outside the run: use the registry URI
            root = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=str(tmp / "m"))) / "artifacts"
        missing = [a for a in ARTIFACTS[:3] if not (root / a).exists()]
        if missing:
            raise MissingInputError(f"champion {ref.name} v{ref.version} (run {ref.run_id}) lacks artifacts {missing} under {root}")
        calib = root / "calibrator.json"
        return Champion(
            name=ref.name, version=ref.version, run_id=ref.run_id,
            model_pt=(root / "model.pt").read_bytes(),
            model_config=json.loads((root / "model_config.json").read_text()),
            vocab=json.loads((root / "vocab.json").read_text()),
            calibrator=json.loads(calib.read_text()) if calib.exists() else None,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _vocab_of(rows: Sequence[Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {"product": {}, "category": {}, "event": {}, "host": {}}
    for r in rows:
        out.setdefault(r["kind"], {})[r["token"]] = int(r["idx"])
    return out


def build_payload(champion: Champion, cands: CandidateSet, feature_vocab: Mapping[str, Mapping[str, int]],
                  k: int, precision: str = "fp32") -> tuple[dict[str, Any], StreamRankModel]:
    """What the executors get (one broadcast) and the driver's own copy of the model.

    The candidate matrix is computed here, once per night, in float32 from the same
    extended model the workers rebuild, so ranking and intent agree on every candidate's
    vector. ``precision`` (fp32 | bf16, see inference_precision) is the workers' dtype.
    """
    digest = hashlib.sha256(champion.model_pt)
    digest.update(cands.new_categories.tobytes() + cands.new_tiers.tobytes())
    payload: dict[str, Any] = {
        "cache_key": f"{champion.name}/{champion.version}/{digest.hexdigest()[:16]}/{precision}",
        "precision": precision,
        "model_version": champion.version,
        "model_pt": champion.model_pt,
        "model_config": champion.model_config,
        "calibrator": champion.calibrator,
        "new_categories": cands.new_categories,
        "new_tiers": cands.new_tiers,
        "k": min(int(k), cands.size),
        "cand_model_ids": cands.model_ids,
        "cold_order": cands.cold_order(),
        "cold_scores": cands.popularity.astype(np.float64),
        "remap": {kind: id_remap(feature_vocab.get(kind, {}), champion.vocab.get(kind) or {})
                  for kind in ("product", "category", "event", "host")},
    }
    payload["cand_host"], payload["cand_hour"] = cands.context(champion.vocab.get("host") or {})
    model = build_model(payload)
    with torch.inference_mode():
        payload["cand_matrix"] = model.candidate_matrix(
            torch.as_tensor(cands.model_ids), torch.as_tensor(payload["cand_host"]),
            torch.as_tensor(payload["cand_hour"])).float().numpy().copy()
    return payload, model


def _candidates_df(spark: SparkSession, cands: CandidateSet) -> DataFrame:
    schema = T.StructType([
        T.StructField("cand_idx", T.IntegerType()), T.StructField("product_id", T.StringType()),
        T.StructField("stream_id", T.StringType()), T.StructField("slot_start", T.TimestampType()),
    ])
    rows = [(i, p, s, t) for i, (p, s, t) in enumerate(zip(cands.product_id, cands.stream_id, cands.slot_start, strict=True))]
    return spark.createDataFrame(rows, schema)


def _read(ctx: Context, run: Any, name: str) -> DataFrame:
    table = ctx.table(name)
    version = table.version()
    run.read(name, version)
    return table.read(version=version)


def score(ctx: Context, date: dt.date) -> dict[str, Any]:
    """Score the active viewers of D against the streams of D+1 and publish both tables.

    Raises NoChampionError / MissingInputError (exit 5) before reading much, and
    QualityGateError (exit 3) before publishing anything (the files it had staged for the
    gate to audit are deleted); on success both score_date = D+1 partitions are replaced,
    one commit per table.
    """
    from streamrank.quality import Check, record_and_gate, validate_all

    tomorrow = date + dt.timedelta(days=1)
    cfg = ctx.cfg
    for key in ("score.top_k", "score.active_days", "score.batch_size"):
        if int(cfg[key]) < 1:  # 0 would publish empty lists or score nobody: a conf typo, not a night's data
            raise ConfigError(f"config key {key!r}: expected an integer >= 1, got {cfg[key]}")
    k = int(cfg["score.top_k"])
    precision = inference_precision(cfg["score.precision"])
    phases = PhaseTimer()
    with stage_run(ctx, STAGE, date) as run:
        run.metrics["phases_s"] = phases.seconds
        with phases("inputs"):
            ref = champion_ref(cfg)
            run.mlflow_run_id = ref.run_id
            spark = ctx.spark
            slots = schedule_slots(_read(ctx, run, STREAM_PRODUCTS), _read(ctx, run, STREAMS), tomorrow)
            features_t = ctx.table(VIEWER_FEATURES)
            features_v = features_t.version()
            run.read(VIEWER_FEATURES, features_v)
            features = features_t.read(version=features_v)
            vocab_df = _read(ctx, run, VOCAB)
            products = _read(ctx, run, PRODUCTS)
            silver_t = ctx.table(SILVER)
            silver_v = silver_t.version()
            run.read(SILVER, silver_v)
            pop = popularity(silver_t.read(version=silver_v), date) if silver_v is not None else None
            catalog = latest_catalog(products, tomorrow)
            cand_rows = [r.asDict() for r in candidate_frame(slots, catalog, pop).collect()]
            if not cand_rows:
                raise MissingInputError(
                    f"{STREAM_PRODUCTS} has no rows for snapshot_date {tomorrow}: no schedule for the streams of {tomorrow}. "
                    f"Land schedule/stream_products_{tomorrow}.csv under {cfg.landing} and run `streamrank ingest --date {date}`")
            vocab_rows = vocab_df.filter(F.col("as_of_date") == F.lit(date)).select("kind", "token", "idx").collect()
            if not vocab_rows:
                raise MissingInputError(f"{VOCAB} has no rows for as_of_date {date}: run `streamrank features --date {date}`")
            if not features.filter(F.col("as_of_date") == F.lit(date)).limit(1).count():
                raise MissingInputError(f"{VIEWER_FEATURES} has no rows for as_of_date {date}: run `streamrank features --date {date}`")

        with phases("model"):
            champion = load_champion(ref)
            use_tiers = model_has_tiers(champion.model_pt)  # tiers for new products only if the model has them
            cands = build_candidates(cand_rows, champion.vocab.get("product") or {}, champion.vocab.get("category") or {},
                                     int(champion.model_config["n_products"]), use_tiers,
                                     price_thresholds(catalog) if use_tiers else [])
            payload, _ = build_payload(champion, cands, _vocab_of(vocab_rows), k, precision)
            bc = spark.sparkContext.broadcast(payload)

        active_days, batch_size = int(cfg["score.active_days"]), int(cfg["score.batch_size"])
        try:
            files: list[str] | None = features_t.files(features_v, partitions={"as_of_date": date})
        except NotPlainParquetError:
            files = None
        run.metrics["viewer_read"] = "files" if files is not None else "spark"
        if files is not None:  # the workers read D's files themselves
            since = end_of_day(date) - dt.timedelta(days=active_days)
            scored = score_files(spark, files, since, bc, batch_size)
        else:
            log.info("%s v%s has rows deleted by deletion vectors or uses column mapping: scoring reads it "
                     "through the Delta engine", VIEWER_FEATURES, features_v)
            scored = score_viewers(active_viewers(features, date, active_days), bc, batch_size)
        scored = scored.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            with phases("score"):  # the one job that runs the model; everything after reads the cache
                stats = scored.agg(F.count(F.lit(1)).alias("n"),
                                   F.sum((F.col("strategy") == STRATEGY_COLD).cast("long")).alias("cold")).first()
                n_viewers, n_cold = int(stats["n"]), int(stats["cold"] or 0)
            cand_df = _candidates_df(spark, cands)
            rankings = rankings_frame(scored, cand_df, tomorrow, champion.version, ctx.run_id)
            intent = intent_frame(scored, tomorrow, champion.version, ctx.run_id)

            # Write, audit, publish: both tables' files are staged (invisible), GX audits the
            # staged files, and they are committed only if every critical check passed;
            # leaving the block by an exception deletes them.
            commit = {"stage": STAGE, "run_id": ctx.run_id, "score_date": tomorrow.isoformat(),
                      "model": champion.name, "model_version": champion.version}
            with StagedTables(ctx, STAGE, run) as out:  # both tables, or after a crash neither
                with phases("write"):
                    staged = [(out.stage(name, frame, {"score_date": tomorrow}, commit), frame)
                              for name, frame in ((RANKINGS, rankings), (INTENT, intent))]
                with phases("validate"):
                    docs_root = cfg.reports / "data_docs"
                    run_name = f"score-{date}-{ctx.run_id}"
                    checks = [Check(write.read(frame), suite) for (write, frame), suite in zip(
                        staged, (RANKINGS_SUITE, INTENT_SUITE), strict=True)]
                    reports = validate_all(checks, docs_root, run_name)
                run.metrics["data_docs"] = [r.data_docs for r in reports]
                record_and_gate(reports, ctx.table("ops/dq_results"), ctx.run_id, STAGE, date)
                with phases("publish"):
                    out.publish()
        finally:
            scored.unpersist()
            bc.unpersist()

        k_eff = payload["k"]
        run.metrics.update({
            "score_date": str(tomorrow), "viewers": n_viewers, "cold_start_viewers": n_cold,
            "candidates": cands.size, "new_products": cands.n_new, "top_k": k_eff, "ranking_rows": n_viewers * k_eff,
            "model_version": champion.version, "model_run_id": champion.run_id, "precision": precision,
        })
        run.message = (f"{n_viewers} viewers ({n_cold} cold start) x {cands.size} candidates ({cands.n_new} new) -> "
                       f"top {k_eff} for {tomorrow} with {champion.name} v{champion.version} ({precision})")
        if ref.trained_after(date):  # a backfill re-scores an old night with today's champion
            later = run.metrics["model_trained_as_of"] = str(ref.trained_as_of)
            note = (f"v{champion.version} was trained as of {later}, after {date}: these rankings of {tomorrow} are a "
                    f"re-scoring by a model that saw {tomorrow}'s events, not what was served; do not measure models with them")
            log.warning("score %s: %s", date, note)
            run.message += f"; {note}"
        return dict(run.metrics, versions_read=dict(run.versions_read), versions_written=dict(run.versions_written))


def run(ctx: Context, args: argparse.Namespace) -> int:
    """CLI entry point: `streamrank score --date D`."""
    date = args.date if isinstance(args.date, dt.date) else parse_date(str(args.date))
    score(ctx, date)
    return 0


__all__ = [
    "CandidateSet", "Champion", "Scorer", "active_order", "active_viewers", "arrow_inputs", "build_candidates", "build_model",
    "build_payload", "cached_model", "candidate_frame", "champion_ref", "deterministic_topk", "end_of_day", "extend_model",
    "id_remap", "intent_frame", "latest_catalog", "load_champion", "popularity", "pp_features", "rankings_frame",
    "read_pieces", "row_groups", "run", "schedule_slots", "score", "score_files", "score_partition", "score_rows",
    "score_viewers", "split_tasks",
]
