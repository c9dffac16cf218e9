"""Features stage on a hand-made silver world whose answers are known.

The world (D = 2026-11-08, TRAIN_DAYS = 6: cutoffs 11-03 .. 11-07 train, 11-08 valid,
serving cutoff 11-09 00:00):

- va: a buyer. 10-25 buys p5; 11-05 views/clicks/likes p1, carts p2; 11-06 buys p2 (2 units),
  views p9 (not in any catalog); 11-07 carts+buys p3, carts p1; 11-08 views p4 (33 min),
  carts+buys p4, carts p5, carts p4 again, gifts on p4, leaves a stream.
- vb: views/comments p6 (800) on 11-02, carts p6 at 11-06 00:00:00 sharp, views p6 on 11-07;
  never buys -> tier 5.
- vc: only enter/leave on 11-08: a feature row with an empty history, no training rows.
- vd: one event on 09-20, outside the silver window: nowhere, and its product p8 is not
  in the vocabulary.
- ve: 60 views on 11-04 (more than L = 50), then click and cart of p3 at the same instant.
Catalog of 11-08: p1..p6 plus 40 fillers q00..q39; the 11-07 snapshot also has p7 (must
not be used). Schedules: 11-06 {p5, p6}, 11-07 {p3, p1, q00..q39}, 11-08 {p4, p6, p1};
none for 11-03 .. 11-05.
"""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest
from pyspark.sql import functions as F

from streamrank.context import Context
from streamrank.delta import Warehouse
from streamrank.errors import MissingInputError
from streamrank.features import (
    EVENT_TYPES,
    FeatureParams,
    build_features,
    cutoffs_clear_of,
    day_ranges,
    dwell_bucket,
    feature_cutoff_us,
    is_test_viewer,
    training_cutoffs,
    uncleaned_days,
)
from streamrank.schemas import table_spec

D = dt.date(2026, 11, 8)
UTC = dt.UTC
L, C, T_ = 50, 32, 10


def ts(day: int, h: int = 0, m: int = 0, s: int = 0, month: int = 11) -> dt.datetime:
    return dt.datetime(2026, month, day, h, m, s, tzinfo=UTC)


class World:
    """Silver rows built with a running event id."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def ev(self, viewer: str, when: dt.datetime, etype: str, product: str | None = None, dwell: int = 0,
           price: float | None = None, qty: int | None = None, host: str | None = "h1") -> None:
        n = len(self.rows)
        self.rows.append((
            f"e{n:05d}", viewer, f"s-{viewer}", "st1", host, product, etype, when, dwell, price, qty, "1.0",
            etype == "comment", 5 if etype == "comment" else None, "f.jsonl", n, when.date(), "clean-1", when.date(),
        ))


def build_world() -> tuple[World, list[tuple], list[tuple]]:
    w = World()
    # va
    w.ev("va", ts(25, 9, month=10), "purchase", "p5", price=10.0, qty=1)
    w.ev("va", ts(5, 10, 0), "enter_stream")
    w.ev("va", ts(5, 10, 1), "view_product", "p1", dwell=5000)
    w.ev("va", ts(5, 10, 2), "click_product", "p1")
    w.ev("va", ts(5, 10, 3), "like", "p1")
    w.ev("va", ts(5, 10, 5), "add_to_cart", "p2", qty=2)
    w.ev("va", ts(6, 12, 0), "purchase", "p2", price=30.0, qty=2)
    w.ev("va", ts(6, 12, 30), "view_product", "p9", dwell=100)
    w.ev("va", ts(7, 9, 0), "add_to_cart", "p3", qty=1)
    w.ev("va", ts(7, 9, 30), "purchase", "p3", price=20.0, qty=1)
    w.ev("va", ts(7, 10, 0), "add_to_cart", "p1", qty=1)
    w.ev("va", ts(8, 8, 0), "view_product", "p4", dwell=2_000_000)
    w.ev("va", ts(8, 9, 0), "leave_stream", dwell=600_000)
    w.ev("va", ts(8, 10, 0), "add_to_cart", "p4", qty=1)
    w.ev("va", ts(8, 10, 5), "purchase", "p4", price=500.0, qty=1)
    w.ev("va", ts(8, 11, 0), "add_to_cart", "p5", qty=1)
    w.ev("va", ts(8, 11, 30), "add_to_cart", "p4", qty=1)
    w.ev("va", ts(8, 20, 0), "gift", "p4", host="h2")
    # vb
    w.ev("vb", ts(2, 14, 0), "view_product", "p6", dwell=800)
    w.ev("vb", ts(2, 14, 1), "comment", "p6", host=None)
    w.ev("vb", ts(6), "add_to_cart", "p6", qty=1)  # exactly at the 11-06 cutoff: its target, not its history
    w.ev("vb", ts(7, 15, 0), "view_product", "p6", dwell=250)
    # vc
    w.ev("vc", ts(8, 1, 0), "enter_stream")
    w.ev("vc", ts(8, 1, 30), "leave_stream", dwell=1_800_000)
    # vd: outside the window
    w.ev("vd", ts(20, 12, month=9), "view_product", "p8", dwell=1000)
    # ve: 60 views, then a click and a cart at the same instant (cart inserted first)
    for i in range(60):
        w.ev("ve", ts(4, 10) + dt.timedelta(minutes=i), "view_product", "p1" if i % 2 == 0 else "p2", dwell=1000)
    w.ev("ve", ts(4, 23), "add_to_cart", "p3", qty=1)
    w.ev("ve", ts(4, 23), "click_product", "p3")

    def product(pid: str, cat: str, price: float, snap: dt.date, line: int) -> tuple:
        return (pid, f"title {pid}", cat, "brand", price, dt.date(2026, 1, 1), "products.csv", line, "ing-1", snap)

    key = [("p1", "phones", 300.0), ("p2", "phone_cases", 15.0), ("p3", "chargers", 20.0), ("p4", "phones", 500.0),
           ("p5", "snacks", 5.0), ("p6", "laptops", 800.0)]
    fillers = [(f"q{i:02d}", "toys", 10.0 + i) for i in range(40)]
    catalog = [product(p, c, x, D, i) for i, (p, c, x) in enumerate(key + fillers)]
    catalog += [product(p, c, x, D - dt.timedelta(days=1), i) for i, (p, c, x) in enumerate(key + [("p7", "toys", 1.0)])]

    def slot(day: dt.date, pids: list[str], stream: str = "st1", hour: int = 18) -> list[tuple]:
        start = dt.datetime.combine(day, dt.time(hour), tzinfo=UTC)
        return [(stream, p, start, start + dt.timedelta(minutes=5), 9.9, "sp.csv", i, "ing-1", day) for i, p in enumerate(pids)]

    def stream(day: dt.date, sid: str, host: str, hour: int) -> tuple:
        start = dt.datetime.combine(day, dt.time(hour), tzinfo=UTC)
        return (sid, host, start, start + dt.timedelta(hours=2), "streams.csv", 0, "ing-1", day)

    schedule = slot(dt.date(2026, 11, 6), ["p5", "p6"])  # no bronze/streams rows that day: host unknown
    schedule += slot(dt.date(2026, 11, 7), ["p3", "p1"] + [f"q{i:02d}" for i in range(40)])
    # p4 is shown twice on 11-08: its earliest slot (07:00 on st2, host h2) is its context
    schedule += slot(dt.date(2026, 11, 8), ["p4", "p6", "p1"]) + slot(dt.date(2026, 11, 8), ["p4"], "st2", 7)
    streams = [stream(dt.date(2026, 11, 7), "st1", "h1", 17), stream(dt.date(2026, 11, 8), "st1", "h1", 17),
               stream(dt.date(2026, 11, 8), "st2", "h9", 6)]  # h9 never seen in silver: unknown
    return w, catalog, schedule, streams, key + fillers


def load(spark, conf) -> list[float]:
    world, catalog, schedule, streams, prices = build_world()
    wh = Warehouse(spark, conf)
    wh.table("silver/viewer_events").append(spark.createDataFrame(world.rows, table_spec("silver/viewer_events").schema))
    wh.table("bronze/products").append(spark.createDataFrame(catalog, table_spec("bronze/products").schema))
    wh.table("bronze/stream_products").append(spark.createDataFrame(schedule, table_spec("bronze/stream_products").schema))
    wh.table("bronze/streams").append(spark.createDataFrame(streams, table_spec("bronze/streams").schema))
    return [p for _, _, p in prices]


def snapshot(ctx: Context) -> dict[str, list[tuple]]:
    """Full contents of the three outputs for D, sorted, as plain tuples."""
    out = {}
    for name in ("gold/vocabularies", "gold/viewer_features", "gold/training_examples"):
        df = ctx.table(name).read().filter(F.col("as_of_date") == D)
        out[name] = sorted(tuple(tuple(v) if isinstance(v, list) else v for v in r) for r in df.collect())
    return out


@pytest.fixture(scope="module")
def world(spark, base_conf, tmp_path_factory):
    """Run the stage once on the world; tests share the result (Spark jobs are the slow part)."""
    root = tmp_path_factory.mktemp("features")
    conf = base_conf.with_overrides({"warehouse.root": str(root / "warehouse"), "landing.root": str(root / "landing")})
    prices = load(spark, conf)
    ctx = Context(conf)
    result = build_features(ctx, D)
    snap = snapshot(ctx)
    vocab = {(k, t): i for k, t, i, _ in snap["gold/vocabularies"]}
    vf_cols = table_spec("gold/viewer_features").schema.fieldNames()
    te_cols = table_spec("gold/training_examples").schema.fieldNames()
    vf = {r[0]: dict(zip(vf_cols, r, strict=True)) for r in snap["gold/viewer_features"]}
    te = {(r[0], r[1]): dict(zip(te_cols, r, strict=True)) for r in snap["gold/training_examples"]}
    return {"ctx": ctx, "result": result, "snap": snap, "vocab": vocab, "vf": vf, "te": te, "prices": prices}


def test_vocabulary_sorted_with_reserved_ids(world):
    vocab = world["vocab"]
    for kind in ("product", "category", "event", "host"):
        assert vocab[(kind, "<pad>")] == 0 and vocab[(kind, "<unk>")] == 1
    assert {t: i for (k, t), i in vocab.items() if k == "host"} == {"<pad>": 0, "<unk>": 1, "h1": 2, "h2": 3}
    products = sorted(t for k, t in vocab if k == "product" and not t.startswith("<"))
    # catalog of D (not p7 of the older snapshot) + p9 seen in silver; not p8 (outside the window)
    assert products == sorted(["p1", "p2", "p3", "p4", "p5", "p6", "p9"] + [f"q{i:02d}" for i in range(40)])
    assert [vocab[("product", t)] for t in products] == list(range(2, 2 + len(products)))
    assert {t: vocab[("category", t)] for k, t in vocab if k == "category" and not t.startswith("<")} == {
        "chargers": 2, "laptops": 3, "phone_cases": 4, "phones": 5, "snacks": 6, "toys": 7}
    assert [vocab[("event", t)] for t in EVENT_TYPES] == list(range(2, 12))
    ids = [(k, i) for (k, _), i in vocab.items()]
    assert len(ids) == len(set(ids))  # one token per (kind, idx)


def test_viewer_history_arrays(world):
    vf, vocab = world["vf"], world["vocab"]
    assert set(vf) == {"va", "vb", "vc", "ve"}  # vd's only event is outside the window
    p = lambda t: vocab[("product", t)]  # noqa: E731
    va = vf["va"]
    # 16 product events: 10-25 buy p5 .. 11-08 gift p4 (enter/leave have no product)
    assert va["hist_len"] == 16
    order = ["p5", "p1", "p1", "p1", "p2", "p2", "p9", "p3", "p3", "p1", "p4", "p4", "p4", "p5", "p4", "p4"]
    assert va["hist_product"] == (0,) * 34 + tuple(p(x) for x in order)
    assert va["hist_event"] == (0,) * 34 + (11, 4, 9, 5, 10, 11, 4, 10, 11, 10, 4, 10, 11, 10, 10, 8)
    # dwell buckets: 5000 ms -> 7, 100 ms -> 2, 2,000,000 ms -> capped 15, 0 -> 1
    assert va["hist_dwell"] == (0,) * 34 + (1, 7, 1, 1, 1, 1, 2, 1, 1, 1, 15, 1, 1, 1, 1, 1)
    # categories: snacks 6, phones 5, phone_cases 4, p9 unknown 1, chargers 2
    assert va["hist_category"] == (0,) * 34 + (6, 5, 5, 5, 4, 4, 1, 2, 2, 5, 5, 5, 5, 6, 5, 5)
    assert va["hist_dt"][:34] == (0.0,) * 34
    assert va["hist_dt"][-1] == pytest.approx(4.0)           # gift at 20:00, cutoff 11-09 00:00
    assert va["hist_dt"][34] == pytest.approx(14 * 24 + 15)  # 10-25 09:00
    assert list(va["hist_dt"][34:]) == sorted(va["hist_dt"][34:], reverse=True)  # oldest first

    ve = vf["ve"]  # 62 events, the last 50 kept; same-instant click before cart (funnel order)
    assert ve["hist_len"] == 50
    assert ve["hist_event"][-2:] == (9, 10) and ve["hist_event"][:48] == (4,) * 48
    assert ve["hist_product"][0] == p("p1")  # view #12 of 0..59
    assert ve["hist_dt"][0] == pytest.approx(24 * 4 + 14 - 12 / 60, abs=1e-3)  # 11-04 10:12
    assert ve["hist_dt"][-1] == pytest.approx(97.0)

    vc = vf["vc"]
    assert vc["hist_len"] == 0 and vc["hist_product"] == (0,) * L and vc["n_events"] == 2
    for row in vf.values():
        for col in ("hist_product", "hist_category", "hist_event", "hist_dwell", "hist_dt"):
            assert len(row[col]) == L


def test_viewer_purchase_power_and_engagement(world):
    vf, prices = world["vf"], world["prices"]
    q = np.percentile(prices, [20, 40, 60, 80])
    va = vf["va"]
    assert va["frequency_7d"] == 3 and va["frequency_30d"] == 4
    assert va["monetary_7d"] == pytest.approx(550.0) and va["monetary_30d"] == pytest.approx(560.0)
    assert va["avg_price_paid"] == pytest.approx(560.0 / 5)  # per unit: p2 was bought twice
    assert va["recency_days"] == pytest.approx((13 * 60 + 55) / 1440)
    assert va["price_tier"] == 1 + int(sum(112.0 > x for x in q))
    assert (va["likes"], va["comments"], va["gifts"], va["n_events"]) == (1, 0, 1, 18)
    assert va["watch_time_ms"] == 5000 + 100 + 2_000_000
    assert va["dwell_ms_total"] == 5000 + 100 + 2_000_000 + 600_000
    assert va["last_event_ts"].replace(tzinfo=None) == dt.datetime(2026, 11, 8, 20, 0) or \
        va["last_event_ts"].astimezone(UTC) == ts(8, 20)
    vb = vf["vb"]
    assert vb["recency_days"] == 999.0 and vb["frequency_30d"] == 0 and vb["avg_price_paid"] == 0.0
    assert vb["hist_len"] == 4 and vb["hist_event"][-4:] == (4, 6, 10, 4)
    assert vb["price_tier"] == 5 and vb["comments"] == 1  # viewed p6 at 800, the top quintile
    assert vf["vc"]["price_tier"] == 3 and vf["vc"]["dwell_ms_total"] == 1_800_000 and vf["vc"]["watch_time_ms"] == 0


def test_training_rows_targets_and_splits(world):
    te, vocab = world["te"], world["vocab"]
    p = lambda t: vocab[("product", t)]  # noqa: E731
    c = lambda day: dt.datetime(2026, 11, day)  # noqa: E731
    keys = {(v, k.astimezone(UTC).replace(tzinfo=None) if k.tzinfo else k) for v, k in te}
    expected = {("va", c(d)) for d in (6, 7, 8)} | {("vb", c(d)) for d in range(3, 9)} | {("ve", c(d)) for d in range(5, 9)}
    assert keys == expected
    te = {(v, k.astimezone(UTC).replace(tzinfo=None) if k.tzinfo else k): r for (v, k), r in te.items()}
    held = held_out_viewers(world["ctx"].spark, ["va", "vb", "ve"])
    assert {k: r["split"] for k, r in te.items()} == {
        k: ("test" if k[0] in held else "valid") if k[1] == c(8) else "train" for k in expected}

    valid = te[("va", c(8))]  # targets on day 11-08: cart p4, buy p4, cart p5, cart p4
    assert valid["target_products"] == (p("p4"), p("p5")) + (0,) * 8
    assert valid["target_product"] == p("p4") and valid["label_purchase"] == 1
    assert valid["hist_len"] == 10 and valid["hist_dt"][-1] == pytest.approx(14.0)  # cart p1 11-07 10:00
    assert valid["hist_event"] == (0,) * 40 + (11, 4, 9, 5, 10, 11, 4, 10, 11, 10)
    # pp_features as of 11-08 00:00: last buy 11-07 09:30, 2 buys in 7 d, 3 in 30 d, 50 / 60 spent, 4 units
    q = np.percentile(world["prices"], [20, 40, 60, 80])
    tier = 1 + int(sum(15.0 > x for x in q))
    want = [math.log1p(14.5 / 24), math.log1p(2), math.log1p(3), math.log1p(50), math.log1p(60), math.log1p(15.0),
            tier / 5, math.log1p(11)]
    assert valid["pp_features"] == pytest.approx(want, rel=1e-5)

    t7 = te[("va", c(7))]  # day 11-07: cart p3, buy p3, cart p1
    assert t7["target_products"] == (p("p3"), p("p1")) + (0,) * 8 and t7["label_purchase"] == 1
    t6 = te[("va", c(6))]  # day 11-06: buy p2 only
    assert t6["target_products"] == (p("p2"),) + (0,) * 9 and t6["target_product"] == p("p2")
    nolabel = te[("vb", c(3))]
    assert nolabel["target_product"] == 0 and nolabel["target_products"] == (0,) * T_ and nolabel["label_purchase"] == 0
    at_cut = te[("vb", c(6))]  # the cart at 11-06 00:00:00 sharp belongs to the day after the cutoff
    assert at_cut["target_products"][0] == p("p6") and at_cut["label_purchase"] == 0 and at_cut["hist_len"] == 2
    assert te[("vb", c(7))]["hist_len"] == 3 and te[("vb", c(7))]["target_product"] == 0
    assert te[("ve", c(5))]["label_purchase"] == 0  # ve carted on 11-04 23:00, before the cutoff: history, not target
    assert te[("ve", c(5))]["hist_event"][-1] == 10
    for row in te.values():
        assert len(row["hist_product"]) == L and len(row["hist_dt"]) == L and len(row["pp_features"]) == 8
        assert len(row["target_products"]) == T_ and len(row["cand_products"]) == C


def test_candidates_positives_first_then_schedule(world):
    te, vocab = world["te"], world["vocab"]
    p = lambda t: vocab[("product", t)]  # noqa: E731
    c = lambda day: dt.datetime(2026, 11, day)  # noqa: E731
    te = {(v, k.astimezone(UTC).replace(tzinfo=None) if k.tzinfo else k): r for (v, k), r in te.items()}
    sched = {6: {p("p5"), p("p6")}, 7: {p("p3"), p("p1")} | {p(f"q{i:02d}") for i in range(40)}, 8: {p("p4"), p("p6"), p("p1")}}
    for (viewer, cut), row in te.items():
        cand = row["cand_products"]
        day = cut.day
        if day not in sched:  # no schedule for that day: all padding
            assert cand == (0,) * C, (viewer, cut)
            continue
        assert set(cand) <= sched[day], (viewer, cut)
        pos = [x for x in row["target_products"] if x and x in sched[day]]
        assert list(cand[: len(pos)]) == pos
        if len(sched[day]) >= C:
            assert len(set(cand)) == C  # a big enough schedule gives C distinct products
        else:
            assert set(cand[: len(sched[day])]) == sched[day]  # every scheduled product before any repeat
    assert te[("va", c(8))]["cand_products"][0] == p("p4")      # p4 scheduled, p5 not
    assert te[("va", c(7))]["cand_products"][:2] == (p("p3"), p("p1"))
    assert p("p2") not in te[("va", c(6))]["cand_products"]     # the positive p2 was not on the schedule


def test_stream_context_of_history_and_candidates(world):
    """Host and UTC hour of every history event; host and hour of each candidate's earliest slot."""
    vf, te, vocab = world["vf"], world["te"], world["vocab"]
    h = lambda t: vocab[("host", t)]  # noqa: E731
    p = lambda t: vocab[("product", t)]  # noqa: E731
    va = vf["va"]
    assert va["hist_host"] == (0,) * 34 + (h("h1"),) * 15 + (h("h2"),)  # the gift on 11-08 was on h2's stream
    hours = (9, 10, 10, 10, 10, 12, 12, 9, 9, 10, 8, 10, 10, 11, 11, 20)  # UTC hour of each of the 16 events
    assert va["hist_hour"] == (0,) * 34 + tuple(2 + x for x in hours)
    assert vf["vb"]["hist_host"][-4:] == (h("h1"), 1, h("h1"), h("h1"))  # an event without host: unknown
    assert vf["vc"]["hist_host"] == (0,) * L and vf["vc"]["hist_hour"] == (0,) * L
    c = lambda day: dt.datetime(2026, 11, day)  # noqa: E731
    te = {(v, k.astimezone(UTC).replace(tzinfo=None) if k.tzinfo else k): r for (v, k), r in te.items()}
    ctx8 = {(18, "st1"): (h("h1"), 20), (7, "st2"): (1, 9)}  # st2's host h9 is not in the vocabulary
    want8 = {p("p4"): ctx8[(7, "st2")], p("p6"): ctx8[(18, "st1")], p("p1"): ctx8[(18, "st1")]}
    for (viewer, cut), row in te.items():
        got = list(zip(row["cand_products"], row["cand_host"], row["cand_hour"], strict=True))
        for prod, host, hour in got:
            if prod == 0:
                assert (host, hour) == (0, 0), (viewer, cut)
            elif cut.day == 8:
                assert (host, hour) == want8[prod], (viewer, cut, prod)
            elif cut.day == 7:
                assert (host, hour) == (h("h1"), 20), (viewer, cut, prod)
            else:  # 11-06: stream_products without a bronze/streams row
                assert (host, hour) == (1, 20), (viewer, cut, prod)
    assert te[("va", c(8))]["cand_host"][0] == 1 and te[("va", c(8))]["cand_hour"][0] == 9


def held_out_viewers(spark, viewers: list[str], share: float = 0.5) -> set[str]:
    """The viewers whose validation rows features puts in split 'test'."""
    rows = spark.createDataFrame([(v,) for v in viewers], "viewer_id string")
    return {r.viewer_id for r in rows.filter(is_test_viewer(F.col("viewer_id"), share)).collect()}


def test_test_split_is_a_stable_share_of_viewers(spark):
    viewers = [f"v{i:07d}" for i in range(20_000)]
    held = held_out_viewers(spark, viewers)
    assert 0.48 < len(held) / len(viewers) < 0.52
    assert held_out_viewers(spark, viewers) == held  # the same viewers every night
    assert held < held_out_viewers(spark, viewers, 0.8)  # a larger share only adds viewers


def test_rerun_is_identical_and_recorded(world):
    ctx, before = world["ctx"], world["snap"]
    result = build_features(ctx, D)
    assert snapshot(ctx) == before
    n_test = len(held_out_viewers(ctx.spark, ["va", "vb", "ve"]))
    assert result["train_rows"] == 10 and result["valid_rows"] + result["test_rows"] == 3 and result["viewers"] == 4
    assert result["test_rows"] == n_test
    assert result["versions_written"]["gold/training_examples"] == world["result"]["versions_written"]["gold/training_examples"] + 1
    runs = ctx.table("ops/job_runs").read().filter((F.col("stage") == "features") & (F.col("status") == "success")).count()
    assert runs == 2


def test_missing_silver_is_exit_5(spark, conf):
    ctx = Context(conf)
    with pytest.raises(MissingInputError, match="silver/viewer_events") as err:
        build_features(ctx, D)
    assert err.value.exit_code == 5


def test_dwell_bucket_edges(spark):
    values = [None, 0, 99, 100, 199, 200, 5000, 819_199, 819_200, 10**9]
    df = spark.createDataFrame([(v,) for v in values], "d long")
    got = [r[0] for r in df.select(dwell_bucket(F.col("d"))).collect()]
    assert got == [1, 1, 1, 2, 2, 3, 7, 14, 15, 15]


def test_missing_catalog_is_exit_5(spark, conf):
    world = World()
    world.ev("va", ts(8, 12), "view_product", "p1", dwell=1000)
    Warehouse(spark, conf).table("silver/viewer_events").append(
        spark.createDataFrame(world.rows, table_spec("silver/viewer_events").schema))
    with pytest.raises(MissingInputError, match="bronze/products"):
        build_features(Context(conf), D)


def test_gap_helpers():
    d = dt.date
    cleaned = {d(2026, 11, 2), d(2026, 11, 3), d(2026, 11, 5), d(2026, 11, 8)}
    # days before the first cleaned one are the warehouse's start, not gaps
    assert uncleaned_days(cleaned, d(2026, 10, 1), d(2026, 11, 8)) == [d(2026, 11, 4), d(2026, 11, 6), d(2026, 11, 7)]
    assert uncleaned_days(set(), d(2026, 10, 1), d(2026, 11, 8)) == []
    assert day_ranges([d(2026, 11, 7), d(2026, 11, 4), d(2026, 11, 6)]) == "2026-11-04, 2026-11-06..2026-11-07"
    params = FeatureParams(train_days=3, cutoffs_per_day=2)
    cuts = training_cutoffs(d(2026, 11, 8), params)
    kept, left_out = cutoffs_clear_of(cuts, [d(2026, 11, 6)])
    # a cutoff is left out when any part of the day after it falls on 11-06
    hours = lambda c: (c - feature_cutoff_us(d(2026, 11, 4))) // 3_600_000_000  # noqa: E731 - hours after 11-05 00:00
    assert [hours(c) for c in left_out] == [12, 24, 36]
    assert [hours(c) for c, _ in kept] == [48, 72]  # 11-07 12:00 is not a cutoff: its day overlaps validation
    assert [s for _, s in kept] == ["train", "valid"]


def test_a_day_clean_never_published_leaves_its_cutoff_out(world, spark, base_conf, tmp_path, caplog):
    """Nightly skipped 11-06 (no clean run for it): the cutoff whose targets are 11-06 is left
    out instead of training on false "bought nothing" labels; every other row is as before."""
    conf = base_conf.with_overrides({"warehouse.root": str(tmp_path / "warehouse"), "landing.root": str(tmp_path / "landing")})
    load(spark, conf)
    ctx = Context(conf)
    ran = [dt.date(2026, 11, day) for day in (2, 3, 4, 5, 7)]
    ctx.table("ops/job_runs").append_rows(
        [{"run_id": "clean-1", "stage": "clean", "status": "success", "exit_code": 0, "run_date": d} for d in ran]
        + [{"run_id": "clean-2", "stage": "clean", "status": "failed", "exit_code": 3, "run_date": dt.date(2026, 11, 6)}])
    with caplog.at_level("WARNING", logger="streamrank.features"):
        result = build_features(ctx, D)
    assert "clean has not published 2026-11-06" in caplog.text and "streamrank clean --date X" in caplog.text
    assert (result["days_not_cleaned"], result["cutoffs_left_out"], result["cutoffs"]) == (1, 1, 5)
    recorded = ctx.table("ops/job_runs").to_arrow(partitions={"run_date": D}).to_pylist()
    assert [r["message"] for r in recorded if r["stage"] == "features"] == [
        "not cleaned: 2026-11-06 (1 training cutoff(s) left out); backfill with ingest and clean for those dates, "
        "then `streamrank nightly --date 2026-11-08 --from features`"]

    gap_cut = dt.datetime(2026, 11, 6, tzinfo=UTC)
    full = [r for r in world["snap"]["gold/training_examples"] if r[1].astimezone(UTC) != gap_cut]
    assert len(full) == len(world["snap"]["gold/training_examples"]) - 3  # va, vb and ve had rows at that cutoff
    assert snapshot(ctx)["gold/training_examples"] == full
    assert result["train_rows"] == world["result"]["train_rows"] - 3


def test_rows_ingested_after_d_do_not_change_d(world, spark, base_conf, tmp_path):
    """Features of D re-run after D+1 was cleaned: the late events of D and D-1 that D+1's
    ingest brought (a purchase, a new viewer) are not in D's tables, which stay identical."""
    conf = base_conf.with_overrides({"warehouse.root": str(tmp_path / "warehouse"), "landing.root": str(tmp_path / "landing")})
    load(spark, conf)
    late = World()
    late.ev("vb", ts(8, 23, 50), "purchase", "p6", price=800.0, qty=1)
    late.ev("vz", ts(7, 22), "view_product", "p1", dwell=3000)
    # ingest_date D+1, event_date as the event says (the schema's column order)
    late.rows = [(f"late{i}",) + r[1:14] + ("f2.jsonl", i, D + dt.timedelta(days=1), "clean-2", r[18])
                 for i, r in enumerate(late.rows)]
    ctx = Context(conf)
    ctx.table("silver/viewer_events").append(spark.createDataFrame(late.rows, table_spec("silver/viewer_events").schema))
    result = build_features(ctx, D)
    assert snapshot(ctx) == world["snap"]
    assert (result["viewers"], result["train_rows"]) == (world["result"]["viewers"], world["result"]["train_rows"])
