"""`streamrank train --date D`: gold/training_examples -> Petastorm -> torch -> MLflow challenger.

The driver only decides WHAT to train on: the exact Parquet files of the
gold/training_examples snapshot for as_of_date D (its Delta version is recorded) and the
vocabularies of D. The worker (train_worker.py) needs nothing but that file list and a
plain conf dict, so it runs in-process, under TorchDistributor, or on a GPU box alike.
The result is logged to MLflow (params, conf, per-epoch metrics, table version, git
commit, the pyfunc model with signature and input example), registered under the
conf's model name and given the alias `challenger`, unless the challenger already is a model
trained as of a later date: `streamrank train --date X` for a past X registers its model but
does not turn the challenger back in time. `streamrank nightly` and `train --newest-only`
(a scheduler's train task) do not train such a night at all.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyspark.sql import functions as F

from streamrank.context import Context, stage_run
from streamrank.errors import InsufficientHistoryError, MissingInputError, OlderNightError, StreamrankError
from streamrank.registry import (
    CHALLENGER,
    ModelRef,
    by_alias,
    describe_version,
    git_commit,
    set_alias,
    setup_mlflow,
    tag_version,
)

TRAINING_TABLE = "gold/training_examples"

log = logging.getLogger(__name__)


class TrainingDivergedError(StreamrankError):
    """The loss became NaN or inf: nothing is registered (exit 1)."""


def product_categories(ctx: Context, date: dt.date, vocab: Mapping[str, Mapping[str, int]]) -> list[int]:
    """Category id of every product id of `vocab` (0 padding, 1 unknown), from its latest
    bronze/products row up to D: the lookup the model's item tower and evaluate's
    category-affinity baseline share."""
    products = ctx.table("bronze/products").read().filter(F.col("snapshot_date") <= F.lit(date))
    latest = products.groupBy("product_id").agg(F.max_by("category", "snapshot_date").alias("category"))
    product_ids, category_ids = vocab.get("product") or {}, vocab.get("category") or {}
    out = [1] * (max(product_ids.values(), default=1) + 1)
    out[0] = 0
    for r in latest.collect():
        idx = product_ids.get(r.product_id)
        if idx is not None:
            out[idx] = category_ids.get(r.category, 1)
    return out


def export_vocab(ctx: Context, date: dt.date, out: Path) -> Path:
    """Write the vocabularies of D (and product -> category index) as the model's vocab.json."""
    vocab = ctx.table("gold/vocabularies").read().filter(F.col("as_of_date") == F.lit(date))
    rows = vocab.select("kind", "token", "idx").collect()
    if not rows:
        raise MissingInputError(f"gold/vocabularies has no rows for as_of_date {date}; run `streamrank features --date {date}`")
    kinds: dict[str, dict[str, int]] = {"product": {}, "category": {}, "event": {}}
    for r in rows:
        kinds.setdefault(r.kind, {})[r.token] = int(r.idx)
    doc = {**kinds, "product_category": product_categories(ctx, date, kinds), "as_of_date": date.isoformat()}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "vocab.json"
    path.write_text(json.dumps(doc))
    return path


def split_rows(table: Any, version: int, date: dt.date) -> dict[str, int]:
    """Rows per split (train/valid/test) of the snapshot's as_of_date partition."""
    return dict(table.read(version).filter(F.col("as_of_date") == F.lit(date)).groupBy("split").count().collect())


def worker_conf(ctx: Context, vocab_path: Path) -> dict[str, Any]:
    """The plain conf the training worker gets: the run's conf plus the model's sequence length
    and vocab file, so the worker (in-process, torchrun child or a GPU box) needs nothing else."""
    conf = ctx.cfg.to_dict()
    conf["model"] = {**conf["model"], "seq_len": ctx.cfg["features.seq_len"], "vocab_path": str(vocab_path)}
    return conf


def _use_gpu(setting: Any) -> bool:
    import torch

    if str(setting).lower() == "auto":
        return torch.cuda.is_available()
    return str(setting).lower() in ("true", "1", "yes")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def train(ctx: Context, date: dt.date, newest_only: bool = False) -> dict[str, Any]:
    """Train and register D's model; with `newest_only`, refuse a night older than the challenger's.

    `newest_only` is the nightly's backfill rule for schedulers that run each stage as its
    own task: the refusal is an expected outcome (OlderNightError, exit 5) on which the
    scheduler skips train and the model stages after it.
    """
    import mlflow

    from streamrank.pyfunc_model import log_model
    from streamrank.train_worker import NonFiniteLossError, run_training

    with stage_run(ctx, "train", date) as run:
        newer = newer_challenger(ctx, date) if newest_only else None
        if newer is not None:
            run.metrics["challenger_trained_as_of"] = str(newer.trained_as_of)
            raise OlderNightError(backfill_note(date, newer))
        table = ctx.table(TRAINING_TABLE)
        version = table.version()
        files = table.files(version, partitions={"as_of_date": date})
        run.read(TRAINING_TABLE, version)
        if not files:
            raise InsufficientHistoryError(f"{TRAINING_TABLE} has no files for as_of_date {date} (version {version}): nothing to train on")
        splits = split_rows(table, version, date)
        run.metrics.update({f"{k}_rows": v for k, v in splits.items()})
        if not splits.get("train") or not splits.get("valid"):
            raise InsufficientHistoryError(
                f"{TRAINING_TABLE} as_of_date {date} has {splits.get('train', 0)} train and {splits.get('valid', 0)} valid rows; "
                "both are needed (a new warehouse needs a few days of history)"
            )
        work = Path(tempfile.mkdtemp(prefix=f"train-{date}-", dir=ctx.cfg.warehouse))
        try:
            vocab_path = export_vocab(ctx, date, work)
            conf = worker_conf(ctx, vocab_path)
            setup_mlflow(ctx.cfg)
            with mlflow.start_run(run_name=f"train-{date}") as active:
                run.mlflow_run_id = active.info.run_id
                mlflow.set_tags({"stage": "train", "as_of_date": date.isoformat(), "git_commit": git_commit(),
                                 "training_table": TRAINING_TABLE, "training_table_version": str(version),
                                 "streamrank_run_id": ctx.run_id})
                mlflow.log_params({k: v for k, v in _flat({"model": conf["model"], "train": conf["train"]}).items()
                                   if k != "model.vocab_path"})
                mlflow.log_params({"training_table_version": version, "training_files": len(files), **run.metrics})
                mlflow.log_dict(ctx.cfg.to_dict(), "conf.json")
                try:
                    metrics = run_training(files, conf, str(work / "out"), int(ctx.cfg["train.num_processes"]),
                                           _use_gpu(ctx.cfg["train.use_gpu"]))
                except NonFiniteLossError as exc:
                    mlflow.set_tags({"diverged": "true", "diverged_step": str(exc.step), "diverged_epoch": str(exc.epoch)})
                    raise TrainingDivergedError(f"training loss became non-finite at epoch {exc.epoch} step {exc.step}; "
                                                "nothing registered") from exc
                for epoch in metrics.get("epochs", []):
                    mlflow.log_metrics({k: float(v) for k, v in epoch.items()
                                        if isinstance(v, (int, float)) and v is not None and k != "epoch"},
                                       step=int(epoch.get("epoch", 0)))
                quality = ("ndcg_at_10", "hr_at_10", "intent_auc", "intent_logloss", "samples_per_s", "best_epoch")
                mlflow.log_metrics({f"best_{k}" if not k.startswith("best_") else k: float(metrics[k])
                                    for k in quality if isinstance(metrics.get(k), (int, float))})
                mlflow.log_dict(metrics, "train_metrics.json")
                calibrator = work / "out" / "calibrator.json"
                info = log_model(str(work / "out"), str(vocab_path), None,
                                 registered_model_name=ctx.cfg["mlflow.model_name"],
                                 calibrator_path=str(calibrator) if calibrator.exists() else None)
                model_version = str(info.registered_model_version)
                current = by_alias(ctx.cfg, CHALLENGER)
                takes = takes_challenger(current, date)
                if takes:
                    set_alias(ctx.cfg, CHALLENGER, model_version)
                tag_version(ctx.cfg, model_version, {"as_of_date": date, "training_table_version": version,
                                                     "git_commit": git_commit(), "streamrank_run_id": ctx.run_id})
                describe_version(ctx.cfg, model_version, version_description(date, version, model_version, splits, metrics))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        keep = ("ndcg_at_10", "hr_at_10", "intent_auc", "samples_per_s", "best_epoch")
        run.metrics.update({k: round(metrics[k], 4) if isinstance(metrics.get(k), float) else metrics.get(k) for k in keep})
        run.metrics["model_version"] = model_version
        run.metrics["challenger_version"] = model_version if takes else current.version
        name = ctx.cfg["mlflow.model_name"]
        if takes:
            run.message = f"registered {name} v{model_version} as {CHALLENGER}"
        else:
            run.message = (f"registered {name} v{model_version} (as of {date}); {CHALLENGER} stays v{current.version}, "
                           f"trained as of {current.trained_as_of}; to serve v{model_version} anyway: "
                           f"`streamrank promote --version {model_version} --force --reason TEXT`")
            log.warning(run.message)
        return {**metrics, "model_version": model_version, "mlflow_run_id": run.mlflow_run_id, "training_table_version": version,
                "split_rows": splits, "challenger_version": run.metrics["challenger_version"]}


def newer_challenger(ctx: Context, date: dt.date) -> ModelRef | None:
    """The challenger when it was trained as of a night after D (D is a backfill), else None."""
    current = by_alias(ctx.cfg, CHALLENGER)
    return current if current is not None and current.trained_after(date) else None


def backfill_note(date: dt.date, challenger: ModelRef) -> str:
    """Why a past night's model stages did not run, and how to train that night's model anyway."""
    return (f"model stages skipped: {date} is older than challenger v{challenger.version} (trained as of "
            f"{challenger.trained_as_of}); `streamrank train --date {date}` trains this night's model on purpose")


def takes_challenger(current: ModelRef | None, date: dt.date) -> bool:
    """Whether a model trained as of `date` becomes the challenger.

    `challenger` means the newest model, and evaluate and the gate read it. A model trained
    as of an earlier night than the current challenger's (a backfill, or a re-run of an old
    date) would put older knowledge up for promotion and hide the newer model, so it is
    registered and left without the alias. A re-run of the same date does take it.
    """
    return current is None or not current.trained_after(date)


def version_description(date: dt.date, table_version: int, model_version: str, splits: dict[str, int],
                        metrics: dict[str, Any]) -> str:
    """The registry's description of a trained version: its data, its validation figures, its next step."""
    def fig(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if not isinstance(value, (int, float)) else f"{value:.4f}"

    best = metrics.get("best_epoch")
    return (
        f"Trained by `streamrank train --date {date}` on {TRAINING_TABLE} version {table_version} "
        f"({splits.get('train', 0)} train and {splits.get('valid', 0)} validation rows; code {git_commit()[:12]}). "
        f"Validation on the {date - dt.timedelta(days=1)} -> {date} window: NDCG@10 {fig('ndcg_at_10')}, HR@10 {fig('hr_at_10')}, "
        f"intent AUC {fig('intent_auc')}; best of {len(metrics.get('epochs', []))} epochs: "
        f"{'n/a' if best is None else int(best) + 1}.\n\n"
        f"`streamrank evaluate --date {date}` scores it on the held-out test rows beside the champion and the "
        f"baselines; `streamrank promote --date {date}` then applies the gate, or `streamrank promote "
        f"--version {model_version} --force --reason TEXT` promotes it by hand."
    )


def run(ctx: Context, args: argparse.Namespace) -> int:
    train(ctx, args.date, newest_only=getattr(args, "newest_only", False))
    return 0
