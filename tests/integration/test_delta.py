"""The rs table layer: atomic, idempotent, time-travelling, concurrent-safe, plain Delta."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import deltalake
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from streamrank.delta import CommitGuard, DeltaTable, InjectedFault, Warehouse
from streamrank.errors import ConcurrentWriteError, SchemaMismatchError, StreamrankError
from streamrank.spark import delta_classes_loaded

REPO = Path(__file__).resolve().parents[2]
D1, D2, D3 = dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)


def eval_rows(spark, n: int, run_id: str = "r1", dates=(D1, D2, D3)):
    """n ops/model_eval rows spread over `dates`, with a unique metric name per row."""
    date_list = ",".join(f"DATE'{d}'" for d in dates)
    return spark.range(n).select(
        F.lit(run_id).alias("run_id"), F.lit("m").alias("mlflow_run_id"), F.lit("ranker").alias("model_name"),
        F.lit("1").alias("model_version"), F.lit("challenger").alias("candidate"),
        F.concat(F.lit("metric_"), F.col("id").cast("string")).alias("metric"), F.col("id").cast("double").alias("value"),
        F.timestamp_seconds(F.lit(1_790_000_000) + F.col("id")).alias("recorded_at"),
        F.expr(f"element_at(array({date_list}), cast(id % {len(dates)} as int) + 1)").alias("run_date"),
    )


def rows_of(df, *cols):
    return sorted(tuple(r) for r in df.select(*(cols or df.columns)).collect())


@pytest.fixture()
def wh(spark, conf):
    return Warehouse(spark, conf, engine="rs")


def test_create_all_tables_from_schema_files(wh):
    created = wh.create_all()
    assert "silver/viewer_events" in created and "gold/user_product_rankings" in created
    assert wh.create_all() == []  # idempotent
    table = wh.table("silver/viewer_events")
    dl = deltalake.DeltaTable(table.uri)
    assert dl.metadata().partition_columns == ["event_date"]
    assert [f.name for f in dl.schema().fields] == table.spec.schema.fieldNames()
    assert table.read().count() == 0


def test_append_read_and_interop(spark, wh):
    table = wh.table("ops/model_eval")
    res = table.append(eval_rows(spark, 3000))
    assert res.rows_added == 3000 and res.version == 1
    expected = rows_of(eval_rows(spark, 3000))
    assert rows_of(table.read()) == expected
    # delta-rs picks the files, pyarrow reads them: same rows, no Spark involved
    arrow = table.to_arrow().to_pandas()
    assert len(arrow) == 3000
    assert sorted(arrow["metric"]) == sorted(r[5] for r in expected)
    assert sorted(str(d) for d in arrow["run_date"].unique()) == [str(D1), str(D2), str(D3)]
    some = table.to_arrow(partitions={"run_date": [D1, D3]}).to_pylist()  # only those partitions' files
    want = rows_of(table.read().filter(F.col("run_date").isin([D1, D3])), "metric", "value", "run_date")
    assert len(want) == 2000 and sorted((r["metric"], r["value"], r["run_date"]) for r in some) == want
    assert table.to_arrow(partitions={"run_date": dt.date(2020, 1, 1)}).num_rows == 0
    # the log is plain Delta: protocol, metaData, add actions with stats and record counts
    log = [json.loads(line) for line in (Path(table.uri) / "_delta_log" / "00000000000000000001.json").read_text().splitlines()]
    adds = [a["add"] for a in log if "add" in a]
    assert sum(json.loads(a["stats"])["numRecords"] for a in adds) == 3000
    assert all(a["partitionValues"]["run_date"] in {str(D1), str(D2), str(D3)} for a in adds)
    assert all(Path(table.uri, a["path"]).exists() and f"run_date={a['partitionValues']['run_date']}" in a["path"] for a in adds)
    first = [json.loads(line) for line in (Path(table.uri) / "_delta_log" / "00000000000000000000.json").read_text().splitlines()]
    protocol = next(a["protocol"] for a in first if "protocol" in a)
    assert protocol["minReaderVersion"] == 1 and protocol["minWriterVersion"] <= 2
    # every file readable by plain pyarrow
    assert sum(pq.read_metadata(f.removeprefix("file://")).num_rows for f in table.files()) == 3000


def test_failed_commit_leaves_previous_version_and_vacuum_removes_orphans(spark, wh, monkeypatch):
    table = wh.table("ops/model_eval")
    table.append(eval_rows(spark, 100))
    before = rows_of(table.read())
    monkeypatch.setenv("STREAMRANK_FAULT_BEFORE_COMMIT", "ops/model_eval:raise")
    with pytest.raises(InjectedFault):
        table.append(eval_rows(spark, 50, run_id="r2"))
    monkeypatch.delenv("STREAMRANK_FAULT_BEFORE_COMMIT")
    assert table.version() == 1
    assert rows_of(table.read()) == before


def test_killed_writer_leaves_invisible_orphans_that_vacuum_removes(spark, wh, conf, tmp_path):
    table = wh.table("ops/model_eval")
    table.append(eval_rows(spark, 100))
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
        from streamrank.config import load_config
        from streamrank.spark import build_session
        from streamrank.delta import Warehouse
        from test_delta import eval_rows
        cfg = load_config(None, ["spark.master=local[1]", "warehouse.root={conf.warehouse}"], env={{}})
        spark = build_session(cfg)
        Warehouse(spark, cfg, engine="rs").table("ops/model_eval").append(eval_rows(spark, 500, run_id="killed"))
    """)
    env = {**os.environ, "STREAMRANK_FAULT_BEFORE_COMMIT": "ops/model_eval:kill"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    on_disk = {str(p) for p in Path(table.uri).rglob("*.parquet")}
    visible = {f.removeprefix("file://") for f in table.files()}
    orphans = on_disk - visible
    assert orphans, "the killed writer should have left uncommitted files"
    assert table.version() == 1 and table.read().count() == 100
    assert table.read().filter("run_id = 'killed'").count() == 0
    removed = table.vacuum(retention_hours=0)
    assert orphans <= set(removed)
    assert not any(Path(p).exists() for p in orphans)
    assert table.read().count() == 100


def test_overwrite_partition_twice_leaves_one_copy(spark, wh):
    table = wh.table("ops/model_eval")
    table.append(eval_rows(spark, 300))
    day2 = eval_rows(spark, 300).filter(F.col("run_date") == D2).withColumn("value", F.lit(7.0))
    table.overwrite(day2, where={"run_date": D2})
    table.overwrite(day2, where={"run_date": D2})
    assert table.read().filter(F.col("run_date") == D2).count() == 100
    assert table.read().filter(F.col("run_date") == D2).agg(F.min("value")).first()[0] == 7.0
    assert table.read().count() == 300
    with pytest.raises(StreamrankError, match="written data has run_date=2026-11-01"):
        table.overwrite(eval_rows(spark, 30), where={"run_date": D2})
    assert table.read().count() == 300


def test_staged_overwrite_is_invisible_until_commit_and_discard_leaves_no_files(spark, wh):
    """Write, audit, publish: staged files are on disk, readers see the old version, and
    a discarded write leaves the table's directory exactly as it was."""
    table = wh.table("ops/model_eval")
    table.append(eval_rows(spark, 300))
    before, on_disk = rows_of(table.read()), sorted(Path(table.uri).rglob("*.parquet"))
    day2 = eval_rows(spark, 300).filter(F.col("run_date") == D2).withColumn("value", F.lit(7.0))

    staged = table.stage_overwrite(day2, where={"run_date": D2})
    assert staged.rows == 100 and table.version() == 1
    assert rows_of(table.read()) == before  # staged files are not in the table
    assert len(list(Path(table.uri).rglob("*.parquet"))) > len(on_disk)
    # the audit reads exactly the staged files, the partition column included
    assert rows_of(staged.read()) == rows_of(day2.select(*table.spec.schema.fieldNames()))
    assert staged.read().columns == table.spec.schema.fieldNames()
    staged.discard()
    with pytest.raises(StreamrankError, match="is discarded"):
        staged.read()
    empty = table.stage_overwrite(day2.limit(0), where={"run_date": D2})
    assert empty.rows == 0 and empty.read().count() == 0 and empty.read().columns == table.spec.schema.fieldNames()
    empty.discard()
    staged.discard()  # a second discard does nothing
    assert sorted(Path(table.uri).rglob("*.parquet")) == on_disk and table.version() == 1
    with pytest.raises(StreamrankError, match="already discarded"):
        staged.commit()

    staged = table.stage_overwrite(day2, where={"run_date": D2}, commit_info={"run_id": "wap"})
    res = staged.commit()
    staged.discard()  # after a commit, discard must not touch the committed files
    assert (res.version, res.rows_added) == (2, 100)
    assert table.read().filter(F.col("run_date") == D2).agg(F.count("*"), F.min("value")).first() == (100, 7.0)
    assert table.read().count() == 300
    assert json.loads(table.history(1)[0]["userMetadata"]) == {"run_id": "wap"}


def test_compaction_between_staging_and_commit_is_a_conflict_not_doubled_rows(spark, wh):
    """`streamrank maintain` compacting a table while a stage has its replace staged: the
    compacted file holds the partition's old rows, so committing the replace would double
    them (delta-rs's own conflict check lets it through). The commit refuses instead."""
    table = wh.table("ops/model_eval")
    for i in range(4):
        table.append(eval_rows(spark, 300, run_id=f"r{i}"))
    before = rows_of(table.read())
    on_disk = set(Path(table.uri).rglob("*.parquet"))
    day2 = eval_rows(spark, 300).filter(F.col("run_date") == D2).withColumn("value", F.lit(7.0))
    staged = table.stage_overwrite(day2, where={"run_date": D2})
    table.optimize()
    compacted = table.version()
    with pytest.raises(ConcurrentWriteError, match=r"ops/model_eval changed while this write was staged .*OPTIMIZE.*re-run"):
        staged.commit()
    assert table.version() == compacted and rows_of(table.read()) == before
    # the staged files are gone: on disk are the old files (until vacuum) and the compacted ones
    assert set(Path(table.uri).rglob("*.parquet")) == on_disk | {Path(urlparse(u).path) for u in table.files()}
    # the re-run sees the compacted files and replaces them
    table.overwrite(day2, where={"run_date": D2})
    assert table.read().filter(F.col("run_date") == D2).agg(F.count("*"), F.min("value")).first() == (100, 7.0)
    assert table.read().count() == 900


def test_staged_replace_commits_past_writes_elsewhere_and_refuses_one_into_its_partition(spark, wh):
    table = wh.table("ops/model_eval")
    table.append(eval_rows(spark, 300))
    day2 = eval_rows(spark, 300).filter(F.col("run_date") == D2).withColumn("value", F.lit(7.0))
    staged = table.stage_overwrite(day2, where={"run_date": D2})
    table.append(eval_rows(spark, 30, run_id="other", dates=(D1,)))  # another partition: no conflict
    res = staged.commit()
    assert res.version == 3 and table.read().count() == 330
    assert table.read().filter(F.col("run_date") == D2).agg(F.count("*"), F.min("value")).first() == (100, 7.0)

    staged = table.stage_overwrite(day2.withColumn("value", F.lit(8.0)), where={"run_date": D2})
    seen = set(table.files(partitions={"run_date": D2}))
    table.append(eval_rows(spark, 30, run_id="late", dates=(D2,)))  # rows the replace never saw
    late = len(set(table.files(partitions={"run_date": D2})) - seen)
    with pytest.raises(ConcurrentWriteError, match=f"0 of the files it replaces were removed and {late} files were added"):
        staged.commit()
    assert table.read().filter(F.col("run_date") == D2).count() == 130 and table.version() == 4


def test_guarded_append_commits_past_other_commits_and_refuses_after_a_conflicting_one(spark, wh):
    table = wh.table("ops/model_eval")
    table.append(eval_rows(spark, 30), commit_info={"batch": "a"})
    since = table.version()

    def same_batch(entry):
        meta = json.loads(entry.get("userMetadata") or "{}")
        return f"batch {meta['batch']} is already in" if meta.get("batch") == "b" else None

    table.append(eval_rows(spark, 30, run_id="other"), commit_info={"batch": "c"})
    res = table.append(eval_rows(spark, 30, run_id="b"), commit_info={"batch": "b"}, guard=CommitGuard(since, same_batch))
    assert res.version == since + 2 and table.read().count() == 90

    files = set(table.files())
    on_disk = {p for p in Path(table.path).rglob("*.parquet")}
    with pytest.raises(ConcurrentWriteError, match="ops/model_eval: batch b is already in. Nothing was committed"):
        table.append(eval_rows(spark, 30, run_id="b"), commit_info={"batch": "b"}, guard=CommitGuard(since, same_batch))
    assert table.version() == since + 2 and set(table.files()) == files and table.read().count() == 90
    assert {p for p in Path(table.path).rglob("*.parquet")} == on_disk  # its staged files were deleted


def test_replace_where_on_data_column_rewrites_only_matching_rows(spark, wh):
    table = wh.table("ops/model_eval")
    table.append(eval_rows(spark, 90, run_id="a"))
    table.append(eval_rows(spark, 60, run_id="b"))
    replacement = eval_rows(spark, 10, run_id="a")
    res = table.overwrite(replacement, where={"run_id": "a"})
    assert res.files_removed > 0
    counts = dict(table.read().groupBy("run_id").count().collect())
    assert counts == {"a": 10, "b": 60}


def test_time_travel_by_version_and_timestamp(spark, wh):
    table = wh.table("ops/model_eval")
    table.append(eval_rows(spark, 30))
    v1_rows = rows_of(table.read())
    time.sleep(1.1)
    stamp = dt.datetime.now(dt.UTC)
    time.sleep(1.1)
    table.overwrite(eval_rows(spark, 5, run_id="new", dates=(D1,)), where={"run_date": D1})
    assert rows_of(table.read(version=1)) == v1_rows
    assert rows_of(table.read(timestamp=stamp)) == v1_rows
    assert table.read().count() == 25
    assert [h["version"] for h in table.history()] [:2] == [2, 1]


def test_merge_upserts_on_keys(spark, wh):
    table = wh.table("ops/model_eval")
    table.append(eval_rows(spark, 20))
    changes = eval_rows(spark, 25).filter("value >= 15").withColumn("value", F.col("value") + 1000)
    table.merge(changes, keys=["run_id", "metric", "run_date"])
    got = dict((r.metric, r.value) for r in table.read().collect())
    assert len(got) == 25
    assert got["metric_3"] == 3.0 and got["metric_15"] == 1015.0 and got["metric_24"] == 1024.0
    with pytest.raises(StreamrankError, match="duplicate keys"):
        table.merge(changes.unionByName(changes), keys=["run_id", "metric", "run_date"])


def test_merge_refuses_to_commit_over_a_compaction_of_what_it_read(spark, wh, monkeypatch):
    table = wh.table("ops/model_eval")
    for i in range(3):
        table.append(eval_rows(spark, 20, run_id=f"r{i}"))
    before = rows_of(table.read())
    checked = DeltaTable._commit_checked

    def compaction_first(self, *args, **kwargs):  # maintain's compaction lands just before the merge commits
        table.optimize()
        return checked(self, *args, **kwargs)

    monkeypatch.setattr(DeltaTable, "_commit_checked", compaction_first)
    with pytest.raises(ConcurrentWriteError, match="OPTIMIZE"):
        table.merge(eval_rows(spark, 25, run_id="r1").withColumn("value", F.lit(5.0)), keys=["run_id", "metric", "run_date"])
    assert rows_of(table.read()) == before


def test_schema_enforcement_names_columns(spark, wh):
    table = wh.table("ops/model_eval")
    bad = eval_rows(spark, 3).withColumn("value", F.col("value").cast("string")).drop("candidate").withColumn("extra", F.lit(1))
    with pytest.raises(SchemaMismatchError) as err:
        table.append(bad)
    msg = str(err.value)
    assert "missing columns ['candidate']" in msg and "unexpected columns ['extra']" in msg
    assert "value (table double, frame string)" in msg
    assert table.version() == 0


def test_schema_evolution_only_when_asked(spark, wh):
    table = wh.table("ops/model_eval")
    table.append(eval_rows(spark, 3))
    table.append(eval_rows(spark, 3).withColumn("note", F.lit("x")), evolve=True)
    df = table.read()
    assert "note" in df.columns
    assert sorted(r.note for r in df.collect() if r.note) == ["x", "x", "x"]
    assert df.count() == 6


def test_columns_added_to_a_schema_file_upgrade_an_existing_table(spark, wh):
    """A warehouse created before the contract gained a column takes it on the next write."""
    from pyspark.sql.types import StructType

    from streamrank.schemas import TableSpec

    new = wh.table("ops/model_eval")
    old_spec = TableSpec(new.spec.name, StructType([f for f in new.spec.schema.fields if f.name != "recorded_at"]),
                         new.spec.partition_by, new.spec.description)
    old = DeltaTable(spark, old_spec, wh.root, "rs")
    old.append(eval_rows(spark, 3, run_id="old").drop("recorded_at"))
    assert new.missing_columns() == ["recorded_at"]
    assert wh.upgrade_all() == {"ops/model_eval": ["recorded_at"]} and wh.upgrade_all() == {}
    new.append(eval_rows(spark, 2, run_id="new"))
    assert sorted(f.name for f in deltalake.DeltaTable(new.uri).schema().fields) == sorted(new.spec.schema.fieldNames())
    got = {(r.run_id, r.recorded_at is None) for r in new.read().collect()}
    assert got == {("old", True), ("new", False)}
    arrow = new.to_arrow()  # files written before the column read it as null
    assert arrow.num_rows == 5 and arrow.column("recorded_at").null_count == 3


def test_concurrent_appends_from_two_processes(wh, conf):
    table = wh.table("ops/job_runs")
    table.create()
    script = textwrap.dedent(f"""
        import datetime as dt, sys
        from streamrank.config import load_config
        from streamrank.delta import Warehouse
        cfg = load_config(None, ["warehouse.root={conf.warehouse}"], env={{}})
        t = Warehouse(None, cfg, engine="rs").table("ops/job_runs")
        tag = sys.argv[1]
        for i in range(15):
            t.append_rows([{{"run_id": f"{{tag}}-{{i}}-{{j}}", "stage": tag, "run_date": dt.date(2026, 11, 1)}} for j in range(20)])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, tag]) for tag in ("p1", "p2")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ids = [r["run_id"] for r in table.to_arrow().to_pylist()]
    assert len(ids) == 600 and len(set(ids)) == 600


def test_concurrent_spark_appends_both_land(spark, wh):
    table = wh.table("ops/model_eval")
    table.create()
    errors = []

    def work(tag):
        try:
            table.append(eval_rows(spark, 200, run_id=tag))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in ("t1", "t2")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert dict(table.read().groupBy("run_id").count().collect()) == {"t1": 200, "t2": 200}
    assert table.version() == 2


def test_optimize_compacts_and_keeps_rows(spark, wh):
    table = wh.table("ops/model_eval")
    for i in range(4):
        table.append(eval_rows(spark, 50, run_id=f"r{i}"))
    before = rows_of(table.read())
    files_before = len(table.files())
    table.optimize()
    assert len(table.files()) < files_before
    assert rows_of(table.read()) == before


def test_large_write_with_small_driver(conf, tmp_path):
    """5M rows with a 1g driver: data must never go through the driver."""
    script = textwrap.dedent(f"""
        from pyspark.sql import functions as F
        from streamrank.config import load_config
        from streamrank.spark import build_session
        from streamrank.delta import Warehouse
        cfg = load_config(None, ["spark.master=local[2]", "spark.driver_memory=1g", "warehouse.root={conf.warehouse}"], env={{}})
        spark = build_session(cfg)
        assert spark.conf.get("spark.driver.memory") == "1g"
        df = spark.range(5_000_000).select(
            F.concat(F.lit("v"), F.col("id").cast("string")).alias("viewer_id"),
            (F.col("id") % 97).cast("double").alias("intent_score"), F.rand(1).alias("purchase_power"),
            F.lit("1").alias("model_version"), F.lit("run").alias("run_id"),
            F.expr("date_add(DATE'2026-11-01', cast(id % 2 as int))").alias("score_date"))
        t = Warehouse(spark, cfg, engine="rs").table("gold/user_intent_scores")
        res = t.append(df)
        print("ROWS", res.rows_added, t.read().count())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ROWS 5000000 5000000" in proc.stdout


def test_spark_engine_when_delta_jars_load(spark, conf):
    if not delta_classes_loaded(spark):
        pytest.skip("spark engine: io.delta classes cannot load here (no Maven access, no local Delta jars)")
    wh = Warehouse(spark, conf, engine="spark")
    table = wh.table("ops/model_eval")
    table.append(eval_rows(spark, 30))
    table.overwrite(eval_rows(spark, 30).filter(F.col("run_date") == D1), where={"run_date": D1})
    assert table.read().count() == 30
    assert deltalake.DeltaTable(table.uri).version() >= 1
    # restore (what publish.py's recovery calls) through delta-spark's own API
    v = table.version()
    table.overwrite(eval_rows(spark, 5, run_id="r9", dates=(D1,)), where={"run_date": D1})
    assert table.restore(v) == v + 2
    assert table.read().count() == 30 and table.read().filter("run_id = 'r9'").count() == 0
    # write, audit, publish: no files before the commit, so the audit reads the frame itself
    frame = eval_rows(spark, 3, run_id="r8", dates=(D2,))
    staged = table.stage_overwrite(frame, where={"run_date": D2})
    assert staged.read(frame) is frame and staged.read() is None
    staged.commit()
    assert table.read().filter("run_id = 'r8'").count() == 3


def test_restore_brings_back_a_version_as_a_new_commit(spark, wh):
    table = wh.table("ops/model_eval")
    table.append(eval_rows(spark, 30))
    before = rows_of(table.read())
    table.overwrite(eval_rows(spark, 5, run_id="r2", dates=(D1,)), where={"run_date": D1})
    assert table.read().count() == 20 + 5
    assert table.restore(1, commit_info={"stage": "recover", "run_id": "r3"}) == 3
    assert rows_of(table.read()) == before
    entry = table.history(1)[0]
    assert entry["operation"] == "RESTORE" and json.loads(entry["userMetadata"])["run_id"] == "r3"
    assert table.read(version=2).filter("run_id = 'r2'").count() == 5  # the undone commit stays in history


def test_rows_deleted_by_deletion_vectors_stay_deleted(spark, wh):
    """delta-spark deleted rows with deletion vectors (their file keeps them): the rs engine
    reads the table's rows, not the file's, and refuses the writes that replace such a file
    (it would drop the vector or rewrite the deleted rows); appends add files and go on."""
    from conftest import delete_with_deletion_vector

    table = wh.table("ops/model_eval")
    table.append(eval_rows(spark, 300))
    before = table.version()
    path = table.files()[0].removeprefix("file://")
    metrics = pq.read_table(path, columns=["metric"]).column("metric").to_pylist()
    gone = [0, 7, len(metrics) - 1]
    deleted = delete_with_deletion_vector(table.uri, Path(path).name, gone)
    everything = set(rows_of(table.read(before), "metric"))
    left = sorted(everything - {(metrics[i],) for i in gone})
    assert len(everything) == 300 and len(left) == 297
    assert rows_of(table.read(), "metric") == left
    assert sorted((m,) for m in table.to_arrow().column("metric").to_pylist()) == left
    # delta-rs's own reader (DataFusion) agrees; a numeric column, as pyarrow 14 has no string views
    assert pa.table(deltalake.DeltaTable(table.uri).scan(columns=["value"])).num_rows == 297
    assert not table.plain_parquet() and table.plain_parquet(before)
    with pytest.raises(StreamrankError, match="ops/model_eval.*deletion vectors"):
        table.files()
    vector_date = dt.date.fromisoformat(Path(path).parent.name.removeprefix("run_date="))  # the partition
    other = next(d for d in (D1, D2, D3) if d != vector_date)
    assert not table.plain_parquet(partitions={"run_date": vector_date})
    assert table.plain_parquet(partitions={"run_date": other}) and table.files(partitions={"run_date": other})
    with pytest.raises(StreamrankError, match="cannot overwrite ops/model_eval with the rs engine: 1 of the files it "
                                              "replaces carry deletion vectors"):
        table.overwrite(eval_rows(spark, 10, dates=(vector_date,)), where={"run_date": vector_date})
    with pytest.raises(StreamrankError, match="cannot merge into ops/model_eval with the rs engine"):
        table.merge(eval_rows(spark, 10), keys=["run_id", "metric"])
    assert table.version() == deleted
    table.append(eval_rows(spark, 30, run_id="r2"))
    assert table.read().count() == 327
    # a partition whose files carry no vector is replaced as usual; the vector's rows stay deleted
    table.overwrite(eval_rows(spark, 6, run_id="r3", dates=(other,)), where={"run_date": other})
    assert table.read().filter(F.col("run_date") == F.lit(other)).count() == 6
    replaced = set(rows_of(table.read(before).filter(F.col("run_date") == F.lit(other)), "metric"))
    assert rows_of(table.read().filter(F.col("run_id") == "r1"), "metric") == sorted(set(left) - replaced)


def test_column_mapped_table_is_refused_by_the_rs_engine(spark, wh):
    """With column mapping a file's columns have physical names: reading them by their
    logical names would give nulls, and writing logical names would corrupt the table."""
    from streamrank.delta import arrow_schema

    table = wh.table("ops/model_eval")
    rows = eval_rows(spark, 4).collect()
    deltalake.write_deltalake(
        table.uri, pa.Table.from_pylist([r.asDict() for r in rows], schema=arrow_schema(table.spec.schema)),
        partition_by=list(table.spec.partition_by), configuration={"delta.columnMapping.mode": "name"})
    assert deltalake.DeltaTable(table.uri).count() == 4
    assert not table.plain_parquet()
    with pytest.raises(StreamrankError, match="cannot read ops/model_eval with the rs engine: .*column mapping"):
        table.read()
    with pytest.raises(StreamrankError, match="cannot read ops/model_eval with pyarrow"):
        table.to_arrow()
    with pytest.raises(StreamrankError, match="cannot write ops/model_eval with the rs engine"):
        table.append(eval_rows(spark, 2))
    assert table.version() == 0
