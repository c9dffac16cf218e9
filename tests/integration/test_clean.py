"""The clean stage on local Spark: the generator's fault ledger lands 1:1 where it should.

Two generated days (scale 0.005, faults on) are ingested and cleaned once for the whole
module (about 5k lines a day); the other tests hand-write a few bronze rows. Precedence
under test: reasons first (every code that applies), then deduplication among the rows
that would otherwise be valid, so every ledger kind maps to exactly one outcome.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from streamrank import clean as clean_mod
from streamrank.clean import (
    LEDGER_DUPLICATES,
    LEDGER_REASON,
    NO_DICTIONARY,
    REASONS,
    CleanRules,
    apply_bots,
    clean,
    duplicate_plan,
    find_bots,
    in_set,
    label,
    row_reasons,
    sliding_max,
    type_events,
)
from streamrank.context import Context
from streamrank.errors import MissingInputError, QualityGateError, StreamrankError
from streamrank.schemas import table_spec
from streamrank.spark import without_dictionaries

D1, D2 = dt.date(2026, 3, 1), dt.date(2026, 3, 2)
PII = ("ip", "device_id", "comment_text")
RUN_COLS = ("clean_run_id", "quarantined_at")


def _rows(df: DataFrame, drop: tuple[str, ...] = RUN_COLS) -> list[tuple]:
    cols = [c for c in df.columns if c not in drop]
    return sorted(tuple(r) for r in df.select(*cols).collect())


@pytest.fixture(scope="module")
def world(spark, base_conf, tmp_path_factory) -> dict[str, Any]:
    """Two generated, ingested and cleaned days sharing one warehouse."""
    from streamrank.generate import generate
    from streamrank.ingest import ingest

    root = tmp_path_factory.mktemp("clean")
    cfg = base_conf.with_overrides({"warehouse.root": str(root / "warehouse"), "landing.root": str(root / "landing"),
                                    "delta.engine": "rs"})
    ledger = generate(cfg.landing, D1, 2, scale=0.005, faults=True)
    ctx = Context(cfg)
    for day in (D1, D2):
        ingest(ctx, day)
    metrics = {day: clean(ctx, day) for day in (D1, D2)}
    return {"ctx": ctx, "ledger": ledger, "metrics": metrics}


def test_ledger_counts_land_where_they_should(world):
    ctx: Context = world["ctx"]
    silver = ctx.table("silver/viewer_events").read()
    quarantine = ctx.table("silver/quarantine").read()
    bronze = ctx.table("bronze/viewer_events").read()
    for day in (D1, D2):
        entry = world["ledger"]["dates"][day.isoformat()]
        faults, m = entry["faults"], world["metrics"][day]
        q = quarantine.filter(F.col("ingest_date") == F.lit(day))
        per_code = Counter(code for r in q.select("reasons").collect() for code in r["reasons"])
        for kind, code in LEDGER_REASON.items():
            assert per_code[code] == faults[kind], f"{day} {kind} -> {code}: {per_code[code]} != ledger {faults[kind]}"
        assert set(per_code) <= set(LEDGER_REASON.values())  # no bad_price/bad_quantity in generated data
        # one fault per faulty line, so one reason per quarantined row, and nothing else lands there
        assert q.count() == sum(faults[k] for k in LEDGER_REASON) == m["quarantined_rows"]
        assert m["duplicates_dropped"] == sum(faults[k] for k in LEDGER_DUPLICATES)
        n_silver = silver.filter(F.col("ingest_date") == F.lit(day)).count()
        n_bronze = bronze.filter(F.col("ingest_date") == F.lit(day)).count()
        assert n_bronze == entry["lines"] == m["bronze_rows"]
        assert n_silver == m["silver_rows"] == entry["valid_events"]
        assert n_silver + m["quarantined_rows"] + m["duplicates_dropped"] == n_bronze
        assert all(list(r["reasons"]) == sorted(r["reasons"]) and r["reasons"] for r in q.select("reasons").collect())
        assert q.filter(F.col("raw_line").isNull() | F.col("source_file").isNull()).count() == 0
        # each quarantined row keeps ITS raw line and raw event_ts text (bot rows fetch theirs from bronze)
        b = bronze.filter(F.col("ingest_date") == F.lit(day)).select(
            "source_file", "line_number", F.col("raw_line").alias("b_line"), F.col("event_ts").alias("b_ts"))
        keyed = q.join(b, ["source_file", "line_number"], "left")
        assert keyed.count() == q.count() > faults["bot_events"] > 0
        assert keyed.filter(~F.col("raw_line").eqNullSafe(F.col("b_line")) | ~F.col("event_ts").eqNullSafe(F.col("b_ts"))).count() == 0
    # late events (event_ts on D-1) of ingest date D2 sit in the D1 event_date partition
    late = silver.filter((F.col("ingest_date") == F.lit(D2)) & (F.col("event_date") == F.lit(D1))).count()
    assert late == world["ledger"]["dates"][D2.isoformat()]["late_events"] == world["metrics"][D2]["late_rows"] > 0
    dates = {r[0] for r in silver.filter(F.col("ingest_date") == F.lit(D2)).select("event_date").distinct().collect()}
    assert dates == {D1, D2}
    # replays across days: D2 lines whose event_id is already in silver from D1 were dropped, not re-added
    replayed = (bronze.filter(F.col("ingest_date") == F.lit(D2)).select("event_id")
                .join(silver.filter(F.col("ingest_date") == F.lit(D1)).select("event_id"), "event_id", "left_semi"))
    assert replayed.count() > 0
    assert replayed.join(silver.filter(F.col("ingest_date") == F.lit(D2)), "event_id", "left_semi").count() == 0
    # silver is unique on event_id across both days, and minimised
    assert silver.count() == silver.select("event_id").distinct().count()
    assert not set(PII) & set(silver.columns)
    assert silver.filter("has_comment").count() > 0
    assert silver.filter("has_comment AND comment_length > 0").count() == silver.filter("has_comment").count()
    runs = ctx.table("ops/job_runs").to_arrow().to_pylist()
    assert sum(1 for r in runs if r["stage"] == "clean" and r["status"] == "success") == 2


def test_near_unique_columns_are_written_without_dictionaries(world, spark):
    """clean's write settings reach the Parquet writer, and leave the session as they found it."""
    import pyarrow.parquet as pq

    ctx: Context = world["ctx"]
    for table, repeating in (("silver/viewer_events", ("viewer_id", "event_type")), ("silver/quarantine", ("source_file",))):
        dictionary_used: set[str] = set()
        for uri in ctx.table(table).files():
            meta = pq.ParquetFile(uri.removeprefix("file://")).metadata
            for g in range(meta.num_row_groups):
                encodings = {meta.row_group(g).column(c).path_in_schema: meta.row_group(g).column(c).encodings
                             for c in range(meta.num_columns)}
                for name in set(NO_DICTIONARY) & set(encodings):
                    assert not any("DICTIONARY" in e for e in encodings[name]), (table, name, encodings[name])
                dictionary_used |= {name for name, codes in encodings.items() if any("DICTIONARY" in e for e in codes)}
        # the writer still uses dictionaries elsewhere (it drops one where it does not pay, e.g. a tiny file)
        assert set(repeating) <= dictionary_used, (table, dictionary_used)
    assert all(spark.conf.get(k, None) is None for k in without_dictionaries(NO_DICTIONARY))


def test_volume_ratio_is_against_the_trailing_median_of_earlier_days(world):
    """D2's volume is compared with D1's silver rows (the only earlier day); D1 has no history."""
    m = world["metrics"]
    assert m[D1]["volume_ratio"] is None
    assert m[D2]["volume_ratio"] == round(m[D2]["silver_rows"] / m[D1]["silver_rows"], 4)


def test_rerun_leaves_identical_tables(world):
    ctx: Context = world["ctx"]
    silver_t, quarantine_t = ctx.table("silver/viewer_events"), ctx.table("silver/quarantine")
    before = (_rows(silver_t.read()), _rows(quarantine_t.read()), silver_t.version())
    again = clean(ctx, D2)
    assert again["silver_rows"] == world["metrics"][D2]["silver_rows"]
    assert again["duplicates_dropped"] == world["metrics"][D2]["duplicates_dropped"]
    assert silver_t.version() > before[2]  # it did publish again ...
    assert _rows(silver_t.read()) == before[0]  # ... the same rows, not deduplicated against itself
    assert _rows(quarantine_t.read()) == before[1]


def test_a_backfilled_day_meets_the_replays_later_days_published(world, base_conf, tmp_path):
    """D1 skipped, then cleaned after D2 (a backfill): the D1 events that D2's files replayed
    are already in silver, ingested on D2, so D1 drops its copies. Silver then holds the same
    events as cleaning in date order, each once, and re-running either day changes nothing."""
    from streamrank.ingest import ingest

    in_order: Context = world["ctx"]
    cfg = base_conf.with_overrides({"warehouse.root": str(tmp_path / "warehouse"),
                                    "landing.root": str(in_order.cfg.landing), "delta.engine": "rs"})
    ctx = Context(cfg)
    for day in (D1, D2):
        ingest(ctx, day)
    m2, m1 = clean(ctx, D2), clean(ctx, D1)

    silver_t, quarantine_t = ctx.table("silver/viewer_events"), ctx.table("silver/quarantine")
    ids = sorted(r[0] for r in silver_t.read().select("event_id").collect())
    assert ids == sorted(r[0] for r in in_order.table("silver/viewer_events").read().select("event_id").collect())
    ordered = world["metrics"]
    moved = m1["duplicates_dropped"] - ordered[D1]["duplicates_dropped"]  # D1's copies of what D2 published
    assert moved > 0 and ordered[D2]["duplicates_dropped"] - m2["duplicates_dropped"] == moved
    for m in (m1, m2):
        assert m["silver_rows"] + m["quarantined_rows"] + m["duplicates_dropped"] == m["bronze_rows"]

    before = (_rows(silver_t.read()), _rows(quarantine_t.read()))
    assert (clean(ctx, D1)["silver_rows"], clean(ctx, D2)["silver_rows"]) == (m1["silver_rows"], m2["silver_rows"])
    assert (_rows(silver_t.read()), _rows(quarantine_t.read())) == before


def test_conservation_violation_publishes_nothing(world, monkeypatch):
    ctx: Context = world["ctx"]
    silver_t, quarantine_t = ctx.table("silver/viewer_events"), ctx.table("silver/quarantine")
    versions = (silver_t.version(), quarantine_t.version())
    real = clean_mod.partition_rows
    # the Delta log claims one row more than the pipeline accounts for
    monkeypatch.setattr(clean_mod, "partition_rows", lambda t, v, c, d: real(t, v, c, d) + (c == "ingest_date"))
    files = _parquet_files(silver_t, quarantine_t)
    with pytest.raises(StreamrankError, match="conservation violated") as err:
        clean(ctx, D1)
    assert err.value.exit_code == 1
    assert (silver_t.version(), quarantine_t.version()) == versions
    assert _parquet_files(silver_t, quarantine_t) == files  # the staged files were deleted, not left as orphans


def test_silver_suite_failure_publishes_nothing_and_leaves_no_files(world, monkeypatch):
    """A critical silver expectation fails (event types outside the set): exit 3; the files
    both tables had staged while GX ran are deleted, and both tables stay at their version."""
    ctx: Context = world["ctx"]
    silver_t, quarantine_t = ctx.table("silver/viewer_events"), ctx.table("silver/quarantine")
    versions, files = (silver_t.version(), quarantine_t.version()), _parquet_files(silver_t, quarantine_t)
    staged = []
    real_silver, real_stage = clean_mod.to_silver, type(silver_t).stage_overwrite
    monkeypatch.setattr(clean_mod, "to_silver", lambda *a: real_silver(*a).withColumn("event_type", F.lit("teleport")))
    monkeypatch.setattr(type(silver_t), "stage_overwrite", lambda self, *a, **k: staged.append(self) or real_stage(self, *a, **k))
    with pytest.raises(QualityGateError, match="expect_column_values_to_be_in_set") as err:
        clean(ctx, D1)
    assert err.value.exit_code == 3
    assert sorted(t.spec.name for t in staged) == ["silver/quarantine", "silver/viewer_events"]
    assert (silver_t.version(), quarantine_t.version()) == versions
    assert _parquet_files(silver_t, quarantine_t) == files


def test_silver_gate_reads_the_files_it_publishes(world, monkeypatch):
    """Write, audit, publish: GX's silver suite reads exactly the Parquet files that the new
    silver version then adds (not a recomputation of the frame), and sees all their rows."""
    from streamrank import quality

    ctx: Context = world["ctx"]
    silver_t = ctx.table("silver/viewer_events")
    before = set(_parquet_files(silver_t))
    audited: dict[str, tuple[set[Path], int]] = {}
    real = quality.validate_all

    def spy(checks, *a, **k):
        for c in checks:
            df = c.frame()
            if not hasattr(df, "inputFiles"):
                continue  # the pandas day summary
            audited[c.suite] = ({Path(f.removeprefix("file:")) for f in df.inputFiles()}, df.count())
        return real(checks, *a, **k)

    monkeypatch.setattr(quality, "validate_all", spy)
    metrics = clean(ctx, D1)
    added = set(_parquet_files(silver_t)) - before
    files, rows = audited["silver_viewer_events"]
    assert files and files == added
    assert rows == metrics["silver_rows"] == world["metrics"][D1]["silver_rows"]


def _parquet_files(*tables) -> list[Path]:
    return sorted(p for t in tables for p in Path(t.uri).rglob("*.parquet"))


def _bronze_row(i: int, viewer: str, ts: str, event_type: str = "view_product", **over: Any) -> dict[str, Any]:
    row = {
        "event_id": f"e{i:06d}", "viewer_id": viewer, "session_id": f"s-{viewer}", "stream_id": "st1", "host_id": "h1",
        "product_id": None if event_type in ("enter_stream", "leave_stream") else "p1", "event_type": event_type,
        "event_ts": ts, "dwell_ms": "100", "price_paid": "9.99" if event_type == "purchase" else None,
        "quantity": "1" if event_type in ("purchase", "add_to_cart") else None, "device_id": "d", "ip": "1.2.3.4",
        "comment_text": None, "app_version": "6.0.0", "parse_ok": True, "source_file": "events/f.jsonl",
        "line_number": i + 1, "ingest_run_id": "t", "ingested_at": dt.datetime(2026, 3, 2, tzinfo=dt.UTC),
        "ingest_date": D1,
    }
    row.update(over)
    row.setdefault("raw_line", f'{{"event_id":"{row["event_id"]}"}}')
    return row


def _ts(base: dt.datetime, seconds: float) -> str:
    return (base + dt.timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def test_bot_rule_sliding_windows(spark):
    noon = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
    rows, i = [], 0

    def add(viewer: str, seconds: list[float], event_type: str = "view_product") -> None:
        nonlocal i
        for s in seconds:
            rows.append(_bronze_row(i, viewer, _ts(noon, s), event_type))
            i += 1

    add("v_burst", [k * 1.4 for k in range(40)])                  # 40 events in one minute: bot
    add("v_burst", [5 * 3600.0])                                   # ... and its quiet row later that day too
    add("v_steady", [600 + k * 6.0 for k in range(100)])           # 10 per minute for 10 minutes: not a bot
    add("v_straddle", [30 + k * 1.9 for k in range(31)])           # 31 in 60 s across a minute boundary: bot
    add("v_buyer", [k * 170.0 for k in range(21)], "purchase")     # 21 purchases within one hour: bot
    add("v_shopper", [k * 180.0 for k in range(20)], "purchase")   # 20 purchases in an hour: at the limit, not a bot
    rules = CleanRules()  # 30 events / minute, 20 purchases / hour
    assert sliding_max([0, 10, 59_999_999, 60_000_000, 60_000_011], 60_000_000) == 3  # windows are (t - 60 s, t]
    bronze = spark.createDataFrame(rows, table_spec("bronze/viewer_events").schema)
    typed = type_events(bronze)
    bots = find_bots(typed, rules)
    assert bots == ["v_burst", "v_buyer", "v_straddle"]
    marked = apply_bots(row_reasons(typed, D1, rules, {"p1"}, {"st1"}), bots)
    got = Counter((r["viewer_id"], tuple(r["reasons"]), r["outcome"]) for r in label(marked, duplicate_plan(marked, None)).collect())
    assert got == {  # ALL rows of a bot, its quiet one five hours later too; nothing else flagged
        ("v_burst", ("bot",), "quarantine"): 41, ("v_straddle", ("bot",), "quarantine"): 31,
        ("v_buyer", ("bot",), "quarantine"): 21, ("v_steady", (), "silver"): 100, ("v_shopper", (), "silver"): 20,
    }


def test_reasons_and_dedup_precedence(spark):
    ts = "2026-03-01T10:00:00.000+08:00"
    base = dict(viewer="v1", ts=ts)
    rows = [
        _bronze_row(0, **base),                                                  # valid, first copy: silver
        _bronze_row(0, **base, line_number=50),                                  # exact copy later in the file: duplicate
        _bronze_row(0, **base, source_file="events/a.jsonl", line_number=99),   # copy in an earlier-sorting file: kept
        _bronze_row(1, **base, dwell_ms="-5", product_id="p404"),                # two faults: both codes
        _bronze_row(1, **base, dwell_ms="-5", product_id="p404", line_number=70),  # copy of a bad line: quarantined too
        _bronze_row(2, **base),                                                  # already in silver earlier: duplicate
        _bronze_row(3, **base, raw_line='{"event_id":"e3", \ufffd}', parse_ok=False, event_id=None, viewer_id=None),
        _bronze_row(4, **base, event_ts="2026-03-01 10:00:00"),                  # no offset: bad_type
        _bronze_row(5, **base, quantity="abc", event_type="add_to_cart"),       # wrong type
        _bronze_row(6, **base, price_paid="NaN", event_type="purchase"),        # NaN price
        _bronze_row(7, **base, quantity="101", event_type="purchase"),          # above clean.max_quantity
        _bronze_row(8, viewer="v1", ts="2026-03-02T01:30:00+00:00"),            # 1.5 h after D: future_ts
        _bronze_row(9, viewer="v1", ts="2026-02-25T23:59:59Z"),                 # before D - 3 days: past_ts
        _bronze_row(10, viewer="v1", ts="2026-02-26T00:00:00Z"),                # exactly D - 3 days: late, valid
        _bronze_row(11, **base, event_type="heartbeat", stream_id="st404", session_id=None),
        _bronze_row(12, viewer='{"id":"v1"}', ts=ts),                           # a JSON object where an id belongs
        _bronze_row(13, **base, app_version='["6.0.0"]'),                       # a JSON array: bad_type
        _bronze_row(14, viewer="12345", ts=ts, host_id="h{1}"),                 # a number as id, a brace inside: valid
    ]
    rules = CleanRules()
    bronze = spark.createDataFrame(rows, table_spec("bronze/viewer_events").schema)
    flagged = row_reasons(type_events(bronze), D1, rules, {"p1"}, {"st1"})
    prior = spark.createDataFrame([("e000002",)], "event_id string")
    marked = apply_bots(flagged, [])
    labelled = label(marked, duplicate_plan(marked, prior))
    got = {(r["event_id"], r["source_file"], r["line_number"]): (r["outcome"], list(r["reasons"])) for r in labelled.collect()}
    assert got == {
        ("e000000", "events/f.jsonl", 1): ("duplicate", []),
        ("e000000", "events/f.jsonl", 50): ("duplicate", []),
        ("e000000", "events/a.jsonl", 99): ("silver", []),
        ("e000001", "events/f.jsonl", 2): ("quarantine", ["bad_dwell", "unknown_product"]),
        ("e000001", "events/f.jsonl", 70): ("quarantine", ["bad_dwell", "unknown_product"]),
        ("e000002", "events/f.jsonl", 3): ("duplicate", []),
        (None, "events/f.jsonl", 4): ("quarantine", ["bad_encoding", "malformed"]),  # fields of a broken line: not judged
        ("e000004", "events/f.jsonl", 5): ("quarantine", ["bad_type"]),
        ("e000005", "events/f.jsonl", 6): ("quarantine", ["bad_type"]),
        ("e000006", "events/f.jsonl", 7): ("quarantine", ["bad_price"]),
        ("e000007", "events/f.jsonl", 8): ("quarantine", ["bad_quantity"]),
        ("e000008", "events/f.jsonl", 9): ("quarantine", ["future_ts"]),
        ("e000009", "events/f.jsonl", 10): ("quarantine", ["past_ts"]),
        ("e000010", "events/f.jsonl", 11): ("silver", []),
        ("e000011", "events/f.jsonl", 12): ("quarantine", ["missing_field", "unknown_event_type", "unknown_stream"]),
        ("e000012", "events/f.jsonl", 13): ("quarantine", ["bad_type"]),
        ("e000013", "events/f.jsonl", 14): ("quarantine", ["bad_type"]),
        ("e000014", "events/f.jsonl", 15): ("silver", []),
    }
    assert set(REASONS) >= {code for _, codes in got.values() for code in codes}
    silver = clean_mod.to_silver(labelled, "r", D1)
    assert silver.columns == table_spec("silver/viewer_events").schema.fieldNames()
    assert {r["event_date"] for r in silver.collect()} == {D1, dt.date(2026, 2, 26)}


def test_in_set_matches_isin_on_awkward_ids(spark):
    """The one-expression IN list quotes ids exactly: quotes, backslashes, SQL, unicode, nulls."""
    known = ["p1", "it's", "back\\slash", "x') OR ('1'='1", "caf\u00e9", "tab\tid", "p1"]
    probe = [*known, "p2", "its", "back\\\\slash", None, ""]
    df = spark.createDataFrame([(v,) for v in probe], "product_id string")
    got = [(r["product_id"], r["a"], r["b"], r["c"]) for r in df.select(
        "product_id", in_set("product_id", known).alias("a"), F.col("product_id").isin(known).alias("b"),
        in_set("product_id", []).alias("c")).collect()]
    assert [(v, a) for v, a, _, _ in got] == [(v, b) for v, _, b, _ in got]
    assert [v for v, a, _, _ in got if a] == known  # every known row, and nothing else, matches
    assert [(v, c) for v, _, _, c in got] == [(v, None if v is None else False) for v in probe]


def test_garbage_day_trips_the_gate(spark, conf, capsys):
    """40 % garbage lines: exit 3 through the CLI, nothing published, docs page and dq rows say why."""
    from streamrank.cli import main

    ctx = Context(conf)
    ctx.warehouse.create_all()
    noon = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
    rows = [_bronze_row(i, f"v{i % 20}", _ts(noon, i * 7.0)) for i in range(60)]
    rows += [_bronze_row(60 + i, None, None, raw_line=f"garbage {i}", parse_ok=False, event_id=None, event_type=None)
             for i in range(40)]
    ctx.table("bronze/viewer_events").append(spark.createDataFrame(rows, table_spec("bronze/viewer_events").schema))
    _catalog(ctx, spark, D1)
    silver_t, quarantine_t = ctx.table("silver/viewer_events"), ctx.table("silver/quarantine")
    versions = (silver_t.version(), quarantine_t.version())
    files = _parquet_files(silver_t, quarantine_t)
    capsys.readouterr()
    rc = main(["clean", "--date", D1.isoformat(), "--set", f"warehouse.root={conf.warehouse}",
               "--set", f"landing.root={conf.landing}", "--set", "delta.engine=rs"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert (silver_t.version(), quarantine_t.version()) == versions
    assert _parquet_files(silver_t, quarantine_t) == files == []  # the 60 good rows were staged, then deleted
    assert "quarantine_ratio" in err
    page = Path(re.search(r"data docs: file://(\S+)", err).group(1))
    html = page.read_text(encoding="utf-8")
    assert "quarantine_ratio" in html and "expect_column_values_to_be_between" in html
    dq = [r for r in ctx.table("ops/dq_results").to_arrow().to_pylist() if r["stage"] == "clean"]
    failed = [r for r in dq if not r["success"]]
    assert [(r["suite"], r["column"], r["severity"]) for r in failed] == [("silver_day_summary", "quarantine_ratio", "critical")]
    assert len(dq) > len(failed)  # passing results are history too
    runs = [r for r in ctx.table("ops/job_runs").to_arrow().to_pylist() if r["stage"] == "clean"]
    assert [(r["status"], r["exit_code"]) for r in runs] == [("failed", 3)]


def _catalog(ctx: Context, spark, day: dt.date) -> None:
    ctx.table("bronze/products").append(spark.createDataFrame(
        [{"product_id": "p1", "title": "t", "category": "c", "brand": "b", "list_price": 9.99, "launch_date": day,
          "source_file": "x", "line_number": 1, "ingest_run_id": "t", "snapshot_date": day}],
        table_spec("bronze/products").schema))
    ctx.table("bronze/streams").append(spark.createDataFrame(
        [{"stream_id": "st1", "host_id": "h1", "start_ts": dt.datetime(2026, 3, 1, 10, tzinfo=dt.UTC),
          "end_ts": dt.datetime(2026, 3, 1, 14, tzinfo=dt.UTC), "source_file": "x", "line_number": 1,
          "ingest_run_id": "t", "snapshot_date": day}],
        table_spec("bronze/streams").schema))


def test_missing_inputs_exit_5(spark, conf):
    ctx = Context(conf)
    with pytest.raises(MissingInputError, match=r"bronze/viewer_events has no rows for ingest_date=2026-03-01") as err:
        clean(ctx, D1)
    assert err.value.exit_code == 5
    row = _bronze_row(0, "v1", "2026-03-01T10:00:00Z")
    ctx.table("bronze/viewer_events").append(spark.createDataFrame([row], table_spec("bronze/viewer_events").schema))
    with pytest.raises(MissingInputError, match=r"bronze/products has no rows for snapshot_date=2026-03-01"):
        clean(ctx, D1)
    assert ctx.table("silver/viewer_events").version() in (None, 0)


def test_quarantined_rows_are_replayed_once_their_cause_is_fixed(spark, base_conf, tmp_path):
    """The catalog of D missed products that events used, so clean quarantined those rows as
    unknown_product. A corrected catalog landed as products_D.rev1.csv, then ingest and clean
    re-run for D, move exactly the rows whose only reason that was to silver; every other row
    stays where it was, and the day still conserves. A broken line corrected at the source
    (a new events file) reaches silver the same way, its original staying in quarantine."""
    from streamrank.features import build_features
    from streamrank.generate import generate
    from streamrank.ingest import ChangedFileError, ingest

    cfg = base_conf.with_overrides({"warehouse.root": str(tmp_path / "warehouse"), "landing.root": str(tmp_path / "landing"),
                                    "delta.engine": "rs"})
    generate(cfg.landing, D1, 1, scale=0.005, faults=True)
    ctx = Context(cfg)
    ingest(ctx, D1)
    before = clean(ctx, D1)
    quarantine = ctx.table("silver/quarantine").read()
    fixable = quarantine.filter(F.col("reasons") == F.array(F.lit("unknown_product"))) \
        .select("event_id", F.get_json_object("raw_line", "$.product_id").alias("product_id")).collect()
    assert fixable, "the generated day must have unknown_product faults"
    kept_in_quarantine = _rows(quarantine.filter(F.col("reasons") != F.array(F.lit("unknown_product"))))
    silver_before = _rows(ctx.table("silver/viewer_events").read())

    original = Path(cfg.landing) / "catalog" / f"products_{D1}.csv"
    lines = original.read_text().splitlines()
    category = lines[1].split(",")[2]
    missing = sorted({r.product_id for r in fixable})
    revision = original.with_name(f"products_{D1}.rev1.csv")
    revision.write_text("\n".join(lines + [f"{p},Late Product {p},{category},Acme,19.99,2026-01-01" for p in missing]) + "\n")

    fixed = ingest(ctx, D1)
    assert fixed["new_files"] == [f"catalog/products_{D1}.rev1.csv"] and fixed["files_ignored"] == 0
    products = ctx.table("bronze/products").read().filter(F.col("snapshot_date") == F.lit(D1))
    assert products.count() == len(lines) - 1 + len(missing)  # replaced, not appended to
    assert {r.source_file for r in products.select("source_file").distinct().collect()} == {f"catalog/products_{D1}.rev1.csv"}

    build_features(ctx, D1)  # a night whose features read the silver about to change
    after = clean(ctx, D1)
    assert after["feature_nights_to_rebuild"] == [str(D1)] and "feature_nights_to_rebuild" not in before
    last = max((r for r in ctx.table("ops/job_runs").to_arrow().to_pylist() if r["stage"] == "clean"),
               key=lambda r: r["started_at"])
    assert f"`streamrank nightly --date {D1} --from features` rebuilds" in last["message"]
    assert after["silver_rows"] == before["silver_rows"] + len(fixable)
    assert after["quarantined_rows"] == before["quarantined_rows"] - len(fixable)
    assert after["duplicates_dropped"] == before["duplicates_dropped"]
    assert _rows(ctx.table("silver/quarantine").read()) == kept_in_quarantine
    silver = ctx.table("silver/viewer_events").read()
    fixed_ids = spark.createDataFrame([(r.event_id,) for r in fixable], "event_id string")
    assert _rows(silver.join(fixed_ids, "event_id", "left_anti")) == silver_before
    assert silver.join(fixed_ids, "event_id", "left_semi").count() == len(fixable)

    # a broken line is fixed at the source: its corrected copy, landed as a new events file,
    # reaches silver beside the original, which stays in quarantine (not a duplicate of it)
    broken = ctx.table("silver/quarantine").read().filter(F.col("reasons") == F.array(F.lit("bad_dwell"))).first()
    line = json.loads(broken.raw_line)
    line["dwell_ms"] = 1000
    (Path(cfg.landing) / f"events/date={D1}" / "corrected-1.jsonl").write_text(json.dumps(line) + "\n")
    assert ingest(ctx, D1)["new_files"] == [f"events/date={D1}/corrected-1.jsonl"]
    corrected = clean(ctx, D1)
    assert (corrected["silver_rows"], corrected["quarantined_rows"], corrected["duplicates_dropped"]) == (
        after["silver_rows"] + 1, after["quarantined_rows"], after["duplicates_dropped"])
    assert ctx.table("silver/viewer_events").read().filter(F.col("event_id") == broken.event_id).first().dwell_ms == 1000

    # an ingested revision is immutable; of two new ones, the newer is read and the older ignored
    revision.write_text(revision.read_text() + "p9999999,Changed,x,y,1.00,2026-01-01\n")
    with pytest.raises(ChangedFileError, match=f"products_{D1}.rev1.csv"):
        ingest(ctx, D1)
    revision.write_text("\n".join(lines + [f"{p},Late Product {p},{category},Acme,19.99,2026-01-01" for p in missing]) + "\n")
    for n in (2, 3):
        original.with_name(f"products_{D1}.rev{n}.csv").write_text("\n".join(lines) + "\n")
    again = ingest(ctx, D1)
    assert again["new_files"] == [f"catalog/products_{D1}.rev3.csv"] and again["files_ignored"] == 1
