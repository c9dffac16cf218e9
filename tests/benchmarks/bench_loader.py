"""Training data path: Petastorm loader vs plain pyarrow, and loader rate vs model step rate.

Data: synthetic gold/training_examples rows (L=50 history, 32 candidates, 10 targets, 8
purchase-power features, train and valid rows mixed in every file as the features stage writes
them), generated with numpy, then written by Spark (`repartition(n).write.parquet`) so the files,
row groups and list encoding are what production reads.

* ``loader``: seconds per epoch over every row, into per-column torch tensors of ``batch_size``
  rows - Petastorm ``make_batch_reader`` + ``BatchedDataLoader`` (train_worker.make_loader) vs
  ``pq.read_table`` -> numpy -> ``torch.from_numpy`` -> slices, on the same files and columns.
  ratio = pyarrow_s / petastorm_s (Petastorm's rate as a fraction of pyarrow's); target >= 0.7.
* ``train_step``: the train split as training reads it (split filter, shuffle, shuffle buffer)
  vs forward + backward + AdamW of the default model conf on CPU (GPU where present) for the
  same number of rows; ratio = loader rate / step rate; target >= 3 (the loader is not the
  bottleneck).

Each figure is the median of repetitions, both sides interleaved in one run: 5 for
``loader``, whose epoch takes about a second, so that one disturbed pass cannot move it
(with 3, one full run read 0.72 and a standalone run right after it 1.03), and 3 for
``train_step``.
"""

from __future__ import annotations

import datetime as dt
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamrank.config import Config
from streamrank.train_worker import measure_loader_vs_step, measure_petastorm_vs_pyarrow

L, C, T, P = 50, 32, 10, 8
VOCAB = {"n_products": 5402, "n_categories": 18, "n_event_types": 12, "n_hosts": 52}  # about scale 1's catalogue
AS_OF = dt.date(2026, 11, 7)
LOADER_REPEATS = 5


def _list(a: np.ndarray) -> pa.Array:
    """A [rows, width] array as an Arrow list column (Spark's array<int>/array<float>)."""
    flat = pa.array(a.ravel())
    offsets = pa.array(np.arange(0, a.size + 1, a.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def synthetic_examples(rows: int, seed: int = 0) -> pa.Table:
    """Training examples with the gold/training_examples columns and realistic padding."""
    rng = np.random.default_rng(seed)
    n_prod, n_cat, n_ev = VOCAB["n_products"], VOCAB["n_categories"], VOCAB["n_event_types"]
    hist_len = np.minimum(rng.geometric(1 / 18, rows), L).astype(np.int32)
    valid = np.arange(L)[None, :] >= (L - hist_len)[:, None]  # left padded, latest event last
    popular = (rng.zipf(1.3, (rows, L)) % (n_prod - 2) + 2).astype(np.int32)
    prod = np.where(valid, popular, 0).astype(np.int32)
    dt_h = np.sort(rng.exponential(40.0, (rows, L)), axis=1)[:, ::-1]
    n_cand = rng.integers(8, C + 1, rows)
    cands = np.where(np.arange(C)[None, :] < n_cand[:, None], rng.integers(2, n_prod, (rows, C)), 0)
    n_tgt = np.minimum(rng.poisson(0.4, rows), T)
    tgts = np.where(np.arange(T)[None, :] < n_tgt[:, None], rng.integers(2, n_prod, (rows, T)), 0)
    cut = dt.datetime.combine(AS_OF, dt.time(23, 59, 59))
    return pa.table({
        "viewer_id": pa.array([f"v{i:08d}" for i in rng.permutation(rows)]),
        "cutoff_ts": pa.array(np.full(rows, np.datetime64(cut, "us"))),
        "hist_product": _list(prod),
        "hist_category": _list(np.where(valid, prod % (n_cat - 2) + 2, 0).astype(np.int32)),
        "hist_event": _list(np.where(valid, rng.integers(2, n_ev, (rows, L)), 0).astype(np.int32)),
        "hist_dwell": _list(np.where(valid, rng.integers(1, 16, (rows, L)), 0).astype(np.int32)),
        "hist_dt": _list(np.where(valid, dt_h, 0.0).astype(np.float32)),
        "hist_len": hist_len,
        "pp_features": _list(rng.random((rows, P)).astype(np.float32)),
        "target_product": tgts[:, 0].astype(np.int32),
        "target_products": _list(tgts.astype(np.int32)),
        "cand_products": _list(cands.astype(np.int32)),
        "hist_host": _list(np.where(valid, rng.integers(2, VOCAB["n_hosts"], (rows, L)), 0).astype(np.int32)),
        "hist_hour": _list(np.where(valid, rng.integers(2, 26, (rows, L)), 0).astype(np.int32)),
        "cand_host": _list(np.where(cands > 0, rng.integers(2, VOCAB["n_hosts"], (rows, C)), 0).astype(np.int32)),
        "cand_hour": _list(np.where(cands > 0, rng.integers(2, 26, (rows, C)), 0).astype(np.int32)),
        "label_purchase": (n_tgt > 0).astype(np.int32),
        "split": np.where(rng.random(rows) < 0.8, "train", "valid"),
    })


def write_examples(spark, workdir: Path, rows: int, n_files: int) -> list[str]:
    """Parquet files in the gold/training_examples layout, written by Spark (pyarrow without one)."""
    table = synthetic_examples(rows)
    out = workdir / "training_examples" / f"as_of_date={AS_OF}"
    shutil.rmtree(out.parent, ignore_errors=True)
    if spark is None:
        out.mkdir(parents=True)
        step = -(-rows // n_files)
        for i in range(n_files):
            pq.write_table(table.slice(i * step, step), out / f"part-{i:05d}.parquet")
    else:
        staging = workdir / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        step = -(-rows // 4)
        for i in range(4):
            pq.write_table(table.slice(i * step, step), staging / f"part-{i}.parquet")
        spark.read.parquet(str(staging)).repartition(n_files).write.mode("overwrite").parquet(str(out))
        shutil.rmtree(staging, ignore_errors=True)
    return sorted("file://" + str(p) for p in out.glob("*.parquet"))


def run(spark, cfg: Config, workdir: Path, quick: bool) -> list[dict]:
    rows = 50_000 if quick else 200_000
    files = write_examples(spark, workdir, rows, n_files=4)
    conf = cfg.to_dict()
    conf["model"] = {**(conf.get("model") or {}), **VOCAB}
    row_groups = sum(pq.ParquetFile(f.removeprefix("file://")).num_row_groups for f in files)

    cmp = measure_petastorm_vs_pyarrow(files, conf, repeats=LOADER_REPEATS)
    bs = cmp["batch_size"]

    step_batches = 3 if quick else 8
    runs = [measure_loader_vs_step(files, conf, max_batches=None, step_batches=step_batches) for _ in range(3)]
    loader_rps = statistics.median(r["loader_rows_per_s"] for r in runs)
    step_rps = statistics.median(r["step_rows_per_s"] for r in runs)
    n = runs[0]["loader_rows"]
    device = runs[0]["device"]
    return [
        {"name": "loader", "ours_s": cmp["petastorm_s"],
         "reference": f"pyarrow -> torch tensors ({cmp['rows']} rows, {len(files)} Spark files, "
                      f"{row_groups} row groups, batch {bs})",
         "reference_s": cmp["pyarrow_s"], "ratio": cmp["petastorm_to_pyarrow_ratio"], "target": 0.7,
         "ok": cmp["petastorm_to_pyarrow_ratio"] >= 0.7},
        {"name": "train_step", "ours_s": n / loader_rps,
         "reference": f"model forward+backward on the same {n} rows ({device}, default model conf, "
                      f"step rate of {step_batches} batches of {bs})",
         "reference_s": n / step_rps, "ratio": loader_rps / step_rps, "target": 3,
         "ok": loader_rps / step_rps >= 3},
    ]


if __name__ == "__main__":
    from benchmarks_common import standalone

    sys.exit(standalone(run))
