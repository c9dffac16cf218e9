"""MLflow pyfunc wrapper: raw tokens in, per-(viewer, candidate) scores and intent out.

The registered model is self-contained: ``model.pt`` (weights + product lookups),
``model_config.json``, the vocabularies the features were built with (``vocab.json``:
``{"product": {token: idx}, "category": {...}, "event": {...}, "product_category": [...]}``,
optionally ``product_price_tier``) and optionally a calibrator (``calibrator.json``: Platt
``{"method": "platt", "a", "b"}`` on the intent logit, or isotonic ``{"method": "isotonic",
"x": [...], "y": [...]}``). ``predict`` takes one row per viewer with raw histories - product ids,
event types, dwell in ms, hours before the cutoff - so a consumer needs no feature code.
Optional stream context (CONTEXT_COLUMNS): each history event's host id and UTC hour of day,
and each candidate's host id and UTC hour of its slot; missing columns or values mean "no
context", which a model trained with context scores as it scored padding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from streamrank.model import (
    CONTEXT_KEYS,
    FIRST_REAL_ID,
    PAD_ID,
    UNK_ID,
    StreamRankModel,
    apply_calibration,
    batch_to_tensors,
    dwell_bucket,
    load_model,
)

INPUT_COLUMNS = ("viewer_id", "hist_product", "hist_event", "hist_dwell_ms", "hist_dt_hours", "pp_features",
                 "candidates")
CONTEXT_COLUMNS = CONTEXT_KEYS  # the optional inputs are the model's stream-context batch keys
OUTPUT_COLUMNS = ("viewer_id", "product_id", "score", "purchase_prob", "intent_score")
PREDICT_BATCH = 256


def _as_list(value: Any) -> list:
    """Cells may arrive as list, tuple, numpy array or None/NaN (after JSON or Spark round trips)."""
    if value is None:
        return []
    if isinstance(value, float) and np.isnan(value):
        return []
    return list(value)


def _aligned(values: list, n: int, left: bool) -> list:
    """n values of a side list: the last n, left-filled with None (left), or the first n, right-filled."""
    if left:
        tail = values[-n:] if n else []
        return [None] * (n - len(tail)) + tail
    head = values[:n]
    return head + [None] * (n - len(head))


class Encoder:
    """Turns raw viewer rows into the model's integer/float tensors, exactly as training saw them."""

    def __init__(self, vocab: Mapping[str, Any], seq_len: int, n_pp_features: int, n_dwell_buckets: int):
        self.product = {str(k): int(v) for k, v in (vocab.get("product") or {}).items()}
        self.event = {str(k): int(v) for k, v in (vocab.get("event") or {}).items()}
        self.host = {str(k): int(v) for k, v in (vocab.get("host") or {}).items()}
        self.product_category = np.asarray(vocab.get("product_category") or [PAD_ID], dtype=np.int64)
        self.seq_len = seq_len
        self.n_pp = n_pp_features
        self.n_dwell = n_dwell_buckets

    def product_ids(self, tokens: Sequence[Any]) -> np.ndarray:
        return np.array([self.product.get(str(t), UNK_ID) for t in tokens], dtype=np.int64)

    def host_ids(self, tokens: Sequence[Any]) -> np.ndarray:
        """Host ids; a missing value is padding (no context), a host the model never saw is unknown."""
        return np.array([PAD_ID if t is None else self.host.get(str(t), UNK_ID) for t in tokens], dtype=np.int64)

    @staticmethod
    def hour_ids(hours: Sequence[Any]) -> np.ndarray:
        """UTC hours 0..23 as hour tokens (2 + hour, features.hour_token); missing -> padding."""
        out = []
        for h in hours:
            ok = h is not None and not (isinstance(h, float) and np.isnan(h))
            out.append(FIRST_REAL_ID + int(h) % 24 if ok else PAD_ID)
        return np.array(out, dtype=np.int64)

    def context(self, rows: pd.DataFrame, host_col: str, hour_col: str, counts: Sequence[int],
                width: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
        """[B, width] host and hour ids of a list column pair, for each row's n items.

        ``left``: histories, whose items are the last n (left-padded); else candidates, the
        first n (right-padded). A missing column or a short list is no context.
        """
        host = np.zeros((len(rows), width), np.int64)
        hour = np.zeros((len(rows), width), np.int64)
        for i, n in enumerate(counts):
            if not n:
                continue
            sl = slice(width - n, width) if left else slice(0, n)
            if host_col in rows.columns:
                host[i, sl] = self.host_ids(_aligned(_as_list(rows[host_col].iloc[i]), n, left))
            if hour_col in rows.columns:
                hour[i, sl] = self.hour_ids(_aligned(_as_list(rows[hour_col].iloc[i]), n, left))
        return host, hour

    def encode(self, rows: pd.DataFrame) -> dict[str, np.ndarray]:
        b, length = len(rows), self.seq_len
        out = {
            "hist_product": np.zeros((b, length), np.int64),
            "hist_category": np.zeros((b, length), np.int64),
            "hist_event": np.zeros((b, length), np.int64),
            "hist_dwell": np.zeros((b, length), np.int64),
            "hist_dt": np.zeros((b, length), np.float32),
            "hist_len": np.zeros(b, np.int64),
            "pp_features": np.zeros((b, self.n_pp), np.float32),
        }
        for i, row in enumerate(rows.itertuples(index=False)):
            prods = _as_list(row.hist_product)[-length:]
            n = len(prods)
            out["hist_len"][i] = n
            if n:
                s = length - n
                pid = self.product_ids(prods)
                out["hist_product"][i, s:] = pid
                cat = np.where(pid < len(self.product_category),
                               self.product_category[np.minimum(pid, len(self.product_category) - 1)], UNK_ID)
                out["hist_category"][i, s:] = cat
                out["hist_event"][i, s:] = self._tail([self.event.get(str(e), UNK_ID)
                                                       for e in _as_list(row.hist_event)], n, UNK_ID)
                out["hist_dwell"][i, s:] = dwell_bucket(
                    self._tail(_as_list(row.hist_dwell_ms), n, np.nan), self.n_dwell)
                out["hist_dt"][i, s:] = np.nan_to_num(self._tail(_as_list(row.hist_dt_hours), n, 0.0), nan=0.0)
            pp = np.asarray(_as_list(row.pp_features)[: self.n_pp], dtype=np.float32)
            out["pp_features"][i, : pp.size] = np.nan_to_num(pp)
        out["hist_host"], out["hist_hour"] = self.context(rows, "hist_host", "hist_hour", out["hist_len"], length, left=True)
        return out

    @staticmethod
    def _tail(values: list, n: int, fill: Any) -> np.ndarray:
        """Last n values, left-filled with ``fill`` when a side list is shorter than the products."""
        values = values[-n:] if n else []
        arr = np.array([fill] * (n - len(values)) + [fill if v is None else v for v in values], dtype=np.float64)
        return arr


class StreamRankPyfunc(mlflow.pyfunc.PythonModel):
    """Scores every (viewer, candidate) pair: ranking score, candidate purchase prob, viewer intent."""

    def load_context(self, context: Any) -> None:
        arts = context.artifacts
        with open(arts["model_config"], encoding="utf-8") as f:
            cfg = json.load(f)
        with open(arts["vocab"], encoding="utf-8") as f:
            vocab = json.load(f)
        self.calibrator = None
        if arts.get("calibrator") and os.path.exists(arts["calibrator"]):
            with open(arts["calibrator"], encoding="utf-8") as f:
                self.calibrator = json.load(f)
        self.model: StreamRankModel = load_model(arts["model"], cfg, map_location="cpu")
        c = self.model.cfg
        self.encoder = Encoder(vocab, c.seq_len, c.n_pp_features, c.n_dwell_buckets)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One output row per (viewer, candidate), in input order; see OUTPUT_COLUMNS."""
        df = pd.DataFrame(model_input)
        missing = [col for col in INPUT_COLUMNS if col not in df.columns]
        if missing:
            raise ValueError(f"model input lacks columns {missing}")
        parts = [self._predict_batch(df.iloc[s:s + PREDICT_BATCH]) for s in range(0, len(df), PREDICT_BATCH)]
        if not parts:
            return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
                OUTPUT_COLUMNS, ("object", "object", "float64", "float64", "float64"), strict=True)})
        return pd.concat(parts, ignore_index=True)

    @torch.no_grad()
    def _predict_batch(self, rows: pd.DataFrame) -> pd.DataFrame:
        batch = batch_to_tensors(self.encoder.encode(rows))
        cand_tokens = [[str(t) for t in _as_list(c)] for c in rows["candidates"]]
        width = max([1, *map(len, cand_tokens)])
        cand = np.zeros((len(rows), width), np.int64)
        for i, toks in enumerate(cand_tokens):
            cand[i, : len(toks)] = self.encoder.product_ids(toks)
        cand_t = torch.as_tensor(cand)
        counts = np.array([len(t) for t in cand_tokens])
        c_host, c_hour = (torch.as_tensor(a) for a in self.encoder.context(rows, "cand_host", "cand_hour", counts, width,
                                                                            left=False))
        hidden = self.model.encode(batch)[0]
        state = hidden[:, -1]
        if self.model.has_context:
            scores = torch.einsum("bd,bnd->bn", state, self.model.cand_vec(cand_t, c_host, c_hour))
        else:
            # Factorised ranking: one state per viewer, one vector per distinct candidate, a matmul.
            uniq, inverse = torch.unique(cand_t, return_inverse=True)
            scores = torch.gather(self.model.rank_scores(state, self.model.candidate_matrix(uniq)), 1, inverse)
        probs, intent = self.model.intent(batch, cand_t, hidden=hidden, cand_host=c_host, cand_hour=c_hour)
        intent_np = apply_calibration(intent.numpy(), self.calibrator)
        mask = np.arange(width)[None, :] < counts[:, None]
        return pd.DataFrame({
            "viewer_id": np.repeat(rows["viewer_id"].astype(str).to_numpy(), counts),
            "product_id": [t for toks in cand_tokens for t in toks],
            "score": scores.numpy()[mask].astype(np.float64),
            "purchase_prob": probs.numpy()[mask].astype(np.float64),
            "intent_score": np.repeat(intent_np, counts).astype(np.float64),
        })


def build_input_example(vocab: Mapping[str, Any], n_viewers: int = 2, history: int = 4, n_candidates: int = 3,
                        n_pp_features: int = 8) -> pd.DataFrame:
    """A small, valid model input built from real vocabulary tokens (deterministic)."""
    products = [t for t, i in sorted((vocab.get("product") or {}).items(), key=lambda kv: kv[1]) if i >= 2]
    events = [t for t, i in sorted((vocab.get("event") or {}).items(), key=lambda kv: kv[1]) if i >= 2]
    hosts = [t for t, i in sorted((vocab.get("host") or {}).items(), key=lambda kv: kv[1]) if i >= 2]
    products = products or ["unknown_product"]
    events = events or ["view_product"]
    hosts = hosts or ["unknown_host"]
    rows = []
    for v in range(n_viewers):
        h = history if v % 2 == 0 else 0  # every other viewer is a cold start
        rows.append({
            "viewer_id": f"viewer_{v}",
            "hist_product": [products[(v + j) % len(products)] for j in range(h)],
            "hist_event": [events[(v + j) % len(events)] for j in range(h)],
            "hist_dwell_ms": [1000 * (j + 1) for j in range(h)],
            "hist_dt_hours": [float(h - j) * 2.5 for j in range(h)],
            "pp_features": [0.1 * (k + 1) for k in range(n_pp_features)],
            "candidates": [products[(v * 7 + j) % len(products)] for j in range(n_candidates)],
            "hist_host": [hosts[(v + j) % len(hosts)] for j in range(h)],
            "hist_hour": [(v * 5 + j) % 24 for j in range(h)],
            "cand_host": [hosts[(v * 3 + j) % len(hosts)] for j in range(n_candidates)],
            "cand_hour": [(v * 7 + j) % 24 for j in range(n_candidates)],
        })
    return pd.DataFrame(rows, columns=[*INPUT_COLUMNS, *CONTEXT_COLUMNS])


def _artifacts(artifact_dir: str, vocab_path: str, calibrator_path: str | None) -> dict[str, str]:
    arts = {
        "model": os.path.join(artifact_dir, "model.pt"),
        "model_config": os.path.join(artifact_dir, "model_config.json"),
        "vocab": vocab_path,
    }
    if calibrator_path:
        arts["calibrator"] = calibrator_path
    for name, path in arts.items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"model artifact {name!r} not found: {path}")
    return {k: os.path.abspath(v) for k, v in arts.items()}


def model_signature(input_example: pd.DataFrame, artifacts: Mapping[str, str]):
    """Signature inferred from the example and the model's own output on it."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.pyfunc import PythonModelContext
    from mlflow.types import ColSpec, Schema

    model = StreamRankPyfunc()
    ctx = PythonModelContext(artifacts=dict(artifacts), model_config=None)
    model.load_context(ctx)
    sig = infer_signature(input_example, model.predict(ctx, input_example))
    # The stream-context columns are optional: without them the model scores with no context.
    inputs = Schema([ColSpec(c.type, c.name, required=c.name not in CONTEXT_COLUMNS) for c in sig.inputs.inputs])
    return ModelSignature(inputs=inputs, outputs=sig.outputs)


def pip_requirements() -> list[str]:
    """Pinned to what produced the model; explicit so logging skips MLflow's slow import capture."""
    import pyarrow

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
        f"pyarrow=={pyarrow.__version__}",
        f"mlflow=={mlflow.__version__}",
    ]


def log_model(artifact_dir: str, vocab_path: str, input_example: pd.DataFrame | None,
              registered_model_name: str | None = None, calibrator_path: str | None = None):
    """Log the trained model in ``artifact_dir`` as an MLflow pyfunc (and register it if named).

    Uses the active run when there is one. The model is logged as code (`streamrank.pyfunc_entry`,
    nothing pickled) and the streamrank package travels in ``code_paths``, so the model loads
    anywhere MLflow and torch are installed. Returns MLflow's ModelInfo.
    """
    arts = _artifacts(artifact_dir, vocab_path, calibrator_path)
    if input_example is None:
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(arts["model_config"], encoding="utf-8") as f:
            n_pp = int(json.load(f).get("n_pp_features", 8))
        input_example = build_input_example(vocab, n_pp_features=n_pp)
    signature = model_signature(input_example, arts)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyfunc_entry.py"),
        artifacts=arts,
        signature=signature,
        input_example=input_example,
        code_paths=[os.path.dirname(os.path.abspath(__file__))],
        registered_model_name=registered_model_name,
        pip_requirements=pip_requirements(),
    )
