"""Training on a GPU box: samples/s, GPU utilisation, and whether the Petastorm loader keeps up.

The GPU machine a team gets for training usually has torch and CUDA but no Spark, Java or Delta
log reader, and the training worker is built to need none of them (``train_worker`` takes a file
list and a plain conf). So this benchmark has two steps:

``bundle`` (where the warehouse is, with Spark)::

    python tests/benchmarks/bench_gpu.py bundle --date 2026-11-07 --out DIR [--set warehouse.root=W]

copies the exact Parquet files of the gold/training_examples snapshot for D (Delta version and
rows per split in ``manifest.json``), the vocabularies of D as ``vocab.json`` and the worker conf
``train`` would hand the worker as ``conf.json``.

``run`` (on the GPU box; needs torch, numpy, pyarrow, petastorm, tqdm)::

    python tests/benchmarks/bench_gpu.py run --bundle DIR --report report.json \\
        [--variant NAME:key=value,key=value ...] [--epochs N]

measures, on that machine:

* ``loader``: Petastorm vs plain pyarrow into torch tensors over the bundle (its CPU side);
* per variant, ``loader_vs_step``: train-split loader rows/s vs forward+backward+AdamW rows/s of
  the model on the GPU (batches already on the device) - the loader must be >= 3x;
* per variant, a full ``train_worker`` run (early stopping as configured, at most ``--epochs``)
  with NVML sampling the GPU every 0.2 s: samples/s per epoch (loader included, as training sees
  it), GPU utilisation and memory over the run, validation NDCG@10 and intent AUC.

Without CUDA ``run`` stops with exit 2: CPU figures come from ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any


# ----------------------------------------------------------------------------- bundle (Spark side)
def bundle(args: argparse.Namespace) -> int:
    import datetime as dt

    from streamrank.config import load_config
    from streamrank.context import Context
    from streamrank.train import TRAINING_TABLE, export_vocab, split_rows, worker_conf

    cfg = load_config(args.conf, args.set)
    ctx = Context(cfg)
    date = dt.date.fromisoformat(args.date)
    table = ctx.table(TRAINING_TABLE)
    version = table.version()
    files = table.files(version, partitions={"as_of_date": date})
    if not files:
        print(f"{TRAINING_TABLE} has no files for as_of_date {date} (version {version})", file=sys.stderr)
        return 5
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "files").mkdir(parents=True)
    names = []
    for i, f in enumerate(files):
        src = f.removeprefix("file://")
        name = f"part-{i:05d}.parquet"
        shutil.copyfile(src, out / "files" / name)
        names.append(name)
    vocab = export_vocab(ctx, date, out)
    conf = worker_conf(ctx, vocab)
    conf["model"]["vocab_path"] = "vocab.json"  # relative to the bundle; run() resolves it
    splits = split_rows(table, version, date)
    (out / "conf.json").write_text(json.dumps(conf, indent=2, default=str))
    (out / "manifest.json").write_text(json.dumps({
        "table": TRAINING_TABLE, "version": version, "as_of_date": date.isoformat(), "files": names,
        "source_files": files, "rows_per_split": splits,
        "bytes": sum((out / "files" / n).stat().st_size for n in names)}, indent=2))
    print(f"bundle {out}: {len(names)} files of {TRAINING_TABLE} v{version} as_of_date {date}, rows {splits}")
    return 0


# ----------------------------------------------------------------------------- run (GPU side)
class GpuSampler:
    """Polls NVML (utilisation %, memory used) every ``period`` seconds in a thread."""

    def __init__(self, period: float = 0.2) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        # torch's cuda:0 is the first visible device, named by index or by UUID
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        self._handle = (pynvml.nvmlDeviceGetHandleByUUID(first) if first.startswith(("GPU-", "MIG-"))
                        else pynvml.nvmlDeviceGetHandleByIndex(int(first)))
        self.name = pynvml.nvmlDeviceGetName(self._handle)
        self.period = period
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            u = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            m = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            self.samples.append((time.perf_counter(), int(u.gpu), int(m.used)))
            self._stop.wait(self.period)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        util = [s[1] for s in self.samples]
        return {"gpu": self.name, "samples": len(util),
                "util_mean_pct": statistics.fmean(util) if util else None,
                "util_median_pct": statistics.median(util) if util else None,
                "mem_used_max_mib": max(s[2] for s in self.samples) / 2**20 if self.samples else None}


def _parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    overrides = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    return name, overrides


def _apply(conf: dict, overrides: dict[str, str]) -> dict:
    """``section.key=value`` overrides (YAML scalars) on a copy of the worker conf."""
    import copy

    import yaml

    conf = copy.deepcopy(conf)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if not name:
            raise SystemExit(f"override {key!r}: expected section.key=value")
        conf.setdefault(section, {})[name] = yaml.safe_load(value)
    return conf


def run(args: argparse.Namespace) -> int:
    import torch

    from streamrank.train_worker import measure_loader_vs_step, measure_petastorm_vs_pyarrow, train_worker

    if not torch.cuda.is_available():
        print("bench_gpu run: CUDA is not available on this machine (CPU figures come from `make bench`)", file=sys.stderr)
        return 2
    root = Path(args.bundle).resolve()
    manifest = json.loads((root / "manifest.json").read_text())
    base = json.loads((root / "conf.json").read_text())
    base["model"]["vocab_path"] = str(root / base["model"]["vocab_path"])
    files = ["file://" + str(root / "files" / n) for n in manifest["files"]]
    report: dict[str, Any] = {
        "bundle": manifest, "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0), "cpu_count": os.cpu_count(), "variants": []}
    cmp = measure_petastorm_vs_pyarrow(files, base, repeats=3)
    report["loader"] = cmp
    print(f"loader: petastorm {cmp['petastorm_rows_per_s']:.0f} rows/s, pyarrow {cmp['pyarrow_rows_per_s']:.0f} rows/s, "
          f"ratio {cmp['petastorm_to_pyarrow_ratio']:.2f}", flush=True)
    variants = [_parse_variant(v) for v in args.variant] or [("default", {})]
    for name, overrides in variants:
        conf = _apply(base, {"train.use_gpu": "true", "train.progress": "false", "train.max_epochs": str(args.epochs),
                             **overrides})
        lvs = measure_loader_vs_step(files, conf, max_batches=None, step_batches=20)
        out_dir = Path(args.workdir or "/tmp") / f"bench-gpu-{name}"
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with GpuSampler() as sampler:
            metrics = train_worker(files, conf, str(out_dir))
        wall = time.perf_counter() - t0
        epochs = metrics["epochs"]
        rec = {
            "name": name, "overrides": overrides, "wall_s": wall,
            "loader_rows_per_s": lvs["loader_rows_per_s"], "step_rows_per_s": lvs["step_rows_per_s"],
            "loader_to_step_ratio": lvs["loader_to_step_ratio"], "bottleneck": lvs["bottleneck"],
            "train_samples_per_s": [e["samples_per_s"] for e in epochs],
            "train_seconds": [e["train_seconds"] for e in epochs],
            "eval_seconds": [e["eval_seconds"] for e in epochs],
            "ndcg_at_10": [e.get("ndcg_at_10") for e in epochs],
            "intent_auc": [e.get("intent_auc") for e in epochs],
            "best_epoch": metrics["best_epoch"], "best_ndcg_at_10": metrics.get("ndcg_at_10"),
            "best_intent_auc": metrics.get("intent_auc"), "amp": metrics.get("amp"),
            "n_parameters": metrics.get("n_parameters"),
            "torch_peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20,
            **{f"nvml_{k}": v for k, v in sampler.summary().items()},
        }
        report["variants"].append(rec)
        print(f"{name}: {statistics.median(rec['train_samples_per_s']):.0f} samples/s (median epoch), "
              f"loader/step {rec['loader_to_step_ratio']:.2f} ({rec['bottleneck']} bound), "
              f"GPU util mean {rec['nvml_util_mean_pct']:.0f}%, peak {rec['torch_peak_mem_mib']:.0f} MiB, "
              f"best epoch {rec['best_epoch']} NDCG@10 {rec['best_ndcg_at_10']:.4f} AUC {rec['best_intent_auc']:.4f}, "
              f"{wall:.0f} s", flush=True)
        Path(args.report).write_text(json.dumps(report, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bundle", help="copy a training snapshot, its vocab and the worker conf (needs Spark)")
    b.add_argument("--date", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--conf", default=None)
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r = sub.add_parser("run", help="measure training on this machine's GPU (no Spark)")
    r.add_argument("--bundle", required=True)
    r.add_argument("--report", required=True)
    r.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...")
    r.add_argument("--epochs", type=int, default=10)
    r.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    return bundle(args) if args.cmd == "bundle" else run(args)


if __name__ == "__main__":
    sys.exit(main())
