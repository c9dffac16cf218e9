"""`streamrank maintain`: compaction and vacuum change no row and delete only unneeded files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_delta import D1, eval_rows, rows_of

from streamrank.cli import main
from streamrank.context import Context
from streamrank.errors import LockHeldError
from streamrank.lock import WarehouseLock
from streamrank.maintain import maintain

TABLE = "ops/model_eval"


@pytest.fixture()
def ctx(spark, conf):
    ctx = Context(conf)
    ctx.spark = spark
    return ctx


def on_disk(table) -> set[str]:
    """Every file under the table's root but its log, staging dirs counted as one entry each."""
    root = Path(table.path)
    files = {str(p) for p in root.rglob("*") if p.is_file() and "_delta_log" not in p.parts
             and not p.parent.name.startswith("w-")}
    return files | {str(p) for p in root.glob("w-*")}


def referenced(table) -> set[str]:
    return {f.removeprefix("file://") for f in table.files()}


def littered(ctx: Context):
    """ops/model_eval after three appends (several files per partition), one overwrite of D1
    (replaced files left on disk), a killed write's unreferenced file and a staging dir."""
    spark, table = ctx.spark, ctx.table(TABLE)
    for i in range(3):
        table.append(eval_rows(spark, 40, run_id=f"r{i}").repartition(2))
    table.overwrite(eval_rows(spark, 20, run_id="r9", dates=(D1,)).repartition(2), where={"run_date": D1})
    pq.write_table(pa.table({"x": [1]}), Path(table.path) / "run_date=2026-11-02" / "part-killed-writer.parquet")
    (Path(table.path) / "w-deadbeef").mkdir()
    (Path(table.path) / "w-deadbeef" / "part-0.parquet").write_bytes(b"PAR1")
    return table


def test_compacts_and_vacuums_keeping_every_row(ctx):
    table = littered(ctx)
    rows, version, files = rows_of(table.read()), table.version(), referenced(table)
    per_partition = Counter(Path(f).parent.name for f in files)
    small = sum(n for n in per_partition.values() if n > 1)
    unneeded = on_disk(table) - files  # replaced by the overwrite, the killed write's, the staging dir
    assert len(unneeded) >= 3

    done = maintain(ctx, retention_hours=0, force=True, tables=[TABLE])

    assert rows_of(table.read()) == rows
    # one OPTIMIZE commit, then delta-rs logs the vacuum as two commits of no data change
    assert [h["operation"] for h in table.history()[:3]] == ["VACUUM END", "VACUUM START", "OPTIMIZE"]
    assert table.version() == version + 3
    assert Counter(Path(f).parent.name for f in referenced(table)) == {p: 1 for p in per_partition}
    assert (done[0].files_compacted, done[0].files_written) == (small, sum(1 for n in per_partition.values() if n > 1))
    # retention 0: the compacted files go too, and nothing but the current files is left
    assert done[0].files_vacuumed == len(unneeded) + small
    assert on_disk(table) == referenced(table)
    assert done[0].bytes_vacuumed > 0
    run = [r for r in ctx.table("ops/job_runs").to_arrow().to_pylist() if r["stage"] == "maintain"]
    assert [r["status"] for r in run] == ["success"]
    metrics = json.loads(run[0]["metrics"])
    assert (metrics["files_compacted"], metrics["files_vacuumed"]) == (small, len(unneeded) + small)


def test_dry_run_lists_and_changes_nothing(ctx):
    table = littered(ctx)
    version, disk = table.version(), on_disk(table)
    dry = maintain(ctx, retention_hours=0, force=True, dry_run=True, tables=[TABLE])[0]
    assert dry.files_vacuumed == len(disk - referenced(table))
    assert table.version() == version and on_disk(table) == disk
    # what it said compaction would do is what compaction then does
    done = maintain(ctx, retention_hours=0, force=True, tables=[TABLE])[0]
    assert dry.files_compacted > 0 and (dry.files_compacted, dry.files_written) == (done.files_compacted, done.files_written)
    assert table.compaction_plan() == {}


def test_default_retention_keeps_recent_files(ctx):
    table = littered(ctx)
    disk = on_disk(table)
    done = maintain(ctx, tables=[TABLE], optimize=False)  # delta.vacuum_retention_hours = 168
    assert done[0].files_vacuumed == 0 and on_disk(table) == disk


def test_short_retention_needs_force_and_a_held_lock_blocks(ctx, capsys):
    table = littered(ctx)
    disk = on_disk(table)
    code = main(["maintain", "--retention-hours", "1", "--set", f"warehouse.root={ctx.cfg.warehouse}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "streamrank maintain: error: retention 1 h" in err and "pass --force" in err
    with WarehouseLock(ctx.cfg.warehouse, "nightly", "a-running-nightly"), \
            pytest.raises(LockHeldError, match="another nightly holds .*run a-running-nightly"):
        maintain(ctx, retention_hours=0, force=True, tables=[TABLE])
    # and the other way round: a nightly started while maintain runs is told who holds the lock
    with WarehouseLock(ctx.cfg.warehouse, "nightly", "upkeep", command="maintain"), \
            pytest.raises(LockHeldError, match="another maintain holds"):
        WarehouseLock(ctx.cfg.warehouse, "nightly", "a-nightly").acquire()
    assert on_disk(table) == disk
