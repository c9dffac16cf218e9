"""`streamrank evaluate` on a tiny world: two trained models, designed silver popularity, ALS.

The world, without the upstream stages: gold/training_examples for D-1 and D written with the
table layer (histories follow next = last + 3 over 40 products, so the model can learn),
gold/vocabularies and bronze/products for both days - D's catalogue adds product P0005,
which sorts first, so every product id of D is one more than on D-1 (the champion, trained
on D-1, must be scored through its own vocabulary) - and silver events whose cart counts
make popularity strictly decreasing along the product list, with decoy carts of the least
popular product just outside the training window on both sides, and inside it but ingested
after D.
"""

from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pytest

import streamrank.evaluate as ev
from streamrank import metrics as M
from streamrank.cli import main
from streamrank.context import Context
from streamrank.errors import InsufficientHistoryError, MissingInputError, ModelGateError
from streamrank.evaluate import (
    catalogue_ids,
    download_model,
    evaluate,
    holdout_from_arrow,
    load_holdout,
    load_vocab,
    model_eval_rows,
    popularity,
    popularity_scores,
    score_lookup,
    score_model,
    write_model_eval,
)
from streamrank.registry import CHALLENGER, CHAMPION, PREVIOUS, by_alias, client, set_alias

D = dt.date(2026, 11, 10)
D1 = D - dt.timedelta(days=1)
UTC = dt.UTC
L, C, T_ = 20, 32, 10
BASE = [f"P{i:04d}" for i in range(10, 50)]  # popularity and the sequence pattern follow this order
NEW = "P0005"  # in D's catalogue only
EVENTS = ("enter_stream", "leave_stream", "view_product", "like", "comment", "share", "gift",
          "click_product", "add_to_cart", "purchase")


def category(token: str) -> str:
    return f"cat{int(token[1:]) % 4}"


def products_of(day: dt.date) -> list[str]:
    return sorted(BASE + ([NEW] if day >= D else []))


def host(token: str) -> str:
    """The host whose streams show a product (the stream context of candidates and history)."""
    return f"h{int(token[1:]) % 3}"


def vocab_of(day: dt.date) -> dict[str, dict[str, int]]:
    out = {kind: {"<pad>": 0, "<unk>": 1} for kind in ("product", "category", "event", "host")}
    out["host"].update({"h0": 2, "h1": 3, "h2": 4})
    out["product"].update({t: i + 2 for i, t in enumerate(products_of(day))})
    out["category"].update({t: i + 2 for i, t in enumerate(sorted({category(t) for t in products_of(day)}))})
    out["event"].update({t: i + 2 for i, t in enumerate(EVENTS)})
    return out


def token_rows(day: dt.date, seed: int, n_train: int = 300, n_valid: int = 120, with_new: bool = False) -> list[dict]:
    """Examples in tokens: history walks BASE in steps of 3; the target is the next step (85 %)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_valid):
        split = "train" if i < n_train else ("valid" if i % 2 == 0 else "test")  # as features: valid / test halves
        cutoff = dt.datetime.combine(day - dt.timedelta(days=2 + i % 4 if split == "train" else 0), dt.time(0), tzinfo=UTC)
        n = int(rng.integers(1, 12))
        start = int(rng.integers(0, 40))
        walk = [(start + 3 * j) % 40 for j in range(n)]
        target = BASE[(walk[-1] + 3) % 40] if rng.random() < 0.85 else None
        cands = [BASE[j] for j in rng.choice(40, C - 2, replace=False)]
        if target and target not in cands:
            cands[int(rng.integers(0, C - 2))] = target
        if with_new and rng.random() < 0.3:
            cands[-1] = NEW if cands[-1] != target else cands[-1]
        rows.append({
            "viewer_id": f"v{i:04d}", "cutoff_ts": cutoff, "hist": [BASE[j] for j in walk],
            "events": [str(EVENTS[int(e)]) for e in rng.integers(2, 10, n)],
            "dwell": [int(x) for x in rng.integers(1, 16, n)],
            "dt": sorted((float(x) for x in rng.exponential(30.0, n)), reverse=True),
            "pp": [float(x) for x in rng.random(8)], "target": target, "cands": cands,
            "label": int(rng.random() < 0.1 + 0.07 * n), "split": split,
        })
    return rows


def encode(rows: list[dict], vocab: dict[str, dict[str, int]], day: dt.date) -> list[dict]:
    """gold/training_examples rows of `day` in the ids of `vocab`."""
    p, c, e, h = vocab["product"], vocab["category"], vocab["event"], vocab["host"]
    out = []
    for r in rows:
        n = len(r["hist"])
        pad = L - n
        tgt = p[r["target"]] if r["target"] else 0
        out.append({
            "viewer_id": r["viewer_id"], "cutoff_ts": r["cutoff_ts"],
            "hist_product": [0] * pad + [p[t] for t in r["hist"]],
            "hist_category": [0] * pad + [c[category(t)] for t in r["hist"]],
            "hist_event": [0] * pad + [e[x] for x in r["events"]],
            "hist_dwell": [0] * pad + r["dwell"], "hist_dt": [0.0] * pad + r["dt"], "hist_len": n,
            "pp_features": r["pp"], "target_product": tgt, "target_products": [tgt] + [0] * (T_ - 1),
            "cand_products": [p[t] for t in r["cands"]] + [0, 0], "label_purchase": r["label"],
            "hist_host": [0] * pad + [h[host(t)] for t in r["hist"]],
            "hist_hour": [0] * pad + [2 + (int(t[1:]) + j) % 24 for j, t in enumerate(r["hist"])],
            "cand_host": [h[host(t)] for t in r["cands"]] + [0, 0],
            "cand_hour": [2 + int(t[1:]) % 24 for t in r["cands"]] + [0, 0],
            "split": r["split"], "as_of_date": day,
        })
    return out


def silver_rows(valid: list[dict]) -> list[dict]:
    """Views of the holdout viewers' histories (for ALS) and designed carts (for popularity)."""
    rows = []

    def ev(viewer: str, product: str, etype: str, ts: dt.datetime, ingested: dt.date | None = None) -> None:
        rows.append({"event_id": f"e{len(rows):06d}", "viewer_id": viewer, "product_id": product, "event_type": etype,
                     "event_ts": ts, "dwell_ms": 1000, "line_number": len(rows), "event_date": ts.date(),
                     "ingest_date": ingested or ts.date()})

    cutoff = dt.datetime.combine(D, dt.time(0), tzinfo=UTC)
    for r in valid:
        for token, hours in zip(r["hist"], r["dt"], strict=True):
            ev(r["viewer_id"], token, "view_product", cutoff - dt.timedelta(hours=hours + 0.01))
    for j, token in enumerate(BASE):  # BASE[j] gets 40 - j carts in the window: strictly decreasing
        for n in range(40 - j):
            ev(f"c{j}_{n}", token, "add_to_cart" if n % 2 else "purchase", cutoff - dt.timedelta(days=2, minutes=n))
    for n in range(100):  # decoys for the least popular product, just outside [D - 30 days, D)
        ev(f"d{n}", BASE[-1], "add_to_cart", cutoff + dt.timedelta(hours=10, minutes=n))
        ev(f"d{n}", BASE[-1], "add_to_cart", cutoff - dt.timedelta(days=30, minutes=1 + n))
        # and inside it, but late: ingested on D+1, after the night of D (a re-run of D must not see them)
        ev(f"d{n}", BASE[-1], "purchase", cutoff - dt.timedelta(hours=2, minutes=n), ingested=D + dt.timedelta(days=1))
    return rows


def product_rows(day: dt.date) -> list[dict]:
    return [{"product_id": t, "title": t, "category": category(t), "brand": "b", "list_price": 10.0 + i,
             "launch_date": dt.date(2026, 1, 1), "source_file": "products.csv", "line_number": i, "ingest_run_id": "t",
             "snapshot_date": day} for i, t in enumerate(products_of(day))]


def vocab_table_rows(day: dt.date) -> list[dict]:
    return [{"kind": k, "token": t, "idx": i, "as_of_date": day} for k, m in vocab_of(day).items() for t, i in m.items()]


SMALL = {"score.precision": "bf16", "train.max_epochs": 2, "train.batch_size": 64, "model.d_model": 16, "model.n_layers": 1,
         "model.num_negatives": 30, "features.seq_len": L, "evaluate.als_rank": 8, "evaluate.als_max_iter": 5}


@pytest.fixture(scope="module")
def world(spark, base_conf, tmp_path_factory):
    from streamrank.train import train

    root = tmp_path_factory.mktemp("evaluate")
    conf = base_conf.with_overrides({"warehouse.root": str(root / "warehouse"), "landing.root": str(root / "landing"), **SMALL})
    ctx = Context(conf)
    tok_d1, tok_d = token_rows(D1, seed=1), token_rows(D, seed=2, with_new=True)
    for day, toks in ((D1, tok_d1), (D, tok_d)):
        ctx.table("gold/vocabularies").append_rows(vocab_table_rows(day))
        ctx.table("bronze/products").append_rows(product_rows(day))
        ctx.table("gold/training_examples").append_rows(encode(toks, vocab_of(day), day))
    ctx.table("silver/viewer_events").append_rows(silver_rows([r for r in tok_d if r["split"] == "test"]))
    champion = train(ctx, D1)
    set_alias(conf, CHAMPION, champion["model_version"])
    challenger = train(ctx, D)
    result = evaluate(ctx, D)
    return {"ctx": ctx, "conf": conf, "tok_d": tok_d, "tok_d1": tok_d1, "champion": champion,
            "challenger": challenger, "result": result}


def _ndcg_hr_auc(scored) -> tuple[float, float, float | None]:
    r = scored.cand_ranks
    return float(np.where(r < 10, 1 / np.log2(r + 2), 0).mean()), float((r < 10).mean()), M.auc(scored.labels, scored.raw_probs)


def test_challenger_figures_match_the_training_protocol(world, tmp_path):
    """Same protocol as the train worker: on the 'valid' rows the worker early-stopped on, the
    registered challenger reproduces the worker's NDCG@10, HR@10 and AUC exactly. evaluate itself
    scores the 'test' rows (the other viewers of the validation cutoff), which training never saw."""
    import pyarrow as pa

    ctx, got, trained = world["ctx"], world["result"]["results"]["challenger"], world["challenger"]
    ref = by_alias(world["conf"], CHALLENGER)
    assert ref.version == trained["model_version"]
    lm = download_model(ref, str(tmp_path / "m"))
    rows = {split: [r for r in world["tok_d"] if r["split"] == split] for split in ("valid", "test")}
    scored = {split: score_model(lm, holdout_from_arrow(pa.Table.from_pylist(encode(rs, vocab_of(D), D))), load_vocab(ctx, D))
              for split, rs in rows.items()}
    ndcg, hr, auc = _ndcg_hr_auc(scored["valid"])
    assert (ndcg, hr) == (pytest.approx(trained["ndcg_at_10"], abs=1e-9), pytest.approx(trained["hr_at_10"], abs=1e-9))
    assert auc == pytest.approx(trained["intent_auc"], abs=1e-6)
    ndcg, hr, auc = _ndcg_hr_auc(scored["test"])
    assert (got["ndcg_at_10"], got["hr_at_10"]) == (pytest.approx(ndcg, abs=1e-9), pytest.approx(hr, abs=1e-9))
    # Platt keeps the raw head's AUC, or - when the head is anti-correlated and the fit wants a
    # negative slope - flattens it to the base rate (AUC 0.5) instead of inverting it
    assert got["intent_auc_raw"] == pytest.approx(auc, abs=1e-6)
    assert got["calibrator_slope"] >= 0
    flat = got["calibrator_slope"] == 0
    assert got["intent_auc"] == pytest.approx(0.5 if flat else auc, abs=1e-6)
    assert got["holdout_rows"] == len(rows["test"]) == 60 and got["sample_rows"] == 60 and got["sample_nonfinite"] == 0
    assert got["calibrated"] == 1.0 and got["nonfinite_outputs"] == 0
    for key in ("ndcg_at_5", "ndcg_at_20", "mrr", "coverage_at_10", "full_ndcg_at_10", "intent_logloss",
                "intent_ece", "intent_precision", "intent_recall", "intent_f1"):
        assert 0.0 <= got[key] <= (1.0 if key != "intent_logloss" else 5.0), key
    assert got["ndcg_at_5"] <= got["ndcg_at_10"] <= got["ndcg_at_20"]


def test_the_registry_says_what_each_version_is(world):
    """What a person deciding on a promotion reads in the MLflow UI: the model's description
    once, and each version's data, validation figures and next command."""
    conf, trained = world["conf"], world["challenger"]
    c = client(conf)
    name = conf["mlflow.model_name"]
    assert "`champion` is what `streamrank score` serves" in c.get_registered_model(name).description
    mv = c.get_model_version(name, trained["model_version"])
    assert mv.description.startswith(
        f"Trained by `streamrank train --date {D}` on gold/training_examples version {trained['training_table_version']} "
        f"({trained['split_rows']['train']} train and {trained['split_rows']['valid']} validation rows; code ")
    figures = (f"NDCG@10 {trained['ndcg_at_10']:.4f}, HR@10 {trained['hr_at_10']:.4f}, intent AUC "
               f"{trained['intent_auc']:.4f}; best of {len(trained['epochs'])} epochs: {trained['best_epoch'] + 1}.")
    assert figures in mv.description
    assert f"`streamrank promote --version {trained['model_version']} --force --reason TEXT`" in mv.description
    assert mv.tags["as_of_date"] == str(D) and mv.tags["training_table_version"] == str(trained["training_table_version"])
    # the champion, trained first, has its own
    champion = c.get_model_version(name, world["champion"]["model_version"])
    assert champion.description.startswith(f"Trained by `streamrank train --date {D1}`")


def test_served_figures_are_the_bf16_scoring(world, tmp_path):
    """score.precision = bf16: served_* are the challenger scored as the score stage serves it;
    the float32 figures (the training protocol's) are untouched and the loaded model stays float32."""
    import torch

    ctx, res = world["ctx"], world["result"]
    got = res["results"]["challenger"]
    lm = download_model(by_alias(world["conf"], CHALLENGER), str(tmp_path / "m"))
    h, vocab = load_holdout(ctx, D), load_vocab(ctx, D)
    fp32, bf16 = score_model(lm, h, vocab), score_model(lm, h, vocab, "bf16")
    assert next(lm.net.parameters()).dtype == torch.float32  # the pyfunc's network was copied, not cast
    assert got["ndcg_at_10"] == pytest.approx(_ndcg_hr_auc(fp32)[0], abs=1e-9)
    ndcg, hr, _ = _ndcg_hr_auc(bf16)
    assert (got["served_ndcg_at_10"], got["served_hr_at_10"]) == (pytest.approx(ndcg, abs=1e-9), pytest.approx(hr, abs=1e-9))
    assert got["served_intent_auc"] == pytest.approx(M.auc(bf16.labels, bf16.probs), abs=1e-9)
    assert abs(got["served_ndcg_at_10"] - got["ndcg_at_10"]) <= 0.05
    run = client(world["conf"]).get_run(res["mlflow_run_id"])
    assert run.data.tags["evaluate.served_precision"] == "bf16"
    assert run.data.metrics["served_ndcg_at_10"] == pytest.approx(got["served_ndcg_at_10"])


def test_most_popular_exact(world):
    """Popularity decreases strictly along BASE (decoys outside the window ignored), so the
    target's rank is the number of its candidates that come earlier in BASE."""
    pos = {t: j for j, t in enumerate(BASE)}
    ranks = []
    for r in world["tok_d"]:
        if r["split"] != "test" or not r["target"]:
            continue
        ranks.append(sum(1 for c in r["cands"] if c != r["target"] and c in pos and pos[c] < pos[r["target"]]))
    ranks = np.array(ranks)
    got = world["result"]["results"]["most_popular"]
    assert got["ranked_rows"] == len(ranks)
    assert got["ndcg_at_10"] == pytest.approx(float(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0).mean()))
    assert got["hr_at_10"] == pytest.approx(float((ranks < 10).mean()))
    assert got["mrr"] == pytest.approx(float((1 / (ranks + 1)).mean()))
    # full catalogue: everyone gets BASE[:10]; the target's rank is its position in BASE
    full = np.array([pos[r["target"]] for r in world["tok_d"] if r["split"] == "test" and r["target"]])
    assert got["full_hr_at_10"] == pytest.approx(float((full < 10).mean()))
    assert got["full_coverage_at_10"] == pytest.approx(10 / 41)
    assert "intent_auc" not in got


def test_pop_category_baseline_exact(world):
    """log1p(carts + purchases) + 3 x the viewer's weighted share of the candidate's category,
    recomputed here from the tokens and the designed silver rows."""
    from collections import Counter

    lo = dt.datetime.combine(D - dt.timedelta(days=30), dt.time(0), tzinfo=UTC)
    hi = dt.datetime.combine(D, dt.time(0), tzinfo=UTC)
    test = [r for r in world["tok_d"] if r["split"] == "test"]
    counts = Counter(e["product_id"] for e in silver_rows(test)
                     if e["event_type"] in ("add_to_cart", "purchase") and lo <= e["event_ts"] < hi
                     and e["ingest_date"] <= D)  # what the night of D knew
    ids = vocab_of(D)["product"]
    n_ids = max(ids.values()) + 1
    weight = {"view_product": 1.0, "click_product": 2.0, "add_to_cart": 3.0, "purchase": 3.0}
    ranks = []
    for r in test:
        if not r["target"]:
            continue
        w = Counter()
        for t, e in zip(r["hist"], r["events"], strict=True):
            w[category(t)] += weight.get(e, 0.3)
        total = sum(w.values())

        def score(t: str) -> float:
            return math.log1p(counts[t]) + 3.0 * w[category(t)] / total + 1e-6 * (1 - ids[t] / n_ids)  # noqa: B023

        ranks.append(sum(1 for c in r["cands"] if c != r["target"] and score(c) >= score(r["target"])))
    ranks = np.array(ranks)
    got = world["result"]["results"]["pop_category"]
    assert got["ranked_rows"] == len(ranks)
    assert got["ndcg_at_10"] == pytest.approx(float(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0).mean()))
    assert got["mrr"] == pytest.approx(float((1 / (ranks + 1)).mean()))
    assert "intent_auc" not in got
    # the history matters: most-popular ranks differently in this world
    assert got["mrr"] != pytest.approx(world["result"]["results"]["most_popular"]["mrr"])


def test_full_catalogue_figures_use_a_systematic_sample(world, monkeypatch):
    """Full ranks exist only for rows with a target: only those are ranked, every k-th above
    FULL_SAMPLE_ROWS, and the sampled ranks are exactly the unsampled ones of those rows."""
    ctx = world["ctx"]
    h, vocab = load_holdout(ctx, D), load_vocab(ctx, D)
    pop, catalogue = popularity_scores(popularity(ctx, D, vocab)), catalogue_ids(vocab)
    whole = score_lookup(h, pop, None, catalogue)
    n_target = int((h.target_product >= 2).sum())
    assert whole.full_ranks.size == n_target and len(whole.full_top) == len(h)
    cap = (n_target + 1) // 2
    monkeypatch.setattr(ev, "FULL_SAMPLE_ROWS", cap)
    half = score_lookup(h, pop, None, catalogue)
    assert half.full_ranks.tolist() == whole.full_ranks[::2].tolist()  # every 2nd target row
    top_stride = -(-len(h) // cap)
    assert [t.tolist() for t in half.full_top] == [t.tolist() for t in whole.full_top[::top_stride]]
    assert half.cand_ranks.tolist() == whole.cand_ranks.tolist()  # the candidate protocol keeps every row


def test_als_and_champion_are_scored(world):
    res = world["result"]
    assert set(res["results"]) == {"challenger", "champion", "most_popular", "pop_category", "als"}
    assert res["champion_version"] == world["champion"]["model_version"] != res["challenger_version"]
    als = res["results"]["als"]
    assert 0.0 <= als["ndcg_at_10"] <= 1.0 and als["ranked_rows"] == res["results"]["challenger"]["ranked_rows"]
    assert 0.0 <= res["results"]["champion"]["intent_auc"] <= 1.0


def test_champion_is_scored_through_its_own_vocabulary(world, tmp_path):
    """D-1's holdout written in D-1 ids and again in D ids (every id + 1) must score the same."""
    import pyarrow as pa

    ctx = world["ctx"]
    champion = by_alias(world["conf"], CHAMPION)
    lm = download_model(champion, str(tmp_path / "m"))
    valid = [r for r in world["tok_d1"] if r["split"] == "valid"]
    h_old = holdout_from_arrow(pa.Table.from_pylist(encode(valid, vocab_of(D1), D1)))
    h_new = holdout_from_arrow(pa.Table.from_pylist(encode(valid, vocab_of(D), D)))
    assert (h_new.hist_product[h_new.hist_product > 0] == h_old.hist_product[h_old.hist_product > 0] + 1).all()
    a = score_model(lm, h_old, load_vocab(ctx, D1))
    b = score_model(lm, h_new, load_vocab(ctx, D))
    assert a.cand_ranks.tolist() == b.cand_ranks.tolist()
    np.testing.assert_allclose(a.probs, b.probs, rtol=1e-5)
    # and the champion's D-1 validation figure is what its train worker recorded
    assert float(np.where(a.cand_ranks < 10, 1 / np.log2(a.cand_ranks + 2), 0).mean()) == pytest.approx(
        world["champion"]["ndcg_at_10"], abs=1e-9)


def test_every_figure_is_on_the_challengers_mlflow_run(world):
    res = world["result"]
    run = client(world["conf"]).get_run(res["mlflow_run_id"])
    m = run.data.metrics
    ch = res["results"]
    # the latest ndcg_at_10 is the evaluation's, not the last training epoch's
    assert m["ndcg_at_10"] == pytest.approx(ch["challenger"]["ndcg_at_10"])
    assert m["intent_auc"] == pytest.approx(ch["challenger"]["intent_auc"])
    assert m["champion_ndcg_at_10"] == pytest.approx(ch["champion"]["ndcg_at_10"])
    assert m["most_popular_ndcg_at_10"] == pytest.approx(ch["most_popular"]["ndcg_at_10"])
    assert m["als_ndcg_at_10"] == pytest.approx(ch["als"]["ndcg_at_10"])
    for key in ("intent_ece", "intent_logloss", "intent_f1", "coverage_at_10", "full_ndcg_at_10", "hr_at_10", "mrr",
                "champion_intent_auc", "most_popular_hr_at_10", "als_mrr"):
        assert key in m, key
    assert run.data.tags["evaluate.date"] == D.isoformat()
    assert run.data.tags["evaluate.champion_version"] == res["champion_version"]


def test_model_eval_rows_and_idempotent_rewrite(world):
    ctx, res = world["ctx"], world["result"]
    rows = [r for r in ctx.table("ops/model_eval").to_arrow().to_pylist() if r["run_date"] == D]
    by = {}
    for r in rows:
        by.setdefault(r["candidate"], []).append(r)
    assert set(by) == {"challenger", "champion", "most_popular", "pop_category", "als"}
    assert {r["model_version"] for r in by["challenger"]} == {res["challenger_version"]}
    assert {r["model_version"] for r in by["champion"]} == {res["champion_version"]}
    assert {r["model_version"] for r in by["als"] + by["most_popular"] + by["pop_category"]} == {None}
    assert {r["mlflow_run_id"] for r in rows} == {res["mlflow_run_id"]}
    assert len({(r["candidate"], r["metric"]) for r in rows}) == len(rows)  # one row per candidate and metric
    got = {r["metric"]: r["value"] for r in by["challenger"]}
    assert got["ndcg_at_10"] == pytest.approx(res["results"]["challenger"]["ndcg_at_10"])
    # writing the same evaluation again replaces it (no duplicates)
    again = model_eval_rows(ctx, D, res["mlflow_run_id"], res["results"],
                            {"challenger": res["challenger_version"], "champion": res["champion_version"]})
    write_model_eval(ctx, D, res["mlflow_run_id"], again)
    assert len([r for r in ctx.table("ops/model_eval").to_arrow().to_pylist() if r["run_date"] == D]) == len(rows)


def test_job_runs_records_the_headline(world):
    runs = [r for r in world["ctx"].table("ops/job_runs").to_arrow().to_pylist()
            if r["stage"] == "evaluate" and r["status"] == "success"]
    assert len(runs) == 1
    metrics = json.loads(runs[0]["metrics"])
    assert metrics["ndcg_at_10"] == pytest.approx(world["result"]["results"]["challenger"]["ndcg_at_10"], abs=1e-4)
    assert {"champion_ndcg_at_10", "most_popular_ndcg_at_10", "pop_category_ndcg_at_10", "als_ndcg_at_10",
            "model_version"} <= set(metrics)
    assert runs[0]["mlflow_run_id"] == world["result"]["mlflow_run_id"]
    assert "gold/training_examples" in json.loads(runs[0]["versions_read"])


def test_no_holdout_and_no_challenger(world, spark, conf):
    with pytest.raises(InsufficientHistoryError, match="split 'test'"):
        evaluate(world["ctx"], D + dt.timedelta(days=5))
    fresh = Context(conf)
    with pytest.raises(MissingInputError, match="alias 'challenger'") as err:
        evaluate(fresh, D)
    assert err.value.exit_code == 5
    argv = ["evaluate", "--set", f"warehouse.root={conf.warehouse}", "--set", "spark.master=local[2]", "--date", str(D)]
    assert main(argv) == 5


def test_a_version_without_artifacts_is_a_clear_missing_input(world, tmp_path):
    """A version whose artifact folder was deleted fails with exit 5 naming it, not MLflow's
    'no MLmodel in <temp dir>' traceback."""
    import mlflow

    from streamrank.registry import ModelRef, setup_mlflow

    setup_mlflow(world["conf"])
    gone = tmp_path / "deleted-artifacts"
    gone.mkdir()
    client_ = mlflow.MlflowClient()
    client_.create_registered_model("streamrank-ghost")
    mv = client_.create_model_version("streamrank-ghost", source=str(gone))
    ref = ModelRef("streamrank-ghost", str(mv.version), "r0", {})
    with pytest.raises(MissingInputError, match=r"streamrank-ghost v1 \(run r0\) has no MLmodel") as err:
        download_model(ref, str(tmp_path / "dl"))
    assert str(gone) in str(err.value) and err.value.exit_code == 5


def test_promote_after_evaluate_follows_the_gate(world):
    """The real gate on the real figures: whatever the tiny models score, promote does what
    gate_decision says, and the aliases and tags show it."""
    from streamrank.promote import gate_decision, promote

    ctx, res, conf = world["ctx"], world["result"], world["conf"]
    fig = res["results"]
    passed, reasons = gate_decision(fig["challenger"], fig["champion"], fig["most_popular"], conf)
    if passed:
        promote(ctx, D)
        assert by_alias(conf, CHAMPION).version == res["challenger_version"]
        assert by_alias(conf, PREVIOUS).version == res["champion_version"]
    else:
        with pytest.raises(ModelGateError):
            promote(ctx, D)
        assert by_alias(conf, CHAMPION).version == res["champion_version"]
    tags = client(conf).get_model_version(conf["mlflow.model_name"], res["challenger_version"]).tags
    assert tags["gate.passed"] == str(passed).lower()
    assert float(tags["gate.ndcg_at_10"]) == pytest.approx(fig["challenger"]["ndcg_at_10"])
    # evaluate's scored sample plus the input example promote scores itself
    assert math.isfinite(float(tags["gate.sample_rows"])) and float(tags["gate.sample_rows"]) > fig["challenger"]["sample_rows"]
