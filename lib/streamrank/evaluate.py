"""`streamrank evaluate --date D`: holdout metrics for the challenger, the champion and three baselines.

Why it works the way it does:

- **One holdout, five rankers.** The holdout of D is gold/training_examples rows with
  as_of_date = D and split = 'test' (the cutoff D 00:00, targets = the carts and purchases
  of day D; the viewers of features.test_share). The challenger, the champion, most-popular,
  pop_category (popularity + the viewer's category shares, fixed weights: the bar a sequence
  model must clear to be worth its cost) and Spark MLlib ALS all score the
  SAME rows under the SAME protocol, so their figures are comparable and the promotion gate
  can compare them.
- **Protocol = the training worker's.** The target product is ranked among the row's
  ``cand_products`` (the products of D's schedule this viewer could be shown; train.eval_protocol
  = candidates), ties counting against the target, rows without a target product only counting
  for intent. Full-catalogue figures (``full_*``) rank against every product of D's vocabulary
  and show what the candidate restriction hides. Their cost is rows x catalogue, so they rank
  only rows with a target (at most FULL_SAMPLE_ROWS of them, every k-th) and take coverage
  from every k-th holdout row (``full_ranked_rows`` says how many were ranked).
- **The registered model, not a re-implementation.** Models are loaded from the registry
  (the pyfunc's own artifacts: weights, config, vocabulary, calibrator) and scored with
  model.py's forward. A model keeps the vocabulary it was trained with, so ids of D's
  holdout are mapped token by token into each model's ids (the champion of D-1 may number
  products differently once a product is added to the catalogue).
- **Figures at the precision that is served.** The model is evaluated in float32, as it
  was trained and validated; when ``score.precision`` resolves to bf16 the challenger is
  scored a second time the way the score stage serves it (encoder and intent head in
  bf16, candidate vectors and ranking in float32) and ``served_ndcg_at_10``,
  ``served_hr_at_10`` and ``served_intent_auc`` say what viewers actually get (equal to
  the float32 figures when float32 is served), so a promotion never rests on arithmetic
  that is not the one in production.
- **Calibrated intent.** Intent metrics use the calibrator that ships with the model
  (Platt, fitted by the train worker on validation logits); the raw-probability log loss and
  ECE are logged too so a poor calibration is visible. A model without a calibrator (its
  validation set had one class) is scored on raw probabilities and tagged so.
- **Baselines from the same training window.** The baselines learn from silver events in
  [D - features.history_days, D 00:00): the training window the model's examples come from.
- **Where the figures go.** The challenger's MLflow run (challenger unprefixed, others
  prefixed ``champion_``, ``most_popular_``, ``pop_category_``, ``als_``; step = YYYYMMDD of D, so a later
  evaluation is the metric's latest value and the training curve is not overwritten), one
  row per (candidate, metric) in ops/model_eval (a re-run replaces this challenger's rows
  for D: idempotent), and the headline figures in ops/job_runs.

Why 'test' and not 'valid': the challenger early-stops and calibrates on the other half of
the validation cutoff ('valid'). Scoring it on those rows would flatter it against the
champion and the baselines (and make its calibration look perfect); the 'test' viewers are
rows no training decision has seen.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streamrank import metrics as M
from streamrank.config import Config
from streamrank.context import Context, StageRun, stage_run
from streamrank.errors import InsufficientHistoryError, MissingInputError
from streamrank.registry import CHALLENGER, CHAMPION, ModelRef, by_alias, setup_mlflow
from streamrank.score import inference_precision
from streamrank.train import product_categories

TRAINING = "gold/training_examples"
VOCAB = "gold/vocabularies"
SILVER = "silver/viewer_events"
MODEL_EVAL = "ops/model_eval"

PAD_ID, UNK_ID, FIRST_REAL_ID = 0, 1, 2
RANK_KS = (5, 10, 20)
HR_K = 10
COVERAGE_K = 10
SAMPLE_ROWS = 200
SCORE_BATCH = 256
#: Whole-catalogue figures (full_*) cost rows x catalogue, which grows with the square of the
#: scale: scoring every holdout row against every product made evaluate 6.6x slower at scale 4
#: (288k test rows, 20k products, three rankers) than at scale 1. Full ranks exist only for
#: rows with a target (~5 %), so only those are ranked, every k-th one above this many; the
#: top-10 lists behind full_coverage use every k-th holdout row, at most this many.
FULL_SAMPLE_ROWS = 20_000


@dataclass(frozen=True)
class FullSample:
    """Which holdout rows the whole-catalogue figures use (masks over the whole holdout)."""

    rank: np.ndarray  # rows with a target whose full rank is computed
    top: np.ndarray  # rows whose full top-10 list counts for coverage

    @classmethod
    def of(cls, h: Holdout) -> FullSample:
        def every_kth(mask: np.ndarray) -> np.ndarray:
            idx = np.nonzero(mask)[0]
            out = np.zeros(mask.size, dtype=bool)
            out[idx[::max(1, -(-idx.size // FULL_SAMPLE_ROWS))]] = True
            return out

        return cls(rank=every_kth(h.target_product >= FIRST_REAL_ID), top=every_kth(np.ones(len(h), dtype=bool)))

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Mask of rows start..stop-1 that need whole-catalogue scores."""
        return self.rank[start:stop] | self.top[start:stop]
#: Implicit-feedback confidence per event type for ALS: stronger intent, more weight.
ALS_EVENT_WEIGHTS: dict[str, float] = {
    "view_product": 1.0, "like": 1.0, "comment": 1.0, "share": 1.0, "gift": 1.0,
    "click_product": 2.0, "add_to_cart": 4.0, "purchase": 8.0,
}
#: Events that make a product "popular": the same events the targets are made of.
POPULAR_EVENTS = ("add_to_cart", "purchase")
#: pop_category: weight of a history event in the viewer's category shares (others: AFFINITY_OTHER_WEIGHT).
AFFINITY_EVENT_WEIGHTS: dict[str, float] = {"view_product": 1.0, "click_product": 2.0, "add_to_cart": 3.0, "purchase": 3.0}
AFFINITY_OTHER_WEIGHT = 0.3
#: pop_category: score = log1p(popularity) + AFFINITY_WEIGHT * the viewer's share of the candidate's category.
AFFINITY_WEIGHT = 3.0
#: The rows evaluate scores: the validation day's viewers that training never looked at.
HOLDOUT_SPLIT = "test"
PREFIX = {"challenger": "", "champion": "champion_", "most_popular": "most_popular_",
          "pop_category": "pop_category_", "als": "als_"}
HEADLINE = ("ndcg_at_10", "hr_at_10", "mrr", "coverage_at_10", "intent_auc", "intent_ece", "served_ndcg_at_10")
#: The challenger's figures recomputed at score.precision (served_<name>).
SERVED = ("ndcg_at_10", "hr_at_10", "intent_auc")


# ----------------------------------------------------------------------------- holdout

@dataclass
class Holdout:
    """The holdout rows of D as fixed-width numpy arrays (ids in D's vocabulary)."""

    viewer_id: np.ndarray
    hist_product: np.ndarray
    hist_category: np.ndarray
    hist_event: np.ndarray
    hist_dwell: np.ndarray
    hist_dt: np.ndarray
    hist_len: np.ndarray
    pp_features: np.ndarray
    target_product: np.ndarray
    target_products: np.ndarray
    cand_products: np.ndarray
    label_purchase: np.ndarray
    hist_host: np.ndarray
    hist_hour: np.ndarray
    cand_host: np.ndarray
    cand_hour: np.ndarray

    def __len__(self) -> int:
        return int(self.hist_len.shape[0])

    def take(self, idx: np.ndarray | slice) -> Holdout:
        return Holdout(**{k: v[idx] for k, v in self.__dict__.items()})


def _fixed(col: pa.ChunkedArray | pa.Array, dtype: Any, width: int | None = None) -> np.ndarray:
    """A list column of equal-length lists as a 2-D array (nulls -> 0; short lists right-padded)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    w = int(lengths.max()) if n and width is None else int(width or 0)
    if n and (lengths == w).all():
        flat = pc.fill_null(arr.flatten(), 0).to_numpy(zero_copy_only=False)
        return flat.astype(dtype).reshape(n, w)
    out = np.zeros((n, w), dtype=dtype)
    for i, values in enumerate(arr.to_pylist()):
        values = [0 if v is None else v for v in (values or [])][:w]
        out[i, : len(values)] = values
    return out


def holdout_from_arrow(table: pa.Table) -> Holdout:
    """Holdout arrays from gold/training_examples rows (already filtered to split = 'test')."""
    scalar = lambda name: pc.fill_null(table.column(name), 0).to_numpy().astype(np.int64)  # noqa: E731

    def context(name: str, like: str) -> np.ndarray:
        # Rows written before the stream-context columns existed (absent or null): padding, i.e. no context.
        like_shape = _fixed(table.column(like), np.int64).shape
        if name in table.column_names and table.column(name).null_count < table.num_rows:
            return _fixed(table.column(name), np.int64, like_shape[1])
        return np.zeros(like_shape, np.int64)

    return Holdout(
        viewer_id=np.asarray(table.column("viewer_id").to_pylist(), dtype=object),
        hist_product=_fixed(table.column("hist_product"), np.int64),
        hist_category=_fixed(table.column("hist_category"), np.int64),
        hist_event=_fixed(table.column("hist_event"), np.int64),
        hist_dwell=_fixed(table.column("hist_dwell"), np.int64),
        hist_dt=_fixed(table.column("hist_dt"), np.float32),
        hist_len=scalar("hist_len"),
        pp_features=_fixed(table.column("pp_features"), np.float32),
        target_product=scalar("target_product"),
        target_products=_fixed(table.column("target_products"), np.int64),
        cand_products=_fixed(table.column("cand_products"), np.int64),
        label_purchase=scalar("label_purchase"),
        hist_host=context("hist_host", "hist_product"),
        hist_hour=context("hist_hour", "hist_product"),
        cand_host=context("cand_host", "cand_products"),
        cand_hour=context("cand_hour", "cand_products"),
    )


def _partition(ctx: Context, name: str, date: dt.date, run: StageRun | None) -> pa.Table:
    """One as_of_date partition of a gold table, read with pyarrow from the snapshot's files.

    The holdout is one cutoff's rows (thousands, not billions): pyarrow reads it straight from
    the exact files of the recorded Delta version, no Spark job and no pandas round trip.
    """
    table = ctx.table(name)
    version = table.version()
    if run is not None:
        run.read(name, version)
    files = table.files(version, partitions={"as_of_date": date}) if version is not None else []
    pieces = [pq.read_table(f.removeprefix("file://")) for f in files]
    pieces = [p.drop([c for c in ("as_of_date",) if c in p.column_names]) for p in pieces]
    if not pieces:
        return pa.table({})
    # Files of different writers name list children differently (item/element): one schema.
    return pa.concat_tables([p.cast(pieces[0].schema) for p in pieces]) if len(pieces) > 1 else pieces[0]


def load_holdout(ctx: Context, date: dt.date, run: StageRun | None = None) -> Holdout:
    """The test rows of gold/training_examples for D, or InsufficientHistoryError.

    'test', not 'valid': training early-stopped and calibrated on 'valid', so those rows
    would flatter the challenger against the champion and the baselines.
    """
    table = _partition(ctx, TRAINING, date, run)
    if table.num_columns:
        table = table.filter(pc.equal(table.column("split"), HOLDOUT_SPLIT))
    if not table.num_columns or table.num_rows == 0:
        raise InsufficientHistoryError(
            f"{TRAINING} has no rows with as_of_date {date} and split '{HOLDOUT_SPLIT}': nothing to evaluate on "
            f"(run `streamrank features --date {date}`; a new warehouse needs a few days of history)")
    return holdout_from_arrow(table)


def load_vocab(ctx: Context, date: dt.date, run: StageRun | None = None) -> dict[str, dict[str, int]]:
    """gold/vocabularies of D as {kind: {token: idx}}."""
    table = _partition(ctx, VOCAB, date, run)
    if not table.num_columns or table.num_rows == 0:
        raise MissingInputError(f"{VOCAB} has no rows for as_of_date {date}; run `streamrank features --date {date}`")
    out: dict[str, dict[str, int]] = {}
    for kind, token, idx in zip(*(table.column(c).to_pylist() for c in ("kind", "token", "idx")), strict=True):
        out.setdefault(kind, {})[token] = int(idx)
    return out


def catalogue_ids(vocab: Mapping[str, Mapping[str, int]]) -> np.ndarray:
    """Real product ids (>= 2) of a vocabulary, sorted: the full-catalogue protocol's competitors."""
    return np.array(sorted(i for i in (vocab.get("product") or {}).values() if i >= FIRST_REAL_ID), dtype=np.int64)


def id_map(src: Mapping[str, int], dst: Mapping[str, int]) -> np.ndarray:
    """Array m with m[src_id] = dst id of the same token (UNK_ID if dst lacks it; 0 stays 0).

    Why: each model carries the vocabulary of the day it was trained; a product added to the
    catalogue since then shifts every later id, so ids must be translated through tokens.
    """
    size = max([UNK_ID, *src.values()]) + 1
    out = np.full(size, UNK_ID, dtype=np.int64)
    out[PAD_ID] = PAD_ID
    for token, i in src.items():
        if i >= FIRST_REAL_ID:
            out[i] = dst.get(token, UNK_ID)
    return out


def _lookup(mapping: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """mapping[ids] with out-of-range ids as UNK (never index errors on a stray id)."""
    ids = np.asarray(ids, dtype=np.int64)
    safe = np.clip(ids, 0, mapping.shape[0] - 1)
    return np.where((ids >= 0) & (ids < mapping.shape[0]), mapping[safe], UNK_ID)


# ----------------------------------------------------------------------------- ranking figures

@dataclass
class Scored:
    """Per-row outputs of one ranker on the holdout."""

    cand_ranks: np.ndarray  # [R] ranks of rows with a target and >= 1 competitor
    full_ranks: np.ndarray  # [R'] ranks among the whole catalogue, rows with a target
    cand_top: list[np.ndarray] = field(default_factory=list)  # top-10 candidate ids per row (D ids)
    full_top: list[np.ndarray] = field(default_factory=list)
    probs: np.ndarray | None = None  # calibrated P(purchase) per holdout row (models only)
    raw_probs: np.ndarray | None = None
    labels: np.ndarray | None = None
    nonfinite: int = 0


def rank_rows(target_scores: np.ndarray, cand_scores: np.ndarray, full_scores: np.ndarray | None,
              h: Holdout, catalogue: np.ndarray, sample: FullSample | None = None, start: int = 0,
              full_target_scores: np.ndarray | None = None) -> dict[str, Any]:
    """Ranks and top-10 lists of one batch, from scores of targets, candidates and catalogue.

    ``full_target_scores`` are the targets' scores as the catalogue is scored (a model scores
    candidates with their slot context, the catalogue without); by default ``target_scores``.

    ``full_scores`` holds rows ``sample.rows(start, start + len(h))`` of the batch (all rows
    when ``sample`` is None); of those, the sample's rank rows are ranked and its top rows give
    the full top-10 lists.

    Candidate protocol: competitors are the row's real candidates other than the target;
    rows without a target (nobody carted) or without any competitor (no schedule) are not
    ranked - a row with nothing to rank against would otherwise count as a perfect hit.
    """
    tgt = h.target_product
    cands = h.cand_products
    has_t = tgt >= FIRST_REAL_ID
    real = cands >= FIRST_REAL_ID
    comp = real & (cands != tgt[:, None])
    ranked = has_t & comp.any(axis=1)
    top = M.top_k_indices(cand_scores, COVERAGE_K, real)
    top_ids = np.take_along_axis(cands, top, axis=1)
    top_ok = np.take_along_axis(real, top, axis=1)
    out: dict[str, Any] = {
        "cand_ranks": M.ranks_from_scores(target_scores[ranked], cand_scores[ranked], comp[ranked]),
        "cand_top": [ids[ok] for ids, ok in zip(top_ids, top_ok, strict=True)],
    }
    if full_scores is not None:
        stop = start + len(tgt)
        sub = np.ones(len(tgt), dtype=bool) if sample is None else sample.rows(start, stop)
        rank = has_t[sub] if sample is None else sample.rank[start:stop][sub]
        keep_top = np.ones(int(sub.sum()), dtype=bool) if sample is None else sample.top[start:stop][sub]
        f_all = target_scores if full_target_scores is None else full_target_scores
        f_tgt, f_score = tgt[sub][rank], f_all[sub][rank]
        fcomp = catalogue[None, :] != f_tgt[:, None]
        out["full_ranks"] = M.ranks_from_scores(f_score, full_scores[rank], fcomp)
        out["full_top"] = [catalogue[row] for row in M.top_k_indices(full_scores[keep_top], COVERAGE_K)]
    return out


def ranking_figures(s: Scored, catalogue_size: int) -> dict[str, float | None]:
    """NDCG@5/10/20, HR@10, MRR, coverage@10 (candidate protocol) and their full_* twins."""
    out: dict[str, float | None] = {f"ndcg_at_{k}": M.ndcg_at_k(s.cand_ranks, k) for k in RANK_KS}
    out[f"hr_at_{HR_K}"] = M.hit_rate_at_k(s.cand_ranks, HR_K)
    out["mrr"] = M.mrr(s.cand_ranks)
    out[f"coverage_at_{COVERAGE_K}"] = M.catalogue_coverage(s.cand_top, catalogue_size)
    out["ranked_rows"] = float(s.cand_ranks.size)
    out["full_ranked_rows"] = float(s.full_ranks.size)
    out["full_ndcg_at_10"] = M.ndcg_at_k(s.full_ranks, 10)
    out[f"full_hr_at_{HR_K}"] = M.hit_rate_at_k(s.full_ranks, HR_K)
    out["full_mrr"] = M.mrr(s.full_ranks)
    out[f"full_coverage_at_{COVERAGE_K}"] = M.catalogue_coverage(s.full_top, catalogue_size)
    return out


def intent_figures(s: Scored, threshold: float) -> dict[str, float | None]:
    """AUC, log loss, ECE (10 bins), precision/recall/F1 at the threshold, on calibrated probabilities."""
    y, p = s.labels, s.probs
    out: dict[str, float | None] = {
        "intent_auc": M.auc(y, p),
        "intent_logloss": M.log_loss(y, p),
        "intent_ece": M.ece(y, p, 10),
        "intent_auc_raw": M.auc(y, s.raw_probs),
        "intent_logloss_raw": M.log_loss(y, s.raw_probs),
        "intent_ece_raw": M.ece(y, s.raw_probs, 10),
        "intent_base_rate": float(np.mean(y)) if y.size else None,
        "intent_mean_prob": float(np.mean(p)) if p.size else None,
        "holdout_rows": float(y.size),
        "nonfinite_outputs": float(s.nonfinite),
    }
    prf = M.precision_recall_f1(y, p, threshold)
    out.update({f"intent_{k}": v for k, v in prf.items()})
    return out


# ----------------------------------------------------------------------------- models

@dataclass
class LoadedModel:
    """A registered version ready to score: the pyfunc, its network, vocabulary and calibrator."""

    ref: ModelRef
    pyfunc: Any  # mlflow.pyfunc.PyFuncModel (for the scored-sample check)
    net: Any  # streamrank.model.StreamRankModel
    vocab: dict[str, Any]
    calibrator: dict[str, Any] | None
    local_dir: str


def download_model(ref: ModelRef, dst: str) -> LoadedModel:
    """Download a version's artifacts once and load its pyfunc (sys.path restored afterwards).

    Loading through mlflow.pyfunc runs the deployed code path (the logged model code, load_context,
    calibrator) so a model that scores here also loads where it is served.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one summary line per stage, not bars
    local = mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=dst)
    if not (Path(local) / "MLmodel").exists():
        # MLflow "downloads" a version whose artifact directory was deleted or moved as an
        # empty folder; say which version and where, not "no MLmodel in a temp dir".
        raise MissingInputError(
            f"model {ref.name} v{ref.version} (run {ref.run_id}) has no MLmodel at its artifact location"
            f" ({_artifact_source(ref)}): the artifacts were moved or deleted; point the alias at a version"
            " that still has them (`streamrank promote --rollback`, or MlflowClient.set_registered_model_alias)"
        )
    saved = list(sys.path)
    try:
        pyfunc = mlflow.pyfunc.load_model(local)
    finally:
        sys.path[:] = saved
    inner = pyfunc.unwrap_python_model()
    with open(Path(local) / "artifacts" / "vocab.json", encoding="utf-8") as fh:
        vocab = json.load(fh)
    return LoadedModel(ref, pyfunc, inner.model.eval(), vocab, inner.calibrator, local)


def _artifact_source(ref: ModelRef) -> str:
    """Where the registry says the version's files are (for error messages only)."""
    try:
        from mlflow import MlflowClient

        return str(MlflowClient().get_model_version(ref.name, ref.version).source)
    except Exception:  # noqa: BLE001 - the message still names the version
        return ref.uri


def score_model(lm: LoadedModel, h: Holdout, vocab: Mapping[str, Mapping[str, int]], precision: str = "fp32") -> Scored:
    """Score the holdout with a model: candidate and full-catalogue ranks, top lists, intent.

    Ids are translated from D's vocabulary into the model's; identity of products (is this
    competitor the target?) is decided on D's ids, so two products unknown to the model do
    not become "the same product". ``precision`` bf16 scores as the score stage serves:
    a bf16 copy encodes and runs the intent head, the float32 model's candidate vectors
    rank (lm.net itself is shared with the pyfunc and stays float32).
    """
    import copy

    import torch

    from streamrank.model import apply_calibration, batch_to_tensors
    from streamrank.score import PRECISIONS

    net = lm.net
    enc = net if precision == "fp32" else copy.deepcopy(net).to(PRECISIONS[precision])
    pmap = id_map(vocab.get("product", {}), lm.vocab.get("product", {}))
    cmap = id_map(vocab.get("category", {}), lm.vocab.get("category", {}))
    emap = id_map(vocab.get("event", {}), lm.vocab.get("event", {}))
    hmap = id_map(vocab.get("host", {}), lm.vocab.get("host", {}))
    catalogue = catalogue_ids(vocab)
    sample = FullSample.of(h)
    parts: dict[str, list[Any]] = {"cand_ranks": [], "full_ranks": [], "cand_top": [], "full_top": [], "logits": []}
    nonfinite = 0
    with torch.no_grad():
        cat_matrix = net.candidate_matrix(torch.as_tensor(_lookup(pmap, catalogue)))
        for s in range(0, len(h), SCORE_BATCH):
            b = h.take(slice(s, s + SCORE_BATCH))
            batch = batch_to_tensors({
                "hist_product": _lookup(pmap, b.hist_product), "hist_category": _lookup(cmap, b.hist_category),
                "hist_event": _lookup(emap, b.hist_event), "hist_dwell": b.hist_dwell, "hist_dt": b.hist_dt,
                "hist_len": b.hist_len, "pp_features": b.pp_features,
                "target_product": _lookup(pmap, b.target_product), "target_products": _lookup(pmap, b.target_products),
                "cand_products": _lookup(pmap, b.cand_products), "label_purchase": b.label_purchase,
                "hist_host": _lookup(hmap, b.hist_host), "hist_hour": b.hist_hour,
                "cand_host": _lookup(hmap, b.cand_host), "cand_hour": b.cand_hour,
            })
            out = enc(batch, compute_loss=False)
            state = out["state"].float()
            t_score = net.target_scores(state, batch).numpy()
            t_full = (state * net.item_vec(batch["target_product"])).sum(-1).numpy()
            cand_scores = (out["rank_logits"] if enc is net else net.candidate_scores(state, batch)).float().numpy()
            sel = sample.rows(s, s + len(b))
            full_scores = net.rank_scores(state[torch.as_tensor(sel)], cat_matrix).float().numpy()
            logits = out["viewer_logit"].float().numpy()
            nonfinite += int((~np.isfinite(cand_scores)).sum() + (~np.isfinite(logits)).sum()
                             + (~np.isfinite(full_scores)).sum())
            r = rank_rows(t_score, cand_scores, full_scores, b, catalogue, sample, s, full_target_scores=t_full)
            for key in ("cand_ranks", "full_ranks", "cand_top", "full_top"):
                parts[key].extend(r[key] if key.endswith("_top") else [r[key]])
            parts["logits"].append(logits)
    logits = np.concatenate(parts["logits"]).astype(np.float64)
    raw = 1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))
    return Scored(
        cand_ranks=np.concatenate(parts["cand_ranks"]), full_ranks=np.concatenate(parts["full_ranks"]),
        cand_top=parts["cand_top"], full_top=parts["full_top"],
        probs=apply_calibration(raw, lm.calibrator), raw_probs=raw, labels=h.label_purchase.astype(np.int64),
        nonfinite=nonfinite,
    )


def pyfunc_input(h: Holdout, vocab: Mapping[str, Mapping[str, int]], n: int = SAMPLE_ROWS):  # noqa: ANN201 - DataFrame
    """Up to n holdout rows as the pyfunc's raw input (tokens, dwell ms, hours before cutoff).

    Dwell buckets are turned back into a representative duration (the features stage's
    bucket b >= 2 starts at 100 ms * 2^(b-2)); the sample checks that the served model gives
    finite outputs on real histories, not that it reproduces the training buckets.
    """
    import pandas as pd

    inv_p = {i: t for t, i in (vocab.get("product") or {}).items()}
    inv_e = {i: t for t, i in (vocab.get("event") or {}).items()}
    inv_h = {i: t for t, i in (vocab.get("host") or {}).items() if i >= FIRST_REAL_ID}
    hour = lambda t: int(t) - FIRST_REAL_ID if t >= FIRST_REAL_ID else None  # noqa: E731 - hour token -> UTC hour
    rows = []
    for i in range(min(n, len(h))):
        k = int(h.hist_len[i])
        sl = slice(h.hist_product.shape[1] - k, None) if k else slice(0, 0)
        dwell = h.hist_dwell[i, sl]
        shown = np.array([int(c) >= FIRST_REAL_ID and int(c) in inv_p for c in h.cand_products[i]], dtype=bool)
        rows.append({
            "viewer_id": str(h.viewer_id[i]),
            "hist_product": [inv_p.get(int(p), "<unk>") for p in h.hist_product[i, sl]],
            "hist_event": [inv_e.get(int(e), "<unk>") for e in h.hist_event[i, sl]],
            "hist_dwell_ms": [0 if d <= 1 else int(100 * 2 ** (int(d) - 2)) for d in dwell],
            "hist_dt_hours": [float(x) for x in h.hist_dt[i, sl]],
            "pp_features": [float(x) for x in h.pp_features[i]],
            "candidates": [inv_p[int(c)] for c in h.cand_products[i][shown]],
            "hist_host": [inv_h.get(int(x)) for x in h.hist_host[i, sl]],
            "hist_hour": [hour(x) for x in h.hist_hour[i, sl]],
            "cand_host": [inv_h.get(int(x)) for x in h.cand_host[i][shown]],
            "cand_hour": [hour(x) for x in h.cand_hour[i][shown]],
        })
    return pd.DataFrame(rows)


def nonfinite_outputs(pyfunc: Any, sample: Any) -> tuple[int, int]:
    """(rows scored, number of NaN/inf values) of the pyfunc's numeric outputs on a sample."""
    if sample is None or len(sample) == 0:
        return 0, 0
    out = pyfunc.predict(sample)
    values = out[["score", "purchase_prob", "intent_score"]].to_numpy(dtype=np.float64)
    return len(sample), int((~np.isfinite(values)).sum())


# ----------------------------------------------------------------------------- baselines

def training_window(cfg: Config, date: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """[D - history_days, D 00:00) in UTC: the events the examples of D's training cutoffs see."""
    end = dt.datetime.combine(date, dt.time(0), tzinfo=dt.UTC)
    return end - dt.timedelta(days=int(cfg["features.history_days"])), end


def _silver_window(ctx: Context, date: dt.date, run: StageRun | None):  # noqa: ANN202 - DataFrame
    from pyspark.sql import functions as F

    from streamrank.features import known_by

    start, end = training_window(ctx.cfg, date)
    table = ctx.table(SILVER)
    version = table.version()
    if run is not None:
        run.read(SILVER, version)
    df = known_by(table.read(version=version), date)
    return df.filter(F.col("event_date").between(F.lit(start.date() - dt.timedelta(days=1)), F.lit(end.date()))
                     & (F.col("event_ts") >= F.lit(start)) & (F.col("event_ts") < F.lit(end))
                     & F.col("product_id").isNotNull() & F.col("viewer_id").isNotNull())


def popularity(ctx: Context, date: dt.date, vocab: Mapping[str, Mapping[str, int]],
               run: StageRun | None = None) -> np.ndarray:
    """Carts + purchases per product id of D's vocabulary in the training window (0 if none)."""
    from pyspark.sql import functions as F

    rows = (_silver_window(ctx, date, run).filter(F.col("event_type").isin(*POPULAR_EVENTS))
            .groupBy("product_id").count().collect())
    products = vocab.get("product") or {}
    counts = np.zeros(max([UNK_ID, *products.values()]) + 1, dtype=np.float64)
    for r in rows:
        idx = products.get(r["product_id"])
        if idx is not None and idx >= FIRST_REAL_ID:
            counts[idx] += r["count"]
    return counts


def popularity_scores(counts: np.ndarray) -> np.ndarray:
    """Score per product id: its count, ties broken towards the lower id.

    A most-popular recommender has to put tied products in some order; a fixed one (less
    than 1 apart, so it never crosses counts) keeps the baseline deterministic and does not
    hand it the pessimistic tie penalty meant for degenerate models.
    """
    n = counts.shape[0]
    return counts + 0.5 * (1.0 - np.arange(n) / max(n, 1))


def score_lookup(h: Holdout, item_scores: np.ndarray, factors: tuple[np.ndarray, np.ndarray] | None,
                 catalogue: np.ndarray) -> Scored:
    """Rank with per-item scores (most-popular) or with factors (U [B, r], V [n_ids, r]) (ALS).

    Factor scores are formed batch by batch: the dense [holdout rows x catalogue] matrix
    would be 6 GB at scale 1 and ~90 GB at scale 4.
    """
    def gather(ids: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
        if factors is None:
            return item_scores[np.clip(ids, 0, item_scores.shape[-1] - 1)]
        users, items = factors
        vs = users[rows] @ items.T
        ids = np.clip(ids, 0, vs.shape[1] - 1)
        return np.take_along_axis(vs, ids.reshape(vs.shape[0], -1), axis=1).reshape(ids.shape)

    sample = FullSample.of(h)
    parts: dict[str, list[Any]] = {"cand_ranks": [], "full_ranks": [], "cand_top": [], "full_top": []}
    for s in range(0, len(h), SCORE_BATCH):
        rows = slice(s, s + SCORE_BATCH)
        b = h.take(rows)
        sel = sample.rows(s, s + len(b))
        full = gather(np.broadcast_to(catalogue, (int(sel.sum()), catalogue.size)).copy(), np.arange(s, s + len(b))[sel])
        r = rank_rows(gather(b.target_product, rows), gather(b.cand_products, rows), full, b, catalogue, sample, s)
        for key in parts:
            parts[key].extend(r[key] if key.endswith("_top") else [r[key]])
    return Scored(cand_ranks=np.concatenate(parts["cand_ranks"]), full_ranks=np.concatenate(parts["full_ranks"]),
                  cand_top=parts["cand_top"], full_top=parts["full_top"])


def category_affinity_factors(h: Holdout, counts: np.ndarray, product_category: np.ndarray,
                              vocab: Mapping[str, Mapping[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The pop_category baseline as factors for `score_lookup`: U [B, n_cat + 1], V [n_ids, n_cat + 1].

    Score of product p for a viewer = log1p(carts + purchases of p) + AFFINITY_WEIGHT x the
    viewer's weighted share of history events in p's category. Why this baseline: on the
    synthetic week, popularity plus category affinity alone reaches the attention model's
    NDCG (docs/model-quality.md), so a challenger that cannot beat it has learned
    nothing a two-line rule does not know. The weights are fixed, not fitted on the holdout.
    """
    n_ids = counts.shape[0]
    cats = np.zeros(n_ids, dtype=np.int64)
    m = min(n_ids, product_category.shape[0])
    cats[:m] = product_category[:m]
    n_cat = int(max(cats.max(initial=1), h.hist_category.max(initial=1))) + 1
    events = vocab.get("event") or {}
    w_event = np.full(max([UNK_ID, *events.values()]) + 1, AFFINITY_OTHER_WEIGHT)
    w_event[0] = 0.0  # padding
    for token, idx in events.items():
        w_event[idx] = AFFINITY_EVENT_WEIGHTS.get(token, AFFINITY_OTHER_WEIGHT)
    w = w_event[np.clip(h.hist_event, 0, w_event.shape[0] - 1)] * (h.hist_category > 0)
    b = len(h)
    shares = np.zeros((b, n_cat))
    np.add.at(shares, (np.repeat(np.arange(b), w.shape[1]), np.clip(h.hist_category, 0, n_cat - 1).ravel()), w.ravel())
    shares /= np.maximum(shares.sum(1, keepdims=True), 1e-12)
    users = np.concatenate([AFFINITY_WEIGHT * shares, np.ones((b, 1))], axis=1)
    items = np.zeros((n_ids, n_cat + 1))
    items[np.arange(n_ids), cats] = 1.0
    # popularity_scores' fixed tie order, shrunk so it never crosses a category share
    items[:, -1] = np.log1p(counts) + 1e-6 * (1.0 - np.arange(n_ids) / max(n_ids, 1))
    items[:FIRST_REAL_ID] = 0.0
    return users, items


def als_scores(ctx: Context, date: dt.date, h: Holdout, vocab: Mapping[str, Mapping[str, int]],
               run: StageRun | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """ALS factors (U [B, rank] per holdout row, V [n_ids, rank]; None when the window has no interactions).

    Spark MLlib ALS, implicit feedback, on the training window's (viewer, product) pairs
    weighted by event type (ALS_EVENT_WEIGHTS, summed). Viewers or products without factors
    score 0: honest cold start, no popularity fallback mixed into the baseline.
    """
    from pyspark.ml.feature import StringIndexer
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import functions as F

    spark = ctx.spark
    weights = F.create_map(*[x for k, v in ALS_EVENT_WEIGHTS.items() for x in (F.lit(k), F.lit(v))])
    products = vocab.get("product") or {}
    pidx = spark.createDataFrame([(t, int(i)) for t, i in products.items() if i >= FIRST_REAL_ID],
                                 "product_id string, item int")
    inter = (
        _silver_window(ctx, date, run).withColumn("w", weights[F.col("event_type")]).filter(F.col("w").isNotNull())
        .join(F.broadcast(pidx), "product_id").groupBy("viewer_id", "item").agg(F.sum("w").cast("float").alias("w"))
    ).cache()
    try:
        if inter.limit(1).count() == 0:
            return None
        indexer = StringIndexer(inputCol="viewer_id", outputCol="user", stringOrderType="alphabetAsc").fit(inter)
        data = indexer.transform(inter).withColumn("user", F.col("user").cast("int"))
        cfg = ctx.cfg
        als = ALS(implicitPrefs=True, rank=int(cfg["evaluate.als_rank"]), maxIter=int(cfg["evaluate.als_max_iter"]),
                  userCol="user", itemCol="item", ratingCol="w", seed=int(cfg["train.seed"]),
                  coldStartStrategy="drop", nonnegative=False)
        model = als.fit(data)
        # Arrow, not Row objects: hundreds of thousands of factor rows reach numpy in one piece.
        user_ids, user_f = _factors(model.userFactors.toArrow())
        item_ids, item_f = _factors(model.itemFactors.toArrow())
    finally:
        inter.unpersist()
    rank = int(ctx.cfg["evaluate.als_rank"])
    n_ids = max([UNK_ID, *products.values()]) + 1
    V = np.zeros((n_ids, rank))
    keep = item_ids < n_ids
    V[item_ids[keep]] = item_f[keep]
    # holdout row -> ALS user index (StringIndexer label order) -> factor row; 0 when unknown
    label_of = {v: i for i, v in enumerate(indexer.labels)}
    factor_row = np.full(len(indexer.labels), -1, dtype=np.int64)
    factor_row[user_ids] = np.arange(user_ids.size)
    user = np.array([label_of.get(v, -1) for v in h.viewer_id], dtype=np.int64)
    row = np.where(user >= 0, factor_row[np.maximum(user, 0)], -1)
    U = np.zeros((len(h), rank))
    U[row >= 0] = user_f[row[row >= 0]]
    return U, V


def _factors(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n], factors [n, rank]) from an ALS factor frame (id int, features array<float>)."""
    ids = table.column("id").to_numpy().astype(np.int64)
    feats = table.column("features").combine_chunks()
    width = len(feats[0]) if len(feats) else 0
    flat = feats.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    return ids, flat.reshape(len(ids), width)


# ----------------------------------------------------------------------------- recording

def _finite(figures: Mapping[str, float | None]) -> dict[str, float]:
    return {k: float(v) for k, v in figures.items() if v is not None and math.isfinite(float(v))}


def log_to_mlflow(run_id: str, date: dt.date, results: Mapping[str, Mapping[str, float | None]],
                  tags: Mapping[str, str]) -> None:
    """Every figure on the challenger's run: challenger unprefixed, others prefixed.

    step = YYYYMMDD of D: the training worker logs the same keys per epoch (step = epoch), and
    MLflow shows the value of the highest step as a metric's latest; a date step keeps each
    evaluation's figures separate and the newest one on top.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    step = int(date.strftime("%Y%m%d"))
    metrics = [Metric(PREFIX[cand] + key, value, now, step)
               for cand, figures in results.items() for key, value in _finite(figures).items()]
    client = MlflowClient()
    for s in range(0, len(metrics), 900):  # log_batch accepts at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[s:s + 900])
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.log_dict(run_id, {"date": date.isoformat(), "figures": {c: _finite(f) for c, f in results.items()}},
                    f"evaluate/{date.isoformat()}.json")


def model_eval_rows(ctx: Context, date: dt.date, mlflow_run_id: str, results: Mapping[str, Mapping[str, float | None]],
                    versions: Mapping[str, str | None]) -> list[dict[str, Any]]:
    """One ops/model_eval row per (candidate, finite metric); model_version for the models only."""
    now = dt.datetime.now(dt.UTC)
    return [
        {"run_id": ctx.run_id, "mlflow_run_id": mlflow_run_id, "model_name": ctx.cfg["mlflow.model_name"],
         "model_version": versions.get(cand), "candidate": cand, "metric": key, "value": value,
         "recorded_at": now, "run_date": date}
        for cand, figures in results.items() for key, value in sorted(_finite(figures).items())
    ]


def write_model_eval(ctx: Context, date: dt.date, mlflow_run_id: str, rows: list[dict[str, Any]]) -> int | None:
    """Replace this challenger's evaluation of D in ops/model_eval (a re-run leaves one copy)."""
    from streamrank.schemas import table_spec

    table = ctx.table(MODEL_EVAL)
    df = ctx.spark.createDataFrame(rows, table_spec(MODEL_EVAL).schema)
    res = table.overwrite(df.coalesce(1), where={"run_date": date, "mlflow_run_id": mlflow_run_id},
                          commit_info={"stage": "evaluate", "run_id": ctx.run_id, "date": str(date)})
    return res.version


# ----------------------------------------------------------------------------- the stage

def _print_table(results: Mapping[str, Mapping[str, float | None]]) -> None:
    keys = ("ndcg_at_10", "hr_at_10", "mrr", "coverage_at_10", "full_ndcg_at_10", "intent_auc", "intent_ece")
    print(f"{'candidate':<14}" + "".join(f"{k:>17}" for k in keys))
    for cand, fig in results.items():
        cells = [f"{fig[k]:>17.4f}" if fig.get(k) is not None else f"{'-':>17}" for k in keys]
        print(f"{cand:<14}" + "".join(cells))


def evaluate(ctx: Context, date: dt.date) -> dict[str, Any]:
    """Score the holdout of D with challenger, champion, most-popular and ALS; record everything.

    Returns {"challenger_version", "champion_version", "mlflow_run_id", "results": {candidate: figures}}.
    """
    with stage_run(ctx, "evaluate", date) as run:
        setup_mlflow(ctx.cfg)
        challenger = by_alias(ctx.cfg, CHALLENGER)
        if challenger is None:
            raise MissingInputError(
                f"no version of model {ctx.cfg['mlflow.model_name']!r} holds the alias {CHALLENGER!r} "
                f"(registry {ctx.cfg.mlflow_registry_uri}); run `streamrank train --date {date}` first")
        champion = by_alias(ctx.cfg, CHAMPION)
        if champion is not None and champion.version == challenger.version:
            champion = None  # the challenger already is the champion: nothing separate to compare
        run.mlflow_run_id = challenger.run_id
        holdout = load_holdout(ctx, date, run)
        vocab = load_vocab(ctx, date, run)
        catalogue = catalogue_ids(vocab)
        threshold = float(ctx.cfg["evaluate.intent_threshold"])
        precision = inference_precision(ctx.cfg["score.precision"])  # what the score stage will serve
        notes: list[str] = []
        if challenger.trained_after(date):
            notes.append(f"challenger was trained on {challenger.trained_as_of}, after {date}: "
                         "its training data includes this holdout")

        results: dict[str, dict[str, float | None]] = {}
        versions: dict[str, str | None] = {"challenger": challenger.version}
        tmp = tempfile.mkdtemp(prefix=f"evaluate-{date}-", dir=ctx.cfg.warehouse)
        try:
            sample = pyfunc_input(holdout, vocab)
            for cand, ref in (("challenger", challenger), ("champion", champion)):
                if ref is None:
                    continue
                lm = download_model(ref, os.path.join(tmp, cand))
                scored = score_model(lm, holdout, vocab)
                figures = {**ranking_figures(scored, catalogue.size), **intent_figures(scored, threshold)}
                if cand == "challenger":
                    served = figures
                    if precision != "fp32":
                        s2 = score_model(lm, holdout, vocab, precision)
                        served = {**ranking_figures(s2, catalogue.size), **intent_figures(s2, threshold)}
                    figures.update({f"served_{key}": served[key] for key in SERVED})
                rows, bad = nonfinite_outputs(lm.pyfunc, sample)
                figures.update({"sample_rows": float(rows), "sample_nonfinite": float(bad)})
                figures["calibrated"] = 1.0 if lm.calibrator else 0.0
                slope = (lm.calibrator or {}).get("a") if (lm.calibrator or {}).get("method", "platt") == "platt" else None
                if slope is not None:
                    figures["calibrator_slope"] = float(slope)
                    if float(slope) <= 0:
                        notes.append(f"{cand} v{ref.version}: the Platt calibrator has slope {float(slope):.3f}: the intent head "
                                     "is not better than chance on validation, so probabilities are the base rate; "
                                     "intent_auc_raw shows the head itself")
                if not lm.calibrator:
                    notes.append(f"{cand} v{ref.version} has no calibrator (its validation set had one class): "
                                 "intent figures use raw probabilities")
                results[cand] = figures
                versions[cand] = ref.version
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

        counts = popularity(ctx, date, vocab, run)
        results["most_popular"] = ranking_figures(score_lookup(holdout, popularity_scores(counts), None, catalogue),
                                                  catalogue.size)
        affinity = category_affinity_factors(holdout, counts, np.asarray(product_categories(ctx, date, vocab)), vocab)
        results["pop_category"] = ranking_figures(score_lookup(holdout, np.zeros(counts.shape[0]), affinity, catalogue),
                                                  catalogue.size)
        als = als_scores(ctx, date, holdout, vocab, run)
        if als is None:
            notes.append("no silver interactions in the training window: ALS not trained")
        else:
            results["als"] = ranking_figures(score_lookup(holdout, np.zeros(als[1].shape[0]), als, catalogue),
                                             catalogue.size)

        tags = {"evaluate.date": date.isoformat(), "evaluate.streamrank_run_id": ctx.run_id,
                "evaluate.champion_version": champion.version if champion else "none",
                "evaluate.holdout_rows": str(len(holdout)), "evaluate.served_precision": precision}
        log_to_mlflow(challenger.run_id, date, results, tags)
        rows = model_eval_rows(ctx, date, challenger.run_id, results, versions)
        run.wrote(MODEL_EVAL, write_model_eval(ctx, date, challenger.run_id, rows))

        _print_table(results)
        head = results["challenger"]
        run.metrics.update({k: round(head[k], 4) for k in HEADLINE if head.get(k) is not None})
        for cand in ("champion", "most_popular", "pop_category", "als"):
            if results.get(cand, {}).get("ndcg_at_10") is not None:
                run.metrics[f"{PREFIX[cand]}ndcg_at_10"] = round(results[cand]["ndcg_at_10"], 4)
        run.metrics.update({"model_version": challenger.version, "champion_version": versions.get("champion"),
                            "holdout_rows": len(holdout), "eval_rows": len(rows), "served_precision": precision})
        run.message = "; ".join([f"evaluated v{challenger.version}"
                                 + (f" against champion v{champion.version}" if champion else " (no separate champion)")]
                                + notes)
        return {"challenger_version": challenger.version, "champion_version": versions.get("champion"),
                "mlflow_run_id": challenger.run_id, "results": results, "notes": notes}


def run(ctx: Context, args: argparse.Namespace) -> int:
    """CLI entry point: `streamrank evaluate --date D`."""
    evaluate(ctx, args.date)
    return 0
