"""Training worker end to end on small Parquet files: Petastorm -> torch -> outputs -> MLflow."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from streamrank.train_worker import (
    FEATURE_COLUMNS,
    NonFiniteLossError,
    arrow_column_numpy,
    files_for_split,
    make_loader,
    measure_loader_vs_step,
    measure_petastorm_vs_pyarrow,
    run_training,
    train_worker,
)

N_PRODUCTS, N_CATEGORIES, N_EVENTS, L, P, T, C = 80, 8, 11, 50, 8, 10, 32
N_HOSTS = 6


def write_training_examples(root: Path, n_files: int = 4, rows: int = 160, seed: int = 0) -> list[str]:
    """gold/training_examples-shaped Parquet files (Spark layout: as_of_date only in the path).

    Histories follow next = last + 3 (mod catalogue) so the ranking head has something to learn;
    viewers with longer histories purchase more often so the intent head does too.
    """
    rng = np.random.default_rng(seed)
    out_dir = root / "as_of_date=2026-11-01"
    out_dir.mkdir(parents=True, exist_ok=True)
    real = N_PRODUCTS - 2
    files = []
    for fi in range(n_files):
        hist_len = rng.integers(0, L + 1, rows)
        hist_len[:3] = [0, 1, L]
        prod = np.zeros((rows, L), np.int32)
        for i in range(rows):
            start = rng.integers(0, real)
            prod[i, L - hist_len[i]:] = (start + 3 * np.arange(hist_len[i])) % real + 2
        valid = prod > 0
        target = np.where(hist_len > 0, (prod[:, -1] - 2 + 3) % real + 2, rng.integers(2, N_PRODUCTS, rows))
        target = np.where(rng.random(rows) < 0.1, 0, target).astype(np.int32)  # some viewers cart nothing
        targets = np.zeros((rows, T), np.int32)
        targets[:, 0] = target
        cands = rng.integers(2, N_PRODUCTS, (rows, C)).astype(np.int32)
        cands[:, 0] = np.where(target > 0, target, cands[:, 0])
        cands = np.take_along_axis(cands, rng.permuted(np.tile(np.arange(C), (rows, 1)), axis=1), axis=1)
        cands[:, -2:] = 0  # padding
        label = (rng.random(rows) < 0.1 + 0.6 * hist_len / L).astype(np.int32)
        table = pa.table({
            "viewer_id": [f"v{fi}_{i}" for i in range(rows)],
            "cutoff_ts": pa.array([dt.datetime(2026, 11, 1, 23, 59)] * rows, pa.timestamp("us")),
            "hist_product": pa.array(list(prod), pa.list_(pa.int32())),
            "hist_category": pa.array(list(np.where(valid, prod % (N_CATEGORIES - 2) + 2, 0).astype(np.int32)),
                                      pa.list_(pa.int32())),
            "hist_event": pa.array(list(np.where(valid, rng.integers(2, N_EVENTS, (rows, L)), 0).astype(np.int32)),
                                   pa.list_(pa.int32())),
            "hist_dwell": pa.array(list(np.where(valid, rng.integers(1, 16, (rows, L)), 0).astype(np.int32)),
                                   pa.list_(pa.int32())),
            "hist_dt": pa.array(list(np.where(valid, np.sort(rng.exponential(40.0, (rows, L)), axis=1)[:, ::-1], 0)
                                     .astype(np.float32)), pa.list_(pa.float32())),
            "hist_len": pa.array(hist_len.astype(np.int32)),
            "pp_features": pa.array(list(rng.random((rows, P)).astype(np.float32)), pa.list_(pa.float32())),
            "target_product": pa.array(target),
            "target_products": pa.array(list(targets), pa.list_(pa.int32())),
            "cand_products": pa.array(list(cands), pa.list_(pa.int32())),
            "hist_host": pa.array(list(np.where(valid, prod % (N_HOSTS - 2) + 2, 0).astype(np.int32)), pa.list_(pa.int32())),
            "hist_hour": pa.array(list(np.where(valid, rng.integers(2, 26, (rows, L)), 0).astype(np.int32)),
                                  pa.list_(pa.int32())),
            "cand_host": pa.array(list(np.where(cands > 0, cands % (N_HOSTS - 2) + 2, 0).astype(np.int32)),
                                  pa.list_(pa.int32())),
            "cand_hour": pa.array(list(np.where(cands > 0, cands % 24 + 2, 0).astype(np.int32)), pa.list_(pa.int32())),
            "label_purchase": pa.array(label),
            "split": np.where(rng.random(rows) < 0.75, "train", "valid"),
        })
        path = out_dir / f"part-{fi:05d}.parquet"
        pq.write_table(table, path)
        files.append("file://" + str(path))
    return files


def write_vocab(path: Path) -> dict:
    product_category = [0, 1] + [p % (N_CATEGORIES - 2) + 2 for p in range(2, N_PRODUCTS)]
    vocab = {
        "product": {"<pad>": 0, "<unk>": 1, **{f"P{p:04d}": p for p in range(2, N_PRODUCTS)}},
        "category": {"<pad>": 0, "<unk>": 1, **{f"cat{c}": c for c in range(2, N_CATEGORIES)}},
        "event": {"<pad>": 0, "<unk>": 1, **{e: i + 2 for i, e in enumerate(
            ["enter_stream", "leave_stream", "view_product", "like", "comment", "share", "gift",
             "click_product", "add_to_cart"])}},
        "host": {"<pad>": 0, "<unk>": 1, **{f"h{h}": h for h in range(2, N_HOSTS)}},
        "product_category": product_category,
    }
    path.write_text(json.dumps(vocab))
    return vocab


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gold")
    files = write_training_examples(root / "training_examples")
    vocab_path = root / "vocab.json"
    write_vocab(vocab_path)
    return {"files": files, "vocab_path": str(vocab_path)}


def small_conf(vocab_path: str, **train) -> dict:
    return {
        "model": {"vocab_path": vocab_path, "d_model": 16, "n_heads": 2, "n_layers": 1, "num_negatives": 30},
        "train": {"batch_size": 64, "max_epochs": 2, "patience": 2, "lr": 3e-3, "progress": False,
                  "cpu_threads": 1, "shuffle_buffer": 256, **train},
    }


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("model")
    metrics = train_worker(data["files"], small_conf(data["vocab_path"]), str(out))
    return {"out": out, "metrics": metrics}


def test_train_two_epochs_writes_outputs(trained):
    out, metrics = trained["out"], trained["metrics"]
    for name in ("model.pt", "model_config.json", "metrics.json", "calibrator.json"):
        assert (out / name).exists(), name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert len(on_disk["epochs"]) == 2
    for epoch in on_disk["epochs"]:
        assert np.isfinite(epoch["train_loss"])
        assert 0.0 <= epoch["ndcg_at_10"] <= 1.0 and 0.0 <= epoch["hr_at_10"] <= 1.0
        assert 0.0 <= epoch["intent_auc"] <= 1.0
        assert epoch["samples_per_s"] > 0
        assert epoch["train_rows"] > 0 and epoch["valid_ranked_rows"] > 0
    assert on_disk["best_epoch"] in (0, 1)
    assert metrics["best_ndcg_at_10"] == on_disk["epochs"][metrics["best_epoch"]]["ndcg_at_10"]
    for key in ("best_epoch", "best_ndcg_at_10", "intent_auc", "samples_per_s"):
        assert key in metrics
    # The model learns the history pattern: clearly better than random among ~30 candidates.
    assert metrics["best_ndcg_at_10"] > 0.35
    cfg = json.loads((out / "model_config.json").read_text())
    assert cfg["n_products"] == N_PRODUCTS and cfg["d_model"] == 16
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["product_category"].shape == (N_PRODUCTS,)


def test_deterministic_on_cpu(data, trained, tmp_path):
    again = train_worker(data["files"], small_conf(data["vocab_path"]), str(tmp_path))
    first = trained["metrics"]
    assert [e["train_loss"] for e in again["epochs"]] == [e["train_loss"] for e in first["epochs"]]
    assert again["best_ndcg_at_10"] == first["best_ndcg_at_10"]
    a = torch.load(tmp_path / "model.pt", weights_only=True)
    b = torch.load(trained["out"] / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("protocol", ["sampled", "full"])
def test_other_eval_protocols(data, tmp_path, protocol):
    conf = small_conf(data["vocab_path"], eval_protocol=protocol, max_epochs=1, max_steps_per_epoch=2)
    metrics = train_worker(data["files"], conf, str(tmp_path))
    assert metrics["eval_protocol"] == protocol
    assert metrics["epochs"][0]["train_steps"] == 2
    assert 0.0 <= metrics["ndcg_at_10"] <= metrics["hr_at_10"] <= 1.0


def test_progress_in_a_log_file_is_one_line_per_epoch(data, tmp_path, capsys):
    """Not a terminal (a scheduler's log): no carriage-return bar, one line per epoch."""
    conf = small_conf(data["vocab_path"], max_epochs=2, patience=5, max_steps_per_epoch=3, progress=True)
    metrics = train_worker(data["files"], conf, str(tmp_path))
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "train epoch" not in captured.err
    lines = [line for line in captured.out.splitlines() if line.startswith("[train] epoch")]
    assert len(lines) == 2
    for epoch, line in zip(metrics["epochs"], lines, strict=True):
        assert line.startswith(f"[train] epoch {epoch['epoch'] + 1}/2: {epoch['train_rows']} rows in ")
        assert f"valid ndcg@10 {epoch['ndcg_at_10']:.4f}, intent auc {epoch['intent_auc']:.4f}" in line


def test_nan_loss_stops_immediately(data, tmp_path):
    conf = small_conf(data["vocab_path"], inject_nan_at_step=3)
    with pytest.raises(NonFiniteLossError) as err:
        train_worker(data["files"], conf, str(tmp_path))
    assert err.value.step == 3 and err.value.epoch == 0
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "metrics.json").exists()


def test_loader_and_step_throughput(data):
    conf = small_conf(data["vocab_path"])
    rates = measure_loader_vs_step(data["files"], conf, max_batches=10, step_batches=3)
    assert rates["loader_rows_per_s"] > 0 and rates["step_rows_per_s"] > 0
    assert rates["bottleneck"] in ("loader", "model")
    cmp = measure_petastorm_vs_pyarrow(data["files"], conf, repeats=1)
    assert cmp["rows"] == 4 * 160
    assert cmp["petastorm_rows_per_s"] > 0 and cmp["pyarrow_rows_per_s"] > 0


def _read_split(files: list[str], split: str | None) -> dict[str, np.ndarray]:
    """The feature columns of ``split`` read with plain pyarrow, in file order (the expectation)."""
    tables = [pq.read_table(f.removeprefix("file://")) for f in files]
    table = pa.concat_tables(tables)
    if split is not None:
        table = table.filter(pa.compute.equal(table.column("split"), split))
    out = {}
    for c in FEATURE_COLUMNS:
        col = table.column(c).combine_chunks()
        out[c] = (np.asarray(col.flatten()).reshape(len(col), -1) if pa.types.is_list(col.type)
                  else np.asarray(col))
    return out


def _drain(loader) -> tuple[list[int], dict[str, np.ndarray]]:
    sizes, parts = [], {c: [] for c in FEATURE_COLUMNS}
    with loader:
        for batch in loader:
            assert set(batch) == set(FEATURE_COLUMNS)
            assert all(isinstance(v, torch.Tensor) for v in batch.values())
            sizes.append(int(batch["hist_len"].shape[0]))
            for c in FEATURE_COLUMNS:
                parts[c].append(batch[c].numpy())
    return sizes, {c: np.concatenate(v) for c, v in parts.items()}


def _by_row(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows sorted by their (unique, random) pp_features, so two reads compare as multisets."""
    order = np.lexsort(cols["pp_features"].T[::-1])
    return {c: v[order] for c, v in cols.items()}


@pytest.mark.parametrize("split,shuffle,buffer,workers",
                         [("train", True, 100, 2), ("valid", False, 0, 1), (None, True, 0, 2), (None, False, 0, 2)])
def test_loader_yields_every_row_of_the_split_once(data, split, shuffle, buffer, workers):
    want = _read_split(data["files"], split)
    sizes, got = _drain(make_loader(data["files"], split, 64, seed=5, shuffle=shuffle, workers=workers,
                                    shuffle_buffer=buffer))
    n = len(want["hist_len"])
    assert sum(sizes) == n and all(s == 64 for s in sizes[:-1]) and 0 < sizes[-1] <= 64
    for c in FEATURE_COLUMNS:
        assert got[c].dtype == want[c].dtype and got[c].shape == want[c].shape, c
    assert got["hist_product"].shape == (n, L) and got["cand_products"].shape == (n, C)
    w, g = _by_row(want), _by_row(got)
    for c in FEATURE_COLUMNS:
        np.testing.assert_array_equal(g[c], w[c], err_msg=c)
    if not shuffle and workers == 1:  # file order, row group order
        np.testing.assert_array_equal(got["pp_features"], want["pp_features"])


def test_loader_shuffle_is_seeded(data):
    def order(seed: int) -> np.ndarray:
        return _drain(make_loader(data["files"], "train", 64, seed=seed, shuffle=True, workers=1,
                                  shuffle_buffer=100))[1]["pp_features"][:, 0]

    first, again, other = order(3), order(3), order(4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    unshuffled = _read_split(data["files"], "train")["pp_features"][:, 0]
    assert not np.array_equal(first, unshuffled) and np.array_equal(np.sort(first), np.sort(unshuffled))
    # rows of different row groups meet in one batch: the buffer mixes across files
    per_file = [set(_read_split([f], "train")["pp_features"][:, 0].tolist()) for f in data["files"]]
    batches = first[: (len(first) // 64) * 64].reshape(-1, 64)
    assert any(sum(bool(set(b.tolist()) & s) for s in per_file) > 1 for b in batches)


def test_split_files_are_pruned_by_footer_statistics(data, tmp_path):
    """Files holding one split each: the other split's files are not read, the rows are the same."""
    files = []
    for i, f in enumerate(data["files"][:2]):
        table = pq.read_table(f.removeprefix("file://"))
        for split in ("train", "valid"):
            part = table.filter(pa.compute.equal(table.column("split"), split))
            path = tmp_path / f"part-{i}-{split}.parquet"
            pq.write_table(part, path)
            files.append("file://" + str(path))
    files.append(data["files"][2])  # a mixed file stays for both splits
    train = files_for_split(files, "train")
    assert train == [files[0], files[2], files[4]]
    assert files_for_split(files, "valid") == [files[1], files[3], files[4]]
    assert files_for_split(files, None) == files
    assert files_for_split(files, "test") == [files[4]]
    assert files_for_split(files[:4], "test") == files[:4]  # nothing would be left: keep all, the mask decides
    for split in ("train", "valid"):
        _, got = _drain(make_loader(files, split, 64, seed=1, shuffle=False, workers=1))
        want = _read_split(files, split)
        for c in FEATURE_COLUMNS:
            np.testing.assert_array_equal(_by_row(got)[c], _by_row(want)[c], err_msg=c)


def test_arrow_columns_to_numpy_nulls_and_ragged_lists():
    ints = pa.chunked_array([pa.array([1, None, 3], pa.int32())])
    np.testing.assert_array_equal(arrow_column_numpy("hist_len", ints), [1, 0, 3])
    lists = pa.array([[1, 2], [3, None], [5, 6]], pa.list_(pa.int32())).slice(1)
    got = arrow_column_numpy("hist_product", lists)
    assert got.shape == (2, 2) and got.dtype == np.int32
    np.testing.assert_array_equal(got, [[3, 0], [5, 6]])
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float32)), 3)
    np.testing.assert_array_equal(arrow_column_numpy("pp_features", fixed), np.arange(6).reshape(2, 3))
    with pytest.raises(ValueError, match="different lengths"):
        arrow_column_numpy("hist_product", pa.array([[1, 2], [3]], pa.list_(pa.int32())))
    with pytest.raises(ValueError, match="null arrays"):
        arrow_column_numpy("hist_product", pa.array([[1, 2], None], pa.list_(pa.int32())))


def test_two_process_torch_distributor(spark, data, tmp_path):
    conf = small_conf(data["vocab_path"], max_epochs=1)
    metrics = run_training(data["files"], conf, str(tmp_path), num_processes=2, use_gpu=False)
    assert metrics["world_size"] == 2
    assert (tmp_path / "model.pt").exists() and (tmp_path / "metrics.json").exists()
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["world_size"] == 2 and np.isfinite(on_disk["epochs"][0]["train_loss"])
    # Both ranks' shards were trained on: every train row was seen exactly once or the
    # ranks stopped together at the shorter shard.
    assert 0 < on_disk["epochs"][0]["train_rows"] <= 4 * 160


def test_nan_in_distributed_child_maps_to_non_finite_loss_error(data, tmp_path, monkeypatch):
    """TorchDistributor hides a child's exception; the entry point returns it as data instead.

    Runs the entry point in-process through a stand-in distributor (a real 2-process run is
    test_two_process_torch_distributor) to keep this file fast.
    """
    import pyspark.ml.torch.distributor as distributor_mod

    from streamrank.train_worker import distributed_entry

    class InProcessDistributor:
        def __init__(self, num_processes: int, local_mode: bool, use_gpu: bool):
            assert num_processes == 2 and local_mode and not use_gpu

        def run(self, fn, *args):
            assert fn is distributed_entry
            return fn(*args)

    monkeypatch.setattr(distributor_mod, "TorchDistributor", InProcessDistributor)
    conf = small_conf(data["vocab_path"], inject_nan_at_step=1)
    with pytest.raises(NonFiniteLossError) as err:
        run_training(data["files"], conf, str(tmp_path), num_processes=2, use_gpu=False)
    assert err.value.step == 1 and err.value.epoch == 0
    assert not (tmp_path / "model.pt").exists()


def test_pyfunc_registers_and_loads_in_fresh_process(data, trained, tmp_path):
    import mlflow

    from streamrank.pyfunc_model import CONTEXT_COLUMNS, build_input_example, log_model

    db = tmp_path / "mlflow.db"
    mlflow.set_tracking_uri("sqlite:///" + str(db))
    try:
        exp = mlflow.create_experiment("streamrank-test", artifact_location=(tmp_path / "artifacts").as_uri())
        vocab = json.loads(Path(data["vocab_path"]).read_text())
        example = build_input_example(vocab, n_viewers=3, history=5, n_candidates=4)
        with mlflow.start_run(experiment_id=exp):
            info = log_model(str(trained["out"]), data["vocab_path"], example,
                             registered_model_name="streamrank-test",
                             calibrator_path=str(trained["out"] / "calibrator.json"))
        assert info.registered_model_version == 1
    finally:
        mlflow.set_tracking_uri(None)

    example_path = tmp_path / "example.json"
    example.to_json(example_path, orient="records")
    script = textwrap.dedent(f"""
        import json, sys
        import mlflow, pandas as pd
        mlflow.set_tracking_uri({("sqlite:///" + str(db))!r})
        model = mlflow.pyfunc.load_model("models:/streamrank-test/1")
        df = pd.read_json({str(example_path)!r}, orient="records")
        out = model.predict(df)
        bare = model.predict(df.drop(columns={list(CONTEXT_COLUMNS)!r}))
        print(json.dumps({{**out.to_dict(orient="list"), "bare_score": bare["score"].tolist()}}))
    """)
    # The model is logged as code: it must load where MLflow refuses to unpickle anything.
    env = {**os.environ, "PYTHONPATH": "", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["viewer_id"]) == 3 * 4
    assert out["product_id"][:4] == example["candidates"][0]
    probs = np.array(out["purchase_prob"] + out["intent_score"])
    assert ((probs >= 0) & (probs <= 1)).all()
    assert np.isfinite(out["score"]).all()
    assert len(set(out["intent_score"][:4])) == 1  # one viewer-level intent per viewer
    # The stream-context columns are optional in the signature; without them scores change (the
    # model uses the slot context) but stay finite, one per (viewer, candidate).
    assert len(out["bare_score"]) == 3 * 4 and np.isfinite(out["bare_score"]).all()
    assert not np.allclose(out["bare_score"], out["score"])
