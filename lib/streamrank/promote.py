"""`streamrank promote`: the promotion gate, forced promotion and rollback (MLflow aliases).

Nobody promotes a model on faith. The gate reads the figures `evaluate` recorded in
ops/model_eval - the latest evaluation of the challenger version, and the champion and
most-popular figures of THAT SAME evaluation (same holdout, same protocol) - and decides
with a pure function, `gate_decision`, so the rules are testable on crafted numbers:

1. a scored sample has no NaN or inf: the evaluation pushed up to 200 holdout rows through
   the registered pyfunc, and promote scores the model's logged input example once more
   right before moving the alias (the artifact that goes live is the one that was checked);
2. with a champion: challenger ndcg_at_10 >= champion ndcg_at_10 * (1 + gate.min_uplift)
   and challenger intent_auc >= champion intent_auc - gate.auc_tolerance;
3. without a champion (the very first model): challenger ndcg_at_10 > most_popular ndcg_at_10;
4. the evaluation is of a date no earlier than the challenger's training date (as_of_date
   tag): a model trained as of D+1 has seen D's holdout, so its figures there flatter it.

Pass: alias `champion` moves to the challenger, the old champion gets `previous`, the
version is tagged with the gate's figures. Fail: nothing moves, the challenger is tagged
with the reasons and ModelGateError (exit 4) tells the nightly to go on with the current
champion. `--version N --force --reason TEXT` skips the gate (tags who and why) and
`--rollback` swaps `champion` and `previous`. Every run, alias change or not, is one row
in ops/job_runs (stage "promote") whose message says what moved.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from streamrank.config import Config
from streamrank.context import Context, StageRun, stage_run
from streamrank.errors import MissingInputError, ModelGateError, UsageError
from streamrank.registry import CHALLENGER, CHAMPION, PREVIOUS, ModelRef, by_alias, by_version, set_alias, setup_mlflow, tag_version

MODEL_EVAL = "ops/model_eval"


# ----------------------------------------------------------------------------- the pure gate

def _num(figures: Mapping[str, Any] | None, key: str) -> float | None:
    """A finite figure or None (missing, None, NaN and inf all mean "no usable figure")."""
    if not figures or figures.get(key) is None:
        return None
    try:
        value = float(figures[key])
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _setting(cfg: Config | Mapping[str, Any], key: str) -> float:
    return float(cfg[key])


def gate_decision(challenger: Mapping[str, Any], champion: Mapping[str, Any] | None, baseline: Mapping[str, Any],
                  cfg: Config | Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Decide whether the challenger may become champion; (passed, reasons it failed).

    Inputs are metric dicts as recorded by `evaluate` (unprefixed keys): the challenger's
    (plus ``sample_rows`` / ``sample_nonfinite`` of the scored sample), the champion's from
    the same evaluation or None when there is no champion, and the most-popular baseline's.
    ``cfg`` supplies ``gate.min_uplift`` and ``gate.auc_tolerance``. Rules, all must hold:

    - scored sample: ``sample_rows >= 1`` and ``sample_nonfinite == 0``, and no non-finite
      output on the holdout (``nonfinite_outputs``, when present, is 0);
    - the challenger has a finite ``ndcg_at_10``;
    - champion present: ``ndcg_at_10 >= champion.ndcg_at_10 * (1 + min_uplift)``; and when
      the champion has an ``intent_auc`` (the holdout had both classes),
      ``intent_auc >= champion.intent_auc - auc_tolerance`` (a challenger without one fails);
    - no champion: ``ndcg_at_10 > baseline.ndcg_at_10`` (strictly beats most-popular).

    An empty reasons list means passed.
    """
    uplift = _setting(cfg, "gate.min_uplift")
    tolerance = _setting(cfg, "gate.auc_tolerance")
    reasons: list[str] = []

    rows, bad = _num(challenger, "sample_rows"), _num(challenger, "sample_nonfinite")
    if rows is None or bad is None:
        reasons.append("no scored sample: the model's outputs were not checked for NaN/inf (re-run evaluate)")
    elif rows < 1:
        reasons.append("the scored sample is empty: the model's outputs were not checked for NaN/inf")
    elif bad > 0:
        reasons.append(f"scored sample has {int(bad)} NaN/inf outputs in {int(rows)} rows")
    holdout_bad = _num(challenger, "nonfinite_outputs")
    if holdout_bad is not None and holdout_bad > 0:
        reasons.append(f"{int(holdout_bad)} NaN/inf outputs while scoring the holdout")

    ndcg = _num(challenger, "ndcg_at_10")
    if ndcg is None:
        reasons.append("challenger has no ndcg_at_10 (no ranked holdout rows)")
    if champion is not None:
        champ_ndcg = _num(champion, "ndcg_at_10")
        if champ_ndcg is None:
            reasons.append("champion has no ndcg_at_10 on this holdout: the two cannot be compared")
        elif ndcg is not None:
            required = champ_ndcg * (1.0 + uplift)
            if ndcg < required:
                reasons.append(f"ndcg_at_10 {ndcg:.4f} < champion {champ_ndcg:.4f} x (1 + {uplift:g}) = {required:.4f}")
        champ_auc = _num(champion, "intent_auc")
        auc = _num(challenger, "intent_auc")
        if champ_auc is not None:
            if auc is None:
                reasons.append(f"challenger has no intent_auc, champion has {champ_auc:.4f}")
            elif auc < champ_auc - tolerance:
                reasons.append(f"intent_auc {auc:.4f} < champion {champ_auc:.4f} - {tolerance:g} = {champ_auc - tolerance:.4f}")
    else:
        base = _num(baseline, "ndcg_at_10")
        if base is None:
            reasons.append("first model: no most_popular ndcg_at_10 to beat (re-run evaluate)")
        elif ndcg is not None and not ndcg > base:
            reasons.append(f"first model: ndcg_at_10 {ndcg:.4f} does not beat most_popular {base:.4f}")
    return not reasons, reasons


# ----------------------------------------------------------------------------- evaluation rows

def latest_evaluation(ctx: Context, version: str, date: dt.date | None) -> dict[str, Any] | None:
    """The newest evaluation of a model version in ops/model_eval (of `date` if given).

    Returns {"run_date", "run_id", "recorded_at", "figures": {candidate: {metric: value}},
    "versions": {candidate: model_version}}, or None. Rows of one evaluation share run_date
    and run_id; the newest by recorded_at wins.
    """
    name = ctx.cfg["mlflow.model_name"]
    rows = [r for r in ctx.table(MODEL_EVAL).to_arrow().to_pylist() if r["model_name"] == name]
    mine = [r for r in rows if r["candidate"] == "challenger" and r["model_version"] == str(version)
            and (date is None or r["run_date"] == date)]
    if not mine:
        return None
    newest = max(mine, key=lambda r: (r["recorded_at"], r["run_date"]))
    key = (newest["run_date"], newest["run_id"])
    out: dict[str, Any] = {"run_date": key[0], "run_id": key[1], "recorded_at": newest["recorded_at"],
                           "mlflow_run_id": newest["mlflow_run_id"], "figures": {}, "versions": {}}
    for r in rows:
        if (r["run_date"], r["run_id"]) == key:
            out["figures"].setdefault(r["candidate"], {})[r["metric"]] = r["value"]
            out["versions"][r["candidate"]] = r["model_version"]
    return out


def example_check(ref: ModelRef, workdir: str) -> tuple[int, int, str | None]:
    """Score the version's logged input example through its pyfunc: (rows, NaN/inf count, error).

    Run right before the alias moves so the exact artifact that goes live has loaded and
    produced finite numbers; a model that cannot load is reported, not raised.
    """
    import mlflow
    import numpy as np
    from mlflow.models import Model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one summary line per stage, not bars
    saved = list(sys.path)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=workdir)
        example = Model.load(local).load_input_example(local)
        if example is None:
            return 0, 0, None
        out = mlflow.pyfunc.load_model(local).predict(example)
        values = out[["score", "purchase_prob", "intent_score"]].to_numpy(dtype=np.float64)
        return len(example), int((~np.isfinite(values)).sum()), None
    except Exception as exc:  # noqa: BLE001 - a broken artifact is a gate failure, not a crash
        return 0, 0, f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        sys.path[:] = saved


# ----------------------------------------------------------------------------- alias moves

def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _move_champion(ctx: Context, new: ModelRef, old: ModelRef | None, run: StageRun) -> str:
    """champion -> new, previous -> old (if any); returns the 'what moved' message."""
    set_alias(ctx.cfg, CHAMPION, new.version)
    if old is not None and old.version != new.version:
        set_alias(ctx.cfg, PREVIOUS, old.version)
        moved = f"champion v{old.version} -> v{new.version}; previous -> v{old.version}"
    else:
        moved = f"champion (none) -> v{new.version}"
    run.metrics.update({"champion": new.version, "previous": old.version if old else None})
    return moved


def gated_promote(ctx: Context, run: StageRun, date: dt.date | None, version: str | None = None) -> dict[str, Any]:
    """Gate the challenger (or version N) on its latest evaluation; move aliases on pass."""
    cfg = ctx.cfg
    challenger = by_version(cfg, version) if version is not None else by_alias(cfg, CHALLENGER)
    if challenger is None:
        what = f"version {version}" if version is not None else f"a version with alias {CHALLENGER!r}"
        raise MissingInputError(f"model {cfg['mlflow.model_name']!r} has no {what}; run `streamrank train` first")
    run.mlflow_run_id = challenger.run_id
    champion = by_alias(cfg, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        run.metrics.update({"gate": "already_champion", "champion": champion.version})
        run.message = f"v{challenger.version} already is the champion: nothing moved"
        return {"passed": True, "moved": False, "reasons": [], "version": challenger.version}

    evaluation = latest_evaluation(ctx, challenger.version, date)
    run.read(MODEL_EVAL, ctx.table(MODEL_EVAL).version())
    if evaluation is None:
        when = f" for {date}" if date else ""
        raise MissingInputError(f"{MODEL_EVAL} has no evaluation of v{challenger.version}{when}; "
                                f"run `streamrank evaluate --date {date or 'D'}` first")
    figures = evaluation["figures"]
    chal = dict(figures.get("challenger", {}))
    champ = figures.get("champion") if champion is not None else None
    extra: list[str] = []
    if champion is not None and evaluation["versions"].get("champion") != champion.version:
        evaluated = evaluation["versions"].get("champion")
        extra.append(f"the evaluation of {evaluation['run_date']} compared against champion "
                     f"{'v' + evaluated if evaluated else 'none'}, but the champion now is v{champion.version} "
                     "(re-run evaluate)")
        champ = figures.get("champion") if evaluated == champion.version else {}

    if challenger.trained_after(evaluation["run_date"]):
        # e.g. evaluate re-run for an older night: its holdout days are in this model's training data
        trained_on = challenger.trained_as_of
        extra.append(f"the evaluation of {evaluation['run_date']} is on a holdout that v{challenger.version} trained on "
                     f"(it was trained as of {trained_on}): run `streamrank evaluate --date {trained_on}`")

    workdir = tempfile.mkdtemp(prefix="promote-", dir=cfg.warehouse)
    try:
        rows, bad, error = example_check(challenger, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if error:
        extra.append(f"the registered pyfunc failed on its input example: {error}")
    chal["sample_rows"] = (_num(chal, "sample_rows") or 0.0) + rows
    chal["sample_nonfinite"] = (_num(chal, "sample_nonfinite") or 0.0) + bad

    passed, reasons = gate_decision(chal, champ, figures.get("most_popular", {}), cfg)
    reasons = extra + reasons
    passed = not reasons
    gate_tags: dict[str, Any] = {
        "gate.passed": str(passed).lower(), "gate.evaluated_on": evaluation["run_date"],
        "gate.evaluation_run_id": evaluation["run_id"], "gate.checked_at": _now(),
        "gate.min_uplift": cfg["gate.min_uplift"], "gate.auc_tolerance": cfg["gate.auc_tolerance"],
        "gate.ndcg_at_10": chal.get("ndcg_at_10"), "gate.intent_auc": chal.get("intent_auc"),
        "gate.sample_rows": chal.get("sample_rows"), "gate.sample_nonfinite": chal.get("sample_nonfinite"),
        "gate.champion_version": champion.version if champion else "none",
    }
    if champion is not None:
        gate_tags.update({"gate.champion_ndcg_at_10": (champ or {}).get("ndcg_at_10"),
                          "gate.champion_intent_auc": (champ or {}).get("intent_auc")})
    else:
        gate_tags["gate.most_popular_ndcg_at_10"] = figures.get("most_popular", {}).get("ndcg_at_10")
    gate_tags = {k: ("none" if v is None else v) for k, v in gate_tags.items()}
    r4 = lambda v: None if v is None else round(float(v), 4)  # noqa: E731
    run.metrics.update({"gate": "passed" if passed else "failed", "challenger": challenger.version,
                        "ndcg_at_10": r4(chal.get("ndcg_at_10")), "champion_ndcg_at_10": r4((champ or {}).get("ndcg_at_10"))})
    if not passed:
        tag_version(cfg, challenger.version, {**gate_tags, "gate.reasons": "; ".join(reasons)[:4000]})
        run.metrics["champion"] = champion.version if champion else None
        run.message = f"gate not passed, nothing moved (champion {'v' + champion.version if champion else 'none'})"
        raise ModelGateError(f"challenger v{challenger.version} not promoted: " + "; ".join(reasons))
    tag_version(cfg, challenger.version, {**gate_tags, "promoted_at": _now(), "promoted_by": getpass.getuser(),
                                          "promoted_from": champion.version if champion else "none"})
    run.message = _move_champion(ctx, challenger, champion, run) + " (gate passed)"
    return {"passed": True, "moved": True, "reasons": [], "version": challenger.version}


def force_promote(ctx: Context, run: StageRun, version: str, reason: str) -> dict[str, Any]:
    """Make version N the champion without the gate; tag who and why."""
    cfg = ctx.cfg
    target = by_version(cfg, version)
    if target is None:
        raise MissingInputError(f"model {cfg['mlflow.model_name']!r} has no version {version}")
    run.mlflow_run_id = target.run_id
    champion = by_alias(cfg, CHAMPION)
    who = getpass.getuser()
    run.metrics.update({"gate": "forced", "forced_by": who})
    if champion is not None and champion.version == target.version:
        run.metrics["champion"] = target.version
        run.message = f"v{target.version} already is the champion: nothing moved (forced by {who}: {reason})"
        return {"moved": False, "version": target.version}
    tag_version(cfg, target.version, {"forced": "true", "forced_by": who, "forced_reason": reason, "forced_at": _now(),
                                      "promoted_from": champion.version if champion else "none"})
    run.message = _move_champion(ctx, target, champion, run) + f" (forced by {who}: {reason})"
    return {"moved": True, "version": target.version}


def rollback(ctx: Context, run: StageRun) -> dict[str, Any]:
    """champion <- previous, previous <- the champion it replaces (so a second rollback undoes it)."""
    from mlflow import MlflowClient

    cfg = ctx.cfg
    previous = by_alias(cfg, PREVIOUS)
    if previous is None:
        raise MissingInputError(f"model {cfg['mlflow.model_name']!r} has no version with alias {PREVIOUS!r}: nothing to roll back to")
    champion = by_alias(cfg, CHAMPION)
    run.mlflow_run_id = previous.run_id
    who = getpass.getuser()
    set_alias(cfg, CHAMPION, previous.version)
    if champion is not None and champion.version != previous.version:
        set_alias(cfg, PREVIOUS, champion.version)
        moved = f"rollback: champion v{champion.version} -> v{previous.version}; previous -> v{champion.version}"
    else:
        MlflowClient().delete_registered_model_alias(cfg["mlflow.model_name"], PREVIOUS)
        moved = f"rollback: champion -> v{previous.version}; previous cleared"
    tag_version(cfg, previous.version, {"rolled_back_at": _now(), "rolled_back_by": who,
                                        "rolled_back_from": champion.version if champion else "none"})
    run.metrics.update({"gate": "rollback", "champion": previous.version,
                        "previous": champion.version if champion else None})
    run.message = moved + f" (by {who})"
    return {"moved": True, "version": previous.version}


# ----------------------------------------------------------------------------- entry points

def check_args(args: argparse.Namespace) -> None:
    """Usage rules the parser cannot express: --force needs --version and --reason, and so on."""
    version = getattr(args, "version", None)
    force = bool(getattr(args, "force", False))
    reason = getattr(args, "reason", None)
    roll = bool(getattr(args, "rollback", False))
    if roll and (version is not None or force):
        raise UsageError("--rollback cannot be combined with --version or --force")
    if force and version is None:
        raise UsageError("--force needs --version N (which version to make champion)")
    if force and not (reason and reason.strip()):
        raise UsageError("--force needs --reason TEXT (why the gate is skipped; it is tagged on the version)")
    if reason and not force:
        raise UsageError("--reason is only used with --force")
    if version is not None and int(version) < 1:
        raise UsageError(f"--version must be a registered version number >= 1, got {version}")


def promote(ctx: Context, date: dt.date | None = None, version: int | str | None = None, force: bool = False,
            reason: str | None = None, do_rollback: bool = False) -> dict[str, Any]:
    """One promote run (gate, forced or rollback), recorded in ops/job_runs as stage 'promote'."""
    check_args(argparse.Namespace(version=version, force=force, reason=reason, rollback=do_rollback))
    run_date = date or dt.datetime.now(dt.UTC).date()
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    with stage_run(ctx, "promote", run_date) as run:
        setup_mlflow(ctx.cfg)
        if do_rollback:
            return rollback(ctx, run)
        if force:
            return force_promote(ctx, run, str(version), str(reason).strip())
        return gated_promote(ctx, run, date, None if version is None else str(version))


def run(ctx: Context, args: argparse.Namespace) -> int:
    """CLI entry point: `streamrank promote [--date D] [--version N [--force --reason TEXT]] [--rollback]`."""
    check_args(args)
    promote(ctx, getattr(args, "date", None), getattr(args, "version", None), bool(getattr(args, "force", False)),
            getattr(args, "reason", None), bool(getattr(args, "rollback", False)))
    return 0
