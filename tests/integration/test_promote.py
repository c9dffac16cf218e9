"""The promotion gate on crafted metric sets, and the alias life cycle: gate, force, rollback.

The pure decision is tested on hand-made figures. The life cycle runs against a real
registry: one tiny trained model (v1, through streamrank.train on a small gold partition)
plus copies of it registered as further versions, with crafted ops/model_eval rows standing
in for `evaluate`, so each gate rule can be made to pass or fail on purpose.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json

import numpy as np
import pytest

from streamrank.cli import main
from streamrank.context import Context
from streamrank.errors import MissingInputError, ModelGateError, UsageError
from streamrank.promote import check_args, gate_decision, latest_evaluation, promote
from streamrank.registry import CHALLENGER, CHAMPION, PREVIOUS, by_alias, client, set_alias

CFG = {"gate.min_uplift": 0.05, "gate.auc_tolerance": 0.01}
OK_SAMPLE = {"sample_rows": 200.0, "sample_nonfinite": 0.0}


def chal(ndcg: float | None = 0.30, auc: float | None = 0.70, **extra: float) -> dict:
    return {"ndcg_at_10": ndcg, "intent_auc": auc, **OK_SAMPLE, **extra}


# ----------------------------------------------------------------------------- pure gate

def test_gate_passes_with_uplift_and_auc_within_tolerance():
    assert gate_decision(chal(0.315, 0.691), {"ndcg_at_10": 0.30, "intent_auc": 0.70}, {"ndcg_at_10": 0.9}, CFG) == (True, [])


def test_gate_fails_on_ndcg_uplift():
    ok, reasons = gate_decision(chal(0.314, 0.80), {"ndcg_at_10": 0.30, "intent_auc": 0.70}, {}, CFG)
    assert not ok and len(reasons) == 1 and "ndcg_at_10 0.3140 < champion 0.3000 x (1 + 0.05) = 0.3150" in reasons[0]


def test_gate_fails_on_auc():
    ok, reasons = gate_decision(chal(0.40, 0.689), {"ndcg_at_10": 0.30, "intent_auc": 0.70}, {}, CFG)
    assert not ok and reasons == ["intent_auc 0.6890 < champion 0.7000 - 0.01 = 0.6900"]


def test_gate_fails_on_nan_or_missing_sample():
    champ = {"ndcg_at_10": 0.30, "intent_auc": 0.70}
    ok, reasons = gate_decision({**chal(0.5, 0.8), "sample_nonfinite": 3.0}, champ, {}, CFG)
    assert not ok and reasons == ["scored sample has 3 NaN/inf outputs in 200 rows"]
    ok, reasons = gate_decision({"ndcg_at_10": 0.5, "intent_auc": 0.8}, champ, {}, CFG)
    assert not ok and "no scored sample" in reasons[0]
    ok, reasons = gate_decision({**chal(0.5, 0.8), "sample_nonfinite": float("nan")}, champ, {}, CFG)
    assert not ok and "no scored sample" in reasons[0]
    ok, reasons = gate_decision({**chal(0.5, 0.8), "nonfinite_outputs": 2.0}, champ, {}, CFG)
    assert not ok and "2 NaN/inf outputs while scoring the holdout" in reasons[0]


def test_gate_nan_metric_never_passes():
    ok, reasons = gate_decision(chal(float("nan"), 0.8), {"ndcg_at_10": 0.1, "intent_auc": 0.5}, {}, CFG)
    assert not ok and "challenger has no ndcg_at_10" in reasons[0]
    ok, reasons = gate_decision(chal(0.5, None), {"ndcg_at_10": 0.1, "intent_auc": 0.5}, {}, CFG)
    assert not ok and "challenger has no intent_auc" in reasons[0]


def test_gate_champion_without_auc_compares_ndcg_only():
    assert gate_decision(chal(0.5, None), {"ndcg_at_10": 0.4, "intent_auc": None}, {}, CFG) == (True, [])


def test_gate_first_model_must_beat_most_popular():
    assert gate_decision(chal(0.21), None, {"ndcg_at_10": 0.20}, CFG) == (True, [])
    ok, reasons = gate_decision(chal(0.20), None, {"ndcg_at_10": 0.20}, CFG)
    assert not ok and reasons == ["first model: ndcg_at_10 0.2000 does not beat most_popular 0.2000"]
    ok, reasons = gate_decision(chal(0.90), None, {}, CFG)
    assert not ok and "no most_popular" in reasons[0]


def test_gate_collects_every_failed_rule():
    ok, reasons = gate_decision({**chal(0.1, 0.1), "sample_nonfinite": 1.0}, {"ndcg_at_10": 0.3, "intent_auc": 0.7}, {}, CFG)
    assert not ok and len(reasons) == 3


def test_flag_rules():
    ns = lambda **kw: __import__("argparse").Namespace(**{"version": None, "force": False, "reason": None,  # noqa: E731
                                                          "rollback": False, **kw})
    check_args(ns(version=3, force=True, reason="hotfix"))
    check_args(ns(rollback=True))
    check_args(ns(version=2))
    for bad in (ns(force=True, reason="x"), ns(version=2, force=True), ns(version=2, force=True, reason="  "),
                ns(reason="x"), ns(rollback=True, force=True, version=1, reason="x"), ns(version=0)):
        with pytest.raises(UsageError):
            check_args(bad)


# ----------------------------------------------------------------------------- the life cycle

D = dt.date(2026, 11, 10)
L, C, T_ = 20, 16, 10
PRODUCTS = [f"P{i:04d}" for i in range(10, 40)]  # ids 2..31
EVENTS = ("enter_stream", "leave_stream", "view_product", "like", "comment", "share", "gift",
          "click_product", "add_to_cart", "purchase")


def world_rows() -> tuple[list[dict], list[dict], list[dict]]:
    """Vocabulary, catalogue and training examples of D: histories walk the ids in steps of 3."""
    vocab = [{"kind": k, "token": t, "idx": i, "as_of_date": D}
             for k in ("product", "category", "event") for t, i in (("<pad>", 0), ("<unk>", 1))]
    vocab += [{"kind": "product", "token": t, "idx": i + 2, "as_of_date": D} for i, t in enumerate(PRODUCTS)]
    vocab += [{"kind": "category", "token": f"cat{c}", "idx": c + 2, "as_of_date": D} for c in range(3)]
    vocab += [{"kind": "event", "token": e, "idx": i + 2, "as_of_date": D} for i, e in enumerate(EVENTS)]
    products = [{"product_id": t, "title": t, "category": f"cat{i % 3}", "brand": "b", "list_price": 5.0 + i,
                 "launch_date": dt.date(2026, 1, 1), "source_file": "p.csv", "line_number": i, "ingest_run_id": "t",
                 "snapshot_date": D} for i, t in enumerate(PRODUCTS)]
    rng = np.random.default_rng(5)
    n = len(PRODUCTS)
    examples = []
    for i in range(200):
        k = int(rng.integers(1, 10))
        s = int(rng.integers(0, n))
        walk = [(s + 3 * j) % n + 2 for j in range(k)]
        target = (walk[-1] - 2 + 3) % n + 2
        cands = [int(c) for c in rng.choice(np.arange(2, n + 2), C, replace=False)]
        if target not in cands:
            cands[0] = target
        examples.append({
            "viewer_id": f"v{i}", "cutoff_ts": dt.datetime(2026, 11, 9, tzinfo=dt.UTC),
            "hist_product": [0] * (L - k) + walk, "hist_category": [0] * (L - k) + [(w - 2) % 3 + 2 for w in walk],
            "hist_event": [0] * (L - k) + [4] * k, "hist_dwell": [0] * (L - k) + [3] * k,
            "hist_dt": [0.0] * (L - k) + [float(k - j) for j in range(k)], "hist_len": k,
            "pp_features": [float(x) for x in rng.random(8)], "target_product": target,
            "target_products": [target] + [0] * (T_ - 1), "cand_products": cands,
            "hist_host": [0] * L, "hist_hour": [0] * L, "cand_host": [0] * C, "cand_hour": [0] * C,  # no stream context
            "label_purchase": int(rng.random() < 0.2 + 0.05 * k), "as_of_date": D,
            "split": "train" if i < 150 else ("valid" if i % 2 == 0 else "test"),  # valid / test halves, as features
        })
    return vocab, products, examples


@pytest.fixture(scope="module")
def reg(spark, base_conf, tmp_path_factory):
    from streamrank.train import train

    root = tmp_path_factory.mktemp("promote")
    conf = base_conf.with_overrides({
        "warehouse.root": str(root / "warehouse"), "landing.root": str(root / "landing"), "train.max_epochs": 1,
        "train.batch_size": 64, "model.d_model": 16, "model.n_layers": 1, "model.num_negatives": 20,
        "features.seq_len": L, "gate.min_uplift": 0.05, "gate.auc_tolerance": 0.01,
    })
    ctx = Context(conf)
    vocab, products, examples = world_rows()
    ctx.table("gold/vocabularies").append_rows(vocab)
    ctx.table("bronze/products").append_rows(products)
    ctx.table("gold/training_examples").append_rows(examples)
    trained = train(ctx, D)
    assert trained["model_version"] == "1"
    return {"ctx": ctx, "conf": conf, "clock": [dt.datetime(2026, 11, 10, 1, 0, tzinfo=dt.UTC)]}


def copy_version(conf, of: str = "1") -> str:
    """Register another version of the same logged model (cheap: no training)."""
    c = client(conf)
    mv = c.get_model_version(conf["mlflow.model_name"], of)
    return str(c.create_model_version(conf["mlflow.model_name"], mv.source, run_id=mv.run_id).version)


def record(reg, version: str, figures: dict[str, dict], champion: str | None = None, date: dt.date = D) -> None:
    """Crafted ops/model_eval rows of one evaluation, newer than every earlier one."""
    reg["clock"][0] += dt.timedelta(minutes=1)
    run_id = f"eval-{reg['clock'][0]:%H%M}"
    versions = {"challenger": version, "champion": champion}
    rows = [{"run_id": run_id, "mlflow_run_id": "crafted", "model_name": reg["conf"]["mlflow.model_name"],
             "model_version": versions.get(cand), "candidate": cand, "metric": k, "value": v,
             "recorded_at": reg["clock"][0], "run_date": date}
            for cand, fig in figures.items() for k, v in fig.items()]
    reg["ctx"].table("ops/model_eval").append_rows(rows)


def aliases(conf) -> tuple[str | None, str | None]:
    champ, prev = by_alias(conf, CHAMPION), by_alias(conf, PREVIOUS)
    return (champ.version if champ else None, prev.version if prev else None)


def tags(conf, version: str) -> dict[str, str]:
    return client(conf).get_model_version(conf["mlflow.model_name"], version).tags


def test_life_cycle(reg):
    ctx, conf = reg["ctx"], reg["conf"]
    # no evaluation yet: nothing to gate on (exit 5)
    with pytest.raises(MissingInputError, match="no evaluation of v1"):
        promote(ctx, D)

    # first model, does not beat most-popular: nothing moves, reasons tagged
    record(reg, "1", {"challenger": chal(0.30, 0.7), "most_popular": {"ndcg_at_10": 0.35}})
    with pytest.raises(ModelGateError, match="does not beat most_popular") as err:
        promote(ctx, D)
    assert err.value.exit_code == 4 and aliases(conf) == (None, None)
    assert tags(conf, "1")["gate.passed"] == "false" and "most_popular 0.3500" in tags(conf, "1")["gate.reasons"]

    # a newer evaluation where it does: v1 becomes the first champion
    record(reg, "1", {"challenger": chal(0.40, 0.7), "most_popular": {"ndcg_at_10": 0.35}})
    assert latest_evaluation(ctx, "1", None)["figures"]["challenger"]["ndcg_at_10"] == 0.40
    promote(ctx, D)
    assert aliases(conf) == ("1", None)
    t1 = tags(conf, "1")
    assert t1["gate.passed"] == "true" and float(t1["gate.ndcg_at_10"]) == 0.40
    assert float(t1["gate.most_popular_ndcg_at_10"]) == 0.35 and float(t1["gate.sample_rows"]) > 200  # + the input example

    # v2 (challenger) short of the 5 % uplift: champion unchanged
    v2 = copy_version(conf)
    set_alias(conf, CHALLENGER, v2)
    record(reg, v2, {"challenger": chal(0.41, 0.72), "champion": {"ndcg_at_10": 0.40, "intent_auc": 0.70}}, champion="1")
    with pytest.raises(ModelGateError, match="ndcg_at_10 0.4100 < champion 0.4000"):
        promote(ctx, D)
    assert aliases(conf) == ("1", None)

    # enough uplift but AUC more than the tolerance below: still no
    record(reg, v2, {"challenger": chal(0.45, 0.68), "champion": {"ndcg_at_10": 0.40, "intent_auc": 0.70}}, champion="1")
    with pytest.raises(ModelGateError, match="intent_auc 0.6800"):
        promote(ctx, D)
    assert "intent_auc" in tags(conf, v2)["gate.reasons"]

    # passes on D; a newer, failing evaluation of another date does not count with --date D
    record(reg, v2, {"challenger": chal(0.45, 0.695), "champion": {"ndcg_at_10": 0.40, "intent_auc": 0.70}}, champion="1")
    record(reg, v2, {"challenger": chal(0.10, 0.5), "champion": {"ndcg_at_10": 0.40, "intent_auc": 0.70}}, champion="1",
           date=D + dt.timedelta(days=1))
    promote(ctx, D)
    assert aliases(conf) == (v2, "1")
    t2 = tags(conf, v2)
    assert t2["gate.passed"] == "true" and float(t2["gate.champion_ndcg_at_10"]) == 0.40 and t2["promoted_from"] == "1"

    # the challenger already is the champion: nothing to do
    assert promote(ctx, D)["moved"] is False

    # rollback twice: back and forth
    promote(ctx, do_rollback=True)
    assert aliases(conf) == ("1", v2)
    assert tags(conf, "1")["rolled_back_by"] == getpass.getuser()
    promote(ctx, do_rollback=True)
    assert aliases(conf) == (v2, "1")

    # forced: who and why are tagged
    promote(ctx, version=1, force=True, reason="incident 42: v2 mis-ranks new products")
    assert aliases(conf) == ("1", v2)
    t1 = tags(conf, "1")
    assert t1["forced"] == "true" and t1["forced_by"] == getpass.getuser()
    assert t1["forced_reason"] == "incident 42: v2 mis-ranks new products"

    # an evaluation made against an older champion is stale: the gate refuses
    v3 = copy_version(conf)
    set_alias(conf, CHALLENGER, v3)
    record(reg, v3, {"challenger": chal(0.9, 0.9), "champion": {"ndcg_at_10": 0.40, "intent_auc": 0.70}}, champion=v2)
    with pytest.raises(ModelGateError, match="re-run evaluate"):
        promote(ctx, D)
    assert aliases(conf) == ("1", v2)

    # every promote run is a row in ops/job_runs that says what moved
    runs = sorted((r for r in ctx.table("ops/job_runs").to_arrow().to_pylist() if r["stage"] == "promote"),
                  key=lambda r: r["started_at"])
    messages = [r["message"] for r in runs]
    assert len(runs) == 11
    assert [r["exit_code"] for r in runs] == [5, 4, 0, 4, 4, 0, 0, 0, 0, 0, 4]
    assert "champion (none) -> v1 (gate passed)" in messages[2]
    assert f"champion v1 -> v{v2}; previous -> v1 (gate passed)" in messages[5]
    assert "rollback: champion v2 -> v1" in messages[7]
    assert "forced by" in messages[9] and "incident 42" in messages[9]
    assert json.loads(runs[5]["metrics"])["champion"] == v2


def test_cli_flags_and_exit_codes(reg):
    conf = reg["conf"]
    base = ["--set", f"warehouse.root={conf.warehouse}", "--set", "spark.master=local[2]"]
    assert main(["promote", *base, "--version", "1", "--force"]) == 2  # no --reason
    assert main(["promote", *base, "--force", "--reason", "x"]) == 2  # no --version
    with pytest.raises(SystemExit) as err:
        main(["promote", *base, "--version", "1", "--rollback"])
    assert err.value.code == 2
    before = aliases(conf)
    assert main(["promote", *base, "--rollback"]) == 0
    assert aliases(conf) == (before[1], before[0])
    assert main(["promote", *base, "--version", "99", "--force", "--reason", "x"]) == 5


def test_an_evaluation_older_than_the_training_date_is_refused(reg):
    """A challenger trained as of D+1 evaluated on D (evaluate re-run for an older night) has
    trained on that holdout: the gate refuses its flattering figures; on D+1 they count."""
    from streamrank.registry import tag_version

    ctx, conf = reg["ctx"], reg["conf"]
    champion = by_alias(conf, CHAMPION).version
    later = copy_version(conf)
    tag_version(conf, later, {"as_of_date": D + dt.timedelta(days=1)})
    set_alias(conf, CHALLENGER, later)
    good = {"challenger": chal(0.9, 0.9), "champion": {"ndcg_at_10": 0.40, "intent_auc": 0.70}}
    record(reg, later, good, champion=champion)
    with pytest.raises(ModelGateError, match=f"is on a holdout that v{later} trained on .* evaluate --date 2026-11-11"):
        promote(ctx, D)
    assert by_alias(conf, CHAMPION).version == champion
    record(reg, later, good, champion=champion, date=D + dt.timedelta(days=1))
    promote(ctx, D + dt.timedelta(days=1))
    assert by_alias(conf, CHAMPION).version == later


def test_training_an_older_night_leaves_the_newer_challenger(reg):
    """A backfill (train for D while the challenger was trained as of D+2) registers its model
    but does not turn `challenger` back in time; the message says how to serve it anyway."""
    from streamrank.registry import tag_version
    from streamrank.train import train

    ctx, conf = reg["ctx"], reg["conf"]
    newer = copy_version(conf)
    tag_version(conf, newer, {"as_of_date": D + dt.timedelta(days=2)})
    set_alias(conf, CHALLENGER, newer)
    backfill = train(ctx, D)
    assert backfill["model_version"] == str(int(newer) + 1) and backfill["challenger_version"] == newer
    assert by_alias(conf, CHALLENGER).version == newer
    assert tags(conf, backfill["model_version"])["as_of_date"] == str(D)
    last = max((r for r in ctx.table("ops/job_runs").to_arrow().to_pylist() if r["stage"] == "train"),
               key=lambda r: r["started_at"])
    assert last["status"] == "success" and last["run_date"] == D
    assert f"challenger stays v{newer}, trained as of {D + dt.timedelta(days=2)}" in last["message"]
    assert f"promote --version {backfill['model_version']} --force" in last["message"]
    # a re-run of the challenger's own night (or a later one) does take the alias
    tag_version(conf, newer, {"as_of_date": D})
    again = train(ctx, D)
    assert by_alias(conf, CHALLENGER).version == again["model_version"] == again["challenger_version"]
