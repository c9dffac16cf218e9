"""Score stage on a hand-made world whose answers are known.

D = 2026-11-08, the streams air on D+1 = 2026-11-09; score.top_k = 5, 6 candidates.

- Vocabularies: gold/vocabularies of D has products p1..p6 (ids 2..7); the champion was
  trained on an older vocabulary that also had p0, so its ids are shifted by one (p1 = 3):
  scoring must remap histories token-wise.
- Schedule of D+1: st1 (10:00) p1 10:00, p2 10:10, pN1 10:20; st2 (14:00) p1 14:00, p3 14:05,
  pN2 with no slot time (-> the stream's 14:00), p4 14:20; st3 (09:00) p4 09:00.
  Earliest slots: p1 -> st1 10:00, p4 -> st3 09:00. The schedule of D (p5, p6) must not be used.
  Hosts: st1 h1, st2 h2, st3 h3; the champion's host vocabulary also has h0 (ids shifted
  by one, like its products), so the candidates' slot context must be remapped too.
- pN1 (category c1) and pN2 (c2) launch on D+1: only in the catalog snapshot of D+1, in no
  vocabulary -> scored from their category.
- Silver, last 7 days: p3 carted/bought 3 times, p2 once, p4 only viewed, p1 carted 9 days
  ago (outside). Cold-start order: p3, p2, then by slot count p1, p4 (2 slots each), pN1.
- Viewer features of D: w1..w6 with histories, c1 and c2 with none (hist_len 0), `old`
  last seen 10 days before D (inactive), `yday` only in the features of D-1.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pyspark.sql import functions as F

from streamrank.cli import main as cli_main
from streamrank.context import Context
from streamrank.delta import StagedWrite, Warehouse
from streamrank.errors import MissingInputError, NoChampionError, QualityGateError
from streamrank.features import EVENT_TYPES
from streamrank.model import ModelConfig, StreamRankModel, apply_calibration, load_model
from streamrank.schemas import table_spec
from streamrank.score import deterministic_topk, extend_model, id_remap, score

D = dt.date(2026, 11, 8)
D1 = D + dt.timedelta(days=1)
UTC = dt.UTC
L = 10
K = 5
CALIBRATOR = {"method": "platt", "a": 1.5, "b": -0.5}
CATS = {"p0": "c1", "p1": "c1", "p2": "c1", "p3": "c2", "p4": "c2", "p5": "c3", "p6": "c3", "pN1": "c1", "pN2": "c2"}
FEATURE_PRODUCTS = ["p1", "p2", "p3", "p4", "p5", "p6"]
MODEL_PRODUCTS = ["p0", "p1", "p2", "p3", "p4", "p5", "p6"]
CATEGORIES = ["c1", "c2", "c3"]
WARM = ["w1", "w2", "w3", "w4", "w5", "w6"]
COLD = ["c1", "c2"]
EXPECTED_SLOTS = {  # product -> (stream, slot_start)
    "p1": ("st1", dt.datetime(2026, 11, 9, 10, 0, tzinfo=UTC)),
    "p2": ("st1", dt.datetime(2026, 11, 9, 10, 10, tzinfo=UTC)),
    "pN1": ("st1", dt.datetime(2026, 11, 9, 10, 20, tzinfo=UTC)),
    "p3": ("st2", dt.datetime(2026, 11, 9, 14, 5, tzinfo=UTC)),
    "pN2": ("st2", dt.datetime(2026, 11, 9, 14, 0, tzinfo=UTC)),
    "p4": ("st3", dt.datetime(2026, 11, 9, 9, 0, tzinfo=UTC)),
}
COLD_ORDER = ["p3", "p2", "p1", "p4", "pN1"]
POPULARITY = {"p3": 3.0, "p2": 1.0, "p1": 0.0, "p4": 0.0, "pN1": 0.0}


def at(day: dt.date, h: int, m: int = 0) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(h, m), tzinfo=UTC)


def vocab_index(tokens: list[str]) -> dict[str, int]:
    return {"<pad>": 0, "<unk>": 1, **{t: i + 2 for i, t in enumerate(sorted(tokens))}}


HOSTS = {"st1": "h1", "st2": "h2", "st3": "h3"}
FEATURE_VOCAB = {"product": vocab_index(FEATURE_PRODUCTS), "category": vocab_index(CATEGORIES),
                 "event": {"<pad>": 0, "<unk>": 1, **{t: i + 2 for i, t in enumerate(EVENT_TYPES)}},
                 "host": vocab_index(["h1", "h2", "h3"])}
MODEL_VOCAB = {**FEATURE_VOCAB, "product": vocab_index(MODEL_PRODUCTS), "host": vocab_index(["h0", "h1", "h2", "h3"])}


# ----------------------------------------------------------------------------- the world

def viewer_rows(day: dt.date) -> list[tuple]:
    """gold/viewer_features rows of `day`, histories in ids of FEATURE_VOCAB, left-padded to L."""
    rng = np.random.default_rng(11)
    rows = []

    def row(vid: str, n: int, last: dt.datetime, spend: float) -> tuple:
        prods = [FEATURE_PRODUCTS[int(i)] for i in rng.integers(0, len(FEATURE_PRODUCTS), n)]
        pad = [0] * (L - n)
        hp = pad + [FEATURE_VOCAB["product"][p] for p in prods]
        hc = pad + [FEATURE_VOCAB["category"][CATS[p]] for p in prods]
        he = pad + [int(e) for e in rng.integers(2, 2 + len(EVENT_TYPES), n)]
        hw = pad + [int(w) for w in rng.integers(1, 16, n)]
        hd = [0.0] * (L - n) + sorted((float(x) for x in rng.uniform(0.5, 200.0, n)), reverse=True)
        hh = pad + [int(h) for h in rng.integers(1, 5, n)]  # 1 = a host unknown to the features
        hr = pad + [int(h) for h in rng.integers(2, 26, n)]
        return (vid, 3.5, 2, 4, spend / 2, spend, 20.0, 3, 1000, 2000, 1, 0, 0, max(n, 2), last,
                hp, hc, he, hw, hd, n, hh, hr, day)

    for i, vid in enumerate(WARM):
        rows.append(row(vid, [1, 3, 5, 7, 10, 10][i], at(day, 20, i), 10.0 * (i + 1)))
    for vid in COLD:
        rows.append(row(vid, 0, at(day, 9), 0.0))
    rows.append(row("old", 3, at(day - dt.timedelta(days=10), 12), 5.0))
    return rows


def write_world(spark, conf, *, with_features_of: list[dt.date], schedule_days: list[dt.date]) -> None:
    wh = Warehouse(spark, conf)

    def put(name: str, rows: list[tuple]) -> None:
        wh.table(name).append(spark.createDataFrame(rows, table_spec(name).schema))

    features, vocab = [], []
    for day in with_features_of:
        features += viewer_rows(day)
        vocab += [(kind, tok, idx, day) for kind, m in FEATURE_VOCAB.items() for tok, idx in m.items()]
    features.append(("yday",) + viewer_rows(D - dt.timedelta(days=1))[0][1:])  # only in the features of D-1
    put("gold/viewer_features", features)
    put("gold/vocabularies", vocab)

    def product(pid: str, snap: dt.date, line: int) -> tuple:
        return (pid, f"title {pid}", CATS[pid], "brand", 10.0 + line, dt.date(2026, 1, 1), "products.csv", line, "ing", snap)

    put("bronze/products", [product(p, D, i) for i, p in enumerate(FEATURE_PRODUCTS)]
        + [product(p, D1, i) for i, p in enumerate(FEATURE_PRODUCTS + ["pN1", "pN2"])])

    streams, slots = [], []
    for day in schedule_days:
        streams += [(s, HOSTS[s], at(day, h), at(day, h + 2), "streams.csv", i, "ing", day)
                    for i, (s, h) in enumerate([("st1", 10), ("st2", 14), ("st3", 9)])]
        plan = [("st1", "p1", at(day, 10)), ("st1", "p2", at(day, 10, 10)), ("st1", "pN1", at(day, 10, 20)),
                ("st2", "p1", at(day, 14)), ("st2", "p3", at(day, 14, 5)), ("st2", "pN2", None),
                ("st2", "p4", at(day, 14, 20)), ("st3", "p4", at(day, 9))]
        slots += [(s, p, t, None, 9.9, "sp.csv", i, "ing", day) for i, (s, p, t) in enumerate(plan)]
    streams.append(("st9", "h1", at(D, 18), at(D, 20), "streams.csv", 0, "ing", D))
    slots += [("st9", p, at(D, 18), None, 9.9, "sp.csv", i, "ing", D) for i, p in enumerate(["p5", "p6"])]
    put("bronze/streams", streams)
    put("bronze/stream_products", slots)

    events = []

    def ev(viewer: str, day: dt.date, etype: str, product: str, ingested: dt.date | None = None) -> None:
        n = len(events)
        when = at(day, 12, n % 60)
        events.append((f"e{n}", viewer, "s", "st0", "h1", product, etype, when, 0, None, 1, "1.0", False, None,
                       "f.jsonl", n, ingested or day, "clean", day))

    for etype in ("add_to_cart", "purchase", "add_to_cart"):
        ev("w1", D - dt.timedelta(days=2), etype, "p3")
    ev("w2", D, "purchase", "p2")
    for _ in range(4):
        ev("w3", D, "view_product", "p4")
    for _ in range(5):
        ev("w4", D - dt.timedelta(days=9), "add_to_cart", "p1")
    for _ in range(6):  # carts of D that arrived with D+1's ingest: not known to the night of D
        ev("late", D, "add_to_cart", "p4", ingested=D + dt.timedelta(days=1))
    put("silver/viewer_events", events)


def register_champion(conf, workdir: Path) -> tuple[str, StreamRankModel]:
    """Log a seeded, untrained model of the test size as the registry's champion."""
    import mlflow

    from streamrank import registry
    from streamrank.pyfunc_model import log_model

    art = workdir / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    product_category = [0, 1] + [MODEL_VOCAB["category"][CATS[p]] for p in sorted(MODEL_PRODUCTS)]
    (art / "vocab.json").write_text(json.dumps({**MODEL_VOCAB, "product_category": product_category}))
    mc = ModelConfig(n_products=len(MODEL_PRODUCTS) + 2, n_categories=len(CATEGORIES) + 2,
                     n_event_types=len(EVENT_TYPES) + 2, n_hosts=len(MODEL_VOCAB["host"]), d_model=16, n_heads=2,
                     n_layers=1, seq_len=L)
    torch.manual_seed(3)
    model = StreamRankModel(mc, product_category=np.array(product_category))
    torch.save(model.state_dict(), art / "model.pt")
    (art / "model_config.json").write_text(json.dumps(mc.to_dict()))
    (art / "calibrator.json").write_text(json.dumps(CALIBRATOR))
    registry.setup_mlflow(conf)
    with mlflow.start_run(run_name="test-champion"):
        info = log_model(str(art), str(art / "vocab.json"), None, registered_model_name=conf["mlflow.model_name"],
                         calibrator_path=str(art / "calibrator.json"))
    version = str(info.registered_model_version)
    registry.set_alias(conf, registry.CHAMPION, version)
    return version, load_model(str(art / "model.pt"), mc)


def snapshot(ctx: Context, day: dt.date) -> dict[str, list[dict]]:
    out = {}
    for name in ("gold/user_product_rankings", "gold/user_intent_scores"):
        rows = ctx.table(name).read().filter(F.col("score_date") == F.lit(day)).collect()
        out[name] = sorted((r.asDict() for r in rows), key=lambda r: (r["viewer_id"], r.get("rank") or 0))
    return out


@pytest.fixture(scope="module")
def world(spark, base_conf, tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    conf = base_conf.with_overrides({"warehouse.root": str(root / "warehouse"), "landing.root": str(root / "landing"),
                                     "score.top_k": K, "score.batch_size": 3,
                                     "score.precision": "fp32"})  # exact agreement with the float32 reference below
    write_world(spark, conf, with_features_of=[D], schedule_days=[D1])
    version, model = register_champion(conf, root / "model")
    ctx = Context(conf)
    result = score(ctx, D)
    return {"conf": conf, "root": root, "ctx": ctx, "result": result, "version": version, "model": model,
            "snap": snapshot(ctx, D1)}


# ----------------------------------------------------------------------------- tests

def test_every_active_viewer_once_with_contiguous_ranks(world):
    snap = world["snap"]
    intent = snap["gold/user_intent_scores"]
    assert sorted(r["viewer_id"] for r in intent) == sorted(WARM + COLD)  # not `old`, not `yday`
    ranks: dict[str, list[int]] = {}
    for r in snap["gold/user_product_rankings"]:
        ranks.setdefault(r["viewer_id"], []).append(r["rank"])
    assert sorted(ranks) == sorted(WARM + COLD)
    assert all(sorted(v) == list(range(1, K + 1)) for v in ranks.values())
    result = world["result"]
    assert result["viewers"] == 8 and result["cold_start_viewers"] == 2 and result["candidates"] == 6
    assert result["new_products"] == 2 and result["ranking_rows"] == 8 * K and result["precision"] == "fp32"


def test_products_are_on_tomorrows_streams_at_their_earliest_slot(world):
    rows = world["snap"]["gold/user_product_rankings"]
    for r in rows:
        assert r["product_id"] in EXPECTED_SLOTS, r
        stream, slot = EXPECTED_SLOTS[r["product_id"]]
        assert (r["stream_id"], r["slot_start"].astimezone(UTC)) == (stream, slot), r
    per_viewer = {}
    for r in rows:
        per_viewer.setdefault(r["viewer_id"], set()).add(r["product_id"])
    assert all(len(v) == K for v in per_viewer.values())  # no product twice in a list


def test_probabilities_and_lineage(world):
    snap, version, run_id = world["snap"], world["version"], world["ctx"].run_id
    for r in snap["gold/user_product_rankings"]:
        assert 0.0 <= r["purchase_prob"] <= 1.0 and math.isfinite(r["score"])
        assert (r["model_version"], r["run_id"], r["score_date"]) == (version, run_id, D1)
    features = {row[0]: row for row in viewer_rows(D)}
    for r in snap["gold/user_intent_scores"]:
        assert 0.0 <= r["intent_score"] <= 1.0
        assert (r["model_version"], r["run_id"], r["score_date"]) == (version, run_id, D1)
        assert r["purchase_power"] == features[r["viewer_id"]][5]  # monetary_30d


def test_cold_start_rows_are_the_popular_products(world):
    rows = world["snap"]["gold/user_product_rankings"]
    cold = [r for r in rows if r["strategy"] == "cold_start"]
    assert {r["viewer_id"] for r in cold} == set(COLD)
    assert {r["strategy"] for r in rows if r["viewer_id"] in WARM} == {"model"}
    for vid in COLD:
        mine = sorted((r for r in cold if r["viewer_id"] == vid), key=lambda r: r["rank"])
        assert [r["product_id"] for r in mine] == COLD_ORDER
        assert [r["score"] for r in mine] == [POPULARITY[p] for p in COLD_ORDER]
        assert all(0.0 < r["purchase_prob"] < 1.0 for r in mine)


def _expected_warm(world) -> dict[str, dict]:
    """Independent scoring: tokens -> model ids by hand, item vectors from the embeddings, plus
    the host and hour embeddings of each candidate's earliest slot."""
    model = world["model"]
    order = sorted(EXPECTED_SLOTS)  # candidates by product_id
    inv = {i: t for t, i in FEATURE_VOCAB["product"].items()}
    inv_h = {i: t for t, i in FEATURE_VOCAB["host"].items()}
    c_host = torch.tensor([MODEL_VOCAB["host"][HOSTS[EXPECTED_SLOTS[p][0]]] for p in order])
    c_hour = torch.tensor([2 + EXPECTED_SLOTS[p][1].hour for p in order])
    with torch.no_grad():
        vecs = []
        for p in order:
            if p in MODEL_VOCAB["product"]:
                vecs.append(model.product_emb.weight[MODEL_VOCAB["product"][p]]
                            + model.category_emb.weight[MODEL_VOCAB["category"][CATS[p]]])
            else:  # new product: unknown product + its category (no price tiers in this model)
                vecs.append(model.product_emb.weight[1] + model.category_emb.weight[MODEL_VOCAB["category"][CATS[p]]])
        cand = torch.stack(vecs) + model.host_emb(c_host) + model.hour_emb(c_hour)
    ext = extend_model(load_model_copy(world), np.array([MODEL_VOCAB["category"][CATS[p]] for p in ("pN1", "pN2")]),
                       np.zeros(2, dtype=np.int64))
    ext_ids = {p: MODEL_VOCAB["product"].get(p) for p in order}
    ext_ids.update({"pN1": model.cfg.n_products, "pN2": model.cfg.n_products + 1})
    out = {}
    for row in viewer_rows(D):
        vid = row[0]
        if vid not in WARM:
            continue
        hp = [MODEL_VOCAB["product"][inv[i]] if i else 0 for i in row[15]]
        pp = [math.log1p(row[1]), math.log1p(row[2]), math.log1p(row[3]), math.log1p(row[4]), math.log1p(row[5]),
              math.log1p(row[6]), row[7] / 5.0, math.log1p(row[13])]
        batch = {"hist_product": torch.tensor([hp]), "hist_category": torch.tensor([row[16]]),
                 "hist_event": torch.tensor([row[17]]), "hist_dwell": torch.tensor([row[18]]),
                 "hist_dt": torch.tensor([row[19]], dtype=torch.float32), "hist_len": torch.tensor([row[20]]),
                 "pp_features": torch.tensor([pp], dtype=torch.float32),
                 "hist_host": torch.tensor([[MODEL_VOCAB["host"].get(inv_h.get(i), 1) if i else 0 for i in row[21]]]),
                 "hist_hour": torch.tensor([row[22]])}
        with torch.no_grad():
            scores = (model.viewer_state(batch) @ cand.T)[0]
        top = sorted(range(len(order)), key=lambda i: (-float(scores[i]), i))[:K]
        ids = torch.tensor([[ext_ids[order[i]] for i in top]])
        probs, _ = ext.intent(batch, ids, cand_host=c_host[top].unsqueeze(0), cand_hour=c_hour[top].unsqueeze(0))
        calibrated = apply_calibration(probs.numpy(), CALIBRATOR)[0]
        out[vid] = {"top": [(order[i], float(scores[i]), float(calibrated[j])) for j, i in enumerate(top)],
                    "all": {p: float(scores[i]) for i, p in enumerate(order)}}
    return out


def load_model_copy(world) -> StreamRankModel:
    art = world["root"] / "model" / "artifacts"
    return load_model(str(art / "model.pt"), json.loads((art / "model_config.json").read_text()))


def test_model_rows_match_an_independent_computation(world):
    """Remapped histories, the factorised score, new-product vectors and calibration agree."""
    expected = _expected_warm(world)
    rows = world["snap"]["gold/user_product_rankings"]
    for vid, exp in expected.items():
        want = exp["top"]
        got = sorted((r for r in rows if r["viewer_id"] == vid), key=lambda r: r["rank"])
        assert [r["product_id"] for r in got] == [p for p, _, _ in want], vid
        assert np.allclose([r["score"] for r in got], [s for _, s, _ in want], atol=1e-5)
        assert np.allclose([r["purchase_prob"] for r in got], [q for _, _, q in want], atol=1e-5)


def test_new_products_get_a_finite_category_score_and_can_appear(world):
    rows = world["snap"]["gold/user_product_rankings"]
    shown = [r for r in rows if r["product_id"].startswith("pN") and r["strategy"] == "model"]
    assert shown, "a new product never made a top-K list"
    assert all(math.isfinite(r["score"]) for r in shown)
    # The two new products differ only in category: different scores prove the category is used,
    # and neither is pinned to the bottom of every list.
    for exp in _expected_warm(world).values():
        assert exp["all"]["pN1"] != exp["all"]["pN2"]
    assert any(r["rank"] < K for r in shown)


def test_rerun_is_identical_and_recorded(world):
    """A re-run gives the same rows; when the champion has meanwhile been trained on a later
    night (a backfill), the rows are the same but the run says they are not what was served."""
    from streamrank.registry import client, tag_version

    ctx2 = Context(world["conf"])
    assert "model_trained_as_of" not in world["result"] and "not what was served" not in _last_score_message(ctx2)
    tag_version(world["conf"], world["version"], {"as_of_date": D1})
    try:
        result = score(ctx2, D)
    finally:
        client(world["conf"]).delete_model_version_tag(world["conf"]["mlflow.model_name"], world["version"], "as_of_date")
    assert result["model_trained_as_of"] == str(D1)
    assert (f"v{world['version']} was trained as of {D1}, after {D}: these rankings of {D1} are a re-scoring"
            in _last_score_message(ctx2))
    again = snapshot(ctx2, D1)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "run_id"} for r in rows]  # noqa: E731
    for name, rows in world["snap"].items():
        assert strip(again[name]) == strip(rows), name
        assert {r["run_id"] for r in again[name]} == {ctx2.run_id}
    assert result["versions_written"]["gold/user_product_rankings"] == \
        world["result"]["versions_written"]["gold/user_product_rankings"] + 1
    dq = ctx2.table("ops/dq_results").read().filter(F.col("stage") == "score")
    assert {r["suite"] for r in dq.select("suite").distinct().collect()} == {
        "gold_user_product_rankings", "gold_user_intent_scores"}
    runs = ctx2.table("ops/job_runs").read().filter((F.col("stage") == "score") & (F.col("status") == "success"))
    assert runs.count() == 2
    assert result["viewer_read"] == world["result"]["viewer_read"] == "files"


def _last_score_message(ctx: Context) -> str:
    runs = [r for r in ctx.table("ops/job_runs").to_arrow().to_pylist() if r["stage"] == "score"]
    return max(runs, key=lambda r: r["started_at"])["message"]


def test_features_with_rows_deleted_by_deletion_vectors_score_without_them(world, tmp_path):
    """delta-spark deleted two viewers from the features of D with deletion vectors: their
    file still holds them, so the stage must not hand its files to the workers, and its read
    through the Delta engine must publish every other viewer's rows as the first run did.
    Batches differ (other viewers, other padding), so float32 results may differ in the
    last few bits. (On a copy of the world: the other tests read its warehouse.)"""
    import shutil

    import pyarrow.parquet as pq
    from conftest import delete_with_deletion_vector

    shutil.copytree(world["root"], tmp_path / "copy")
    conf = world["conf"].with_overrides({"warehouse.root": str(tmp_path / "copy" / "warehouse"),
                                         "landing.root": str(tmp_path / "copy" / "landing")})
    ctx3 = Context(conf)
    features = ctx3.table("gold/viewer_features")
    deleted = 0
    for uri in features.files(partitions={"as_of_date": D}):
        path = Path(uri.removeprefix("file://"))
        ids = pq.read_table(path, columns=["viewer_id"]).column("viewer_id").to_pylist()
        gone = [i for i, v in enumerate(ids) if v in ("w2", "c1")]
        if gone:
            delete_with_deletion_vector(features.uri, path.name, gone)
            deleted += len(gone)
    assert deleted == 2
    assert not features.plain_parquet()
    result = score(ctx3, D)
    assert result["viewer_read"] == "spark" and result["viewers"] == 6 and result["cold_start_viewers"] == 1
    again = snapshot(ctx3, D1)
    for name, rows in world["snap"].items():
        want_rows = [r for r in rows if r["viewer_id"] not in ("w2", "c1")]
        assert len(again[name]) == len(want_rows), name
        for got, want in zip(again[name], want_rows, strict=True):
            for key, value in want.items():
                if key == "run_id":
                    continue
                if isinstance(value, float):
                    assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key, want)
                else:
                    assert got[key] == value, (name, key, want)


def test_missing_schedule_is_exit_5(world, capsys):
    root = world["conf"]["warehouse.root"]
    code = cli_main(["score", "--date", str(D1), "--set", f"warehouse.root={root}"])
    err = capsys.readouterr().err
    assert code == 5, err
    assert "bronze/stream_products" in err and f"stream_products_{D1 + dt.timedelta(days=1)}.csv" in err
    assert "outcome:" not in err  # someone must act: a scheduler must not take it for "nothing to do"
    last = max(world["ctx"].table("ops/job_runs").to_arrow().to_pylist(), key=lambda r: r["started_at"])
    assert (last["stage"], last["status"], last["exit_code"]) == ("score", "failed", 5)
    assert not world["ctx"].table("gold/user_product_rankings").read().filter(
        F.col("score_date") == F.lit(D1 + dt.timedelta(days=1))).count()


def test_no_champion_is_exit_5(spark, base_conf, tmp_path, capsys):
    """Checked before any data is read: a warehouse without a champion fails at once."""
    conf = base_conf.with_overrides({"warehouse.root": str(tmp_path / "warehouse")})
    code = cli_main(["score", "--date", str(D), "--set", f"warehouse.root={tmp_path / 'warehouse'}"])
    err = capsys.readouterr().err
    assert code == 5 and "champion" in err, err
    assert "streamrank score: outcome: no_champion (an expected state" in err
    with pytest.raises(NoChampionError):
        score(Context(conf), D)
    runs = Context(conf).table("ops/job_runs").to_arrow().to_pylist()
    assert [(r["stage"], r["status"], r["exit_code"]) for r in runs] == [("score", "no_champion", 5)] * 2


def test_critical_failure_publishes_nothing(world, spark):
    """A viewer twice in the features of D-1 breaks the intent suite: exit 3, tables unchanged."""
    conf, prev = world["conf"], D - dt.timedelta(days=1)
    wh = Warehouse(spark, conf)
    dup = viewer_rows(prev)[:2]
    dup = dup + [dup[0]]
    wh.table("gold/viewer_features").append(spark.createDataFrame(dup, table_spec("gold/viewer_features").schema))
    wh.table("gold/vocabularies").append(spark.createDataFrame(
        [(k, t, i, prev) for k, m in FEATURE_VOCAB.items() for t, i in m.items()], table_spec("gold/vocabularies").schema))
    before = {n: wh.table(n).version() for n in ("gold/user_product_rankings", "gold/user_intent_scores")}
    files = sorted(p for n in before for p in Path(wh.table(n).uri).rglob("*.parquet"))
    staged = []
    real = StagedWrite.read
    with pytest.MonkeyPatch.context() as mp:  # the gate read the staged files of both tables
        mp.setattr(StagedWrite, "read", lambda self, fallback=None: staged.append(self.table) or real(self, fallback))
        with pytest.raises(QualityGateError) as err:
            score(Context(conf), prev)
    assert err.value.exit_code == 3 and "viewer_id" in str(err.value)
    assert staged == list(before)
    assert {n: wh.table(n).version() for n in before} == before
    assert sorted(p for n in before for p in Path(wh.table(n).uri).rglob("*.parquet")) == files  # staged files deleted


# ----------------------------------------------------------------------------- pure pieces

def test_id_remap_goes_through_tokens():
    remap = id_remap(FEATURE_VOCAB["product"], MODEL_VOCAB["product"])
    assert remap[0] == 0 and remap[1] == 1
    assert remap[FEATURE_VOCAB["product"]["p1"]] == MODEL_VOCAB["product"]["p1"] == 3
    assert id_remap({"x": 2}, {"y": 2})[2] == 1  # unknown to the model -> unknown


def test_deterministic_topk_breaks_ties_by_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [5.0, 4.0, 4.0, 4.0, 0.0]])
    vals, idx = deterministic_topk(scores, 2)
    assert idx.tolist() == [[1, 2], [0, 1]] and vals.tolist() == [[3.0, 3.0], [5.0, 4.0]]
    vals, idx = deterministic_topk(scores, 9)  # k larger than the candidates
    assert idx.shape == (2, 5) and idx[1].tolist() == [0, 1, 2, 3, 4]


def test_deterministic_topk_equals_a_stable_full_sort():
    """Whatever the ties (few distinct scores, k below, at or above the row length), the
    result is the first k of a stable descending sort: the same rows every night."""
    gen = torch.Generator().manual_seed(11)
    for _ in range(200):
        n, rows, k = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in ((1, 40), (1, 20), (1, 45)))
        scores = torch.randint(0, 6, (rows, n), generator=gen).float()
        vals, idx = deterministic_topk(scores, k)
        s_vals, s_idx = torch.sort(scores, dim=1, descending=True, stable=True)
        assert torch.equal(idx, s_idx[:, :k]) and torch.equal(vals, s_vals[:, :k]), (scores, k)


def test_missing_input_error_is_exit_5():
    assert MissingInputError.exit_code == 5 and NoChampionError.exit_code == 5
