"""Training worker: Parquet files of gold/training_examples -> Petastorm -> PyTorch -> model.pt.

``train_worker`` needs only file URIs and a plain conf dict (no SparkSession), so the same
function runs in-process or inside TorchDistributor's torchrun children. Under
``torch.distributed`` (RANK/WORLD_SIZE set) it wraps the model in DDP (gloo on CPU, nccl on
GPU), shards row groups by rank, and only rank 0 writes outputs.

Data path. One Petastorm ``make_batch_reader`` per split and epoch (``num_epochs=1``): a fresh
reader per epoch gives a new seeded row-group order (``seed + epoch``) and a clean end of epoch
without counting steps. The reader threads read and decode row groups; ``ColumnarBatches``
(installed as the reader's results-queue reader) keeps each row group columnar - fixed-length
list columns become ``[rows, width]`` numpy views of the Arrow buffers, the ``split`` filter is a
mask on the Arrow column, rows are shuffled with one seeded gather (``shuffle_buffer`` rows carried
into the next row group) - and ``petastorm.pytorch.BatchedDataLoader`` cuts the torch batches.
Files whose footer statistics show only the other split are not opened at all. No pandas on the
way: Petastorm's own conversion (per-row object arrays + ``np.vstack``) and a pandas
``TransformSpec`` cost 3-4x the Parquet decoding (see ``ColumnarBatches``).
Shards can hold different numbers of batches, so every step starts with an all-reduce of
"do all ranks still have a batch?" and all ranks stop together.

Determinism. With ``train.deterministic`` (default: on for CPU) the reader uses one worker
thread, so row groups arrive in the seeded order, torch is seeded, and
``use_deterministic_algorithms`` is on (warn-only). Two runs with the same seed and files then
produce identical weights and metrics on CPU.

Validation metric (early stopping). ``train.eval_protocol``:

* ``candidates`` (default) - rank ``target_product`` against the row's own ``cand_products``
  (tomorrow's schedule products for this viewer, the situation scoring faces);
* ``sampled`` - against ``train.eval_negatives`` (100) uniform products drawn with a fixed seed;
* ``full`` - against the whole catalogue.

Ties count against the target (pessimistic), so a collapsed model cannot score well. Rows with
``target_product == 0`` count only for intent metrics.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from streamrank.model import (
    FIRST_REAL_ID,
    ModelConfig,
    StreamRankModel,
    batch_to_tensors,
    fit_platt,
)

FEATURE_COLUMNS = (
    "hist_product", "hist_category", "hist_event", "hist_dwell", "hist_dt", "hist_len", "hist_host", "hist_hour",
    "pp_features", "target_product", "target_products", "cand_products", "cand_host", "cand_hour", "label_purchase",
)

TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 512,
    "lr": 3e-4,
    "weight_decay": 0.01,
    "max_epochs": 10,
    "patience": 2,
    "seed": 7,
    "num_processes": 1,
    "use_gpu": "auto",
    "amp": True,
    "grad_clip": 1.0,
    "reader_workers": 2,
    "deterministic": None,  # None = on for CPU, off for CUDA
    "shuffle_buffer": 4096,  # rows held back and mixed into the next row group; 0: shuffle within row groups only
    "eval_protocol": "candidates",
    "eval_negatives": 100,
    "eval_k": 10,
    "max_steps_per_epoch": None,
    "inject_nan_at_step": None,
    "progress": True,
    "cpu_threads": None,  # torch intra-op threads on CPU; None = torch default (all cores)
}
MODEL_DEFAULTS: dict[str, Any] = {
    "seq_len": 50, "d_model": 64, "n_heads": 2, "n_layers": 2, "dropout": 0.1, "num_negatives": 100,
}


class NonFiniteLossError(RuntimeError):
    """Training loss became NaN/inf: training stops at once and nothing is written."""

    def __init__(self, step: int, epoch: int, value: float | None = None):
        self.step = int(step)
        self.epoch = int(epoch)
        self.value = value
        super().__init__(f"NonFiniteLossError: non-finite training loss ({value}) at step={step} epoch={epoch}")

    def __reduce__(self):  # keep (step, epoch) across pickling (TorchDistributor, multiprocessing)
        return (type(self), (self.step, self.epoch, self.value))


# ----------------------------------------------------------------------------- conf helpers
def conf_get(conf: Mapping[str, Any] | None, key: str, default: Any = None) -> Any:
    """Read ``section.name`` from a nested conf dict, or from a flat dict with dotted keys."""
    if not conf:
        return default
    if key in conf:
        return conf[key]
    node: Any = conf
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def plain_conf(conf: Any) -> dict[str, Any]:
    """Accept a streamrank Config (anything with ``to_dict``) or a mapping; return a plain dict."""
    if conf is None:
        return {}
    if hasattr(conf, "to_dict"):
        conf = conf.to_dict()
    return dict(conf)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op threads (None: leave as is)."""
    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def train_conf(conf: Mapping[str, Any] | None) -> dict[str, Any]:
    """Training settings: ``train.*`` over TRAIN_DEFAULTS."""
    return {k: conf_get(conf, f"train.{k}", v) for k, v in TRAIN_DEFAULTS.items()}


def load_vocab(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def vocab_sizes(vocab: Mapping[str, Any]) -> dict[str, int]:
    """Vocabulary sizes (max index + 1, at least 2 for padding and unknown) from a vocab JSON."""

    def size(kind: str) -> int:
        idx = [int(i) for i in (vocab.get(kind) or {}).values()]
        return max([1, *idx]) + 1

    n_products = size("product")
    if vocab.get("product_category") is not None:
        n_products = max(n_products, len(vocab["product_category"]))
    # No host vocabulary (the leave-one-out benchmark's logs have no streams): no stream context.
    n_hosts = size("host") if vocab.get("host") else 0
    return {"n_products": n_products, "n_categories": size("category"), "n_event_types": size("event"),
            "n_hosts": n_hosts}


def _lookup_array(values: Any, n: int, fill: int) -> np.ndarray | None:
    """Pad/truncate a product -> index lookup to n_products entries (new products get ``fill``)."""
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.int64)
    if arr.shape[0] < n:
        arr = np.concatenate([arr, np.full(n - arr.shape[0], fill, dtype=np.int64)])
    return arr[:n]


def model_config_from_conf(
    conf: Mapping[str, Any],
    product_category: np.ndarray | None = None,
    product_price_tier: np.ndarray | None = None,
) -> tuple[ModelConfig, np.ndarray | None, np.ndarray | None]:
    """ModelConfig plus product lookups from ``model.*`` keys and an optional vocab file.

    Sizes come from ``model.n_products/n_categories/n_event_types`` or, when absent, from the
    vocab JSON at ``model.vocab_path`` (which may also carry ``product_category`` and
    ``product_price_tier``). ``model.product_category`` may also be given inline as a list.
    """
    conf = plain_conf(conf)
    section = dict(conf_get(conf, "model", {}) or {})
    for k, v in conf.items():  # flat dotted keys
        if isinstance(k, str) and k.startswith("model."):
            section[k[len("model."):]] = v
    vocab_path = section.get("vocab_path")
    vocab = load_vocab(vocab_path) if vocab_path else {}
    params = {**MODEL_DEFAULTS, **(vocab_sizes(vocab) if vocab else {}),
              **{k: v for k, v in section.items() if v is not None}}
    missing = [k for k in ("n_products", "n_categories", "n_event_types") if k not in params]
    if missing:
        raise ValueError(f"model conf needs {missing} (or model.vocab_path to a vocab JSON)")
    cfg = ModelConfig.from_dict(params)
    pc = product_category if product_category is not None else section.get(
        "product_category", vocab.get("product_category"))
    pt = product_price_tier if product_price_tier is not None else section.get(
        "product_price_tier", vocab.get("product_price_tier"))
    return cfg, _lookup_array(pc, cfg.n_products, 1), _lookup_array(pt, cfg.n_products, 0)


# ----------------------------------------------------------------------------- data
def to_uri(path: str) -> str:
    """Petastorm wants URIs with one scheme; plain paths become file:// URIs."""
    return path if "://" in path else "file://" + os.path.abspath(path)


def to_path(uri: str) -> str:
    return uri.removeprefix("file://")


class ColumnarBatches:
    """Petastorm results-queue reader: Arrow row groups -> numpy feature columns, no pandas.

    Petastorm 0.12's ``ArrowReaderWorkerResultsQueueReader`` turns every list column of a row
    group into a pandas object array (one ndarray per row) and stacks it back with
    ``np.vstack`` - in the consumer thread, for every row. A ``TransformSpec`` (the old split
    filter) adds ``Table.to_pandas`` and ``Table.from_pandas`` of the same object columns in the
    reader threads. Profiling ``measure_petastorm_vs_pyarrow`` showed those two paths, not Parquet
    decoding, as most of an epoch. Here a row group stays columnar: the fixed-length list columns
    become ``[rows, width]`` views of the Arrow value buffers (zero copy), the split filter is a
    boolean mask on the Arrow string column, and rows are gathered with ``np.take``. The reader
    threads still do the Parquet I/O and decoding (``make_batch_reader``), and
    ``BatchedDataLoader`` still cuts the batches and makes the torch tensors.

    Rows go out in chunks of ``chunk_rows`` (a multiple of the batch size): the loader's batch
    buffer copies every piece it is given (``torch.cat`` with the previous leftover), and a whole
    row group (tens of MB) per copy costs fresh pages each time, while a few-MB chunk reuses the
    same memory.

    Shuffling (``shuffle``): row groups arrive in Petastorm's seeded order; the rows of each
    group are permuted here with a numpy generator seeded from ``seed`` and the shard, and
    ``carry`` rows drawn at random are held back and mixed into the next row group (the role of
    Petastorm's torch shuffling buffer, without its per-batch ``tensor[idx]``, which is ~10x
    slower than a gather and far worse with oversubscribed torch threads). The order depends
    only on the seed and on the arrival order of row groups (one reader thread when
    deterministic), not on the torch random stream the model draws from.
    """

    batched_output = True

    def __init__(self, split: str | None, shuffle: bool, seed: int, carry: int = 0, chunk_rows: int = 4096):
        self.split = split
        self.shuffle = bool(shuffle)
        self.carry_rows = max(0, int(carry)) if shuffle else 0
        self.chunk_rows = max(1, int(chunk_rows))
        self.rng = np.random.default_rng(seed)
        self._carry: dict[str, np.ndarray] | None = None  # held-back rows, already in random order
        # Pending rows: (held-back rows of before, this row group, row indices to emit, next position).
        # Row index r < len(held) is held[r], r >= len(held) is group[r - len(held)].
        self._pending: tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray], np.ndarray, int] | None = None
        self._done = False

    def read_next(self, workers_pool: Any, schema: Any, ngram: Any) -> Any:
        from petastorm.workers_pool import EmptyResultError

        while True:
            if self._pending is not None:
                cols = self._next_chunk()
                if cols is not None:
                    return _BatchColumns(**cols)
            if self._done:
                raise StopIteration
            try:
                table = workers_pool.get_results()
            except EmptyResultError:
                self._done = True
                if self._carry is not None:  # end of epoch: the held-back rows go out last
                    held, self._carry = self._carry, None
                    self._pending = (held, {}, np.arange(_rows(held)), 0)
                continue
            self._add(table)

    def _add(self, table: Any) -> None:
        """Queue the kept rows of one row group, mixed with the held-back rows, in emission order."""
        rows = None
        if self.split is not None:
            mask = _split_mask(table.column("split"), self.split)
            if not mask.all():
                rows = np.flatnonzero(mask)
        kept = table.num_rows if rows is None else rows.size
        if kept == 0:
            return
        group = {name: arrow_column_numpy(name, table.column(name)) for name in FEATURE_COLUMNS}
        if not self.shuffle:
            self._pending = (None, group, np.arange(kept) if rows is None else rows, 0)
            return
        held = self._carry
        m = 0 if held is None else _rows(held)
        order = self.rng.permutation(m + kept)  # over the pool: held rows, then this group's kept rows
        if rows is not None:
            in_group = order >= m
            order[in_group] = rows[order[in_group] - m] + m  # pool position -> row index
        n_hold = min(self.carry_rows, order.size)
        self._carry = _gather(held, group, order[order.size - n_hold:]) if n_hold else None
        self._pending = (held, group, order[:order.size - n_hold], 0)

    def _next_chunk(self) -> dict[str, np.ndarray] | None:
        held, group, order, pos = self._pending
        if pos >= order.size:
            self._pending = None
            return None
        take = order[pos:pos + self.chunk_rows]
        self._pending = (held, group, order, pos + take.size)
        if held is None and not self.shuffle and take[-1] - take[0] == take.size - 1:
            return {k: v[take[0]:take[-1] + 1] for k, v in group.items()}  # sorted and contiguous: views
        return _gather(held, group, take)


_BatchColumns = collections.namedtuple("_BatchColumns", FEATURE_COLUMNS)


def _rows(cols: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(cols.values())))


def _gather(held: dict[str, np.ndarray] | None, group: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The rows ``rows`` of held + group (row index r < len(held): held[r], else group[r - len(held)])."""
    m = 0 if held is None else _rows(held)
    from_held = rows < m
    if not from_held.any():
        return {k: np.take(v, rows - m if m else rows, axis=0) for k, v in group.items()}
    if from_held.all():
        return {k: np.take(v, rows, axis=0) for k, v in held.items()}
    at_held, at_group = np.flatnonzero(from_held), np.flatnonzero(~from_held)
    src_held, src_group = rows[at_held], rows[at_group] - m
    out = {}
    for k, v in held.items():
        arr = np.empty((rows.size, *v.shape[1:]), dtype=v.dtype)
        arr[at_held] = np.take(v, src_held, axis=0)
        arr[at_group] = np.take(group[k], src_group, axis=0)
        out[k] = arr
    return out


def _split_mask(column: Any, split: str) -> np.ndarray:
    import pyarrow.compute as pc

    mask = pc.fill_null(pc.equal(column, split), False)
    if hasattr(mask, "combine_chunks"):
        mask = mask.combine_chunks()
    return mask.to_numpy(zero_copy_only=False)


def arrow_column_numpy(name: str, column: Any) -> np.ndarray:
    """An Arrow column (one row group) as numpy: scalars 1-D, fixed-length lists ``[rows, width]``.

    Zero copy for primitive values without nulls; null values become 0. Lists must all have the
    same length (the history, candidate and feature arrays are padded by the features stage).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    n = len(arr)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        if arr.null_count:
            raise ValueError(f"column {name!r}: {arr.null_count} null arrays; every row needs a padded array")
        if pa.types.is_fixed_size_list(arr.type):
            width = arr.type.list_size
        else:
            offsets = np.asarray(arr.offsets)
            lengths = np.diff(offsets)
            width = int(lengths[0]) if n else 0
            if n and not (lengths == width).all():
                raise ValueError(f"column {name!r}: arrays of different lengths "
                                 f"({sorted(set(lengths.tolist()))[:5]}); expected one fixed length")
        values = arr.flatten()
        if values.null_count:
            values = pc.fill_null(values, 0)
        return values.to_numpy(zero_copy_only=False).reshape(n, width)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_binary(arr.type):
        raise TypeError(f"column {name!r} is {arr.type}: torch cannot hold it")
    if arr.null_count:
        arr = pc.fill_null(arr, 0)
    return arr.to_numpy(zero_copy_only=False)


def _quiet_petastorm() -> None:
    """Petastorm 0.12 uses pyarrow's legacy dataset API; its FutureWarnings are noise, not news."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module=r"petastorm(\.|$)")


def count_row_groups(files: list[str]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(to_path(f)).num_row_groups for f in files)


def file_splits(path: str) -> set[str] | None:
    """The ``split`` values of one Parquet file from its footer statistics (None: unknown)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(to_path(path)).metadata
        names = [meta.schema.column(j).path for j in range(meta.num_columns)]
        if "split" not in names:
            return None
        j = names.index("split")
        found: set[str] = set()
        for i in range(meta.num_row_groups):
            rg = meta.row_group(i)
            if rg.num_rows == 0:
                continue
            st = rg.column(j).statistics
            if st is None:
                return None
            if not st.has_min_max:
                if st.null_count == rg.num_rows:
                    continue  # only nulls: no row of any split
                return None
            lo, hi = st.min, st.max
            lo = lo.decode() if isinstance(lo, bytes) else lo
            hi = hi.decode() if isinstance(hi, bytes) else hi
            if lo != hi:
                return None  # a mixed row group: the mask decides
            found.add(lo)
        return found
    except Exception:  # noqa: BLE001 - statistics are an optimisation only; the row mask stays exact
        return None


def files_for_split(files: list[str], split: str | None, shard_count: int | None = None) -> list[str]:
    """Drop files whose footer statistics prove they hold no row of ``split``.

    Only files written one split per file (or per row group) are pruned; mixed files stay and
    the row mask filters them. If pruning would leave nothing, or fewer row groups than shards,
    every file is kept (the mask then yields the same rows).
    """
    if split is None:
        return list(files)
    kept = [f for f in files if (s := file_splits(f)) is None or split in s]
    if not kept or len(kept) == len(files):
        return list(files)
    if shard_count and count_row_groups(kept) < int(shard_count):
        return list(files)
    return kept


def make_loader(
    files: list[str],
    split: str | None,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool,
    workers: int = 2,
    shuffle_buffer: int = 0,
    cur_shard: int | None = None,
    shard_count: int | None = None,
):
    """A one-epoch Petastorm BatchedDataLoader over ``files`` (``split=None``: every row).

    ``make_batch_reader`` reads the row groups (seeded row-group order when ``shuffle``) in
    ``workers`` threads; ``ColumnarBatches`` turns each into numpy columns, keeps the rows of
    ``split`` and shuffles them (``shuffle_buffer`` rows carried across row groups); the
    ``BatchedDataLoader`` cuts ``batch_size``-row torch tensors.
    """
    from petastorm import make_batch_reader
    from petastorm.arrow_reader_worker import ArrowReaderWorkerResultsQueueReader
    from petastorm.pytorch import BatchedDataLoader

    _quiet_petastorm()
    fields = [f"{c}$" for c in FEATURE_COLUMNS]
    if split is not None:
        fields.append("split$")
    reader = make_batch_reader(
        [to_uri(f) for f in files_for_split(files, split, shard_count)],
        schema_fields=fields,
        reader_pool_type="thread",
        workers_count=max(1, int(workers)),
        results_queue_size=8,
        seed=seed,
        shuffle_row_groups=shuffle,
        shuffle_rows=False,  # rows are permuted by ColumnarBatches (a numpy gather, not an Arrow take)
        num_epochs=1,
        cur_shard=cur_shard,
        shard_count=shard_count,
    )
    # The one petastorm internal we replace: the object that converts the reader threads' Arrow
    # tables for the consumer (petastorm 0.12 has no public hook for it; constraints.txt pins it).
    if not isinstance(getattr(reader, "_results_queue_reader", None), ArrowReaderWorkerResultsQueueReader):
        reader.stop()
        reader.join()
        raise RuntimeError("petastorm Reader internals changed: cannot install the columnar results reader")
    reader._results_queue_reader = ColumnarBatches(
        split, shuffle, seed=int(seed) * 1009 + int(cur_shard or 0), carry=shuffle_buffer,
        chunk_rows=batch_size * max(1, 4096 // batch_size))
    return BatchedDataLoader(reader, batch_size=batch_size, shuffling_queue_capacity=0)


# ----------------------------------------------------------------------------- distributed
class _Dist:
    """Rank/world bookkeeping and the few collectives the loop needs (no-ops when world == 1)."""

    def __init__(self, use_cuda: bool):
        import torch.distributed as dist

        self.dist = dist
        self.created = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            self.created = True
        self.enabled = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1
        self.device = torch.device(f"cuda:{self.local_rank}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)

    def all_min(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MIN)
        return int(t.item())

    def all_sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        return float(t.item())

    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.created:
            self.dist.destroy_process_group()


# ----------------------------------------------------------------------------- metrics
def auc_score(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC by the rank-sum formula with average ranks for ties; None if one class only."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def target_ranks(model: StreamRankModel, batch: Mapping[str, torch.Tensor], state: torch.Tensor,
                 protocol: str, negatives: torch.Tensor | None) -> torch.Tensor:
    """0-based rank of ``target_product`` among the protocol's competitors (ties count against)."""
    tgt = batch["target_product"]
    t_score = (state * model.item_vec(tgt)).sum(-1, keepdim=True).float()
    if protocol == "candidates":
        # Candidates are scored with their slot context, the target as the candidate it is.
        t_score = model.target_scores(state, batch).unsqueeze(1).float()
        comp = batch["cand_products"]
        scores = model.candidate_scores(state, batch).float()
        real = (comp >= FIRST_REAL_ID) & (comp != tgt.unsqueeze(1))
    elif protocol == "sampled":
        comp = negatives  # [B, K]
        scores = torch.einsum("bd,bnd->bn", state, model.item_vec(comp)).float()
        real = comp != tgt.unsqueeze(1)
    elif protocol == "full":
        ids = torch.arange(FIRST_REAL_ID, model.cfg.n_products, device=state.device)
        scores = model.rank_scores(state, model.candidate_matrix(ids)).float()
        real = ids.unsqueeze(0) != tgt.unsqueeze(1)
    else:
        raise ValueError(f"train.eval_protocol must be candidates, sampled or full, got {protocol!r}")
    return ((scores >= t_score) & real).sum(dim=1)


@torch.no_grad()
def evaluate(model: StreamRankModel, loader: Any, device: torch.device, tc: Mapping[str, Any],
             autocast: Any) -> dict[str, np.ndarray]:
    """Per-row validation arrays of this rank: ranks of targets, intent logits, labels."""
    model.eval()
    k_neg = int(tc["eval_negatives"])
    gen = torch.Generator().manual_seed(int(tc["seed"]) + 99)
    ranks, logits, labels = [], [], []
    for raw in loader:
        b = batch_to_tensors(raw, device)
        with autocast():
            out = model(b, compute_loss=False)
        negatives = None
        if tc["eval_protocol"] == "sampled":
            negatives = torch.randint(FIRST_REAL_ID, model.cfg.n_products,
                                      (len(b["target_product"]), k_neg), generator=gen).to(device)
        # Ranks in float32 outside autocast: bf16 rounding would create ties.
        r = target_ranks(model, b, out["state"].float(), tc["eval_protocol"], negatives)
        has_t = b["target_product"] >= FIRST_REAL_ID
        if tc["eval_protocol"] == "candidates":
            # a row with no real competitors (e.g. no schedule that day) would count as a perfect hit
            has_t = has_t & ((b["cand_products"] >= FIRST_REAL_ID) & (b["cand_products"] != b["target_product"].unsqueeze(1))).any(1)
        ranks.append(r[has_t].cpu().numpy())
        logits.append(out["viewer_logit"].float().cpu().numpy())
        labels.append(b["label_purchase"].cpu().numpy())
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    return {"ranks": cat(ranks, np.int64), "logits": cat(logits, np.float64), "labels": cat(labels, np.int64)}


def summarise_eval(parts: list[dict[str, np.ndarray]], k: int) -> dict[str, Any]:
    ranks = np.concatenate([p["ranks"] for p in parts])
    logits = np.concatenate([p["logits"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    out: dict[str, Any] = {"valid_rows": int(labels.size), "valid_ranked_rows": int(ranks.size)}
    if ranks.size:
        hit = ranks < k
        out[f"ndcg_at_{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
        out[f"hr_at_{k}"] = float(hit.mean())
        out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
    else:
        out[f"ndcg_at_{k}"] = out[f"hr_at_{k}"] = out["mrr"] = None
    if labels.size:
        p = 1.0 / (1.0 + np.exp(-logits))
        eps = 1e-7
        out["intent_auc"] = auc_score(labels, logits)
        out["intent_logloss"] = float(-np.mean(labels * np.log(p + eps) + (1 - labels) * np.log(1 - p + eps)))
        out["intent_base_rate"] = float(labels.mean())
        out["intent_mean_pred"] = float(p.mean())
    else:
        out.update(intent_auc=None, intent_logloss=None, intent_base_rate=None, intent_mean_pred=None)
    return out


# ----------------------------------------------------------------------------- training
def _resolve_device(use_gpu: Any) -> bool:
    if isinstance(use_gpu, str):
        use_gpu = {"auto": None, "true": True, "false": False}.get(use_gpu.lower(), None)
    if use_gpu is None:
        return torch.cuda.is_available()
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu is true but CUDA is not available")
    return bool(use_gpu)


def _autocast_factory(use_cuda: bool, amp: bool):
    """Context factory for AMP: bf16 where supported (no loss scaling needed), else fp16."""
    if use_cuda and amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return (lambda: torch.autocast(device_type="cuda", dtype=dtype)), dtype
    return contextlib.nullcontext, None


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices of Linear layers only; embeddings, norms, biases and decay rates free."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() == 2 and "emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _atomic_write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _batches(loader: Any, dist_: _Dist) -> Iterator[dict[str, Any]]:
    """Yield batches while every rank still has one (shards may differ by a batch or two)."""
    it = iter(loader)
    while True:
        raw = next(it, None)
        if dist_.all_min(0 if raw is None else 1) == 0:
            return
        yield raw


def epoch_line(record: Mapping[str, Any], k: int, max_epochs: int) -> str:
    """One line per epoch for the stage's output: what early stopping decides on, and speed."""
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    return (f"[train] epoch {record['epoch'] + 1}/{max_epochs}: {record['train_rows']} rows in "
            f"{record['train_seconds']:.1f} s ({record['samples_per_s'] or 0:.0f} rows/s), loss "
            f"{record['train_loss']:.4f}, valid ndcg@{k} {fmt(record.get(f'ndcg_at_{k}'))}, "
            f"intent auc {fmt(record.get('intent_auc'))}")


def train_worker(files: list[str], conf: dict, out_dir: str) -> dict:
    """Train on the ``train`` rows of ``files``, early-stop on ``valid`` NDCG@k, write outputs.

    Writes (rank 0 only) ``model.pt`` (best epoch's state_dict), ``model_config.json``,
    ``metrics.json`` and, when the validation set has both classes, ``calibrator.json`` (Platt
    scaling of the intent head fitted on validation). Returns the metrics dict.
    Raises NonFiniteLossError on the first NaN/inf loss (on every rank, before any write).
    """
    from tqdm.auto import tqdm

    files = [str(f) for f in files]
    if not files:
        raise ValueError("train_worker needs at least one Parquet file")
    conf = plain_conf(conf)
    tc = train_conf(conf)
    if int(tc["max_epochs"]) < 1:
        raise ValueError("train.max_epochs must be >= 1")
    use_cuda = _resolve_device(tc["use_gpu"])
    dist_ = _Dist(use_cuda)
    device = dist_.device
    deterministic = (not use_cuda) if tc["deterministic"] is None else bool(tc["deterministic"])
    seed = int(tc["seed"])
    k = int(tc["eval_k"])
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    try:
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if tc["cpu_threads"]:
            torch.set_num_threads(int(tc["cpu_threads"]))
        elif dist_.enabled and not use_cuda:  # share the cores between local processes
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist_.world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        if dist_.enabled and count_row_groups(files) < dist_.world:
            raise ValueError(f"{count_row_groups(files)} row groups cannot be sharded over {dist_.world} ranks")

        cfg, pc, pt = model_config_from_conf(conf)
        torch.manual_seed(seed)
        np.random.seed(seed)
        model = StreamRankModel(cfg, pc, pt).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        net: torch.nn.Module = model
        if dist_.enabled:
            # The lookup buffers are constant: no need to re-broadcast them on every forward.
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP

            sync_kw = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                       else "broadcast_buffers")
            net = DDP(model, device_ids=[dist_.local_rank] if use_cuda else None, **{sync_kw: False})
        torch.manual_seed(seed + 1000 * dist_.rank)  # per-rank negatives / shuffling
        opt = torch.optim.AdamW(_param_groups(model, float(tc["weight_decay"])), lr=float(tc["lr"]))
        autocast, amp_dtype = _autocast_factory(use_cuda, bool(tc["amp"]))
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        workers = 1 if deterministic else int(tc["reader_workers"])
        shard = {"cur_shard": dist_.rank, "shard_count": dist_.world} if dist_.enabled else {}
        batch_size = int(tc["batch_size"])
        max_steps = tc["max_steps_per_epoch"]
        inject_at = tc["inject_nan_at_step"]
        show = bool(tc["progress"]) and dist_.rank == 0
        # A bar redraws itself with carriage returns: on a terminal that is a bar, in a
        # scheduler's log file it is one line thousands of characters long. There the
        # per-epoch line below is the progress report.
        show_bar = show and sys.stderr.isatty()

        epochs: list[dict[str, Any]] = []
        best: dict[str, Any] = {"epoch": None, "score": -math.inf, "state": None, "eval": None}
        bad_epochs = 0
        global_step = 0
        stopped_early = False
        for epoch in range(int(tc["max_epochs"])):
            net.train()
            loss_keys = ("loss", "rank_loss", "intent_loss", "cand_loss")
            loss_acc = torch.zeros(len(loss_keys), dtype=torch.float64, device=device)
            rows = steps = 0
            t0 = time.perf_counter()
            loader = make_loader(files, "train", batch_size, seed=seed + epoch, shuffle=True, workers=workers,
                                 shuffle_buffer=int(tc["shuffle_buffer"]), **shard)
            with loader, tqdm(desc=f"train epoch {epoch}", unit="row", unit_scale=True, disable=not show_bar,
                              leave=False, mininterval=1.0) as bar:
                for raw in _batches(loader, dist_):
                    b = batch_to_tensors(raw, device)
                    with autocast():
                        out = net(b)
                    loss = out["loss"]
                    if inject_at is not None and global_step == int(inject_at):
                        loss = loss * float("nan")
                    value = float(loss.detach().float().item())
                    if dist_.all_min(int(math.isfinite(value))) == 0:
                        raise NonFiniteLossError(global_step, epoch, value)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if tc["grad_clip"]:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), float(tc["grad_clip"]))
                    scaler.step(opt)
                    scaler.update()
                    n = int(b["hist_len"].shape[0])
                    loss_acc += torch.stack([out[key].detach().double() for key in loss_keys]) * n
                    rows += n
                    steps += 1
                    global_step += 1
                    bar.update(n)
                    if steps % 10 == 0:
                        bar.set_postfix(loss=f"{value:.4f}", rows_s=f"{rows / (time.perf_counter() - t0):.0f}")
                    if max_steps is not None and steps >= int(max_steps):
                        break
            train_s = time.perf_counter() - t0
            total_rows = dist_.all_sum(rows)
            if epoch == 0 and total_rows == 0:
                raise ValueError("no training steps: no rows with split == 'train'"
                                 + (f" in some rank's shard ({dist_.world} ranks)" if dist_.enabled else ""))
            loss_tot = {key: dist_.all_sum(v) / max(total_rows, 1)
                        for key, v in zip(loss_keys, loss_acc.tolist(), strict=True)}

            t1 = time.perf_counter()
            vloader = make_loader(files, "valid", batch_size, seed=seed, shuffle=False, workers=workers, **shard)
            with vloader:
                part = evaluate(model, vloader, device, tc, autocast)
            parts = dist_.gather(part)
            ev = summarise_eval(parts, k)
            record = {
                "epoch": epoch,
                "train_loss": loss_tot["loss"],
                "rank_loss": loss_tot["rank_loss"],
                "intent_loss": loss_tot["intent_loss"],
                "cand_loss": loss_tot["cand_loss"],
                "train_rows": int(total_rows),
                "train_steps": steps,
                "train_seconds": train_s,
                "samples_per_s": total_rows / train_s if train_s > 0 else None,
                "eval_seconds": time.perf_counter() - t1,
                **ev,
            }
            epochs.append(record)
            if show:
                print(epoch_line(record, k, int(tc["max_epochs"])), flush=True)
            score = ev[f"ndcg_at_{k}"]
            score = -record["train_loss"] if score is None else score  # no valid targets: use train loss
            if score > best["score"]:
                best = {"epoch": epoch, "score": score,
                        "eval": {key: np.concatenate([p[key] for p in parts]) for key in ("logits", "labels")},
                        "state": {n_: v.detach().cpu().clone() for n_, v in model.state_dict().items()}}
                bad_epochs = 0
            else:
                bad_epochs += 1
                if bad_epochs >= int(tc["patience"]):
                    stopped_early = True
                    break

        best_rec = epochs[best["epoch"]]
        throughput = [e["samples_per_s"] for e in epochs if e["samples_per_s"]]
        metrics: dict[str, Any] = {
            "epochs": epochs,
            "best_epoch": best["epoch"],
            f"best_ndcg_at_{k}": best_rec[f"ndcg_at_{k}"],
            f"ndcg_at_{k}": best_rec[f"ndcg_at_{k}"],
            f"hr_at_{k}": best_rec[f"hr_at_{k}"],
            "intent_auc": best_rec["intent_auc"],
            "intent_logloss": best_rec["intent_logloss"],
            "samples_per_s": float(np.mean(throughput)) if throughput else None,
            "stopped_early": stopped_early,
            "eval_protocol": tc["eval_protocol"],
            "eval_k": k,
            "world_size": dist_.world,
            "device": str(device),
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
            "deterministic": deterministic,
            "seed": seed,
            "n_parameters": int(n_params),
            "model_config": cfg.to_dict(),
        }
        if dist_.rank == 0:
            os.makedirs(out_dir, exist_ok=True)
            tmp = os.path.join(out_dir, "model.pt.tmp")
            torch.save(best["state"], tmp)
            os.replace(tmp, os.path.join(out_dir, "model.pt"))
            _atomic_write_json(os.path.join(out_dir, "model_config.json"), cfg.to_dict())
            calib = fit_platt(best["eval"]["logits"], best["eval"]["labels"])
            calib_path = os.path.join(out_dir, "calibrator.json")
            if calib is not None:
                _atomic_write_json(calib_path, calib)
            elif os.path.exists(calib_path):  # never leave a previous run's calibrator next to this model
                os.remove(calib_path)
            metrics["calibrator"] = calib
            _atomic_write_json(os.path.join(out_dir, "metrics.json"), metrics)
        if dist_.enabled:
            dist_.dist.barrier()
        return metrics
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)
        dist_.close()


# ----------------------------------------------------------------------------- launching
def distributed_entry(files: list[str], conf: dict, out_dir: str) -> dict:
    """TorchDistributor target: ``train_worker`` with a NaN loss returned as data, not a crash.

    TorchDistributor only reports a failed child as a generic RuntimeError (the traceback goes
    to stdout), so the NonFiniteLossError - raised on every rank at the same step - is returned
    by rank 0 as ``{"error": "non_finite_loss", ...}`` and re-raised on the driver.
    """
    try:
        return train_worker(files, conf, out_dir)
    except NonFiniteLossError as e:
        return {"error": "non_finite_loss", "step": e.step, "epoch": e.epoch, "value": e.value}


def run_training(files: list[str], conf: dict, out_dir: str, num_processes: int, use_gpu: bool) -> dict:
    """Train in-process (1 process) or with TorchDistributor(local_mode=True) (> 1 processes).

    TorchDistributor needs an active SparkSession and starts ``torchrun`` children that call
    ``train_worker``; a NaN loss in a child comes back as NonFiniteLossError here too.
    """
    conf = copy.deepcopy(plain_conf(conf))
    train_section = dict(conf.get("train") or {})
    train_section["use_gpu"] = bool(use_gpu)
    conf["train"] = train_section
    conf.pop("train.use_gpu", None)
    if int(num_processes) <= 1:
        return train_worker(files, conf, out_dir)
    from pyspark.ml.torch.distributor import TorchDistributor

    distributor = TorchDistributor(num_processes=int(num_processes), local_mode=True, use_gpu=bool(use_gpu))
    result = distributor.run(distributed_entry, list(files), conf, out_dir)
    if isinstance(result, dict) and result.get("error") == "non_finite_loss":
        raise NonFiniteLossError(result["step"], result["epoch"], result.get("value"))
    return result


# ----------------------------------------------------------------------------- throughput
def _iterate_rows(loader: Any, max_batches: int | None) -> int:
    rows = 0
    with loader:
        for i, batch in enumerate(loader):
            rows += int(batch["hist_len"].shape[0])
            if max_batches is not None and i + 1 >= max_batches:
                break
    return rows


def measure_loader_vs_step(files: list[str], conf: dict, max_batches: int = 50, step_batches: int = 10) -> dict:
    """Rows/s of pure Petastorm loading (train split into torch tensors) vs model training steps.

    The step rate times forward + backward + optimizer on batches already in memory on the
    training device, so the two numbers show which side bounds an epoch.
    """
    conf = plain_conf(conf)
    tc = train_conf(conf)
    with torch_threads(tc["cpu_threads"]):
        return _measure_loader_vs_step(files, conf, tc, max_batches, step_batches)


def _measure_loader_vs_step(files: list[str], conf: dict, tc: dict, max_batches: int, step_batches: int) -> dict:
    use_cuda = _resolve_device(tc["use_gpu"])
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    bs = int(tc["batch_size"])
    loader = make_loader(files, "train", bs, seed=int(tc["seed"]), shuffle=True,
                         workers=int(tc["reader_workers"]), shuffle_buffer=int(tc["shuffle_buffer"]))
    t0 = time.perf_counter()
    rows = _iterate_rows(loader, max_batches)
    load_s = time.perf_counter() - t0

    cfg, pc, pt = model_config_from_conf(conf)
    torch.manual_seed(int(tc["seed"]))
    model = StreamRankModel(cfg, pc, pt).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=float(tc["lr"]))
    autocast, amp_dtype = _autocast_factory(use_cuda, bool(tc["amp"]))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    batches = []
    with make_loader(files, "train", bs, seed=int(tc["seed"]), shuffle=False, workers=1) as ld:
        for raw in ld:
            batches.append(batch_to_tensors(raw, device))
            if len(batches) >= step_batches:
                break
    if not batches:
        raise ValueError("no training rows to measure")

    def step(b: dict[str, torch.Tensor]) -> None:
        with autocast():
            loss = model(b)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    step(batches[0])  # warm-up (allocations, autotuning)
    if use_cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    step_rows = 0
    for b in batches:
        step(b)
        step_rows += int(b["hist_len"].shape[0])
    if use_cuda:
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t1
    loader_rps = rows / load_s if load_s > 0 else float("inf")
    step_rps = step_rows / step_s if step_s > 0 else float("inf")
    return {
        "loader_rows_per_s": loader_rps,
        "step_rows_per_s": step_rps,
        "loader_to_step_ratio": loader_rps / step_rps,
        "bottleneck": "loader" if loader_rps < step_rps else "model",
        "loader_rows": rows,
        "step_rows": step_rows,
        "batch_size": bs,
        "device": str(device),
    }


def _pyarrow_epoch(files: list[str], batch_size: int) -> int:
    """Read the feature columns with pyarrow and cut them into torch batches (the reference)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    for f in files:
        table = pq.read_table(to_path(f), columns=list(FEATURE_COLUMNS))
        n = table.num_rows
        cols: dict[str, torch.Tensor] = {}
        for name in FEATURE_COLUMNS:
            col = table.column(name).combine_chunks()
            if pa.types.is_list(col.type):
                arr = col.flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
            else:
                arr = col.to_numpy(zero_copy_only=False)
            cols[name] = torch.from_numpy(np.ascontiguousarray(arr))
        for s in range(0, n, batch_size):
            batch = {k: v[s:s + batch_size] for k, v in cols.items()}
            rows += int(batch["hist_len"].shape[0])
    return rows


def measure_petastorm_vs_pyarrow(files: list[str], conf: dict, repeats: int = 3) -> dict:
    """Rows/s into torch tensors: Petastorm BatchedDataLoader vs plain pyarrow on the same files.

    Both read every row (no split filter, no shuffle) of the same feature columns and produce
    per-column tensors of ``batch_size`` rows. The two sides alternate ``repeats`` times in one
    run; the median pass of each is reported (``*_s``: seconds per epoch).
    """
    conf = plain_conf(conf)
    tc = train_conf(conf)
    bs = int(tc["batch_size"])
    workers = int(tc["reader_workers"])
    pet, arr = [], []
    rows = rows_pa = 0
    with torch_threads(tc["cpu_threads"]):
        for r in range(max(1, repeats)):
            t0 = time.perf_counter()
            rows = _iterate_rows(make_loader(files, None, bs, seed=r, shuffle=False, workers=workers), None)
            pet.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rows_pa = _pyarrow_epoch(files, bs)
            arr.append(time.perf_counter() - t0)
    if rows != rows_pa:
        raise RuntimeError(f"petastorm read {rows} rows, pyarrow {rows_pa}: not the same data")
    pet_s, arr_s = statistics.median(pet), statistics.median(arr)
    return {
        "petastorm_rows_per_s": rows / pet_s,
        "pyarrow_rows_per_s": rows / arr_s,
        "petastorm_to_pyarrow_ratio": arr_s / pet_s,
        "petastorm_s": pet_s,
        "pyarrow_s": arr_s,
        "petastorm_s_runs": pet,
        "pyarrow_s_runs": arr,
        "rows": rows,
        "batch_size": bs,
        "reader_workers": workers,
    }
