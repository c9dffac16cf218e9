"""Any interaction log: `import-interactions` and the leave-one-out benchmark `benchmark-loo`.

This is how the streamrank model is compared with published results on public datasets
(MovieLens, Amazon, Steam ...): the protocol of the SASRec paper (Kang & McAuley 2018).

- **import-interactions** loads a CSV of (user, item, timestamp[, event]) into the
  `datasets/interactions` table, one partition per dataset (a re-import replaces it).
  Rows without a user or item, or with a timestamp that does not parse, are rejected -
  counted per reason, printed, and kept with their line number in
  `<warehouse>/datasets_rejects/<NAME>.csv` - so rows in = rows imported + rows rejected.
- **benchmark-loo**: per user, interactions sorted by (ts, line in the file); the last is
  the test item, the second-last the validation item, the rest train; users with fewer
  than 3 interactions are skipped. Each user gets 100 (``--negatives``) items they never
  interacted with, sampled with ``--seed``, for the test ranking (and a second, independent
  set for validation). The rows are written in the gold/training_examples Parquet layout
  so the SAME training code (train_worker: Petastorm -> torch -> early stopping on
  validation NDCG@k, candidates protocol = the validation negatives) trains the SAME model;
  then the test item is ranked against its negatives (sampled NDCG@k, HR@k) and against the
  whole catalogue minus the user's history (``ndcg@k_full``).

What the benchmark rows contain (the log has no streams, categories or dwell): products are
items mapped to ids >= 2 (sorted tokens); category and event are constants (2); dwell is
bucket 1; ``hist_dt`` is the real time gap, hours between each history event and the
predicted interaction; purchase-power features are 0 and the intent heads are switched off
(``intent_weight = cand_weight = cand_rank_weight = 0``): only the ranking head is benchmarked,
with the sampled-softmax loss of the paper; there is no stream context (no host vocabulary).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamrank import metrics as M
from streamrank.context import Context, stage_run
from streamrank.errors import MissingInputError, UsageError

INTERACTIONS = "datasets/interactions"
TRAINING_LAYOUT = "gold/training_examples"
PAD_ID, UNK_ID, FIRST_ID = 0, 1, 2
CATEGORY_ID, EVENT_ID, DWELL_BUCKET = 2, 2, 1
N_PP = 8
ROW_GROUP = 512  # rows per Parquet row group: Petastorm shuffles row groups, so keep them small
REJECT_REASONS = ("malformed_row", "missing_user", "missing_item", "bad_ts")


# ----------------------------------------------------------------------------- import

@dataclass
class ImportResult:
    """What an import did: rows read, imported and rejected (per reason), where rejects went."""

    dataset: str
    rows_read: int
    rows_imported: int
    rejected: dict[str, int]
    reject_file: str | None
    table_version: int | None

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())


def parse_timestamps(values: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Parse raw timestamp texts: (int64 microseconds since the epoch UTC, parsed-ok mask).

    Accepted: epoch numbers and ISO 8601 texts. An epoch's unit is decided per value by its
    magnitude (|x| < 1e11: seconds, < 1e14: milliseconds, else microseconds), which covers
    1973..5138 in seconds and the common millisecond logs. ISO texts without an offset are
    taken as UTC. Empty, missing and unparseable values have ok = False.
    """
    import pandas as pd

    raw = pd.Series(list(values), dtype="object")
    text = raw.where(raw.notna(), "").astype(str).str.strip()
    out = np.zeros(len(text), dtype=np.int64)
    ok = np.zeros(len(text), dtype=bool)
    num = pd.to_numeric(text.where(text != ""), errors="coerce").to_numpy(dtype=np.float64)
    is_num = np.isfinite(num)
    scale = np.where(np.abs(num) < 1e11, 1e6, np.where(np.abs(num) < 1e14, 1e3, 1.0))
    us = np.where(is_num, num * scale, 0.0)
    good_num = is_num & (np.abs(us) < 9.2e18)
    out[good_num] = np.round(us[good_num]).astype(np.int64)
    ok |= good_num
    rest = ~is_num & (text != "").to_numpy()
    if rest.any():
        parsed = pd.to_datetime(text[rest], utc=True, errors="coerce", format="ISO8601")
        good = parsed.notna().to_numpy()
        idx = np.flatnonzero(rest)[good]
        out[idx] = parsed[good].dt.as_unit("us").astype("int64").to_numpy()
        ok[idx] = True
    return out, ok


def read_interactions_csv(path: Path, user_col: str, item_col: str, ts_col: str, event_col: str | None,
                          sep: str = ",") -> tuple[dict[str, list[Any]], list[tuple[int, str, list[str]]], int]:
    """Stream a CSV into columns; return (good columns, rejects (line, reason, fields), rows read).

    Python's csv module keeps exact line numbers (pyarrow's parallel reader cannot say which
    line a row came from), and every row is either kept or rejected with its line: the
    reject file points at the exact text to fix.
    """
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=sep)
        header = next(reader, None)
        if header is None:
            raise UsageError(f"--input {path}: the file is empty (a header line naming the columns is needed)")
        header = [h.strip() for h in header]
        wanted = {"--user-col": user_col, "--item-col": item_col, "--ts-col": ts_col}
        if event_col:
            wanted["--event-col"] = event_col
        missing = [f"{flag} {name!r}" for flag, name in wanted.items() if name not in header]
        if missing:
            raise UsageError(f"--input {path}: no column {', '.join(missing)}; the header has {header}")
        iu, ii, it = header.index(user_col), header.index(item_col), header.index(ts_col)
        ie = header.index(event_col) if event_col else None
        cols: dict[str, list[Any]] = {"user_id": [], "item_id": [], "ts_raw": [], "event": [], "line_number": []}
        rejects: list[tuple[int, str, list[str]]] = []
        rows = 0
        line = reader.line_num
        for fields in reader:
            start, line = line + 1, reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line: not a row
            rows += 1
            if len(fields) != len(header):
                rejects.append((start, "malformed_row", fields))
                continue
            user, item = fields[iu].strip(), fields[ii].strip()
            if not user:
                rejects.append((start, "missing_user", fields))
                continue
            if not item:
                rejects.append((start, "missing_item", fields))
                continue
            cols["user_id"].append(user)
            cols["item_id"].append(item)
            cols["ts_raw"].append(fields[it])
            cols["event"].append(fields[ie].strip() or None if ie is not None else None)
            cols["line_number"].append(start)
    return cols, rejects, rows


def import_interactions(ctx: Context, input_path: str | os.PathLike[str], dataset: str, user_col: str = "user_id",
                        item_col: str = "item_id", ts_col: str = "timestamp", event_col: str | None = None,
                        sep: str = ",") -> ImportResult:
    """Load a CSV into datasets/interactions (partition dataset = NAME, replaced on re-import)."""
    path = Path(input_path).expanduser().resolve()
    if not dataset or any(c in dataset for c in "/\\ ") or dataset.startswith("."):
        raise UsageError(f"--dataset {dataset!r}: use a plain name (letters, digits, - and _)")
    if not path.is_file():
        raise MissingInputError(f"--input {path}: no such file")
    with stage_run(ctx, "import-interactions", dt.datetime.now(dt.UTC).date()) as run:
        cols, rejects, rows_read = read_interactions_csv(path, user_col, item_col, ts_col, event_col, sep)
        ts, ok = parse_timestamps(cols["ts_raw"])
        for i in np.flatnonzero(~ok):
            rejects.append((cols["line_number"][i], "bad_ts", [cols["user_id"][i], cols["item_id"][i], str(cols["ts_raw"][i])]))
        rejects.sort(key=lambda r: r[0])
        counts = {r: 0 for r in REJECT_REASONS}
        for _, reason, _ in rejects:
            counts[reason] += 1
        reject_file = None
        reject_dir = ctx.cfg.warehouse / "datasets_rejects"
        target = reject_dir / f"{dataset}.csv"
        if rejects:
            reject_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["line_number", "reason", "fields"])
                for line, reason, fields in rejects:
                    w.writerow([line, reason, sep.join(fields)])
            os.replace(tmp, target)
            reject_file = str(target)
        elif target.exists():
            target.unlink()  # a clean re-import must not leave the previous import's rejects behind

        keep = np.flatnonzero(ok)
        table = pa.table({
            "user_id": pa.array([cols["user_id"][i] for i in keep], pa.string()),
            "item_id": pa.array([cols["item_id"][i] for i in keep], pa.string()),
            "ts": pa.array(ts[keep], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "event": pa.array([cols["event"][i] for i in keep], pa.string()),
            "source_file": pa.array([str(path)] * keep.size, pa.string()),
            "line_number": pa.array([cols["line_number"][i] for i in keep], pa.int64()),
        })
        version = _replace_partition(ctx, dataset, table, run_id=ctx.run_id)
        run.wrote(INTERACTIONS, version)
        imported = int(keep.size)
        run.metrics.update({"dataset": dataset, "rows_read": rows_read, "imported": imported,
                            "rejected": sum(counts.values()), **{f"rejected_{k}": v for k, v in counts.items() if v}})
        reasons = " ".join(f"{k}={v}" for k, v in counts.items() if v) or "none"
        run.message = f"{dataset}: {rows_read} rows read, {imported} imported, {sum(counts.values())} rejected ({reasons})" + (
            f"; rejects in {reject_file}" if reject_file else "")
        print(f"[import-interactions] {run.message}")
        return ImportResult(dataset, rows_read, imported, counts, reject_file, version)


def _replace_partition(ctx: Context, dataset: str, table: pa.Table, run_id: str) -> int | None:
    """Write the rows as Parquet, let Spark read them and replace the dataset's partition in one commit."""
    from pyspark.sql import functions as F

    from streamrank.schemas import table_spec

    spec = table_spec(INTERACTIONS)
    ctx.cfg.warehouse.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"import-{dataset}-", dir=ctx.cfg.warehouse))
    try:
        pq.write_table(table, tmp / "part-0.parquet")
        df = ctx.spark.read.parquet(str(tmp)).withColumn("dataset", F.lit(dataset))
        df = df.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in spec.schema.fields])
        res = ctx.table(INTERACTIONS).overwrite(df, where={"dataset": dataset},
                                                commit_info={"stage": "import-interactions", "run_id": run_id})
        return res.version
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the LOO split

@dataclass
class LooSplit:
    """Leave-one-out split over users with >= 3 interactions, items as ids >= 2.

    ``train[u]`` are the item ids before the last two (chronological), ``valid[u]`` the
    second-last, ``test[u]`` the last; ``times[u]`` the interaction times (µs) in the same
    order (train..., valid, test). ``items`` maps item token -> id.
    """

    users: list[str]
    train: list[np.ndarray]
    valid: np.ndarray
    test: np.ndarray
    times: list[np.ndarray]
    items: dict[str, int]
    skipped_users: int

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_ids(self) -> int:
        """Size of the id space: padding 0, unknown 1, items 2..n_items+1."""
        return self.n_items + FIRST_ID


def loo_split(user_ids: Sequence[str], item_ids: Sequence[str], ts_us: Sequence[int],
              order: Sequence[int] | None = None) -> LooSplit:
    """Per user sort by (ts, order) - order is the file line, so equal timestamps keep file
    order - then last = test, second-last = valid, rest = train; users with < 3 are skipped.

    Items are numbered from 2 in sorted token order over the kept users' interactions (an
    item only skipped users touched can never be trained or ranked, so it is not an item).
    """
    users = np.asarray(user_ids, dtype=object)
    items = np.asarray(item_ids, dtype=object)
    ts = np.asarray(ts_us, dtype=np.int64)
    tie = np.asarray(order if order is not None else np.arange(len(users)), dtype=np.int64)
    if not (len(users) == len(items) == len(ts) == len(tie)):
        raise ValueError("user_ids, item_ids, ts_us and order must have the same length")
    idx = np.lexsort((tie, ts, users.astype(str)))
    users, items, ts = users[idx], items[idx], ts[idx]
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True]) if len(users) else np.array([0])
    kept: list[tuple[str, np.ndarray, np.ndarray]] = []
    skipped = 0
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b - a < 3:
            skipped += 1
            continue
        kept.append((str(users[a]), items[a:b], ts[a:b]))
    vocab = {tok: i + FIRST_ID for i, tok in enumerate(sorted({str(t) for _, its, _ in kept for t in its}))}
    train, valid, test, times = [], [], [], []
    for _, its, tss in kept:
        ids = np.array([vocab[str(t)] for t in its], dtype=np.int64)
        train.append(ids[:-2])
        valid.append(ids[-2])
        test.append(ids[-1])
        times.append(tss)
    return LooSplit([u for u, _, _ in kept], train, np.array(valid, dtype=np.int64), np.array(test, dtype=np.int64),
                    times, vocab, skipped)


def sample_negatives(split: LooSplit, n: int, rng: np.random.Generator) -> np.ndarray:
    """[U, n] item ids each user never interacted with (train, valid or test), uniform, no repeats.

    Users are visited in split order, so the draw depends only on the dataset and the seed.
    A user who touched almost every item gets all the items they did not touch, padded with 0
    (padding is never a competitor).
    """
    out = np.zeros((len(split.users), n), dtype=np.int64)
    lo, hi = FIRST_ID, split.n_ids
    for u in range(len(split.users)):
        seen = set(split.train[u].tolist()) | {int(split.valid[u]), int(split.test[u])}
        free = split.n_items - len(seen)
        if free <= n:
            pool = np.array([i for i in range(lo, hi) if i not in seen], dtype=np.int64)
            out[u, : pool.size] = rng.permutation(pool)
            continue
        chosen: list[int] = []
        taken: set[int] = set()
        while len(chosen) < n:
            for c in rng.integers(lo, hi, size=2 * (n - len(chosen))).tolist():
                if c not in seen and c not in taken:
                    taken.add(c)
                    chosen.append(c)
                    if len(chosen) == n:
                        break
        out[u] = chosen
    return out


# ----------------------------------------------------------------------------- training rows

def _history(ids: np.ndarray, times: np.ndarray, at_us: int, seq_len: int) -> dict[str, Any]:
    """Left-padded history arrays of the last seq_len items before a prediction at `at_us`."""
    ids = ids[-seq_len:] if seq_len else ids[:0]
    times = times[-len(ids):] if len(ids) else times[:0]
    n = len(ids)
    pad = seq_len - n
    hours = np.maximum(0.0, (at_us - times) / 3.6e9).astype(np.float32)
    return {
        "hist_product": [0] * pad + ids.astype(int).tolist(),
        "hist_category": [0] * pad + [CATEGORY_ID] * n,
        "hist_event": [0] * pad + [EVENT_ID] * n,
        "hist_dwell": [0] * pad + [DWELL_BUCKET] * n,
        "hist_dt": [0.0] * pad + hours.tolist(),
        "hist_len": n,
        "hist_host": [0] * seq_len,  # no streams in an interaction log: no context (the model has n_hosts 0)
        "hist_hour": [0] * seq_len,
    }


def example_rows(split: LooSplit, valid_negatives: np.ndarray, seq_len: int) -> list[dict[str, Any]]:
    """gold/training_examples-layout rows: one 'train' and one 'valid' row per user.

    train: history = train items but the last, target = the last train item (the model's
    sequence loss also trains every earlier position, as SASRec does); valid: history = all
    train items, target = the valid item, cand_products = the validation negatives, so the
    worker's candidates protocol IS the sampled protocol for early stopping.
    """
    n_neg = valid_negatives.shape[1]
    rows = []
    for u, user in enumerate(split.users):
        tr, t = split.train[u], split.times[u]
        for kind in ("train", "valid"):
            if kind == "train":
                hist_ids, hist_t, target, at = tr[:-1], t[: len(tr) - 1], int(tr[-1]), int(t[len(tr) - 1])
                cands = [0] * n_neg
            else:
                hist_ids, hist_t, target, at = tr, t[: len(tr)], int(split.valid[u]), int(t[len(tr)])
                cands = valid_negatives[u].astype(int).tolist()
            rows.append({
                "viewer_id": user, "cutoff_ts": dt.datetime.fromtimestamp(at / 1e6, dt.UTC),
                **_history(hist_ids, hist_t, at, seq_len),
                "pp_features": [0.0] * N_PP, "target_product": target, "target_products": [target],
                "cand_products": cands, "cand_host": [0] * len(cands), "cand_hour": [0] * len(cands),
                "label_purchase": 0, "split": kind,
            })
    return rows


def write_rows(rows: list[dict[str, Any]], out_dir: Path, rows_per_file: int = 50_000, seed: int = 0) -> list[str]:
    """Write rows as Parquet files with gold/training_examples' column types (no partition column).

    Rows are shuffled once (seeded) before writing so row groups mix users; Petastorm then
    shuffles row groups and rows per epoch.
    """
    from streamrank.delta import arrow_schema
    from streamrank.schemas import table_spec

    spec = table_spec(TRAINING_LAYOUT)
    schema = arrow_schema(spec.schema)
    schema = pa.schema([f for f in schema if f.name not in spec.partition_by])
    order = np.random.default_rng(seed).permutation(len(rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for fi, start in enumerate(range(0, len(rows), rows_per_file)):
        chunk = [rows[i] for i in order[start:start + rows_per_file]]
        table = pa.Table.from_pylist(chunk, schema=schema)
        path = out_dir / f"part-{fi:05d}.parquet"
        pq.write_table(table, path, row_group_size=ROW_GROUP)
        files.append("file://" + str(path))
    return files


def write_vocab(split: LooSplit, path: Path) -> Path:
    """vocab.json for the model: item ids, one category, one event type."""
    doc = {
        "product": {"<pad>": PAD_ID, "<unk>": UNK_ID, **split.items},
        "category": {"<pad>": 0, "<unk>": 1, "item": CATEGORY_ID},
        "event": {"<pad>": 0, "<unk>": 1, "interaction": EVENT_ID},
        "product_category": [0, 1] + [CATEGORY_ID] * split.n_items,
    }
    path.write_text(json.dumps(doc))
    return path


# ----------------------------------------------------------------------------- test metrics

Scorer = Callable[[dict[str, np.ndarray], np.ndarray], np.ndarray]


def test_batches(split: LooSplit, seq_len: int) -> dict[str, np.ndarray]:
    """Model inputs for the test predictions: history = train + valid items, at the test time."""
    rows = []
    for u in range(len(split.users)):
        ids = np.r_[split.train[u], split.valid[u]]
        t = split.times[u]
        rows.append(_history(ids, t[:-1], int(t[-1]), seq_len))
    return {
        "hist_product": np.array([r["hist_product"] for r in rows], dtype=np.int64).reshape(len(rows), seq_len),
        "hist_category": np.array([r["hist_category"] for r in rows], dtype=np.int64).reshape(len(rows), seq_len),
        "hist_event": np.array([r["hist_event"] for r in rows], dtype=np.int64).reshape(len(rows), seq_len),
        "hist_dwell": np.array([r["hist_dwell"] for r in rows], dtype=np.int64).reshape(len(rows), seq_len),
        "hist_dt": np.array([r["hist_dt"] for r in rows], dtype=np.float32).reshape(len(rows), seq_len),
        "hist_len": np.array([r["hist_len"] for r in rows], dtype=np.int64),
        "pp_features": np.zeros((len(rows), N_PP), dtype=np.float32),
    }


def loo_metrics(split: LooSplit, negatives: np.ndarray, scorer: Scorer, k: int, seq_len: int,
                batch_size: int = 1024) -> dict[str, float | None]:
    """Sampled and full-ranking test metrics of a scorer.

    ``scorer(batch, item_ids[B, N]) -> scores[B, N]``. Sampled: the test item against the
    user's negatives (padding ignored); full: against every item except the test item and the
    items already in the user's history (train + valid), the usual "filtered" full ranking.
    Ties count against the test item (metrics.ranks_from_scores).
    """
    inputs = test_batches(split, seq_len)
    all_ids = np.arange(FIRST_ID, split.n_ids, dtype=np.int64)
    sampled, full = [], []
    for s in range(0, len(split.users), batch_size):
        sl = slice(s, s + batch_size)
        b = {key: v[sl] for key, v in inputs.items()}
        tgt = split.test[sl]
        neg = negatives[sl]
        cand = np.concatenate([tgt[:, None], neg], axis=1)
        sc = scorer(b, cand)
        sampled.append(M.ranks_from_scores(sc[:, 0], sc[:, 1:], neg >= FIRST_ID))
        fs = scorer(b, np.broadcast_to(all_ids, (len(tgt), all_ids.size)))
        mask = np.ones(fs.shape, dtype=bool)
        for row, u in enumerate(range(sl.start, min(sl.stop, len(split.users)))):
            seen = np.r_[split.train[u], split.valid[u], split.test[u]] - FIRST_ID
            mask[row, seen] = False
        t_scores = np.take_along_axis(fs, (tgt - FIRST_ID)[:, None], axis=1)[:, 0]
        full.append(M.ranks_from_scores(t_scores, fs, mask))
    sr = np.concatenate(sampled) if sampled else np.zeros(0, np.int64)
    fr = np.concatenate(full) if full else np.zeros(0, np.int64)
    return {f"ndcg@{k}": M.ndcg_at_k(sr, k), f"hr@{k}": M.hit_rate_at_k(sr, k), f"ndcg@{k}_full": M.ndcg_at_k(fr, k),
            f"hr@{k}_full": M.hit_rate_at_k(fr, k), "mrr": M.mrr(sr)}


def model_scorer(net: Any, device: str) -> Scorer:
    """Scores from the trained model: viewer state . item vector (the ranking head)."""
    import torch

    from streamrank.model import batch_to_tensors

    def score(batch: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            b = batch_to_tensors(batch, device)
            state = net.viewer_state(b).float()
            uniq, inverse = np.unique(ids, return_inverse=True)
            vecs = net.candidate_matrix(torch.as_tensor(uniq, device=device)).float()
            scores = net.rank_scores(state, vecs).cpu().numpy()
            return np.take_along_axis(scores, inverse.reshape(ids.shape), axis=1)

    return score


# ----------------------------------------------------------------------------- the benchmark

def read_dataset(ctx: Context, dataset: str) -> pa.Table:
    """The dataset's partition of datasets/interactions (pyarrow, from the snapshot's files)."""
    table = ctx.table(INTERACTIONS)
    version = table.version()
    files = table.files(version, partitions={"dataset": dataset}) if version is not None else []
    pieces = [pq.read_table(f.removeprefix("file://"), columns=["user_id", "item_id", "ts", "line_number"]) for f in files]
    if not pieces or sum(p.num_rows for p in pieces) == 0:
        raise MissingInputError(f"{INTERACTIONS} has no dataset {dataset!r}; run `streamrank import-interactions "
                                f"--input F.csv --dataset {dataset}` first")
    return pa.concat_tables(pieces)


def _device(choice: str | None) -> str:
    import torch

    choice = (choice or "auto").lower()
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice not in ("cpu", "cuda"):
        raise UsageError(f"--device {choice!r}: expected cpu, cuda or auto")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine")
    return choice


def benchmark_loo(ctx: Context, dataset: str, negatives: int = 100, k: int = 10, epochs: int = 200,
                  device: str | None = "auto", seed: int = 42, patience: int = 10, seq_len: int | None = None,
                  batch_size: int | None = None) -> dict[str, Any]:
    """Run the SASRec leave-one-out protocol on an imported dataset; return the result line."""
    from streamrank.model import load_model
    from streamrank.train_worker import run_training

    t0 = time.perf_counter()
    if negatives < 1 or k < 1 or epochs < 1 or patience < 1:
        raise UsageError("benchmark-loo: --negatives, --k, --epochs and --patience must be >= 1")
    dev = _device(device)
    seq_len = int(seq_len or ctx.cfg["features.seq_len"])
    data = read_dataset(ctx, dataset)
    ts = data.column("ts").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy(zero_copy_only=False)
    split = loo_split(data.column("user_id").to_pylist(), data.column("item_id").to_pylist(), ts,
                      data.column("line_number").to_numpy(zero_copy_only=False))
    if not split.users:
        raise MissingInputError(f"dataset {dataset!r}: no user has 3 or more interactions")
    rng = np.random.default_rng(seed)
    test_neg = sample_negatives(split, negatives, rng)  # first: the test set depends on seed and data only
    valid_neg = sample_negatives(split, negatives, rng)

    work = Path(tempfile.mkdtemp(prefix=f"loo-{dataset}-", dir=ctx.cfg.warehouse))
    try:
        files = write_rows(example_rows(split, valid_neg, seq_len), work / "examples", seed=seed)
        vocab_path = write_vocab(split, work / "vocab.json")
        conf = ctx.cfg.to_dict()
        conf["model"] = {**conf["model"], "seq_len": seq_len, "vocab_path": str(vocab_path),
                         "intent_weight": 0.0, "cand_weight": 0.0,
                         "cand_rank_weight": 0.0}
        conf["train"] = {**conf["train"], "max_epochs": int(epochs), "patience": int(patience), "seed": int(seed),
                         "eval_protocol": "candidates", "eval_k": int(k), "progress": False,
                         **({"batch_size": int(batch_size)} if batch_size else {})}
        metrics = run_training(files, conf, str(work / "out"), 1, dev == "cuda")
        with open(work / "out" / "model_config.json", encoding="utf-8") as fh:
            net = load_model(str(work / "out" / "model.pt"), json.load(fh), map_location=dev).to(dev).eval()
        result = loo_metrics(split, test_neg, model_scorer(net, dev), k, seq_len)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    line = {
        "dataset": dataset, "users": len(split.users), "items": split.n_items, "epochs": len(metrics["epochs"]),
        f"ndcg@{k}": _round(result[f"ndcg@{k}"]), f"hr@{k}": _round(result[f"hr@{k}"]),
        f"ndcg@{k}_full": _round(result[f"ndcg@{k}_full"]), "seconds": round(time.perf_counter() - t0, 1),
        "best_epoch": metrics["best_epoch"], f"valid_ndcg@{k}": _round(metrics.get(f"ndcg_at_{k}")),
        "negatives": negatives, "seed": seed, "device": dev, "skipped_users": split.skipped_users,
    }
    reports = ctx.cfg.reports
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"benchmark_loo_{dataset}.json").write_text(json.dumps(line, indent=2))
    return line


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


# ----------------------------------------------------------------------------- CLI entry points

def run_import(ctx: Context, args: argparse.Namespace) -> int:
    """`streamrank import-interactions --input F.csv --dataset NAME [--user-col --item-col --ts-col --event-col]`."""
    import_interactions(ctx, args.input, args.dataset, args.user_col, args.item_col, args.ts_col,
                        getattr(args, "event_col", None), getattr(args, "sep", ","))
    return 0


def run_benchmark(ctx: Context, args: argparse.Namespace) -> int:
    """`streamrank benchmark-loo --dataset NAME [...]`: prints ONE JSON line on stdout."""
    line = benchmark_loo(ctx, args.dataset, negatives=args.negatives, k=args.k, epochs=args.epochs, device=args.device,
                         seed=args.seed, patience=args.patience)
    print(json.dumps(line), flush=True)
    return 0
