"""The score stage's direct path: workers read the viewer-feature files themselves.

3,000 viewers of D in two Parquet files: the first in row groups of 500 rows, the second
written before the schema gained hist_host/hist_hour (those columns absent) in row groups
of 1,000 and 200. 300 viewers were last seen more than 7 days before the end of D and 30
have no last_event_ts: neither may be scored. With tasks of at most 400 viewers, row
groups straddle tasks, so a row can only be scored once if the split is exact.

The reference is the DataFrame path (Spark reads the same files, filters active viewers,
sorts each partition): the same viewers must get the same top-K and, in float32, the
same scores and probabilities.
"""

from __future__ import annotations

import datetime as dt
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamrank.score as score_mod
from streamrank.errors import StreamrankError
from streamrank.schemas import table_spec
from streamrank.score import (
    Piece,
    active_viewers,
    build_payload,
    end_of_day,
    read_pieces,
    score_files,
    score_viewers,
    split_tasks,
)

D = dt.date(2026, 11, 8)
N, N_INACTIVE, N_NO_TS, SPLIT = 3_000, 300, 30, 1_800
ACTIVE_DAYS, K, BATCH = 7, 10, 64
OLD_COLUMNS = ("hist_host", "hist_hour")  # absent from the second file


def _covered(tasks: list[list[Piece]]) -> list[tuple[str, int, int]]:
    """(file, row group, row) of every row the tasks name, in task order."""
    return [(uri, g, r) for task in tasks for uri, g, start, stop in task for r in range(start, stop)]


def test_split_tasks_names_every_row_exactly_once_in_order():
    groups = [("a", 0, 500), ("a", 1, 500), ("b", 0, 0), ("b", 1, 1000), ("b", 2, 7)]
    every_row = [(uri, g, r) for uri, g, n in groups for r in range(n)]
    for slots, task_rows in ((2, 400), (4, 10_000), (3, 1), (2, 2007)):
        tasks = split_tasks(groups, slots, task_rows)
        assert _covered(tasks) == every_row, (slots, task_rows)
        sizes = [sum(stop - start for _, _, start, stop in t) for t in tasks]
        assert len(tasks) % slots == 0 and max(sizes) <= task_rows and max(sizes) - min(sizes) <= 1
    assert len(split_tasks(groups, 2, 400)) == 6  # 2,007 rows: 2 slots x ceil(2007 / 800)
    assert split_tasks([("a", 0, 3)], 4, 100) == [[("a", 0, 0, 1)], [("a", 0, 1, 2)], [("a", 0, 2, 3)]]
    assert split_tasks([], 2, 10) == [] and split_tasks([("a", 0, 0)], 2, 10) == []


def _viewer_table(world, start: int, stop: int, last_seen: np.ndarray) -> pa.Table:
    h = world.histories(N, seed=9)
    rng = np.random.default_rng(10)
    raw = {c: rng.uniform(0, 50, N) for c in ("recency_days", "monetary_7d", "monetary_30d", "avg_price_paid")}
    L = world.seq_len
    offsets = pa.array(np.arange(stop - start + 1, dtype=np.int32) * L)

    def lists(name: str, typ: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(h[name][start:stop].reshape(-1).astype(typ.to_pandas_dtype()), typ))

    cols = {
        "viewer_id": pa.array([f"v{i:05d}" for i in range(start, stop)]),
        **{c: pa.array(v[start:stop]) for c, v in raw.items()},
        "frequency_7d": pa.array(np.arange(start, stop) % 4), "frequency_30d": pa.array(np.arange(start, stop) % 9),
        "price_tier": pa.array((np.arange(start, stop) % 5 + 1).astype(np.int32)),
        "n_events": pa.array(h["hist_len"][start:stop] + 1),
        "last_event_ts": pa.array(list(last_seen[start:stop]), pa.timestamp("us", tz="UTC")),
        "hist_len": pa.array(h["hist_len"][start:stop].astype(np.int32)),
        "hist_dt": lists("hist_dt", pa.float32()),
        **{c: lists(c, pa.int32()) for c in ("hist_product", "hist_category", "hist_event", "hist_dwell", *OLD_COLUMNS)},
        "as_of_date": pa.array([D] * (stop - start), pa.date32()),
    }
    return pa.table(cols)


@pytest.fixture(scope="module")
def viewer_files(tmp_path_factory, scoring_world) -> tuple[list[str], set[str]]:
    """The two files, and the ids of the viewers that must be scored."""
    end = end_of_day(D)
    rng = np.random.default_rng(11)
    seen = np.array([end - dt.timedelta(hours=float(x)) for x in rng.uniform(1, 24 * ACTIVE_DAYS - 1, N)], dtype=object)
    order = rng.permutation(N)
    inactive, no_ts = order[:N_INACTIVE], order[N_INACTIVE:N_INACTIVE + N_NO_TS]
    seen[inactive] = end - dt.timedelta(days=ACTIVE_DAYS, hours=1)
    seen[no_ts] = None
    root = tmp_path_factory.mktemp("viewer_features")
    first, second = root / "part-0.parquet", root / "part-1.parquet"
    pq.write_table(_viewer_table(scoring_world, 0, SPLIT, seen), first, row_group_size=500)
    old = _viewer_table(scoring_world, SPLIT, N, seen).drop(list(OLD_COLUMNS))
    with pq.ParquetWriter(second, old.schema) as writer:
        writer.write_table(old.slice(0, 1_000))
        writer.write_table(old.slice(1_000))
    active = {f"v{i:05d}" for i in set(range(N)) - set(inactive) - set(no_ts)}
    return [f"file:{first}", str(second)], active  # Spark's inputFiles form, and a plain path


@pytest.fixture(scope="module")
def payload_bc(spark, scoring_world):
    w = scoring_world
    payload, _ = build_payload(w.champion, w.cands, w.vocab, K, "fp32")
    bc = spark.sparkContext.broadcast(payload)
    yield bc
    bc.unpersist()


def _rows(df) -> dict[str, tuple]:
    out = {}
    for r in df.collect():
        assert r["viewer_id"] not in out, f"{r['viewer_id']} scored twice"
        out[r["viewer_id"]] = (r["strategy"], r["intent_score"], r["purchase_power"], r["top_idx"], r["top_score"], r["top_prob"])
    return out


def _direct(spark, files, bc) -> dict[str, tuple]:
    return _rows(score_files(spark, files, end_of_day(D) - dt.timedelta(days=ACTIVE_DAYS), bc, BATCH))


def test_read_pieces_fills_absent_columns_with_nulls(viewer_files):
    files, _ = viewer_files
    table = read_pieces([(files[1], 1, 150, 200), (files[0], 0, 0, 20)])
    assert table.num_rows == 70 and table.schema.names[:2] == ["viewer_id", "hist_product"]
    assert table.column("viewer_id")[0].as_py() == f"v{SPLIT + 1_000 + 150:05d}"
    assert table.column("hist_host").null_count == 50 and table.column("hist_hour").slice(50).null_count == 0


def test_direct_path_scores_the_active_viewers_like_the_dataframe_path(spark, viewer_files, payload_bc, monkeypatch):
    files, active = viewer_files
    monkeypatch.setattr(score_mod, "TASK_ROWS", 400)  # 3,000 rows over 2 slots: 8 tasks of 375
    assert len(split_tasks(score_mod.row_groups(files), 2, 400)) == 8
    direct = _direct(spark, files, payload_bc)
    assert set(direct) == active and len(direct) == N - N_INACTIVE - N_NO_TS

    frame = spark.read.schema(table_spec("gold/viewer_features").schema).parquet(*[urlparse(f).path for f in files])
    reference = _rows(score_viewers(active_viewers(frame, D, ACTIVE_DAYS), payload_bc, BATCH))
    assert set(reference) == active
    cold = 0
    for vid, (strategy, intent, power, idx, scores, probs) in direct.items():
        r = reference[vid]
        assert (strategy, idx) == (r[0], r[3]), vid
        cold += strategy == "cold_start"
        np.testing.assert_allclose(scores, r[4], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probs, r[5], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(intent, r[1], rtol=1e-5, atol=1e-6)
        assert power == r[2]
    assert 0 < cold < len(direct)


def test_direct_path_rerun_is_identical(spark, viewer_files, payload_bc, monkeypatch):
    files, _ = viewer_files
    monkeypatch.setattr(score_mod, "TASK_ROWS", 700)
    assert _direct(spark, files, payload_bc) == _direct(spark, list(reversed(files)), payload_bc)


def test_no_files_score_nobody(spark, payload_bc):
    assert score_files(spark, [], end_of_day(D), payload_bc, BATCH).count() == 0


def test_snapshot_with_deleted_rows_is_not_read_as_plain_parquet(conf, spark):
    """Enabling deletion vectors changes nothing while no file carries one; a deletion
    vector on any file makes the snapshot's files differ from its rows."""
    import deltalake
    from conftest import delete_with_deletion_vector

    from streamrank.delta import Warehouse

    table = Warehouse(spark, conf, engine="rs").table("gold/viewer_features")
    table.create()
    table.append_rows([{"viewer_id": v, "as_of_date": D} for v in "abc"])
    deltalake.DeltaTable(table.uri).alter.set_table_properties({"delta.enableDeletionVectors": "true"})
    enabled = table.version()
    assert table.plain_parquet() and len(table.files()) == 1
    delete_with_deletion_vector(table.uri, table.files()[0].rsplit("/", 1)[1], [1])
    assert not table.plain_parquet() and table.plain_parquet(version=enabled)
    assert table.files(version=0) == []
    with pytest.raises(StreamrankError, match="gold/viewer_features.*deletion vectors.*DeltaTable.read"):
        table.files()  # train and evaluate read files(): they must not resurrect deleted rows
    assert sorted(r.viewer_id for r in table.read().select("viewer_id").collect()) == ["a", "c"]
